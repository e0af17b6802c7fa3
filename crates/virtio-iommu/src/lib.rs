//! The memvisor virtio-iommu device (virtio device ID 23).
//!
//! The guest driver creates domains, attaches endpoints (devices behind the
//! IOMMU, created by the VMM) and maps IOVA ranges onto guest-physical
//! memory. Consumers learn of every mapping through an
//! [`IommuNotifier`] — the DMA layer pins what assigned devices may reach —
//! and emulated devices [`translate`](IommuHandle::translate) their
//! accesses. A MAP onto memory that is not populated guest RAM (a hole, an
//! unplugged virtio-mem block) is refused, checked under the discard
//! manager's read lock that the notifiers then pin under (DESIGN.md rule 3).
//!
//! * [`wire`] — the specification's structures and constants;
//! * [`request`] — guest bytes → [`Request`] (or a malformed-request error);
//! * [`options`] — [`IommuOptions`]: topology, ranges, limits, reserved
//!   regions;
//! * [`device`] — [`VirtioIommu`], the transport's side (features, config
//!   space, queues);
//! * `handle.rs` — [`IommuHandle`], the VMM's and emulated devices' side
//!   (topology, notifiers, translation, reset);
//! * `effects.rs` — ATTACH, DETACH, MAP, UNMAP and PROBE applied to the
//!   domains and mappings ([`mapping`]);
//! * `map_target.rs` — where a MAP onto unplugged memory, a hole or RAM
//!   flagged MMIO is refused ([`MapRefusal`]);
//! * `notify.rs` — which notifiers are told of a mapping and in which
//!   order, rollback, registration ([`NotifierError`]);
//! * `domain.rs` — domains, endpoints and the notifiers cached per domain;
//! * `fault.rs` — translation ([`Access`], [`Translation`]) and
//!   [`Fault`]s, reported on the event queue;
//! * the [`IommuNotifier`] contract lives in `memvisor-iommu` (re-exported
//!   here), shared with the DMA layer;
//! * [`persist`] — versioned migration state.
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_virtio::VirtioDevice;
//! use memvisor_guest::{Buf, DriverQueue};
//! use memvisor_virtio::interrupt::EventFdInterrupt;
//! use memvisor_virtio_iommu::request::{Attach, Map, Request};
//! use memvisor_virtio_iommu::{Access, IommuOptions, Status, VirtioIommu, wire};
//! use vm_memory::GuestAddress;
//!
//! let ram = Arc::new(RamBlock::new("ram", 16 << 20, Backing::Memfd).unwrap());
//! let mem = GuestMemoryMap::builder().ram(0, ram).unwrap().build().unwrap();
//! let options = IommuOptions { endpoints: vec![8], ..IommuOptions::default() };
//! let mut dev = VirtioIommu::new(options, None).unwrap();
//! dev.ack_features(dev.avail_features());
//! let mut requests = DriverQueue::new(&mem, GuestAddress(0), 16, 4096).unwrap();
//! let events = DriverQueue::new(&mem, GuestAddress(0x10_0000), 16, 4096).unwrap();
//! let queues = vec![requests.device_queue(), events.device_queue()];
//! dev.activate(mem.clone(), Arc::new(EventFdInterrupt::new(2).unwrap()), queues).unwrap();
//!
//! let attach = Request::Attach(Attach { domain: 1, endpoint: 8, flags: 0, reserved: [0; 4] });
//! let map = Request::Map(Map {
//!     domain: 1,
//!     virt_start: 0x1000,
//!     virt_end: 0x1fff,
//!     phys_start: 0xa000,
//!     flags: wire::MAP_F_READ,
//! });
//! for request in [attach, map] {
//!     requests.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
//!     dev.queue_notify(wire::REQUEST_QUEUE);
//!     assert_eq!(requests.pop_used().unwrap().data[0], Status::Ok as u8);
//! }
//! let t = dev.handle().translate(8, 0x1010, Access::Read).unwrap();
//! assert_eq!((t.gpa, t.len), (0xa010, 0xff0));
//! assert!(dev.handle().translate(8, 0x1010, Access::Write).is_err());
//! ```
#![deny(missing_docs)]

pub mod device;
mod domain;
mod effects;
mod fault;
mod handle;
mod map_target;
pub mod mapping;
mod notify;
pub mod options;
pub mod persist;
pub mod request;
pub mod wire;

pub use device::VirtioIommu;
pub use fault::{Access, Fault, FaultKind, Translation};
pub use handle::IommuHandle;
pub use map_target::MapRefusal;
pub use mapping::{MapFlags, Mapping};
pub use memvisor_iommu::{
    IommuNotifier, MapCause, MapEvent, MappingId, NotifierId, NotifierRefusal, NotifierRegistry, RegisterError,
    UnmapCause, UnmapEvent,
};
pub use notify::NotifierError;
pub use options::{IommuOptions, Limits, ReservedKind, ReservedRegion};
pub use persist::{IommuState, LoadError};
pub use request::Request;
pub use wire::Status;
