//! A guest for virtio-mem tests: a memory map with a small boot RAM block
//! holding a split virtqueue, the virtio-mem region registered as managed
//! RAM, and a driver that speaks the wire protocol through the queue.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use memvisor_memory::discard::{RamDiscardListener, RamDiscardManager, Refusal};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::driver::{Buf, DriverQueue, Used};
use memvisor_virtio::{EventFdInterrupt, InterruptKind, VirtioDevice};
use memvisor_virtio_mem::wire::{
    CONFIG_SIZE, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL, VirtioMemConfig, VirtioMemReq, VirtioMemResp,
};
use memvisor_virtio_mem::{VirtioMem, VirtioMemOptions, VirtioMemRegion};
use vm_memory::GuestAddress;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Where the virtio-mem region starts in most tests.
pub const BASE: u64 = 4 * GIB;
/// Size of the boot RAM block at GPA 0 that holds the rings.
pub const BOOT_SIZE: u64 = MIB;

pub const ACK: u16 = 0;
pub const NACK: u16 = 1;
pub const BUSY: u16 = 2;
pub const ERROR: u16 = 3;
pub const PLUGGED: u16 = 0;
pub const UNPLUGGED: u16 = 1;
pub const MIXED: u16 = 2;

/// A guest with one virtio-mem device.
pub struct Guest {
    pub map: GuestMemoryMap,
    pub block: Arc<RamBlock>,
    pub region: Arc<VirtioMemRegion>,
    pub dev: VirtioMem,
    pub driver: Option<DriverQueue>,
    pub irq: Arc<EventFdInterrupt>,
}

impl Guest {
    /// A guest whose virtio-mem region is a NORESERVE memfd of
    /// `region_size` bytes at `options.addr`; the device is not activated.
    pub fn new(region_size: u64, options: VirtioMemOptions) -> Self {
        let block = Arc::new(RamBlock::new("vmem0", region_size, Backing::Memfd).unwrap());
        let region = VirtioMemRegion::new(block.clone(), options).unwrap();
        let boot = Arc::new(RamBlock::new("boot", BOOT_SIZE, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(
                region.addr(),
                block.clone(),
                region.clone() as Arc<dyn RamDiscardManager>,
            )
            .unwrap()
            .build()
            .unwrap();
        let dev = VirtioMem::new(region.clone());
        Self {
            map,
            block,
            region,
            dev,
            driver: None,
            irq: Arc::new(EventFdInterrupt::new(1).unwrap()),
        }
    }

    /// A 64 MiB region at [`BASE`] with `requested` bytes requested,
    /// activated.
    pub fn with_requested(requested: u64) -> Self {
        let mut g = Self::new(
            64 * MIB,
            VirtioMemOptions {
                requested_size: requested,
                ..VirtioMemOptions::new(BASE)
            },
        );
        g.activate().unwrap();
        g
    }

    /// The features a Linux driver accepts: everything offered.
    pub fn activate(&mut self) -> Result<(), memvisor_virtio::ActivateError> {
        let features = self.dev.avail_features();
        self.activate_with(features)
    }

    /// Acks `features` and activates with a fresh queue in boot RAM.
    pub fn activate_with(&mut self, features: u64) -> Result<(), memvisor_virtio::ActivateError> {
        self.dev.ack_features(features);
        let driver = DriverQueue::new(&self.map, GuestAddress(0), 16, 16 * 1024).unwrap();
        let queue = driver.device_queue();
        self.dev.activate(self.map.clone(), self.irq.clone(), vec![queue])?;
        self.driver = Some(driver);
        Ok(())
    }

    /// Features a driver without UNPLUGGED_INACCESSIBLE support accepts.
    pub fn legacy_features() -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// Features with UNPLUGGED_INACCESSIBLE.
    pub fn modern_features() -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    pub fn driver(&mut self) -> &mut DriverQueue {
        self.driver.as_mut().expect("device activated")
    }

    /// Publishes `bufs`, kicks queue 0 and returns the completion, if any.
    pub fn submit(&mut self, bufs: &[Buf<'_>]) -> Option<Used> {
        self.driver().add(bufs).unwrap();
        self.dev.queue_notify(0);
        self.driver().pop_used()
    }

    /// Sends a request through the queue and decodes the response.
    pub fn request(&mut self, req_type: u16, addr: u64, nb_blocks: u16) -> VirtioMemResp {
        let bytes = VirtioMemReq {
            req_type,
            addr,
            nb_blocks,
        }
        .to_bytes();
        let used = self
            .submit(&[Buf::In(&bytes), Buf::Out(10)])
            .expect("the device answered");
        assert_eq!(used.len, 10, "response length");
        VirtioMemResp::from_bytes(&used.data).unwrap()
    }

    pub fn plug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.request(VIRTIO_MEM_REQ_PLUG, addr, nb_blocks).resp_type
    }

    pub fn unplug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.request(VIRTIO_MEM_REQ_UNPLUG, addr, nb_blocks).resp_type
    }

    pub fn unplug_all(&mut self) -> u16 {
        self.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0).resp_type
    }

    /// (response type, state) of a STATE request.
    pub fn state(&mut self, addr: u64, nb_blocks: u16) -> (u16, u16) {
        let r = self.request(VIRTIO_MEM_REQ_STATE, addr, nb_blocks);
        (r.resp_type, r.state)
    }

    /// The configuration space, read as a driver does (4 bytes at a time,
    /// as virtio-mmio would).
    pub fn config(&self) -> VirtioMemConfig {
        let mut bytes = [0u8; CONFIG_SIZE];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            self.dev.read_config(i as u64 * 4, chunk);
        }
        VirtioMemConfig::from_bytes(&bytes).unwrap()
    }

    /// Configuration interrupts since the last call.
    pub fn config_irqs(&self) -> u64 {
        self.irq.take(InterruptKind::Config)
    }

    /// Resident bytes of the whole virtio-mem region.
    pub fn resident(&self) -> u64 {
        self.block.resident_bytes(0, self.block.size()).unwrap()
    }

    /// Writes `len` bytes of 0x5a at guest address `addr` (guest touching
    /// plugged memory).
    pub fn touch(&self, addr: u64, len: u64) {
        use vm_memory::Bytes;
        self.map
            .memory()
            .write_slice(&vec![0x5a; len as usize], GuestAddress(addr))
            .unwrap();
    }
}

/// A listener that records what it is told, and refuses or vetoes on
/// demand.
#[derive(Default)]
pub struct Recorder {
    pub name: String,
    pub events: Mutex<Vec<(char, GuestRange)>>,
    pub refuse: Mutex<bool>,
    pub veto: Mutex<bool>,
}

impl Recorder {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            ..Default::default()
        })
    }

    pub fn take(&self) -> Vec<(char, GuestRange)> {
        std::mem::take(&mut self.events.lock().unwrap())
    }
}

impl RamDiscardListener for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal> {
        if *self.refuse.lock().unwrap() {
            return Err(Refusal("pin budget exhausted".into()));
        }
        self.events.lock().unwrap().push(('p', range));
        Ok(())
    }

    fn notify_discard(&self, range: GuestRange) {
        self.events.lock().unwrap().push(('d', range));
    }

    fn may_discard(&self, range: GuestRange) -> bool {
        let _ = range;
        !*self.veto.lock().unwrap()
    }
}

/// `GuestRange::new(start, len).unwrap()`.
pub fn r(start: u64, len: u64) -> GuestRange {
    GuestRange::new(start, len).unwrap()
}
