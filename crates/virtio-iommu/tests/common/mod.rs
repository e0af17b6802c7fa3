//! Shared test helpers: a [`Machine`] with boot RAM and a managed
//! (virtio-mem) region, a virtio-iommu device of the test's options driven
//! through real split virtqueues in that memory, and test-support's
//! recording notifier.
//!
//! The device is built here rather than by the machine: the tests choose
//! options a machine configuration does not carry (limits, probe size) and
//! the features the driver accepts. Memory is plugged and unplugged through
//! the virtio-mem region's own request handling, as a driver's PLUG and
//! UNPLUG would.
#![allow(dead_code, unused_imports)]

use std::sync::Arc;

use memvisor_machine::{Machine, MachineConfig, RamSpec, VirtioMemSpec};
use memvisor_memory::RamBlock;
use memvisor_memory::map::GuestMemoryMap;
pub use memvisor_test_support::{Buf, DriverQueue, MIB, RecordingNotifier, Seen, Used, range};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::interrupt::{EventFdInterrupt, InterruptKind};
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::wire::{self, FaultEvent};
use memvisor_virtio_iommu::{IommuHandle, IommuOptions, Request, Status, VirtioIommu};
use memvisor_virtio_mem::{BlockRange, Request as MemRequest, Response as MemResponse, VirtioMemRegion};
use vm_memory::GuestAddress;

/// Boot RAM: 16 MiB at 0; the queues live in its first MiBs.
pub const BOOT_SIZE: u64 = 16 * MIB;
/// The managed region: 64 MiB at 4 GiB in 2 MiB blocks.
pub const HOT_BASE: u64 = 4 << 30;
pub const HOT_SIZE: u64 = 64 * MIB;
pub const BLOCK: u64 = 2 * MIB;

pub const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;

/// The machine of the tests: [`BOOT_SIZE`] of boot RAM at 0 and one
/// virtio-mem region of [`HOT_SIZE`] at [`HOT_BASE`], all of it requested
/// (so that any block may be plugged), nothing plugged yet.
pub fn machine_config() -> MachineConfig {
    MachineConfig {
        ram: vec![RamSpec {
            addr: 0,
            size: BOOT_SIZE,
        }],
        virtio_mem: vec![VirtioMemSpec {
            requested_size: HOT_SIZE,
            ..VirtioMemSpec::new("vmem0", HOT_BASE, HOT_SIZE, BLOCK)
        }],
        ..MachineConfig::default()
    }
}

/// The guest memory of the tests, from a [`Machine`] of [`machine_config`].
pub struct Memory {
    pub machine: Machine,
    /// The machine's guest memory map.
    pub map: GuestMemoryMap,
}

impl Memory {
    pub fn new() -> Self {
        let machine = Machine::new(&machine_config()).unwrap();
        let map = machine.memory().clone();
        Self { machine, map }
    }

    /// The virtio-mem region (its discard manager).
    pub fn region(&self) -> &Arc<VirtioMemRegion> {
        &self.machine.vmems()[0].region
    }

    /// The region's RAM block.
    pub fn hot(&self) -> &Arc<RamBlock> {
        self.region().block()
    }

    /// Plugs `[HOT_BASE + offset, +len)`.
    pub fn plug(&self, offset: u64, len: u64) {
        request(self.region(), MemRequest::Plug(blocks(offset, len)));
    }

    /// Unplugs `[HOT_BASE + offset, +len)`.
    pub fn unplug(&self, offset: u64, len: u64) {
        unplug(self.region(), offset, len);
    }
}

/// The blocks of `[HOT_BASE + offset, +len)`.
fn blocks(offset: u64, len: u64) -> BlockRange {
    assert_eq!((offset % BLOCK, len % BLOCK), (0, 0), "whole blocks");
    BlockRange {
        addr: HOT_BASE + offset,
        nb_blocks: u16::try_from(len / BLOCK).unwrap(),
    }
}

/// Applies `request` to `region` as its device would, and requires an ACK.
fn request(region: &VirtioMemRegion, request: MemRequest) {
    assert_eq!(region.apply(request), MemResponse::Ack(None), "{request:?}");
}

/// Unplugs `[HOT_BASE + offset, +len)` of `region` (from any thread).
pub fn unplug(region: &VirtioMemRegion, offset: u64, len: u64) {
    request(region, MemRequest::Unplug(blocks(offset, len)));
}

pub struct Fixture {
    pub memory: Memory,
    pub dev: VirtioIommu,
    pub handle: IommuHandle,
    pub requests: DriverQueue,
    pub events: DriverQueue,
    pub irq: Arc<EventFdInterrupt>,
}

/// Endpoints of the default test topology.
pub const EP_A: u32 = 8;
pub const EP_B: u32 = 9;
pub const EP_C: u32 = 10;

pub fn config() -> IommuOptions {
    IommuOptions {
        endpoints: vec![EP_A, EP_B, EP_C],
        domain_start: 1,
        domain_end: 1000,
        ..IommuOptions::default()
    }
}

impl Fixture {
    pub fn new(config: IommuOptions) -> Self {
        Self::with_features(config, None)
    }

    /// A device whose driver accepts `features` (all offered if `None`).
    pub fn with_features(config: IommuOptions, features: Option<u64>) -> Self {
        let memory = Memory::new();
        let mut dev = VirtioIommu::new(config, None).unwrap();
        let features = features.unwrap_or(dev.avail_features()) | memvisor_virtio::device::VIRTIO_F_VERSION_1;
        dev.ack_features(features);
        let requests = DriverQueue::new(&memory.map, GuestAddress(0), 64, 256 * 1024).unwrap();
        let events = DriverQueue::new(&memory.map, GuestAddress(0x20_0000), 16, 4096).unwrap();
        let irq = Arc::new(EventFdInterrupt::new(2).unwrap());
        dev.activate(
            memory.map.clone(),
            irq.clone(),
            vec![requests.device_queue(), events.device_queue()],
        )
        .unwrap();
        let handle = dev.handle();
        Self {
            memory,
            dev,
            handle,
            requests,
            events,
            irq,
        }
    }

    /// Sends raw buffers on the request queue and returns the completion.
    pub fn send_raw(&mut self, bufs: &[Buf<'_>]) -> Option<Used> {
        self.requests.add(bufs).unwrap();
        self.dev.queue_notify(wire::REQUEST_QUEUE);
        self.requests.pop_used()
    }

    /// Sends `request` with a 4-byte tail and returns the status.
    pub fn send(&mut self, request: Request) -> Status {
        let used = self
            .send_raw(&[Buf::In(&request.to_bytes()), Buf::Out(4)])
            .expect("the device answered");
        assert_eq!(used.len, 4, "{request:?}");
        assert_eq!(&used.data[1..], &[0, 0, 0], "tail reserved bytes");
        Status::from_u8(used.data[0]).expect("a valid status")
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.attach_flags(domain, endpoint, 0)
    }

    pub fn attach_flags(&mut self, domain: u32, endpoint: u32, flags: u32) -> Status {
        self.send(Request::Attach(Attach {
            domain,
            endpoint,
            flags,
            reserved: [0; 4],
        }))
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        self.send(Request::Detach(Detach { domain, endpoint }))
    }

    pub fn map(&mut self, domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Status {
        self.send(Request::Map(Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        }))
    }

    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        self.send(Request::Unmap(Unmap {
            domain,
            virt_start,
            virt_end,
        }))
    }

    /// Sends a PROBE with `props` bytes for properties; returns the status
    /// and the properties written.
    pub fn probe(&mut self, endpoint: u32, props: u32) -> (Status, Vec<u8>) {
        let used = self
            .send_raw(&[
                Buf::In(&Request::Probe(Probe { endpoint }).to_bytes()),
                Buf::Out(props + 4),
            ])
            .expect("answered");
        let n = used.data.len();
        assert!(n >= 4);
        (Status::from_u8(used.data[n - 4]).unwrap(), used.data[..n - 4].to_vec())
    }

    /// Gives the device `n` event buffers of 24 bytes.
    pub fn add_event_buffers(&mut self, n: usize) {
        for _ in 0..n {
            self.events.add(&[Buf::Out(wire::FAULT_SIZE as u32)]).unwrap();
        }
        self.dev.queue_notify(wire::EVENT_QUEUE);
    }

    pub fn pop_event(&mut self) -> Option<FaultEvent> {
        let used = self.events.pop_used()?;
        assert_eq!(used.len as usize, wire::FAULT_SIZE);
        FaultEvent::from_bytes(&used.data)
    }

    pub fn config_interrupts(&self) -> u64 {
        self.irq.take(InterruptKind::Config)
    }
}
