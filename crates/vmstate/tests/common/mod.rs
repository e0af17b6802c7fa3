//! A machine for migration tests: boot RAM holding the virtqueues, a
//! virtio-mem region, a virtio-iommu with two assigned endpoints whose DMA
//! goes through io_uring pinning (`UringPinner` + `ViommuDmaBridge`), and
//! one device on path 1 (`RamDmaListener`). The devices are driven through
//! real split virtqueues, like a guest would.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_dma::mapper::{DmaMapper, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::DiscardPolicy;
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::driver::{Buf, DriverQueue};
use memvisor_virtio::interrupt::EventFdInterrupt;
use memvisor_virtio_iommu::request::{Attach, Map};
use memvisor_virtio_iommu::{IommuOptions, IommuHandle, Request, Status, VirtioIommu, wire};
use memvisor_virtio_mem::wire::{VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VirtioMemReq, VirtioMemResp};
use memvisor_virtio_mem::{VirtioMem, VirtioMemOptions, VirtioMemRegion};
use memvisor_vmstate::Registry;
use memvisor_vmstate::devices::dma::{DmaDevice, DmaPath, DmaTarget};
use memvisor_vmstate::devices::virtio_iommu::VirtioIommuSection;
use memvisor_vmstate::devices::virtio_mem::VirtioMemSection;
use memvisor_vmstate::ram;
use vm_memory::GuestAddress;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const BOOT_SIZE: u64 = 4 * MIB;
pub const VMEM_BASE: u64 = 4 << 30;
pub const VMEM_SIZE: u64 = 64 * MIB;
pub const BLOCK: u64 = 2 * MIB;
pub const REQUESTED: u64 = 16 * MIB;
/// Endpoints of the two assigned devices behind the IOMMU.
pub const EP_A: u32 = 8;
pub const EP_B: u32 = 9;

pub const ACK: u16 = 0;
pub const BUSY: u16 = 2;

/// Where the queues live in boot RAM.
const VMEM_QUEUE: u64 = 0;
const IOMMU_REQUESTS: u64 = MIB;
const IOMMU_EVENTS: u64 = 2 * MIB;
/// Boot RAM the guest fills with a pattern (and maps for DMA).
pub const BOOT_DATA: u64 = 3 * MIB;
pub const BOOT_DATA_LEN: u64 = 512 * KIB;

/// `VmPin` is per process: tests of one binary that pin hold this so that
/// their `VmPin` assertions see only their own pins.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn r(start: u64, len: u64) -> GuestRange {
    GuestRange::new(start, len).unwrap()
}

/// Guest-physical address of virtio-mem block `i`.
pub fn block_addr(i: u64) -> u64 {
    VMEM_BASE + i * BLOCK
}

/// The byte the guest writes at `gpa`: never zero.
pub fn pattern(gpa: u64) -> u8 {
    ((gpa / 4096).wrapping_mul(31) ^ (gpa % 4096).wrapping_mul(7)) as u8 | 1
}

pub struct Machine {
    pub boot: Arc<RamBlock>,
    pub vmem_block: Arc<RamBlock>,
    pub region: Arc<VirtioMemRegion>,
    pub vmem: VirtioMem,
    pub vmem_queue: Option<DriverQueue>,
    pub map: GuestMemoryMap,
    pub policy: DiscardPolicy,
    pub iommu: VirtioIommu,
    pub iommu_requests: Option<DriverQueue>,
    pub iommu_events: Option<DriverQueue>,
    pub budget: Arc<PinBudget>,
    /// One pinner per DMA device: EP_A's, EP_B's, path 1's.
    pub pinners: Vec<Arc<UringPinner>>,
    pub dma: Vec<DmaDevice>,
}

impl Machine {
    /// A fresh machine: nothing plugged, nothing attached, no driver.
    pub fn new() -> Self {
        let boot = Arc::new(RamBlock::new("boot", BOOT_SIZE, Backing::Memfd).unwrap());
        let vmem_block = Arc::new(RamBlock::new("vmem0", VMEM_SIZE, Backing::Memfd).unwrap());
        let region = VirtioMemRegion::new(
            vmem_block.clone(),
            VirtioMemOptions {
                requested_size: REQUESTED,
                ..VirtioMemOptions::new(VMEM_BASE)
            },
        )
        .unwrap();
        let map = GuestMemoryMap::builder()
            .ram(0, boot.clone())
            .unwrap()
            .managed_ram(
                VMEM_BASE,
                vmem_block.clone(),
                region.clone() as Arc<dyn RamDiscardManager>,
            )
            .unwrap()
            .build()
            .unwrap();
        let vmem = VirtioMem::new(region.clone());
        let config = IommuOptions {
            endpoints: vec![EP_A, EP_B],
            domain_start: 1,
            domain_end: 1000,
            ..IommuOptions::default()
        };
        let iommu = VirtioIommu::new(config, Some(map.clone())).unwrap();
        let policy = DiscardPolicy::new();
        let budget = Arc::new(PinBudget::unlimited());
        let mut pinners = Vec::new();
        let mut dma = Vec::new();
        for name in ["vfio-a", "vfio-b", "vfio-c"] {
            let pinner = Arc::new(UringPinner::new(name, budget.clone()));
            dma.push(DmaDevice::new(
                name,
                DmaTarget {
                    memory: map.clone(),
                    mapper: pinner.clone() as Arc<dyn DmaMapper>,
                    policy: policy.clone(),
                    iommu: Some(iommu.handle()),
                },
            ));
            pinners.push(pinner);
        }
        Self {
            boot,
            vmem_block,
            region,
            vmem,
            vmem_queue: None,
            map,
            policy,
            iommu,
            iommu_requests: None,
            iommu_events: None,
            budget,
            pinners,
            dma,
        }
    }

    /// Every section of the machine, in a fresh registry.
    pub fn registry(&self) -> Registry {
        let mut reg = Registry::with_memory(self.map.clone());
        reg.register(VirtioMemSection::new(0, self.region.clone())).unwrap();
        ram::register_ram(&mut reg, &self.map).unwrap();
        reg.register(VirtioIommuSection::new(0, self.iommu.handle())).unwrap();
        for (i, dev) in self.dma.iter().enumerate() {
            reg.register(dev.section(i as u32)).unwrap();
        }
        reg
    }

    pub fn iommu_handle(&self) -> IommuHandle {
        self.iommu.handle()
    }

    /// Activates both devices with queues in boot RAM.
    pub fn activate(&mut self) {
        let mem = &self.map;
        self.vmem.ack_features(self.vmem.avail_features());
        let q = DriverQueue::new(mem, GuestAddress(VMEM_QUEUE), 16, 16 * KIB).unwrap();
        self.vmem
            .activate(
                self.map.clone(),
                Arc::new(EventFdInterrupt::new(1).unwrap()),
                vec![q.device_queue()],
            )
            .unwrap();
        self.vmem_queue = Some(q);
        self.iommu
            .ack_features(self.iommu.avail_features() | VIRTIO_F_VERSION_1);
        let requests = DriverQueue::new(mem, GuestAddress(IOMMU_REQUESTS), 64, 64 * KIB).unwrap();
        let events = DriverQueue::new(mem, GuestAddress(IOMMU_EVENTS), 16, 4 * KIB).unwrap();
        self.iommu
            .activate(
                self.map.clone(),
                Arc::new(EventFdInterrupt::new(2).unwrap()),
                vec![requests.device_queue(), events.device_queue()],
            )
            .unwrap();
        self.iommu_requests = Some(requests);
        self.iommu_events = Some(events);
    }

    /// A virtio-mem request through the queue; returns the response type.
    pub fn vmem_request(&mut self, req_type: u16, addr: u64, nb_blocks: u16) -> u16 {
        vmem_request(
            &mut self.vmem,
            self.vmem_queue.as_mut().unwrap(),
            req_type,
            addr,
            nb_blocks,
        )
    }

    pub fn plug(&mut self, block: u64, n: u16) -> u16 {
        self.vmem_request(VIRTIO_MEM_REQ_PLUG, block_addr(block), n)
    }

    pub fn unplug(&mut self, block: u64, n: u16) -> u16 {
        self.vmem_request(VIRTIO_MEM_REQ_UNPLUG, block_addr(block), n)
    }

    /// A virtio-iommu request through the queue; returns the status.
    pub fn iommu_request(&mut self, request: Request) -> Status {
        let q = self.iommu_requests.as_mut().unwrap();
        q.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
        self.iommu.queue_notify(wire::REQUEST_QUEUE);
        let used = q.pop_used().expect("the IOMMU answered");
        Status::from_u8(used.data[0]).unwrap()
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) {
        let s = self.iommu_request(Request::Attach(Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }));
        assert_eq!(s, Status::Ok, "attach {endpoint} to {domain}");
    }

    pub fn map_iova(&mut self, domain: u32, iova: u64, size: u64, gpa: u64) {
        let s = self.iommu_request(Request::Map(Map {
            domain,
            virt_start: iova,
            virt_end: iova + size - 1,
            phys_start: gpa,
            flags: wire::MAP_F_READ | wire::MAP_F_WRITE,
        }));
        assert_eq!(s, Status::Ok, "map {iova:#x} -> {gpa:#x}");
    }

    /// Writes the pattern over `[gpa, gpa + len)` (the guest touching it).
    pub fn fill(&self, gpa: u64, len: u64) {
        let data: Vec<u8> = (gpa..gpa + len).map(pattern).collect();
        let host = self.map.lookup(r(gpa, len)).unwrap();
        host.region.block().write(host.block_offset, &data).unwrap();
    }

    /// The standard source machine:
    /// * DMA devices attached: EP_A's and EP_B's bridges, and vfio-c on
    ///   path 1;
    /// * virtio-mem blocks 0, 1, 5, 9 plugged (8 MiB), block 3 plugged,
    ///   written and unplugged again; block 0 filled, block 1 half filled,
    ///   block 5 every other page, block 9 untouched;
    /// * boot RAM filled at [`BOOT_DATA`];
    /// * IOMMU: domain 1 (EP_A) maps block 0 and the first MiB of block 5,
    ///   domain 2 (EP_B) maps block 1 and 64 KiB of boot RAM.
    pub fn source() -> Self {
        let mut m = Self::new();
        m.activate();
        for (i, dev) in m.dma.iter().enumerate() {
            let path = match i {
                0 => DmaPath::Viommu {
                    iommu_instance: 0,
                    endpoint: EP_A,
                    guard: UnplugGuard::Reject,
                },
                1 => DmaPath::Viommu {
                    iommu_instance: 0,
                    endpoint: EP_B,
                    guard: UnplugGuard::Warn,
                },
                _ => DmaPath::Ram,
            };
            dev.attach(path).unwrap();
        }
        assert_eq!(m.plug(0, 2), ACK);
        assert_eq!(m.plug(5, 1), ACK);
        assert_eq!(m.plug(9, 1), ACK);
        assert_eq!(m.plug(3, 1), ACK);
        m.fill(block_addr(3), BLOCK);
        assert_eq!(m.unplug(3, 1), ACK);
        m.fill(block_addr(0), BLOCK);
        m.fill(block_addr(1), BLOCK / 2);
        for page in (0..BLOCK / 4096).step_by(2) {
            m.fill(block_addr(5) + page * 4096, 4096);
        }
        m.fill(BOOT_DATA, BOOT_DATA_LEN);
        m.attach(1, EP_A);
        m.attach(2, EP_B);
        m.map_iova(1, 0x10_0000, BLOCK, block_addr(0));
        m.map_iova(1, 0x40_0000, MIB, block_addr(5));
        m.map_iova(2, 0, BLOCK, block_addr(1));
        m.map_iova(2, 0x80_0000, 64 * KIB, BOOT_DATA);
        m
    }

    /// Bytes pinned by all of this machine's pinners.
    pub fn pinned(&self) -> u64 {
        self.pinners.iter().map(|p| p.pinned_bytes()).sum()
    }

    /// Bytes of `block` that are populated and not zero, per page.
    pub fn nonzero_populated_bytes(&self) -> (u64, u64) {
        let mut boot = 0;
        let mut page = vec![0u8; 4096];
        for off in (0..BOOT_SIZE).step_by(4096) {
            self.boot.read(off, &mut page).unwrap();
            if page.iter().any(|&b| b != 0) {
                boot += 4096;
            }
        }
        let mut vmem = 0;
        let view = self.region.populated();
        for run in view.runs(self.region.region(), true) {
            for gpa in (run.start()..run.end()).step_by(4096) {
                self.vmem_block.read(gpa - VMEM_BASE, &mut page).unwrap();
                if page.iter().any(|&b| b != 0) {
                    vmem += 4096;
                }
            }
        }
        (boot, vmem)
    }
}

/// A virtio-mem request through `queue`; returns the response type.
pub fn vmem_request(dev: &mut VirtioMem, queue: &mut DriverQueue, req_type: u16, addr: u64, nb_blocks: u16) -> u16 {
    let bytes = VirtioMemReq {
        req_type,
        addr,
        nb_blocks,
    }
    .to_bytes();
    queue.add(&[Buf::In(&bytes), Buf::Out(10)]).unwrap();
    dev.queue_notify(0);
    let used = queue.pop_used().expect("virtio-mem answered");
    VirtioMemResp::from_bytes(&used.data).unwrap().resp_type
}
