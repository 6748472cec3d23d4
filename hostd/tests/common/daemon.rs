//! A `genos-hostd` process over a fresh state directory and the `genos` CLI pointed at its
//! admin socket (for hostd's own tests: the binaries are this package's). Suites that use it
//! declare `mod common;` too.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running genos-hostd, stopped with SIGTERM when dropped.
pub struct Hostd {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Hostd {
    /// Starts genos-hostd with the config text `config`; returns once its admin socket
    /// accepts connections.
    pub fn start(config: &str) -> Hostd {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("hostd.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_genos-hostd"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let h = Hostd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(h.socket()).is_err() {
            assert!(Instant::now() < deadline, "admin.sock did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    /// Starts genos-hostd whose environments boot the tiny guest that gets ready; None
    /// (skipped, saying why) where the test cannot run.
    pub fn with_tiny_guest() -> Option<Hostd> {
        let test = crate::common::test_name();
        let (_, config) = crate::common::tiny_guest_config(&test, "ready", 4)?;
        Some(Hostd::start(&config))
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.state().join("admin.sock")
    }

    /// Runs the `genos` CLI with `args` against this hostd.
    pub fn genos(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_genos"))
            .env("GENOS_SOCKET", self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// Polls `genos --json show name` until the environment is in state `want`; fails the
    /// test after `secs`, showing what it was.
    pub fn wait_state(&self, name: &str, want: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = json(&self.genos(&["--json", "show", name]));
            if v["env"]["state"] == want {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} never became {want}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the hostd we spawned; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into()
}

/// The command's standard output as JSON; fails the test, showing it, when it is not.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}
