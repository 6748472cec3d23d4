//! The initramfs archive: contents, size limit, reproducibility and cache reuse.

mod common;

use std::io::Read;
use std::path::PathBuf;

use image_builder::cache::Cache;
use image_builder::cpio::parse_archive;
use image_builder::initramfs::{self, InitramfsOptions, INIT_SCRIPT, MAX_COMPRESSED_BYTES};

fn temp_cache(name: &str) -> Cache {
    Cache::at(common::temp_dir("initramfs", name)).unwrap()
}

fn busybox_installed() -> bool {
    if PathBuf::from(initramfs::DEFAULT_BUSYBOX).is_file() {
        return true;
    }
    testkit::skip(
        testkit::Need::Tools,
        format!(
            "{} missing (install busybox-static)",
            initramfs::DEFAULT_BUSYBOX
        ),
    );
    false
}

#[test]
fn initramfs_holds_init_busybox_and_console_within_size_limit() {
    if !busybox_installed() {
        return;
    }
    let cache = temp_cache("contents");

    let artifact = initramfs::build(&cache, &InitramfsOptions::default()).unwrap();

    let compressed = std::fs::read(artifact.path()).unwrap();
    assert!(
        compressed.len() as u64 <= MAX_COMPRESSED_BYTES,
        "{} bytes",
        compressed.len()
    );
    assert_eq!(artifact.manifest.size_bytes, compressed.len() as u64);
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut archive)
        .unwrap();
    let members = parse_archive(&archive).unwrap();
    let find = |name: &str| {
        members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let init = find("init");
    assert_eq!(init.mode, 0o100_755);
    assert_eq!(init.data, INIT_SCRIPT.as_bytes());
    assert_eq!(
        find("bin/busybox").data,
        std::fs::read(initramfs::DEFAULT_BUSYBOX).unwrap()
    );
    let console = find("dev/console");
    assert_eq!(
        (console.mode & 0o170_000, console.rdev),
        (0o020_000, (5, 1))
    );
    for dir in ["proc", "sys", "dev", "mnt/root", "tmp"] {
        assert_eq!(
            find(dir).mode & 0o170_000,
            0o040_000,
            "{dir} is not a directory"
        );
    }
    std::fs::remove_dir_all(cache.root()).unwrap();
}

#[test]
fn initramfs_is_reproducible_and_cached() {
    if !busybox_installed() {
        return;
    }
    let (first_cache, second_cache) = (temp_cache("repro-a"), temp_cache("repro-b"));

    let first = initramfs::build(&first_cache, &InitramfsOptions::default()).unwrap();
    let again = initramfs::build(&first_cache, &InitramfsOptions::default()).unwrap();
    let elsewhere = initramfs::build(&second_cache, &InitramfsOptions::default()).unwrap();

    assert_eq!(again.dir, first.dir, "second build must hit the cache");
    assert_eq!(again.manifest, first.manifest);
    assert_eq!(
        std::fs::read(first.path()).unwrap(),
        std::fs::read(elsewhere.path()).unwrap()
    );
    std::fs::remove_dir_all(first_cache.root()).unwrap();
    std::fs::remove_dir_all(second_cache.root()).unwrap();
}

#[test]
fn dynamic_agent_is_refused_and_nothing_is_cached() {
    if !busybox_installed() {
        return;
    }
    let cache = temp_cache("agent");
    // /bin/ls is dynamically linked on Debian; the initramfs has no C library for it.
    let options = InitramfsOptions {
        agent: Some(PathBuf::from("/bin/ls")),
        ..Default::default()
    };

    let err = initramfs::build(&cache, &options).unwrap_err();

    assert!(err.to_string().contains("dynamically linked"), "{err}");
    assert!(cache.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(cache.root().join("tmp")).unwrap().count(),
        0
    );
    std::fs::remove_dir_all(cache.root()).unwrap();
}
