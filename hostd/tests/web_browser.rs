//! The browser client in real headless Chromium, driven through the DevTools protocol: the
//! page served by hostd's web server connects over the WebSocket transport to a stream
//! server with a synthetic scene, decodes frames with WebCodecs and draws the source picture,
//! sends typed keys and clicks to the environment in order, and shows an error page for an
//! expired or forged token and a stopped environment.
//!
//! Needs Debian's `chromium` (scripts/install-deps); skips without it unless GENOS_REQUIRE
//! covers `tools`. The self-signed identity is trusted with
//! `--ignore-certificate-errors-spki-list` (its SPKI hash), nothing else is ignored. Each
//! test holds a lock (one browser at a time on a small machine) and a time limit; the
//! browser is killed by its guard on every exit path, and by SIGKILL (PDEATHSIG) when the
//! test process dies outright.

mod browser;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use browser::{chromium, host, Browser, Host, Page, HOUR};
use hostd::stream::source::{self, RecordingInput};
use hostd::stream::{EnvRef, Identity, TokenKey};
use hostd::web;
use proto::stream::{Button, InputEvent, Rights};
use scenes::{Scene, SyntheticSource};
use serde_json::{json, Value};

/// One browser at a time: the machine has two cores, shared with the encoder and the build.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Skips (returns None) without Chromium unless GENOS_REQUIRE covers `tools`.
fn browser_available() -> bool {
    if chromium().is_none() {
        testkit::skip(
            testkit::Need::Tools,
            "chromium is not installed (scripts/install-deps)",
        );
        return false;
    }
    true
}

/// Runs `body` with the browser lock and a time limit.
async fn within<F: std::future::Future<Output = ()>>(secs: u64, body: F) {
    let _one = ONE_BROWSER.lock().await;
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test took longer than {secs} s"));
}

/// Opens a page over `transport`, waits for 300 decoded frames and compares the canvas with
/// the source frame it shows.
async fn decodes_300_frames_and_draws_the_source_picture(transport: &str) {
    within(240, async {
        let (w, h, fps) = (320u32, 240u32, 30.0);
        let hx = host(Scene::Windows, w, h, fps).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!("{}&transport={transport}", hx.link(&hx.token(Rights::VIEW)));
        let page = browser.open(&link, w, h).await;
        page.wait_for("window.genos && window.genos.state", 30, "session open", |v| v == "open")
            .await;
        page.wait_for("window.genos.framesDecoded", 150, "300 decoded frames", |v| {
            v.as_u64().unwrap_or(0) >= 300
        })
        .await;
        // The picture on the canvas and the sequence of the frame it shows, read together.
        let shot = page
            .eval("(() => { const c = window.genos.capture(); c.sequence = window.genos.drawnSequence; return c; })()")
            .await;
        assert_eq!((shot["width"].as_u64(), shot["height"].as_u64()), (Some(w.into()), Some(h.into())));
        let sequence = shot["sequence"].as_u64().unwrap();
        let rgba = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(shot["rgba"].as_str().unwrap())
                .unwrap()
        };
        let bgrx: Vec<u8> = rgba
            .chunks_exact(4)
            .flat_map(|p| [p[2], p[1], p[0], 0])
            .collect();
        // Encoded frame k is source frame k (the source starts with the first viewer).
        let mut replica = SyntheticSource::new(Scene::Windows, w, h, fps);
        let expected = loop {
            let data = replica.advance().frame.data.to_vec();
            if replica.rendered() == sequence {
                break data;
            }
        };
        let psnr = encoder::psnr_bgrx(&bgrx, &expected, w, h);
        let errors = page.eval("window.genos.decodeErrors").await;
        assert_eq!(page.eval("window.genos.transport").await, json!(transport));
        assert!(psnr >= 30.0, "canvas vs source frame {sequence}: {psnr:.1} dB");
        assert_eq!(errors, json!(0), "decoder errors");
        eprintln!("{transport}: frame {sequence} on the canvas: {psnr:.1} dB");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_decodes_300_frames_over_webtransport_and_draws_the_source_picture() {
    if browser_available() {
        decodes_300_frames_and_draws_the_source_picture("webtransport").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_decodes_300_frames_over_the_websocket_fallback_and_draws_the_source_picture() {
    if browser_available() {
        decodes_300_frames_and_draws_the_source_picture("websocket").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_keys_and_a_click_arrive_at_the_source_in_order() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let (w, h) = (320u32, 240u32);
        let hx = host(Scene::Still, w, h, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser
            .open(&hx.link(&hx.token(Rights::VIEW | Rights::INPUT)), w, h)
            .await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            30,
            "first frame",
            |v| v.as_u64().unwrap_or(0) >= 1,
        )
        .await;
        assert_eq!(
            page.eval("window.genos.transport").await,
            json!("webtransport"),
            "WebTransport is chosen where the browser has it"
        );
        page.key("KeyH", "h").await;
        page.key("KeyI", "i").await;
        page.key("Enter", "Enter").await;
        page.mouse("mouseMoved", 100, 50).await;
        page.mouse("mousePressed", 100, 50).await;
        page.mouse("mouseReleased", 100, 50).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let events = loop {
            let ev = hx.input.events();
            let released = ev
                .iter()
                .any(|e| matches!(e, InputEvent::PointerButton { pressed: false, .. }));
            if released || Instant::now() > deadline {
                break ev;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let key = |code, pressed| InputEvent::Key { code, pressed };
        let keys: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, InputEvent::Key { .. }))
            .cloned()
            .collect();
        assert_eq!(
            keys,
            vec![
                key(35, true),
                key(35, false),
                key(23, true),
                key(23, false),
                key(28, true),
                key(28, false)
            ]
        );
        let first_pointer = events
            .iter()
            .position(|e| !matches!(e, InputEvent::Key { .. }))
            .expect("pointer events");
        assert_eq!(first_pointer, 6, "keys before the click: {events:?}");
        let buttons: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, InputEvent::PointerButton { .. }))
            .cloned()
            .collect();
        assert_eq!(
            buttons,
            vec![
                InputEvent::PointerButton {
                    button: Button::Left,
                    pressed: true
                },
                InputEvent::PointerButton {
                    button: Button::Left,
                    pressed: false
                },
            ]
        );
        let press = events
            .iter()
            .position(|e| matches!(e, InputEvent::PointerButton { .. }))
            .unwrap();
        assert_eq!(
            events[press - 1],
            InputEvent::PointerMove { x: 100, y: 50 },
            "the pointer is at the click before the press: {events:?}"
        );
    })
    .await;
}

/// Opens `link` and returns the error page's title and the page's error name.
async fn error_page(hx: &Host, link: &str) -> (String, String) {
    let browser = Browser::start(&hx.spki).await;
    let page = browser.open(link, 320, 240).await;
    shown_error(&page).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_forged_token_shows_the_error_page() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = hx
            .tokens
            .issue_expiring_at(&hx.env, Rights::VIEW, now - 60)
            .unwrap();
        let (title, name) = error_page(&hx, &hx.link(&expired)).await;
        assert_eq!(
            (title.as_str(), name.as_str()),
            ("This link has expired", "TokenExpired")
        );
        let other = TokenKey::generate().unwrap();
        let forged = other.issue(&hx.env, Rights::VIEW, HOUR).unwrap();
        let (title, name) = error_page(&hx, &hx.link(&forged)).await;
        assert_eq!(
            (title.as_str(), name.as_str()),
            ("This link is not valid", "TokenForged")
        );
        assert!(hx.input.events().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_environment_shows_the_error_page() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser
            .open(&hx.link(&hx.token(Rights::VIEW)), 320, 240)
            .await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        hx.server.remove_environment(&hx.env.name);
        let err = page
            .wait_for("window.genos.error", 30, "error page", |v| v.is_object())
            .await;
        assert_eq!(err["name"], "NoSuchEnvironment");
        let title = page
            .eval("document.getElementById('error-title').textContent")
            .await;
        assert_eq!(title, "The environment is not running");
    })
    .await;
}

/// `genos-hostd serve-demo`, killed when dropped.
struct Demo {
    child: Child,
    state: tempfile::TempDir,
    lines: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start() -> Demo {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let state = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_genos-hostd"));
        cmd.arg("--state-dir")
            .arg(state.path())
            .args(["serve-demo", "--listen", "127.0.0.1:0", "--size", "320x240"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut demo = Demo {
            child,
            state,
            lines: Vec::new(),
        };
        // Two lines: the genos:// link, then the https link (read on a thread: a hung demo
        // fails the test's time limit, and the guard above kills it).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().take(2) {
                let _ = tx.send(line.unwrap_or_default());
            }
        });
        for _ in 0..2 {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("serve-demo printed its links");
            demo.lines.push(line);
        }
        demo
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_prints_a_browser_link_second_that_opens_the_stream() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let demo = Demo::start();
        let (genos, https) = (&demo.lines[0], &demo.lines[1]);
        assert!(genos.starts_with("genos://127.0.0.1:"), "{genos}");
        let port = genos
            .strip_prefix("genos://127.0.0.1:")
            .and_then(|r| r.split('/').next())
            .unwrap();
        let (page_url, fragment) = https.split_once('#').expect("a fragment");
        assert_eq!(page_url, format!("https://127.0.0.1:{port}/"));
        assert!(fragment.starts_with("env=demo&token="), "{fragment}");
        let identity = Identity::load_or_create(&demo.state.path().join("stream")).unwrap();
        let browser = Browser::start(&web::spki_sha256_base64(&identity).unwrap()).await;
        let page = browser.open(https, 320, 240).await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            60,
            "30 decoded frames",
            |v| v.as_u64().unwrap_or(0) >= 30,
        )
        .await;
        let codec = page.eval("window.genos.codec").await;
        assert!(codec.as_str().unwrap_or("").starts_with("avc1."), "{codec}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_only_link_shows_the_stream_and_sends_no_input() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser
            .open(&hx.link(&hx.token(Rights::VIEW)), 320, 240)
            .await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            30,
            "first frame",
            |v| v.as_u64().unwrap_or(0) >= 1,
        )
        .await;
        page.key("KeyA", "a").await;
        page.mouse("mouseMoved", 10, 10).await;
        page.mouse("mousePressed", 10, 10).await;
        page.mouse("mouseReleased", 10, 10).await;
        // Input the page would send goes out before a Ping does: one round trip is enough.
        // Chromium makes no click of a tap that comes right after a pinch ended.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(page.eval("window.genos.inputSent").await, json!(0));
        assert_eq!(page.eval("window.genos.state").await, json!("open"));
        assert!(hx.input.events().is_empty(), "{:?}", hx.input.events());
        assert_eq!(hx.server.env_stats(&hx.env.name).unwrap().input_refused, 0);
    })
    .await;
}

/// An environment input that records display-size requests (and takes every other event).
#[derive(Default)]
struct ResizeSink {
    asked: Mutex<Vec<(u32, u32)>>,
}

impl hostd::stream::InputSink for ResizeSink {
    fn inject(&self, _events: &[InputEvent]) -> Result<(), hostd::stream::source::InputError> {
        Ok(())
    }
    fn request_resize(
        &self,
        width: u32,
        height: u32,
    ) -> Result<(), hostd::stream::source::InputError> {
        self.asked.lock().unwrap().push((width, height));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewport_change_asks_the_environment_for_that_size_once() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        // A second environment of this server whose input records resizes.
        let sink = Arc::new(ResizeSink::default());
        let env = EnvRef::new("sized", 8);
        let src = hostd::stream::EnvironmentSource {
            frames: Box::new(SyntheticSource::new(Scene::Still, 320, 240, 10.0)),
            input: sink.clone(),
        };
        hx.server.add_environment(&env, src, 10.0).unwrap();
        let token = hx
            .tokens
            .issue(&env, Rights::VIEW | Rights::INPUT, HOUR)
            .unwrap();
        let addr = hx.web.local_addr();
        let link = web::web_url(&addr.ip().to_string(), addr.port(), &env.name, &token);
        let browser = Browser::start(&hx.spki).await;
        let page = browser.open(&link, 320, 240).await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            30,
            "first frame",
            |v| v.as_u64().unwrap_or(0) >= 1,
        )
        .await;
        // The viewport matches the stream: nothing is asked.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(sink.asked.lock().unwrap().is_empty());

        // Act: the viewport changes twice within the debounce, to 401 x 301 CSS pixels at
        // device pixel ratio 2.
        for (w, h) in [(360, 280), (401, 301)] {
            page.call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": w, "height": h, "deviceScaleFactor": 2, "mobile": false}),
            )
            .await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.asked.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;

        // Assert: one request, in physical pixels, each side even.
        assert_eq!(*sink.asked.lock().unwrap(), vec![(802, 602)]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_finger_touches_reach_the_touchscreen_as_contacts_in_order() {
    use proto::stream::TouchPhase;
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser
            .open(&hx.link(&hx.token(Rights::VIEW | Rights::INPUT)), 320, 240)
            .await;
        page.call(
            "Emulation.setTouchEmulationEnabled",
            json!({"enabled": true, "maxTouchPoints": 5}),
        )
        .await;
        page.wait_for("window.genos && window.genos.framesDecoded", 30, "first frame", |v| {
            v.as_u64().unwrap_or(0) >= 1
        })
        .await;

        // Act: two fingers down, both move, both lift.
        let points = |a: (u32, u32), b: (u32, u32)| {
            json!([{"x": a.0, "y": a.1, "id": 0}, {"x": b.0, "y": b.1, "id": 1}])
        };
        for (kind, touch_points) in [
            ("touchStart", points((50, 60), (200, 100))),
            ("touchMove", points((60, 70), (210, 120))),
            ("touchEnd", json!([])),
        ] {
            page.call(
                "Input.dispatchTouchEvent",
                json!({"type": kind, "touchPoints": touch_points}),
            )
            .await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let touches = loop {
            let t: Vec<_> = hx
                .input
                .events()
                .into_iter()
                .filter(|e| matches!(e, InputEvent::Touch { .. }))
                .collect();
            let ended = t
                .iter()
                .filter(|e| matches!(e, InputEvent::Touch { phase: TouchPhase::End, .. }))
                .count();
            if ended == 2 || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        // Assert: each finger is one contact: started where it touched, moved, ended there
        // (within one touch frame the browser orders the fingers as it likes).
        let touch = |id, phase, x, y| InputEvent::Touch { id, phase, x, y };
        let frame = |events: &[InputEvent]| {
            let mut v = events.to_vec();
            v.sort_by_key(|e| match e {
                InputEvent::Touch { id, .. } => *id,
                _ => u8::MAX,
            });
            v
        };
        assert_eq!(touches.len(), 6, "{touches:?}");
        assert_eq!(
            touches[..2],
            [
                touch(0, TouchPhase::Start, 50, 60),
                touch(1, TouchPhase::Start, 200, 100)
            ]
        );
        assert_eq!(
            frame(&touches[2..4]),
            [
                touch(0, TouchPhase::Move, 60, 70),
                touch(1, TouchPhase::Move, 210, 120)
            ]
        );
        assert_eq!(
            frame(&touches[4..]),
            [
                touch(0, TouchPhase::End, 60, 70),
                touch(1, TouchPhase::End, 210, 120)
            ]
        );
        assert!(
            !hx.input
                .events()
                .iter()
                .any(|e| matches!(e, InputEvent::PointerButton { .. })),
            "a touch is no mouse click: {:?}",
            hx.input.events()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_pointer_becomes_the_page_cursor_with_its_shape_and_position() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let (w, h) = (320u32, 240u32);
        let hx = host(Scene::Still, w, h, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser.open(&hx.link(&hx.token(Rights::VIEW)), w, h).await;
        let cursor = page
            .wait_for("window.genos && window.genos.cursor", 30, "a cursor", |v| {
                v["url"].is_string()
            })
            .await;
        let style = page
            .eval("document.getElementById('screen').style.cursor")
            .await;

        let arrow = scenes::arrow_cursor();
        let mut replica = SyntheticSource::new(Scene::Still, w, h, 10.0);
        replica.advance();
        let (px, py) = replica.pointer();
        assert_eq!(
            (
                cursor["width"].as_u64(),
                cursor["height"].as_u64(),
                cursor["hotX"].as_u64(),
                cursor["hotY"].as_u64()
            ),
            (
                Some(arrow.width.into()),
                Some(arrow.height.into()),
                Some(arrow.hot_x.into()),
                Some(arrow.hot_y.into())
            )
        );
        assert_eq!(
            (cursor["x"].as_i64(), cursor["y"].as_i64()),
            (Some(px.into()), Some(py.into()))
        );
        assert_eq!(cursor["visible"], json!(true));
        let style = style.as_str().unwrap_or_default();
        assert!(
            style.starts_with("url(\"data:image/png;base64,") && style.ends_with(") 0 0, default"),
            "{style}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clipboard_goes_both_ways_and_a_paste_reaches_the_guest_with_its_key() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let origin = format!("https://{}", hx.web.local_addr());
        browser
            .cdp
            .call(
                None,
                "Browser.grantPermissions",
                json!({"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}),
            )
            .await;
        let rights = Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD;
        let page = browser.open(&hx.link(&hx.token(rights)), 320, 240).await;
        page.call("Emulation.setFocusEmulationEnabled", json!({"enabled": true}))
            .await;
        page.wait_for("window.genos && window.genos.state", 30, "session open", |v| v == "open")
            .await;

        // The environment's clipboard reaches the page and the browser's clipboard.
        hx.server.set_environment_clipboard(&hx.env.name, "from the guest");
        page.wait_for("window.genos.clipboard", 10, "the guest's clipboard", |v| {
            v == "from the guest"
        })
        .await;
        let host_clipboard = page.eval_promise("navigator.clipboard.readText()").await;
        assert_eq!(host_clipboard, Ok(json!("from the guest")));

        // A paste with Ctrl+V hands the guest the browser's clipboard and then the keys.
        page.eval_promise("navigator.clipboard.writeText('from the browser')")
            .await
            .unwrap();
        let ctrl = 2;
        let key = |kind: &str, code: &str, k: &str, modifiers: i32| {
            json!({"type": kind, "code": code, "key": k, "modifiers": modifiers})
        };
        page.call("Input.dispatchKeyEvent", key("rawKeyDown", "ControlLeft", "Control", ctrl))
            .await;
        let mut v_down = key("rawKeyDown", "KeyV", "v", ctrl);
        v_down["commands"] = json!(["paste"]);
        page.call("Input.dispatchKeyEvent", v_down).await;
        page.call("Input.dispatchKeyEvent", key("keyUp", "KeyV", "v", ctrl))
            .await;
        page.call("Input.dispatchKeyEvent", key("keyUp", "ControlLeft", "Control", 0))
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while hx.input.events().len() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        assert_eq!(hx.input.clipboard().as_deref(), Some("from the browser"));
        let k = |code, pressed| InputEvent::Key { code, pressed };
        assert_eq!(
            hx.input.events(),
            vec![k(29, true), k(47, true), k(47, false), k(29, false)]
        );
        assert_eq!(page.eval("window.genos.clipboardSent").await, json!(1));
    })
    .await;
}

/// Opens a page over `transport`, holds Shift, drops the connection and checks that the page
/// resumes the same session, which still holds the key, and goes on streaming.
async fn a_dropped_connection_resumes_its_session(transport: &str) {
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!(
            "{}&transport={transport}",
            hx.link(&hx.token(Rights::VIEW | Rights::INPUT))
        );
        let page = browser.open(&link, 320, 240).await;
        page.wait_for("window.genos && window.genos.framesDecoded", 30, "first frames", |v| {
            v.as_u64().unwrap_or(0) >= 5
        })
        .await;
        let first = page.eval("window.genos.sessionId").await;
        let shift = |kind: &str| json!({"type": kind, "code": "ShiftLeft", "key": "Shift"});
        page.call("Input.dispatchKeyEvent", shift("rawKeyDown")).await;

        // Act: the connection drops; the page reconnects by itself.
        page.eval("window.genos.dropConnection()").await;
        let resumed = page
            .wait_for(
                "window.genos.state === 'open' && window.genos.reconnects > 0 && window.genos.resumed",
                30,
                "the session resumed",
                |v| v == &json!(true),
            )
            .await;
        let decoded = page.eval("window.genos.framesDecoded").await.as_u64().unwrap();
        page.wait_for("window.genos.framesDecoded", 30, "frames after the resume", |v| {
            v.as_u64().unwrap_or(0) >= decoded + 10
        })
        .await;
        page.call("Input.dispatchKeyEvent", shift("keyUp")).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while hx.input.events().len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Assert: the same session, the key held across the drop and released once.
        assert_eq!(resumed, json!(true));
        assert_eq!(page.eval("window.genos.sessionId").await, first);
        assert_eq!(page.eval("window.genos.transport").await, json!(transport));
        let k = |pressed| InputEvent::Key { code: 42, pressed };
        assert_eq!(hx.input.events(), vec![k(true), k(false)]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_webtransport_connection_resumes_its_session() {
    if browser_available() {
        a_dropped_connection_resumes_its_session("webtransport").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_resumes_its_session() {
    if browser_available() {
        a_dropped_connection_resumes_its_session("websocket").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_overlay_shows_frame_rate_bitrate_decode_time_and_latency() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!("{}&stats=1", hx.link(&hx.token(Rights::VIEW)));
        let page = browser.open(&link, 320, 240).await;
        // Two full seconds after the first Pong.
        let stats = page
            .wait_for(
                "window.genos && window.genos.stats",
                30,
                "stats with a latency",
                |v| v["latencyMs"].is_number() && v["fps"].as_u64().unwrap_or(0) > 0,
            )
            .await;
        let overlay = page
            .eval("(e => e.hidden ? null : e.textContent)(document.getElementById('stats'))")
            .await;

        assert!(stats["bitrateKbps"].as_u64().unwrap() > 0, "{stats}");
        let decode = stats["decodeMs"].as_f64().unwrap();
        let latency = stats["latencyMs"].as_f64().unwrap();
        // Loopback on one machine: both clocks are the same one, latency is what the encoder,
        // the transport and the decoder add (well under a second, never negative by much).
        assert!((0.0..1000.0).contains(&decode), "{stats}");
        assert!((-5.0..1000.0).contains(&latency), "{stats}");
        let overlay = overlay.as_str().unwrap_or_default();
        assert!(
            overlay.contains(" fps · ")
                && overlay.contains("kbit/s")
                && overlay.contains("latency"),
            "{overlay}"
        );
        eprintln!("stats: {stats}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reports_its_decoded_frames_and_latency_to_the_hosts_viewer_metrics() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        for transport in ["webtransport", "websocket"] {
            let link = format!("{}&transport={transport}", hx.link(&hx.token(Rights::VIEW)));
            let page = browser.open(&link, 320, 240).await;
            page.wait_for(
                "window.genos && window.genos.framesDecoded",
                30,
                "frames",
                |v| v.as_u64().unwrap_or(0) >= 30,
            )
            .await;
            // Act: a few seconds of frames (a report every 2 s while the page decodes).
            let deadline = Instant::now() + Duration::from_secs(15);
            let viewers = loop {
                let v = hx.server.viewer_stats(&hx.env.name);
                let reported = v.iter().any(|s| {
                    s.client
                        .is_some_and(|c| c.frames_decoded > 30 && c.latency_us_p50 > 0)
                });
                if reported || Instant::now() > deadline {
                    break v;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let decoded = page.eval("window.genos.framesDecoded").await;
            let sent = page.eval("window.genos.reportsSent").await;

            // Assert: one viewer, a web one, whose report is the page's.
            assert_eq!(viewers.len(), 1, "{transport}: {viewers:?}");
            let viewer = &viewers[0];
            assert_eq!(viewer.transport, "web", "{transport}");
            let report = viewer.client.unwrap_or_else(|| {
                panic!("{transport}: no report in 15 s ({sent} sent): {viewer:?}")
            });
            assert!(report.frames_decoded > 30, "{transport}: {report:?}");
            assert!(
                report.frames_decoded <= decoded.as_u64().unwrap(),
                "{transport}: reported {report:?}, the page decoded {decoded}"
            );
            // Loopback, one clock: latency is what encoding, the transport and decoding add.
            assert!(
                (1..1_000_000).contains(&report.latency_us_p50),
                "{transport}: {report:?}"
            );
            assert!(report.decode_us_p50 < 1_000_000, "{transport}: {report:?}");
            eprintln!("{transport}: {report:?}, {sent} reports sent");
            page.close().await;
            // The page's viewer leaves with it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !hx.server.viewer_stats(&hx.env.name).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                hx.server.viewer_stats(&hx.env.name).is_empty(),
                "{transport}: the viewer left"
            );
        }
    })
    .await;
}

/// Taps the centre of the element `selector` with one finger.
async fn tap(page: &Page<'_>, selector: &str) {
    let at = page
        .eval(&format!(
            "(r => [r.x + r.width / 2, r.y + r.height / 2])(document.querySelector({selector:?}).getBoundingClientRect())"
        ))
        .await;
    let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
    for (kind, points) in [
        ("touchStart", json!([{"x": x, "y": y, "id": 0}])),
        ("touchEnd", json!([])),
    ] {
        page.call(
            "Input.dispatchTouchEvent",
            json!({"type": kind, "touchPoints": points}),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_phone_the_overlay_shows_and_its_ctrl_and_keyboard_reach_the_guest() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let phone = json!({"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": true});
        let page = browser
            .open_with(
                &hx.link(&hx.token(Rights::VIEW | Rights::INPUT)),
                phone,
                true,
            )
            .await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            30,
            "frames",
            |v| v.as_u64().unwrap_or(0) >= 10,
        )
        .await;
        let shown = page
            .eval("!document.getElementById('overlay').hidden")
            .await;

        // Act: tap the sticky Ctrl, type c; then the keyboard button and text from the
        // on-screen keyboard.
        tap(&page, "[data-mod=ControlLeft]").await;
        let latched = page
            .eval("document.querySelector('[data-mod=ControlLeft]').classList.contains('latched')")
            .await;
        page.key("KeyC", "c").await;
        tap(&page, "[data-action=keyboard]").await;
        let focused = page.eval("document.activeElement.id").await;
        page.call("Input.insertText", json!({"text": "Hi"})).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let keys = loop {
            let keys: Vec<_> = hx
                .input
                .events()
                .into_iter()
                .filter(|e| matches!(e, InputEvent::Key { .. }))
                .collect();
            if keys.len() >= 10 || Instant::now() > deadline {
                break keys;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        // Assert.
        assert_eq!(shown, json!(true), "the overlay shows on a touch device");
        assert_eq!(latched, json!(true), "Ctrl is latched after a tap");
        assert_eq!(
            focused,
            json!("osk"),
            "the keyboard button focuses the text field"
        );
        let k = |code, pressed| InputEvent::Key { code, pressed };
        assert_eq!(
            keys,
            vec![
                k(29, true),
                k(46, true),
                k(46, false),
                k(29, false),
                k(42, true),
                k(35, true),
                k(35, false),
                k(42, false),
                k(23, true),
                k(23, false),
            ],
            "Ctrl+C from the overlay, then H (shifted) and i from the on-screen keyboard"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_holds_a_screen_wake_lock() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        browser
            .cdp
            .call(
                None,
                "Browser.grantPermissions",
                json!({"origin": format!("https://{}", hx.web.local_addr()), "permissions": ["wakeLockScreen"]}),
            )
            .await;
        let page = browser
            .open(&hx.link(&hx.token(Rights::VIEW)), 320, 240)
            .await;
        page.call("Emulation.setFocusEmulationEnabled", json!({"enabled": true}))
            .await;
        let lock = page
            .wait_for("window.genos && window.genos.wakeLock", 30, "a wake lock answer", |v| {
                v.is_string()
            })
            .await;
        assert_eq!(lock, json!("held"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_without_webtransport_falls_back_to_the_websocket() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser.open("about:blank", 320, 240).await;
        // As in a browser that has no WebTransport (older Safari).
        page.call("Page.enable", json!({})).await;
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "Object.defineProperty(window, \"WebTransport\", {value: undefined, configurable: true, writable: true});"}),
        )
        .await;
        page.call(
            "Page.navigate",
            json!({"url": hx.link(&hx.token(Rights::VIEW))}),
        )
        .await;
        page.wait_for(
            "window.genos && window.genos.framesDecoded",
            30,
            "frames",
            |v| v.as_u64().unwrap_or(0) >= 30,
        )
        .await;
        assert_eq!(page.eval("typeof WebTransport").await, json!("undefined"));
        assert_eq!(
            page.eval("window.genos.transport").await,
            json!("websocket")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_trackpad_mode_taps_click_and_two_fingers_scroll_or_right_click() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!(
            "{}&trackpad=1",
            hx.link(&hx.token(Rights::VIEW | Rights::INPUT))
        );
        let metrics = json!({"width": 320, "height": 240, "deviceScaleFactor": 1, "mobile": true});
        let page = browser.open_with(&link, metrics, true).await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        let touches = |kind: &str, points: &[(u32, u32)]| {
            let pts: Vec<_> = points
                .iter()
                .enumerate()
                .map(|(i, (x, y))| json!({"x": x, "y": y, "id": i}))
                .collect();
            json!({"type": kind, "touchPoints": pts})
        };

        // Act (above the overlay bar at the bottom): a one-finger tap; a two-finger drag
        // upwards; a two-finger tap; a one-finger drag.
        for step in [
            touches("touchStart", &[(100, 60)]),
            touches("touchEnd", &[]),
            touches("touchStart", &[(100, 80), (140, 80)]),
            touches("touchMove", &[(100, 60), (140, 60)]),
            touches("touchMove", &[(100, 40), (140, 40)]),
            touches("touchEnd", &[]),
            touches("touchStart", &[(100, 60), (140, 60)]),
            touches("touchEnd", &[]),
            touches("touchStart", &[(50, 50)]),
            touches("touchMove", &[(65, 60)]),
            touches("touchMove", &[(80, 70)]),
            touches("touchEnd", &[]),
        ] {
            page.call("Input.dispatchTouchEvent", step).await;
        }
        // Chromium makes no click of a tap that comes right after a pinch ended.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let events = hx.input.events();

        // Assert: left click, scrolling down (content follows the fingers up), right click,
        // then the pointer moved; no touchscreen contacts.
        let buttons_and_wheels: Vec<_> = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    InputEvent::PointerButton { .. } | InputEvent::Wheel { .. }
                )
            })
            .cloned()
            .collect();
        let b = |button, pressed| InputEvent::PointerButton { button, pressed };
        assert_eq!(
            buttons_and_wheels[..2],
            [b(Button::Left, true), b(Button::Left, false)]
        );
        let n = buttons_and_wheels.len();
        assert_eq!(
            buttons_and_wheels[n - 2..],
            [b(Button::Right, true), b(Button::Right, false)],
            "{events:?}"
        );
        let wheels = &buttons_and_wheels[2..n - 2];
        assert!(!wheels.is_empty(), "{events:?}");
        let down: i32 = wheels
            .iter()
            .map(|w| match w {
                InputEvent::Wheel { dx, dy } => {
                    assert_eq!(*dx, 0);
                    i32::from(*dy)
                }
                other => panic!("not a wheel between the clicks: {other:?}"),
            })
            .sum();
        assert_eq!(
            down, 48,
            "40 CSS px up = 4/10 of a notch down per 10 px: {wheels:?}"
        );
        let last_move = events
            .iter()
            .rev()
            .find(|e| matches!(e, InputEvent::PointerMove { .. }))
            .cloned();
        assert!(
            matches!(events.last(), Some(InputEvent::PointerMove { .. })),
            "the drag moves the pointer last: {events:?}"
        );
        assert!(last_move.is_some());
        assert!(!events.iter().any(|e| matches!(e, InputEvent::Touch { .. })));
    })
    .await;
}

/// A phone: 390 x 844 CSS pixels at device pixel ratio 3, with touch.
fn phone() -> Value {
    json!({"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": true})
}

/// Waits (at most 10 s) until `done` accepts what the source received, and returns it.
async fn input_until(
    input: &RecordingInput,
    done: impl Fn(&[InputEvent]) -> bool,
) -> Vec<InputEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = input.events();
        if done(&events) || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn keys_of(events: &[InputEvent]) -> Vec<InputEvent> {
    events
        .iter()
        .filter(|e| matches!(e, InputEvent::Key { .. }))
        .cloned()
        .collect()
}

fn key(code: u16, pressed: bool) -> InputEvent {
    InputEvent::Key { code, pressed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_f_keys_and_ctrl_alt_del_reach_the_guest() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let page = browser
            .open_with(
                &hx.link(&hx.token(Rights::VIEW | Rights::INPUT)),
                phone(),
                true,
            )
            .await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        let hidden_before = page.eval("document.getElementById('fkeys').hidden").await;

        // Act: open the F-key row, tap F5; latch Alt and tap F4; tap Ctrl+Alt+Del.
        tap(&page, "[data-action=fkeys]").await;
        let hidden_after = page.eval("document.getElementById('fkeys').hidden").await;
        tap(&page, "[data-key=F5]").await;
        tap(&page, "[data-mod=AltLeft]").await;
        tap(&page, "[data-key=F4]").await;
        tap(&page, "[data-action=cad]").await;
        let events = input_until(&hx.input, |e| keys_of(e).len() >= 12).await;

        // Assert: the row appears on demand; the keys arrive as evdev F5, Alt+F4 and
        // Ctrl+Alt+Del pressed together and released in reverse order.
        assert_eq!((hidden_before, hidden_after), (json!(true), json!(false)));
        let (alt, ctrl, del, f4, f5) = (56, 29, 111, 62, 63);
        assert_eq!(
            keys_of(&events),
            vec![
                key(f5, true),
                key(f5, false),
                key(alt, true),
                key(f4, true),
                key(f4, false),
                key(alt, false),
                key(ctrl, true),
                key(alt, true),
                key(del, true),
                key(del, false),
                key(alt, false),
                key(ctrl, false),
            ]
        );
    })
    .await;
}

/// A synthetic scene whose pointer is wherever the test puts it (with the scene's arrow).
struct PointerAt {
    scene: SyntheticSource,
    at: Arc<Mutex<(i32, i32)>>,
    reported: Option<(i32, i32)>,
}

impl encoder::FrameSource for PointerAt {
    fn size(&self) -> (u32, u32) {
        encoder::FrameSource::size(&self.scene)
    }
    fn next_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<encoder::SourceFrame<'_>>, encoder::SourceError> {
        encoder::FrameSource::next_frame(&mut self.scene, deadline)
    }
    fn cursor_update(&mut self) -> Option<encoder::CursorUpdate> {
        let image = encoder::FrameSource::cursor_update(&mut self.scene).and_then(|u| u.image);
        let at = *self.at.lock().unwrap();
        if self.reported == Some(at) && image.is_none() {
            return None;
        }
        self.reported = Some(at);
        Some(encoder::CursorUpdate {
            x: at.0,
            y: at.1,
            visible: true,
            image,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_moves_to_the_other_edge_when_the_guest_pointer_is_under_it() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        // A portrait environment filling the phone's width: 240 x 480 drawn at 1.625 CSS px
        // per pixel, from y = 32 to 812 of the 844 CSS px.
        let at = Arc::new(Mutex::new((120, 100)));
        let env = EnvRef::new("portrait", 9);
        let src = hostd::stream::EnvironmentSource {
            frames: Box::new(PointerAt {
                scene: SyntheticSource::new(Scene::Still, 240, 480, 10.0),
                at: at.clone(),
                reported: None,
            }),
            input: Arc::new(RecordingInput::default()),
        };
        hx.server.add_environment(&env, src, 10.0).unwrap();
        let token = hx.tokens.issue(&env, Rights::VIEW | Rights::INPUT, HOUR).unwrap();
        let addr = hx.web.local_addr();
        let link = web::web_url(&addr.ip().to_string(), addr.port(), &env.name, &token);
        let browser = Browser::start(&hx.spki).await;
        let page = browser.open_with(&link, phone(), true).await;
        let bar = "(r => [r.top, r.bottom])(document.getElementById('overlay').getBoundingClientRect())";
        let edge_at = |y: i32| {
            format!("window.genos && window.genos.cursor && window.genos.cursor.y === {y} && window.genos.overlayEdge")
        };
        let first = page
            .wait_for(&edge_at(100), 30, "the pointer at y 100", |v| v.is_string())
            .await;
        let bottom_bar = page.eval(bar).await;

        // Act: the guest's pointer goes down under the bar, then up to where the bar went.
        *at.lock().unwrap() = (120, 470);
        let low = page
            .wait_for(&edge_at(470), 10, "the pointer at y 470", |v| v.is_string())
            .await;
        let top_bar = page.eval(bar).await;
        *at.lock().unwrap() = (120, 20);
        let high = page
            .wait_for(&edge_at(20), 10, "the pointer at y 20", |v| v.is_string())
            .await;
        let back_bar = page.eval(bar).await;

        // Assert: bottom while the pointer is above it; at the top while the pointer is at
        // y 32 + 470 * 1.625 = 795.75 CSS px, clear of it; back at the bottom for y 64.5.
        assert_eq!((first, low, high), (json!("bottom"), json!("top"), json!("bottom")));
        let f = |v: &Value, i: usize| v[i].as_f64().unwrap();
        assert!(f(&bottom_bar, 1) > 843.0 && f(&bottom_bar, 0) > 194.5, "{bottom_bar}");
        assert!(f(&top_bar, 0) < 1.0 && f(&top_bar, 1) < 795.0, "{top_bar}");
        assert_eq!(back_bar, bottom_bar);

        // Act: a viewport so low (160 CSS px) that the bar covers its middle at either edge, the pointer
        // there; then the handle tapped.
        let landscape = json!({"width": 390, "height": 160, "deviceScaleFactor": 3, "mobile": true});
        page.call("Emulation.setDeviceMetricsOverride", landscape).await;
        *at.lock().unwrap() = (120, 240);
        let middle = page
            .wait_for(&edge_at(240), 10, "the pointer at y 240", |v| v.is_string())
            .await;
        let handle = page
            .eval("(r => [r.left, r.top, r.right, r.bottom])(document.querySelector('[data-action=expand]').getBoundingClientRect())")
            .await;
        let pointer = page
            .eval("(r => [r.left + r.width / 2, r.top + r.height / 2])(document.getElementById('screen').getBoundingClientRect())")
            .await;
        tap(&page, "[data-action=expand]").await;
        let expanded = page.eval("window.genos.overlayEdge").await;

        // Assert: collapsed to a handle that is clear of the pointer (at the picture's
        // centre: stream (120, 240) of 240 x 480); the bar shows again when asked.
        assert_eq!(middle, json!("collapsed"));
        let (px, py) = (f(&pointer, 0), f(&pointer, 1));
        let clear = px < f(&handle, 0) - 1.0 || px > f(&handle, 2) || py + 20.0 < f(&handle, 1);
        assert!(clear, "handle {handle} vs pointer at ({px}, {py})");
        assert_eq!(expanded, json!("bottom"));
    })
    .await;
}

/// What an environment received, keys and clipboard texts in one order.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Input(InputEvent),
    Clipboard(String),
}

/// An environment input that records events and clipboard texts in the order they came.
#[derive(Default)]
struct Arrivals(Mutex<Vec<Got>>);

impl hostd::stream::InputSink for Arrivals {
    fn inject(&self, events: &[InputEvent]) -> Result<(), hostd::stream::source::InputError> {
        let mut got = self.0.lock().unwrap();
        got.extend(events.iter().cloned().map(Got::Input));
        Ok(())
    }
    fn set_clipboard(&self, text: &str) -> Result<(), hostd::stream::source::InputError> {
        self.0.lock().unwrap().push(Got::Clipboard(text.to_owned()));
        Ok(())
    }
}

impl Arrivals {
    /// Waits (at most 10 s) for `n` arrivals, and returns what came.
    async fn at_least(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.0.lock().unwrap().clone();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Host {
    /// A second environment of this server, 320 x 240, whose input is `input`; its link.
    fn add_env(
        &self,
        name: &str,
        input: Arc<dyn hostd::stream::InputSink>,
        rights: Rights,
    ) -> String {
        let env = EnvRef::new(name, 10);
        let src = hostd::stream::EnvironmentSource {
            frames: Box::new(SyntheticSource::new(Scene::Still, 320, 240, 10.0)),
            input,
        };
        self.server.add_environment(&env, src, 10.0).unwrap();
        let token = self.tokens.issue(&env, rights, HOUR).unwrap();
        let addr = self.web.local_addr();
        web::web_url(&addr.ip().to_string(), addr.port(), &env.name, &token)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ime_text_arrives_as_keys_and_characters_without_keys_through_the_clipboard() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let got = Arc::new(Arrivals::default());
        let link = hx.add_env(
            "ime",
            got.clone(),
            Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD,
        );
        let browser = Browser::start(&hx.spki).await;
        let page = browser.open_with(&link, phone(), true).await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        tap(&page, "[data-action=keyboard]").await;
        let focused = page.eval("document.activeElement.id").await;

        // Act: an IME composes "café" step by step and commits it; then "にほん" becomes
        // "日本" and is committed; then "ü!" is inserted without a composition.
        let compose = |text: &str| {
            let n = text.chars().count();
            json!({"text": text, "selectionStart": n, "selectionEnd": n})
        };
        for step in ["c", "ca", "caf", "café"] {
            page.call("Input.imeSetComposition", compose(step)).await;
        }
        let mid_composition = got.0.lock().unwrap().len();
        page.call("Input.insertText", json!({"text": "café"})).await;
        for step in ["に", "にほ", "にほん", "日本"] {
            page.call("Input.imeSetComposition", compose(step)).await;
        }
        page.call("Input.insertText", json!({"text": "日本"})).await;
        page.call("Input.insertText", json!({"text": "ü!"})).await;
        let arrived = got.at_least(25).await;

        // Assert: nothing while composing; keys for c, a, f; é, 日本 and ü each put on the
        // environment's clipboard and pasted with Ctrl+V; ! as Shift+1.
        assert_eq!(focused, json!("osk"));
        assert_eq!(mid_composition, 0, "nothing is sent while composing");
        let tap_key = |code| [Got::Input(key(code, true)), Got::Input(key(code, false))];
        let paste = |text: &str| {
            vec![
                Got::Clipboard(text.into()),
                Got::Input(key(29, true)),
                Got::Input(key(47, true)),
                Got::Input(key(47, false)),
                Got::Input(key(29, false)),
            ]
        };
        let mut want = Vec::new();
        for code in [46, 30, 33] {
            want.extend(tap_key(code));
        }
        want.extend(paste("é"));
        want.extend(paste("日本"));
        want.extend(paste("ü"));
        want.push(Got::Input(key(42, true)));
        want.extend(tap_key(2));
        want.push(Got::Input(key(42, false)));
        assert_eq!(arrived, want);
        assert_eq!(page.eval("window.genos.textPasted").await, json!(3));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_clipboard_is_denied_the_paste_box_sends_the_text_and_shows_the_environments() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let got = Arc::new(Arrivals::default());
        let rights = Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD;
        let link = hx.add_env("paste", got.clone(), rights);
        let browser = Browser::start(&hx.spki).await;
        let origin = format!("https://{}", hx.web.local_addr());
        for name in ["clipboard-read", "clipboard-write"] {
            browser
                .cdp
                .call(
                    None,
                    "Browser.setPermission",
                    json!({"origin": origin, "permission": {"name": name}, "setting": "denied"}),
                )
                .await;
        }
        let page = browser.open_with(&link, phone(), true).await;
        page.call(
            "Emulation.setFocusEmulationEnabled",
            json!({"enabled": true}),
        )
        .await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        hx.server
            .set_environment_clipboard("paste", "from the guest");
        page.wait_for("window.genos.clipboard", 10, "the guest's clipboard", |v| {
            v == "from the guest"
        })
        .await;

        // Act: tap Paste; type into the box that opens (text inserted, then one key); tap
        // "Send and paste".
        tap(&page, "[data-action=paste]").await;
        let why = page
            .wait_for("window.genos.pasteBox", 10, "the paste box", |v| {
                v.is_string()
            })
            .await;
        let shown = page.eval("!document.getElementById('paste').hidden").await;
        let focused = page.eval("document.activeElement.id").await;
        let from_guest = page
            .eval("document.getElementById('paste-from').value")
            .await;
        page.call("Input.insertText", json!({"text": "from the phon"}))
            .await;
        for kind in ["keyDown", "keyUp"] {
            page.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "code": "KeyE", "key": "e", "text": "e"}),
            )
            .await;
        }
        tap(&page, "[data-paste=paste]").await;
        let arrived = got.at_least(5).await;
        let closed = page.eval("document.getElementById('paste').hidden").await;

        // Assert: the box opened because reading was refused, shows the environment's text
        // (the browser refused it too), and sent what was typed in it, then Ctrl+V; the key
        // typed into the box did not reach the guest.
        assert_eq!((shown, focused), (json!(true), json!("paste-text")));
        assert!(
            why.as_str().unwrap().to_lowercase().contains("denied"),
            "{why}"
        );
        assert_eq!(from_guest, json!("from the guest"));
        assert_eq!(
            arrived,
            vec![
                Got::Clipboard("from the phone".into()),
                Got::Input(key(29, true)),
                Got::Input(key(47, true)),
                Got::Input(key(47, false)),
                Got::Input(key(29, false)),
            ]
        );
        assert_eq!(closed, json!(true));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_clipboard_is_permitted_the_paste_button_pastes_it_without_a_box() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let got = Arc::new(Arrivals::default());
        let rights = Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD;
        let link = hx.add_env("paste", got.clone(), rights);
        let browser = Browser::start(&hx.spki).await;
        browser
            .cdp
            .call(
                None,
                "Browser.grantPermissions",
                json!({"origin": format!("https://{}", hx.web.local_addr()), "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}),
            )
            .await;
        let page = browser.open_with(&link, phone(), true).await;
        page.call("Emulation.setFocusEmulationEnabled", json!({"enabled": true}))
            .await;
        page.wait_for("window.genos && window.genos.state", 30, "session open", |v| v == "open")
            .await;
        page.eval_promise("navigator.clipboard.writeText('from the browser')")
            .await
            .unwrap();

        // Act: tap Paste.
        tap(&page, "[data-action=paste]").await;
        let arrived = got.at_least(5).await;

        // Assert: the browser's clipboard went to the environment and Ctrl+V after it; no
        // box.
        let texts: Vec<_> = arrived
            .iter()
            .filter(|g| matches!(g, Got::Clipboard(_)))
            .collect();
        assert_eq!(
            texts.last(),
            Some(&&Got::Clipboard("from the browser".into()))
        );
        let n = arrived.len();
        assert_eq!(
            arrived[n - 4..],
            [
                Got::Input(key(29, true)),
                Got::Input(key(47, true)),
                Got::Input(key(47, false)),
                Got::Input(key(29, false)),
            ]
        );
        assert_eq!(page.eval("window.genos.pasteBox").await, Value::Null);
        assert_eq!(
            page.eval("document.getElementById('paste').hidden").await,
            json!(true)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_trackpad_pinch_a_tap_reaches_the_guest_pixel_under_the_finger() {
    use proto::stream::TouchPhase;
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!(
            "{}&trackpad=1",
            hx.link(&hx.token(Rights::VIEW | Rights::INPUT))
        );
        let page = browser.open_with(&link, phone(), true).await;
        page.wait_for(
            "window.genos && window.genos.state",
            30,
            "session open",
            |v| v == "open",
        )
        .await;
        let touches = |kind: &str, points: &[(f64, f64)]| {
            let pts: Vec<_> = points
                .iter()
                .enumerate()
                .map(|(i, (x, y))| json!({"x": x, "y": y, "id": i}))
                .collect();
            json!({"type": kind, "touchPoints": pts})
        };

        // Act: two fingers 40 CSS px apart around (195, 420) spread to 120 px apart (a pinch
        // to 3x); then, in direct touch mode, one finger taps at (255, 450).
        for step in [
            touches("touchStart", &[(175.0, 420.0), (215.0, 420.0)]),
            touches("touchMove", &[(155.0, 420.0), (235.0, 420.0)]),
            touches("touchMove", &[(135.0, 420.0), (255.0, 420.0)]),
            touches("touchEnd", &[]),
        ] {
            page.call("Input.dispatchTouchEvent", step).await;
        }
        let zoom = page.eval("window.genos.zoom").await;
        let transform = page
            .eval("document.getElementById('screen').style.transform")
            .await;
        // Chromium makes no click of a tap that comes right after a pinch ended.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tap(&page, "[data-action=trackpad]").await;
        let trackpad = page.eval("window.genos.trackpad").await;
        for step in [
            touches("touchStart", &[(255.0, 450.0)]),
            touches("touchEnd", &[]),
        ] {
            page.call("Input.dispatchTouchEvent", step).await;
        }
        let events = input_until(&hx.input, |e| {
            e.iter().any(|e| {
                matches!(
                    e,
                    InputEvent::Touch {
                        phase: TouchPhase::End,
                        ..
                    }
                )
            })
        })
        .await;

        // Assert: the view is zoomed 3x about the fingers' midpoint; no wheel, click or
        // contact came from the pinch. The tap's picture point is ((255 + 390) / 3,
        // (450 + 840) / 3) = (215, 430) CSS px of the unzoomed page, where the 320 x 240
        // picture is 390 x 292.6 CSS px from y 275.67: stream pixel (176, 127) (without the
        // zoom it would be (209, 143)).
        assert_eq!(
            zoom,
            json!({"scale": 3, "x": -390, "y": -840}),
            "{transform}"
        );
        assert_eq!(trackpad, json!(false));
        let (dpr, canvas_w, canvas_h) = (3.0, 390.0 * 3.0, 844.0 * 3.0);
        let scale = f64::min(canvas_w / 320.0, canvas_h / 240.0);
        let (rw, rh) = ((320.0 * scale).round(), (240.0 * scale).round());
        let (rx, ry) = (
            ((canvas_w - rw) / 2.0).floor(),
            ((canvas_h - rh) / 2.0).floor(),
        );
        let want_x = (((215.0 * dpr) - rx) * 320.0 / rw).round() as u16;
        let want_y = (((430.0 * dpr) - ry) * 240.0 / rh).round() as u16;
        assert_eq!((want_x, want_y), (176, 127));
        let touch = |phase| InputEvent::Touch {
            id: 0,
            phase,
            x: want_x,
            y: want_y,
        };
        assert_eq!(
            events,
            vec![touch(TouchPhase::Start), touch(TouchPhase::End)]
        );
    })
    .await;
}

impl Browser {
    /// Opens `url` in a new page (these metrics, touch if `touch`) that runs `script` before
    /// any of its own.
    async fn open_patched(&self, url: &str, metrics: Value, touch: bool, script: &str) -> Page<'_> {
        let page = self.open_with("about:blank", metrics, touch).await;
        page.call("Page.enable", json!({})).await;
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": script }),
        )
        .await;
        page.call("Page.navigate", json!({ "url": url })).await;
        page
    }
}

fn small() -> Value {
    json!({"width": 320, "height": 240, "deviceScaleFactor": 1, "mobile": false})
}

/// The page is told a WebTransport certificate hash that is not the host's (the browser then
/// refuses the host's real certificate in the handshake).
const WRONG_HASH: &str = r#"
const realFetch = window.fetch.bind(window);
window.fetch = (url, opts) => String(url).endsWith("/webtransport")
  ? realFetch(url, opts).then((r) => r.json()).then((j) => new Response(JSON.stringify({ ...j, sha256: "ab".repeat(32) })))
  : realFetch(url, opts);
"#;

/// The page's WebSocket asks for a path the host refuses (404), so it never opens.
const NO_WEBSOCKET: &str = r#"
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket { constructor(url) { super(url + "-refused"); } };
"#;

/// The error page's title and the page's error name, once it shows.
async fn shown_error(page: &Page<'_>) -> (String, String) {
    let err = page
        .wait_for(
            "window.genos && window.genos.error",
            30,
            "error page",
            |v| v.is_object(),
        )
        .await;
    let title = page
        .eval("document.getElementById('error').hidden ? '' : document.getElementById('error-title').textContent")
        .await;
    (
        title.as_str().unwrap_or_default().to_owned(),
        err["name"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_webtransport_certificate_without_a_websocket_shows_the_certificate_page() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = hx.link(&hx.token(Rights::VIEW));

        // Act: a wrong hash and a WebSocket that cannot open; a wrong hash with WebTransport
        // forced; a wrong hash alone.
        let both = format!("{WRONG_HASH}{NO_WEBSOCKET}");
        let no_fallback = browser.open_patched(&link, small(), false, &both).await;
        let refused = shown_error(&no_fallback).await;
        let forced_link = format!("{link}&transport=webtransport");
        let forced = browser
            .open_patched(&forced_link, small(), false, WRONG_HASH)
            .await;
        let refused_forced = shown_error(&forced).await;
        let fallback = browser
            .open_patched(&link, small(), false, WRONG_HASH)
            .await;
        fallback
            .wait_for(
                "window.genos && window.genos.framesDecoded",
                30,
                "frames",
                |v| v.as_u64().unwrap_or(0) >= 1,
            )
            .await;

        // Assert: the certificate page where nothing else connects; the WebSocket where it
        // can.
        let page = (
            "The host's certificate did not match".to_owned(),
            "CertificateMismatch".to_owned(),
        );
        assert_eq!(refused, page);
        assert_eq!(refused_forced, page);
        let detail = no_fallback
            .eval("document.getElementById('error-detail').textContent")
            .await;
        assert!(
            detail.as_str().unwrap().contains("WebSocket closed"),
            "{detail}"
        );
        eprintln!("certificate page: {detail}");
        assert_eq!(
            fallback.eval("window.genos.transport").await,
            json!("websocket")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_without_webcodecs_shows_its_page_and_does_not_connect() {
    if !browser_available() {
        return;
    }
    within(120, async {
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = hx.link(&hx.token(Rights::VIEW));

        // Act: a browser that has no VideoDecoder opens the link.
        let page = browser
            .open_patched(&link, small(), false, "delete window.VideoDecoder;")
            .await;
        let shown = shown_error(&page).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Assert.
        assert_eq!(
            shown,
            (
                "This browser cannot decode video".to_owned(),
                "NoWebCodecs".to_owned()
            )
        );
        assert_eq!(page.eval("typeof VideoDecoder").await, json!("undefined"));
        assert_eq!(page.eval("window.genos.transport").await, Value::Null);
        assert_eq!(page.eval("window.genos.state").await, json!("error"));
    })
    .await;
}

async fn a_reload_resumes_the_session(transport: &str) {
    within(120, async {
        let hx = host(Scene::Windows, 320, 240, 30.0).await;
        let browser = Browser::start(&hx.spki).await;
        let link = format!(
            "{}&transport={transport}",
            hx.link(&hx.token(Rights::VIEW | Rights::INPUT))
        );
        let page = browser.open(&link, 320, 240).await;
        page.wait_for("window.genos && window.genos.framesDecoded", 30, "first frames", |v| {
            v.as_u64().unwrap_or(0) >= 5
        })
        .await;
        let first = page.eval("window.genos.sessionId").await;
        let shift = json!({"type": "rawKeyDown", "code": "ShiftLeft", "key": "Shift"});
        page.call("Input.dispatchKeyEvent", shift).await;
        input_until(&hx.input, |e| !e.is_empty()).await;

        // Act: reload the page.
        page.call("Page.reload", json!({})).await;
        let resumed = page
            .wait_for(
                "window.genos && window.genos.state === 'open' && window.genos.framesDecoded >= 10 && window.genos.resumed",
                30,
                "frames after the reload",
                |v| v == &json!(true),
            )
            .await;
        let events = input_until(&hx.input, |e| e.len() >= 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Assert: the same session, over the same transport, frames decoded again; Shift,
        // held when the page went away, released once by the reloaded page.
        assert_eq!(resumed, json!(true));
        assert_eq!(page.eval("window.genos.sessionId").await, first);
        assert_eq!(page.eval("window.genos.transport").await, json!(transport));
        assert_eq!(page.eval("location.hash.includes('token=')").await, json!(true));
        assert_eq!(events, vec![key(42, true), key(42, false)]);
        assert_eq!(hx.input.events(), events);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resumes_the_session_over_webtransport() {
    if browser_available() {
        a_reload_resumes_the_session("webtransport").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resumes_the_session_over_the_websocket() {
    if browser_available() {
        a_reload_resumes_the_session("websocket").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_sized_page_with_the_overlay_open_is_saved_as_a_screenshot() {
    if !browser_available() {
        return;
    }
    within(120, async {
        // A phone-shaped environment (the still desktop) on a 390 x 844 touch screen.
        let hx = host(Scene::Still, 320, 240, 10.0).await;
        let env = EnvRef::new("phone", 11);
        let (src, _input) = source::synthetic(Scene::Still, 390, 600, 10.0);
        hx.server.add_environment(&env, src, 10.0).unwrap();
        let token = hx
            .tokens
            .issue(&env, Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD, HOUR)
            .unwrap();
        let addr = hx.web.local_addr();
        let link = web::web_url(&addr.ip().to_string(), addr.port(), &env.name, &token);
        let browser = Browser::start(&hx.spki).await;
        let metrics = json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true});
        let page = browser.open_with(&link, metrics, true).await;
        page.wait_for("window.genos && window.genos.framesDecoded", 30, "a frame", |v| {
            v.as_u64().unwrap_or(0) >= 1
        })
        .await;

        // Act: open the F-key row, latch Ctrl, and take the screenshot.
        tap(&page, "[data-action=fkeys]").await;
        tap(&page, "[data-mod=ControlLeft]").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let open = page
            .eval("!document.getElementById('overlay').hidden && !document.getElementById('fkeys').hidden && window.genos.overlayEdge")
            .await;
        let shot = page
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(shot["data"].as_str().unwrap())
                .unwrap()
        };
        let artifact =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-client-phone.png");
        std::fs::write(&artifact, &png).unwrap();
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/images/web-client-phone.png");
        if std::env::var_os("GENOS_WRITE_DOCS_IMAGES").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(docs.parent().unwrap()).unwrap();
            std::fs::write(&docs, &png).unwrap();
            eprintln!("phone screenshot: {}", docs.display());
        }
        eprintln!("phone screenshot: {}", artifact.display());

        // Assert: a 390 x 844 PNG of the page with its overlay and F-key row open.
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        assert_eq!((be32(&png[16..20]), be32(&png[20..24])), (390, 844), "IHDR size");
        assert_eq!(open, json!("bottom"), "the overlay shows at the bottom");
    })
    .await;
}
