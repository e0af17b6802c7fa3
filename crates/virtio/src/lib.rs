//! What every memvisor virtio device shares: the [`VirtioDevice`] trait and
//! the bookkeeping behind it ([`VirtioCommon`]), interrupt signalling,
//! configuration-space reads, request handling over split virtqueues
//! ([`queue::drain_queue`]). The guest's side of a split virtqueue is the
//! `memvisor-guest` crate, used below to play the driver.
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_guest::{Buf, DriverQueue};
//! use memvisor_virtio::interrupt::{EventFdInterrupt, InterruptKind};
//! use memvisor_virtio::queue::{DeviceQueue, drain_queue};
//! use vm_memory::GuestAddress;
//!
//! let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
//! let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
//! let mut driver = DriverQueue::new(&map, GuestAddress(0), 8, 4096).unwrap();
//! let mut queue = DeviceQueue::new(driver.device_queue(), &map).unwrap();
//! let irq = EventFdInterrupt::new(1).unwrap();
//!
//! driver.add(&[Buf::In(b"ping"), Buf::Out(4)]).unwrap();
//! // A device that answers every request with its bytes reversed:
//! let answered = drain_queue(&mut queue, 0, &map, &irq, 64, 4, |req| {
//!     Ok(req.request().iter().rev().copied().collect())
//! })
//! .unwrap();
//! assert_eq!(answered, 1);
//! assert_eq!(&driver.pop_used().unwrap().data[..], b"gnip");
//! assert_eq!(irq.take(InterruptKind::Queue(0)), 1);
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod device;
pub mod interrupt;
pub mod queue;

pub use device::{ActivateError, NeedsResetObserver, VirtioCommon, VirtioDevice};
pub use interrupt::{EventFdInterrupt, InterruptKind, VirtioInterrupt};
pub use queue::QueueIndices;
