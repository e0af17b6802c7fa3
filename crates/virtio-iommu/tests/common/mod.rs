//! Shared test helpers: guest memory with boot RAM and a managed
//! (virtio-mem-like) region, a virtio-iommu device driven through real
//! split virtqueues in that memory, and a recording notifier.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use memvisor_memory::discard::BlockDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::driver::{Buf, DriverQueue, Used};
use memvisor_virtio::interrupt::{EventFdInterrupt, InterruptKind};
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::wire::{self, FaultEvent};
use memvisor_virtio_iommu::{
    IommuOptions, IommuHandle, IommuNotifier, MapCause, MapEvent, MapFlags, NotifierRefusal, Request, Status, UnmapCause,
    UnmapEvent,
    VirtioIommu,
};
use vm_memory::GuestAddress;

pub const MIB: u64 = 1 << 20;
/// Boot RAM: 16 MiB at 0; the queues live in its first MiBs.
pub const BOOT_SIZE: u64 = 16 * MIB;
/// The managed region: 64 MiB at 4 GiB in 2 MiB blocks.
pub const HOT_BASE: u64 = 4 << 30;
pub const HOT_SIZE: u64 = 64 * MIB;
pub const BLOCK: u64 = 2 * MIB;

pub const RW: u32 = wire::MAP_F_READ | wire::MAP_F_WRITE;

pub fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(start, len).unwrap()
}

pub struct Memory {
    pub map: GuestMemoryMap,
    pub hot: Arc<RamBlock>,
    pub manager: Arc<BlockDiscardManager>,
}

impl Memory {
    pub fn new() -> Self {
        let boot = Arc::new(RamBlock::new("boot", BOOT_SIZE, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("vmem0", HOT_SIZE, Backing::Memfd).unwrap());
        let manager = Arc::new(BlockDiscardManager::new(range(HOT_BASE, HOT_SIZE), BLOCK).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(HOT_BASE, hot.clone(), manager.clone())
            .unwrap()
            .build()
            .unwrap();
        Self { map, hot, manager }
    }

    /// Plugs `[HOT_BASE + offset, +len)`.
    pub fn plug(&self, offset: u64, len: u64) {
        self.manager
            .write()
            .plug(range(HOT_BASE + offset, len), || Ok::<_, ()>(()), |_| {})
            .unwrap();
    }

    /// Unplugs `[HOT_BASE + offset, +len)`.
    pub fn unplug(&self, offset: u64, len: u64) {
        let hot = self.hot.clone();
        self.manager
            .write()
            .unplug(range(HOT_BASE + offset, len), false, |r| {
                hot.discard(r.start() - HOT_BASE, r.len()).unwrap()
            })
            .unwrap();
    }
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

/// What a [`Recorder`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Map {
        endpoint: u32,
        domain: u32,
        iova: u64,
        size: u64,
        phys: u64,
        flags: MapFlags,
        cause: MapCause,
        /// The event carried a host range.
        host: bool,
        /// The event carried the manager's view, and the range was populated in it.
        view: bool,
    },
    Unmap {
        endpoint: u32,
        domain: u32,
        iova: u64,
        size: u64,
        cause: UnmapCause,
    },
}

impl Seen {
    pub fn iova(&self) -> u64 {
        match self {
            Seen::Map { iova, .. } | Seen::Unmap { iova, .. } => *iova,
        }
    }
    pub fn is_map(&self) -> bool {
        matches!(self, Seen::Map { .. })
    }
}

/// A notifier that records events and refuses maps at chosen IOVAs.
pub struct Recorder {
    pub name: String,
    pub seen: Mutex<Vec<Seen>>,
    pub refuse: Mutex<Option<(u64, NotifierRefusal)>>,
}

impl Recorder {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            seen: Mutex::new(Vec::new()),
            refuse: Mutex::new(None),
        })
    }

    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut self.seen.lock().unwrap())
    }

    pub fn refuse_at(&self, iova: u64, status: NotifierRefusal) {
        *self.refuse.lock().unwrap() = Some((iova, status));
    }
}

impl IommuNotifier for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        if let Some((iova, status)) = *self.refuse.lock().unwrap()
            && iova == ev.iova
        {
            return Err(status);
        }
        if let Some(host) = &ev.host {
            assert_eq!(host.guest, range(ev.phys, ev.size));
        }
        let view = ev.populated.is_some_and(|v| v.is_populated(range(ev.phys, ev.size)));
        self.seen.lock().unwrap().push(Seen::Map {
            endpoint: ev.endpoint,
            domain: ev.domain,
            iova: ev.iova,
            size: ev.size,
            phys: ev.phys,
            flags: ev.flags,
            cause: ev.cause,
            host: ev.host.is_some(),
            view,
        });
        Ok(())
    }

    fn notify_unmap(&self, ev: &UnmapEvent) {
        self.seen.lock().unwrap().push(Seen::Unmap {
            endpoint: ev.endpoint,
            domain: ev.domain,
            iova: ev.iova,
            size: ev.size,
            cause: ev.cause,
        });
    }
}
