//! The virtio-mem section: configuration and block bitmap, sent before RAM.

use std::io::{Read, Write};
use std::sync::Arc;

use memvisor_memory::discard::RamDiscardManager;
use memvisor_virtio_mem::{VirtioMemRegion, VirtioMemState};

use crate::context::LoadContext;
use crate::devices::decode;
use crate::error::SectionError;
use crate::section::{Phase, Priority, Restores, Section};

/// Name of the virtio-mem sections.
pub const VIRTIO_MEM_SECTION: &str = "virtio-mem";

/// The migration section of one virtio-mem region ([`VirtioMemState`]).
///
/// Setup phase, [`Priority::MEMORY_DEVICE`]: it restores the region's
/// discard manager, which RAM, the IOMMU and the DMA layer depend on. While
/// a save runs, the region's "migration running" flag is set, so the
/// guest's PLUG and UNPLUG requests are answered BUSY and the bitmap the
/// stream carries stays true.
#[derive(Debug)]
pub struct VirtioMemSection {
    instance: u32,
    region: Arc<VirtioMemRegion>,
}

impl VirtioMemSection {
    /// The section of `region`, instance `instance`.
    pub fn new(instance: u32, region: Arc<VirtioMemRegion>) -> Self {
        Self { instance, region }
    }
}

impl Section for VirtioMemSection {
    fn name(&self) -> &str {
        VIRTIO_MEM_SECTION
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        VirtioMemState::VERSION
    }

    fn priority(&self) -> Priority {
        Priority::MEMORY_DEVICE
    }

    fn phase(&self) -> Phase {
        Phase::Setup
    }

    fn max_payload(&self) -> u64 {
        // Eight u64 fields, an option, and at most 10 bytes per bitmap word.
        256 + (self.region.nb_blocks() as u64).div_ceil(64) * 10
    }

    fn restores(&self) -> Vec<Restores> {
        vec![Restores::DiscardManager(self.region.region())]
    }

    fn pre_save(&mut self) -> Result<(), SectionError> {
        self.region.set_migration_running(true);
        Ok(())
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        out.write_all(&postcard::to_allocvec(&self.region.save_state())?)?;
        Ok(())
    }

    fn post_save(&mut self, _succeeded: bool) {
        self.region.set_migration_running(false);
    }

    fn load(&mut self, _ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let state: VirtioMemState = decode(payload)?;
        self.region.load_state(&state).map_err(SectionError::device)
    }
}
