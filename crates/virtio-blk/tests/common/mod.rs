//! Shared test helpers: a temporary image, guest memory in a memfd, a
//! virtio-blk device activated with a [`DriverQueue`] in that memory, and
//! a virtio-iommu driven through its own queues for the tests behind an
//! IOMMU.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memvisor_guest::{Buf, DriverQueue, Used, VIRTQ_DESC_F_WRITE};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, RamBlock};
use memvisor_virtio::{EventFdInterrupt, InterruptKind, VirtioDevice};
use memvisor_virtio_blk::wire::{OutHdr, SECTOR_SIZE};
use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
use memvisor_virtio_iommu::request::{Attach, Map, Unmap};
use memvisor_virtio_iommu::wire::{self as iommu_wire, FaultEvent};
use memvisor_virtio_iommu::{IommuHandle, IommuOptions, Request as IommuRequest, Status, VirtioIommu};
use vm_memory::{Bytes, GuestAddress};

pub const MIB: u64 = 1 << 20;
pub const W: u16 = VIRTQ_DESC_F_WRITE;

/// A raw image in the temporary directory, removed when dropped.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    /// An image of `len` bytes (any length, to test refusals) holding
    /// [`pattern`].
    pub fn with_len(name: &str, len: u64) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("memvisor-blk-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, pattern(0, len as usize)).unwrap();
        Self { path }
    }

    /// An image of `sectors` sectors holding [`pattern`].
    pub fn new(name: &str, sectors: u64) -> Self {
        Self::with_len(name, sectors * SECTOR_SIZE)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The initial content of the image's bytes `[offset, +len)`: every byte
/// differs from its neighbours and no sector repeats another.
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect()
}

/// The 16-byte request header.
pub fn hdr(req_type: u32, sector: u64) -> [u8; 16] {
    OutHdr {
        req_type,
        reserved: 0,
        sector,
    }
    .to_bytes()
}

/// `len` bytes of guest RAM at 0, in a memfd.
pub fn memory(len: u64) -> GuestMemoryMap {
    let block = Arc::new(RamBlock::new("ram", len, Backing::Memfd).unwrap());
    GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap()
}

pub fn put(mem: &GuestMemoryMap, gpa: u64, data: &[u8]) {
    mem.memory().write_slice(data, GuestAddress(gpa)).unwrap();
}

/// The guest-physical page numbers written by the VMM since the last
/// call, over every region, in order.
pub fn dirty_pages(mem: &GuestMemoryMap) -> Vec<u64> {
    mem.regions()
        .iter()
        .flat_map(|r| {
            let first = r.range().start() / 4096;
            r.take_dirty().iter().map(move |page| first + page).collect::<Vec<_>>()
        })
        .collect()
}

pub fn get(mem: &GuestMemoryMap, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.memory().read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v
}

/// Guest RAM of the [`Fixture`]: 8 MiB.
pub const RAM: u64 = 8 * MIB;
/// Where the fixture's queue is laid out (its own data area follows).
pub const QUEUE_AT: u64 = 0;
/// Queue size of the fixture.
pub const QUEUE_SIZE: u16 = 64;
/// A buffer area the tests place raw chains' buffers in.
pub const BUFS: u64 = 4 * MIB;

/// A device on a temporary image, activated with one queue.
pub struct Fixture {
    pub mem: GuestMemoryMap,
    pub driver: DriverQueue,
    pub dev: VirtioBlk,
    pub irq: Arc<EventFdInterrupt>,
    pub image: TempImage,
}

impl Fixture {
    /// A writable 256-sector disk with serial "blk-serial-7".
    pub fn new() -> Self {
        Self::with(256, |_| {})
    }

    /// A disk of `sectors`, configured further by `configure`.
    pub fn with(sectors: u64, configure: impl FnOnce(&mut BlockConfig)) -> Self {
        Self::acking(sectors, configure, |offered| offered)
    }

    /// As [`with`](Self::with), the driver acknowledging `ack(offered)`.
    pub fn acking(sectors: u64, configure: impl FnOnce(&mut BlockConfig), ack: impl FnOnce(u64) -> u64) -> Self {
        let image = TempImage::new("fixture", sectors);
        let mut config = BlockConfig {
            id: "blk-serial-7".into(),
            ..BlockConfig::new(&image.path)
        };
        config.queue_size = QUEUE_SIZE;
        configure(&mut config);
        let mut dev = VirtioBlk::new(config).unwrap();
        let mem = memory(RAM);
        let driver = DriverQueue::new(&mem, GuestAddress(QUEUE_AT), QUEUE_SIZE, MIB).unwrap();
        let irq = Arc::new(EventFdInterrupt::new(1).unwrap());
        dev.ack_features(ack(dev.avail_features()));
        dev.activate(mem.clone(), irq.clone(), vec![driver.device_queue()])
            .unwrap();
        Self {
            mem,
            driver,
            dev,
            irq,
            image,
        }
    }

    /// Publishes `bufs`, kicks the device and returns the completion.
    pub fn submit(&mut self, bufs: &[Buf<'_>]) -> Option<Used> {
        self.driver.add(bufs).unwrap();
        self.dev.queue_notify(0);
        self.driver.pop_used()
    }

    /// Publishes raw descriptors `(addr, len, flags)`, kicks the device and
    /// returns the completion.
    pub fn submit_raw(&mut self, descs: &[(u64, u32, u16)]) -> Option<Used> {
        self.driver.add_raw(descs).unwrap();
        self.dev.queue_notify(0);
        self.driver.pop_used()
    }

    /// Reads `sectors` from `sector` with one data buffer; returns the
    /// completion (data, then the status byte).
    pub fn read(&mut self, sector: u64, sectors: u32) -> Used {
        let h = hdr(memvisor_virtio_blk::wire::T_IN, sector);
        self.submit(&[Buf::In(&h), Buf::Out(sectors * 512), Buf::Out(1)])
            .expect("answered")
    }

    /// Writes `data` at `sector` with one data buffer; returns the status.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        let h = hdr(memvisor_virtio_blk::wire::T_OUT, sector);
        let used = self
            .submit(&[Buf::In(&h), Buf::In(data), Buf::Out(1)])
            .expect("answered");
        assert_eq!(used.len, 1);
        used.data[0]
    }

    /// Publishes raw descriptors, forgets the pages written so far (the
    /// driver's), kicks the device, and returns the completion with the
    /// guest pages the device marked dirty while it ran, in order.
    pub fn submit_raw_dirty(&mut self, descs: &[(u64, u32, u16)]) -> (Option<Used>, Vec<u64>) {
        self.driver.add_raw(descs).unwrap();
        let _ = dirty_pages(&self.mem);
        self.dev.queue_notify(0);
        let dirty = dirty_pages(&self.mem);
        (self.driver.pop_used(), dirty)
    }

    pub fn queue_interrupts(&self) -> u64 {
        self.irq.take(InterruptKind::Queue(0))
    }

    pub fn config_interrupts(&self) -> u64 {
        self.irq.take(InterruptKind::Config)
    }
}

/// A virtio-iommu in `mem`, its queues at `base` (which needs 1 MiB),
/// with one endpoint `endpoint`, driven through its request queue.
pub struct Iommu {
    pub dev: VirtioIommu,
    pub handle: IommuHandle,
    pub requests: DriverQueue,
    pub events: DriverQueue,
}

impl Iommu {
    /// The IOMMU with `bypass` as the configured bypass mode (whether an
    /// unattached endpoint bypasses translation) and 32 event buffers.
    pub fn new(mem: &GuestMemoryMap, base: u64, endpoint: u32, bypass: bool) -> Self {
        let options = IommuOptions {
            endpoints: vec![endpoint],
            bypass,
            ..IommuOptions::default()
        };
        let mut dev = VirtioIommu::new(options, Some(mem.clone())).unwrap();
        dev.ack_features(dev.avail_features());
        let requests = DriverQueue::new(mem, GuestAddress(base), 16, 64 << 10).unwrap();
        let mut events = DriverQueue::new(mem, GuestAddress(base + 0x8_0000), 64, 64 << 10).unwrap();
        let irq = Arc::new(EventFdInterrupt::new(2).unwrap());
        dev.activate(mem.clone(), irq, vec![requests.device_queue(), events.device_queue()])
            .unwrap();
        for _ in 0..32 {
            events.add(&[Buf::Out(iommu_wire::FAULT_SIZE as u32)]).unwrap();
        }
        dev.queue_notify(iommu_wire::EVENT_QUEUE);
        let handle = dev.handle();
        Self {
            dev,
            handle,
            requests,
            events,
        }
    }

    fn send(&mut self, request: IommuRequest) {
        self.requests.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
        self.dev.queue_notify(iommu_wire::REQUEST_QUEUE);
        let used = self.requests.pop_used().expect("the IOMMU answered");
        assert_eq!(Status::from_u8(used.data[0]), Some(Status::Ok), "{request:?}");
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) {
        self.send(IommuRequest::Attach(Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }));
    }

    /// Maps `[iova, +len)` onto `gpa` with `flags` (`MAP_F_*`).
    pub fn map(&mut self, domain: u32, iova: u64, len: u64, gpa: u64, flags: u32) {
        self.send(IommuRequest::Map(Map {
            domain,
            virt_start: iova,
            virt_end: iova + len - 1,
            phys_start: gpa,
            flags,
        }));
    }

    pub fn unmap(&mut self, domain: u32, iova: u64, len: u64) {
        self.send(IommuRequest::Unmap(Unmap {
            domain,
            virt_start: iova,
            virt_end: iova + len - 1,
        }));
    }

    /// The fault events reported so far.
    pub fn faults(&mut self) -> Vec<FaultEvent> {
        std::iter::from_fn(|| self.events.pop_used())
            .map(|u| FaultEvent::from_bytes(&u.data).unwrap())
            .collect()
    }
}
