//! A private X server (Xvfb) for window and clipboard tests, genos-view running on it, and
//! the X clipboard as other applications see it (xclip). Every process started here is
//! killed when its guard is dropped, whatever way the test ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The first of `tools` not found on PATH.
pub fn missing_tool(tools: &[&'static str]) -> Option<&'static str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tools
        .iter()
        .copied()
        .find(|t| !std::env::split_paths(&path).any(|dir| dir.join(t).is_file()))
}

/// Makes `cmd`'s process get SIGKILL when the thread that started it ends: a test process
/// killed outright (a timeout) runs no destructors, and its X server must not outlive it.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Kills and reaps `child` (ignoring a child that already ended).
fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// An Xvfb server on a display it picked itself; killed on drop.
pub struct XServer {
    child: Child,
    /// `:N`, for DISPLAY.
    pub display: String,
}

impl XServer {
    pub fn start() -> XServer {
        let mut cmd = Command::new("Xvfb");
        cmd.args(["-displayfd", "1", "-nolisten", "tcp", "-screen", "0"])
            .arg("1920x1080x24");
        die_with_parent(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb starts");
        // Xvfb writes the display number once it accepts clients.
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // The guard exists before any wait, so a failure below still kills the server.
        let mut server = XServer {
            child,
            display: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("Xvfb reports its display within 15 s");
        let n: u32 = line.trim().parse().expect("Xvfb printed a display number");
        server.display = format!(":{n}");
        server
    }
}

impl Drop for XServer {
    fn drop(&mut self) {
        end(&mut self.child);
    }
}

/// genos-view in a window on an [`XServer`]; killed on drop. Its stderr goes to a file.
pub struct Viewer {
    child: Child,
    log: PathBuf,
}

impl Viewer {
    /// Runs genos-view on `display` for `url` with `args`, logging at debug into `dir`.
    pub fn start(display: &str, url: &str, args: &[&str], dir: &Path) -> Viewer {
        let log = dir.join("genos-view.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_genos-view"));
        die_with_parent(&mut cmd);
        let child = cmd
            .args(args)
            .arg(url)
            .env("DISPLAY", display)
            .env("RUST_LOG", "warn,client=debug,genos_view=debug")
            // One physical pixel per logical one, whatever Xvfb reports about its screen.
            .env("WINIT_X11_SCALE_FACTOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("genos-view starts");
        Viewer { child, log }
    }

    /// What genos-view logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        end(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- genos-view log ---\n{}", self.log());
        }
    }
}

/// Runs `cmd` to completion within `limit` (killed after it), with `input` on its stdin;
/// its stdout if it exited successfully (its stderr is the test's).
fn run(mut cmd: Command, input: Option<&[u8]>, limit: Duration) -> Option<Vec<u8>> {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .spawn()
        .expect("command starts");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(input).expect("stdin written");
    }
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                // A background child (xclip serving its selection) may hold stdout open.
                let out = rx
                    .recv_timeout(Duration::from_millis(200))
                    .unwrap_or_default();
                return status.success().then_some(out);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                end(&mut child);
                return None;
            }
        }
    }
}

/// Puts `text` on `display`'s CLIPBOARD as another application does (xclip keeps serving it
/// in the background until another client takes the selection or the X server ends).
pub fn set_clipboard(display: &str, text: &str) {
    let mut cmd = Command::new("xclip");
    cmd.args(["-selection", "clipboard", "-i"])
        .env("DISPLAY", display)
        // Its background half says "X connection broken" when the test's X server ends.
        .stderr(Stdio::null());
    run(cmd, Some(text.as_bytes()), Duration::from_secs(10)).expect("xclip -i succeeds");
}

/// The CLIPBOARD's text on `display` as another application reads it; `None` when xclip
/// cannot get it (no owner, no text, or no answer within 5 s).
pub fn clipboard_text(display: &str) -> Option<String> {
    let mut cmd = Command::new("xclip");
    cmd.args(["-selection", "clipboard", "-o"])
        .env("DISPLAY", display)
        // "There is no owner" while nobody holds it is an answer here, not noise.
        .stderr(Stdio::null());
    run(cmd, None, Duration::from_secs(5)).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Waits up to `secs` for `display`'s CLIPBOARD to read `expected`; the last text read.
pub fn wait_for_clipboard(display: &str, expected: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        last = clipboard_text(display);
        if last.as_deref() == Some(expected) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

/// The id of the first window whose name matches `pattern`, waiting up to 20 s for one.
/// xdotool's search walks the window tree and exits on the BadWindow error of a window
/// that went away under it (the toolkit's short-lived windows at start-up): it is asked
/// again until the deadline.
pub fn window_named(display: &str, pattern: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut cmd = Command::new("xdotool");
        cmd.args(["search", "--name", pattern])
            .env("DISPLAY", display);
        let found = run(cmd, None, Duration::from_secs(5))
            .map(|out| {
                String::from_utf8_lossy(&out)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no window named {pattern:?} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs xdotool with `args` on `display`; its stdout.
pub fn xdotool(display: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("xdotool");
    cmd.args(args).env("DISPLAY", display);
    let out = run(cmd, None, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("xdotool {args:?} failed"));
    String::from_utf8_lossy(&out).into_owned()
}
