//! Headless Chromium driven through the DevTools protocol, and a stream server with its web
//! server to point it at: shared by the browser tests (hostd/tests/web_browser.rs) and the
//! browser latency benchmark (hostd/examples/web_bench.rs).
//!
//! The browser is started as its own process group with `PR_SET_PDEATHSIG`; its guard kills
//! the group on every exit path. The self-signed identity is trusted with
//! `--ignore-certificate-errors-spki-list` (its SPKI hash), nothing else is ignored.

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hostd::stream::source::{self, RecordingInput};
use hostd::stream::{EnvRef, Identity, ServerConfig, StreamServer, TokenKey};
use hostd::web::{self, Certificate, WebServer};
use proto::stream::Rights;
use scenes::Scene;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long the tokens of [`Host::token`] last.
pub const HOUR: Duration = Duration::from_secs(3600);

/// The Chromium on `PATH` (Debian's `chromium`), if any.
pub fn chromium() -> Option<&'static str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|t| std::env::split_paths(&path).any(|dir| dir.join(t).is_file()))
}

/// A stream server with a synthetic scene, its web server, and what its source received.
pub struct Host {
    pub server: StreamServer,
    pub web: WebServer,
    pub input: Arc<RecordingInput>,
    pub tokens: Arc<TokenKey>,
    pub env: EnvRef,
    pub spki: String,
}

/// A stream server on 127.0.0.1 with one environment, `web`, showing `scene` at `w` x `h` and
/// `fps`, and the web server (page, WebSocket) on its port.
pub async fn host(scene: Scene, w: u32, h: u32, fps: f32) -> Host {
    // RUST_LOG=hostd=debug shows the server's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let identity = Identity::generate(&[]).unwrap();
    let tokens = Arc::new(TokenKey::generate().unwrap());
    let server = StreamServer::bind(ServerConfig::default(), &identity, tokens.clone()).unwrap();
    let env = EnvRef::new("web", 7);
    let (src, input) = source::synthetic(scene, w, h, fps);
    server.add_environment(&env, src, fps).unwrap();
    let web = WebServer::bind(
        server.local_addr().unwrap(),
        web::tls_config(Certificate::Identity(&identity)).unwrap(),
        server.message_viewers(),
    )
    .await
    .unwrap();
    Host {
        spki: web::spki_sha256_base64(&identity).unwrap(),
        server,
        web,
        input,
        tokens,
        env,
    }
}

impl Host {
    pub fn link(&self, token: &str) -> String {
        let addr = self.web.local_addr();
        web::web_url(&addr.ip().to_string(), addr.port(), &self.env.name, token)
    }

    pub fn token(&self, rights: Rights) -> String {
        self.tokens.issue(&self.env, rights, HOUR).unwrap()
    }
}

/// Headless Chromium with its DevTools connection; killed (its whole process group) when
/// dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    pub cdp: Cdp,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the browser's own process group (it was made its leader).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools protocol client: commands by id over the browser's WebSocket, flat
/// sessions for pages; events are ignored.
pub struct Cdp {
    out: mpsc::UnboundedSender<Message>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next: AtomicU64,
}

impl Cdp {
    pub async fn connect(url: &str) -> Cdp {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_owned();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(256 << 20))
            .max_frame_size(Some(256 << 20));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .unwrap();
        let (mut sink, mut stream) = ws.split();
        let (out, mut rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = waiting.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        Cdp {
            out,
            pending,
            next: AtomicU64::new(1),
        }
    }

    /// Sends `method` (to the page `session`, if given) and returns its result.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::Text(msg.to_string().into()))
            .unwrap();
        let v = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer in 30 s"))
            .unwrap();
        assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
        v["result"].clone()
    }
}

impl Browser {
    pub async fn start(spki: &str) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(chromium().unwrap());
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--mute-audio",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls setpgid(2)
        // and prctl(2), both async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpgid(0, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The guard exists before anything can fail: a panic below still kills the browser.
        let mut guard = Some((child, profile));
        let port_file = guard.as_ref().unwrap().1.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                let mut lines = s.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if Instant::now() > deadline {
                let (mut child, _) = guard.take().unwrap();
                // SAFETY: kill(2) on the browser's own process group.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                panic!("chromium wrote no DevToolsActivePort in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (child, profile) = guard.take().unwrap();
        let mut browser = Browser {
            child,
            _profile: profile,
            cdp: Cdp {
                out: mpsc::unbounded_channel().0,
                pending: Arc::default(),
                next: AtomicU64::new(1),
            },
        };
        browser.cdp = Cdp::connect(&url).await;
        browser
    }

    /// Opens `url` in a new page of `w` x `h` CSS pixels at device pixel ratio 1.
    pub async fn open(&self, url: &str, w: u32, h: u32) -> Page<'_> {
        self.open_with(
            url,
            json!({"width": w, "height": h, "deviceScaleFactor": 1, "mobile": false}),
            false,
        )
        .await
    }

    /// Opens `url` in a new page with these device metrics, with touch emulation if `touch`
    /// (set before the page loads, as a phone's).
    pub async fn open_with(&self, url: &str, metrics: Value, touch: bool) -> Page<'_> {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let page = Page {
            cdp: &self.cdp,
            session: attached["sessionId"].as_str().unwrap().to_owned(),
            target: target["targetId"].as_str().unwrap().to_owned(),
        };
        page.call("Emulation.setDeviceMetricsOverride", metrics)
            .await;
        if touch {
            page.call(
                "Emulation.setTouchEmulationEnabled",
                json!({"enabled": true, "maxTouchPoints": 5}),
            )
            .await;
        }
        page.call("Page.navigate", json!({"url": url})).await;
        page
    }
}

/// One page (a tab) of the browser and its DevTools session.
pub struct Page<'a> {
    cdp: &'a Cdp,
    session: String,
    target: String,
}

impl Page<'_> {
    /// Closes the page (its connections end with it).
    pub async fn close(self) {
        self.cdp
            .call(
                None,
                "Target.closeTarget",
                json!({ "targetId": self.target }),
            )
            .await;
    }

    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp.call(Some(&self.session), method, params).await
    }

    /// The value of `expr` in the page (JSON), or Null while it throws.
    pub async fn eval(&self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        if r.get("exceptionDetails").is_some() {
            return Value::Null;
        }
        r["result"]["value"].clone()
    }

    /// The value `expr` (a promise) resolves to, or its error text.
    pub async fn eval_promise(&self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.to_string()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Polls `expr` until `ok` accepts its value; fails after `secs` naming `what`.
    pub async fn wait_for(
        &self,
        expr: &str,
        secs: u64,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.eval(expr).await;
            if ok(&v) {
                return v;
            }
            if Instant::now() > deadline {
                let state = self
                    .eval("JSON.stringify([location.href, document.title, window.genos])")
                    .await;
                panic!("{what}: not within {secs} s; last {v}; page state {state}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn key(&self, code: &str, key: &str) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "code": code, "key": key}),
            )
            .await;
        }
    }

    pub async fn mouse(&self, kind: &str, x: u32, y: u32) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": kind, "x": x, "y": y, "button": if kind == "mouseMoved" { "none" } else { "left" }, "clickCount": 1}),
        )
        .await;
    }
}
