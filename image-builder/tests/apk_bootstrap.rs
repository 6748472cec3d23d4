//! genos-image fetches apk.static itself when the host has none, and runs it only after
//! openssl verified its signature with a key from the base's key directory.
//!
//! Alpine's mirrors are not reachable from the development machine, so the signature
//! check is shown with a key made here: a `file://` directory laid out like a mirror's
//! `main/x86_64` holds an index and an `apk-tools-static` package whose binary is a shell
//! script signed with that key. This checks genos-image's fetch-and-verify steps, not
//! Alpine's archive. Needs curl, openssl and tar (scripts/install-deps); no root, no network.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_builder::apk_bootstrap::{self, ApkBootstrapError};
use image_builder::cache::Cache;
use image_builder::plan::apk_static::ApkStaticPlan;

const KEY: &str = "genos-test@example.invalid-5f000001.rsa.pub";
const VERSION: &str = "2.14.4-r1";

fn have_tools() -> bool {
    let found = ["curl", "openssl", "tar"]
        .iter()
        .all(|t| image_builder::tools::find(t).is_some());
    if !found {
        testkit::skip(testkit::Need::Tools, "needs curl, openssl and tar");
    }
    found
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("apk", name)
}

/// An RSA key pair: the private key's path; the public key is written as `keys/<name>`.
fn key_pair(dir: &Path, keys: &Path, name: &str) -> PathBuf {
    let private = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private));
    std::fs::create_dir_all(keys).unwrap();
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(keys.join(name)));
    private
}

/// A mirror directory for v3.20 whose apk-tools-static package holds `binary`, with a
/// signature over `signed` by `private`, filed under the key name `key_name`.
fn mirror(dir: &Path, binary: &str, signed: &str, private: &Path, key_name: &str) -> PathBuf {
    let root = dir.join("pkgroot");
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    let signed_file = dir.join("signed");
    std::fs::write(&signed_file, signed).unwrap();
    let signature = format!("sbin/apk.static.SIGN.RSA.sha256.{key_name}");
    run(Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(private)
        .arg("-out")
        .arg(root.join(&signature))
        .arg(&signed_file));
    std::fs::write(root.join("sbin/apk.static"), binary).unwrap();
    let main = dir.join("mirror/v3.20/main/x86_64");
    std::fs::create_dir_all(&main).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-czf")
        .arg(main.join(format!("apk-tools-static-{VERSION}.apk")))
        .args(["sbin/apk.static", &signature]));
    let index_dir = dir.join("index");
    std::fs::create_dir_all(&index_dir).unwrap();
    std::fs::write(
        index_dir.join("APKINDEX"),
        format!(
            "P:apk-tools\nV:{VERSION}\nA:x86_64\n\nP:apk-tools-static\nV:{VERSION}\nA:x86_64\n\n"
        ),
    )
    .unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&index_dir)
        .arg("-czf")
        .arg(main.join("APKINDEX.tar.gz"))
        .arg("APKINDEX"));
    dir.join("mirror")
}

/// A binary that says what it is, and leaves `marker` behind if it is ever run.
fn script(marker: &Path) -> String {
    format!(
        "#!/bin/sh\ntouch {}\necho 'apk-tools {VERSION}, compiled for x86_64.'\n",
        marker.display()
    )
}

fn plan_for(mirror: &str, keys: &Path) -> ApkStaticPlan {
    ApkStaticPlan::new(mirror, "v3.20", "x86_64", keys)
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// A scratch directory whose `keys/` holds the trusted key [`KEY`] (its private half beside
/// it), and a cache in it.
struct Scratch {
    dir: PathBuf,
    cache: Cache,
}

/// [`Scratch`] named `name`; None (skipped) without curl, openssl and tar.
fn scratch(name: &str) -> Option<Scratch> {
    if !have_tools() {
        return None;
    }
    let dir = temp_dir(name);
    key_pair(&dir, &dir.join("keys"), KEY);
    let cache = Cache::at(dir.join("cache")).unwrap();
    Some(Scratch { dir, cache })
}

/// A mirror in scratch directory `dir` whose binary is `binary`, with a signature over
/// `signed` by the trusted key.
fn signed_mirror(dir: &Path, binary: &str, signed: &str) -> PathBuf {
    mirror(dir, binary, signed, &dir.join(format!("{KEY}.pem")), KEY)
}

/// The plan fetching from the mirror directory `mirror_dir`, trusting scratch directory
/// `dir`'s `keys/`.
fn plan_from(dir: &Path, mirror_dir: &Path) -> ApkStaticPlan {
    plan_for(
        &format!("file://{}", mirror_dir.display()),
        &dir.join("keys"),
    )
}

#[test]
fn a_correctly_signed_apk_static_is_verified_cached_and_reused_without_the_mirror() {
    let Some(Scratch { dir, cache }) = scratch("good") else {
        return;
    };
    let marker = dir.join("ran");
    let binary = script(&marker);
    let mirror_dir = signed_mirror(&dir, &binary, &binary);
    let plan = plan_from(&dir, &mirror_dir);

    let path = apk_bootstrap::obtain(&cache, &plan, TIMEOUT).unwrap();

    assert_eq!(std::fs::read_to_string(&path).unwrap(), binary);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let listed = cache.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest.inputs["version"], VERSION);
    assert_eq!(listed[0].manifest.inputs["key"], KEY);
    // Only the verified binary ran (its --version check).
    assert!(marker.exists());

    std::fs::remove_dir_all(&mirror_dir).unwrap();
    let again = apk_bootstrap::obtain(&cache, &plan, TIMEOUT).unwrap();

    assert_eq!(again, path);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_apk_static_that_does_not_match_its_signature_is_refused_never_run_and_not_cached() {
    let Some(Scratch { dir, cache }) = scratch("tampered") else {
        return;
    };
    let marker = dir.join("ran");
    let signed = script(&dir.join("unused"));
    let mirror_dir = signed_mirror(&dir, &script(&marker), &signed);
    let plan = plan_from(&dir, &mirror_dir);

    let err = apk_bootstrap::obtain(&cache, &plan, TIMEOUT).unwrap_err();

    assert!(
        matches!(err, ApkBootstrapError::BadSignature { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("Verification failure"), "{err}");
    assert!(!marker.exists(), "the unverified binary ran");
    assert!(cache.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(cache.root().join("tmp")).unwrap().count(),
        0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_apk_static_signed_by_a_key_outside_the_keys_dir_is_refused() {
    let Some(Scratch { dir, cache }) = scratch("foreign") else {
        return;
    };
    // Signed by a stranger's key, once under the trusted key's name, once under its own.
    let stranger = key_pair(&dir, &dir.join("elsewhere"), "stranger-5f000002.rsa.pub");
    let marker = dir.join("ran");
    let binary = script(&marker);

    let posing = mirror(&dir, &binary, &binary, &stranger, KEY);
    let posing_err = apk_bootstrap::obtain(&cache, &plan_from(&dir, &posing), TIMEOUT).unwrap_err();
    std::fs::remove_dir_all(dir.join("pkgroot")).unwrap();
    let own_name = mirror(
        &dir,
        &binary,
        &binary,
        &stranger,
        "stranger-5f000002.rsa.pub",
    );
    let own_name_err =
        apk_bootstrap::obtain(&cache, &plan_from(&dir, &own_name), TIMEOUT).unwrap_err();

    assert!(
        matches!(posing_err, ApkBootstrapError::BadSignature { .. }),
        "{posing_err:?}"
    );
    assert!(
        matches!(&own_name_err, ApkBootstrapError::UnknownKey { key_name, .. } if key_name == "stranger-5f000002.rsa.pub"),
        "{own_name_err:?}"
    );
    assert!(!marker.exists(), "an unverified binary ran");
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_cached_apk_static_that_changed_is_refused() {
    let Some(Scratch { dir, cache }) = scratch("changed") else {
        return;
    };
    let binary = script(&dir.join("ran"));
    let mirror_dir = signed_mirror(&dir, &binary, &binary);
    let plan = plan_from(&dir, &mirror_dir);
    let path = apk_bootstrap::obtain(&cache, &plan, TIMEOUT).unwrap();

    std::fs::write(&path, "#!/bin/sh\necho changed\n").unwrap();
    let err = apk_bootstrap::obtain(&cache, &plan, TIMEOUT).unwrap_err();

    assert!(
        matches!(err, ApkBootstrapError::CachedBadSignature { .. }),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_alpine_mirror_fails_the_fetch_within_seconds_naming_it() {
    if !have_tools() {
        return;
    }
    let (refused_port, silent_port) = (common::refused_port(), common::silent_port());
    let dir = temp_dir("unreachable");
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let cache = Cache::at(dir.join("cache")).unwrap();

    for port in [refused_port, silent_port] {
        let mirror = format!("http://127.0.0.1:{port}/alpine");
        let started = Instant::now();
        let err = apk_bootstrap::obtain(&cache, &plan_for(&mirror, &keys), TIMEOUT).unwrap_err();
        let took = started.elapsed();

        assert!(matches!(err, ApkBootstrapError::Fetch { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "fetching {mirror}/v3.20/main/x86_64/APKINDEX.tar.gz failed: curl: ("
            )),
            "{err}"
        );
        assert!(took < Duration::from_secs(20), "port {port}: took {took:?}");
    }
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
