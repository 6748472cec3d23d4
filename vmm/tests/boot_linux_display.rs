//! Boots the real guest kernel with virtio-gpu and virtio-input and checks what the kernel
//! does with them: the framebuffer console draws the boot log on our scanout (the shared
//! frame is not blank and changes as the kernel prints; saved as
//! `target/artifacts/boot_linux_display.png`), and the kernel registers the keyboard, tablet
//! and touch screen.
//!
//! Needs /dev/kvm and `GENOS_GUEST_KERNEL` (vmlinux; `GENOS_GUEST_INITRAMFS` is passed too
//! when set). Skips with a message otherwise. Slow under nested KVM (a few minutes). The VMM
//! runs in this process; its log is captured and, on failure, printed with how the VM
//! ended (`common::boot`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::boot::{capture_vmm_log, BootWatch, Images, LogTail, BOOT_LIMIT};

use framebuffer::{FrameInfo, FramebufferReader};
use vmm::builder::build_and_start;
use vmm::config::{CpuTemplate, DisplaySize, SerialConfig, VmConfig};
use vmm::device_manager::EventManager;
use vmm::vstate::lifecycle::ExitSignal;

const TEST: &str = "framebuffer_console_draws_on_virtio_gpu_and_input_devices_register";
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
const INPUT_NAMES: [&str; 3] = [
    "GenOS virtio keyboard",
    "GenOS virtio tablet",
    "GenOS virtio touchscreen",
];

/// The serial log so far (lossy: the console may emit bytes that are not UTF-8).
fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
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
    let Some(images) = Images::from_env(TEST, false) else {
        return;
    };
    let log = LogTail::new();
    capture_vmm_log(&log);
    let serial_log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot_linux_display.log");
    let mut config = VmConfig::new(images.kernel);
    config.initrd = images.initramfs;
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
    let watch = BootWatch::new(TEST, log);
    let mut vm =
        build_and_start(&config, Instant::now(), &mut em, exit.clone()).expect("VM starts");
    let display = vm.display.clone().expect("gpu attached");
    let mut reader = FramebufferReader::new(display.reader_fds().unwrap()).unwrap();

    // Under this machine's nested KVM the kernel reaches DRM init after about 6 minutes.
    let mut first_drawn: Option<(u64, Vec<u8>)> = None;
    let mut changed: Option<(FrameInfo, Vec<u8>)> = None;
    let mut inputs_seen = false;
    while watch.elapsed() < BOOT_LIMIT && !(changed.is_some() && inputs_seen) {
        em.run_with_timeout(50).expect("event loop");
        // The reset line is the VMM binary's event loop's to watch; here it is the test's.
        // With `reboot=k panic=-1` a reset is a reboot or a kernel panic.
        let ended = exit
            .exit()
            .map(|exit| format!("VM ended: {:?}: {}", exit.status, exit.reason))
            .or_else(|| {
                vm.reset_evt
                    .read()
                    .ok()
                    .map(|_| "guest reset through the i8042 (a reboot or a panic)".to_owned())
            });
        if let Some(ended) = ended {
            watch.set_outcome(ended.clone());
            // The vCPU that ended the VM waits for a stop; without it the panic's unwinding
            // would hang and the test never report.
            vm.vcpus.stop(Duration::from_secs(5));
            panic!("guest ended early: {ended}\n{}", read_log(&serial_log));
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
    let boot_time = watch.elapsed();
    watch.set_outcome(if boot_time >= BOOT_LIMIT {
        "still running at the time limit; stopped by the test"
    } else {
        "running; stopped by the test after the checks were met"
    });
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
    eprintln!(
        "{TEST}: console drawn and input devices registered after {:.1} s",
        boot_time.as_secs_f64()
    );
}
