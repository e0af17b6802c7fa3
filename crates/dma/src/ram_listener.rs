//! Path 1, no vIOMMU: an assigned device sees guest-physical addresses, so
//! every byte of guest RAM that is populated must be mapped at its
//! guest-physical address — and nothing that is discarded.
//!
//! [`RamDmaListener`] maps plain RAM regions whole. For a region with a
//! [`RamDiscardManager`] it registers as a listener instead: populated
//! granules are mapped one granule per mapping (so each can be unmapped
//! alone), discards unmap before the memory is discarded (one unmap call per
//! discarded run), and a failed map rolls back and refuses the populate, so
//! the plug is answered BUSY.

use std::fmt;
use std::sync::{Arc, Mutex};

use memvisor_memory::GuestRange;
use memvisor_memory::discard::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::{DiscardGuard, DiscardPolicy, PolicyError};

use crate::mapper::{DmaError, DmaMapper, Permissions};

/// Why a [`RamDmaListener`] could not be attached. Nothing stays mapped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The worst case needs more mappings than the backend allows.
    #[error(
        "mapper '{mapper}' allows {max} mappings, but the worst case needs {needed} ({granules} granules of managed RAM plus {others} other mappings); {advice}"
    )]
    TooManyMappings {
        /// The backend.
        mapper: String,
        /// Its maximum.
        max: u64,
        /// The worst case.
        needed: u64,
        /// Granule mappings the managed regions may need.
        granules: u64,
        /// Plain-region and pre-existing mappings.
        others: u64,
        /// Which block size would fit.
        advice: String,
    },
    /// The discard policy forbids it.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Mapping a plain RAM region failed.
    #[error("mapping RAM region {region}: {source}")]
    Map {
        /// The region.
        region: GuestRange,
        /// The backend's error.
        source: DmaError,
    },
    /// Registering with a region's discard manager failed.
    #[error("registering with the discard manager of {region}: {reason}")]
    Register {
        /// The region.
        region: GuestRange,
        /// What went wrong.
        reason: String,
    },
}

/// The listener registered with one managed region.
struct RegionListener {
    name: String,
    mapper: Arc<dyn DmaMapper>,
    region: GuestRange,
    host_base: u64,
    granularity: u64,
}

impl RegionListener {
    fn host(&self, gpa: u64) -> u64 {
        self.host_base + (gpa - self.region.start())
    }
}

impl RamDiscardListener for RegionListener {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal> {
        let mut gpa = range.start();
        while gpa < range.end() {
            if let Err(e) = self
                .mapper
                .map(gpa, self.host(gpa), self.granularity, Permissions::READ_WRITE)
            {
                if gpa > range.start()
                    && let Err(undo) = self.mapper.unmap(range.start(), gpa - range.start())
                {
                    log::error!("{}: rolling back maps of {range} failed: {undo}", self.name);
                }
                return Err(Refusal(format!("mapping {:#x} for DMA failed: {e}", gpa)));
            }
            gpa += self.granularity;
        }
        Ok(())
    }

    fn notify_discard(&self, range: GuestRange) {
        // One call for the whole run: the backend removes every granule
        // mapping inside it.
        if let Err(e) = self.mapper.unmap(range.start(), range.len()) {
            log::error!("{}: unmapping {range} before discard failed: {e}", self.name);
        }
    }
}

/// Path 1 of DESIGN.md: keeps a [`DmaMapper`] mapping exactly the populated
/// guest RAM at its guest-physical addresses. Detaches (unmapping
/// everything) when dropped.
pub struct RamDmaListener {
    mapper: Arc<dyn DmaMapper>,
    plain: Vec<GuestRange>,
    registered: Mutex<Vec<(Arc<dyn RamDiscardManager>, ListenerId)>>,
    _policy: DiscardGuard,
}

impl fmt::Debug for RamDmaListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamDmaListener")
            .field("mapper", &self.mapper.name())
            .field("plain", &self.plain)
            .finish()
    }
}

/// The smallest power-of-two block size, at least `from`, at which the
/// managed regions' granules plus `others` fit in `max` mappings.
fn fitting_block_size(managed: &[GuestRange], others: u64, max: u64, from: u64) -> Option<u64> {
    let mut g = from.max(1).next_power_of_two();
    while g != 0 {
        let granules: u64 = managed.iter().map(|r| r.len().div_ceil(g)).sum();
        if granules + others <= max {
            return Some(g);
        }
        g = g.checked_mul(2)?;
    }
    None
}

impl RamDmaListener {
    /// Maps all RAM of `mem` through `mapper` and follows its discard
    /// managers. Holds a guard disabling uncoordinated discard in `policy`.
    ///
    /// Fails — leaving nothing mapped — if the worst case (every granule of
    /// every managed region populated) could exceed the mapper's maximum
    /// number of mappings; the error names a block size that would fit.
    pub fn attach(
        name: &str,
        mem: &GuestMemoryMap,
        mapper: Arc<dyn DmaMapper>,
        policy: &DiscardPolicy,
    ) -> Result<Self, SetupError> {
        let guard = policy.disable_uncoordinated(name)?;
        let limits = mapper.limits();
        let managed: Vec<(GuestRange, u64)> = mem
            .regions()
            .iter()
            .filter_map(|r| r.manager().map(|m| (r.range(), m.granularity())))
            .collect();
        let granules: u64 = managed.iter().map(|(r, g)| r.len() / g).sum();
        let plain_count = (mem.regions().len() - managed.len()) as u64;
        let others = plain_count + mapper.mapping_count();
        if granules + others > limits.max_mappings {
            let ranges: Vec<GuestRange> = managed.iter().map(|(r, _)| *r).collect();
            let smallest = managed.iter().map(|(_, g)| *g).min().unwrap_or(1);
            let advice = match fitting_block_size(&ranges, others, limits.max_mappings, smallest) {
                Some(g) => format!("a block size of {g:#x} ({} MiB) or larger would fit", g >> 20),
                None => "no block size fits".to_string(),
            };
            return Err(SetupError::TooManyMappings {
                mapper: mapper.name().to_string(),
                max: limits.max_mappings,
                needed: granules + others,
                granules,
                others,
                advice,
            });
        }
        let mut this = Self {
            mapper: mapper.clone(),
            plain: Vec::new(),
            registered: Mutex::new(Vec::new()),
            _policy: guard,
        };
        // On any error below, dropping `this` undoes what was done.
        for region in mem.regions() {
            match region.manager() {
                None => {
                    mapper
                        .map(
                            region.range().start(),
                            region.host_address(),
                            region.range().len(),
                            Permissions::READ_WRITE,
                        )
                        .map_err(|source| SetupError::Map {
                            region: region.range(),
                            source,
                        })?;
                    this.plain.push(region.range());
                }
                Some(manager) => {
                    let listener = Arc::new(RegionListener {
                        name: format!("{name}:{:#x}", region.range().start()),
                        mapper: mapper.clone(),
                        region: region.range(),
                        host_base: region.host_address(),
                        granularity: manager.granularity(),
                    });
                    let id = manager
                        .register_listener(listener, region.range())
                        .map_err(|e| SetupError::Register {
                            region: region.range(),
                            reason: e.to_string(),
                        })?;
                    this.registered
                        .get_mut()
                        .expect("not shared yet")
                        .push((manager.clone(), id));
                }
            }
        }
        Ok(this)
    }

    /// The mapper behind it.
    pub fn mapper(&self) -> &Arc<dyn DmaMapper> {
        &self.mapper
    }
}

impl Drop for RamDmaListener {
    fn drop(&mut self) {
        let registered = std::mem::take(self.registered.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (manager, id) in registered {
            manager.unregister_listener(id);
        }
        for range in &self.plain {
            if let Err(e) = self.mapper.unmap(range.start(), range.len()) {
                log::error!("unmapping RAM region {range} on detach failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::PinBudget;
    use crate::test_util::serial;
    use crate::uring::UringPinner;
    use memvisor_memory::discard::{BlockDiscardManager, PlugError};
    use memvisor_memory::{Backing, RamBlock};

    const MIB: u64 = 1 << 20;
    const HOT: u64 = 1 << 32;

    struct Machine {
        mem: GuestMemoryMap,
        manager: Arc<BlockDiscardManager>,
        hot: Arc<RamBlock>,
    }

    fn machine(hot_size: u64, granularity: u64) -> Machine {
        let boot = Arc::new(RamBlock::new("boot", 4 * MIB, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("hot", hot_size, Backing::Memfd).unwrap());
        let manager = Arc::new(BlockDiscardManager::new(GuestRange::new(HOT, hot_size).unwrap(), granularity).unwrap());
        let mem = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(HOT, hot.clone(), manager.clone())
            .unwrap()
            .build()
            .unwrap();
        Machine { mem, manager, hot }
    }

    fn r(start: u64, len: u64) -> GuestRange {
        GuestRange::new(start, len).unwrap()
    }

    impl Machine {
        fn plug(&self, range: GuestRange) -> Result<(), PlugError<std::convert::Infallible>> {
            self.manager
                .write()
                .plug(range, || Ok::<(), std::convert::Infallible>(()), |_| {})
        }
        fn unplug(&self, range: GuestRange) {
            let hot = self.hot.clone();
            self.manager
                .write()
                .unplug(range, false, |x| hot.discard(x.start() - HOT, x.len()).unwrap())
                .unwrap();
        }
    }

    #[test]
    fn maps_boot_ram_and_exactly_the_plugged_granules() {
        let _serial = serial();
        let m = machine(64 * MIB, 2 * MIB);
        m.plug(r(HOT, 4 * MIB)).unwrap();
        let pinner = Arc::new(UringPinner::new("dev", Arc::new(PinBudget::unlimited())));
        let policy = DiscardPolicy::new();
        let listener = RamDmaListener::attach("vfio0", &m.mem, pinner.clone(), &policy).unwrap();
        assert!(policy.is_uncoordinated_discard_disabled());
        // Boot RAM whole (one mapping) plus two 2 MiB granules.
        assert_eq!(pinner.pinned_bytes(), 8 * MIB);
        assert_eq!(pinner.mapping_count(), 3);
        m.plug(r(HOT + 10 * MIB, 6 * MIB)).unwrap();
        assert_eq!((pinner.pinned_bytes(), pinner.mapping_count()), (14 * MIB, 6));
        m.unplug(r(HOT, 16 * MIB));
        assert_eq!((pinner.pinned_bytes(), pinner.mapping_count()), (4 * MIB, 1));
        // The discard was real: the unpinned memory left the host.
        assert_eq!(m.hot.resident_bytes(0, 64 * MIB).unwrap(), 0);
        drop(listener);
        assert_eq!(pinner.pinned_bytes(), 0);
        assert!(!policy.is_uncoordinated_discard_disabled());
        assert_eq!(m.manager.listener_count(), 0);
    }

    #[test]
    fn a_failed_map_refuses_the_plug_and_rolls_back() {
        let _serial = serial();
        let m = machine(64 * MIB, 2 * MIB);
        // Budget: boot RAM plus 3 granules.
        let pinner = Arc::new(UringPinner::new("dev", Arc::new(PinBudget::limited(10 * MIB))));
        let _l = RamDmaListener::attach("vfio0", &m.mem, pinner.clone(), &DiscardPolicy::new()).unwrap();
        let err = m.plug(r(HOT, 8 * MIB)).unwrap_err();
        assert!(err.to_string().contains("pin budget exceeded"), "{err}");
        assert_eq!(
            pinner.pinned_bytes(),
            4 * MIB,
            "granules mapped before the failure were unmapped"
        );
        assert!(!m.manager.is_populated(r(HOT, 2 * MIB)));
        m.plug(r(HOT, 6 * MIB)).unwrap();
        assert_eq!(pinner.pinned_bytes(), 10 * MIB);
    }

    #[test]
    fn mapping_limit_check_names_a_block_size_that_fits() {
        let _serial = serial();
        // 1 GiB of managed RAM in 2 MiB blocks = 512 granules + 1 boot mapping.
        let m = machine(1 << 30, 2 * MIB);
        let pinner = Arc::new(UringPinner::with_max_mappings(
            "small",
            Arc::new(PinBudget::unlimited()),
            300,
        ));
        let err = RamDmaListener::attach("vfio0", &m.mem, pinner.clone(), &DiscardPolicy::new()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                SetupError::TooManyMappings {
                    needed: 513,
                    max: 300,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("a block size of 0x400000 (4 MiB) or larger would fit"),
            "{text}"
        );
        assert_eq!(pinner.pinned_bytes(), 0);
        assert_eq!(fitting_block_size(&[r(0, 1 << 30)], 1, 300, 2 * MIB), Some(4 * MIB));
        assert_eq!(fitting_block_size(&[r(0, 1 << 30)], 300, 300, 2 * MIB), None);
    }

    #[test]
    fn conflicting_policy_is_refused() {
        let _serial = serial();
        let m = machine(8 * MIB, 2 * MIB);
        let policy = DiscardPolicy::new();
        let _balloon = policy.require_uncoordinated("balloon").unwrap();
        let pinner = Arc::new(UringPinner::new("dev", Arc::new(PinBudget::unlimited())));
        let err = RamDmaListener::attach("vfio0", &m.mem, pinner.clone(), &policy).unwrap_err();
        assert!(matches!(err, SetupError::Policy(_)), "{err}");
        assert_eq!(pinner.pinned_bytes(), 0);
    }
}
