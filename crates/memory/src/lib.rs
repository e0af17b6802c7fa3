//! Guest RAM for memvisor: real host memory that can really be given back.
//!
//! * [`RamBlock`] — a host mapping of guest RAM (memfd by default, private
//!   anonymous, or hugetlbfs) whose [`discard`](RamBlock::discard) returns
//!   pages to the host and whose [`resident_bytes`](RamBlock::resident_bytes)
//!   proves it.
//! * [`map::GuestMemoryMap`] — the guest-physical map: non-overlapping
//!   regions over `vm-memory`'s `GuestMemoryMmap`, so `virtio-queue` works
//!   on it directly; a region may carry a discard manager.
//! * [`discard`] — the `RamDiscardManager` / `RamDiscardListener` contract
//!   between memory devices and DMA mappers, implemented once by
//!   [`discard::BlockDiscardManager`] over the [`block_state`] core.
//! * [`policy::DiscardPolicy`] — who may discard at all, with RAII guards.
//! * [`dirty`] — the pages the VMM itself wrote ([`map::Region::take_dirty`]),
//!   for live migration.
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_memory::{Backing, GuestRange, RamBlock};
//! use memvisor_memory::discard::{BlockDiscardManager, RamDiscardManager};
//! use memvisor_memory::map::GuestMemoryMap;
//!
//! const MIB: u64 = 1 << 20;
//! // 8 MiB of hot-pluggable RAM at 4 GiB, managed in 2 MiB blocks.
//! let block = Arc::new(RamBlock::new("vmem0", 8 * MIB, Backing::Memfd).unwrap());
//! let region = GuestRange::new(4 << 30, 8 * MIB).unwrap();
//! let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
//! let map = GuestMemoryMap::builder()
//!     .managed_ram(region.start(), block.clone(), manager.clone())
//!     .unwrap()
//!     .build()
//!     .unwrap();
//!
//! // Plug the first block, preallocating it; unplug discards it again.
//! let first = GuestRange::new(region.start(), 2 * MIB).unwrap();
//! manager.write().plug(first, || block.populate(0, 2 * MIB), |_| {}).unwrap();
//! assert!(map.is_populated_ram(first));
//! assert_eq!(block.resident_bytes(0, 2 * MIB).unwrap(), 2 * MIB);
//! manager
//!     .write()
//!     .unplug(first, false, |r| block.discard(r.start() - region.start(), r.len()).unwrap())
//!     .unwrap();
//! assert!(!map.is_populated_ram(first));
//! assert_eq!(block.resident_bytes(0, 2 * MIB).unwrap(), 0);
//! ```
#![deny(missing_docs)]

pub mod block_state;
pub mod dirty;
pub mod discard;
pub mod map;
pub mod policy;
pub mod ram_block;
pub mod range;

pub use dirty::{DirtyBitmap, GuestSlice, PageSet};
pub use ram_block::{Backing, RamBlock, RamBlockError};
pub use range::GuestRange;
