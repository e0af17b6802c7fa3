//! The attachment of one DMA-capable device to guest memory.
//!
//! A [`DmaDevice`] reaches guest memory through path 1 ([`DmaPath::Ram`], a
//! [`RamDmaListener`] mapping all populated RAM at its guest-physical
//! address) or path 2 ([`DmaPath::Viommu`], a [`ViommuDmaBridge`]
//! registered as the notifier of an IOMMU endpoint). Attaching pins what
//! the path makes reachable; detaching unregisters from the IOMMU first
//! (which unmaps through the bridge) and then unpins what is left. Its
//! migration section is [`DmaSection`].
//!
//! [`RamDmaListener`]: crate::ram_listener::RamDmaListener
//! [`ViommuDmaBridge`]: crate::viommu_bridge::ViommuDmaBridge

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use memvisor_iommu::{NotifierId, NotifierRegistry, RegisterError};
use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::DiscardPolicy;
use memvisor_vmstate::SectionId;

use crate::events::{DmaCounters, DmaCounts, DmaEvents, DmaReport};
use crate::mapper::DmaMapper;
use crate::persist::DmaSection;
use crate::ram_listener::{RamDmaListener, SetupError};
use crate::viommu_bridge::{UnplugGuard, ViommuDmaBridge};

/// How a DMA-capable device reaches guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaPath {
    /// Path 1, no vIOMMU: every populated byte of RAM is mapped at its
    /// guest-physical address.
    Ram,
    /// Path 2: the device is an endpoint of a virtio-iommu and sees only
    /// what the guest maps there.
    /// The IOMMU is the [`DmaTarget`]'s.
    Viommu {
        /// The endpoint ID.
        endpoint: u32,
        /// What an unplug under a live mapping does.
        guard: UnplugGuard,
    },
}

/// What a [`DmaDevice`] attaches to.
#[derive(Clone)]
pub struct DmaTarget {
    /// The guest memory map.
    pub memory: GuestMemoryMap,
    /// The backend that pins (io_uring, VFIO).
    pub mapper: Arc<dyn DmaMapper>,
    /// The VM's discard policy.
    pub policy: DiscardPolicy,
    /// The IOMMU, for [`DmaPath::Viommu`].
    pub iommu: Option<DmaIommu>,
    /// The machine's hub of DMA events.
    pub events: Arc<DmaEvents>,
}

/// The IOMMU a path-2 device is behind: where its notifier registers, and
/// the migration section that restores the IOMMU's mappings (which a DMA
/// section's load depends on).
#[derive(Clone)]
pub struct DmaIommu {
    /// The IOMMU's notifier registry.
    pub registry: Arc<dyn NotifierRegistry>,
    /// The IOMMU's migration section.
    pub section: SectionId,
}

impl fmt::Debug for DmaTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaTarget")
            .field("mapper", &self.mapper.name())
            .field("iommu", &self.iommu.is_some())
            .finish()
    }
}

/// Why a [`DmaDevice`] could not attach. Nothing stays pinned.
#[derive(Debug, thiserror::Error)]
pub enum DmaAttachError {
    /// The listener or bridge could not be set up.
    #[error("DMA device '{device}': {source}")]
    Setup {
        /// The device.
        device: String,
        /// Why.
        source: SetupError,
    },
    /// Registering with the IOMMU (which replays the mappings) failed.
    #[error("DMA device '{device}': registering for endpoint {endpoint}: {source}")]
    Notifier {
        /// The device.
        device: String,
        /// The endpoint.
        endpoint: u32,
        /// Why.
        source: RegisterError,
    },
    /// Path 2 without an IOMMU.
    #[error("DMA device '{device}': path 2 needs an IOMMU, and none was given")]
    NoIommu {
        /// The device.
        device: String,
    },
}

enum Attachment {
    Ram(#[allow(dead_code)] RamDmaListener),
    Viommu {
        bridge: ViommuDmaBridge,
        registry: Arc<dyn NotifierRegistry>,
        id: NotifierId,
    },
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Unregister first, so that the IOMMU forgets the notifier (and
        // unmaps through it) before the bridge unpins whatever is left.
        if let Attachment::Viommu { registry, id, .. } = self {
            registry.unregister_notifier(*id);
        }
    }
}

pub(crate) struct DeviceState {
    pub(crate) name: String,
    pub(crate) target: DmaTarget,
    /// Kept across re-attaching.
    counters: Arc<DmaCounters>,
    path: Option<DmaPath>,
    attachment: Option<Attachment>,
}

/// One DMA-capable device's attachment; cheap to clone (shared). See the
/// [module documentation](self).
#[derive(Clone)]
pub struct DmaDevice {
    inner: Arc<Mutex<DeviceState>>,
}

impl fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("DmaDevice")
            .field("name", &inner.name)
            .field("target", &inner.target)
            .field("path", &inner.path)
            .finish()
    }
}

impl DmaDevice {
    /// A detached device named `name` (used in errors and as the
    /// listener's and notifier's name).
    pub fn new(name: &str, target: DmaTarget) -> Self {
        Self {
            inner: Arc::new(Mutex::new(DeviceState {
                name: name.to_string(),
                target,
                counters: Arc::default(),
                path: None,
                attachment: None,
            })),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches through `path` (detaching first), which pins what the
    /// path makes reachable. On error nothing is attached or pinned.
    pub fn attach(&self, path: DmaPath) -> Result<(), DmaAttachError> {
        let mut inner = self.lock();
        inner.attachment = None;
        inner.path = None;
        let t = inner.target.clone();
        let name = inner.name.clone();
        let attachment = match path {
            DmaPath::Ram => Attachment::Ram(
                RamDmaListener::attach(&name, &t.memory, t.mapper.clone(), &t.policy).map_err(|source| {
                    DmaAttachError::Setup {
                        device: name.clone(),
                        source,
                    }
                })?,
            ),
            DmaPath::Viommu { endpoint, guard, .. } => {
                let registry = t
                    .iommu
                    .as_ref()
                    .map(|i| i.registry.clone())
                    .ok_or_else(|| DmaAttachError::NoIommu { device: name.clone() })?;
                let report = DmaReport {
                    events: t.events.clone(),
                    counters: inner.counters.clone(),
                };
                let bridge = ViommuDmaBridge::attach(&name, &t.memory, t.mapper.clone(), &t.policy, guard, report)
                    .map_err(|source| DmaAttachError::Setup {
                        device: name.clone(),
                        source,
                    })?;
                let id = registry
                    .register_notifier(endpoint, bridge.notifier())
                    .map_err(|source| DmaAttachError::Notifier {
                        device: name.clone(),
                        endpoint,
                        source,
                    })?;
                Attachment::Viommu { bridge, registry, id }
            }
        };
        inner.attachment = Some(attachment);
        inner.path = Some(path);
        Ok(())
    }

    /// Detaches, unpinning everything.
    pub fn detach(&self) {
        let mut inner = self.lock();
        let attachment = inner.attachment.take();
        inner.path = None;
        drop(attachment);
    }

    /// The path it is attached through, if any.
    pub fn path(&self) -> Option<DmaPath> {
        self.lock().path
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.lock().name.clone()
    }

    /// The backend.
    pub fn mapper(&self) -> Arc<dyn DmaMapper> {
        self.lock().target.mapper.clone()
    }

    /// Bytes the backend has pinned.
    pub fn pinned_bytes(&self) -> u64 {
        self.lock().target.mapper.pinned_bytes()
    }

    /// Its refused maps, vetoed unplugs and guard warnings so far.
    pub fn counts(&self) -> DmaCounts {
        self.lock().counters.get()
    }

    /// Whether the device is on path 2 and its endpoint bypasses
    /// translation now (all populated RAM mapped, as on path 1).
    pub fn in_bypass(&self) -> bool {
        matches!(&self.lock().attachment, Some(Attachment::Viommu { bridge, .. }) if bridge.in_bypass())
    }

    /// The guest-physical ranges a path-2 bridge has pinned (`None` on
    /// path 1 or detached).
    pub fn pinned_ranges(&self) -> Option<Vec<GuestRange>> {
        match &self.lock().attachment {
            Some(Attachment::Viommu { bridge, .. }) => Some(bridge.pinned_ranges()),
            _ => None,
        }
    }

    /// The migration section of this device.
    pub fn section(&self, instance: u32) -> DmaSection {
        DmaSection::new(instance, self.clone())
    }
}

/// The outcome of attaching DMA devices on another thread, for the device
/// models that must not move data before it: a zero-copy disk waits on it
/// before its first transfer. Cheap to clone (shared).
#[derive(Clone)]
pub struct AttachLatch(Arc<(Mutex<Option<AttachOutcome>>, Condvar)>);

/// How attaching ended: `Err` holds the error's message.
pub type AttachOutcome = Result<(), String>;

impl AttachLatch {
    /// A latch still waiting for [`finish`](Self::finish).
    pub fn pending() -> Self {
        Self(Arc::new((Mutex::new(None), Condvar::new())))
    }

    /// A latch that is already open: nothing is attaching.
    pub fn open() -> Self {
        let latch = Self::pending();
        latch.finish(Ok(()));
        latch
    }

    /// Records the outcome (the first one counts) and wakes every waiter.
    pub fn finish(&self, outcome: AttachOutcome) {
        let (state, cv) = &*self.0;
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_none() {
            *state = Some(outcome);
        }
        cv.notify_all();
    }

    /// Blocks until the attachments are done; their error, if one failed.
    pub fn wait(&self) -> AttachOutcome {
        let (state, cv) = &*self.0;
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        let state = cv.wait_while(state, |s| s.is_none()).unwrap_or_else(|p| p.into_inner());
        state.clone().expect("waited until finished")
    }

    /// The outcome if finished, without waiting.
    pub fn outcome(&self) -> Option<AttachOutcome> {
        self.0.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl fmt::Debug for AttachLatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AttachLatch").field(&self.outcome()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::AttachLatch;

    #[test]
    fn a_latch_releases_every_waiter_with_the_first_outcome() {
        let latch = AttachLatch::pending();
        assert_eq!(latch.outcome(), None);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let l = latch.clone();
                std::thread::spawn(move || l.wait())
            })
            .collect();
        latch.finish(Err("pinning ram0 failed".into()));
        latch.finish(Ok(()));
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err("pinning ram0 failed".to_string()));
        }
        assert_eq!(latch.wait(), Err("pinning ram0 failed".to_string()));
        assert_eq!(AttachLatch::open().wait(), Ok(()));
    }
}
