//! Path 2, with a vIOMMU: an assigned device sees IOVAs that the guest maps
//! through virtio-iommu, and only those are mapped for DMA.
//!
//! [`ViommuDmaBridge`] is the [`IommuNotifier`] of an assigned endpoint. For
//! every MAP it is told of, it refuses (as [`NotifierRefusal::Invalid`]) anything that is not
//! entirely populated RAM — the IOMMU device checks too, and the bridge
//! re-checks under the same read guard, which the device holds for the
//! whole notification (DESIGN.md rule 3) — and pins the rest through its
//! [`DmaMapper`]. `MMIO` mappings are accepted and never pinned.
//!
//! It is also a [`RamDiscardListener`] of every managed RAM region: its
//! `may_discard` vetoes the unplug of any block a live pinned mapping covers
//! ([`UnplugGuard::Reject`], the default: virtio-mem answers BUSY), or,
//! under [`UnplugGuard::Warn`] (QEMU's behaviour), lets it through with a
//! single warning and keeps the pin until the guest unmaps.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_iommu::{IommuNotifier, MapEvent, NotifierRefusal, UnmapEvent};
use memvisor_memory::GuestRange;
use memvisor_memory::discard::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::{DiscardGuard, DiscardPolicy};

use crate::mapper::{DmaError, DmaMapper, Permissions};
use crate::ram_listener::SetupError;

/// What the bridge does when the guest unplugs memory that a live IOMMU
/// mapping still covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnplugGuard {
    /// Veto the unplug: virtio-mem answers `VIRTIO_MEM_RESP_BUSY`.
    #[default]
    Reject,
    /// Allow it with a one-time warning and keep the pin until the unmap
    /// (QEMU's behaviour): the guest can then make the host hold more
    /// memory than its allowance, bounded only by the pin budget.
    Warn,
}

/// The bridge's record. Only pinned mappings are kept: an [`UnmapEvent`]
/// carries the IOVA, size and guest-physical address of the mapping it
/// ends, so that pair finds the record, and `MMIO` mappings (never pinned)
/// need none.
#[derive(Default)]
struct PinTable {
    /// Size of every pinned mapping, by guest-physical start then IOVA
    /// (several IOVAs may map the same memory): the interval index for
    /// vetoes, and the record of what to unpin.
    by_phys: BTreeMap<(u64, u64), u64>,
    /// The longest pinned mapping ever seen: an overlap with
    /// `[start, end)` can only come from an entry starting in
    /// `[start - longest + 1, end)`.
    longest: u64,
}

impl PinTable {
    /// Pinned mappings overlapping `range`, as `((phys, iova), size)`.
    fn pinned_overlapping(&self, range: GuestRange) -> impl Iterator<Item = ((u64, u64), u64)> + '_ {
        let from = range.start().saturating_sub(self.longest.saturating_sub(1));
        self.by_phys
            .range((from, 0)..(range.end(), 0))
            .filter(move |&(&(phys, _), &size)| phys + size > range.start())
            .map(|(&key, &size)| (key, size))
    }
}

/// The half of the bridge that the IOMMU (as its notifier) and the discard
/// managers (as their listener) hold.
struct Shared {
    name: String,
    mapper: Arc<dyn DmaMapper>,
    guard: UnplugGuard,
    warned: AtomicBool,
    table: Mutex<PinTable>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PinTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unpins the mapping at `iova`, whose record the caller has just
    /// removed (under the lock, which it still holds).
    fn unpin(&self, iova: u64, size: u64) {
        if let Err(e) = self.mapper.unmap(iova, size) {
            log::error!("{}: unpinning iova {iova:#x} (+{size:#x}) failed: {e}", self.name);
        }
    }
}

/// How the IOMMU learns why a mapping was refused: out of budget or slots,
/// an overlap, an address the backend cannot map, or a backend failure.
fn refusal_for(e: &DmaError) -> NotifierRefusal {
    match e {
        DmaError::BudgetExceeded { .. } | DmaError::TooManyMappings { .. } => NotifierRefusal::NoResources,
        DmaError::Overlap { .. } => NotifierRefusal::Invalid,
        DmaError::Unaligned { .. } | DmaError::IovaOutOfRange { .. } => NotifierRefusal::OutOfRange,
        DmaError::Split { .. } | DmaError::Os { .. } => NotifierRefusal::Failed,
    }
}

impl IommuNotifier for Shared {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        if ev.flags.mmio() {
            // Never pinned, so nothing to record (see notify_unmap).
            return Ok(());
        }
        let phys = GuestRange::new(ev.phys, ev.size).ok_or(NotifierRefusal::OutOfRange)?;
        let Some(host) = &ev.host else {
            return Err(NotifierRefusal::Invalid);
        };
        // Check, pin and record under the lock: a veto or a discard sees
        // all of it or none of it.
        let mut state = self.lock();
        // Rule 1, checked again under the guard the device holds (rule 3).
        if ev.populated.is_some_and(|view| !view.is_populated(phys)) {
            return Err(NotifierRefusal::Invalid);
        }
        let access = Permissions {
            read: ev.flags.read(),
            write: ev.flags.write(),
        };
        self.mapper
            .map(ev.iova, host.host_address, ev.size, access)
            .map_err(|e| {
                log::warn!("{}: refusing map of iova {:#x} -> {phys}: {e}", self.name, ev.iova);
                refusal_for(&e)
            })?;
        state.by_phys.insert((ev.phys, ev.iova), ev.size);
        state.longest = state.longest.max(ev.size);
        Ok(())
    }

    fn notify_unmap(&self, ev: &UnmapEvent) {
        if ev.flags.mmio() {
            // MMIO mappings are never pinned nor recorded.
            return;
        }
        // No record means nothing is pinned: a forced unplug already
        // unpinned it (notify_discard), or the map was refused.
        let mut state = self.lock();
        if let Some(size) = state.by_phys.remove(&(ev.phys, ev.iova)) {
            self.unpin(ev.iova, size);
        }
    }
}

impl RamDiscardListener for Shared {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_populate(&self, _range: GuestRange) -> Result<(), Refusal> {
        // Nothing to map: mappings come from the guest's IOMMU.
        Ok(())
    }

    fn may_discard(&self, range: GuestRange) -> bool {
        let state = self.lock();
        let Some(((_, iova), _)) = state.pinned_overlapping(range).next() else {
            return true;
        };
        match self.guard {
            UnplugGuard::Reject => false,
            UnplugGuard::Warn => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{}: the guest unplugs {range} while its IOMMU mapping at iova {iova:#x} still pins it; \
                         allowing it (unplug guard 'warn'), so the host keeps that memory until the guest unmaps: \
                         a guest can make the host pin more memory than intended, bounded only by the pin budget \
                         (or RLIMIT_MEMLOCK). This warning is shown once.",
                        self.name
                    );
                }
                true
            }
        }
    }

    fn notify_discard(&self, range: GuestRange) {
        if self.guard == UnplugGuard::Warn {
            // The pins stay until the guest unmaps (see UnplugGuard::Warn).
            return;
        }
        // Under Reject, a discard of pinned memory only comes from a forced
        // unplug (a system reset): drop the pins before the memory goes.
        // Their records go too: the guest's later unmaps are then no-ops.
        let mut state = self.lock();
        let overlapping: Vec<((u64, u64), u64)> = state.pinned_overlapping(range).collect();
        for (key @ (_, iova), size) in overlapping {
            state.by_phys.remove(&key);
            self.unpin(iova, size);
        }
    }
}

/// Path 2 of DESIGN.md for one assigned endpoint; see the
/// [module documentation](self). Register [`notifier`](Self::notifier)
/// with the IOMMU for the endpoint. Dropping the bridge unpins everything
/// and unregisters it from the discard managers.
pub struct ViommuDmaBridge {
    shared: Arc<Shared>,
    registered: Vec<(Arc<dyn RamDiscardManager>, ListenerId)>,
    _policy: DiscardGuard,
}

impl fmt::Debug for ViommuDmaBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViommuDmaBridge")
            .field("name", &self.shared.name)
            .field("mapper", &self.shared.mapper.name())
            .field("guard", &self.shared.guard)
            .finish()
    }
}

impl ViommuDmaBridge {
    /// A bridge pinning through `mapper`, registered as a discard listener
    /// on every managed region of `mem`, holding a guard that disables
    /// uncoordinated discard in `policy`.
    pub fn attach(
        name: &str,
        mem: &GuestMemoryMap,
        mapper: Arc<dyn DmaMapper>,
        policy: &DiscardPolicy,
        guard: UnplugGuard,
    ) -> Result<Self, SetupError> {
        let policy_guard = policy.disable_uncoordinated(name)?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mapper,
            guard,
            warned: AtomicBool::new(false),
            table: Mutex::new(PinTable::default()),
        });
        let mut this = Self {
            shared,
            registered: Vec::new(),
            _policy: policy_guard,
        };
        for region in mem.regions() {
            if let Some(manager) = region.manager() {
                let id = manager
                    .register_listener(this.shared.clone(), region.range())
                    .map_err(|e| SetupError::Register {
                        region: region.range(),
                        reason: e.to_string(),
                    })?;
                this.registered.push((manager.clone(), id));
            }
        }
        Ok(this)
    }

    /// The notifier to register with the IOMMU for the endpoint.
    pub fn notifier(&self) -> Arc<dyn IommuNotifier> {
        self.shared.clone()
    }

    /// The mapper behind it.
    pub fn mapper(&self) -> &Arc<dyn DmaMapper> {
        &self.shared.mapper
    }

    /// Bytes of the live pinned mappings, by the bridge's own record (the
    /// backend's [`DmaMapper::pinned_bytes`] must agree).
    pub fn pinned_bytes(&self) -> u64 {
        self.shared.lock().by_phys.values().sum()
    }

    /// The guest-physical ranges currently pinned.
    pub fn pinned_ranges(&self) -> Vec<GuestRange> {
        self.shared
            .lock()
            .by_phys
            .iter()
            .filter_map(|(&(phys, _), &size)| GuestRange::new(phys, size))
            .collect()
    }
}

impl Drop for ViommuDmaBridge {
    fn drop(&mut self) {
        for (manager, id) in self.registered.drain(..) {
            manager.unregister_listener(id);
        }
        let mut state = self.shared.lock();
        for ((_, iova), size) in std::mem::take(&mut state.by_phys) {
            self.shared.unpin(iova, size);
        }
    }
}
