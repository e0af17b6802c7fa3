//! The bookkeeping of KVM memory slots, with no KVM in it: which
//! `KVM_SET_USER_MEMORY_REGION` calls a populate or a discard of a managed
//! region needs, and which slot numbers are free.
//!
//! # One slot per block
//!
//! A [`SlotTable`] gives every populated block (granule) of its region a
//! KVM memory slot of its own, and never changes a slot once it exists:
//! a populate adds one slot per block, a discard removes the slots of its
//! blocks, and nothing else ever happens to a slot.
//!
//! The alternative, one slot per maximal populated run, needs fewer slots
//! but has to *change* live slots: plugging a block next to a run means
//! growing the run's slot, and unplugging a block inside a run means
//! splitting it. KVM cannot resize or split a slot in place; it has to be
//! deleted and added again, and while it is gone a vCPU touching the
//! still-plugged memory around it would see unassigned memory (all ones)
//! instead of its data. One slot per block rules that window out without
//! pausing vCPUs.
//!
//! The price is the bound: a region of `n` blocks needs up to `n` slots
//! ([`SlotTable::max_slots`]). [`Memslots::attach`](crate::memslots::Memslots::attach)
//! reserves that worst case for every managed region against
//! `KVM_CAP_NR_MEMSLOTS` before it adds a single slot, so a populate can
//! never run out of slots later. (A 4 GiB region of 2 MiB blocks needs
//! 2048; Linux on x86 offers 32764.)
//!
//! ```
//! use memvisor_memory::GuestRange;
//! use memvisor_vmm::slot_table::{SlotAllocator, SlotOp, SlotTable};
//!
//! const MIB: u64 = 1 << 20;
//! let region = GuestRange::new(1 << 32, 8 * MIB).unwrap();
//! let mut table = SlotTable::new(region, 2 * MIB).unwrap();
//! let mut slots = SlotAllocator::new(32);
//! assert_eq!(slots.alloc(), Some(0)); // boot RAM
//!
//! // Plugging two blocks adds two slots; unplugging the first removes one.
//! let two = GuestRange::new(1 << 32, 4 * MIB).unwrap();
//! let first = GuestRange::new(1 << 32, 2 * MIB).unwrap();
//! let second = GuestRange::new((1 << 32) + 2 * MIB, 2 * MIB).unwrap();
//! assert_eq!(
//!     table.populate(two, &mut slots).unwrap(),
//!     vec![SlotOp::Add { slot: 1, range: first }, SlotOp::Add { slot: 2, range: second }]
//! );
//! assert_eq!(table.discard(first, &mut slots).unwrap(), vec![SlotOp::Remove { slot: 1, range: first }]);
//! // The freed number is the next one handed out.
//! assert_eq!(slots.alloc(), Some(1));
//! ```

use std::collections::BTreeSet;

use memvisor_memory::GuestRange;

/// The smallest granularity a slot table accepts: KVM slots are made of
/// whole 4 KiB pages.
pub const MIN_GRANULARITY: u64 = 4096;

/// One `KVM_SET_USER_MEMORY_REGION` call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOp {
    /// Add slot `slot` mapping `range` (`memory_size = range.len()`).
    Add {
        /// The slot number.
        slot: u32,
        /// The guest-physical range it maps.
        range: GuestRange,
    },
    /// Delete slot `slot`, which maps `range` (`memory_size = 0`).
    Remove {
        /// The slot number.
        slot: u32,
        /// The guest-physical range it mapped.
        range: GuestRange,
    },
}

impl SlotOp {
    /// The slot number.
    pub fn slot(&self) -> u32 {
        match *self {
            SlotOp::Add { slot, .. } | SlotOp::Remove { slot, .. } => slot,
        }
    }

    /// The guest-physical range of the slot.
    pub fn range(&self) -> GuestRange {
        match *self {
            SlotOp::Add { range, .. } | SlotOp::Remove { range, .. } => range,
        }
    }

    /// The call that undoes this one.
    pub fn undo(&self) -> SlotOp {
        match *self {
            SlotOp::Add { slot, range } => SlotOp::Remove { slot, range },
            SlotOp::Remove { slot, range } => SlotOp::Add { slot, range },
        }
    }
}

/// Hands out KVM slot numbers `0..limit`: always the lowest free one, so
/// freed numbers are reused first and the numbers in use stay dense.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    limit: u32,
    /// Every number below `next` is in use unless it is in `free`.
    next: u32,
    free: BTreeSet<u32>,
}

impl SlotAllocator {
    /// An allocator of the slot numbers `0..limit`.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            next: 0,
            free: BTreeSet::new(),
        }
    }

    /// How many numbers it hands out at most.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// How many numbers are in use.
    pub fn in_use(&self) -> usize {
        (self.next as usize) - self.free.len()
    }

    /// True if `slot` is in use.
    pub fn is_used(&self, slot: u32) -> bool {
        slot < self.next && !self.free.contains(&slot)
    }

    /// The lowest free number, or `None` if all `limit` are in use.
    pub fn alloc(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop_first() {
            return Some(slot);
        }
        if self.next < self.limit {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }

    /// Marks the free number `slot` as in use (to retire a number KVM may
    /// still hold). Returns `false` (and changes nothing) if it is already
    /// in use or not below the limit.
    pub fn take(&mut self, slot: u32) -> bool {
        if slot >= self.limit || self.is_used(slot) {
            return false;
        }
        if slot < self.next {
            self.free.remove(&slot);
        } else {
            self.free.extend(self.next..slot);
            self.next = slot + 1;
        }
        true
    }

    /// Returns `slot` to the pool. Returns `false` (and changes nothing)
    /// if it was not in use.
    pub fn free(&mut self, slot: u32) -> bool {
        if !self.is_used(slot) {
            return false;
        }
        if slot + 1 == self.next {
            self.next = slot;
            // Keep `next` tight: trailing free numbers fold back into it.
            while self.next > 0 && self.free.remove(&(self.next - 1)) {
                self.next -= 1;
            }
        } else {
            self.free.insert(slot);
        }
        true
    }
}

/// Why a [`SlotTable`] could not be built or could not follow a change.
/// Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotTableError {
    /// The granularity is not a power of two of at least 4 KiB.
    #[error("block size {0:#x} is not a power of two of at least 0x1000 (KVM slots are made of 4 KiB pages)")]
    Granularity(u64),
    /// The region is empty or not made of whole blocks.
    #[error("region {region} is empty or not a whole number of {granularity:#x}-byte blocks")]
    Region {
        /// The region.
        region: GuestRange,
        /// The block size.
        granularity: u64,
    },
    /// A populate or discard of something that is not a whole number of
    /// blocks inside the region.
    #[error("range {range} is not a whole number of {granularity:#x}-byte blocks inside region {region}")]
    BadRange {
        /// The range asked for.
        range: GuestRange,
        /// The table's region.
        region: GuestRange,
        /// The block size.
        granularity: u64,
    },
    /// A populate of a block that already has a slot.
    #[error("block at {addr:#x} is already populated (KVM memory slot {slot})")]
    AlreadyPopulated {
        /// The block's guest-physical address.
        addr: u64,
        /// Its slot.
        slot: u32,
    },
    /// No slot number is free.
    #[error("no KVM memory slot is free for the block at {addr:#x}: all {limit} are in use (KVM_CAP_NR_MEMSLOTS)")]
    OutOfSlots {
        /// The block's guest-physical address.
        addr: u64,
        /// The allocator's limit.
        limit: u32,
    },
}

/// The KVM memory slots of one managed region, one per populated block;
/// see the [module documentation](self).
///
/// It decides the calls ([`SlotOp`]) and takes slot numbers from a
/// [`SlotAllocator`] shared by every table of a VM; making the calls is the
/// caller's business.
#[derive(Debug, Clone)]
pub struct SlotTable {
    region: GuestRange,
    shift: u32,
    /// The slot of each block, from the region's start.
    slots: Vec<Option<u32>>,
    count: usize,
}

impl SlotTable {
    /// A table for `region`, cut in blocks of `granularity` bytes, with
    /// nothing populated.
    pub fn new(region: GuestRange, granularity: u64) -> Result<Self, SlotTableError> {
        if !granularity.is_power_of_two() || granularity < MIN_GRANULARITY {
            return Err(SlotTableError::Granularity(granularity));
        }
        if region.is_empty() || !region.is_aligned(granularity) {
            return Err(SlotTableError::Region { region, granularity });
        }
        let shift = granularity.trailing_zeros();
        let blocks =
            usize::try_from(region.len() >> shift).map_err(|_| SlotTableError::Region { region, granularity })?;
        Ok(Self {
            region,
            shift,
            slots: vec![None; blocks],
            count: 0,
        })
    }

    /// The managed region.
    pub fn region(&self) -> GuestRange {
        self.region
    }

    /// Bytes per block.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The most slots this table can ever hold: one per block of the region.
    pub fn max_slots(&self) -> usize {
        self.slots.len()
    }

    /// Slots held now.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if no block is populated.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes covered by slots.
    pub fn populated_bytes(&self) -> u64 {
        (self.count as u64) << self.shift
    }

    /// The guest range of block `index`.
    fn block(&self, index: usize) -> GuestRange {
        GuestRange::new(self.region.start() + ((index as u64) << self.shift), 1 << self.shift)
            .expect("a block of the region never wraps")
    }

    /// The blocks `range` covers, if it is a whole number of them inside
    /// the region.
    fn blocks(&self, range: GuestRange) -> Result<std::ops::Range<usize>, SlotTableError> {
        if range.is_empty() || !self.region.contains(&range) || !range.is_aligned(self.granularity()) {
            return Err(SlotTableError::BadRange {
                range,
                region: self.region,
                granularity: self.granularity(),
            });
        }
        let first = ((range.start() - self.region.start()) >> self.shift) as usize;
        Ok(first..first + (range.len() >> self.shift) as usize)
    }

    /// The slot covering `addr`, with its range.
    pub fn slot_at(&self, addr: u64) -> Option<(u32, GuestRange)> {
        if addr < self.region.start() || addr >= self.region.end() {
            return None;
        }
        let index = ((addr - self.region.start()) >> self.shift) as usize;
        self.slots[index].map(|slot| (slot, self.block(index)))
    }

    /// Every slot with its range, in ascending address order.
    pub fn slots(&self) -> impl Iterator<Item = (u32, GuestRange)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|slot| (slot, self.block(i))))
    }

    /// `range` (whole blocks inside the region, none of them populated)
    /// becomes populated: one slot per block is taken from `allocator`, and
    /// the [`SlotOp::Add`] calls to make are returned in ascending address
    /// order. All or nothing: on error no slot was taken.
    pub fn populate(
        &mut self,
        range: GuestRange,
        allocator: &mut SlotAllocator,
    ) -> Result<Vec<SlotOp>, SlotTableError> {
        let blocks = self.blocks(range)?;
        if let Some(i) = blocks.clone().find(|&i| self.slots[i].is_some()) {
            return Err(SlotTableError::AlreadyPopulated {
                addr: self.block(i).start(),
                slot: self.slots[i].expect("found above"),
            });
        }
        let mut taken = Vec::with_capacity(blocks.len());
        for i in blocks {
            let Some(slot) = allocator.alloc() else {
                for &(_, slot) in &taken {
                    allocator.free(slot);
                }
                return Err(SlotTableError::OutOfSlots {
                    addr: self.block(i).start(),
                    limit: allocator.limit(),
                });
            };
            taken.push((i, slot));
        }
        self.count += taken.len();
        let mut ops = Vec::with_capacity(taken.len());
        for (i, slot) in taken {
            self.slots[i] = Some(slot);
            ops.push(SlotOp::Add {
                slot,
                range: self.block(i),
            });
        }
        Ok(ops)
    }

    /// `range` (whole blocks inside the region) is about to be discarded:
    /// the slot of each of its populated blocks goes back to `allocator`,
    /// and the [`SlotOp::Remove`] calls to make are returned in ascending
    /// address order. Blocks without a slot are skipped.
    pub fn discard(&mut self, range: GuestRange, allocator: &mut SlotAllocator) -> Result<Vec<SlotOp>, SlotTableError> {
        let blocks = self.blocks(range)?;
        let mut ops = Vec::new();
        for i in blocks {
            if let Some(slot) = self.slots[i].take() {
                allocator.free(slot);
                self.count -= 1;
                ops.push(SlotOp::Remove {
                    slot,
                    range: self.block(i),
                });
            }
        }
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 1 << 32;

    fn r(first_block: u64, blocks: u64) -> GuestRange {
        GuestRange::new(BASE + first_block * 2 * MIB, blocks * 2 * MIB).unwrap()
    }

    #[test]
    fn allocator_hands_out_the_lowest_free_number() {
        let mut a = SlotAllocator::new(4);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(0), Some(1), Some(2)));
        assert!(a.free(1));
        assert!(!a.free(1), "a double free changes nothing");
        assert!(!a.free(7), "an unknown number changes nothing");
        assert_eq!(a.in_use(), 2);
        assert_eq!(a.alloc(), Some(1));
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(a.alloc(), None);
        for s in [3, 2, 0, 1] {
            assert!(a.free(s));
        }
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.alloc(), Some(0));
        // Taking a number out of turn.
        assert!(a.take(2));
        assert!(!a.take(2));
        assert!(!a.take(4), "not below the limit");
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(1), Some(3), None));
        assert!(a.free(1));
        assert!(a.take(1));
        assert_eq!(a.in_use(), 4);
    }

    #[test]
    fn construction_checks_geometry() {
        assert_eq!(
            SlotTable::new(r(0, 4), 3 * MIB).unwrap_err(),
            SlotTableError::Granularity(3 * MIB)
        );
        assert_eq!(
            SlotTable::new(r(0, 4), 2048).unwrap_err(),
            SlotTableError::Granularity(2048)
        );
        let odd = GuestRange::new(BASE + MIB, 4 * MIB).unwrap();
        assert!(matches!(
            SlotTable::new(odd, 2 * MIB).unwrap_err(),
            SlotTableError::Region { .. }
        ));
        let t = SlotTable::new(r(0, 2048), 2 * MIB).unwrap();
        assert_eq!(t.max_slots(), 2048, "a 4 GiB region of 2 MiB blocks");
    }

    #[test]
    fn plug_unplug_sequence() {
        let mut a = SlotAllocator::new(100);
        let mut t = SlotTable::new(r(0, 8), 2 * MIB).unwrap();
        let ops = t.populate(r(2, 3), &mut a).unwrap();
        assert_eq!(
            ops,
            vec![
                SlotOp::Add {
                    slot: 0,
                    range: r(2, 1)
                },
                SlotOp::Add {
                    slot: 1,
                    range: r(3, 1)
                },
                SlotOp::Add {
                    slot: 2,
                    range: r(4, 1)
                }
            ]
        );
        // Unplugging the middle block of the plug touches only its slot.
        assert_eq!(
            t.discard(r(3, 1), &mut a).unwrap(),
            vec![SlotOp::Remove {
                slot: 1,
                range: r(3, 1)
            }]
        );
        assert_eq!(t.slot_at(r(2, 1).start()), Some((0, r(2, 1))));
        assert_eq!(t.slot_at(r(3, 1).start() + 5), None);
        assert_eq!(t.slot_at(r(4, 1).end() - 1), Some((2, r(4, 1))));
        assert_eq!(t.slot_at(BASE - 1), None);
        // A discard over populated and unpopulated blocks removes only slots.
        assert_eq!(
            t.discard(r(0, 8), &mut a).unwrap(),
            vec![
                SlotOp::Remove {
                    slot: 0,
                    range: r(2, 1)
                },
                SlotOp::Remove {
                    slot: 2,
                    range: r(4, 1)
                }
            ]
        );
        assert!(t.is_empty());
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut a = SlotAllocator::new(3);
        let mut t = SlotTable::new(r(0, 8), 2 * MIB).unwrap();
        t.populate(r(1, 1), &mut a).unwrap();
        assert_eq!(
            t.populate(r(0, 2), &mut a).unwrap_err(),
            SlotTableError::AlreadyPopulated {
                addr: r(1, 1).start(),
                slot: 0
            }
        );
        // Three more blocks need three slots; only two are left.
        let err = t.populate(r(4, 3), &mut a).unwrap_err();
        assert_eq!(
            err,
            SlotTableError::OutOfSlots {
                addr: r(6, 1).start(),
                limit: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "no KVM memory slot is free for the block at 0x100c00000: all 3 are in use (KVM_CAP_NR_MEMSLOTS)"
        );
        assert_eq!(t.len(), 1);
        assert_eq!(a.in_use(), 1);
        assert_eq!(t.slots().collect::<Vec<_>>(), vec![(0, r(1, 1))]);
        for bad in [
            GuestRange::new(BASE + MIB, 2 * MIB).unwrap(),
            GuestRange::new(BASE, 0).unwrap(),
            r(7, 2),
            GuestRange::new(BASE - 2 * MIB, 2 * MIB).unwrap(),
        ] {
            assert!(matches!(t.populate(bad, &mut a), Err(SlotTableError::BadRange { .. })));
            assert!(matches!(t.discard(bad, &mut a), Err(SlotTableError::BadRange { .. })));
        }
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn undo_inverts() {
        let add = SlotOp::Add {
            slot: 3,
            range: r(0, 1),
        };
        assert_eq!(
            add.undo(),
            SlotOp::Remove {
                slot: 3,
                range: r(0, 1)
            }
        );
        assert_eq!(add.undo().undo(), add);
        assert_eq!((add.slot(), add.range()), (3, r(0, 1)));
    }

    /// The slots KVM would hold after applying `ops` in order, checking that
    /// every call is legal for KVM: an add takes a free number and a range
    /// that overlaps no slot, a remove names a slot with its exact range.
    /// `other` numbers (`0..other`) are held by someone else (boot RAM).
    /// An add must also take the lowest number free at that moment, which
    /// is what makes freed numbers come back.
    fn apply(kvm: &mut std::collections::BTreeMap<u32, GuestRange>, other: u32, ops: &[SlotOp]) {
        for op in ops {
            match *op {
                SlotOp::Add { slot, range } => {
                    let lowest = (other..).find(|s| !kvm.contains_key(s)).unwrap();
                    assert_eq!(slot, lowest, "slot {slot} is not the lowest free number");
                    assert!(
                        kvm.values().all(|r| !r.overlaps(&range)),
                        "slot {slot} {range} overlaps a live slot"
                    );
                    kvm.insert(slot, range);
                }
                SlotOp::Remove { slot, range } => {
                    assert_eq!(kvm.remove(&slot), Some(range), "removing slot {slot}");
                }
            }
        }
    }

    proptest! {
        /// After any sequence of populates and discards of block-aligned
        /// ranges (as a discard manager sends them: populates of discarded
        /// blocks only), the slots cover exactly the populated bytes, no two
        /// overlap, every add takes the lowest free number (so freed
        /// numbers are reused) and the count never exceeds the limit.
        #[test]
        fn slots_follow_populated_state(
            ops in proptest::collection::vec((any::<bool>(), 0u64..32, 1u64..8), 1..80),
            other in 0u32..4,
            room in 4u32..=32,
        ) {
            const BLOCKS: u64 = 32;
            // With less room than blocks, some populates must be refused.
            let limit = other + room;
            let mut alloc = SlotAllocator::new(limit);
            for _ in 0..other {
                alloc.alloc().unwrap(); // slots of boot RAM
            }
            let mut table = SlotTable::new(r(0, BLOCKS), 2 * MIB).unwrap();
            let mut populated = vec![false; BLOCKS as usize];
            let mut kvm = std::collections::BTreeMap::new();
            for (populate, first, n) in ops {
                let n = n.min(BLOCKS - first);
                if populate {
                    // A manager only populates discarded blocks: populate
                    // the discarded runs inside the range, one call each.
                    let mut i = first;
                    while i < first + n {
                        if populated[i as usize] { i += 1; continue; }
                        let start = i;
                        while i < first + n && !populated[i as usize] { i += 1; }
                        match table.populate(r(start, i - start), &mut alloc) {
                            Ok(calls) => {
                                prop_assert_eq!(calls.len() as u64, i - start);
                                apply(&mut kvm, other, &calls);
                                for b in start..i { populated[b as usize] = true; }
                            }
                            Err(SlotTableError::OutOfSlots { limit: l, .. }) => {
                                // Refused only when it really does not fit;
                                // nothing changed (checked below).
                                prop_assert_eq!(l, limit);
                                prop_assert!(kvm.len() as u64 + (i - start) > u64::from(room));
                            }
                            Err(e) => prop_assert!(false, "unexpected {}", e),
                        }
                    }
                } else {
                    let calls = table.discard(r(first, n), &mut alloc).unwrap();
                    let expected = (first..first + n).filter(|&b| populated[b as usize]).count();
                    prop_assert_eq!(calls.len(), expected);
                    prop_assert!(calls.iter().all(|c| matches!(c, SlotOp::Remove { .. })), "only removes");
                    apply(&mut kvm, other, &calls);
                    for b in first..first + n { populated[b as usize] = false; }
                }
                // Exactly the populated bytes are covered, each block once.
                let mut covered = vec![false; BLOCKS as usize];
                for range in kvm.values() {
                    let b = ((range.start() - BASE) / (2 * MIB)) as usize;
                    prop_assert_eq!(range.len(), 2 * MIB);
                    prop_assert!(!covered[b]);
                    covered[b] = true;
                }
                prop_assert_eq!(&covered, &populated);
                // The table agrees with KVM.
                let listed: std::collections::BTreeMap<u32, GuestRange> = table.slots().collect();
                prop_assert_eq!(&listed, &kvm);
                // The allocator agrees too, and stays within its limit.
                let count = kvm.len() + other as usize;
                prop_assert!(count <= limit as usize);
                prop_assert_eq!(alloc.in_use(), count);
                for s in 0..limit {
                    prop_assert_eq!(alloc.is_used(s), s < other || kvm.contains_key(&s));
                }
                prop_assert_eq!(table.populated_bytes(), populated.iter().filter(|&&p| p).count() as u64 * 2 * MIB);
            }
        }
    }
}
