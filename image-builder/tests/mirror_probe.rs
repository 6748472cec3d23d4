//! An unreachable archive fails a build within seconds, with the reason, before any tool
//! runs: a port that accepts and never answers, and a port that refuses, for every builder.
//! Needs neither root nor network (the mirrors are on 127.0.0.1).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image_builder::cache::Cache;
use image_builder::probe::ProbeError;
use image_builder::rootfs::{self, RootfsError, RootfsOptions};
use proto::spec::Spec;

const BASES: &[&str] = &["debian-12", "ubuntu-24.04", "fedora-40", "alpine-3.20"];
/// Far above the probe's timeouts, far below a tool's own retries (minutes).
const GENEROUS: Duration = Duration::from_secs(60);

fn spec(base: &str) -> Spec {
    common::spec_on(base, "probe", "none", &["git"])
}

fn temp_cache(name: &str) -> (PathBuf, Cache) {
    let dir = common::temp_dir("probe", name);
    let cache = Cache::at(dir.clone()).unwrap();
    (dir, cache)
}

fn build_against(base: &str, mirror: String, cache: &Cache) -> (RootfsError, Duration) {
    let options = RootfsOptions {
        mirror: Some(mirror),
        probe_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let started = Instant::now();
    let err = rootfs::build(cache, &spec(base), &options).unwrap_err();
    (err, started.elapsed())
}

/// Why the probe found the archive unreachable; fails the test for any other error.
fn unreachable_because(err: &RootfsError) -> &ProbeError {
    match err {
        RootfsError::Unreachable { source, .. } => source,
        other => panic!("not an unreachable archive: {other:?}"),
    }
}

/// Builds every base against the mirror on `port` and hands each error to `check`; each
/// build must fail well within [`GENEROUS`] and leave nothing in the cache.
fn build_every_base_against(port: u16, name: &str, check: impl Fn(&str, &RootfsError)) {
    let (dir, cache) = temp_cache(name);
    for base in BASES {
        let (err, took) = build_against(base, format!("http://127.0.0.1:{port}/{base}"), &cache);
        check(base, &err);
        assert!(took < GENEROUS, "{base}: took {took:?}");
    }
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_mirror_that_accepts_and_never_answers_fails_every_builder_within_seconds() {
    let port = common::silent_port();

    build_every_base_against(port, "silent", |base, err| {
        let probe = unreachable_because(err);
        assert!(
            matches!(probe, ProbeError::Silent { .. }),
            "{base}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "the archive of {base} is not usable, so nothing was built: 127.0.0.1:{port} accepted the connection but sent no answer within 2 s"
            )
        );
    });
}

#[test]
fn a_mirror_that_refuses_connections_fails_every_builder_at_once_naming_the_address() {
    let port = common::refused_port();

    build_every_base_against(port, "refused", |base, err| {
        let probe = unreachable_because(err);
        assert!(
            matches!(probe, ProbeError::Connect { .. }),
            "{base}: {err:?}"
        );
        let text = format!("{err}: {}", std::error::Error::source(err).unwrap());
        assert!(
            text.contains(&format!("cannot connect to 127.0.0.1:{port}")),
            "{base}: {text}"
        );
    });
}

#[test]
fn the_cli_reports_an_unreachable_mirror_in_one_line() {
    let port = common::refused_port();
    let (dir, _cache) = temp_cache("cli");
    let spec_path = dir.join("spec.json");
    std::fs::write(
        &spec_path,
        serde_json::to_string(&spec("fedora-40")).unwrap(),
    )
    .unwrap();
    let out = dir.join("out.ext4");

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_genos-image"))
        .arg("--cache-dir")
        .arg(&dir)
        .args(["rootfs", "--spec"])
        .arg(&spec_path)
        .arg("--out")
        .arg(&out)
        .args(["--mirror", &format!("http://127.0.0.1:{port}/fedora")])
        .output()
        .unwrap();

    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("genos-image: error: the archive of fedora-40 is not usable")
            && last.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(run.stdout.is_empty());
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reachable_archive_with_missing_keys_fails_naming_the_package() {
    if !common::root_or_skip("the key check comes after the root check") {
        return;
    }
    let port = common::answering_port();
    let (dir, cache) = temp_cache("keys");
    let options = RootfsOptions {
        mirror: Some(format!("http://127.0.0.1:{port}/ubuntu")),
        keyring: Some(dir.join("no-such-keyring.gpg")),
        ..Default::default()
    };

    let err = rootfs::build(&cache, &spec("ubuntu-24.04"), &options).unwrap_err();

    assert!(matches!(err, RootfsError::NoKeyring { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("install the Debian package `ubuntu-keyring`"),
        "{err}"
    );
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether the test runs as root on a host without apk (it checks what happens when
/// genos-image has to find apk.static itself); says why when not.
fn root_without_apk() -> bool {
    if !common::root_or_skip("needs root") {
        return false;
    }
    let has_apk = ["apk.static", "apk"]
        .iter()
        .any(|t| image_builder::tools::find(t).is_some());
    if has_apk {
        // Not a missing prerequisite: this host has the tool the test needs absent.
        eprintln!("skipping: needs a host without apk");
    }
    !has_apk
}

#[test]
fn without_apk_or_alpine_keys_to_verify_a_fetched_one_the_build_fails_naming_the_tool() {
    if !root_without_apk() {
        return;
    }
    let port = common::answering_port();
    let (dir, cache) = temp_cache("tool");
    let mut options = RootfsOptions {
        mirror: Some(format!("http://127.0.0.1:{port}/alpine")),
        ..Default::default()
    };
    options
        .catalog
        .bases
        .get_mut("alpine-3.20")
        .unwrap()
        .keyring = None;

    let err = rootfs::build(&cache, &spec("alpine-3.20"), &options).unwrap_err();

    assert!(
        err.to_string()
            .starts_with("required tool apk.static or apk not found in PATH (install apk.static"),
        "{err}"
    );
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_mirror_that_serves_no_usable_index_fails_fetching_apk_static_naming_the_mirror() {
    if !root_without_apk() {
        return;
    }
    if image_builder::tools::find("curl").is_none()
        || image_builder::tools::find("openssl").is_none()
    {
        testkit::skip(testkit::Need::Tools, "needs curl and openssl");
        return;
    }
    let port = common::answering_port();
    let (dir, cache) = temp_cache("apk-index");
    let keys = dir.join("alpine-keys");
    std::fs::create_dir_all(&keys).unwrap();
    let mirror = format!("http://127.0.0.1:{port}/alpine");
    let options = RootfsOptions {
        mirror: Some(mirror.clone()),
        keyring: Some(keys),
        ..Default::default()
    };

    let started = Instant::now();
    let err = rootfs::build(&cache, &spec("alpine-3.20"), &options).unwrap_err();

    assert!(matches!(err, RootfsError::ApkStatic { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "apk.static is not on PATH and could not be obtained from the Alpine mirror {mirror}: \
             {mirror}/v3.20/main/x86_64/APKINDEX.tar.gz is not usable"
        )),
        "{err}"
    );
    assert!(started.elapsed() < GENEROUS);
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
