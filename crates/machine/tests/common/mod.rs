//! A machine for the DMA tests: boot RAM holding the rings, a virtio-mem
//! region, a virtio-iommu, both driven by a guest driver through real split
//! virtqueues, and an assigned device on the io_uring pinning backend —
//! behind the vIOMMU (path 2) or without one (path 1).
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_dma::mapper::{DmaMapper, PinBudget, vm_pin_kib};
use memvisor_dma::ram_listener::RamDmaListener;
use memvisor_dma::uring::UringPinner;
use memvisor_dma::viommu_bridge::{UnplugGuard, ViommuDmaBridge};
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::DiscardPolicy;
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio::driver::{Buf, DriverQueue};
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::request::{Attach, Map, Unmap};
use memvisor_virtio_iommu::{IommuOptions, IommuHandle, Request as IommuRequest, Status, VirtioIommu};
use memvisor_virtio_mem::request::{BlockRange, Request as MemRequest};
use memvisor_virtio_mem::{VirtioMem, VirtioMemOptions, VirtioMemRegion};
use vm_memory::GuestAddress;

pub const MIB: u64 = 1 << 20;
pub const BOOT: u64 = 4 * MIB;
pub const HOT: u64 = 4 << 30;
pub const BLOCK: u64 = 2 * MIB;
pub const ENDPOINT: u32 = 8;
pub const DOMAIN: u32 = 1;
pub const RW: u32 = 3;
pub const MMIO: u32 = 4;

pub const ACK: u16 = 0;
pub const NACK: u16 = 1;
pub const BUSY: u16 = 2;
pub const ERROR: u16 = 3;

/// `VmPin` is per process: tests in one binary that pin hold this.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which DMA path the assigned device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No vIOMMU: `RamDmaListener`.
    Plain,
    /// Behind the vIOMMU: `ViommuDmaBridge` with this guard.
    Viommu(UnplugGuard),
}

pub struct Machine {
    pub mem: GuestMemoryMap,
    pub hot: Arc<RamBlock>,
    pub region: Arc<VirtioMemRegion>,
    pub vmem: VirtioMem,
    pub vmem_q: DriverQueue,
    pub iommu: VirtioIommu,
    pub handle: IommuHandle,
    pub iommu_q: DriverQueue,
    pub pinner: Arc<UringPinner>,
    pub policy: DiscardPolicy,
    pub bridge: Option<ViommuDmaBridge>,
    pub listener: Option<RamDmaListener>,
}

fn activate(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMap, queues: Vec<virtio_queue::Queue>) {
    dev.ack_features(dev.avail_features());
    let irq = Arc::new(EventFdInterrupt::new(queues.len() as u16).unwrap());
    dev.activate(mem.clone(), irq, queues).unwrap();
}

impl Machine {
    /// A machine with `hot_size` bytes of virtio-mem RAM (all of it
    /// requested), pinning through a budget of `budget` bytes.
    pub fn new(path: Path, hot_size: u64, budget: Option<u64>) -> Self {
        let boot = Arc::new(RamBlock::new("boot", BOOT, Backing::Memfd).unwrap());
        let hot = Arc::new(RamBlock::new("vmem0", hot_size, Backing::Memfd).unwrap());
        let mut options = VirtioMemOptions::new(HOT);
        options.requested_size = hot_size;
        let region = VirtioMemRegion::new(hot.clone(), options).unwrap();
        let mem = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(HOT, hot.clone(), region.clone() as Arc<dyn RamDiscardManager>)
            .unwrap()
            .build()
            .unwrap();
        let mut vmem = VirtioMem::new(region.clone());
        let vmem_q = DriverQueue::new(&mem, GuestAddress(0), 16, 4096).unwrap();
        activate(&mut vmem, &mem, vec![vmem_q.device_queue()]);
        let config = IommuOptions {
            endpoints: vec![ENDPOINT],
            bypass: false,
            ..IommuOptions::default()
        };
        let mut iommu = VirtioIommu::new(config, None).unwrap();
        let iommu_q = DriverQueue::new(&mem, GuestAddress(0x10_0000), 16, 4096).unwrap();
        let event_q = DriverQueue::new(&mem, GuestAddress(0x20_0000), 4, 4096).unwrap();
        activate(&mut iommu, &mem, vec![iommu_q.device_queue(), event_q.device_queue()]);
        let handle = iommu.handle();
        let budget = Arc::new(budget.map_or_else(PinBudget::unlimited, PinBudget::limited));
        let pinner = Arc::new(UringPinner::new("dev0", budget));
        let policy = DiscardPolicy::new();
        let (mut bridge, mut listener) = (None, None);
        match path {
            Path::Plain => listener = Some(RamDmaListener::attach("dev0", &mem, pinner.clone(), &policy).unwrap()),
            Path::Viommu(guard) => {
                let b = ViommuDmaBridge::attach("dev0", &mem, pinner.clone(), &policy, guard).unwrap();
                handle.register_notifier(ENDPOINT, b.notifier()).unwrap();
                bridge = Some(b);
            }
        }
        let mut m = Self {
            mem,
            hot,
            region,
            vmem,
            vmem_q,
            iommu,
            handle,
            iommu_q,
            pinner,
            policy,
            bridge,
            listener,
        };
        if let Path::Viommu(_) = path {
            assert_eq!(
                m.iommu(IommuRequest::Attach(Attach {
                    domain: DOMAIN,
                    endpoint: ENDPOINT,
                    flags: 0,
                    reserved: [0; 4],
                })),
                Status::Ok
            );
        }
        m
    }

    /// Sends a virtio-mem request through its queue; returns the response type.
    pub fn vmem(&mut self, request: MemRequest) -> u16 {
        Self::mem_driver(&mut self.vmem, &mut self.vmem_q).send(request)
    }

    /// The virtio-mem driver alone, for a thread of its own.
    pub fn mem_driver<'a>(dev: &'a mut VirtioMem, queue: &'a mut DriverQueue) -> MemDriver<'a> {
        MemDriver { dev, queue }
    }

    /// The virtio-iommu driver alone, for a thread of its own.
    pub fn driver_pair<'a>(dev: &'a mut VirtioIommu, queue: &'a mut DriverQueue) -> IommuDriver<'a> {
        IommuDriver { dev, queue }
    }

    pub fn plug(&mut self, block: u64, n: u16) -> u16 {
        self.vmem(MemRequest::Plug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks: n,
        }))
    }

    pub fn unplug(&mut self, block: u64, n: u16) -> u16 {
        self.vmem(MemRequest::Unplug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks: n,
        }))
    }

    pub fn unplug_all(&mut self) -> u16 {
        self.vmem(MemRequest::UnplugAll)
    }

    /// Sends a virtio-iommu request through its queue; returns the status.
    pub fn iommu(&mut self, request: IommuRequest) -> Status {
        Self::driver_pair(&mut self.iommu, &mut self.iommu_q).send(request)
    }

    pub fn map(&mut self, iova: u64, phys: u64, len: u64, flags: u32) -> Status {
        Self::driver_pair(&mut self.iommu, &mut self.iommu_q).map(iova, phys, len, flags)
    }

    pub fn unmap(&mut self, iova: u64, len: u64) -> Status {
        Self::driver_pair(&mut self.iommu, &mut self.iommu_q).unmap(iova, len)
    }

    /// Bytes of the live non-MMIO IOMMU mappings.
    pub fn mapped_bytes(&self) -> u64 {
        self.handle
            .mappings(DOMAIN)
            .unwrap_or_default()
            .iter()
            .filter(|m| !m.flags.mmio())
            .map(|m| m.size())
            .sum()
    }

    /// Checks DESIGN.md rules 1 and 2 and the accounting, at one instant:
    /// no pinned byte lies in a discarded block; the backend's pinned bytes
    /// equal the live mappings; `VmPin` agrees with the backend (valid
    /// while this is the only pinning machine in the process).
    pub fn check_invariants(&self) {
        let view = self.region.populated();
        let pinned = self.pinner.pinned_bytes();
        match (&self.bridge, &self.listener) {
            (Some(bridge), _) => {
                for r in bridge.pinned_ranges() {
                    let hot = GuestRange::new(HOT, self.region.region_size()).unwrap();
                    if r.overlaps(&hot) {
                        assert!(view.is_populated(r), "pinned {r} is not populated");
                    }
                }
                assert_eq!(pinned, bridge.pinned_bytes());
                assert_eq!(pinned, self.mapped_bytes(), "backend vs live IOMMU mappings");
            }
            (None, Some(_)) => {
                assert_eq!(pinned, BOOT + view.populated_bytes(), "backend vs boot RAM + plugged");
            }
            (None, None) => unreachable!(),
        }
        drop(view);
        assert_eq!(vm_pin_kib() * 1024, pinned, "VmPin vs backend");
    }
}

/// A guest's virtio-mem driver: one device, one request queue.
pub struct MemDriver<'a> {
    dev: &'a mut VirtioMem,
    queue: &'a mut DriverQueue,
}

impl MemDriver<'_> {
    pub fn send(&mut self, request: MemRequest) -> u16 {
        self.queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(10)]).unwrap();
        self.dev.queue_notify(0);
        let used = self.queue.pop_used().expect("virtio-mem answered");
        u16::from_le_bytes([used.data[0], used.data[1]])
    }

    pub fn plug(&mut self, block: u64) -> u16 {
        self.send(MemRequest::Plug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks: 1,
        }))
    }

    pub fn unplug(&mut self, block: u64) -> u16 {
        self.send(MemRequest::Unplug(BlockRange {
            addr: HOT + block * BLOCK,
            nb_blocks: 1,
        }))
    }
}

/// A guest's virtio-iommu driver: one device, one request queue.
pub struct IommuDriver<'a> {
    dev: &'a mut VirtioIommu,
    queue: &'a mut DriverQueue,
}

impl IommuDriver<'_> {
    pub fn send(&mut self, request: IommuRequest) -> Status {
        self.queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(4)]).unwrap();
        self.dev.queue_notify(0);
        let used = self.queue.pop_used().expect("virtio-iommu answered");
        Status::from_u8(used.data[0]).expect("a valid status")
    }

    pub fn map(&mut self, iova: u64, phys: u64, len: u64, flags: u32) -> Status {
        self.send(IommuRequest::Map(Map {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + len - 1,
            phys_start: phys,
            flags,
        }))
    }

    pub fn unmap(&mut self, iova: u64, len: u64) -> Status {
        self.send(IommuRequest::Unmap(Unmap {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + len - 1,
        }))
    }
}
