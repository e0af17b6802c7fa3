//! The mappings of one domain: non-overlapping IOVA intervals in a
//! `BTreeMap` keyed by start, so lookup, overlap detection and UNMAP's
//! "no split" check each cost O(log n) (plus the mappings removed).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

pub use memvisor_iommu::{MapFlags, MappingId};

/// One mapping, as created by a single MAP request: IOVAs
/// `[virt_start, virt_end]` (inclusive) onto guest-physical
/// `[phys_start, phys_start + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA (inclusive).
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// Permissions and memory type.
    pub flags: MapFlags,
    /// True if the notifiers were told of it (every mapping a MAP made).
    /// False for a mapping a state load restored over memory that was no
    /// longer populated — the source ran the `warn` unplug guard, or reset
    /// its memory device before its IOMMU: it exists in its domain, as the
    /// guest sees it, but no notifier was told of it, so nothing pins it,
    /// and every access through it faults while the memory is unplugged.
    /// Replays and unmaps skip it.
    pub notified: bool,
    /// How notifiers know it again ([`MappingId`]): given by the device
    /// when the mapping is made (or restored), unique among its live
    /// mappings, and free again once it is removed.
    pub id: MappingId,
}

impl Mapping {
    /// Bytes covered. The device never records a mapping of the whole
    /// 2^64 space, so this cannot overflow.
    pub fn size(&self) -> u64 {
        self.virt_end - self.virt_start + 1
    }

    /// The guest-physical address `iova` translates to; `iova` must be
    /// inside the mapping.
    pub fn translate(&self, iova: u64) -> u64 {
        self.phys_start + (iova - self.virt_start)
    }
}

/// Why an UNMAP cannot proceed: it would split this mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WouldSplit(pub Mapping);

/// The mappings of one domain; never two overlapping.
#[derive(Debug, Clone, Default)]
pub struct DomainMappings {
    by_start: BTreeMap<u64, Mapping>,
}

impl DomainMappings {
    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// True if there is none.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The mappings in ascending IOVA order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Mapping> + ExactSizeIterator + '_ {
        self.by_start.values()
    }

    /// The mapping containing `iova`.
    pub fn find(&self, iova: u64) -> Option<&Mapping> {
        self.by_start
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.virt_end >= iova)
    }

    /// True if some mapping shares an IOVA with `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // Mappings never overlap, so only the last one starting at or
        // before `end` can reach into the range.
        self.by_start
            .range(..=end)
            .next_back()
            .is_some_and(|(_, m)| m.virt_end >= start)
    }

    /// Adds `mapping`; the caller checked [`overlaps`](Self::overlaps).
    pub fn insert(&mut self, mapping: Mapping) {
        debug_assert!(!self.overlaps(mapping.virt_start, mapping.virt_end));
        self.by_start.insert(mapping.virt_start, mapping);
    }

    /// The mappings an UNMAP of `[start, end]` removes (every mapping
    /// wholly inside it), or the mapping it would split. Holes are fine.
    pub fn covered(&self, start: u64, end: u64) -> Result<Vec<Mapping>, WouldSplit> {
        self.check_unmap(start, end)?;
        Ok(self.by_start.range(start..=end).map(|(_, m)| *m).collect())
    }

    /// `Ok` if an UNMAP of `[start, end]` splits no mapping (so it removes
    /// exactly the mappings wholly inside it), else the mapping it would
    /// split: one reaching `start` from below first, then one reaching past
    /// `end`. Allocation-free [`covered`](Self::covered) without the list.
    pub fn check_unmap(&self, start: u64, end: u64) -> Result<(), WouldSplit> {
        if let Some((_, m)) = self.by_start.range(..start).next_back()
            && m.virt_end >= start
        {
            return Err(WouldSplit(*m));
        }
        // The last mapping starting at or before `end`: if it starts before
        // `start`, the check above saw it end before `start`.
        match self.by_start.range(..=end).next_back() {
            Some((_, m)) if m.virt_start >= start && m.virt_end > end => Err(WouldSplit(*m)),
            _ => Ok(()),
        }
    }

    /// Removes and returns the mapping with the lowest start in
    /// `[start, end]`. After [`check_unmap`](Self::check_unmap) said `Ok`,
    /// calling this until `None` performs the UNMAP in ascending order.
    pub fn remove_first_in(&mut self, start: u64, end: u64) -> Option<Mapping> {
        let (&key, _) = self.by_start.range(start..=end).next()?;
        self.by_start.remove(&key)
    }

    /// Removes and returns the mapping that is exactly `[start, end]`, if
    /// there is one: the whole of an UNMAP of `[start, end]` then (no other
    /// mapping can lie in it or reach into it), found with one search
    /// instead of the general path's several. Guests mostly unmap exactly
    /// what they mapped.
    pub fn remove_exact(&mut self, start: u64, end: u64) -> Option<Mapping> {
        match self.by_start.entry(start) {
            Entry::Occupied(found) if found.get().virt_end == end => Some(found.remove()),
            _ => None,
        }
    }

    /// Removes the mapping starting at `virt_start`.
    pub fn remove(&mut self, virt_start: u64) -> Option<Mapping> {
        self.by_start.remove(&virt_start)
    }

    /// The mappings in ascending IOVA order, to give them their
    /// [`Mapping::id`] (the only field that may change in place).
    pub(crate) fn ids_mut(&mut self) -> impl Iterator<Item = &mut MappingId> + '_ {
        self.by_start.values_mut().map(|m| &mut m.id)
    }
}

/// Hands out [`MappingId`]s to the mappings of one device: a freed id is
/// reused (last freed, first reused), so ids stay below the number of
/// mappings that were ever live at once, and notifiers can index tables
/// with them.
#[derive(Debug, Default)]
pub(crate) struct MappingIds {
    free: Vec<u32>,
    next: u32,
}

impl MappingIds {
    /// A fresh id, `None` once all 2^32 are live (memory runs out long
    /// before).
    pub(crate) fn take(&mut self) -> Option<MappingId> {
        if let Some(id) = self.free.pop() {
            return Some(MappingId(id));
        }
        let id = self.next;
        self.next = id.checked_add(1)?;
        Some(MappingId(id))
    }

    /// Frees the id of a mapping that is gone.
    pub(crate) fn give(&mut self, id: MappingId) {
        debug_assert!(id.0 < self.next, "{id:?} was never given");
        self.free.push(id.0);
    }

    /// Frees every id: no mapping is left.
    pub(crate) fn clear(&mut self) {
        self.free.clear();
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(s: u64, e: u64) -> Mapping {
        Mapping {
            notified: true,
            id: MappingId(0),
            virt_start: s,
            virt_end: e,
            phys_start: 0x1000 + s,
            flags: MapFlags::READ,
        }
    }

    /// `covered` as it was first written, collecting then checking: the
    /// oracle for `check_unmap` and `remove_first_in`.
    fn covered_oracle(d: &DomainMappings, start: u64, end: u64) -> Result<Vec<Mapping>, WouldSplit> {
        if let Some(m) = d.iter().rev().find(|m| m.virt_start < start)
            && m.virt_end >= start
        {
            return Err(WouldSplit(*m));
        }
        let inside: Vec<Mapping> = d
            .iter()
            .filter(|m| (start..=end).contains(&m.virt_start))
            .copied()
            .collect();
        match inside.last() {
            Some(last) if last.virt_end > end => Err(WouldSplit(*last)),
            _ => Ok(inside),
        }
    }

    #[test]
    fn lookup_overlap_and_cover() {
        let mut d = DomainMappings::default();
        d.insert(m(10, 19));
        d.insert(m(30, 39));
        assert_eq!(d.find(10), Some(&m(10, 19)));
        assert_eq!(d.find(19), Some(&m(10, 19)));
        assert_eq!(d.find(20), None);
        assert_eq!(d.find(9), None);
        assert!(d.overlaps(0, 10));
        assert!(d.overlaps(19, 29));
        assert!(!d.overlaps(20, 29));
        assert!(d.overlaps(0, u64::MAX));
        assert_eq!(d.covered(0, 29), Ok(vec![m(10, 19)]));
        assert_eq!(d.covered(15, 29), Err(WouldSplit(m(10, 19))));
        assert_eq!(d.covered(0, 35), Err(WouldSplit(m(30, 39))));
        assert_eq!(d.covered(0, u64::MAX), Ok(vec![m(10, 19), m(30, 39)]));
        assert_eq!(d.covered(40, 50), Ok(vec![]));
        assert_eq!(d.check_unmap(0, 29), Ok(()));
        assert_eq!(d.check_unmap(15, 29), Err(WouldSplit(m(10, 19))));
        assert_eq!(d.check_unmap(0, 35), Err(WouldSplit(m(30, 39))));
        assert_eq!(d.check_unmap(35, 36), Err(WouldSplit(m(30, 39))));
        assert_eq!(d.check_unmap(40, 50), Ok(()));
        let mut u = d.clone();
        assert_eq!(u.remove_first_in(0, u64::MAX), Some(m(10, 19)));
        assert_eq!(u.remove_first_in(0, u64::MAX), Some(m(30, 39)));
        assert_eq!(u.remove_first_in(0, u64::MAX), None);
        assert_eq!(MapFlags::from_bits(8), None);
        assert_eq!(format!("{:?}", MapFlags::READ | MapFlags::MMIO), "READ|MMIO");
    }

    proptest! {
        #[test]
        fn matches_a_naive_model(ops in prop::collection::vec((0u8..3, 0u64..64, 0u64..16), 1..60), q in 0u64..80) {
            let mut d = DomainMappings::default();
            let mut model: Vec<Mapping> = Vec::new();
            for (kind, s, len) in ops {
                // 0: map [s, s + len]; 1: unmap it; 2: unmap exactly an
                // existing mapping (as guests mostly do), if there is one.
                let map = kind == 0;
                let (s, e) = match model.get(s as usize % model.len().max(1)) {
                    Some(x) if kind == 2 => (x.virt_start, x.virt_end),
                    _ => (s, s + len),
                };
                let overl = model.iter().any(|x| x.virt_start <= e && s <= x.virt_end);
                prop_assert_eq!(d.overlaps(s, e), overl);
                if map {
                    if !overl {
                        d.insert(m(s, e));
                        model.push(m(s, e));
                    }
                } else {
                    let split = model.iter().any(|x| x.virt_start <= e && s <= x.virt_end && (x.virt_start < s || x.virt_end > e));
                    let covered = d.covered(s, e);
                    prop_assert_eq!(&covered, &covered_oracle(&d, s, e));
                    prop_assert_eq!(d.check_unmap(s, e), covered.as_ref().map(|_| ()).map_err(|w| *w));
                    let mut exact = d.clone();
                    let shortcut = exact.remove_exact(s, e);
                    match covered {
                        Err(_) => {
                            prop_assert!(split);
                            prop_assert_eq!(shortcut, None);
                        }
                        Ok(list) => {
                            prop_assert!(!split);
                            // The in-place UNMAP removes the same mappings,
                            // in the same (ascending) order.
                            let mut in_place = d.clone();
                            let mut popped = Vec::new();
                            while let Some(x) = in_place.remove_first_in(s, e) {
                                popped.push(x);
                            }
                            prop_assert_eq!(&popped, &list);
                            // The exact-match shortcut agrees with the general path.
                            if let Some(x) = shortcut {
                                prop_assert_eq!(&list, &vec![x]);
                                prop_assert!(exact.iter().eq(in_place.iter()));
                            } else {
                                prop_assert!(list.len() != 1 || list[0].virt_start != s || list[0].virt_end != e);
                                prop_assert!(exact.iter().eq(d.iter()));
                            }
                            for x in &list {
                                d.remove(x.virt_start);
                            }
                            prop_assert!(d.iter().eq(in_place.iter()));
                            model.retain(|x| !(x.virt_start >= s && x.virt_end <= e));
                        }
                    }
                }
            }
            prop_assert_eq!(d.len(), model.len());
            let naive = model.iter().find(|x| x.virt_start <= q && q <= x.virt_end);
            prop_assert_eq!(d.find(q), naive);
        }
    }
}
