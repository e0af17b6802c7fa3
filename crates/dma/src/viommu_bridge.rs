//! Path 2, with a vIOMMU: an assigned device sees IOVAs that the guest maps
//! through virtio-iommu, and only those are mapped for DMA.
//!
//! [`ViommuDmaBridge`] is the [`IommuNotifier`] of an assigned endpoint. For
//! every MAP it is told of, it refuses (as [`NotifierRefusal::Invalid`]) anything that is not
//! entirely populated RAM — the IOMMU device checks too, and the bridge
//! re-checks under the same read guard, which the device holds for the
//! whole notification (DESIGN.md rule 3) — and pins the rest through a
//! [`PinSession`] of its [`DmaMapper`]. `MMIO` mappings are accepted and
//! never pinned.
//!
//! It is also a [`RamDiscardListener`] of every managed RAM region: its
//! `may_discard` vetoes the unplug of any block a live pinned mapping covers
//! ([`UnplugGuard::Reject`], the default: virtio-mem answers BUSY), or,
//! under [`UnplugGuard::Warn`] (QEMU's behaviour), lets it through with a
//! single warning and keeps the pin until the guest unmaps.
//!
//! While the endpoint bypasses translation (a bypass or identity domain,
//! as Linux attaches with `iommu.passthrough=1`, or no domain while the
//! `bypass` config field is on) the guest maps nothing, yet the device
//! reaches all guest memory: the bridge then behaves as path 1, a
//! [`RamDmaListener`] mapping all populated RAM at its guest-physical
//! address and following plug and unplug, until the endpoint is translated
//! again ([`IommuNotifier::notify_bypass`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_iommu::{IommuNotifier, MapEvent, MappingId, NotifierRefusal, UnmapEvent};
use memvisor_memory::GuestRange;
use memvisor_memory::discard::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::{DiscardGuard, DiscardPolicy};

use crate::events::{DmaEvent, DmaReport};
use crate::mapper::{DmaError, DmaMapper, Permissions, PinKey, PinSession};
use crate::ram_listener::{RamDmaListener, SetupError};

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

/// One pinned mapping, as the bridge keeps it.
#[derive(Debug, Clone, Copy)]
struct Pinned {
    iova: u64,
    phys: u64,
    size: u64,
    /// The session's name for it ([`PinSession::pin`]).
    key: PinKey,
    /// Where it is counted, if it targets a managed region.
    counted: Option<Counted>,
}

/// Where a pinned mapping is counted: the index of its managed region in
/// [`PinTable::managed`], and the granules `[first, end)` it reaches into
/// there (found once, when it is pinned).
#[derive(Debug, Clone, Copy)]
struct Counted {
    region: usize,
    first: usize,
    end: usize,
}

impl Pinned {
    fn phys_range(&self) -> GuestRange {
        GuestRange::new(self.phys, self.size).expect("checked when it was pinned")
    }
}

/// How many pinned mappings reach into each granule of one managed
/// region: the index vetoes are answered from.
struct Granules {
    region: GuestRange,
    shift: u32,
    /// Per granule. A `u64` never overflows: each mapping adds one.
    pins: Vec<u64>,
}

impl Granules {
    /// The granules `range` (clipped to the region) touches.
    fn span(&self, range: GuestRange) -> std::ops::Range<usize> {
        let Some(part) = self.region.intersection(&range) else {
            return 0..0;
        };
        let first = (part.start() - self.region.start()) >> self.shift;
        let last = (part.end() - 1 - self.region.start()) >> self.shift;
        first as usize..last as usize + 1
    }

    fn any_pinned(&self, range: GuestRange) -> bool {
        self.pins[self.span(range)].iter().any(|&n| n != 0)
    }
}

/// The bridge's record. Only pinned mappings are kept (`MMIO` mappings are
/// never pinned), by the IOMMU's [`MappingId`]: the IOMMU names the
/// mapping in every event, so map and unmap find their entry by index,
/// without a search and whatever the number of live mappings. What the
/// discard side asks — is any of this range pinned? — is answered by
/// per-granule counts of the managed regions, kept with every pin and
/// unpin; the rare forced discard of pinned memory (a system reset) finds
/// the mappings by a scan.
///
/// The pins are made through the mapper's [`PinSession`], kept here so
/// that the bridge's lock, which must be held anyway, is the one lock a
/// MAP or an UNMAP takes.
struct PinTable {
    /// By [`MappingId::index`].
    by_id: Vec<Option<Pinned>>,
    /// Every managed region of the memory map the bridge listens to.
    managed: Vec<Granules>,
    /// Bytes of the entries of `by_id`.
    bytes: u64,
    session: Box<dyn PinSession>,
}

impl PinTable {
    /// True if a pinned mapping reaches into `range`.
    fn any_pinned(&self, range: GuestRange) -> bool {
        self.managed.iter().any(|g| g.any_pinned(range))
    }

    /// Where a mapping of `phys` (not empty) is counted, if it targets a
    /// managed region.
    #[inline]
    fn counted(&self, phys: GuestRange) -> Option<Counted> {
        let (region, g) = self
            .managed
            .iter()
            .enumerate()
            .find(|(_, g)| g.region.contains(&phys))?;
        // Inside the region: no intersection to take (`Granules::span`).
        let offset = phys.start() - g.region.start();
        Some(Counted {
            region,
            first: (offset >> g.shift) as usize,
            end: ((offset + phys.len() - 1) >> g.shift) as usize + 1,
        })
    }

    /// Adds `p`, whose id has no entry.
    #[inline]
    fn insert(&mut self, id: MappingId, p: Pinned) {
        let i = id.index();
        if i >= self.by_id.len() {
            self.by_id.resize(i + 1, None);
        }
        self.by_id[i] = Some(p);
        if let Some(c) = p.counted {
            self.managed[c.region].pins[c.first..c.end]
                .iter_mut()
                .for_each(|n| *n += 1);
        }
        self.bytes += p.size;
    }

    /// Removes the entry of `id`, if there is one.
    #[inline]
    fn remove(&mut self, id: MappingId) -> Option<Pinned> {
        let p = self.by_id.get_mut(id.index())?.take()?;
        if let Some(c) = p.counted {
            self.managed[c.region].pins[c.first..c.end]
                .iter_mut()
                .for_each(|n| *n -= 1);
        }
        self.bytes -= p.size;
        Some(p)
    }

    /// Unpins `p`, whose record was just removed.
    #[inline(always)]
    fn unpin(&mut self, name: &str, p: &Pinned) {
        if let Err(e) = self.session.unpin(p.key, p.iova, p.size) {
            log::error!("{name}: unpinning iova {:#x} (+{:#x}) failed: {e}", p.iova, p.size);
        }
    }

    /// The ids of the pinned mappings reaching into `range`.
    fn overlapping(&self, range: GuestRange) -> Vec<MappingId> {
        self.by_id
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some_and(|p| p.phys_range().overlaps(&range)))
            .map(|(i, _)| MappingId(i as u32))
            .collect()
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
    /// What path 1 needs while the endpoint bypasses translation.
    mem: GuestMemoryMap,
    policy: DiscardPolicy,
    /// The path-1 listener while the endpoint bypasses translation.
    bypass: Mutex<Option<RamDmaListener>>,
    /// Where refusals, vetoes and bypass changes are reported.
    report: DmaReport,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PinTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bypass(&self) -> MutexGuard<'_, Option<RamDmaListener>> {
        self.bypass.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports the refusal of `ev` for `reason` and returns `refusal`.
    fn refuse(&self, ev: &MapEvent<'_>, refusal: NotifierRefusal, reason: String) -> NotifierRefusal {
        self.report.emit(DmaEvent::MapRefused {
            device: self.name.clone(),
            endpoint: ev.endpoint,
            iova: ev.iova,
            phys: ev.phys,
            size: ev.size,
            reason,
        });
        refusal
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
        let phys = GuestRange::new(ev.phys, ev.size)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| self.refuse(ev, NotifierRefusal::OutOfRange, "empty or wrapping target".into()))?;
        let Some(host) = &ev.host else {
            return Err(self.refuse(ev, NotifierRefusal::Invalid, "the target is not RAM".into()));
        };
        // Check, pin and record under the lock: a veto or a discard sees
        // all of it or none of it.
        let mut table = self.lock();
        // Rule 1, checked again under the guard the device holds (rule 3).
        if ev.populated.is_some_and(|view| !view.is_populated(phys)) {
            return Err(self.refuse(ev, NotifierRefusal::Invalid, format!("{phys} is not populated")));
        }
        // The IOMMU never names two live mappings alike; if it did, the
        // second would be refused rather than lose the first's record.
        if table.by_id.get(ev.id.index()).is_some_and(Option::is_some) {
            return Err(self.refuse(ev, NotifierRefusal::Invalid, format!("{:?} is already mapped", ev.id)));
        }
        let counted = table.counted(phys);
        let access = Permissions {
            read: ev.flags.read(),
            write: ev.flags.write(),
        };
        // A session pin, not `map`: the IOMMU keeps the mappings apart and
        // names each one in its unmap, so the backend need not index them
        // by IOVA, and this lock orders the calls (see PinSession).
        let key = table
            .session
            .pin(ev.iova, host.host_address, ev.size, access)
            .map_err(|e| {
                log::warn!("{}: refusing map of iova {:#x} -> {phys}: {e}", self.name, ev.iova);
                self.refuse(ev, refusal_for(&e), e.to_string())
            })?;
        table.insert(
            ev.id,
            Pinned {
                iova: ev.iova,
                phys: ev.phys,
                size: ev.size,
                key,
                counted,
            },
        );
        Ok(())
    }

    fn notify_bypass(&self, endpoint: u32, on: bool) -> Result<(), NotifierRefusal> {
        let mut bypass = self.bypass();
        if !on {
            // Dropping the listener unmaps (unpins) everything it mapped.
            if bypass.take().is_some() {
                log::info!(
                    "{}: endpoint {endpoint} is translated again; all RAM unpinned",
                    self.name
                );
                self.report.emit(DmaEvent::Bypass {
                    device: self.name.clone(),
                    endpoint,
                    bypass: false,
                });
            }
            return Ok(());
        }
        if bypass.is_some() {
            return Ok(());
        }
        let name = format!("{}:bypass", self.name);
        let listener = RamDmaListener::attach(&name, &self.mem, self.mapper.clone(), &self.policy).map_err(|e| {
            log::warn!(
                "{}: endpoint {endpoint} bypasses translation, but mapping all RAM failed: {e}",
                self.name
            );
            match &e {
                SetupError::Map { source, .. } => refusal_for(source),
                SetupError::TooManyMappings { .. } => NotifierRefusal::NoResources,
                SetupError::Policy(_) | SetupError::Register { .. } => NotifierRefusal::Failed,
            }
        })?;
        log::info!(
            "{}: endpoint {endpoint} bypasses translation; all populated RAM is mapped (path 1)",
            self.name
        );
        *bypass = Some(listener);
        self.report.emit(DmaEvent::Bypass {
            device: self.name.clone(),
            endpoint,
            bypass: true,
        });
        Ok(())
    }

    fn notify_unmap(&self, ev: &UnmapEvent) {
        if ev.flags.mmio() {
            // MMIO mappings are never pinned nor recorded.
            return;
        }
        // No record means nothing is pinned: a forced unplug already
        // unpinned it (notify_discard), or the map was refused.
        let mut table = self.lock();
        if let Some(p) = table.remove(ev.id) {
            debug_assert_eq!((p.iova, p.phys, p.size), (ev.iova, ev.phys, ev.size), "{:?}", ev.id);
            table.unpin(&self.name, &p);
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
        let table = self.lock();
        if !table.any_pinned(range) {
            return true;
        }
        match self.guard {
            UnplugGuard::Reject => {
                self.report.emit(DmaEvent::UnplugVetoed {
                    device: self.name.clone(),
                    gpa: range.start(),
                    size: range.len(),
                });
                false
            }
            UnplugGuard::Warn => {
                let iova = table
                    .overlapping(range)
                    .first()
                    .and_then(|id| table.by_id[id.index()])
                    .map_or(0, |p| p.iova);
                self.report.emit(DmaEvent::GuardWarning {
                    device: self.name.clone(),
                    gpa: range.start(),
                    size: range.len(),
                    iova,
                });
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
        let mut table = self.lock();
        if !table.any_pinned(range) {
            return;
        }
        for id in table.overlapping(range) {
            if let Some(p) = table.remove(id) {
                table.unpin(&self.name, &p);
            }
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
        report: DmaReport,
    ) -> Result<Self, SetupError> {
        let policy_guard = policy.disable_uncoordinated(name)?;
        // The veto index of every managed region, in place before the
        // bridge registers as a listener (which may ask it at once).
        let managed = mem
            .regions()
            .iter()
            .filter_map(|region| {
                let manager = region.manager()?;
                let shift = manager.granularity().trailing_zeros();
                let granules = region.range().len().div_ceil(manager.granularity());
                Some(Granules {
                    region: region.range(),
                    shift,
                    pins: vec![0; granules as usize],
                })
            })
            .collect();
        let session = mapper.clone().session();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mapper,
            guard,
            warned: AtomicBool::new(false),
            table: Mutex::new(PinTable {
                by_id: Vec::new(),
                managed,
                bytes: 0,
                session,
            }),
            mem: mem.clone(),
            policy: policy.clone(),
            bypass: Mutex::new(None),
            report,
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

    /// Whether the endpoint bypasses translation now, all populated RAM
    /// mapped as on path 1.
    pub fn in_bypass(&self) -> bool {
        self.shared.bypass().is_some()
    }

    /// Bytes of the live pinned mappings of the guest's IOMMU, by the
    /// bridge's own record (outside bypass, the backend's
    /// [`DmaMapper::pinned_bytes`] must agree).
    pub fn pinned_bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The guest-physical ranges currently pinned, in ascending order.
    pub fn pinned_ranges(&self) -> Vec<GuestRange> {
        let table = self.shared.lock();
        let mut pinned: Vec<(u64, u64, GuestRange)> = table
            .by_id
            .iter()
            .flatten()
            .map(|p| (p.phys, p.iova, p.phys_range()))
            .collect();
        pinned.sort_unstable_by_key(|&(phys, iova, _)| (phys, iova));
        pinned.into_iter().map(|(_, _, range)| range).collect()
    }
}

impl Drop for ViommuDmaBridge {
    fn drop(&mut self) {
        // Normally gone already (unregistering the notifier ends bypass).
        drop(self.shared.bypass().take());
        for (manager, id) in self.registered.drain(..) {
            manager.unregister_listener(id);
        }
        let mut table = self.shared.lock();
        for p in std::mem::take(&mut table.by_id).into_iter().flatten() {
            table.unpin(&self.shared.name, &p);
        }
        table.bytes = 0;
        table.managed.iter_mut().for_each(|g| g.pins.fill(0));
    }
}

#[cfg(test)]
mod tests {
    use memvisor_iommu::{MapCause, MapFlags, UnmapCause};
    use memvisor_memory::discard::BlockDiscardManager;
    use memvisor_memory::{Backing, RamBlock};

    use super::*;
    use crate::mapper::{PinBudget, vm_pin_kib};
    use crate::test_util::serial;
    use crate::uring::UringPinner;

    const MIB: u64 = 1 << 20;
    const HOT: u64 = 1 << 32;

    struct Fixture {
        mem: GuestMemoryMap,
        manager: Arc<BlockDiscardManager>,
        hot: Arc<RamBlock>,
        pinner: Arc<UringPinner>,
        bridge: ViommuDmaBridge,
    }

    /// 2 MiB of plain RAM at 0 and 8 MiB of managed RAM at [`HOT`] (blocks
    /// of 2 MiB, the first two plugged), and a bridge on an io_uring pinner.
    fn fixture(guard: UnplugGuard) -> Fixture {
        let boot = Arc::new(RamBlock::new("boot", 2 * MIB, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("hot", 8 * MIB, Backing::Memfd).unwrap());
        let region = GuestRange::new(HOT, 8 * MIB).unwrap();
        let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
        let mem = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(HOT, hot.clone(), manager.clone())
            .unwrap()
            .build()
            .unwrap();
        let plugged = GuestRange::new(HOT, 4 * MIB).unwrap();
        manager.write().plug(plugged, || Ok::<_, ()>(()), |_| {}).unwrap();
        let pinner = Arc::new(UringPinner::new("dev", Arc::new(PinBudget::unlimited())));
        let bridge = ViommuDmaBridge::attach(
            "dev",
            &mem,
            pinner.clone(),
            &DiscardPolicy::new(),
            guard,
            DmaReport::default(),
        )
        .unwrap();
        Fixture {
            mem,
            manager,
            hot,
            pinner,
            bridge,
        }
    }

    fn block(n: u64) -> GuestRange {
        GuestRange::new(HOT + n * 2 * MIB, 2 * MIB).unwrap()
    }

    impl Fixture {
        /// `notify_map` of `[iova, +size)` onto `phys` as mapping `id`, as
        /// the IOMMU makes it: under the manager's read guard for managed
        /// memory.
        fn map(&self, id: u32, iova: u64, phys: u64, size: u64, flags: MapFlags) -> Result<(), NotifierRefusal> {
            let range = GuestRange::new(phys, size).unwrap();
            let host = if flags.mmio() {
                None
            } else {
                self.mem.lookup(range).ok()
            };
            let view = host.as_ref().and_then(|h| h.region.manager()).map(|m| m.populated());
            let event = MapEvent {
                endpoint: 8,
                domain: 1,
                id: MappingId(id),
                iova,
                size,
                phys,
                flags,
                cause: MapCause::Map,
                host,
                populated: view.as_ref(),
            };
            self.bridge.notifier().notify_map(&event)
        }

        fn unmap(&self, id: u32, iova: u64, phys: u64, size: u64, flags: MapFlags) {
            self.bridge.notifier().notify_unmap(&UnmapEvent {
                endpoint: 8,
                domain: 1,
                id: MappingId(id),
                iova,
                size,
                phys,
                flags,
                cause: UnmapCause::Unmap,
            });
        }

        fn unplug(&self, range: GuestRange, force: bool) -> bool {
            let hot = &self.hot;
            self.manager
                .write()
                .unplug(range, force, |r| hot.discard(r.start() - HOT, r.len()).unwrap())
                .is_ok()
        }
    }

    const RW: MapFlags = MapFlags::from_bits(3).unwrap();

    #[test]
    fn pins_are_counted_per_block_and_veto_exactly_their_blocks() {
        let _g = serial();
        let f = fixture(UnplugGuard::Reject);
        let before = vm_pin_kib();
        // Two mappings into block 1 (one IOVA each), one into plain RAM.
        f.map(3, 0x1000, HOT + 2 * MIB, 4096, RW).unwrap();
        f.map(0, 0x2000, HOT + 3 * MIB, 8192, RW).unwrap();
        f.map(9, 0x10_0000, 0, 4096, MapFlags::READ).unwrap();
        assert_eq!(f.bridge.pinned_bytes(), 16384);
        assert_eq!(f.pinner.pinned_bytes(), 16384);
        assert_eq!(vm_pin_kib() - before, 16);
        assert_eq!(
            f.bridge.pinned_ranges(),
            [
                GuestRange::new(0, 4096).unwrap(),
                GuestRange::new(HOT + 2 * MIB, 4096).unwrap(),
                GuestRange::new(HOT + 3 * MIB, 8192).unwrap(),
            ]
        );
        // An id that is live already is refused, and pins nothing.
        assert_eq!(f.map(3, 0x9000, HOT, 4096, RW), Err(NotifierRefusal::Invalid));
        assert_eq!(f.pinner.pinned_bytes(), 16384);
        // Block 0 holds no pin; block 1 holds two.
        assert!(f.unplug(block(0), false));
        assert!(!f.unplug(block(1), false));
        f.unmap(3, 0x1000, HOT + 2 * MIB, 4096, RW);
        assert!(!f.unplug(block(1), false), "one pin is left in the block");
        f.unmap(0, 0x2000, HOT + 3 * MIB, 8192, RW);
        assert!(f.unplug(block(1), false));
        assert_eq!(f.bridge.pinned_ranges(), [GuestRange::new(0, 4096).unwrap()]);
        // An unmap the bridge holds nothing for changes nothing.
        f.unmap(3, 0x1000, HOT + 2 * MIB, 4096, RW);
        f.unmap(9, 0x10_0000, 0, 4096, MapFlags::READ);
        assert_eq!((f.bridge.pinned_bytes(), f.pinner.pinned_bytes()), (0, 0));
        assert_eq!(vm_pin_kib(), before);
    }

    #[test]
    fn unplugged_memory_and_mmio_are_never_pinned() {
        let _g = serial();
        let f = fixture(UnplugGuard::Reject);
        // Block 2 is not plugged: refused under the guard, nothing pinned.
        assert_eq!(f.map(1, 0x1000, HOT + 4 * MIB, 4096, RW), Err(NotifierRefusal::Invalid));
        // MMIO: accepted, never pinned nor recorded.
        let mmio = MapFlags::READ | MapFlags::MMIO;
        f.map(2, 0x2000, 0xfe00_0000, 4096, mmio).unwrap();
        assert_eq!((f.bridge.pinned_bytes(), f.pinner.pinned_bytes()), (0, 0));
        f.unmap(2, 0x2000, 0xfe00_0000, 4096, mmio);
        assert!(f.unplug(block(0), false));
    }

    #[test]
    fn a_forced_unplug_drops_the_pins_and_the_later_unmap_is_a_no_op() {
        let _g = serial();
        let f = fixture(UnplugGuard::Reject);
        f.map(4, 0x1000, HOT + 2 * MIB, 4096, RW).unwrap();
        f.map(5, 0x2000, HOT, 4096, RW).unwrap();
        assert!(f.unplug(block(1), true), "a reset's unplug is forced");
        assert_eq!(f.bridge.pinned_ranges(), [GuestRange::new(HOT, 4096).unwrap()]);
        assert_eq!(f.pinner.pinned_bytes(), 4096);
        assert_eq!(
            f.hot.resident_bytes(2 * MIB, 2 * MIB).unwrap(),
            0,
            "the block really went"
        );
        f.unmap(4, 0x1000, HOT + 2 * MIB, 4096, RW);
        assert_eq!(f.pinner.pinned_bytes(), 4096);
        // The id is free again for the IOMMU's next mapping.
        f.map(4, 0x3000, HOT + MIB, 4096, RW).unwrap();
        assert_eq!(f.pinner.pinned_bytes(), 8192);
        // Dropping the bridge unpins the rest.
        drop(f.bridge);
        assert_eq!(f.pinner.pinned_bytes(), 0);
    }

    #[test]
    fn the_warn_guard_lets_the_unplug_through_and_keeps_the_pin() {
        let _g = serial();
        let f = fixture(UnplugGuard::Warn);
        f.map(0, 0x1000, HOT + 2 * MIB, 4096, RW).unwrap();
        assert!(f.unplug(block(1), false));
        assert_eq!(f.pinner.pinned_bytes(), 4096, "pinned until the guest unmaps");
        f.unmap(0, 0x1000, HOT + 2 * MIB, 4096, RW);
        assert_eq!((f.bridge.pinned_bytes(), f.pinner.pinned_bytes()), (0, 0));
    }
}
