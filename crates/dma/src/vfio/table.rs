//! The table of a container's live mappings, which lets the mapper refuse
//! overlaps and splits before the kernel sees them and keep its counts
//! exact.

use std::collections::BTreeMap;

use crate::mapper::DmaError;

/// The live mappings of one container: IOVA → length and host address
/// (what the pin budget releases). Pure bookkeeping,
/// no system calls; ranges are handled as inclusive ends so the top of the
/// address space is reachable without overflow.
#[derive(Debug, Default)]
pub(super) struct MappingTable {
    mappings: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
}

impl MappingTable {
    /// Refuses `[iova, last]` if it overlaps a live mapping.
    pub(super) fn check_free(&self, iova: u64, last: u64, len: u64) -> Result<(), DmaError> {
        match self.mappings.range(..=last).next_back() {
            Some((&start, &(mlen, _))) if start + (mlen - 1) >= iova => Err(DmaError::Overlap {
                iova,
                len,
                existing: start,
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn insert(&mut self, iova: u64, len: u64, host: u64) {
        let previous = self.mappings.insert(iova, (len, host));
        debug_assert!(previous.is_none(), "checked free before inserting");
        self.bytes += len;
    }

    /// Removes the mapping at `iova`: its length and host address.
    pub(super) fn remove(&mut self, iova: u64) -> Option<(u64, u64)> {
        let (len, host) = self.mappings.remove(&iova)?;
        self.bytes -= len;
        Some((len, host))
    }

    /// The mappings an unmap of `[iova, iova + len)` removes, in IOVA
    /// order, or [`DmaError::Split`] if it would cut one.
    pub(super) fn plan_unmap(&self, iova: u64, len: u64) -> Result<Vec<(u64, u64)>, DmaError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = iova.saturating_add(len - 1);
        let split = |start: u64, mapping_len: u64| DmaError::Split {
            iova,
            len,
            start,
            mapping_len,
        };
        if let Some((&start, &(mlen, _))) = self.mappings.range(..iova).next_back()
            && start + (mlen - 1) >= iova
        {
            return Err(split(start, mlen));
        }
        if let Some((&start, &(mlen, _))) = self.mappings.range(iova..=last).next_back()
            && start + (mlen - 1) > last
        {
            return Err(split(start, mlen));
        }
        Ok(self.mappings.range(iova..=last).map(|(&s, &(l, _))| (s, l)).collect())
    }

    pub(super) fn len(&self) -> u64 {
        self.mappings.len() as u64
    }

    /// The bytes mapped: the sum of the live mappings' lengths.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The live mappings as `(iova, len, host)`, in IOVA order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.mappings.iter().map(|(&s, &(l, h))| (s, l, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_table_overlap_split_and_holes() {
        let mut t = MappingTable::default();
        t.check_free(0x2000, 0x3fff, 0x2000).unwrap();
        t.insert(0x2000, 0x2000, 0x7f00_0000_0000 + 0x2000);
        t.insert(0x8000, 0x1000, 0x7f00_0000_0000 + 0x8000);
        assert!(matches!(
            t.check_free(0x3000, 0x3fff, 0x1000),
            Err(DmaError::Overlap { existing: 0x2000, .. })
        ));
        assert!(matches!(
            t.check_free(0x1000, 0x2fff, 0x2000),
            Err(DmaError::Overlap { existing: 0x2000, .. })
        ));
        t.check_free(0x4000, 0x7fff, 0x4000).unwrap();
        t.check_free(0x1000, 0x1fff, 0x1000).unwrap();
        assert!(matches!(
            t.plan_unmap(0x3000, 0x1000),
            Err(DmaError::Split {
                start: 0x2000,
                mapping_len: 0x2000,
                ..
            })
        ));
        assert!(matches!(
            t.plan_unmap(0x0, 0x3000),
            Err(DmaError::Split { start: 0x2000, .. })
        ));
        assert!(matches!(
            t.plan_unmap(0x4000, 0x4800),
            Err(DmaError::Split { start: 0x8000, .. })
        ));
        assert_eq!(t.plan_unmap(0x4000, 0x4000).unwrap(), vec![]);
        assert_eq!(
            t.plan_unmap(0x3000, 0).unwrap(),
            vec![],
            "an empty range removes nothing"
        );
        assert_eq!(
            t.plan_unmap(0, u64::MAX).unwrap(),
            vec![(0x2000, 0x2000), (0x8000, 0x1000)]
        );
        assert_eq!((t.len(), t.bytes), (2, 0x3000));
        assert_eq!(t.remove(0x2000), Some((0x2000, 0x7f00_0000_2000)));
        assert_eq!(t.remove(0x2000), None);
        assert_eq!((t.len(), t.bytes), (1, 0x1000));
    }

    #[test]
    fn vfio_table_reaches_the_top_of_the_address_space() {
        let mut t = MappingTable::default();
        let top = u64::MAX - 0xfff;
        t.check_free(top, u64::MAX, 0x1000).unwrap();
        t.insert(top, 0x1000, 0x7f00_0000_0000);
        assert!(matches!(
            t.check_free(top, u64::MAX, 0x1000),
            Err(DmaError::Overlap { .. })
        ));
        assert_eq!(t.plan_unmap(top - 0x1000, u64::MAX).unwrap(), vec![(top, 0x1000)]);
    }
}
