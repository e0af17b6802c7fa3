//! KVM memory slots that follow plug and unplug (rule 7 of
//! `docs/design.md`): only populated memory is ever in a slot.
//!
//! * [`MemslotListener`] is a [`RamDiscardListener`] of one managed region
//!   (a virtio-mem region). It adds a slot for every block in
//!   `notify_populate` and removes it in `notify_discard`, which the
//!   manager calls *before* it discards the memory: when the discard
//!   happens, no vCPU can reach the block any more, and a guest access to
//!   it exits to the VMM, which answers it as unassigned memory
//!   ([`crate::unassigned`]).
//! * [`Memslots`] owns the slot numbers of one VM: it gives every plain
//!   (boot) RAM region one slot, and registers a listener with every
//!   managed region of a [`GuestMemoryMap`] (the registration replays
//!   what is populated already). Dropped, it unregisters them (removing
//!   their slots) and removes the plain slots.
//! * [`SlotBackend`] makes the calls: `KVM_SET_USER_MEMORY_REGION` in a
//!   VM ([`crate::vm`]), or a recorder in tests.
//!
//! # Slot granularity and its bound
//!
//! One slot per populated block, never changed once added (see
//! [`crate::slot_table`] for why). A map therefore needs at most one slot
//! per plain region plus one per block of every managed region, and
//! [`Memslots::attach`] refuses a map whose worst case exceeds the slot
//! limit (`KVM_CAP_NR_MEMSLOTS`) before it adds anything, naming the
//! regions and their block counts. Within that reservation a populate
//! can never run out of slots.
//!
//! # Locking
//!
//! The manager calls the listener under its write lock; the listener
//! takes its own table lock and then the VM's allocator lock, and never
//! calls back into the manager. [`Memslots`] takes the allocator lock
//! alone (plain slots), so the order is always *manager, listener table,
//! allocator*.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_memory::GuestRange;
use memvisor_memory::discard::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal, RegisterError};
use memvisor_memory::map::GuestMemoryMap;

use crate::slot_table::{SlotAllocator, SlotOp, SlotTable, SlotTableError};

/// The page size KVM slots are made of.
pub(crate) const PAGE_SIZE: u64 = 4096;

/// The highest slot limit used: slot numbers above 16 bits would select
/// another KVM address space (`KVM_CAP_MULTI_ADDRESS_SPACE`).
pub const MAX_SLOT_LIMIT: usize = u16::MAX as usize;

/// Why a slot could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum SlotIoError {
    /// The range is not RAM of the backend's guest memory map.
    #[error("KVM memory slot {slot}: {range} is not inside one RAM region of the guest memory map: {reason}")]
    NotRam {
        /// The slot number.
        slot: u32,
        /// The guest-physical range.
        range: GuestRange,
        /// Why the map refused it.
        reason: String,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION {what} slot {slot} for {range} (host address {host:#x}): {source}")]
    Ioctl {
        /// `"adding"` or `"removing"`.
        what: &'static str,
        /// The slot number.
        slot: u32,
        /// The guest-physical range.
        range: GuestRange,
        /// The host address of the range.
        host: u64,
        /// The error KVM returned.
        source: std::io::Error,
    },
}

/// Makes the slot calls a [`SlotTable`] decides on.
pub trait SlotBackend: Send + Sync {
    /// Adds slot `slot` mapping `range` to the host memory behind it.
    fn add(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError>;

    /// Removes slot `slot`, which maps `range`. Once this returns, no vCPU
    /// can reach the memory through it.
    fn remove(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError>;

    /// Makes `op`.
    fn apply(&self, op: SlotOp) -> Result<(), SlotIoError> {
        match op {
            SlotOp::Add { slot, range } => self.add(slot, range),
            SlotOp::Remove { slot, range } => self.remove(slot, range),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The KVM memory slots of one managed region; see the
/// [module documentation](self).
pub struct MemslotListener {
    name: String,
    table: Mutex<SlotTable>,
    allocator: Arc<Mutex<SlotAllocator>>,
    backend: Arc<dyn SlotBackend>,
    failed_removals: AtomicU64,
}

impl fmt::Debug for MemslotListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = lock(&self.table);
        f.debug_struct("MemslotListener")
            .field("name", &self.name)
            .field("region", &table.region())
            .field("slots", &table.len())
            .finish()
    }
}

impl MemslotListener {
    /// A listener for `region`, in blocks of `granularity` bytes, taking
    /// slot numbers from `allocator` and making its calls through
    /// `backend`. It holds no slot until it is told something is populated.
    pub fn new(
        name: impl Into<String>,
        region: GuestRange,
        granularity: u64,
        allocator: Arc<Mutex<SlotAllocator>>,
        backend: Arc<dyn SlotBackend>,
    ) -> Result<Self, SlotTableError> {
        Ok(Self {
            name: name.into(),
            table: Mutex::new(SlotTable::new(region, granularity)?),
            allocator,
            backend,
            failed_removals: AtomicU64::new(0),
        })
    }

    /// The managed region.
    pub fn region(&self) -> GuestRange {
        lock(&self.table).region()
    }

    /// The slots held now, with their ranges, in address order.
    pub fn slots(&self) -> Vec<(u32, GuestRange)> {
        lock(&self.table).slots().collect()
    }

    /// The number of slots held now.
    pub fn slot_count(&self) -> usize {
        lock(&self.table).len()
    }

    /// The most slots it can ever hold: one per block.
    pub fn max_slots(&self) -> usize {
        lock(&self.table).max_slots()
    }

    /// Slot removals KVM refused (logged as errors). Such a slot keeps its
    /// number, which is never handed out again.
    pub fn failed_removals(&self) -> u64 {
        self.failed_removals.load(Ordering::Relaxed)
    }

    /// A slot that could not be removed may still map its memory: its
    /// number (which the table already gave back) is taken out of use for
    /// good, so no other block is ever given a slot KVM may still hold.
    fn retire(&self, slot: u32, allocator: &mut SlotAllocator, error: &SlotIoError) {
        self.failed_removals.fetch_add(1, Ordering::Relaxed);
        allocator.take(slot);
        log::error!("{}: {error}; slot {slot} is retired", self.name);
    }
}

impl RamDiscardListener for MemslotListener {
    fn name(&self) -> &str {
        &self.name
    }

    /// Adds one slot per block of `range`. All or nothing: if KVM refuses
    /// one, the slots already added for `range` are removed again and the
    /// populate is refused.
    fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal> {
        let mut table = lock(&self.table);
        let mut allocator = lock(&self.allocator);
        let ops = table
            .populate(range, &mut allocator)
            .map_err(|e| Refusal(format!("KVM memory slots for {range}: {e}")))?;
        let started = std::time::Instant::now();
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.backend.apply(*op) {
                // The table forgets the range and its numbers go back to the
                // pool; then the slots already added are removed again.
                let _ = table.discard(range, &mut allocator);
                for done in ops[..i].iter().rev() {
                    if let Err(undo) = self.backend.apply(done.undo()) {
                        self.retire(done.slot(), &mut allocator, &undo);
                    }
                }
                return Err(Refusal(format!("KVM memory slots for {range}: {e}")));
            }
        }
        log::debug!(
            "{}: {} slots added for {range} in {:?}",
            self.name,
            ops.len(),
            started.elapsed()
        );
        Ok(())
    }

    /// Removes the slot of every block of `range`, before the manager
    /// discards the memory.
    fn notify_discard(&self, range: GuestRange) {
        let mut table = lock(&self.table);
        let mut allocator = lock(&self.allocator);
        match table.discard(range, &mut allocator) {
            Ok(ops) => {
                let started = std::time::Instant::now();
                for op in &ops {
                    if let Err(e) = self.backend.apply(*op) {
                        self.retire(op.slot(), &mut allocator, &e);
                    }
                }
                log::debug!(
                    "{}: {} slots removed for {range} in {:?}",
                    self.name,
                    ops.len(),
                    started.elapsed()
                );
            }
            // The manager only sends whole blocks of the registered range.
            Err(e) => log::error!("{}: discard of {range}: {e}", self.name),
        }
    }
}

/// Why [`Memslots::attach`] failed. Nothing is left behind: the slots it
/// had added are removed and the listeners it had registered unregistered.
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// The map may need more slots than KVM has.
    #[error(
        "KVM memory slots: the guest memory map needs up to {needed} slots ({plain} for plain RAM, and one per block of each managed region: {managed}), but only {limit} are available (KVM_CAP_NR_MEMSLOTS); use larger blocks or smaller regions"
    )]
    TooManySlots {
        /// The worst case.
        needed: usize,
        /// The limit.
        limit: usize,
        /// Slots of plain RAM.
        plain: usize,
        /// Each managed region with its block count and size.
        managed: String,
    },
    /// A plain region is not made of whole pages.
    #[error("KVM memory slots: RAM region {0} is not made of whole 4 KiB pages")]
    Unaligned(GuestRange),
    /// A managed region's geometry cannot be followed.
    #[error("KVM memory slots for managed region {region}: {source}")]
    Table {
        /// The region.
        region: GuestRange,
        /// Why.
        source: SlotTableError,
    },
    /// A plain region's slot could not be added.
    #[error("{0}")]
    Plain(SlotIoError),
    /// A managed region refused the listener (its replay failed).
    #[error("KVM memory slots for managed region {region}: {source}")]
    Register {
        /// The region.
        region: GuestRange,
        /// Why.
        source: RegisterError,
    },
}

struct Managed {
    manager: Arc<dyn RamDiscardManager>,
    listener: Arc<MemslotListener>,
    id: ListenerId,
}

/// One memory slot, as [`Memslots::slots`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    /// The slot number.
    pub slot: u32,
    /// The guest-physical range it maps.
    pub range: GuestRange,
    /// True for a block of a managed region, false for plain RAM.
    pub managed: bool,
}

/// The memory slots of one VM; see the [module documentation](self).
pub struct Memslots {
    // Unregistered first on drop (see `Drop`), then the plain slots go.
    managed: Vec<Managed>,
    plain: Vec<(u32, GuestRange)>,
    allocator: Arc<Mutex<SlotAllocator>>,
    backend: Arc<dyn SlotBackend>,
    limit: usize,
    worst_case: usize,
}

impl fmt::Debug for Memslots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memslots")
            .field("limit", &self.limit)
            .field("worst_case", &self.worst_case)
            .field("in_use", &self.in_use())
            .field("plain", &self.plain)
            .field("managed", &self.managed.iter().map(|m| &m.listener).collect::<Vec<_>>())
            .finish()
    }
}

/// The worst-case slot count of `map`: one per plain region, one per block
/// of each managed region. Also returns the plain count and a description
/// of the managed regions for errors.
fn worst_case(map: &GuestMemoryMap) -> (usize, usize, String) {
    let mut plain = 0usize;
    let mut blocks = 0usize;
    let mut managed = Vec::new();
    for region in map.regions() {
        match region.manager() {
            None => plain += 1,
            Some(m) => {
                let n = usize::try_from(region.range().len() / m.granularity()).unwrap_or(usize::MAX);
                blocks = blocks.saturating_add(n);
                managed.push(format!(
                    "'{}' {} has {n} blocks of {:#x} bytes",
                    region.block().name(),
                    region.range(),
                    m.granularity()
                ));
            }
        }
    }
    let managed = if managed.is_empty() {
        "none".to_string()
    } else {
        managed.join(", ")
    };
    (plain.saturating_add(blocks), plain, managed)
}

impl Memslots {
    /// Gives every plain RAM region of `map` a slot and registers a
    /// [`MemslotListener`] with every managed one (which adds a slot per
    /// populated block), using at most `limit` slot numbers (clamped to
    /// [`MAX_SLOT_LIMIT`]).
    ///
    /// # Errors
    ///
    /// [`MemslotError::TooManySlots`] if the worst case (every block of
    /// every managed region plugged) exceeds `limit`, before anything is
    /// added; otherwise the first failure, after undoing everything.
    pub fn attach(map: &GuestMemoryMap, backend: Arc<dyn SlotBackend>, limit: usize) -> Result<Self, MemslotError> {
        let limit = limit.min(MAX_SLOT_LIMIT);
        let (needed, plain, managed) = worst_case(map);
        if needed > limit {
            return Err(MemslotError::TooManySlots {
                needed,
                limit,
                plain,
                managed,
            });
        }
        let mut this = Self {
            managed: Vec::new(),
            plain: Vec::new(),
            allocator: Arc::new(Mutex::new(SlotAllocator::new(limit as u32))),
            backend,
            limit,
            worst_case: needed,
        };
        // On error, dropping `this` undoes what was done so far.
        for region in map.regions().iter().filter(|r| r.manager().is_none()) {
            let range = region.range();
            if !range.is_aligned(PAGE_SIZE) || region.host_address() % PAGE_SIZE != 0 {
                return Err(MemslotError::Unaligned(range));
            }
            let slot = lock(&this.allocator)
                .alloc()
                .expect("the worst case was checked against the limit");
            if let Err(e) = this.backend.add(slot, range) {
                lock(&this.allocator).free(slot);
                return Err(MemslotError::Plain(e));
            }
            this.plain.push((slot, range));
        }
        for region in map.regions() {
            let Some(manager) = region.manager() else { continue };
            let range = region.range();
            let listener = MemslotListener::new(
                format!("kvm-memslots:{}", region.block().name()),
                range,
                manager.granularity(),
                this.allocator.clone(),
                this.backend.clone(),
            )
            .map(Arc::new)
            .map_err(|source| MemslotError::Table { region: range, source })?;
            let id = manager
                .register_listener(listener.clone(), range)
                .map_err(|source| MemslotError::Register { region: range, source })?;
            this.managed.push(Managed {
                manager: manager.clone(),
                listener,
                id,
            });
        }
        Ok(this)
    }

    /// The slot limit in force.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The most slots this map can ever need: one per plain region and one
    /// per block of each managed region.
    pub fn worst_case(&self) -> usize {
        self.worst_case
    }

    /// The VM's slot numbers, for memory outside the map (device BARs)
    /// to take from the same pool.
    pub(crate) fn allocator(&self) -> &Arc<Mutex<SlotAllocator>> {
        &self.allocator
    }

    /// Slot numbers in use now (including retired ones, see
    /// [`MemslotListener::failed_removals`]).
    pub fn in_use(&self) -> usize {
        lock(&self.allocator).in_use()
    }

    /// The listeners of the managed regions, in address order.
    pub fn listeners(&self) -> impl Iterator<Item = &Arc<MemslotListener>> + '_ {
        self.managed.iter().map(|m| &m.listener)
    }

    /// Every slot, in address order.
    pub fn slots(&self) -> Vec<SlotInfo> {
        let mut slots: Vec<SlotInfo> = self
            .plain
            .iter()
            .map(|&(slot, range)| SlotInfo {
                slot,
                range,
                managed: false,
            })
            .collect();
        for m in &self.managed {
            slots.extend(m.listener.slots().into_iter().map(|(slot, range)| SlotInfo {
                slot,
                range,
                managed: true,
            }));
        }
        slots.sort_by_key(|s| s.range.start());
        slots
    }

    /// The slot mapping `addr`, if any.
    pub fn slot_at(&self, addr: u64) -> Option<SlotInfo> {
        self.slots()
            .into_iter()
            .find(|s| s.range.start() <= addr && addr < s.range.end())
    }
}

impl Drop for Memslots {
    fn drop(&mut self) {
        for m in self.managed.drain(..) {
            // Sends notify_discard for every populated run: the slots go.
            m.manager.unregister_listener(m.id);
        }
        let mut allocator = lock(&self.allocator);
        for (slot, range) in self.plain.drain(..).rev() {
            match self.backend.remove(slot, range) {
                Ok(()) => {
                    allocator.free(slot);
                }
                Err(e) => log::error!("removing the slot of plain RAM: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_memory::discard::BlockDiscardManager;
    use memvisor_memory::{Backing, RamBlock};
    use std::collections::BTreeMap;

    const MIB: u64 = 1 << 20;
    const HOT: u64 = 1 << 32;

    /// A backend that keeps the slots KVM would have, checks every call is
    /// one KVM accepts, and fails on demand.
    #[derive(Default)]
    struct FakeKvm {
        slots: Mutex<BTreeMap<u32, GuestRange>>,
        log: Mutex<Vec<SlotOp>>,
        fail_add_at: Mutex<Option<u64>>,
        fail_remove_of: Mutex<Option<u32>>,
    }

    impl FakeKvm {
        fn slots(&self) -> BTreeMap<u32, GuestRange> {
            lock(&self.slots).clone()
        }
        fn covers(&self, range: GuestRange) -> bool {
            lock(&self.slots).values().any(|r| r.overlaps(&range))
        }
        fn take_log(&self) -> Vec<SlotOp> {
            std::mem::take(&mut lock(&self.log))
        }
        fn error(what: &'static str, slot: u32, range: GuestRange, errno: i32) -> SlotIoError {
            SlotIoError::Ioctl {
                what,
                slot,
                range,
                host: 0,
                source: std::io::Error::from_raw_os_error(errno),
            }
        }
    }

    impl SlotBackend for FakeKvm {
        fn add(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError> {
            if *lock(&self.fail_add_at) == Some(range.start()) {
                return Err(Self::error("adding", slot, range, ENOMEM));
            }
            let mut slots = lock(&self.slots);
            // KVM refuses a live number or an overlap with EEXIST.
            if slots.contains_key(&slot) || slots.values().any(|r| r.overlaps(&range)) {
                return Err(Self::error("adding", slot, range, EEXIST));
            }
            slots.insert(slot, range);
            lock(&self.log).push(SlotOp::Add { slot, range });
            Ok(())
        }
        fn remove(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError> {
            if *lock(&self.fail_remove_of) == Some(slot) {
                return Err(Self::error("removing", slot, range, ENOMEM));
            }
            assert_eq!(lock(&self.slots).remove(&slot), Some(range));
            lock(&self.log).push(SlotOp::Remove { slot, range });
            Ok(())
        }
    }

    const ENOMEM: i32 = 12;
    const EEXIST: i32 = 17;

    fn r(mib: u64, len_mib: u64) -> GuestRange {
        GuestRange::new(HOT + mib * MIB, len_mib * MIB).unwrap()
    }

    /// 4 MiB of boot RAM at 0 and a 16 MiB managed region at 4 GiB.
    fn map() -> (GuestMemoryMap, Arc<BlockDiscardManager>) {
        let boot = Arc::new(RamBlock::new("boot", 4 * MIB, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("hot0", 16 * MIB, Backing::Memfd).unwrap());
        let manager = Arc::new(BlockDiscardManager::new(r(0, 16), 2 * MIB).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(HOT, hot, manager.clone())
            .unwrap()
            .build()
            .unwrap();
        (map, manager)
    }

    fn plug(m: &BlockDiscardManager, range: GuestRange) -> Result<(), String> {
        m.write()
            .plug(range, || Ok::<_, std::convert::Infallible>(()), |_| {})
            .map_err(|e| e.to_string())
    }

    #[test]
    fn attach_adds_plain_slots_and_replays_populated_blocks() {
        let (map, manager) = map();
        plug(&manager, r(4, 4)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        assert_eq!(slots.worst_case(), 1 + 8);
        assert_eq!(
            kvm.slots(),
            BTreeMap::from([(0, GuestRange::new(0, 4 * MIB).unwrap()), (1, r(4, 2)), (2, r(6, 2))])
        );
        assert_eq!(slots.in_use(), 3);
        assert_eq!(
            slots.slot_at(HOT + 5 * MIB),
            Some(SlotInfo {
                slot: 1,
                range: r(4, 2),
                managed: true
            })
        );
        assert_eq!(slots.slot_at(HOT), None);
        assert_eq!(manager.listener_count(), 1);
        // Dropped, it unregisters and removes everything.
        drop(slots);
        assert!(kvm.slots().is_empty());
        assert_eq!(manager.listener_count(), 0);
    }

    #[test]
    fn slots_are_added_after_populate_and_gone_before_discard() {
        let (map, manager) = map();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        kvm.take_log();
        // The slot exists by the time the memory is prepared (populated).
        let k = kvm.clone();
        manager
            .write()
            .plug(
                r(2, 4),
                || {
                    assert!(k.covers(r(2, 4)));
                    Ok::<_, std::convert::Infallible>(())
                },
                |_| {},
            )
            .unwrap();
        assert_eq!(
            kvm.take_log(),
            vec![
                SlotOp::Add {
                    slot: 1,
                    range: r(2, 2)
                },
                SlotOp::Add {
                    slot: 2,
                    range: r(4, 2)
                }
            ]
        );
        // When the discard happens, the slot is already gone.
        let k = kvm.clone();
        let mut discarded = Vec::new();
        manager
            .write()
            .unplug(r(4, 2), false, |run| {
                assert!(!k.covers(run), "discarding {run} while a slot maps it");
                discarded.push(run);
            })
            .unwrap();
        assert_eq!(discarded, vec![r(4, 2)]);
        assert_eq!(
            kvm.take_log(),
            vec![SlotOp::Remove {
                slot: 2,
                range: r(4, 2)
            }]
        );
        // The freed number comes back.
        plug(&manager, r(10, 2)).unwrap();
        assert_eq!(
            kvm.take_log(),
            vec![SlotOp::Add {
                slot: 2,
                range: r(10, 2)
            }]
        );
        assert_eq!(slots.listeners().next().unwrap().slot_count(), 2);
    }

    #[test]
    fn a_refused_add_rolls_back_and_refuses_the_plug() {
        let (map, manager) = map();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        kvm.take_log();
        *lock(&kvm.fail_add_at) = Some(r(6, 2).start());
        let err = plug(&manager, r(2, 6)).unwrap_err();
        assert!(err.contains("kvm-memslots:hot0"), "{err}");
        assert!(err.contains("slot 3 for [0x100600000, 0x100800000)"), "{err}");
        assert_eq!(
            kvm.take_log(),
            vec![
                SlotOp::Add {
                    slot: 1,
                    range: r(2, 2)
                },
                SlotOp::Add {
                    slot: 2,
                    range: r(4, 2)
                },
                SlotOp::Remove {
                    slot: 2,
                    range: r(4, 2)
                },
                SlotOp::Remove {
                    slot: 1,
                    range: r(2, 2)
                },
            ]
        );
        assert!(!manager.is_populated(r(2, 2)));
        assert_eq!(slots.in_use(), 1);
        assert_eq!(slots.listeners().next().unwrap().slot_count(), 0);
        // And the next plug works with the same numbers.
        *lock(&kvm.fail_add_at) = None;
        plug(&manager, r(2, 2)).unwrap();
        assert_eq!(
            kvm.take_log(),
            vec![SlotOp::Add {
                slot: 1,
                range: r(2, 2)
            }]
        );
    }

    #[test]
    fn a_failed_removal_retires_the_number() {
        let (map, manager) = map();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        plug(&manager, r(0, 6)).unwrap(); // slots 1, 2, 3
        *lock(&kvm.fail_remove_of) = Some(2);
        manager.write().unplug(r(0, 6), false, |_| {}).unwrap();
        let listener = slots.listeners().next().unwrap().clone();
        assert_eq!(listener.failed_removals(), 1);
        // Slot 2 is still held by "KVM" and never handed out again.
        assert_eq!(slots.in_use(), 2);
        *lock(&kvm.fail_remove_of) = None;
        kvm.take_log();
        plug(&manager, r(8, 6)).unwrap();
        let added: Vec<u32> = kvm.take_log().iter().map(|op| op.slot()).collect();
        assert_eq!(added, vec![1, 3, 4]);
        // The block whose slot KVM kept cannot get a new one (KVM refuses
        // the overlap), and the plug is refused rather than half done.
        assert!(plug(&manager, r(2, 2)).unwrap_err().contains("File exists"));
    }

    #[test]
    fn a_map_that_cannot_fit_is_refused_before_anything_is_added() {
        let (map, manager) = map();
        let kvm = Arc::new(FakeKvm::default());
        let err = Memslots::attach(&map, kvm.clone(), 8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "KVM memory slots: the guest memory map needs up to 9 slots (1 for plain RAM, and one per block of each \
             managed region: 'hot0' [0x100000000, 0x101000000) has 8 blocks of 0x200000 bytes), but only 8 are \
             available (KVM_CAP_NR_MEMSLOTS); use larger blocks or smaller regions"
        );
        assert!(kvm.take_log().is_empty());
        assert_eq!(manager.listener_count(), 0);
        // Exactly enough is enough, and every block can be plugged.
        let slots = Memslots::attach(&map, kvm.clone(), 9).unwrap();
        plug(&manager, r(0, 16)).unwrap();
        assert_eq!(slots.in_use(), 9);
    }

    #[test]
    fn a_failing_plain_slot_undoes_the_attach() {
        let (map, manager) = map();
        plug(&manager, r(0, 2)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        *lock(&kvm.fail_add_at) = Some(0);
        let err = Memslots::attach(&map, kvm.clone(), 100).unwrap_err();
        assert!(matches!(err, MemslotError::Plain(_)), "{err}");
        assert!(kvm.slots().is_empty());
        assert_eq!(manager.listener_count(), 0);
    }

    #[test]
    fn a_failing_replay_undoes_the_attach() {
        let (map, manager) = map();
        plug(&manager, r(0, 2)).unwrap();
        plug(&manager, r(8, 2)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        *lock(&kvm.fail_add_at) = Some(r(8, 2).start());
        let err = Memslots::attach(&map, kvm.clone(), 100).unwrap_err();
        assert!(matches!(err, MemslotError::Register { .. }), "{err}");
        assert!(kvm.slots().is_empty(), "{:?}", kvm.slots());
        assert_eq!(manager.listener_count(), 0);
    }
}
