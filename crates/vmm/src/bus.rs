//! Dispatch of the guest's port I/O and MMIO exits to the devices that own
//! an address range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on an I/O port or MMIO bus. Offsets are relative to the base
/// of the range it was inserted at; `data` is 1, 2, 4 or 8 bytes of any
/// alignment the guest chose.
pub trait BusDevice: Send {
    /// A guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a range could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("bus range [{base:#x}, +{len:#x}) is empty or wraps")]
    Invalid {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range [{base:#x}, +{len:#x}) overlaps [{other:#x}, +{other_len:#x})")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// The existing range's base.
        other: u64,
        /// The existing range's length.
        other_len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each owned by a device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, (l, _))| format!("{b:#x}+{l:#x}")))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, &(other_len, _))) = before
            && other + other_len > base
        {
            return Err(BusError::Overlap {
                base,
                len,
                other,
                other_len,
            });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds the whole access `[addr, addr + len)`,
    /// with the offset of `addr` in it.
    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, (size, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= *size).then_some((device, offset))
    }

    /// Reads through the owning device; false (and `data` untouched) if no
    /// device owns the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes through the owning device; false if no device owns the whole
    /// access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panic on another
/// thread is used as it is (its state is plain registers).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x3f0, 9, a.clone()),
            Err(BusError::Overlap { other: 0x3f8, .. })
        ));
        assert!(matches!(bus.insert(0x3ff, 1, a.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(
            bus.insert(u64::MAX, 2, a.clone()),
            Err(BusError::Invalid { .. })
        ));
        bus.insert(0x400, 1, a.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[7]));
        assert!(!bus.write(0x3ff, &[1, 2]), "an access that crosses the end is nobody's");
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(lock(&a).writes, [(0, vec![7])]);
    }
}
