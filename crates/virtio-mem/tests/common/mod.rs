//! A guest for virtio-mem tests: a [`Machine`](memvisor_test_support::Machine)
//! built from a [`MachineConfig`] — 2 MiB of boot RAM at 0 and one
//! virtio-mem device — with test-support's [`Rig`] speaking the wire
//! protocol through a real split virtqueue in boot RAM.
//!
//! A test that needs raw access to the queue (malformed chains, buffers
//! anywhere) or counts interrupts activates the device itself
//! ([`Vm::activate`]): from then on its requests go through a
//! [`DriverQueue`] of its own at the start of boot RAM, on the machine's
//! memory map, straight to the machine's device.
#![allow(dead_code)]

use std::sync::Arc;

use memvisor_guest::Answer;
use memvisor_machine::{RamSpec, VirtioMemSpec};
use memvisor_memory::RamBlock;
use memvisor_memory::map::GuestMemoryMap;
pub use memvisor_test_support::{Buf, DriverQueue, GIB, MIB, MachineConfig, Rig, Used};
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{ActivateError, EventFdInterrupt, InterruptKind, VirtioDevice};
use memvisor_virtio_mem::wire::{F_UNPLUGGED_INACCESSIBLE, RESPONSE_SIZE, VirtioMemConfig, VirtioMemResp};
use memvisor_virtio_mem::{BlockRange, BlockState, Request, VirtioMem, VirtioMemRegion};
use vm_memory::GuestAddress;

/// Where the virtio-mem region starts in most tests.
pub const BASE: u64 = 4 * GIB;
/// Size of the boot RAM at GPA 0 that holds the queues.
pub const BOOT_SIZE: u64 = 2 * MIB;
/// The test's own queue, when it activates the device itself: the first
/// MiB of boot RAM.
pub const OWN_QUEUE_AT: u64 = 0;
/// The [`Rig`]'s driver area: the second MiB of boot RAM.
pub const DRIVER_AREA: u64 = MIB;

pub const ACK: u16 = 0;
pub const NACK: u16 = 1;
pub const BUSY: u16 = 2;
pub const ERROR: u16 = 3;
pub const PLUGGED: u16 = 0;
pub const UNPLUGGED: u16 = 1;
pub const MIXED: u16 = 2;

/// A virtio-mem device `vmem0` of `region_size` bytes at [`BASE`] with the
/// defaults: 2 MiB blocks, nothing requested, UNPLUGGED_INACCESSIBLE
/// offered, no node, no preallocation.
pub fn vmem(region_size: u64) -> VirtioMemSpec {
    VirtioMemSpec {
        id: "vmem0".into(),
        addr: BASE,
        region_size,
        block_size: 2 * MIB,
        requested_size: 0,
        unplugged_inaccessible: true,
        node_id: None,
        prealloc: false,
    }
}

/// The machine of the tests: boot RAM and `vmem`.
pub fn machine_config(vmem: VirtioMemSpec) -> MachineConfig {
    MachineConfig {
        ram: vec![RamSpec {
            addr: 0,
            size: BOOT_SIZE,
        }],
        virtio_mem: vec![vmem],
        ..MachineConfig::default()
    }
}

/// A machine with one virtio-mem device, and the guest driving it.
pub struct Vm {
    pub rig: Rig,
    /// The interrupt of the test's own activations.
    pub irq: Arc<EventFdInterrupt>,
    /// The test's own queue, once it activated the device itself.
    own: Option<DriverQueue>,
}

impl Vm {
    /// The machine with virtio-mem device `vmem` (a NORESERVE memfd);
    /// the guest's driver activates the device before its first request.
    pub fn new(vmem: VirtioMemSpec) -> Self {
        Self {
            rig: Rig::new(&machine_config(vmem), DRIVER_AREA),
            irq: Arc::new(EventFdInterrupt::new(1).unwrap()),
            own: None,
        }
    }

    /// A 64 MiB region at [`BASE`] with `requested` bytes requested.
    pub fn with_requested(requested: u64) -> Self {
        Self::new(VirtioMemSpec {
            requested_size: requested,
            ..vmem(64 * MIB)
        })
    }

    /// The guest memory map.
    pub fn memory(&self) -> &GuestMemoryMap {
        self.rig.machine.memory()
    }

    /// The region (the discard manager of the device's memory).
    pub fn region(&self) -> &Arc<VirtioMemRegion> {
        &self.rig.machine.vmems()[0].region
    }

    /// The region's RAM block.
    pub fn block(&self) -> &Arc<RamBlock> {
        self.region().block()
    }

    /// The device.
    pub fn dev(&self) -> &VirtioMem {
        &self.rig.machine.vmems()[0].device
    }

    /// The device, to drive it.
    pub fn dev_mut(&mut self) -> &mut VirtioMem {
        &mut self.rig.machine.vmems_mut()[0].device
    }

    /// The test activates the device itself, with the features a Linux
    /// driver accepts: everything offered.
    pub fn activate(&mut self) -> Result<(), ActivateError> {
        let features = self.dev().avail_features();
        self.activate_with(features)
    }

    /// The test acks `features` and activates the device with a fresh
    /// queue of its own in boot RAM; requests then go through that queue.
    pub fn activate_with(&mut self, features: u64) -> Result<(), ActivateError> {
        let driver = DriverQueue::new(self.memory(), GuestAddress(OWN_QUEUE_AT), 16, 16 * 1024).unwrap();
        let queue = driver.device_queue();
        let (map, irq) = (self.memory().clone(), self.irq.clone());
        let dev = self.dev_mut();
        dev.ack_features(features);
        dev.activate(map, irq, vec![queue])?;
        self.own = Some(driver);
        Ok(())
    }

    /// Features a driver without UNPLUGGED_INACCESSIBLE support accepts.
    pub fn legacy_features() -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// Features with UNPLUGGED_INACCESSIBLE.
    pub fn modern_features() -> u64 {
        VIRTIO_F_VERSION_1 | F_UNPLUGGED_INACCESSIBLE
    }

    /// The test's own queue.
    pub fn driver(&mut self) -> &mut DriverQueue {
        self.own.as_mut().expect("the test activated the device itself")
    }

    /// Publishes `bufs` on the test's own queue, kicks queue 0 and returns
    /// the completion, if any.
    pub fn submit(&mut self, bufs: &[Buf<'_>]) -> Option<Used> {
        self.driver().add(bufs).unwrap();
        self.dev_mut().queue_notify(0);
        self.driver().pop_used()
    }

    /// Sends `request` through the test's own queue if it has one, else
    /// through the guest's driver; returns (response type, state).
    pub fn request(&mut self, request: Request) -> (u16, u16) {
        if self.own.is_some() {
            let used = self
                .submit(&[Buf::In(&request.to_bytes()), Buf::Out(RESPONSE_SIZE as u32)])
                .expect("the device answered");
            assert_eq!(used.len, RESPONSE_SIZE as u32, "response length");
            let r = VirtioMemResp::from_bytes(&used.data).unwrap();
            return (r.resp_type, r.state);
        }
        match self.rig.guest.vmem_request(&mut self.rig.machine, 0, request) {
            // Not a state value: one no test expects.
            Ok(Answer::Answered(a)) => (a.resp_type, a.state.map_or(u16::MAX, BlockState::to_wire)),
            other => panic!("the device did not answer {request:?}: {other:?}"),
        }
    }

    pub fn plug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.request(Request::Plug(BlockRange { addr, nb_blocks })).0
    }

    pub fn unplug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.request(Request::Unplug(BlockRange { addr, nb_blocks })).0
    }

    pub fn unplug_all(&mut self) -> u16 {
        self.request(Request::UnplugAll).0
    }

    /// (response type, state) of a STATE request.
    pub fn state(&mut self, addr: u64, nb_blocks: u16) -> (u16, u16) {
        self.request(Request::State(BlockRange { addr, nb_blocks }))
    }

    /// The configuration space, read as a driver does (4 bytes at a time,
    /// as virtio-mmio would).
    pub fn config(&self) -> VirtioMemConfig {
        self.rig.guest.vmem_config(&self.rig.machine, 0).unwrap()
    }

    /// Configuration interrupts since the last call (of the test's own
    /// activations).
    pub fn config_irqs(&self) -> u64 {
        self.irq.take(InterruptKind::Config)
    }

    /// Resident bytes of the whole virtio-mem region.
    pub fn resident(&self) -> u64 {
        let block = self.block();
        block.resident_bytes(0, block.size()).unwrap()
    }

    /// Writes `len` bytes of 0x5a at guest address `addr` (guest touching
    /// plugged memory).
    pub fn touch(&self, addr: u64, len: u64) {
        use vm_memory::Bytes;
        self.memory()
            .memory()
            .write_slice(&vec![0x5a; len as usize], GuestAddress(addr))
            .unwrap();
    }
}
