//! `genos token` against a running `genos-hostd` with a tiny guest: minting prints the
//! token's id, `genos token revoke` revokes by token or id, and refuses what this host did
//! not sign.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Hostd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Hostd {
    fn start(test: &str) -> Option<Hostd> {
        if !common::kvm_available(test) {
            return None;
        }
        let vmm = common::vmm_bin(test)?;
        let kernel = common::build_guest("ready");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("hostd.toml");
        std::fs::write(&cfg, common::config_toml(&vmm, &kernel, 4, 4096)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_genos-hostd"))
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let h = Hostd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h.dir.path().join("state/admin.sock").exists() {
            assert!(Instant::now() < deadline, "admin.sock did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(h)
    }

    fn genos(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_genos"))
            .env("GENOS_SOCKET", self.dir.path().join("state/admin.sock"))
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the hostd we spawned; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&o.stdout)))
}

#[test]
fn genos_token_revoke_revokes_by_token_or_id_and_refuses_foreign_tokens() {
    let Some(h) =
        Hostd::start("genos_token_revoke_revokes_by_token_or_id_and_refuses_foreign_tokens")
    else {
        return;
    };
    let o = h.genos(&["create", "--text", "headless python, 1 core, 128 MB ram"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while json(&h.genos(&["--json", "show", "python"]))["env"]["state"] != "ready" {
        assert!(Instant::now() < deadline, "python never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }

    let minted = h.genos(&["token", "python"]);
    let first = json(&h.genos(&["--json", "token", "python"]));
    let second = json(&h.genos(&["--json", "token", "python"]));
    let (token, id) = (
        first["token"].as_str().unwrap(),
        second["token_id"].as_str().unwrap(),
    );
    let by_token = h.genos(&["token", "revoke", token]);
    let by_id = h.genos(&["token", "revoke", id]);
    let again = h.genos(&["token", "revoke", id]);
    let foreign = h.genos(&["token", "revoke", "AgAAAA.AAAA"]);
    let usage = h.genos(&["token"]);

    assert!(
        text(&minted.stdout).contains("to revoke it: genos token revoke "),
        "{}",
        text(&minted.stdout)
    );
    assert!(by_token.status.success(), "{}", text(&by_token.stderr));
    assert_eq!(
        text(&by_token.stdout).trim(),
        format!("revoked token {}", first["token_id"].as_str().unwrap())
    );
    assert_eq!(text(&by_id.stdout).trim(), format!("revoked token {id}"));
    assert_eq!(
        text(&again.stdout).trim(),
        format!("token {id} was already revoked")
    );
    assert_eq!(foreign.status.code(), Some(1));
    assert!(
        text(&foreign.stderr).contains("cannot revoke the token"),
        "{}",
        text(&foreign.stderr)
    );
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage.stderr));
    let audit = h.genos(&["--json", "audit", "list"]);
    let revokes = json(&audit)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "revoke-token")
        .count();
    assert_eq!(revokes, 3);
    assert!(h.genos(&["destroy", "python"]).status.success());
}
