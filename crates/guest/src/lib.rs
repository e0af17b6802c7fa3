//! The guest's side of memvisor's devices, in real guest memory: how the
//! replay engine and the tests act as a guest.
//!
//! * [`queue`] — [`DriverQueue`]: the driver side of one split virtqueue
//!   (descriptor table, avail and used rings, request buffers) in guest
//!   RAM;
//! * [`driver`] — [`Guest`]: a guest's virtio-mem and virtio-iommu drivers
//!   for a [`Machine`](memvisor_machine::Machine), activating each device
//!   with fresh queues before its first request and after a reset.
//!
//! ```
//! # use std::sync::Arc;
//! # use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_guest::{Buf, DriverQueue};
//! use vm_memory::GuestAddress;
//! # let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
//! # let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
//! let mut driver = DriverQueue::new(&map, GuestAddress(0x1000), 16, 4096).unwrap();
//! let head = driver.add(&[Buf::In(&[1, 2, 3]), Buf::Out(10)]).unwrap();
//! // Hand `driver.device_queue()` to a device, kick it, then:
//! assert!(driver.pop_used().is_none()); // nothing was processed yet
//! # let _ = head;
//! ```
#![deny(missing_docs)]

pub mod driver;
pub mod queue;

pub use driver::{Answer, DRIVER_AREA_SIZE, Guest, GuestError, MemAnswer};
pub use queue::{Buf, DriverError, DriverQueue, Used, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
