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
//! # Dirty logging
//!
//! For precopy live migration (`docs/live-migration.md` §3.1, §3.2),
//! [`Memslots::set_dirty_logging`] switches `KVM_MEM_LOG_DIRTY_PAGES` on
//! or off for every slot of the map — each plain region's and each plugged
//! block's — by issuing the same slot again with only its flags changed,
//! and a slot added while logging is on (a block plugged meanwhile) gets
//! the flag from the start. [`Memslots::take_dirty`] then gives the pages
//! the guest wrote in a range, slot by slot (`KVM_GET_DIRTY_LOG`, which
//! also write-protects them again), as a [`PageSet`] indexed like the one
//! of [`Region::take_dirty`](memvisor_memory::map::Region::take_dirty)
//! (the VMM's own writes) for the same range, so the two are OR-ed.
//! Slots are re-issued and their logs taken under their listener's table
//! lock, so that no slot is removed (or its number reused) in between.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_memory::dirty::DIRTY_PAGE_SIZE;
use memvisor_memory::discard::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal, RegisterError};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{GuestRange, PageSet};

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
        /// `"adding"`, `"removing"`, or switching dirty logging.
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
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG of slot {slot} for {range}: {source}")]
    DirtyLog {
        /// The slot number.
        slot: u32,
        /// The guest-physical range.
        range: GuestRange,
        /// The error KVM returned.
        source: std::io::Error,
    },
}

/// Makes the slot calls a [`SlotTable`] decides on.
pub trait SlotBackend: Send + Sync {
    /// Adds slot `slot` mapping `range` to the host memory behind it, with
    /// `KVM_MEM_LOG_DIRTY_PAGES` if `log_dirty`.
    fn add(&self, slot: u32, range: GuestRange, log_dirty: bool) -> Result<(), SlotIoError>;

    /// Removes slot `slot`, which maps `range`. Once this returns, no vCPU
    /// can reach the memory through it.
    fn remove(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError>;

    /// Issues live slot `slot`, which maps `range`, again with the same
    /// address, size and host memory, with `KVM_MEM_LOG_DIRTY_PAGES` set
    /// (`on`) or cleared.
    fn set_dirty_logging(&self, slot: u32, range: GuestRange, on: bool) -> Result<(), SlotIoError>;

    /// The pages of live slot `slot` (which maps `range` and logs dirty
    /// pages) the guest wrote since the last call or since logging went
    /// on, one per 4 KiB page of `range`; they are write-protected again,
    /// so the next call reports only what is written after this one.
    fn take_dirty_log(&self, slot: u32, range: GuestRange) -> Result<PageSet, SlotIoError>;

    /// Makes `op`; an added slot logs dirty pages if `log_dirty`.
    fn apply(&self, op: SlotOp, log_dirty: bool) -> Result<(), SlotIoError> {
        match op {
            SlotOp::Add { slot, range } => self.add(slot, range, log_dirty),
            SlotOp::Remove { slot, range } => self.remove(slot, range),
        }
    }
}

/// Why [`Memslots::take_dirty`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// Dirty logging is off ([`Memslots::set_dirty_logging`]).
    #[error("KVM dirty log of {0}: dirty logging is off")]
    Off(GuestRange),
    /// A slot lies partly inside the range: its log cannot be taken
    /// without losing the part outside.
    #[error("KVM dirty log of {range}: slot {slot} for {slot_range} lies partly outside it")]
    SlotOutside {
        /// The range asked for.
        range: GuestRange,
        /// The slot number.
        slot: u32,
        /// The slot's range.
        slot_range: GuestRange,
    },
    /// The range does not start on a 4 KiB page.
    #[error("KVM dirty log of {0}: the range does not start on a 4 KiB page")]
    Unaligned(GuestRange),
    /// KVM refused to give a slot's log.
    #[error(transparent)]
    Slot(#[from] SlotIoError),
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
    /// Slots are added with dirty logging while set (the VM's flag, see
    /// [`Memslots::set_dirty_logging`]), read under the table lock.
    log_dirty: Arc<AtomicBool>,
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
            log_dirty: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Adds slots with dirty logging while `flag` is set (the flag of the
    /// [`Memslots`] it belongs to).
    fn logging_with(mut self, flag: Arc<AtomicBool>) -> Self {
        self.log_dirty = flag;
        self
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
        // Read under the table lock: a `set_dirty_logging` that changes it
        // meanwhile re-issues these slots after this returns.
        let log_dirty = self.log_dirty.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.backend.apply(*op, log_dirty) {
                // The table forgets the range and its numbers go back to the
                // pool; then the slots already added are removed again.
                let _ = table.discard(range, &mut allocator);
                for done in ops[..i].iter().rev() {
                    if let Err(undo) = self.backend.apply(done.undo(), log_dirty) {
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
                    if let Err(e) = self.backend.apply(*op, false) {
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
    /// Dirty logging is on: shared with the listeners, which add slots
    /// with it.
    log_dirty: Arc<AtomicBool>,
    /// Serialises [`set_dirty_logging`](Self::set_dirty_logging) calls.
    logging: Mutex<()>,
}

impl fmt::Debug for Memslots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memslots")
            .field("limit", &self.limit)
            .field("worst_case", &self.worst_case)
            .field("log_dirty", &self.dirty_logging())
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
            log_dirty: Arc::new(AtomicBool::new(false)),
            logging: Mutex::new(()),
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
            if let Err(e) = this.backend.add(slot, range, false) {
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
            .map(|listener| Arc::new(listener.logging_with(this.log_dirty.clone())))
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

    /// True while dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.log_dirty.load(Ordering::SeqCst)
    }

    /// Switches dirty logging (`KVM_MEM_LOG_DIRTY_PAGES`) on or off for
    /// every slot — each plain region's and each plugged block's — by
    /// issuing it again with the same slot number, address, size and host
    /// memory (KVM allows changing a live slot's flags, not its size), and
    /// for the slots added from now on. Turning it on again, or off again,
    /// issues every slot again all the same.
    ///
    /// # Errors
    ///
    /// The first slot KVM refuses. Turning on is then undone: every slot is
    /// issued without the flag again (failures logged) and logging is off.
    /// Turning off goes on with the other slots and logging is off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), SlotIoError> {
        let _serial = lock(&self.logging);
        // Set before the slots are re-issued: a slot added meanwhile either
        // sees it, or is in its listener's table by the time the table
        // lock is taken below and is re-issued.
        self.log_dirty.store(on, Ordering::SeqCst);
        let mut first_error = None;
        self.for_each_slot(|slot, range| match self.backend.set_dirty_logging(slot, range, on) {
            Ok(()) => true,
            Err(e) => {
                first_error.get_or_insert(e);
                // Turning off goes on; turning on stops and is undone.
                !on
            }
        });
        let Some(error) = first_error else {
            return Ok(());
        };
        if on {
            self.log_dirty.store(false, Ordering::SeqCst);
            self.for_each_slot(|slot, range| {
                if let Err(e) = self.backend.set_dirty_logging(slot, range, false) {
                    log::error!("undoing dirty logging: {e}");
                }
                true
            });
        }
        Err(error)
    }

    /// The pages the guest wrote in `range` (which starts on a 4 KiB
    /// page) since the last call or since logging went on, one per 4 KiB
    /// page from `range.start()` — the indexing of
    /// [`Region::take_dirty`](memvisor_memory::map::Region::take_dirty) for
    /// the region `range` is — gathered from the log of every slot inside
    /// it (`KVM_GET_DIRTY_LOG`, which write-protects the pages again).
    /// Pages of `range` no slot covers (unplugged blocks) are never in it.
    ///
    /// # Errors
    ///
    /// [`DirtyLogError::Off`] while logging is off;
    /// [`DirtyLogError::SlotOutside`] if a slot lies partly outside
    /// `range` (nothing is taken then); [`DirtyLogError::Slot`] for the
    /// first slot whose log KVM refuses — the logs taken before it are
    /// lost, so the caller can no longer tell which pages changed (a
    /// migration then fails, or resends the range whole).
    pub fn take_dirty(&self, range: GuestRange) -> Result<PageSet, DirtyLogError> {
        if !self.dirty_logging() {
            return Err(DirtyLogError::Off(range));
        }
        if range.start() % DIRTY_PAGE_SIZE != 0 {
            return Err(DirtyLogError::Unaligned(range));
        }
        // Checked first, so that nothing is taken and lost.
        if let Some(s) = self
            .slots()
            .into_iter()
            .find(|s| s.range.overlaps(&range) && !range.contains(&s.range))
        {
            return Err(DirtyLogError::SlotOutside {
                range,
                slot: s.slot,
                slot_range: s.range,
            });
        }
        let mut pages = PageSet::for_bytes(range.len());
        let mut error = None;
        self.for_each_slot(|slot, slot_range| {
            if !slot_range.overlaps(&range) {
                return true;
            }
            if !range.contains(&slot_range) {
                // Plugged since the check above.
                error = Some(DirtyLogError::SlotOutside {
                    range,
                    slot,
                    slot_range,
                });
                return false;
            }
            match self.backend.take_dirty_log(slot, slot_range) {
                Ok(log) => {
                    pages.union_at((slot_range.start() - range.start()) / DIRTY_PAGE_SIZE, &log);
                    true
                }
                Err(e) => {
                    error = Some(e.into());
                    false
                }
            }
        });
        match error {
            None => Ok(pages),
            Some(e) => Err(e),
        }
    }

    /// Calls `f(slot, range)` for every slot — the plain ones, then each
    /// managed region's under its table lock, so that none is removed
    /// meanwhile — until it returns false.
    fn for_each_slot(&self, mut f: impl FnMut(u32, GuestRange) -> bool) {
        for &(slot, range) in &self.plain {
            if !f(slot, range) {
                return;
            }
        }
        for m in &self.managed {
            let table = lock(&m.listener.table);
            for (slot, range) in table.slots() {
                if !f(slot, range) {
                    return;
                }
            }
        }
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

    /// A backend that keeps the slots KVM would have (with their dirty
    /// logging flag), checks every call is one KVM accepts, and fails on
    /// demand.
    #[derive(Default)]
    struct FakeKvm {
        slots: Mutex<BTreeMap<u32, (GuestRange, bool)>>,
        log: Mutex<Vec<SlotOp>>,
        /// Every `set_dirty_logging` call: (slot, range, on).
        flag_log: Mutex<Vec<(u32, GuestRange, bool)>>,
        /// Pages "the guest wrote", by slot: what `take_dirty_log` returns
        /// (and clears).
        written: Mutex<BTreeMap<u32, Vec<u64>>>,
        fail_add_at: Mutex<Option<u64>>,
        fail_remove_of: Mutex<Option<u32>>,
        fail_flags_of: Mutex<Option<u32>>,
    }

    impl FakeKvm {
        fn slots(&self) -> BTreeMap<u32, GuestRange> {
            lock(&self.slots)
                .iter()
                .map(|(&slot, &(range, _))| (slot, range))
                .collect()
        }
        /// The slots logging dirty pages.
        fn logging(&self) -> Vec<u32> {
            lock(&self.slots)
                .iter()
                .filter(|(_, (_, on))| *on)
                .map(|(&slot, _)| slot)
                .collect()
        }
        fn take_flag_log(&self) -> Vec<(u32, GuestRange, bool)> {
            std::mem::take(&mut lock(&self.flag_log))
        }
        fn covers(&self, range: GuestRange) -> bool {
            lock(&self.slots).values().any(|(r, _)| r.overlaps(&range))
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
        fn add(&self, slot: u32, range: GuestRange, log_dirty: bool) -> Result<(), SlotIoError> {
            if *lock(&self.fail_add_at) == Some(range.start()) {
                return Err(Self::error("adding", slot, range, ENOMEM));
            }
            let mut slots = lock(&self.slots);
            // KVM refuses a live number or an overlap with EEXIST.
            if slots.contains_key(&slot) || slots.values().any(|(r, _)| r.overlaps(&range)) {
                return Err(Self::error("adding", slot, range, EEXIST));
            }
            slots.insert(slot, (range, log_dirty));
            lock(&self.log).push(SlotOp::Add { slot, range });
            Ok(())
        }
        fn remove(&self, slot: u32, range: GuestRange) -> Result<(), SlotIoError> {
            if *lock(&self.fail_remove_of) == Some(slot) {
                return Err(Self::error("removing", slot, range, ENOMEM));
            }
            assert_eq!(lock(&self.slots).remove(&slot).map(|(r, _)| r), Some(range));
            lock(&self.written).remove(&slot);
            lock(&self.log).push(SlotOp::Remove { slot, range });
            Ok(())
        }
        fn set_dirty_logging(&self, slot: u32, range: GuestRange, on: bool) -> Result<(), SlotIoError> {
            lock(&self.flag_log).push((slot, range, on));
            if *lock(&self.fail_flags_of) == Some(slot) {
                return Err(Self::error("switching dirty logging for", slot, range, EINVAL));
            }
            // KVM changes the flags of a live slot with the same address
            // and size only (anything else would be a move or a resize).
            let mut slots = lock(&self.slots);
            let live = slots.get_mut(&slot).filter(|(r, _)| *r == range);
            let Some((_, flag)) = live else {
                return Err(Self::error("switching dirty logging for", slot, range, EINVAL));
            };
            *flag = on;
            Ok(())
        }
        fn take_dirty_log(&self, slot: u32, range: GuestRange) -> Result<PageSet, SlotIoError> {
            // KVM answers ENOENT for a slot without a dirty bitmap.
            if lock(&self.slots).get(&slot) != Some(&(range, true)) {
                return Err(SlotIoError::DirtyLog {
                    slot,
                    range,
                    source: std::io::Error::from_raw_os_error(ENOENT),
                });
            }
            let mut set = PageSet::for_bytes(range.len());
            for page in lock(&self.written).remove(&slot).unwrap_or_default() {
                set.insert(page, 1);
            }
            Ok(set)
        }
    }

    const ENOENT: i32 = 2;
    const ENOMEM: i32 = 12;
    const EEXIST: i32 = 17;
    const EINVAL: i32 = 22;

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
    fn dirty_logging_reissues_every_slot_and_follows_new_ones() {
        let (map, manager) = map();
        let boot = GuestRange::new(0, 4 * MIB).unwrap();
        plug(&manager, r(4, 4)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        assert!(!slots.dirty_logging());
        assert!(kvm.logging().is_empty(), "slots start without logging");
        kvm.take_log();

        slots.set_dirty_logging(true).unwrap();
        assert!(slots.dirty_logging());
        // The same slots, issued again with the flag: no add, no remove.
        assert_eq!(
            kvm.take_flag_log(),
            vec![(0, boot, true), (1, r(4, 2), true), (2, r(6, 2), true)]
        );
        assert!(kvm.take_log().is_empty());
        assert_eq!(kvm.logging(), vec![0, 1, 2]);
        // A block plugged while logging is on gets its slot with the flag.
        plug(&manager, r(10, 2)).unwrap();
        assert_eq!(
            kvm.take_log(),
            vec![SlotOp::Add {
                slot: 3,
                range: r(10, 2)
            }]
        );
        assert_eq!(kvm.logging(), vec![0, 1, 2, 3]);
        assert!(kvm.take_flag_log().is_empty());

        slots.set_dirty_logging(false).unwrap();
        assert_eq!(
            kvm.take_flag_log(),
            vec![
                (0, boot, false),
                (1, r(4, 2), false),
                (2, r(6, 2), false),
                (3, r(10, 2), false)
            ]
        );
        assert!(kvm.logging().is_empty());
        plug(&manager, r(12, 2)).unwrap();
        assert!(kvm.logging().is_empty(), "and is added without it once logging is off");
        assert_eq!(kvm.slots().len(), 5);
    }

    #[test]
    fn a_refused_flag_change_turns_logging_off_again() {
        let (map, manager) = map();
        plug(&manager, r(0, 4)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        *lock(&kvm.fail_flags_of) = Some(1);
        let err = slots.set_dirty_logging(true).unwrap_err();
        assert!(
            err.to_string()
                .contains("switching dirty logging for slot 1 for [0x100000000, 0x100200000)"),
            "{err}"
        );
        assert!(!slots.dirty_logging());
        assert!(kvm.logging().is_empty(), "slot 0 was switched back");
        let calls: Vec<(u32, bool)> = kvm.take_flag_log().iter().map(|&(s, _, on)| (s, on)).collect();
        assert_eq!(calls, vec![(0, true), (1, true), (0, false), (1, false), (2, false)]);
        // Off goes on past a refusal.
        *lock(&kvm.fail_flags_of) = None;
        slots.set_dirty_logging(true).unwrap();
        *lock(&kvm.fail_flags_of) = Some(0);
        assert!(slots.set_dirty_logging(false).is_err());
        assert_eq!(kvm.logging(), vec![0]);
        assert!(!slots.dirty_logging());
    }

    #[test]
    fn take_dirty_places_each_slots_log_at_its_offset_in_the_range() {
        let (map, manager) = map();
        let boot = GuestRange::new(0, 4 * MIB).unwrap();
        let region = r(0, 16);
        plug(&manager, r(4, 4)).unwrap();
        let kvm = Arc::new(FakeKvm::default());
        let slots = Memslots::attach(&map, kvm.clone(), 32764).unwrap();
        assert!(matches!(slots.take_dirty(region), Err(DirtyLogError::Off(_))));
        slots.set_dirty_logging(true).unwrap();
        lock(&kvm.written).extend([(0, vec![5]), (1, vec![]), (2, vec![0, 511])]);
        let hot = slots.take_dirty(region).unwrap();
        // Slot 2 maps the block at 6 MiB: its pages from 1536 on.
        assert_eq!(hot.pages(), 4096);
        assert_eq!(hot.iter().collect::<Vec<_>>(), vec![1536, 2047]);
        assert_eq!(slots.take_dirty(boot).unwrap().iter().collect::<Vec<_>>(), vec![5]);
        assert!(slots.take_dirty(region).unwrap().is_empty(), "a second take is empty");
        assert!(slots.take_dirty(boot).unwrap().is_empty());
        // It ORs with the VMM's own writes to the same region.
        let mut vmm = map.regions()[1].take_dirty();
        lock(&kvm.written).insert(1, vec![3]);
        vmm.union(&slots.take_dirty(region).unwrap());
        assert_eq!(vmm.iter().collect::<Vec<_>>(), vec![1024 + 3]);
        // A range that cuts a slot is refused before anything is taken.
        lock(&kvm.written).insert(1, vec![7]);
        let err = slots.take_dirty(r(5, 11)).unwrap_err();
        assert!(matches!(err, DirtyLogError::SlotOutside { slot: 1, .. }), "{err}");
        assert_eq!(slots.take_dirty(r(4, 2)).unwrap().iter().collect::<Vec<_>>(), vec![7]);
        // A slot whose log KVM refuses (here: it does not log).
        *lock(&kvm.fail_flags_of) = Some(2);
        assert!(slots.set_dirty_logging(false).is_err());
        slots.log_dirty.store(true, Ordering::SeqCst);
        let err = slots.take_dirty(region).unwrap_err();
        assert!(
            matches!(err, DirtyLogError::Slot(SlotIoError::DirtyLog { slot: 1, .. })),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("KVM_GET_DIRTY_LOG of slot 1 for [0x100400000, 0x100600000): "),
            "{err}"
        );
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
