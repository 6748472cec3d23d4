//! Address-range buses for port I/O and MMIO exits.
//!
//! A vCPU thread that takes an I/O or MMIO exit looks the address up here and calls the
//! device with the offset inside the device's range. Devices are shared between vCPU
//! threads and the event loop, hence `Arc<Mutex<_>>`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device on a bus must do: answer reads and take writes at an offset inside its
/// range. `base` is the start of the range, for devices mapped more than once.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already inserted.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A zero-length range was requested.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// A map from non-overlapping address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<Range, Arc<Mutex<dyn BusDevice>>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps = self
            .devices
            .keys()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(Range { base, len }, device);
        Ok(())
    }

    /// The device covering `addr`, with its range base.
    pub fn get(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (range, dev) = self
            .devices
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        (addr - range.base < range.len).then_some((range.base, dev))
    }

    /// Dispatches a read. Returns false when no device covers `addr` (the caller decides
    /// what an unclaimed access means; reads of unclaimed ports conventionally return all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get(addr) {
            Some((base, dev)) => {
                // A poisoned lock means a device panicked; keep serving rather than
                // cascading the panic into every vCPU thread.
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get(addr) {
            Some((base, dev)) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_to_the_device_covering_the_address_with_its_offset() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();

        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert!(bus.write(0x3f9, &[7]));

        assert_eq!(buf, [5]);
        assert_eq!(dev.lock().unwrap().0, vec![(0x3f8, 1, vec![7])]);
    }

    #[test]
    fn unclaimed_addresses_are_reported() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder(Vec::new()))), 0x100, 0x10)
            .unwrap();
        assert!(!bus.read(0xff, &mut [0]));
        assert!(!bus.write(0x110, &[0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert_eq!(bus.insert(dev, 0x200, 0), Err(BusError::ZeroLength(0x200)));
    }
}
