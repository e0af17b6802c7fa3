//! Migration state of a virtio-mem region.
//!
//! [`VirtioMemState`] is what the source sends before any RAM (the memory
//! device restores first, DESIGN.md rule 4): the configuration the
//! destination must match, the block bitmap, and the usable and requested
//! sizes. The plugged size is not sent: it is the bitmap's.
//! [`VirtioMemSection`] carries it in the migration stream under
//! [`VirtioMemState::VERSION`].

use memvisor_memory::GuestRange;
use memvisor_memory::block_state::BlockBitmap;
use memvisor_memory::discard::RamDiscardManager;
use std::io::{Read, Write};
use std::sync::Arc;

use memvisor_vmstate::{LoadContext, Phase, Priority, Restores, Section, SectionError, decode, encode};
use serde::{Deserialize, Serialize};

use crate::region::VirtioMemRegion;

/// The migrated state of a [`VirtioMemRegion`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemState {
    /// Guest-physical start of the region; must match the destination.
    pub addr: u64,
    /// Region size; must match the destination.
    pub region_size: u64,
    /// Block size; must match the destination.
    pub block_size: u64,
    /// ACPI node, if any; must match the destination.
    pub node_id: Option<u16>,
    /// The block bitmap's words (bit `i` set: block `i` plugged), least
    /// significant bit first, as [`BlockBitmap::words`] gives them.
    pub bitmap: Vec<u64>,
    /// The usable region size.
    pub usable_region_size: u64,
    /// The requested size.
    pub requested_size: u64,
}

impl VirtioMemState {
    /// Version of this layout, for the migration stream.
    pub const VERSION: u16 = 1;

    /// Bytes plugged according to the bitmap.
    pub fn plugged_size(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * self.block_size
    }
}

/// Why a [`VirtioMemState`] cannot be loaded. Values are named in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// A configuration value differs between source and destination.
    #[error("virtio-mem state: {field} is {saved:#x} in the stream but {local:#x} here")]
    Mismatch {
        /// "address", "region size" or "block size".
        field: &'static str,
        /// The source's value.
        saved: u64,
        /// The destination's value.
        local: u64,
    },
    /// The ACPI node differs between source and destination.
    #[error("virtio-mem state: node is {saved:?} in the stream but {local:?} here")]
    NodeMismatch {
        /// The source's node.
        saved: Option<u16>,
        /// The destination's node.
        local: Option<u16>,
    },
    /// The bitmap does not have one bit per block.
    #[error("virtio-mem state: bitmap has {words} words, but {blocks} blocks need {expected}")]
    BitmapLength {
        /// Words in the stream.
        words: usize,
        /// Words needed.
        expected: usize,
        /// Blocks in the region.
        blocks: usize,
    },
    /// The bitmap has bits set past the last block.
    #[error("virtio-mem state: bitmap has bits set past the last of its {blocks} blocks")]
    PhantomBits {
        /// Blocks in the region.
        blocks: usize,
    },
    /// A size that is not a block multiple, or exceeds the region.
    #[error("virtio-mem state: {field} {value:#x} is not a multiple of {block_size:#x} at most {region_size:#x}")]
    BadSize {
        /// "requested size" or "usable region size".
        field: &'static str,
        /// The value.
        value: u64,
        /// The block size.
        block_size: u64,
        /// The region size.
        region_size: u64,
    },
    /// The usable region is smaller than the requested size.
    #[error("virtio-mem state: usable region size {usable:#x} is below the requested size {requested:#x}")]
    UsableBelowRequested {
        /// Usable region size.
        usable: u64,
        /// Requested size.
        requested: u64,
    },
    /// A plugged block lies outside the usable region.
    #[error("virtio-mem state: plugged blocks {range} lie outside the usable region of {usable:#x} bytes")]
    PluggedOutsideUsable {
        /// The first plugged run outside it.
        range: GuestRange,
        /// Usable region size.
        usable: u64,
    },
    /// A listener refused a plugged range during the replay; the region is
    /// in an undefined state and the load must fail.
    #[error("virtio-mem state: {0}")]
    Refused(String),
}

impl VirtioMemRegion {
    /// The state to migrate, consistent in itself (taken under the
    /// block-state lock). Take it once the migration-running flag is set, so
    /// that no request changes the blocks afterwards.
    pub fn save_state(&self) -> VirtioMemState {
        let view = self.manager.populated();
        let sizes = *self.lock_sizes();
        VirtioMemState {
            addr: self.addr,
            region_size: self.region_size(),
            block_size: self.block_size,
            node_id: self.node_id,
            bitmap: view.bitmap().words().to_vec(),
            usable_region_size: sizes.usable,
            requested_size: sizes.requested,
        }
    }

    /// Loads `state` into this (destination) region.
    ///
    /// Checks that address, region size, block size and node match, that
    /// the bitmap has exactly one bit per block and nothing past them, that
    /// the sizes are block multiples inside the region with the usable
    /// region at least the requested size, and that no plugged block lies
    /// outside the usable region. Then every unplugged block's memory is
    /// discarded, registered listeners are told to discard what is plugged
    /// here but not in `state` and to populate what `state` plugs, and the
    /// sizes are taken over.
    ///
    /// # Errors
    ///
    /// Any failed check leaves the region unchanged. A listener refusing a
    /// populate ([`PersistError::Refused`]) leaves it partly loaded: the
    /// migration must fail.
    pub fn load_state(&self, state: &VirtioMemState) -> Result<(), PersistError> {
        for (field, saved, local) in [
            ("address", state.addr, self.addr),
            ("region size", state.region_size, self.region_size()),
            ("block size", state.block_size, self.block_size),
        ] {
            if saved != local {
                return Err(PersistError::Mismatch { field, saved, local });
            }
        }
        if state.node_id != self.node_id {
            return Err(PersistError::NodeMismatch {
                saved: state.node_id,
                local: self.node_id,
            });
        }
        let blocks = self.nb_blocks();
        let expected = blocks.div_ceil(64);
        if state.bitmap.len() != expected {
            return Err(PersistError::BitmapLength {
                words: state.bitmap.len(),
                expected,
                blocks,
            });
        }
        let bitmap =
            BlockBitmap::from_words(state.bitmap.clone(), blocks).ok_or(PersistError::PhantomBits { blocks })?;
        let region_size = self.region_size();
        for (field, value) in [
            ("requested size", state.requested_size),
            ("usable region size", state.usable_region_size),
        ] {
            if value % self.block_size != 0 || value > region_size {
                return Err(PersistError::BadSize {
                    field,
                    value,
                    block_size: self.block_size,
                    region_size,
                });
            }
        }
        if state.usable_region_size < state.requested_size {
            return Err(PersistError::UsableBelowRequested {
                usable: state.usable_region_size,
                requested: state.requested_size,
            });
        }
        let usable_blocks = (state.usable_region_size / self.block_size) as usize;
        if let Some((first, count)) = bitmap.runs(usable_blocks, blocks - usable_blocks, true).next() {
            let range = GuestRange::new(
                self.addr + first as u64 * self.block_size,
                count as u64 * self.block_size,
            )
            .expect("blocks of the region do not wrap");
            return Err(PersistError::PluggedOutsideUsable {
                range,
                usable: state.usable_region_size,
            });
        }

        let mut writer = self.manager.write();
        writer
            .restore(bitmap, |r| self.discard_backing(r))
            .map_err(|e| PersistError::Refused(e.to_string()))?;
        let plugged = writer.populated_bytes();
        {
            let mut sizes = self.lock_sizes();
            sizes.requested = state.requested_size;
            sizes.usable = state.usable_region_size;
        }
        drop(writer);
        debug_assert_eq!(self.manager.region().len(), region_size);
        self.signal_config();
        self.emit(plugged);
        Ok(())
    }
}

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
        encode(&self.region.save_state(), out)
    }

    fn post_save(&mut self, _succeeded: bool) {
        self.region.set_migration_running(false);
    }

    fn load(&mut self, _ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let state: VirtioMemState = decode(payload)?;
        self.region.load_state(&state).map_err(SectionError::device)
    }
}
