//! Helpers for splitting a guest access over registers and regions.

/// The part of the access `[start, start + len)` that falls inside the
/// region `[region, region + region_len)`, as (offset of the part in the
/// access, offset of the part in the region, length); `None` if they do
/// not meet. Saturates instead of wrapping at the end of the address space.
pub(crate) fn overlap(start: u64, len: usize, region: u64, region_len: u64) -> Option<(usize, u64, usize)> {
    let end = start.saturating_add(len as u64);
    let region_end = region.saturating_add(region_len);
    let lo = start.max(region);
    let hi = end.min(region_end);
    if lo >= hi {
        return None;
    }
    Some(((lo - start) as usize, lo - region, (hi - lo) as usize))
}

/// True if the access `[start, start + len)` touches any byte of
/// `[region, region + region_len)`.
pub(crate) fn touches(start: u64, len: usize, region: u64, region_len: u64) -> bool {
    overlap(start, len, region, region_len).is_some()
}

/// Copies the bytes of the little-endian `value`, a register of
/// `reg_len` bytes at `reg`, that the read `[start, start + data.len())`
/// covers into `data`.
pub(crate) fn read_register(start: u64, data: &mut [u8], reg: u64, reg_len: u64, value: u64) {
    if let Some((at, in_reg, n)) = overlap(start, data.len(), reg, reg_len) {
        let bytes = value.to_le_bytes();
        let in_reg = in_reg as usize;
        data[at..at + n].copy_from_slice(&bytes[in_reg..in_reg + n]);
    }
}

/// Merges the bytes of the write `[start, start + data.len())` that fall in
/// the register of `reg_len` bytes at `reg` into its current value `old`;
/// `None` if the write does not touch the register.
pub(crate) fn merge_register(start: u64, data: &[u8], reg: u64, reg_len: u64, old: u64) -> Option<u64> {
    let (at, in_reg, n) = overlap(start, data.len(), reg, reg_len)?;
    let mut bytes = old.to_le_bytes();
    let in_reg = in_reg as usize;
    bytes[in_reg..in_reg + n].copy_from_slice(&data[at..at + n]);
    Some(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps() {
        assert_eq!(overlap(0, 4, 2, 4), Some((2, 0, 2)));
        assert_eq!(overlap(4, 4, 0, 6), Some((0, 4, 2)));
        assert_eq!(overlap(0, 4, 4, 4), None);
        assert_eq!(overlap(u64::MAX - 1, 8, u64::MAX - 2, 8), Some((0, 1, 1)));
        assert_eq!(overlap(0, 0, 0, 4), None);
    }

    #[test]
    fn registers() {
        let mut d = [0u8; 4];
        read_register(0x12, &mut d, 0x14, 2, 0xbeef);
        assert_eq!(d, [0, 0, 0xef, 0xbe]);
        assert_eq!(merge_register(0x15, &[0xaa, 0xbb], 0x14, 2, 0x1234), Some(0xaa34));
        assert_eq!(merge_register(0x16, &[0xaa], 0x14, 2, 0x1234), None);
    }
}
