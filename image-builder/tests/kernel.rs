//! The guest kernel built by `genos-image kernel`: its resolved configuration, its PVH
//! entry point and the cache. The build itself takes minutes, so these tests run only
//! when `GENOS_GUEST_KERNEL` is set (scripts/test builds the kernel first, so the calls
//! below are cache hits).

use image_builder::cache::Cache;
use image_builder::kernel::{self, KernelOptions, DEFAULT_CONFIG_FRAGMENT};

fn cached_kernel() -> Option<image_builder::cache::Artifact> {
    if std::env::var_os("GENOS_GUEST_KERNEL").is_none() {
        testkit::skip(
            testkit::Need::Kernel,
            "GENOS_GUEST_KERNEL is unset (scripts/test sets it after `genos-image kernel`)",
        );
        return None;
    }
    let cache = Cache::open(None).unwrap();
    Some(kernel::build(&cache, &KernelOptions::default()).unwrap())
}

#[test]
fn kernel_config_keeps_every_required_option_after_olddefconfig() {
    let Some(artifact) = cached_kernel() else {
        return;
    };

    let resolved = std::fs::read_to_string(artifact.dir.join("config")).unwrap();

    let missing = kernel::missing_options(DEFAULT_CONFIG_FRAGMENT, &resolved);
    assert!(missing.is_empty(), "dropped by olddefconfig: {missing:?}");
    assert!(resolved.contains("# CONFIG_MODULES is not set"));
}

#[test]
fn second_kernel_build_is_a_cache_hit() {
    let Some(first) = cached_kernel() else { return };

    let second = kernel::build(&Cache::open(None).unwrap(), &KernelOptions::default()).unwrap();

    assert_eq!(second.dir, first.dir);
    assert_eq!(second.manifest, first.manifest);
    assert!(first.dir.join("bzImage").is_file());
}

/// Finds the Xen PVH entry note (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18) in
/// the PT_NOTE segments of a 64-bit little-endian ELF file.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != 4 {
            continue; // not PT_NOTE
        }
        let (mut at, end) = (u64_at(ph + 8), u64_at(ph + 8) + u64_at(ph + 32));
        while at + 12 <= end {
            let (namesz, descsz, ty) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
            let name = &elf[at + 12..at + 12 + namesz];
            if name == b"Xen\0" && ty == 18 {
                return true;
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    false
}

#[test]
fn vmlinux_has_a_pvh_entry_point() {
    let Some(artifact) = cached_kernel() else {
        return;
    };

    let elf = std::fs::read(artifact.path()).unwrap();

    assert_eq!(&elf[..5], b"\x7fELF\x02");
    assert!(
        has_pvh_note(&elf),
        "no XEN_ELFNOTE_PHYS32_ENTRY note in {}",
        artifact.path().display()
    );
}
