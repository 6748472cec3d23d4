//! Shared by the real-kernel boot tests: the guest images from the environment, the time
//! limit, a bounded copy of the VMM's log, and a report printed whenever a boot test fails
//! (how the VMM ended, how long the boot ran, the VMM's last log lines), so a failure in CI
//! names the instruction, panic or timeout without a rerun.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::vstate::lifecycle::ExitStatus;

/// How long a boot may take. Reaching init takes 2-12 minutes here (the nested KVM
/// interprets guest kernel code) and more on a loaded CI machine; the two boot tests run
/// one after the other, so both limits together stay well inside CI's 90 minutes.
pub const BOOT_LIMIT: Duration = Duration::from_secs(1200);

/// Log lines shown when a boot test fails.
pub const REPORT_LINES: usize = 50;

/// Log lines kept for the checks a test makes on the log (older ones are dropped).
const KEPT_LINES: usize = 20_000;

/// The guest kernel (`GENOS_GUEST_KERNEL`, a vmlinux) and initramfs
/// (`GENOS_GUEST_INITRAMFS`) that `scripts/test` builds and exports.
pub struct Images {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs, when set.
    pub initramfs: Option<PathBuf>,
}

impl Images {
    /// The images from the environment, or `None` after saying why `test` is skipped (no
    /// kernel, no initramfs when `need_initramfs`, or no usable `/dev/kvm`); under
    /// `GENOS_REQUIRE` a missing need fails the test instead (`testkit::skip`).
    pub fn from_env(test: &str, need_initramfs: bool) -> Option<Self> {
        let var = |name: &str| match std::env::var_os(name) {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => None,
        };
        let missing = |name: &str| {
            testkit::skip(
                testkit::Need::Kernel,
                format!("{test}: {name} is not set (scripts/test sets it)"),
            );
        };
        let Some(kernel) = var("GENOS_GUEST_KERNEL") else {
            missing("GENOS_GUEST_KERNEL");
            return None;
        };
        let initramfs = var("GENOS_GUEST_INITRAMFS");
        if need_initramfs && initramfs.is_none() {
            missing("GENOS_GUEST_INITRAMFS");
            return None;
        }
        if !super::kvm_available(test) {
            return None;
        }
        Some(Self { kernel, initramfs })
    }
}

/// The last lines of a log, fed as bytes from a pipe or a tracing writer. Cheap to clone
/// (all clones share one buffer).
#[derive(Clone, Default)]
pub struct LogTail {
    inner: Arc<Mutex<TailState>>,
}

#[derive(Default)]
struct TailState {
    lines: VecDeque<String>,
    /// Bytes after the last newline.
    partial: Vec<u8>,
    dropped: usize,
}

impl LogTail {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `bytes` (lines may be split across calls).
    pub fn push(&self, bytes: &[u8]) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.partial.extend_from_slice(bytes);
        while let Some(pos) = st.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = st.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            st.lines.push_back(text);
            if st.lines.len() > KEPT_LINES {
                st.lines.pop_front();
                st.dropped += 1;
            }
        }
    }

    /// Copies `pipe` into the log on a new thread until it closes.
    pub fn follow<R: Read + Send + 'static>(&self, mut pipe: R) -> std::thread::JoinHandle<()> {
        let tail = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.push(&buf[..n]);
            }
        })
    }

    /// Whether any kept line (or the unfinished last one) contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.lines.iter().any(|l| l.contains(text)) || {
            String::from_utf8_lossy(&st.partial).contains(text)
        }
    }

    /// The last `n` lines, the unfinished one included.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = st.lines.iter().cloned().collect();
        if !st.partial.is_empty() {
            out.push(String::from_utf8_lossy(&st.partial).into_owned());
        }
        let skip = out.len().saturating_sub(n);
        out.split_off(skip)
    }

    /// A writer for `tracing_subscriber::fmt().with_writer(..)`: each write appends.
    pub fn writer(&self) -> LogTailWriter {
        LogTailWriter(self.clone())
    }
}

/// [`LogTail::writer`].
pub struct LogTailWriter(LogTail);

impl std::io::Write for LogTailWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the VMM library's log (`tracing`, INFO and up) into `tail`, for tests that run the
/// VMM in-process. Each test binary has one process-wide subscriber: call this once.
pub fn capture_vmm_log(tail: &LogTail) {
    let tail = tail.clone();
    tracing_subscriber::fmt()
        .with_writer(move || tail.writer())
        .with_target(false)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init()
        .expect("no other tracing subscriber in this test binary");
}

/// Asks a VMM the test stopped waiting for to shut down (SIGTERM), killing it if it is
/// still there after 10 s; the caller then reaps it.
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a process exit status means for `genos-vmm` (statuses in `docs/vmm.md`).
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    const KNOWN: [ExitStatus; 7] = [
        ExitStatus::Ok,
        ExitStatus::InternalError,
        ExitStatus::BadConfig,
        ExitStatus::Reboot,
        ExitStatus::TripleFault,
        ExitStatus::GuestPanic,
        ExitStatus::EmulationFailure,
    ];
    match (status.code(), status.signal()) {
        (Some(code), _) => match KNOWN.iter().find(|s| s.code() == code) {
            Some(s) => format!("exited with status {code} ({s:?})"),
            None => format!("exited with unknown status {code}"),
        },
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended as {status:?}"),
    }
}

/// Prints a failure report when dropped during a panic: the test's name, how long the boot
/// ran, how the VMM ended (as last recorded with [`BootWatch::set_outcome`]) and the VMM's
/// last [`REPORT_LINES`] log lines. Dropped normally, it prints how long the boot took.
pub struct BootWatch {
    test: &'static str,
    started: Instant,
    log: LogTail,
    outcome: Mutex<String>,
}

impl BootWatch {
    /// Starts timing `test`'s boot; `log` is the VMM's log.
    pub fn new(test: &'static str, log: LogTail) -> Self {
        Self {
            test,
            started: Instant::now(),
            log,
            outcome: Mutex::new("still running (no exit seen)".into()),
        }
    }

    /// Time since the boot started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records how the VMM ended (or that the test stopped it).
    pub fn set_outcome(&self, outcome: impl Into<String>) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = outcome.into();
    }

    /// The failure report, as printed on a panic.
    pub fn report(&self) -> String {
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let lines = self.log.last_lines(REPORT_LINES);
        let mut out = format!(
            "==== {} failed after {:.1} s; VMM: {outcome}\n==== last {} VMM log lines:\n",
            self.test,
            self.elapsed().as_secs_f64(),
            lines.len()
        );
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("==== end of VMM log");
        out
    }
}

impl Drop for BootWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        } else {
            eprintln!(
                "{}: boot checks passed after {:.1} s",
                self.test,
                self.elapsed().as_secs_f64()
            );
        }
    }
}
