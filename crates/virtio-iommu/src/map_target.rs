//! Where a MAP onto unplugged memory is refused — and a MAP onto anything
//! else that is not populated guest RAM: a hole in the memory map, a range
//! that leaves its region, an MMIO-flagged mapping over RAM.
//!
//! Every path that makes a mapping visible to a notifier resolves the
//! mapping's target here, through [`resolve`], before any notifier is
//! told (`notify::deliver_map` is the only caller): a MAP request, an
//! ATTACH or a registration replaying a domain's mappings, a state load
//! restoring them. A refusal is a [`MapRefusal`], which a MAP answers
//! with [`MapRefusal::status`].
//!
//! * An MMIO-flagged mapping must not overlap any RAM region
//!   ([`MapRefusal::MmioOverRam`]): RAM is mapped as RAM, so that it is
//!   checked and pinned. MMIO is neither.
//! * Any other mapping needs the guest memory map
//!   ([`MapRefusal::NoMemoryMap`]) and a target inside one RAM region
//!   ([`MapRefusal::NotRam`]: a hole, a range across two regions).
//! * In a region a discard manager owns (a virtio-mem region), every block
//!   of the target must be plugged ([`MapRefusal::NotPopulated`]). The
//!   check is made under the manager's read guard, and the [`MapTarget`]
//!   it returns keeps holding that guard: the notifiers are told — and pin
//!   — under the same guard, so no unplug slips between the check and the
//!   pin (DESIGN.md rule 3).
//!
//! # Locking
//!
//! Called with the device lock held; takes the discard manager's read
//! lock. The lock order is *IOMMU device → discard manager (read) →
//! notifier's own locks*; see the `memvisor-iommu` contract.

use memvisor_iommu::NotifierRefusal;
use memvisor_memory::GuestRange;
use memvisor_memory::discard::PopulatedView;
use memvisor_memory::map::{GuestMemoryMap, HostRange, MapError, Region};

use crate::mapping::Mapping;
use crate::wire::Status;

/// Why a mapping was not made visible (a MAP answered with an error, an
/// ATTACH, registration or state load that failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapRefusal {
    /// The guest-physical range is not inside one RAM region.
    #[error("guest-physical range [{phys:#x}, +{size:#x}) is not RAM: {reason}")]
    NotRam {
        /// First guest-physical address.
        phys: u64,
        /// Bytes.
        size: u64,
        /// What the memory map said.
        reason: String,
    },
    /// Part of the range is discarded (an unplugged memory-device block).
    #[error("guest-physical range {0} is not entirely populated")]
    NotPopulated(GuestRange),
    /// An MMIO-flagged mapping onto RAM: RAM must be mapped as RAM, so that
    /// it is checked and pinned.
    #[error("MMIO mapping [{phys:#x}, +{size:#x}) overlaps guest RAM")]
    MmioOverRam {
        /// First guest-physical address.
        phys: u64,
        /// Bytes.
        size: u64,
    },
    /// The device has no guest memory map yet (not activated, none given).
    #[error("no guest memory map to check the mapping against")]
    NoMemoryMap,
    /// A notifier refused the mapping.
    #[error("notifier '{notifier}' of endpoint {endpoint} refused the mapping: {refusal}")]
    Notifier {
        /// The notifier's name.
        notifier: String,
        /// Its endpoint.
        endpoint: u32,
        /// Why it refused.
        refusal: NotifierRefusal,
    },
}

impl MapRefusal {
    /// The status a request refused for this reason is answered with.
    pub fn status(&self) -> Status {
        match self {
            Self::Notifier { refusal, .. } => match refusal {
                NotifierRefusal::NoResources => Status::NoMem,
                NotifierRefusal::Invalid => Status::Inval,
                NotifierRefusal::OutOfRange => Status::Range,
                NotifierRefusal::Failed => Status::DevErr,
            },
            Self::NoMemoryMap => Status::DevErr,
            _ => Status::Inval,
        }
    }
}

/// The target of a mapping that may be made visible, as [`resolve`] found
/// it.
pub(crate) enum MapTarget<'a> {
    /// An MMIO mapping, clear of RAM: no host memory, nothing to pin.
    Mmio,
    /// Populated guest RAM.
    Ram {
        /// Where the target is in host memory.
        host: HostRange<'a>,
        /// For a region a discard manager owns, the manager's read guard
        /// under which the whole target was found populated; the
        /// notifications must happen while it is held. `None` for plain
        /// RAM.
        populated: Option<PopulatedView<'a>>,
    },
}

/// Checks that the target of `m` may be made visible: MMIO clear of RAM,
/// or guest RAM that is populated now, checked under the manager's read
/// guard that the returned [`MapTarget`] holds.
pub(crate) fn resolve<'a>(mem: Option<&'a GuestMemoryMap>, m: &Mapping) -> Result<MapTarget<'a>, MapRefusal> {
    let size = m.size();
    if m.flags.mmio() {
        if let Some(mem) = mem {
            let end = m.phys_start + (size - 1);
            if mem
                .regions()
                .iter()
                .any(|r| r.range().start() <= end && m.phys_start < r.range().end())
            {
                return Err(MapRefusal::MmioOverRam {
                    phys: m.phys_start,
                    size,
                });
            }
        }
        return Ok(MapTarget::Mmio);
    }
    let mem = mem.ok_or(MapRefusal::NoMemoryMap)?;
    let not_ram = |reason: String| MapRefusal::NotRam {
        phys: m.phys_start,
        size,
        reason,
    };
    let range = GuestRange::new(m.phys_start, size).ok_or_else(|| not_ram("the range wraps".into()))?;
    // `find` rather than `lookup`: the same search without building an
    // error; only a refusal asks `lookup` for its words.
    let Some((_, region)) = mem.find(range) else {
        let reason = mem
            .lookup(range)
            .err()
            .map_or_else(String::new, |e: MapError| e.to_string());
        return Err(not_ram(reason));
    };
    let region: &'a Region = region;
    let offset = range.start() - region.range().start();
    let host = HostRange {
        region,
        guest: range,
        host_address: region.host_address() + offset,
        block_offset: region.block_offset() + offset,
    };
    let populated = match region.manager() {
        None => None,
        Some(manager) => {
            let view = manager.populated();
            if !view.is_populated(range) {
                return Err(MapRefusal::NotPopulated(range));
            }
            Some(view)
        }
    };
    Ok(MapTarget::Ram { host, populated })
}
