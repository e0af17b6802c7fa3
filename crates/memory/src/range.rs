//! Half-open guest-physical address ranges.

use std::fmt;

/// A half-open range `[start, start + len)` of guest-physical addresses.
///
/// A `GuestRange` never wraps: [`GuestRange::new`] refuses ranges whose end
/// would overflow `u64`, so `end()` is always exact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GuestRange {
    start: u64,
    len: u64,
}

impl GuestRange {
    /// The range `[start, start + len)`, or `None` if its end overflows
    /// `u64`. (The end may be exactly 2^64, which is not representable, so
    /// a range touching the last byte of the address space is refused too.)
    pub const fn new(start: u64, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(_) => Some(Self { start, len }),
            None => None,
        }
    }

    /// The range `[start, end)`, or `None` if `end < start`.
    pub const fn from_bounds(start: u64, end: u64) -> Option<Self> {
        if end < start {
            None
        } else {
            Some(Self {
                start,
                len: end - start,
            })
        }
    }

    /// First address.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// True if the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the last address.
    pub const fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True if `other` lies entirely inside `self`. An empty `other` is
    /// contained if its start lies in `[start, end]`.
    pub const fn contains(&self, other: &GuestRange) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }

    /// True if the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &GuestRange) -> bool {
        self.start < other.end() && other.start < self.end() && !self.is_empty() && !other.is_empty()
    }

    /// The bytes both ranges share, or `None` when they share none.
    pub fn intersection(&self, other: &GuestRange) -> Option<GuestRange> {
        let start = self.start.max(other.start);
        let end = self.end().min(other.end());
        (start < end).then(|| GuestRange {
            start,
            len: end - start,
        })
    }

    /// True if both start and length are multiples of `align` (a power of two).
    pub const fn is_aligned(&self, align: u64) -> bool {
        debug_assert!(align.is_power_of_two());
        (self.start | self.len) & (align - 1) == 0
    }
}

impl fmt::Debug for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_refuses_overflow() {
        assert!(GuestRange::new(u64::MAX, 1).is_none());
        assert!(GuestRange::new(u64::MAX - 9, 10).is_none());
        assert_eq!(GuestRange::new(u64::MAX - 10, 10).unwrap().end(), u64::MAX);
        assert!(GuestRange::from_bounds(10, 9).is_none());
    }

    #[test]
    fn set_operations() {
        let a = GuestRange::new(0x1000, 0x2000).unwrap();
        let b = GuestRange::new(0x2000, 0x2000).unwrap();
        assert!(a.overlaps(&b));
        assert_eq!(a.intersection(&b), GuestRange::new(0x2000, 0x1000));
        let c = GuestRange::new(0x3000, 0x10).unwrap();
        assert!(!a.overlaps(&c));
        assert_eq!(a.intersection(&c), None);
        assert!(a.contains(&GuestRange::new(0x1000, 0x2000).unwrap()));
        assert!(!a.contains(&GuestRange::new(0x1000, 0x2001).unwrap()));
        assert_eq!(format!("{a}"), "[0x1000, 0x3000)");
        assert!(a.is_aligned(0x1000));
        assert!(!a.is_aligned(0x2000));
    }
}
