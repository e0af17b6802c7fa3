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

use memvisor_dma::mapper::vm_pin_kib;
use memvisor_guest::{Buf, DriverQueue};
use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, RamSpec, UnplugGuard,
    VirtioIommuSpec, VirtioMemSpec,
};
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::request::{Attach, Map};
use memvisor_virtio_iommu::{Request, Status, wire};
use memvisor_virtio_mem::request::{BlockRange, Request as MemRequest};
use memvisor_vmstate::format::{RawSection, write_raw};
use vm_memory::GuestAddress;

use crate::{KIB, MIB, check_machine};

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

/// The machine on both ends of the stream: boot RAM, a virtio-mem region
/// (8 MiB requested), a virtio-iommu with endpoints [`EP_A`] and [`EP_B`]
/// (domains 1 to 1000), and three devices pinning through io_uring under
/// one budget, in the order of their `dma` sections: `vfio-a` behind
/// `EP_A` (guard `reject`), `vfio-b` behind `EP_B` (guard `warn`),
/// `vfio-c` on path 1.
pub fn config() -> MachineConfig {
    let device = |name: &str, path| AssignedDeviceSpec {
        name: name.into(),
        backend: DmaBackend::Uring,
        path,
    };
    let viommu = |endpoint, guard| AssignedPath::Viommu { endpoint, guard };
    MachineConfig {
        ram: vec![RamSpec { addr: 0, size: BOOT }],
        virtio_mem: vec![VirtioMemSpec {
            requested_size: 8 * MIB,
            ..VirtioMemSpec::new("vmem0", VMEM_BASE, VMEM_SIZE, BLOCK)
        }],
        virtio_iommu: Some(VirtioIommuSpec {
            endpoints: vec![EP_A, EP_B],
            domain_start: 1,
            domain_end: 1000,
            ..VirtioIommuSpec::default()
        }),
        dma: DmaSpec {
            devices: vec![
                device("vfio-a", viommu(EP_A, UnplugGuard::Reject)),
                device("vfio-b", viommu(EP_B, UnplugGuard::Warn)),
                device("vfio-c", AssignedPath::Ram),
            ],
            pin_budget: Some(BUDGET),
        },
    }
}

/// The invariants of a loaded (or refused) machine: [`check_machine`],
/// and nothing pinned after a failed load.
pub fn check(machine: &Machine, loaded: bool) {
    check_machine(machine);
    if !loaded {
        assert_eq!(machine.pinned_bytes(), 0, "a failed load left pins");
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

/// One input: a fresh destination (nothing attached: the load attaches
/// what the stream says) loads the stream.
pub fn run(data: &[u8]) {
    let bytes = stream(data);
    {
        let m = Machine::incoming(&config()).expect("the destination");
        let result = m.registry().expect("the registry").load(&bytes[..]);
        check(&m, result.is_ok());
    }
    assert_eq!(vm_pin_kib(), 0, "pins left after the machine was dropped");
}

/// A source machine: blocks plugged and written, DMA devices attached on
/// both paths, IOMMU mappings onto plugged and boot memory. Its stream is
/// the seed the fuzzer mutates.
pub fn source_stream() -> Vec<u8> {
    let mut m = Machine::new(&config()).expect("the source");
    let region = m.vmems()[0].region.clone();
    for (block, n) in [(0, 2), (5, 1)] {
        let r = region.apply(MemRequest::Plug(BlockRange {
            addr: VMEM_BASE + block * BLOCK,
            nb_blocks: n,
        }));
        assert_eq!(r.resp_type(), 0);
    }
    region.block().write(0x1000, &[0x5a; 8192]).unwrap();
    region.block().write(5 * BLOCK + 0x3000, &[0xa5; 100]).unwrap();
    let map = m.memory().clone();
    map.regions()[0].block().write(MIB + 0x2000, &[7; 4096]).unwrap();
    // Drive the real device through its queue.
    let mut q = DriverQueue::new(&map, GuestAddress(0), 16, 16 * KIB).unwrap();
    let ev = DriverQueue::new(&map, GuestAddress(256 * KIB), 4, 4 * KIB).unwrap();
    let d = &mut m.iommu_mut().expect("a virtio-iommu").device;
    d.ack_features(d.avail_features());
    d.activate(
        map,
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
    check(&m, true);
    let mut out = Vec::new();
    m.save(&mut out).unwrap();
    out
}
