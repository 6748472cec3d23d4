//! Boots the real guest kernel with virtio-gpu and virtio-input and checks what the kernel
//! does with them: the framebuffer console draws the boot log on our scanout (the shared
//! frame is not blank and changes as the kernel prints; saved as
//! `target/artifacts/boot_linux_display.png`), and the kernel registers the keyboard, tablet
//! and touch screen.
//!
//! Needs /dev/kvm and `GENOS_GUEST_KERNEL` (vmlinux; `GENOS_GUEST_INITRAMFS` is passed too
//! when set). Skips with a message otherwise. Slow under nested KVM (a few minutes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use framebuffer::{FrameInfo, FramebufferReader};
use vmm::builder::build_and_start;
use vmm::config::{CpuTemplate, DisplaySize, SerialConfig, VmConfig};
use vmm::device_manager::EventManager;
use vmm::vstate::lifecycle::ExitSignal;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
/// Under this machine's nested KVM the kernel reaches DRM init after about 6 minutes.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
const INPUT_NAMES: [&str; 3] = [
    "GenOS virtio keyboard",
    "GenOS virtio tablet",
    "GenOS virtio touchscreen",
];

/// The serial log so far (lossy: the console may emit bytes that are not UTF-8).
fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

fn guest_kernel() -> Option<PathBuf> {
    let Some(kernel) = std::env::var_os("GENOS_GUEST_KERNEL") else {
        testkit::skip(
            testkit::Need::Kernel,
            "GENOS_GUEST_KERNEL is not set (scripts/test sets it)",
        );
        return None;
    };
    if !Path::new("/dev/kvm").exists() {
        testkit::skip(testkit::Need::Kvm, "/dev/kvm is not available");
        return None;
    }
    Some(kernel.into())
}

/// The frame's pixels as tightly packed RGB.
fn rgb(info: &FrameInfo, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((info.width * info.height * 3) as usize);
    for y in 0..info.height as usize {
        let row = &pixels[y * info.stride as usize..][..info.width as usize * 4];
        for px in row.chunks_exact(4) {
            out.extend_from_slice(&[px[2], px[1], px[0]]);
        }
    }
    out
}

fn save_png(path: &Path, width: u32, height: u32, rgb: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(rgb).unwrap();
}

fn artifacts_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("artifacts")
}

#[test]
fn framebuffer_console_draws_on_virtio_gpu_and_input_devices_register() {
    let Some(kernel) = guest_kernel() else {
        return;
    };
    let serial_log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot_linux_display.log");
    let mut config = VmConfig::new(kernel);
    config.initrd = std::env::var_os("GENOS_GUEST_INITRAMFS").map(PathBuf::from);
    // tty0 as a console makes printk go to the framebuffer console too.
    config.cmdline = "console=ttyS0 console=tty0 reboot=k panic=-1".into();
    config.cpu_template = CpuTemplate::Baseline;
    config.mem_mib = 256;
    config.serial = SerialConfig::File(serial_log.clone());
    config.gpu = Some(DisplaySize {
        width: WIDTH,
        height: HEIGHT,
    });
    config.input = true;

    let mut em = EventManager::new().expect("event manager");
    let exit = Arc::new(ExitSignal::new().unwrap());
    let mut vm =
        build_and_start(&config, Instant::now(), &mut em, exit.clone()).expect("VM starts");
    let display = vm.display.clone().expect("gpu attached");
    let mut reader = FramebufferReader::new(display.reader_fds().unwrap()).unwrap();

    let start = Instant::now();
    let mut first_drawn: Option<(u64, Vec<u8>)> = None;
    let mut changed: Option<(FrameInfo, Vec<u8>)> = None;
    let mut inputs_seen = false;
    while start.elapsed() < BOOT_LIMIT && !(changed.is_some() && inputs_seen) {
        em.run_with_timeout(50).expect("event loop");
        if let Some(exit) = exit.exit() {
            panic!("guest ended early: {exit:?}\n{}", read_log(&serial_log));
        }
        if let Some(frame) = reader.wait_frame(Instant::now()).unwrap() {
            let pixels = rgb(&frame.info, frame.pixels);
            let drawn = pixels.iter().any(|&b| b != 0);
            match &first_drawn {
                None if drawn => first_drawn = Some((frame.info.sequence, pixels)),
                Some((seq, first)) if frame.info.sequence > *seq && pixels != *first => {
                    changed = Some((frame.info, pixels));
                }
                _ => {}
            }
        }
        let log = read_log(&serial_log);
        inputs_seen = INPUT_NAMES
            .iter()
            .all(|name| log.contains(&format!("input: {name}")));
    }
    vm.vcpus.stop(Duration::from_secs(5));
    let log = read_log(&serial_log);

    if let Some((info, pixels)) = changed.as_ref() {
        save_png(
            &artifacts_dir().join("boot_linux_display.png"),
            info.width,
            info.height,
            pixels,
        );
    } else if let Some((_, pixels)) = first_drawn.as_ref() {
        save_png(
            &artifacts_dir().join("boot_linux_display.png"),
            WIDTH,
            HEIGHT,
            pixels,
        );
    }
    assert!(
        first_drawn.is_some(),
        "the framebuffer console never drew on the scanout; serial log:\n{log}"
    );
    let (info, _) = changed.expect("the frame never changed after the first drawing");
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    for name in INPUT_NAMES {
        assert!(
            log.contains(&format!("input: {name}")),
            "kernel did not register {name}; serial log:\n{log}"
        );
    }
}
