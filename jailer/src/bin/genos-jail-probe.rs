//! `genos-jail-probe`: run by `genos-jailer --exec-file` in place of the VMM, it reports
//! from inside the jail what it can see and do (pid, uid, open descriptors, host files,
//! writable root, images), as one line of JSON, then waits for SIGTERM. The jailer's tests
//! use it; an operator can use it to check a host's jail set-up.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    // First thing: as pid 1 of its namespace the probe would otherwise ignore SIGTERM.
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let args: Vec<String> = std::env::args().collect();
    // SAFETY: getuid/getgid take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let open_fds = (3..1024)
        // SAFETY: F_GETFD only queries the descriptor table.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .count();
    let host_file_visible = fs::metadata("/etc/passwd").is_ok() || fs::metadata("/usr/bin").is_ok();
    let root_writable = fs::write("/probe-write", b"x").is_ok();
    let kvm_present = fs::metadata("/dev/kvm").is_ok();
    let mut entries: Vec<String> = fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let images: Vec<String> = fs::read_dir("/images")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut hostname = [0u8; 65];
    // SAFETY: the buffer is writable and its length is passed.
    unsafe { libc::gethostname(hostname.as_mut_ptr().cast(), hostname.len()) };
    let hostname =
        String::from_utf8_lossy(hostname.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    println!(
        "{{\"pid\":{},\"uid\":{uid},\"gid\":{gid},\"open_fds\":{open_fds},\"host_file_visible\":{host_file_visible},\
         \"root_writable\":{root_writable},\"kvm_present\":{kvm_present},\"root\":{:?},\"images\":{:?},\
         \"hostname\":{hostname:?},\"args\":{:?}}}",
        std::process::id(),
        entries,
        images,
        &args[1..]
    );
    if let Some(code) = args
        .iter()
        .position(|a| a == "--exit-with")
        .and_then(|i| args.get(i + 1))
    {
        std::process::exit(code.parse().unwrap_or(1));
    }
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
