//! The vmstate loader: a destination machine (boot RAM, a virtio-mem
//! region, a virtio-iommu, three DMA devices pinning through io_uring)
//! loads a fuzzed stream.
//!
//! Input: the first byte chooses the form. Even: the rest is the stream,
//! as it arrives (checksums and all). Odd: the rest is a list of sections
//! — `[which: u8][version: u16][len: u16][payload]` — written as a stream
//! with fresh checksums, so the mutations reach the section parsers and
//! the loaders behind them rather than stopping at a CRC.
//!
//! Checked after every load, successful or not: no panic; no resident page
//! in a discarded block; every pin of a path-2 device lies in populated
//! memory and equals its endpoint's live mappings; a path-1 device pins
//! boot RAM and the plugged blocks; after a failed load nothing is pinned;
//! `VmPin` equals the backends' count, and is zero once the machine is
//! dropped.

use std::sync::Arc;

use memvisor_dma::mapper::{DmaMapper, PinBudget, vm_pin_kib};
use memvisor_dma::uring::UringPinner;
use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::policy::DiscardPolicy;
use memvisor_memory::{Backing, RamBlock};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::driver::{Buf, DriverQueue};
use memvisor_virtio::interrupt::EventFdInterrupt;
use memvisor_virtio_iommu::request::{Attach, Map};
use memvisor_virtio_iommu::{IommuOptions, IommuHandle, Request, Status, VirtioIommu, wire};
use memvisor_virtio_mem::request::{BlockRange, Request as MemRequest};
use memvisor_virtio_mem::{VirtioMemOptions, VirtioMemRegion};
use memvisor_vmstate::devices::dma::{DmaDevice, DmaPath, DmaTarget};
use memvisor_vmstate::devices::virtio_iommu::VirtioIommuSection;
use memvisor_vmstate::devices::virtio_mem::VirtioMemSection;
use memvisor_vmstate::format::{RawSection, write_raw};
use memvisor_vmstate::{Registry, ram};
use vm_memory::GuestAddress;

use crate::{KIB, MIB};

pub const BOOT: u64 = 2 * MIB;
pub const VMEM_BASE: u64 = 4 << 30;
pub const VMEM_SIZE: u64 = 16 * MIB;
pub const BLOCK: u64 = 2 * MIB;
pub const EP_A: u32 = 8;
pub const EP_B: u32 = 9;
/// The machine's pin budget: a bug cannot pin more.
pub const BUDGET: u64 = 64 * MIB;

/// The sections a destination has, in the order the source writes them.
pub const SECTIONS: [(&str, u32); 7] = [
    ("virtio-mem", 0),
    ("ram", 0),
    ("ram", 1),
    ("virtio-iommu", 0),
    ("dma", 0),
    ("dma", 1),
    ("dma", 2),
];

pub struct VmMachine {
    pub boot: Arc<RamBlock>,
    pub vmem_block: Arc<RamBlock>,
    pub region: Arc<VirtioMemRegion>,
    pub map: GuestMemoryMap,
    pub iommu: VirtioIommu,
    pub pinners: Vec<Arc<UringPinner>>,
    pub dma: Vec<DmaDevice>,
}

impl Default for VmMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl VmMachine {
    pub fn new() -> Self {
        let boot = Arc::new(RamBlock::new("boot", BOOT, Backing::Memfd).expect("boot"));
        let vmem_block = Arc::new(RamBlock::new("vmem0", VMEM_SIZE, Backing::Memfd).expect("vmem"));
        let region = VirtioMemRegion::new(
            vmem_block.clone(),
            VirtioMemOptions {
                requested_size: 8 * MIB,
                ..VirtioMemOptions::new(VMEM_BASE)
            },
        )
        .expect("region");
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
        let config = IommuOptions {
            endpoints: vec![EP_A, EP_B],
            domain_start: 1,
            domain_end: 1000,
            ..IommuOptions::default()
        };
        let iommu = VirtioIommu::new(config, Some(map.clone())).expect("iommu");
        let policy = DiscardPolicy::new();
        let budget = Arc::new(PinBudget::limited(BUDGET));
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
            map,
            iommu,
            pinners,
            dma,
        }
    }

    pub fn handle(&self) -> IommuHandle {
        self.iommu.handle()
    }

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

    pub fn pinned(&self) -> u64 {
        self.pinners.iter().map(|p| p.pinned_bytes()).sum()
    }

    /// The invariants of a loaded (or refused) machine.
    pub fn check(&self, loaded: bool) {
        let view = self.region.populated();
        let hot = self.region.region();
        for run in view.runs(hot, false) {
            let resident = self
                .vmem_block
                .resident_bytes(run.start() - VMEM_BASE, run.len())
                .expect("mincore");
            assert_eq!(resident, 0, "{resident:#x} bytes resident in discarded {run}");
        }
        let handle = self.handle();
        for dev in &self.dma {
            let pinned = dev.pinned_bytes();
            match dev.path() {
                None => assert_eq!(pinned, 0, "{}: detached but pins {pinned:#x}", dev.name()),
                Some(DmaPath::Ram) => assert_eq!(pinned, BOOT + view.populated_bytes(), "{}: path 1", dev.name()),
                Some(DmaPath::Viommu { endpoint, .. }) => {
                    let ranges = dev.pinned_ranges().expect("a bridge");
                    for r in &ranges {
                        if r.overlaps(&hot) {
                            assert!(view.is_populated(*r), "{}: pinned {r} is not populated", dev.name());
                        }
                    }
                    assert_eq!(pinned, ranges.iter().map(|r| r.len()).sum::<u64>(), "{}", dev.name());
                    let mapped: u64 = handle
                        .endpoint_domain(endpoint)
                        .and_then(|d| handle.mappings(d))
                        .unwrap_or_default()
                        .iter()
                        .filter(|m| !m.flags.mmio())
                        .map(|m| m.size())
                        .sum();
                    assert_eq!(
                        pinned,
                        mapped,
                        "{}: pins vs live mappings of endpoint {endpoint}",
                        dev.name()
                    );
                }
            }
        }
        drop(view);
        if !loaded {
            assert_eq!(self.pinned(), 0, "a failed load left pins");
        }
        assert_eq!(vm_pin_kib() * 1024, self.pinned(), "VmPin vs backends");
    }
}

/// Decodes an input into the stream to load.
pub fn stream(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut sections = Vec::new();
    let mut rest = rest;
    while rest.len() >= 5 {
        let which = rest[0];
        let version = u16::from_le_bytes([rest[1], rest[2]]);
        let len = usize::from(u16::from_le_bytes([rest[3], rest[4]])).min(rest.len() - 5);
        let payload = rest[5..5 + len].to_vec();
        rest = &rest[5 + len..];
        let (name, instance) = match usize::from(which) {
            i if i < SECTIONS.len() * 32 => SECTIONS[i % SECTIONS.len()],
            i => ("unknown", i as u32),
        };
        let header = memvisor_vmstate::format::SectionHeader {
            id: memvisor_vmstate::SectionId::new(name, instance),
            version,
            len: payload.len() as u64,
            offset: 0,
        };
        sections.push(RawSection { header, payload });
    }
    let mut out = Vec::new();
    write_raw(&mut out, &sections).expect("writing to a Vec");
    out
}

/// One input.
pub fn run(data: &[u8]) {
    let bytes = stream(data);
    {
        let m = VmMachine::new();
        let result = m.registry().load(&bytes[..]);
        m.check(result.is_ok());
    }
    assert_eq!(vm_pin_kib(), 0, "pins left after the machine was dropped");
}

/// A source machine: blocks plugged and written, DMA devices attached on
/// both paths, IOMMU mappings onto plugged and boot memory. Its stream is
/// the seed the fuzzer mutates.
pub fn source_stream() -> Vec<u8> {
    let mut m = VmMachine::new();
    m.dma[0]
        .attach(DmaPath::Viommu {
            iommu_instance: 0,
            endpoint: EP_A,
            guard: UnplugGuard::Reject,
        })
        .unwrap();
    m.dma[1]
        .attach(DmaPath::Viommu {
            iommu_instance: 0,
            endpoint: EP_B,
            guard: UnplugGuard::Warn,
        })
        .unwrap();
    m.dma[2].attach(DmaPath::Ram).unwrap();
    for (block, n) in [(0, 2), (5, 1)] {
        let r = m.region.handle(MemRequest::Plug(BlockRange {
            addr: VMEM_BASE + block * BLOCK,
            nb_blocks: n,
        }));
        assert_eq!(r.resp_type(), 0);
    }
    m.vmem_block.write(0x1000, &[0x5a; 8192]).unwrap();
    m.vmem_block.write(5 * BLOCK + 0x3000, &[0xa5; 100]).unwrap();
    m.boot.write(MIB + 0x2000, &[7; 4096]).unwrap();
    // Drive the real device through its queue.
    let map = m.map.clone();
    let mut q = DriverQueue::new(&map, GuestAddress(0), 16, 16 * KIB).unwrap();
    let ev = DriverQueue::new(&map, GuestAddress(256 * KIB), 4, 4 * KIB).unwrap();
    let d = &mut m.iommu;
    d.ack_features(d.avail_features());
    d.activate(
        m.map.clone(),
        Arc::new(EventFdInterrupt::new(2).unwrap()),
        vec![q.device_queue(), ev.device_queue()],
    )
    .unwrap();
    let mut send = |req: Request| {
        q.add(&[Buf::In(&req.to_bytes()), Buf::Out(4)]).unwrap();
        d.queue_notify(wire::REQUEST_QUEUE);
        let used = q.pop_used().unwrap();
        assert_eq!(Status::from_u8(used.data[0]), Some(Status::Ok), "{req:?}");
    };
    for (domain, endpoint) in [(1, EP_A), (2, EP_B)] {
        send(Request::Attach(Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }));
    }
    for (domain, iova, len, phys, flags) in [
        (1, 0x10_0000, BLOCK, VMEM_BASE, 3),
        (1, 0x40_0000, MIB, VMEM_BASE + 5 * BLOCK, 1),
        (2, 0, 64 * KIB, MIB, 3),
        (2, 0x80_0000, 0x1000, 0xfee0_0000, wire::MAP_F_MMIO | 3),
    ] {
        send(Request::Map(Map {
            domain,
            virt_start: iova,
            virt_end: iova + len - 1,
            phys_start: phys,
            flags,
        }));
    }
    m.check(true);
    let mut out = Vec::new();
    m.registry().save(&mut out).unwrap();
    out
}
