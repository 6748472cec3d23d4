//! The `genos-image` command line: stdout carries only the artifact path, errors are one
//! line on stderr with a failing exit status, and `ls` / `gc` manage the cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn genos_image(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genos-image"))
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("cli", name)
}

#[test]
fn initramfs_prints_only_the_artifact_path_and_ls_lists_it() {
    if !Path::new(image_builder::initramfs::DEFAULT_BUSYBOX).is_file() {
        testkit::skip(testkit::Need::Tools, "busybox-static not installed");
        return;
    }
    let cache = temp_dir("initramfs");

    let built = genos_image(&cache, &["initramfs"]);
    let listed = genos_image(&cache, &["ls", "--json"]);

    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let stdout = String::from_utf8(built.stdout).unwrap();
    let path = stdout.strip_suffix('\n').unwrap();
    assert!(
        !path.contains('\n'),
        "stdout has more than the path: {stdout:?}"
    );
    assert!(Path::new(path).is_file() && Path::new(path).starts_with(&cache));
    let manifests: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(manifests[0]["kind"], "initramfs");
    assert_eq!(
        manifests[0]["size_bytes"],
        std::fs::metadata(path).unwrap().len()
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn bad_spec_fails_with_one_error_line_and_writes_nothing() {
    let cache = temp_dir("bad-spec");
    let spec = cache.join("spec.json");
    let out = cache.join("out.ext4");
    let json = serde_json::json!({
        "version": 1, "name": "x", "base": "debain-12", "desktop": "none", "apps": [],
        "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
        "display": {"width": 1280, "height": 720, "fps": 30},
        "network": {"mode": "none", "allow": []},
        "lifetime": {"ttl_s": null, "idle_s": null},
        "persistence": "ephemeral", "assumptions": []
    });
    std::fs::write(&spec, json.to_string()).unwrap();

    let result = genos_image(
        &cache,
        &[
            "rootfs",
            "--spec",
            spec.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );

    assert_eq!(result.status.code(), Some(1));
    assert!(result.stdout.is_empty());
    let stderr = String::from_utf8(result.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("genos-image: error: unknown base \"debain-12\""),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean debian-12?"), "{stderr}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn gc_removes_abandoned_staging_directories() {
    let cache = temp_dir("gc");
    let orphan = cache.join("tmp/rootfs-0123456789abcdef.999999999.0");
    std::fs::create_dir_all(orphan.join("root/etc")).unwrap();

    let result = genos_image(&cache, &["gc"]);

    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(!orphan.exists());
    assert!(String::from_utf8_lossy(&result.stdout).contains("removed"));
    std::fs::remove_dir_all(&cache).unwrap();
}
