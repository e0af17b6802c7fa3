//! The IOMMU notification contract: how the consumers of a guest IOMMU's
//! mappings — the DMA layer of assigned devices, emulated devices with
//! translation caches of their own — learn of the mappings an endpoint can
//! use, and how they refuse one.
//!
//! Neither side owns this crate: an IOMMU device (memvisor's virtio-iommu)
//! implements [`NotifierRegistry`] and calls [`IommuNotifier`]s; a consumer
//! (memvisor's DMA layer) implements [`IommuNotifier`] and answers with a
//! [`NotifierRefusal`] of its own, which the device translates into its wire
//! format. So the DMA layer never speaks virtio, and the device never knows
//! what a pin is.
//!
//! ```
//! use std::sync::Mutex;
//! use memvisor_iommu::{IommuNotifier, MapEvent, MapFlags, NotifierRefusal, UnmapEvent};
//!
//! /// Accepts read-only mappings of at most 1 MiB and counts the live ones.
//! struct Small(Mutex<usize>);
//!
//! impl IommuNotifier for Small {
//!     fn name(&self) -> &str { "small" }
//!     fn notify_map(&self, event: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
//!         if event.size > 1 << 20 {
//!             return Err(NotifierRefusal::NoResources);
//!         }
//!         if event.flags.write() {
//!             return Err(NotifierRefusal::Invalid);
//!         }
//!         *self.0.lock().unwrap() += 1;
//!         Ok(())
//!     }
//!     fn notify_unmap(&self, _event: &UnmapEvent) {
//!         *self.0.lock().unwrap() -= 1;
//!     }
//! }
//! # let _ = MapFlags::READ;
//! ```
//!
//! # Contract
//!
//! A notifier is registered by the VMM for one endpoint
//! ([`NotifierRegistry::register_notifier`]).
//!
//! The IOMMU guarantees:
//! * `notify_map` is called for every mapping that becomes visible to the
//!   endpoint: a MAP on the domain it is attached to, the replay of the
//!   domain's mappings when it is attached (or re-attached) to a domain,
//!   the replay at registration, and the replay when migration state is
//!   loaded. `notify_unmap` is called for every mapping that stops being
//!   visible: UNMAP, DETACH (explicit, or implied by a re-attach), device
//!   reset, unregistration, and the rollback of a refused operation.
//! * A notifier gets `notify_unmap` only for a mapping it accepted, exactly
//!   once, with the same addresses and flags.
//! * For a mapping onto RAM (no [`MapFlags::MMIO`]), the IOMMU resolved the
//!   guest-physical range to a single RAM region ([`MapEvent::host`]) and,
//!   if the region has a discard manager, checked that the whole range is
//!   populated **under the manager's read lock and holds that lock
//!   ([`MapEvent::populated`]) for the whole call** (rule 3 of
//!   `docs/design.md`): no plug or unplug can change the range while the
//!   notifier pins it. A mapping onto discarded memory or a hole is never
//!   notified.
//! * Events of one IOMMU never overlap in time: it holds its own lock while
//!   notifying.
//! * Every event names its mapping with a [`MappingId`]: the same in the
//!   `notify_unmap` as in the `notify_map`, never shared by two live
//!   mappings, and small enough to index a table with.
//!
//! The implementer must:
//! * in `notify_map`, either fully accept the mapping (e.g. pin and map all
//!   of it) or refuse it with a [`NotifierRefusal`] and leave no trace. The
//!   IOMMU then answers the request with an error (a MAP), fails it (an
//!   ATTACH, a registration, a state load), and sends `notify_unmap` to the
//!   notifiers that had already accepted it;
//! * in `notify_unmap`, drop every use of the mapping before returning;
//! * **not call back into the IOMMU or the discard manager** from either
//!   method. The lock order is *IOMMU device → discard manager (read) →
//!   notifier's own locks*; taking the manager's read lock a second time on
//!   this thread can deadlock behind a queued writer, and the device's lock
//!   is not reentrant.
//! * as a [`RamDiscardListener`](memvisor_memory::discard::RamDiscardListener)
//!   of the same memory (the DMA layer is both), decide vetoes and discards
//!   from its own record of the mappings it was told about, never by asking
//!   the IOMMU: listeners run under the manager's write lock, and calling
//!   the IOMMU from there inverts the lock order.
#![deny(missing_docs)]

use std::fmt;
use std::sync::Arc;

use memvisor_memory::discard::PopulatedView;
use memvisor_memory::map::HostRange;

/// The permissions and memory type of a mapping. The bit values are
/// virtio-iommu's `VIRTIO_IOMMU_MAP_F_*`; unknown bits are never set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MapFlags(u32);

impl MapFlags {
    /// Endpoints may read.
    pub const READ: Self = Self(1 << 0);
    /// Endpoints may write.
    pub const WRITE: Self = Self(1 << 1);
    /// The target is memory-mapped I/O, not RAM: never pinned.
    pub const MMIO: Self = Self(1 << 2);
    /// Every known bit.
    pub const ALL: Self = Self(Self::READ.0 | Self::WRITE.0 | Self::MMIO.0);

    /// The flags for `bits`, or `None` if a bit is unknown.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !Self::ALL.0 != 0 {
            None
        } else {
            Some(Self(bits))
        }
    }

    /// The bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True if every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Reads allowed.
    pub const fn read(self) -> bool {
        self.contains(Self::READ)
    }

    /// Writes allowed.
    pub const fn write(self) -> bool {
        self.contains(Self::WRITE)
    }

    /// An MMIO mapping.
    pub const fn mmio(self) -> bool {
        self.contains(Self::MMIO)
    }
}

impl std::ops::BitOr for MapFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for MapFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [(Self::READ, "READ"), (Self::WRITE, "WRITE"), (Self::MMIO, "MMIO")]
            .into_iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| name)
            .collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// Why a mapping becomes visible to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapCause {
    /// A MAP request on the endpoint's domain.
    Map,
    /// The endpoint was attached to a domain that already had mappings.
    Attach,
    /// The notifier was registered while the endpoint had mappings.
    Register,
    /// Migration state was loaded.
    Restore,
}

/// Why a mapping stops being visible to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmapCause {
    /// An UNMAP request.
    Unmap,
    /// The endpoint was detached (DETACH, or a re-attach elsewhere).
    Detach,
    /// Device reset or system reset, or state being replaced by a load.
    Reset,
    /// The notifier is being unregistered.
    Unregister,
    /// An operation that had notified this mapping failed later on.
    Rollback,
}

/// Identifies one live mapping of an IOMMU, so that a notifier finds what
/// it keeps for the mapping without a search.
///
/// The IOMMU guarantees that the [`UnmapEvent`] ending a mapping carries
/// the id of the [`MapEvent`] that made it visible, that no two of its
/// live mappings share an id (whatever their domain), and that ids are
/// small: a freed id is reused, so every id stays below the number of
/// mappings that were ever live at once (a bound the IOMMU's own limits
/// set). A notifier may therefore index a table with it, and needs neither
/// an ordered map nor a hash of guest-chosen addresses per request. An id
/// means nothing once its mapping is gone; it is not migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingId(pub u32);

impl MappingId {
    /// The id as a table index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A mapping that becomes visible to an endpoint; see the
/// [crate documentation](crate) for what the IOMMU guarantees.
#[derive(Debug)]
pub struct MapEvent<'a> {
    /// The endpoint the notifier serves.
    pub endpoint: u32,
    /// The domain the mapping belongs to.
    pub domain: u32,
    /// The mapping, as the [`UnmapEvent`] that ends it names it again.
    pub id: MappingId,
    /// First IOVA.
    pub iova: u64,
    /// Bytes (never 0).
    pub size: u64,
    /// Guest-physical address of `iova`.
    pub phys: u64,
    /// Permissions and memory type.
    pub flags: MapFlags,
    /// Why.
    pub cause: MapCause,
    /// Host side of the target; `None` for MMIO mappings (never pinned).
    pub host: Option<HostRange<'a>>,
    /// The manager's read guard, held by the IOMMU for the whole
    /// notification; `None` for plain RAM (no manager) and MMIO.
    pub populated: Option<&'a PopulatedView<'a>>,
}

/// A mapping that stops being visible to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapEvent {
    /// The endpoint the notifier serves.
    pub endpoint: u32,
    /// The domain the mapping belongs to.
    pub domain: u32,
    /// The mapping: the id its [`MapEvent`] carried.
    pub id: MappingId,
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Guest-physical address of `iova`.
    pub phys: u64,
    /// Permissions and memory type.
    pub flags: MapFlags,
    /// Why.
    pub cause: UnmapCause,
}

/// Why a notifier refused a mapping. The IOMMU device translates it into
/// its own answer (virtio-iommu: a request status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierRefusal {
    /// The consumer is out of a resource: its pin budget, or the number of
    /// mappings it can hold.
    #[error("out of resources (pin budget or mapping limit)")]
    NoResources,
    /// The mapping is not acceptable: its target is not populated RAM, or
    /// it overlaps a mapping the consumer holds.
    #[error("invalid mapping (target not populated RAM, or an overlap)")]
    Invalid,
    /// An address is outside what the consumer can map, or misaligned for
    /// it.
    #[error("address out of range or misaligned for the consumer")]
    OutOfRange,
    /// The consumer failed (its backend returned an error).
    #[error("the consumer failed")]
    Failed,
}

/// A consumer of one endpoint's mappings; see the [crate documentation](crate).
pub trait IommuNotifier: Send + Sync {
    /// A short name used in errors and logs, such as `"vfio0"`.
    fn name(&self) -> &str;

    /// A mapping becomes visible to the endpoint. Accept it fully, or
    /// refuse it and leave no trace.
    fn notify_map(&self, event: &MapEvent<'_>) -> Result<(), NotifierRefusal>;

    /// A mapping the notifier accepted stops being visible: drop every use
    /// of it before returning.
    fn notify_unmap(&self, event: &UnmapEvent);

    /// The endpoint's accesses stop being translated (`bypass` true): it
    /// reaches all of guest-physical memory as if there were no IOMMU — it
    /// is attached to a bypass (identity) domain, or to none while bypass
    /// is on for unattached endpoints — or (`bypass` false) they are
    /// translated again. The IOMMU tells it only on a change, after the
    /// mappings of a domain the endpoint leaves are unmapped and before
    /// those of a domain it joins are replayed, so a notifier never holds
    /// both. Entering bypass may be refused (the IOMMU then fails the
    /// request that caused it, or logs it when nothing can fail); leaving
    /// it may not. The default accepts and does nothing: right for a
    /// notifier that only follows mappings.
    fn notify_bypass(&self, endpoint: u32, bypass: bool) -> Result<(), NotifierRefusal> {
        let _ = (endpoint, bypass);
        Ok(())
    }
}

/// Identifies a notifier registration with one IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotifierId(pub u64);

/// Why [`NotifierRegistry::register_notifier`] failed. Nothing stays
/// registered, and every mapping replayed before the failure was unmapped
/// again.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The endpoint is not part of the IOMMU's topology.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(u32),
    /// The endpoint bypasses translation and the new notifier refused to
    /// follow it ([`IommuNotifier::notify_bypass`]).
    #[error("endpoint {endpoint} bypasses translation, and the notifier refused it: {reason}")]
    Bypass {
        /// The endpoint.
        endpoint: u32,
        /// Why, in the IOMMU's words.
        reason: String,
    },
    /// Replaying one of the endpoint's mappings to the new notifier failed.
    #[error("replaying mapping [{virt_start:#x}, {virt_end:#x}] of domain {domain} failed: {reason}")]
    Replay {
        /// The domain.
        domain: u32,
        /// First IOVA of the mapping.
        virt_start: u64,
        /// Last IOVA of the mapping.
        virt_end: u64,
        /// Why, in the IOMMU's words.
        reason: String,
    },
}

/// An IOMMU that notifiers can be registered with.
pub trait NotifierRegistry: Send + Sync {
    /// Registers `notifier` for `endpoint` and replays the endpoint's
    /// current mappings to it ([`MapCause::Register`]). On error nothing is
    /// registered and the notifier holds no mapping.
    fn register_notifier(&self, endpoint: u32, notifier: Arc<dyn IommuNotifier>) -> Result<NotifierId, RegisterError>;

    /// Unregisters a notifier, sending it `notify_unmap`
    /// ([`UnmapCause::Unregister`]) for every mapping it still holds.
    /// False if `id` was not registered.
    fn unregister_notifier(&self, id: NotifierId) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_refuse_unknown_bits_and_name_what_is_set() {
        assert_eq!(MapFlags::from_bits(8), None);
        let rw = MapFlags::from_bits(3).unwrap();
        assert!(rw.read() && rw.write() && !rw.mmio());
        assert_eq!(format!("{rw:?}"), "READ|WRITE");
        assert_eq!(format!("{:?}", MapFlags::default()), "(none)");
        assert_eq!((MapFlags::READ | MapFlags::MMIO).bits(), 5);
    }
}
