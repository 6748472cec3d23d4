//! Helpers shared by genos-image's test suites: scratch directories, specs, root checks, and
//! local "mirrors" on 127.0.0.1 that refuse, stay silent or answer.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;

use proto::spec::Spec;

/// A fresh, empty directory `genos-<suite>-test-<name>-<pid>` in the system's temp directory.
pub fn temp_dir(suite: &str, name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("genos-{suite}-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A spec named `name` on `base` with `desktop` and `apps`: one vCPU, 512 MiB, 1 GiB of disk,
/// no network, no time limit, ephemeral.
pub fn spec_on(base: &str, name: &str, desktop: &str, apps: &[&str]) -> Spec {
    let json = serde_json::json!({
        "version": 1, "name": name, "base": base, "desktop": desktop, "apps": apps,
        "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
        "display": {"width": 1280, "height": 720, "fps": 30},
        "network": {"mode": "none", "allow": []},
        "lifetime": {"ttl_s": null, "idle_s": null},
        "persistence": "ephemeral", "assumptions": []
    });
    Spec::from_json(&json.to_string()).unwrap()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the test runs as root; skips (saying `why` root is needed) when not.
pub fn root_or_skip(why: &str) -> bool {
    if !is_root() {
        testkit::skip(testkit::Need::Root, why);
    }
    is_root()
}

/// A port on 127.0.0.1 where nothing listens: connections are refused.
pub fn refused_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A port on 127.0.0.1 that accepts every connection and holds it open without a byte.
pub fn silent_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// A port on 127.0.0.1 that answers every request with 200 and an empty body.
pub fn answering_port() -> u16 {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}
