//! The virtio-iommu section: domains and mappings, sent after RAM.

use std::io::{Read, Write};

use memvisor_memory::GuestRange;
use memvisor_virtio_iommu::{IommuHandle, IommuState, MapFlags};

use crate::context::LoadContext;
use crate::devices::decode;
use crate::error::SectionError;
use crate::section::{Phase, Priority, Section};

/// Name of the virtio-iommu sections.
pub const VIRTIO_IOMMU_SECTION: &str = "virtio-iommu";

/// The migration section of one virtio-iommu device ([`IommuState`]).
///
/// Device phase, [`Priority::IOMMU`]. On load it first checks, for every
/// mapping onto RAM, that the discard manager of the region it targets and
/// that region's contents were restored (the memory device and RAM come
/// first, DESIGN.md rule 4): a stream in the wrong order fails naming the
/// missing section. Loading replays the mappings to the notifiers
/// registered for their endpoints.
#[derive(Debug)]
pub struct VirtioIommuSection {
    instance: u32,
    handle: IommuHandle,
}

impl VirtioIommuSection {
    /// The section of the device behind `handle`, instance `instance`. The
    /// device needs its memory map ([`IommuHandle::set_memory`]) to load.
    pub fn new(instance: u32, handle: IommuHandle) -> Self {
        Self { instance, handle }
    }
}

impl Section for VirtioIommuSection {
    fn name(&self) -> &str {
        VIRTIO_IOMMU_SECTION
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        IommuState::VERSION
    }

    fn priority(&self) -> Priority {
        Priority::IOMMU
    }

    fn phase(&self) -> Phase {
        Phase::Device
    }

    fn max_payload(&self) -> u64 {
        // 1024 domains of 2^18 mappings of at most 36 bytes would be 9 GiB;
        // no real guest comes close. 256 MiB is ~7.5 M mappings.
        256 << 20
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        out.write_all(&postcard::to_allocvec(&self.handle.save_state())?)?;
        Ok(())
    }

    fn load(&mut self, ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let state: IommuState = decode(payload)?;
        let id = self.id();
        for domain in state.domains.iter().filter(|d| !d.bypass) {
            for m in &domain.mappings {
                if MapFlags::from_bits(m.flags).is_none_or(|f| f.mmio()) {
                    continue; // MMIO is never pinned; bad flags are refused by the device.
                }
                let Some(range) = m
                    .virt_end
                    .checked_sub(m.virt_start)
                    .and_then(|d| d.checked_add(1))
                    .and_then(|size| GuestRange::new(m.phys_start, size))
                else {
                    continue; // refused by the device's own validation
                };
                let why = format!(
                    "domain {} maps iova [{:#x}, {:#x}] onto it",
                    domain.id, m.virt_start, m.virt_end
                );
                ctx.require_manager(&id, range, &why)?;
                ctx.require_ram(&id, range, &why)?;
            }
        }
        self.handle.load_state(&state).map_err(SectionError::device)
    }
}
