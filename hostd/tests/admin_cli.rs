//! The `genos` CLI against a running `genos-hostd` binary over its admin socket: every
//! command, peer-credential refusal, and audit tampering detected.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::os::unix::process::CommandExt;
use std::process::Command;

use daemon::{json, stderr, stdout, Hostd};

/// A hostd whose image builder is missing: environments fail during their build, without a
/// VM.
const NO_BUILDER: &str = "[images]\nbuilder = \"/nonexistent/genos-image\"\n[capacity]\nvcpus = 2\nmemory_mib = 8192\ncpu_overcommit = 1.0\n[stream]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn cli_drives_a_running_hostd() {
    let h = Hostd::start(NO_BUILDER);

    let o = h.genos(&["health"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // `degraded` only for this machine's own state (a store disk with little room left),
    // never for a failing check.
    let health = stdout(&o);
    assert!(
        health.starts_with("ok (genos-hostd ")
            || (health.starts_with("degraded (genos-hostd ")
                && health
                    .lines()
                    .skip(1)
                    .all(|l| !l.trim_start().starts_with("fail"))),
        "{health}"
    );

    let o = h.genos(&["compose", "--remote", "gimp with 8 gigs"]);
    assert!(o.status.success());
    assert_eq!(json(&o)["spec"]["memory_mib"], 8192);

    // A question is printed and the exit status says an answer is needed.
    let o = h.genos(&["create", "--text", "xfce with photoshop"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stdout(&o).contains("photoshop"));

    let o = h.genos(&[
        "--json",
        "create",
        "--text",
        "python headless, 1 core, 512 mb",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["env"]["name"], "python");

    // Admission: 2 vCPUs at overcommit 1, one promised to "python" while it is live.
    let o = h.genos(&["create", "--text", "python headless, 2 cores"]);
    let refused = o.status.code() == Some(1) && stderr(&o).contains("not enough CPU");
    let failed_first = json(&h.genos(&["--json", "show", "python"]))["env"]["state"] == "failed";
    assert!(
        refused || failed_first,
        "neither refused nor explained: {} / {}",
        stdout(&o),
        stderr(&o)
    );

    // The build fails (no image builder) and says why.
    let v = h.wait_state("python", "failed", 30);
    assert!(
        v["env"]["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/genos-image"),
        "{v}"
    );

    let o = h.genos(&["list"]);
    assert!(
        stdout(&o).lines().next().unwrap().starts_with("NAME"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("python"));

    let o = h.genos(&["show", "python"]);
    assert!(stdout(&o).contains("state:    failed"), "{}", stdout(&o));

    let o = h.genos(&["stop", "python"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot stop python: it is failed"),
        "{}",
        stderr(&o)
    );

    let o = h.genos(&["token", "python"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("it is failed"), "{}", stderr(&o));

    let o = h.genos(&["destroy", "python"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "destroyed python");

    let o = h.genos(&["show", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no environment named \"nosuch\""));

    let o = h.genos(&["metrics"]);
    assert!(
        stdout(&o).contains("genos_environments{state=\"destroyed\"} 1"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("# TYPE genos_admission_refusals_total counter"));

    let o = h.genos(&["audit", "verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("audit log intact"));
    let o = h.genos(&["audit", "list"]);
    assert!(stdout(&o).contains("destroy"), "{}", stdout(&o));
}

#[test]
fn audit_tampering_is_reported_by_the_cli() {
    let h = Hostd::start(NO_BUILDER);
    for t in ["gimp", "vlc", "python headless"] {
        assert!(h.genos(&["compose", "--remote", t]).status.success());
    }
    assert!(h.genos(&["audit", "verify"]).status.success());

    let db = rusqlite::Connection::open(h.state().join("state.db")).unwrap();
    db.execute(
        "UPDATE audit SET detail = 'something else' WHERE seq = 2",
        [],
    )
    .unwrap();
    drop(db);

    let o = h.genos(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "genos: audit log TAMPERED: entry 2 was modified (hash mismatch)"
    );
}

#[test]
fn non_permitted_user_is_refused_by_peer_credentials() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(
            testkit::Need::Root,
            "needs root to run the client as another user",
        );
        return;
    }
    let h = Hostd::start(NO_BUILDER);
    // Let anyone reach the socket file, so only the SO_PEERCRED check stands in the way.
    use std::os::unix::fs::PermissionsExt;
    for p in [h.dir.path(), &h.state(), &h.socket()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let nobody = 65534;
    // The build directory may not be traversable by other users (a checkout under a
    // 0700 directory): run a copy of the client from the shared directory.
    let genos = h.dir.path().join("genos");
    std::fs::copy(env!("CARGO_BIN_EXE_genos"), &genos).unwrap();
    std::fs::set_permissions(&genos, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(&genos)
        .env("GENOS_SOCKET", h.socket())
        .arg("list")
        .uid(nobody)
        .gid(nobody)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).starts_with(
            "genos: permission denied: uid 65534 is not root and not in group \"genos\""
        ),
        "{}",
        stderr(&o)
    );
    // Root still gets in.
    assert!(h.genos(&["list"]).status.success());
}

#[test]
fn up_waits_until_ready_and_prints_a_viewer_token() {
    let Some(h) = Hostd::with_tiny_guest() else {
        return;
    };
    let o = h.genos(&["up", "headless python, 1 core, 256 MB"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).starts_with("python is ready.\nviewer token for python"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("ready"), "{}", stderr(&o));
    // What the composer assumed is said before the wait.
    assert!(
        stderr(&o).contains("  assumed: base debian-12 (default)\n"),
        "{}",
        stderr(&o)
    );
    // The tiny guest has no agent: exec says so, through hostd and the VM's vsock device.
    let o = h.genos(&["exec", "python", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim(),
        "genos: guest agent of python: vsock handshake: nothing in the guest accepted a \
         connection on vsock port 1024"
    );
    let o = h.genos(&["exec", "nosuch", "--", "true"]);
    assert!(
        stderr(&o).contains("no environment named \"nosuch\""),
        "{}",
        stderr(&o)
    );
    // So does a copy either way, and a copy out leaves nothing behind.
    let local = h.dir.path().join("local.txt");
    std::fs::write(&local, b"to the guest\n").unwrap();
    let o = h.genos(&["cp", local.to_str().unwrap(), "python:/root/x.txt"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("nothing in the guest accepted a connection on vsock port 1024"),
        "{}",
        stderr(&o)
    );
    let out = h.dir.path().join("back.txt");
    let o = h.genos(&["cp", "python:/root/x.txt", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("vsock port 1024"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("back.txt"))
        .collect();
    assert!(left.is_empty(), "a failed copy left {left:?}");
    for (args, why) in [
        (["cp", "a:/x", "b:/y"], "both sides are in a guest"),
        (["cp", "./a", "/tmp/b"], "neither side is in a guest"),
    ] {
        let o = h.genos(&args);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
    let o = h.genos(&["destroy", "python"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
