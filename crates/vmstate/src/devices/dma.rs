//! The DMA section: configuration only; pins are re-derived on load.
//!
//! A [`DmaDevice`] is one DMA-capable device's attachment to guest memory:
//! path 1 ([`DmaPath::Ram`], a [`RamDmaListener`] mapping all populated RAM
//! at its guest-physical address) or path 2 ([`DmaPath::Viommu`], a
//! [`ViommuDmaBridge`] registered as the notifier of a virtio-iommu
//! endpoint). Its [`DmaSection`] carries only that configuration. On load
//! it checks that its predecessors were restored — the IOMMU, every
//! region's contents and discard manager — and once the whole stream was
//! read and checked ([`Section::post_load`]) it attaches again: the
//! listener replays the populated blocks, or the IOMMU replays the
//! endpoint's mappings on registration, and that pins them. Nothing about
//! pins is trusted from the stream.

use std::fmt;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_dma::mapper::DmaMapper;
use memvisor_dma::ram_listener::{RamDmaListener, SetupError};
use memvisor_dma::viommu_bridge::{UnplugGuard, ViommuDmaBridge};
use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::DiscardPolicy;
use memvisor_virtio_iommu::{IommuHandle, NotifierError, NotifierId};
use serde::{Deserialize, Serialize};

use crate::context::LoadContext;
use crate::devices::decode;
use crate::devices::virtio_iommu::VIRTIO_IOMMU_SECTION;
use crate::error::{SectionError, SectionId};
use crate::section::{Phase, Priority, Section};

/// Name of the DMA sections.
pub const DMA_SECTION: &str = "dma";
/// Version of the DMA section's payload.
pub const DMA_VERSION: u16 = 1;

/// How a DMA-capable device reaches guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaPath {
    /// Path 1, no vIOMMU: every populated byte of RAM is mapped at its
    /// guest-physical address.
    Ram,
    /// Path 2: the device is an endpoint of a virtio-iommu and sees only
    /// what the guest maps there.
    Viommu {
        /// Instance of the IOMMU's section (the IOMMU it is behind).
        iommu_instance: u32,
        /// The endpoint ID.
        endpoint: u32,
        /// What an unplug under a live mapping does.
        guard: UnplugGuard,
    },
}

/// The payload: configuration only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum DmaConfig {
    Detached,
    Ram,
    Viommu {
        iommu_instance: u32,
        endpoint: u32,
        warn_on_unplug: bool,
    },
}

impl From<Option<DmaPath>> for DmaConfig {
    fn from(path: Option<DmaPath>) -> Self {
        match path {
            None => Self::Detached,
            Some(DmaPath::Ram) => Self::Ram,
            Some(DmaPath::Viommu {
                iommu_instance,
                endpoint,
                guard,
            }) => Self::Viommu {
                iommu_instance,
                endpoint,
                warn_on_unplug: guard == UnplugGuard::Warn,
            },
        }
    }
}

impl From<DmaConfig> for Option<DmaPath> {
    fn from(config: DmaConfig) -> Self {
        match config {
            DmaConfig::Detached => None,
            DmaConfig::Ram => Some(DmaPath::Ram),
            DmaConfig::Viommu {
                iommu_instance,
                endpoint,
                warn_on_unplug,
            } => Some(DmaPath::Viommu {
                iommu_instance,
                endpoint,
                guard: if warn_on_unplug {
                    UnplugGuard::Warn
                } else {
                    UnplugGuard::Reject
                },
            }),
        }
    }
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
    pub iommu: Option<IommuHandle>,
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
        source: NotifierError,
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
        iommu: IommuHandle,
        id: NotifierId,
    },
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Unregister first, so that the IOMMU forgets the notifier (and
        // unmaps through it) before the bridge unpins whatever is left.
        if let Attachment::Viommu { iommu, id, .. } = self {
            iommu.unregister_notifier(*id);
        }
    }
}

struct DmaInner {
    name: String,
    target: DmaTarget,
    path: Option<DmaPath>,
    attachment: Option<Attachment>,
}

/// One DMA-capable device's attachment; cheap to clone (shared). See the
/// [module documentation](self).
#[derive(Clone)]
pub struct DmaDevice {
    inner: Arc<Mutex<DmaInner>>,
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
            inner: Arc::new(Mutex::new(DmaInner {
                name: name.to_string(),
                target,
                path: None,
                attachment: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DmaInner> {
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
                let iommu = t
                    .iommu
                    .clone()
                    .ok_or_else(|| DmaAttachError::NoIommu { device: name.clone() })?;
                let bridge = ViommuDmaBridge::attach(&name, &t.memory, t.mapper.clone(), &t.policy, guard).map_err(
                    |source| DmaAttachError::Setup {
                        device: name.clone(),
                        source,
                    },
                )?;
                let id = iommu.register_notifier(endpoint, bridge.notifier()).map_err(|source| {
                    DmaAttachError::Notifier {
                        device: name.clone(),
                        endpoint,
                        source,
                    }
                })?;
                Attachment::Viommu { bridge, iommu, id }
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
        DmaSection {
            instance,
            device: self.clone(),
            pending: None,
            attached_by_load: false,
        }
    }
}

/// The migration section of a [`DmaDevice`]; see the
/// [module documentation](self). Device phase, [`Priority::DMA`].
#[derive(Debug)]
pub struct DmaSection {
    instance: u32,
    device: DmaDevice,
    pending: Option<Option<DmaPath>>,
    attached_by_load: bool,
}

impl Section for DmaSection {
    fn name(&self) -> &str {
        DMA_SECTION
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        DMA_VERSION
    }

    fn priority(&self) -> Priority {
        Priority::DMA
    }

    fn phase(&self) -> Phase {
        Phase::Device
    }

    fn max_payload(&self) -> u64 {
        64
    }

    fn pre_load(&mut self) {
        // Whatever is attached is replaced, and must not keep pins while
        // RAM is loaded (and discarded) under it.
        self.device.detach();
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        out.write_all(&postcard::to_allocvec(&DmaConfig::from(self.device.path()))?)?;
        Ok(())
    }

    fn load(&mut self, ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let config: DmaConfig = decode(payload)?;
        let path: Option<DmaPath> = config.into();
        let id = self.id();
        if let Some(DmaPath::Viommu { iommu_instance, .. }) = path {
            ctx.require(
                &id,
                &SectionId::new(VIRTIO_IOMMU_SECTION, iommu_instance),
                "its pins are re-derived from the IOMMU's restored mappings",
            )?;
            if self.device.lock().target.iommu.is_none() {
                return Err(SectionError::Invalid(format!(
                    "DMA device '{}' is behind IOMMU instance {iommu_instance} in the stream, but has no IOMMU here",
                    self.device.name()
                )));
            }
        }
        if path.is_some() {
            let regions: Vec<GuestRange> = self
                .device
                .lock()
                .target
                .memory
                .regions()
                .iter()
                .map(|r| r.range())
                .collect();
            for range in regions {
                ctx.require_manager(&id, range, "decides what may be pinned")?;
                ctx.require_ram(&id, range, "would otherwise be discarded under the pins")?;
            }
        }
        self.pending = Some(path);
        Ok(())
    }

    fn post_load(&mut self, _ctx: &LoadContext) -> Result<(), SectionError> {
        match self.pending.take() {
            Some(Some(path)) => {
                self.device.attach(path).map_err(SectionError::device)?;
                self.attached_by_load = true;
            }
            Some(None) => self.device.detach(),
            None => {}
        }
        Ok(())
    }

    fn abort_load(&mut self) {
        self.pending = None;
        if std::mem::take(&mut self.attached_by_load) {
            self.device.detach();
        }
    }
}
