//! BAR placement before boot. memvisor boots Linux without firmware, so
//! the VMM assigns every BAR itself; Linux keeps assignments that lie in
//! the host bridge's windows (it only sizes the BARs, restoring them).

use std::ops::Range;

use crate::PciError;

/// One address window, filled from the bottom.
#[derive(Debug, Clone)]
struct Window {
    range: Range<u64>,
    next: u64,
}

impl Window {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let start = self.next.checked_next_multiple_of(size)?;
        let end = start.checked_add(size)?;
        if end > self.range.end {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

/// Places BARs at naturally aligned addresses in a 32-bit window (below
/// 4 GiB) and a 64-bit window. A 64-bit BAR goes to the 64-bit window, or
/// to the 32-bit one when the 64-bit window has no room; a 32-bit BAR only
/// to the 32-bit window. A bump allocator: placing the largest BARs first
/// (as [`PciRoot::assign_bars`](crate::PciRoot::assign_bars) does) wastes
/// no space on alignment.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    mmio32: Window,
    mmio64: Window,
}

impl BarAllocator {
    /// An allocator over `mmio32` (which must end at or below 4 GiB) and
    /// `mmio64` (may be empty).
    pub fn new(mmio32: Range<u64>, mmio64: Range<u64>) -> Result<Self, PciError> {
        for (window, reason) in [
            (&mmio32, "the 32-bit window ends before it starts"),
            (&mmio64, "the 64-bit window ends before it starts"),
        ] {
            if window.start > window.end {
                return Err(PciError::InvalidWindow {
                    start: window.start,
                    end: window.end,
                    reason,
                });
            }
        }
        if mmio32.end > 1 << 32 {
            return Err(PciError::InvalidWindow {
                start: mmio32.start,
                end: mmio32.end,
                reason: "the 32-bit window reaches above 4 GiB",
            });
        }
        Ok(Self {
            mmio32: Window {
                next: mmio32.start,
                range: mmio32,
            },
            mmio64: Window {
                next: mmio64.start,
                range: mmio64,
            },
        })
    }

    /// An address for a BAR of `size` bytes (a power of two, at least 16),
    /// aligned to its size.
    pub fn allocate(&mut self, size: u64, is_64bit: bool) -> Result<u64, PciError> {
        if size < 16 || !size.is_power_of_two() {
            return Err(PciError::InvalidBarSize { size, max: 1 << 63 });
        }
        if is_64bit {
            self.mmio64
                .allocate(size)
                .or_else(|| self.mmio32.allocate(size))
                .ok_or(PciError::OutOfBarSpace {
                    size,
                    window: "64-bit and 32-bit",
                })
        } else {
            self.mmio32
                .allocate(size)
                .ok_or(PciError::OutOfBarSpace { size, window: "32-bit" })
        }
    }

    /// The 32-bit window.
    pub fn mmio32(&self) -> Range<u64> {
        self.mmio32.range.clone()
    }

    /// The 64-bit window.
    pub fn mmio64(&self) -> Range<u64> {
        self.mmio64.range.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_alignment_and_windows() {
        let mut a = BarAllocator::new(0xc000_1000..0xc010_0000, 0x1_0000_0000..0x1_0001_0000).unwrap();
        assert_eq!(a.allocate(0x1000, false).unwrap(), 0xc000_1000);
        assert_eq!(a.allocate(0x8000, false).unwrap(), 0xc000_8000);
        assert_eq!(a.allocate(0x10, false).unwrap(), 0xc001_0000);
        assert_eq!(a.allocate(0x8000, true).unwrap(), 0x1_0000_0000);
        assert_eq!(a.allocate(0x8000, true).unwrap(), 0x1_0000_8000);
        // The 64-bit window is full: the 32-bit one takes the BAR.
        assert_eq!(a.allocate(0x8000, true).unwrap(), 0xc001_8000);
        assert!(matches!(
            a.allocate(0x100_0000, false),
            Err(PciError::OutOfBarSpace {
                size: 0x100_0000,
                window: "32-bit"
            })
        ));
        assert!(matches!(
            a.allocate(0x100_0000, true),
            Err(PciError::OutOfBarSpace { .. })
        ));
        assert!(matches!(
            a.allocate(0x1800, false),
            Err(PciError::InvalidBarSize { size: 0x1800, .. })
        ));
        assert!(matches!(
            a.allocate(0, true),
            Err(PciError::InvalidBarSize { size: 0, .. })
        ));
    }

    #[test]
    fn window_validation_and_overflow() {
        assert!(matches!(
            BarAllocator::new(0xc000_0000..0x1_0000_1000, 0..0),
            Err(PciError::InvalidWindow { end: 0x1_0000_1000, .. })
        ));
        let (start, end) = (0x2000, 0x1000);
        assert!(matches!(
            BarAllocator::new(start..end, 0..0),
            Err(PciError::InvalidWindow { start: 0x2000, .. })
        ));
        let mut a = BarAllocator::new(0..0, u64::MAX - 0xffff..u64::MAX).unwrap();
        assert_eq!(a.allocate(0x8000, true).unwrap(), u64::MAX - 0xffff);
        assert!(a.allocate(1 << 62, true).is_err());
        assert!(
            a.allocate(0x8000, true).is_err(),
            "the end of the address space is not wrapped past"
        );
    }
}
