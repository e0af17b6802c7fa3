//! memvisor's virtio-blk device (virtio device ID 2): a raw disk image
//! behind one request queue — IN, OUT, FLUSH and GET_ID — with its guest
//! addresses translated through virtio-iommu when it sits behind one, and
//! optionally zero-copy through registered (pinned) guest memory.
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_guest::{Buf, DriverQueue};
//! use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
//! use memvisor_virtio_blk::wire::{OutHdr, S_OK, T_GET_ID};
//! use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
//! use vm_memory::GuestAddress;
//!
//! # let path = std::env::temp_dir().join(format!("memvisor-blk-doc-{}", std::process::id()));
//! std::fs::write(&path, vec![0u8; 1 << 20]).unwrap(); // a 2048-sector disk
//! let mut dev = VirtioBlk::new(BlockConfig { id: "disk0".into(), ..BlockConfig::new(&path) }).unwrap();
//! assert_eq!(dev.capacity(), 2048);
//!
//! // What the transport does when the guest's driver sets the device up:
//! let ram = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
//! let mem = GuestMemoryMap::builder().ram(0, ram).unwrap().build().unwrap();
//! let mut driver = DriverQueue::new(&mem, GuestAddress(0), 16, 64 << 10).unwrap();
//! dev.ack_features(dev.avail_features());
//! let irq = Arc::new(EventFdInterrupt::new(1).unwrap());
//! dev.activate(mem, irq, vec![driver.device_queue()]).unwrap();
//!
//! // The driver asks for the serial: header, 20-byte buffer, status byte.
//! let get_id = OutHdr { req_type: T_GET_ID, ..OutHdr::default() };
//! driver.add(&[Buf::In(&get_id.to_bytes()), Buf::Out(20), Buf::Out(1)]).unwrap();
//! dev.queue_notify(0);
//! let used = driver.pop_used().unwrap();
//! assert_eq!(used.len, 21);
//! assert_eq!(&used.data[..6], b"disk0\0");
//! assert_eq!(used.data[20], S_OK);
//! # drop(dev);
//! # std::fs::remove_file(&path).unwrap();
//! ```
//!
//! # Structure
//!
//! * [`wire`]: the specification's constants and structures (request
//!   header, configuration space), from `virtio-bindings`.
//! * [`request`]: a request header and the lengths of its data → a
//!   validated [`Request`] or the status refusing it; pure.
//! * `chain.rs`: walking a descriptor chain, and where its header, data and
//!   status byte are.
//! * `dma.rs`: the driver's addresses (guest-physical, or IOVAs translated
//!   by the IOMMU) → pieces of guest RAM, accessed only while populated.
//! * `backend.rs`: the image, behind a small internal trait (synchronous
//!   `preadv`/`pwritev`).
//! * Zero-copy ([`BlockConfig::zero_copy`]): INs and OUTs go through the
//!   disk's DMA context instead, `preadv`/`pwritev` on the guest memory its
//!   [`UringPinner`](memvisor_dma::uring::UringPinner) has registered
//!   (pinned), so the disk pins like an assigned device and a buffer
//!   it has not pinned fails the request untouched.
//! * [`device`]: [`VirtioBlk`], the
//!   [`VirtioDevice`](memvisor_virtio::VirtioDevice), and the request path.
#![deny(missing_docs)]

mod backend;
mod chain;
pub mod device;
mod dma;
pub mod request;
pub mod wire;

pub use backend::ImageError;
pub use device::{
    BlockConfig, BlockError, BlockStats, BlockStatsHandle, DEFAULT_QUEUE_SIZE, MAX_REQUEST_BYTES, MAX_SEGMENTS,
    SIZE_MAX, VirtioBlk,
};
pub use request::{Disk, Refusal, Request};
