//! How consumers of guest IOMMU mappings — the DMA layer for assigned
//! devices, emulated devices with their own translation caches — learn of
//! map and unmap events for the endpoints they serve.
//!
//! # Contract
//!
//! A notifier is registered by the VMM for one endpoint
//! ([`IommuHandle::register_notifier`](crate::IommuHandle::register_notifier)).
//!
//! The device guarantees:
//! * `notify_map` is called for every mapping that becomes visible to the
//!   endpoint: a MAP on the domain it is attached to, the replay of the
//!   domain's mappings when it is attached (or re-attached) to a domain,
//!   the replay at registration, and the replay when migration state is
//!   loaded. `notify_unmap` is called for every mapping that stops being
//!   visible: UNMAP, DETACH (explicit, or implied by a re-attach), device
//!   reset, unregistration, and the rollback of a refused operation.
//! * A notifier gets `notify_unmap` only for a mapping it accepted, exactly
//!   once, with the same addresses and flags.
//! * For a mapping onto RAM (no [`MapFlags::MMIO`](crate::MapFlags::MMIO)),
//!   the device resolved the guest-physical range to a single RAM region
//!   ([`MapEvent::host`]) and, if the region has a discard manager, checked
//!   that the whole range is populated **under the manager's read lock and
//!   holds that lock ([`MapEvent::populated`]) for the whole call**
//!   (DESIGN.md rule 3): no plug or unplug can change the range while the
//!   notifier pins it. A mapping onto discarded memory or a hole is never
//!   notified.
//! * Events of one device never overlap in time: the device holds its own
//!   lock while notifying.
//!
//! The implementer must:
//! * in `notify_map`, either fully accept the mapping (e.g. pin and map all
//!   of it) or refuse it with a [`Status`] and leave no trace. The device
//!   then answers the request with that status (a MAP), fails it (an
//!   ATTACH, a registration, a state load), and sends `notify_unmap` to the
//!   notifiers that had already accepted it;
//! * in `notify_unmap`, drop every use of the mapping before returning;
//! * **not call back into the IOMMU device or the discard manager** from
//!   either method. The lock order is *IOMMU device → discard manager
//!   (read) → notifier's own locks*; taking the manager's read lock a second
//!   time on this thread can deadlock behind a queued writer, and the
//!   device's lock is not reentrant.
//! * as a [`RamDiscardListener`](memvisor_memory::discard::RamDiscardListener)
//!   of the same memory (the DMA layer is both), decide vetoes and discards
//!   from its own record of the mappings it was told about, never by asking
//!   the device: listeners run under the manager's write lock, and calling
//!   the device from there inverts the lock order.

use memvisor_memory::discard::PopulatedView;
use memvisor_memory::map::HostRange;

use crate::mapping::MapFlags;
use crate::wire::Status;

/// Identifies a notifier registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotifierId(pub(crate) u64);

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

/// A mapping that becomes visible to an endpoint; see the
/// [module documentation](self) for what the device guarantees.
#[derive(Debug)]
pub struct MapEvent<'a> {
    /// The endpoint the notifier serves.
    pub endpoint: u32,
    /// The domain the mapping belongs to.
    pub domain: u32,
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
    /// The manager's read guard, held by the device for the whole
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

/// A consumer of one endpoint's mappings; see the [module documentation](self).
pub trait IommuNotifier: Send + Sync {
    /// A short name used in errors and logs, such as `"vfio0"`.
    fn name(&self) -> &str;

    /// A mapping becomes visible to the endpoint. Accept it fully, or
    /// refuse with the status the request should get (`S_OK` as a refusal
    /// is treated as `S_DEVERR`) and leave no trace.
    fn notify_map(&self, event: &MapEvent<'_>) -> Result<(), Status>;

    /// A mapping the notifier accepted stops being visible: drop every use
    /// of it before returning.
    fn notify_unmap(&self, event: &UnmapEvent);
}
