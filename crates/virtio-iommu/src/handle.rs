//! The VMM's side of the device: [`IommuHandle`] — topology (endpoint
//! hotplug), notifier registration (also as the neutral
//! [`NotifierRegistry`]), memory, translation for emulated devices,
//! inspection, system reset and, in `persist.rs`, migration state.
//!
//! # Locking
//!
//! All state lives behind one mutex, the device lock, shared by the
//! [`VirtioIommu`](crate::VirtioIommu) (what the transport drives) and
//! every [`IommuHandle`] (what the VMM, the DMA layer and emulated devices
//! use). The lock order is *IOMMU device → discard manager (read) →
//! notifier's own locks*; see the `memvisor-iommu` contract.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_iommu::{IommuNotifier, NotifierId, NotifierRegistry, RegisterError, UnmapCause};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::VirtioCommon;

use crate::effects::DeviceModel;
use crate::fault::{Access, Fault, FaultKind, Translation};
use crate::mapping::Mapping;
use crate::notify::NotifierError;

/// Everything the device lock guards: the transport's common state
/// (features, status, queues) and the device model.
pub(crate) struct Shared {
    pub(crate) common: VirtioCommon,
    pub(crate) model: DeviceModel,
}

/// A shared handle on a virtio-iommu device, for the VMM (topology,
/// notifiers, migration) and for emulated devices (translation). Cheap to
/// clone; every method takes the device lock.
#[derive(Clone)]
pub struct IommuHandle {
    shared: Arc<Mutex<Shared>>,
}

impl fmt::Debug for IommuHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.lock();
        f.debug_struct("IommuHandle")
            .field("common", &shared.common)
            .field("endpoints", &shared.model.endpoints.len())
            .field("domains", &shared.model.domains.len())
            .finish()
    }
}

impl IommuHandle {
    /// A handle on a new device lock guarding `shared`.
    pub(crate) fn new(shared: Shared) -> Self {
        Self {
            shared: Arc::new(Mutex::new(shared)),
        }
    }

    /// Takes the device lock (a poisoned lock is taken as is).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Registers `notifier` for `endpoint` and replays the mappings the
    /// endpoint sees now (as [`MapCause::Register`](memvisor_iommu::MapCause::Register));
    /// if one is refused the replayed ones are unmapped again and nothing
    /// is registered.
    pub fn register_notifier(
        &self,
        endpoint: u32,
        notifier: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierId, NotifierError> {
        self.lock().model.register_notifier(endpoint, notifier)
    }

    /// Unregisters a notifier, sending it `notify_unmap` for every mapping
    /// it sees now. Returns `false` for an unknown id.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        self.lock().model.unregister_notifier(id)
    }

    /// Adds an endpoint to the topology (hotplug). Returns `false` if it exists.
    pub fn add_endpoint(&self, endpoint: u32) -> bool {
        self.lock().model.add_endpoint(endpoint)
    }

    /// Gives the device the guest memory map (activation does too), so that
    /// translation and state loading work before activation.
    pub fn set_memory(&self, mem: GuestMemoryMap) {
        self.lock().model.mem = Some(mem);
    }

    /// Translates an access of `endpoint` at `iova` for an emulated device.
    ///
    /// A fault (except for an unknown endpoint) is reported to the driver on
    /// the event queue; if the driver has no buffer there, it is counted
    /// ([`dropped_faults`](Self::dropped_faults)) and logged, rate-limited.
    /// The answer is valid at the time of the call: a caller that must
    /// exclude a concurrent unplug holds the region manager's view itself.
    pub fn translate(&self, endpoint: u32, iova: u64, access: Access) -> Result<Translation, Fault> {
        let mut shared = self.lock();
        let result = shared.model.translate(endpoint, iova, access);
        if let Err(fault) = &result
            && fault.kind != FaultKind::UnknownEndpoint
        {
            shared.report_fault(fault);
        }
        result
    }

    /// A receiver of every translation fault from now on (those of unknown
    /// endpoints excepted), whether or not the driver had a buffer for its
    /// report. Dropping it unsubscribes.
    pub fn subscribe_faults(&self) -> std::sync::mpsc::Receiver<Fault> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.lock().model.fault_subscribers.push(tx);
        rx
    }

    /// Translation faults met so far, reported to the driver or dropped.
    pub fn faults(&self) -> u64 {
        self.lock().model.faults
    }

    /// Translation faults `endpoint` met so far; `None` for an endpoint
    /// the IOMMU does not have.
    pub fn endpoint_faults(&self, endpoint: u32) -> Option<u64> {
        self.lock().model.endpoints.get(&endpoint).map(|ep| ep.faults)
    }

    /// Fault reports dropped because the driver had no event buffer.
    pub fn dropped_faults(&self) -> u64 {
        self.lock().model.dropped_faults
    }

    /// The domain `endpoint` is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.lock().model.endpoints.get(&endpoint).and_then(|ep| ep.domain)
    }

    /// The IDs of the domains that exist.
    pub fn domains(&self) -> Vec<u32> {
        self.lock().model.domains.keys().copied().collect()
    }

    /// The mappings of `domain` in ascending IOVA order, `None` if it does
    /// not exist.
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.lock()
            .model
            .domains
            .get(&domain)
            .map(|d| d.mappings.iter().copied().collect())
    }

    /// Mappings that exist in their domain but that no notifier was told
    /// of, so that nothing pins them: restored by a state load over memory
    /// that was no longer populated ([`Mapping::notified`]). They stay
    /// until the guest unmaps them or the device resets.
    pub fn unnotified_mappings(&self) -> usize {
        self.lock()
            .model
            .domains
            .values()
            .map(|d| d.mappings.iter().filter(|m| !m.notified).count())
            .sum()
    }

    /// The current `bypass` config value.
    pub fn bypass(&self) -> bool {
        self.lock().model.bypass
    }

    /// System reset: every endpoint is detached (notifiers get
    /// `notify_unmap`) and `bypass` returns to its configured value.
    pub fn system_reset(&self) {
        let mut shared = self.lock();
        // `bypass` returns to its configured value first, so that a detached
        // endpoint's notifiers learn the final state only.
        let bypass = shared.model.options.bypass;
        shared.model.bypass = bypass;
        shared.model.detach_all(UnmapCause::Reset);
        shared.model.set_bypass(bypass);
    }

    /// Runs `f` on the device model (for [`crate::persist`]).
    pub(crate) fn with_model<R>(&self, f: impl FnOnce(&mut DeviceModel) -> R) -> R {
        f(&mut self.lock().model)
    }
}

impl NotifierRegistry for IommuHandle {
    fn register_notifier(&self, endpoint: u32, notifier: Arc<dyn IommuNotifier>) -> Result<NotifierId, RegisterError> {
        IommuHandle::register_notifier(self, endpoint, notifier).map_err(|e| match e {
            NotifierError::UnknownEndpoint(endpoint) => RegisterError::UnknownEndpoint(endpoint),
            NotifierError::Refused {
                domain,
                virt_start,
                virt_end,
                refusal,
            } => RegisterError::Replay {
                domain,
                virt_start,
                virt_end,
                reason: refusal.to_string(),
            },
            NotifierError::Bypass { endpoint, refusal } => RegisterError::Bypass {
                endpoint,
                reason: refusal.to_string(),
            },
        })
    }

    fn unregister_notifier(&self, id: NotifierId) -> bool {
        IommuHandle::unregister_notifier(self, id)
    }
}
