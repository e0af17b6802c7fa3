//! The DMA section: configuration only; pins are re-derived on load.
//!
//! A [`DmaDevice`]'s section carries only its path. On load it checks that
//! its predecessors were restored — the IOMMU, every region's contents and
//! discard manager — and once the whole stream was read and checked
//! ([`Section::post_load`]) it attaches again: the listener replays the
//! populated blocks, or the IOMMU replays the endpoint's mappings on
//! registration, and that pins them. Nothing about pins is trusted from the
//! stream.

use std::io::{Read, Write};

use memvisor_memory::GuestRange;
use memvisor_vmstate::{LoadContext, Phase, Priority, Section, SectionError, SectionId, decode, encode};
use serde::{Deserialize, Serialize};

use crate::attach::{DmaDevice, DmaPath};
use crate::viommu_bridge::UnplugGuard;

/// Name of the DMA sections.
pub const DMA_SECTION: &str = "dma";
/// Version of the DMA section's payload.
pub const DMA_VERSION: u16 = 1;

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

impl DmaConfig {
    /// The payload for `path`, behind the IOMMU whose section is instance
    /// `iommu_instance`.
    fn new(path: Option<DmaPath>, iommu_instance: u32) -> Self {
        match path {
            None => Self::Detached,
            Some(DmaPath::Ram) => Self::Ram,
            Some(DmaPath::Viommu { endpoint, guard }) => Self::Viommu {
                iommu_instance,
                endpoint,
                warn_on_unplug: guard == UnplugGuard::Warn,
            },
        }
    }

    /// The path, and for path 2 the IOMMU section instance.
    fn path(self) -> (Option<DmaPath>, Option<u32>) {
        match self {
            Self::Detached => (None, None),
            Self::Ram => (Some(DmaPath::Ram), None),
            Self::Viommu {
                iommu_instance,
                endpoint,
                warn_on_unplug,
            } => {
                let guard = if warn_on_unplug {
                    UnplugGuard::Warn
                } else {
                    UnplugGuard::Reject
                };
                (Some(DmaPath::Viommu { endpoint, guard }), Some(iommu_instance))
            }
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

impl DmaSection {
    /// The section of `device`, instance `instance`.
    pub fn new(instance: u32, device: DmaDevice) -> Self {
        Self {
            instance,
            device,
            pending: None,
            attached_by_load: false,
        }
    }

    /// The section of the IOMMU the device is behind, if it has one.
    fn iommu_section(&self) -> Option<SectionId> {
        self.device.lock().target.iommu.as_ref().map(|i| i.section.clone())
    }
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
        let iommu_instance = self.iommu_section().map_or(0, |s| s.instance);
        encode(&DmaConfig::new(self.device.path(), iommu_instance), out)
    }

    fn load(&mut self, ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let config: DmaConfig = decode(payload)?;
        let (path, iommu_instance) = config.path();
        let id = self.id();
        if let Some(instance) = iommu_instance {
            let Some(iommu) = self.iommu_section().filter(|s| s.instance == instance) else {
                return Err(SectionError::Invalid(format!(
                    "DMA device '{}' is behind IOMMU instance {instance} in the stream, but not here",
                    self.device.name()
                )));
            };
            ctx.require(
                &id,
                &iommu,
                "its pins are re-derived from the IOMMU's restored mappings",
            )?;
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
