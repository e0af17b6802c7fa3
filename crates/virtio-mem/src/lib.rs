//! The virtio-mem device: guest memory that grows and shrinks block by
//! block, and the [`RamDiscardManager`] of its region.
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_memory::discard::RamDiscardManager;
//! use memvisor_memory::{Backing, GuestRange, RamBlock};
//! use memvisor_virtio_mem::{BlockRange, Request, Response, VirtioMem, VirtioMemOptions, VirtioMemRegion};
//!
//! // 64 MiB at 4 GiB, 2 MiB blocks, 8 MiB requested.
//! let block = Arc::new(RamBlock::new("vmem0", 64 << 20, Backing::Memfd).unwrap());
//! let options = VirtioMemOptions { requested_size: 8 << 20, ..VirtioMemOptions::new(1 << 32) };
//! let region = VirtioMemRegion::new(block, options).unwrap();
//! let device = VirtioMem::new(region.clone()); // the transport drives this
//!
//! // What the device does with a PLUG request popped from its queue:
//! let plug = Request::Plug(BlockRange { addr: 1 << 32, nb_blocks: 2 });
//! assert_eq!(region.apply(plug), Response::Ack(None));
//! assert_eq!(region.plugged_size(), 4 << 20);
//! // ...and what the DMA layer sees, from any thread:
//! assert!(region.is_populated(GuestRange::new(1 << 32, 4 << 20).unwrap()));
//! # drop(device);
//! ```
//!
//! # Structure
//!
//! * [`wire`]: the wire constants and structures of the specification.
//! * [`request`]: guest bytes → [`Request`] or `Malformed`, and
//!   [`Response`] → bytes; pure.
//! * [`region`]: [`VirtioMemRegion`], shared in an `Arc`: the RAM block,
//!   geometry, block states, sizes, migration flag, management API and the
//!   [`RamDiscardManager`] implementation.
//! * [`device`]: [`VirtioMem`], the [`VirtioDevice`](memvisor_virtio::VirtioDevice)
//!   that applies requests to its region.
//! * [`persist`]: [`VirtioMemState`], the versioned migration state.
//!
//! [`RamDiscardManager`]: memvisor_memory::discard::RamDiscardManager
#![deny(missing_docs)]

pub mod device;
pub mod persist;
pub mod region;
pub mod request;
pub mod wire;

pub use device::VirtioMem;
pub use persist::{PersistError, VirtioMemState};
pub use region::{SizeEvent, VirtioMemError, VirtioMemOptions, VirtioMemRegion, usable_region_size_for};
pub use request::{BlockRange, BlockState, Request, Response};
