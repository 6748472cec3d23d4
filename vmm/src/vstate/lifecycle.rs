//! How a VM ends, and the process exit status for each way (see `docs/vmm.md`).
//!
//! vCPU threads, the i8042 reset, the console watcher and the control plane all report
//! through one [`ExitSignal`]: the first report wins and wakes the main thread's event
//! loop through an eventfd. Kernel panics are recognised on the console: Linux prints
//! `Kernel panic - not syncing` and then, with `panic=-1`, resets the machine, so a reset
//! after that line is a panic, not a reboot. Without ACPI a guest "power off" ends in the
//! kernel printing `reboot: System halted` (or `reboot: Power down`) and halting all CPUs,
//! which the watcher reports as a poweroff.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Process exit status of `genos-vmm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitStatus {
    /// Guest powered off, or stopped through the API or SIGTERM.
    Ok = 0,
    /// The VMM itself failed.
    InternalError = 1,
    /// Bad arguments, configuration or files.
    BadConfig = 2,
    /// The guest rebooted (i8042 reset or KVM reset event).
    Reboot = 3,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 4,
    /// The guest kernel panicked.
    GuestPanic = 5,
    /// KVM could not emulate a guest instruction and the VMM could not complete it.
    EmulationFailure = 6,
}

impl ExitStatus {
    /// The numeric process exit status.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Why the VM ended, with a message for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    /// Exit status.
    pub status: ExitStatus,
    /// Human-readable reason.
    pub reason: String,
}

impl VmExit {
    /// A VM exit with `status` and `reason`.
    pub fn new(status: ExitStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// The one place a VM's end is recorded. Shared by vCPU threads and the main thread.
pub struct ExitSignal {
    exit: Mutex<Option<VmExit>>,
    panic_seen: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal with no exit recorded.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exit: Mutex::new(None),
            panic_seen: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Eventfd written when an exit is recorded (register it readable in the event loop).
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// Records `exit` unless one is already recorded, and wakes the main thread. A reboot
    /// or triple fault after a kernel panic message is recorded as a panic.
    pub fn report(&self, mut exit: VmExit) {
        if self.panic_seen.load(Ordering::SeqCst)
            && matches!(exit.status, ExitStatus::Reboot | ExitStatus::TripleFault)
        {
            exit = VmExit::new(
                ExitStatus::GuestPanic,
                format!("guest kernel panic (then {})", exit.reason),
            );
        }
        let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
            // A full eventfd counter still wakes the loop; nothing else can fail here.
            let _ = self.evt.write(1);
        }
    }

    /// Notes that the guest kernel announced a panic on its console.
    pub fn note_panic(&self) {
        self.panic_seen.store(true, Ordering::SeqCst);
    }

    /// The recorded exit, if any.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counts of vCPU exits by kind, shared by all vCPU threads.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Port accesses no device claimed.
    pub io_unclaimed: AtomicU64,
    /// MMIO accesses no device claimed.
    pub mmio_unclaimed: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Triple faults.
    pub shutdown: AtomicU64,
    /// KVM system events (reset, shutdown, crash).
    pub system_event: AtomicU64,
    /// KVM internal errors, emulation failures included.
    pub internal_error: AtomicU64,
    /// Emulation failures the VMM completed (INT3).
    pub emulation_completed: AtomicU64,
    /// KVM_RUN interrupted by a signal (pause, stop).
    pub interrupted: AtomicU64,
    /// Failed VM entries.
    pub fail_entry: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A JSON object of all counters.
    pub fn snapshot(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "io_in": get(&self.io_in),
            "io_out": get(&self.io_out),
            "mmio_read": get(&self.mmio_read),
            "mmio_write": get(&self.mmio_write),
            "io_unclaimed": get(&self.io_unclaimed),
            "mmio_unclaimed": get(&self.mmio_unclaimed),
            "hlt": get(&self.hlt),
            "shutdown": get(&self.shutdown),
            "system_event": get(&self.system_event),
            "internal_error": get(&self.internal_error),
            "emulation_completed": get(&self.emulation_completed),
            "interrupted": get(&self.interrupted),
            "fail_entry": get(&self.fail_entry),
            "other": get(&self.other),
        })
    }
}

/// What the console watcher saw in one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `Kernel panic - not syncing`: a reset that follows is a panic.
    PanicStarted,
    /// `---[ end Kernel panic`: the kernel panicked and will not reset (`panic=0`).
    PanicHalted,
    /// `reboot: System halted` / `reboot: Power down`: the guest powered off.
    PoweredOff,
}

/// Longest line the watcher keeps; kernel markers are near the start of their line.
const MAX_LINE: usize = 256;

/// Sans-IO scanner for kernel lifecycle messages in the console byte stream.
#[derive(Debug, Default)]
pub struct ConsoleWatcher {
    line: Vec<u8>,
}

impl ConsoleWatcher {
    /// Feeds console output; returns the events of every line completed by `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if let Some(ev) = Self::classify(&self.line) {
                    events.push(ev);
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        events
    }

    fn classify(line: &[u8]) -> Option<ConsoleEvent> {
        let has = |needle: &[u8]| line.windows(needle.len()).any(|w| w == needle);
        if has(b"---[ end Kernel panic") {
            Some(ConsoleEvent::PanicHalted)
        } else if has(b"Kernel panic - not syncing") {
            Some(ConsoleEvent::PanicStarted)
        } else if has(b"reboot: System halted") || has(b"reboot: Power down") {
            Some(ConsoleEvent::PoweredOff)
        } else {
            None
        }
    }
}

/// A console writer that passes everything to `inner` and reports lifecycle messages to
/// an [`ExitSignal`].
pub struct ConsoleTap<W> {
    inner: W,
    watcher: ConsoleWatcher,
    signal: std::sync::Arc<ExitSignal>,
}

impl<W> ConsoleTap<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, signal: std::sync::Arc<ExitSignal>) -> Self {
        Self {
            inner,
            watcher: ConsoleWatcher::default(),
            signal,
        }
    }
}

impl<W: std::io::Write> std::io::Write for ConsoleTap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Watch what the guest sent even when the host side fails to take it.
        for ev in self.watcher.feed(buf) {
            match ev {
                ConsoleEvent::PanicStarted => self.signal.note_panic(),
                ConsoleEvent::PanicHalted => self
                    .signal
                    .report(VmExit::new(ExitStatus::GuestPanic, "guest kernel panic")),
                ConsoleEvent::PoweredOff => self
                    .signal
                    .report(VmExit::new(ExitStatus::Ok, "guest powered off")),
            }
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn watcher_finds_markers_after_timestamps_and_across_writes() {
        let mut w = ConsoleWatcher::default();
        assert!(w.feed(b"[    1.000] Kernel pan").is_empty());
        assert_eq!(
            w.feed(b"ic - not syncing: VFS\r\n"),
            vec![ConsoleEvent::PanicStarted]
        );
        assert_eq!(
            w.feed(b"[ 2.0] reboot: System halted\n[ 2.1] ---[ end Kernel panic - not syncing: x ]---\n"),
            vec![ConsoleEvent::PoweredOff, ConsoleEvent::PanicHalted]
        );
        assert!(w.feed(b"Run /init as init process\n").is_empty());
    }

    #[test]
    fn overlong_lines_do_not_grow_the_buffer() {
        let mut w = ConsoleWatcher::default();
        w.feed(&vec![b'x'; 10_000]);
        assert_eq!(w.line.len(), MAX_LINE);
        assert!(w.feed(b"\n").is_empty());
    }

    #[test]
    fn first_report_wins_and_wakes_the_loop() {
        let s = ExitSignal::new().unwrap();
        s.report(VmExit::new(ExitStatus::Reboot, "i8042 reset"));
        s.report(VmExit::new(ExitStatus::Ok, "later"));
        assert_eq!(s.exit().unwrap().status, ExitStatus::Reboot);
        assert_eq!(s.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn reset_after_panic_message_is_a_panic() {
        let s = Arc::new(ExitSignal::new().unwrap());
        let mut tap = ConsoleTap::new(Vec::new(), s.clone());
        tap.write_all(b"Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert!(s.exit().is_none());
        s.report(VmExit::new(ExitStatus::Reboot, "i8042 reset"));
        assert_eq!(s.exit().unwrap().status, ExitStatus::GuestPanic);
        assert!(tap.inner.starts_with(b"Kernel panic"));
    }

    #[test]
    fn halt_message_is_a_poweroff() {
        let s = Arc::new(ExitSignal::new().unwrap());
        let mut tap = ConsoleTap::new(std::io::sink(), s.clone());
        tap.write_all(b"[   70.1] reboot: System halted\n").unwrap();
        assert_eq!(s.exit().unwrap().status, ExitStatus::Ok);
    }
}
