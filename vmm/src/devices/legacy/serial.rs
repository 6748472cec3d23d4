//! COM1 8250/16550A UART (vm-superio) with output to stdout, a file or nowhere, its
//! interrupt on an irqfd, and optional input from a host fd (normally stdin).
//!
//! Input flows through the VMM's event loop: when the input fd is readable, at most as
//! many bytes as the UART's receive FIFO can hold are moved into it. When the FIFO is
//! full the input fd is taken off the epoll set until the guest drains the FIFO (the
//! UART model reports that through `SerialEvents::in_buffer_empty`, which we turn into
//! an eventfd), so a guest that never reads cannot make the VMM spin or drop input.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
#[cfg(test)]
use crate::devices::DeviceMetrics as _;

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Sink,
}

/// Errors opening the serial output.
#[derive(Debug, thiserror::Error)]
pub enum SerialOutputError {
    /// The console file could not be opened.
    #[error("cannot open serial output file {path}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl SerialOutput {
    /// Opens the writer the UART sends guest output to.
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialOutputError> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| SerialOutputError::OpenFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
            SerialOutput::Sink => Box::new(io::sink()),
        })
    }
}

/// Counters of the UART, updated by the vm-superio model through [`SerialEvents`].
#[derive(Debug)]
pub struct SerialMetrics {
    /// Bytes the guest wrote that reached the output.
    pub bytes_out: AtomicU64,
    /// Bytes the guest wrote that the output refused.
    pub bytes_lost: AtomicU64,
    /// Bytes the guest read from the receive FIFO.
    pub bytes_read_by_guest: AtomicU64,
    /// Bytes moved from the input fd into the receive FIFO.
    pub bytes_in: AtomicU64,
    /// Interrupts that could not be raised.
    pub interrupt_failures: AtomicU64,
    /// Written when the guest empties the receive FIFO, to resume reading input.
    in_buffer_empty: EventFd,
}

impl SerialMetrics {
    fn new() -> io::Result<Self> {
        Ok(Self {
            bytes_out: AtomicU64::new(0),
            bytes_lost: AtomicU64::new(0),
            bytes_read_by_guest: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            interrupt_failures: AtomicU64::new(0),
            in_buffer_empty: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
}

impl crate::devices::DeviceMetrics for SerialMetrics {
    fn snapshot(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Snapshot {
            bytes_out: u64,
            bytes_lost: u64,
            bytes_read_by_guest: u64,
            bytes_in: u64,
            interrupt_failures: u64,
        }
        serde_json::to_value(Snapshot {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_lost: self.bytes_lost.load(Ordering::Relaxed),
            bytes_read_by_guest: self.bytes_read_by_guest.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            interrupt_failures: self.interrupt_failures.load(Ordering::Relaxed),
        })
        .unwrap_or_default()
    }
}

impl SerialEvents for SerialMetrics {
    fn buffer_read(&self) {
        self.bytes_read_by_guest.fetch_add(1, Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.bytes_out.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        // Failure only means the counter is saturated, i.e. a wake-up is already pending.
        let _ = self.in_buffer_empty.write(1);
    }
}

/// A host fd the UART takes guest input from.
pub trait SerialInput: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> SerialInput for T {}

type Uart = vm_superio::Serial<EventFdTrigger, Arc<SerialMetrics>, Box<dyn Write + Send>>;

/// Largest chunk moved from the input fd per event: the 16550A FIFO holds 64 bytes.
const INPUT_CHUNK: usize = 64;

/// The UART's registers and receive FIFO, as a snapshot keeps them (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    divisor_low: u8,
    divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The COM1 UART on the port-I/O bus (8 ports from 0x3f8).
pub struct Serial {
    uart: Uart,
    metrics: Arc<SerialMetrics>,
    input: Option<Box<dyn SerialInput>>,
    /// The input fd is off the epoll set because the FIFO is full.
    input_paused: bool,
}

impl Serial {
    /// A UART raising its interrupt through `interrupt` (an irqfd), writing guest output
    /// to `out` and, when `input` is given, feeding the guest what arrives there.
    pub fn new(
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        input: Option<Box<dyn SerialInput>>,
    ) -> io::Result<Self> {
        let metrics = Arc::new(SerialMetrics::new()?);
        Ok(Self {
            uart: vm_superio::Serial::with_events(
                EventFdTrigger::new(interrupt),
                metrics.clone(),
                out,
            ),
            metrics,
            input,
            input_paused: false,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> SerialState {
        self.uart.state().into()
    }

    /// A UART in the snapshotted `state`, otherwise like [`Serial::new`]. An interrupt
    /// the state has pending is raised again. Refuses a FIFO longer than the UART's.
    pub fn restore(
        state: &SerialState,
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        input: Option<Box<dyn SerialInput>>,
    ) -> io::Result<Self> {
        let metrics = Arc::new(SerialMetrics::new()?);
        let uart = vm_superio::Serial::from_state(
            &state.into(),
            EventFdTrigger::new(interrupt),
            metrics.clone(),
            out,
        )
        .map_err(|e| io::Error::other(format!("invalid serial state: {e:?}")))?;
        Ok(Self {
            uart,
            metrics,
            input,
            input_paused: false,
        })
    }

    /// Moves what the input fd has (up to the FIFO's free space) into the FIFO.
    /// Returns false when the input is finished (EOF or a hard error).
    fn pull_input(&mut self) -> bool {
        let Some(input) = self.input.as_mut() else {
            return false;
        };
        let room = self.uart.fifo_capacity().min(INPUT_CHUNK);
        let mut buf = [0u8; INPUT_CHUNK];
        match input.read(&mut buf[..room]) {
            Ok(0) => false,
            Ok(n) => {
                match self.uart.enqueue_raw_bytes(&buf[..n]) {
                    Ok(queued) => {
                        self.metrics
                            .bytes_in
                            .fetch_add(queued as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.metrics
                            .interrupt_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("serial: cannot queue guest input: {e:?}");
                    }
                }
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(e) => {
                tracing::warn!("serial: input closed after read error: {e}");
                false
            }
        }
    }

    fn handle_input_ready(&mut self, ops: &mut EventOps) {
        if self.uart.fifo_capacity() == 0 {
            if let Some(input) = &self.input {
                let _ = ops.remove(Events::new(&input.as_raw_fd(), EventSet::IN));
            }
            self.input_paused = true;
            return;
        }
        if !self.pull_input() {
            if let Some(input) = self.input.take() {
                let _ = ops.remove(Events::new(&input.as_raw_fd(), EventSet::IN));
            }
        }
    }

    fn handle_buffer_empty(&mut self, ops: &mut EventOps) {
        let _ = self.metrics.in_buffer_empty.read();
        if !self.input_paused {
            return;
        }
        if let Some(input) = &self.input {
            if let Err(e) = ops.add(Events::new(&input.as_raw_fd(), EventSet::IN)) {
                tracing::warn!("serial: cannot resume input: {e}");
                return;
            }
        }
        self.input_paused = false;
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.uart.read(offset),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (&[value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        match self.uart.write(offset, value) {
            Ok(()) => {}
            // The model already counted the lost byte (tx_lost_byte).
            Err(vm_superio::serial::Error::IOError(_)) => {}
            Err(e) => {
                self.metrics
                    .interrupt_failures
                    .fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!("serial: {e:?}");
            }
        }
    }
}

impl MutEventSubscriber for Serial {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(input) = &self.input {
            if let Err(e) = ops.add(Events::new(&input.as_raw_fd(), EventSet::IN)) {
                tracing::warn!("serial: cannot watch input: {e}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.metrics.in_buffer_empty, EventSet::IN)) {
            tracing::warn!("serial: cannot watch the receive FIFO: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.metrics.in_buffer_empty.as_raw_fd() {
            self.handle_buffer_empty(ops);
        } else if self.input.as_ref().map(|i| i.as_raw_fd()) == Some(fd) {
            self.handle_input_ready(ops);
        }
    }
}

/// Opens a duplicate of the VMM's stdin as serial input. A duplicate (not `io::stdin()`)
/// because `Stdin` buffers internally, which would hide pending bytes from epoll.
pub fn stdin_input() -> io::Result<Box<dyn SerialInput>> {
    use std::os::fd::AsFd;
    Ok(Box::new(File::from(
        io::stdin().as_fd().try_clone_to_owned()?,
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const IER_THR_EMPTY: u8 = 0x02;
    const IER_DATA_READY: u8 = 0x01;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial_with(
        out: Box<dyn Write + Send>,
        input: Option<Box<dyn SerialInput>>,
    ) -> (Serial, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Serial::new(irq.try_clone().unwrap(), out, input).unwrap();
        (serial, irq)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        serial.read(0x3f8, offset, &mut b);
        b[0]
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers_and_unread_input() {
        let (mut serial, _irq) = serial_with(Box::new(io::sink()), None);
        serial.write(0x3f8, IER, &[IER_DATA_READY]);
        serial.write(0x3f8, 7, &[0x5a]); // scratch
        serial.uart.enqueue_raw_bytes(b"ab").unwrap();
        let saved = serial.save();
        let json = serde_json::to_vec(&saved).unwrap();

        let state: SerialState = serde_json::from_slice(&json).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = Serial::restore(&state, irq, Box::new(io::sink()), None).unwrap();

        assert_eq!(read_reg(&mut restored, IER), IER_DATA_READY);
        assert_eq!(read_reg(&mut restored, 7), 0x5a);
        assert_ne!(read_reg(&mut restored, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut restored, THR), b'a');
        assert_eq!(read_reg(&mut restored, THR), b'b');
        assert_eq!(read_reg(&mut restored, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn a_saved_fifo_longer_than_the_uarts_is_refused() {
        let state = SerialState {
            in_buffer: vec![0; 65],
            ..Default::default()
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();

        let err = Serial::restore(&state, irq, Box::new(io::sink()), None).err();

        assert!(err.is_some());
    }

    #[test]
    fn guest_writes_to_thr_reach_the_output() {
        let out = Captured::default();
        let (mut serial, _irq) = serial_with(Box::new(out.clone()), None);

        for b in b"hello\n" {
            serial.write(0x3f8, THR, &[*b]);
        }

        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        assert_eq!(serial.metrics().snapshot()["bytes_out"], 6);
    }

    #[test]
    fn transmitter_always_reads_as_empty() {
        let (mut serial, _irq) = serial_with(Box::new(io::sink()), None);
        serial.write(0x3f8, THR, b"x");
        assert_ne!(read_reg(&mut serial, LSR) & LSR_THR_EMPTY, 0);
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn enabling_thr_empty_interrupt_raises_the_irq() {
        let (mut serial, irq) = serial_with(Box::new(io::sink()), None);

        serial.write(0x3f8, IER, &[IER_THR_EMPTY]);

        assert_eq!(irq.read().unwrap(), 1);
        // IIR reports "THR empty" (0x2) with the FIFO bits set.
        assert_eq!(read_reg(&mut serial, IIR) & 0x0f, 0x02);
    }

    #[test]
    fn output_failures_are_counted_not_fatal() {
        let (mut serial, _irq) = serial_with(Box::new(Broken), None);
        serial.write(0x3f8, THR, b"x");
        assert_eq!(serial.metrics().snapshot()["bytes_lost"], 1);
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_ignored() {
        let out = Captured::default();
        let (mut serial, _irq) = serial_with(Box::new(out.clone()), None);
        serial.write(0x3f8, THR, b"ab");
        serial.write(0x3f8, 0x1_0000, b"a");
        let mut wide = [0u8; 2];
        serial.read(0x3f8, LSR, &mut wide);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn input_fd_bytes_reach_the_guest_through_the_event_loop() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let (mut serial, irq) = serial_with(Box::new(io::sink()), Some(Box::new(guest_side)));
        serial.write(0x3f8, IER, &[IER_DATA_READY]);
        let _ = irq.read();
        let serial = Arc::new(Mutex::new(serial));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(serial.clone());

        host.write_all(b"ok").unwrap();
        em.run_with_timeout(1000).unwrap();

        let mut s = serial.lock().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(read_reg(&mut s, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut s, THR), b'o');
        assert_eq!(read_reg(&mut s, THR), b'k');
        assert_eq!(read_reg(&mut s, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_pauses_while_the_fifo_is_full_and_resumes_when_drained() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let (serial, _irq) = serial_with(Box::new(io::sink()), Some(Box::new(guest_side)));
        let serial = Arc::new(Mutex::new(serial));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(serial.clone());

        let sent: Vec<u8> = (0..100u8).collect();
        host.write_all(&sent).unwrap();
        // First event fills the FIFO (64 bytes), the next one finds it full and pauses.
        em.run_with_timeout(1000).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert!(serial.lock().unwrap().input_paused);
        // Nothing else is ready: the loop must not spin on the still-readable input.
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);

        let mut received = Vec::new();
        for _ in 0..64 {
            received.push(read_reg(&mut serial.lock().unwrap(), THR));
        }
        // FIFO drained => resume event, then input event moves the remaining 36 bytes.
        em.run_with_timeout(1000).unwrap();
        em.run_with_timeout(1000).unwrap();
        for _ in 0..36 {
            received.push(read_reg(&mut serial.lock().unwrap(), THR));
        }

        assert_eq!(received, sent);
        assert_eq!(serial.lock().unwrap().metrics().snapshot()["bytes_in"], 100);
    }

    #[test]
    fn input_eof_unregisters_the_input() {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let (serial, _irq) = serial_with(Box::new(io::sink()), Some(Box::new(guest_side)));
        let serial = Arc::new(Mutex::new(serial));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(serial.clone());

        drop(host);
        em.run_with_timeout(1000).unwrap();

        assert!(serial.lock().unwrap().input.is_none());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn file_output_is_created() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.log");
        let out = SerialOutput::File(path.clone()).open().unwrap();
        let (mut serial, _irq) = serial_with(out, None);

        serial.write(0x3f8, THR, b"Z");

        assert_eq!(std::fs::read(&path).unwrap(), b"Z");
    }

    #[test]
    fn unopenable_output_file_names_the_path() {
        let err = SerialOutput::File("/nonexistent/dir/console".into())
            .open()
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/console"));
    }
}
