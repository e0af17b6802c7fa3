//! Random descriptor chains, physical and behind an IOMMU: the device never
//! panics, writes guest memory only inside device-writable buffers the
//! driver may write (and the used ring), and changes the image only where
//! an OUT it answered `VIRTIO_BLK_S_OK` says.

mod common;

use std::sync::Arc;

use common::*;
use memvisor_guest::DriverQueue;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_blk::wire::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
use memvisor_virtio_iommu::wire::{MAP_F_READ, MAP_F_WRITE};
use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

const SECTORS: u64 = 64;
/// Guest RAM under test: the queue at 0, buffers in [`AREA`].
const MEM: u64 = MIB;
const AREA: u64 = 256 << 10;
const AREA_LEN: u64 = 256 << 10;
/// Behind the IOMMU: IOVA `IOVA + x` is `AREA + x`, read-write in the
/// first half of the area, read-only in the second; nothing else is mapped
/// but the queue.
const IOVA: u64 = 0x7_0000_0000;
const QUEUE_IOVA: u64 = 0x9_0000_0000;

/// One descriptor: where it points, relative to the buffer area or
/// anywhere, its length and direction.
#[derive(Debug, Clone)]
enum Addr {
    /// `AREA + offset` (an IOVA of it behind the IOMMU).
    Area(u64),
    /// Any 64-bit address.
    Any(u64),
    /// Near the end of RAM or of the address space.
    Edge(u64),
}

#[derive(Debug, Clone)]
struct DescSpec {
    addr: Addr,
    len: u32,
    writable: bool,
}

#[derive(Debug, Clone)]
struct ChainSpec {
    req_type: u32,
    sector: u64,
    descs: Vec<DescSpec>,
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        6 => (0..AREA_LEN).prop_map(Addr::Area),
        1 => any::<u64>().prop_map(Addr::Any),
        1 => (0..4096u64).prop_map(Addr::Edge),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => Just(16u32),
        3 => (0..8u32).prop_map(|n| n * 512),
        2 => 0..2048u32,
        1 => Just(1u32),
        1 => any::<u32>(),
    ]
}

/// Any chain of 1 to 5 random descriptors.
fn random_chain() -> impl Strategy<Value = ChainSpec> {
    let desc = (addr(), len(), any::<bool>()).prop_map(|(addr, len, writable)| DescSpec { addr, len, writable });
    (
        prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), any::<u32>()],
        prop_oneof![0..SECTORS + 2, any::<u64>()],
        prop::collection::vec(desc, 1..6),
    )
        .prop_map(|(req_type, sector, descs)| ChainSpec {
            req_type,
            sector,
            descs,
        })
}

/// A chain shaped like a driver's (header, data, status byte), with
/// buffers anywhere in the area and occasionally a perturbed descriptor.
fn driver_chain() -> impl Strategy<Value = ChainSpec> {
    let area = || (0..AREA_LEN - 16).prop_map(Addr::Area);
    (
        prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID)],
        prop_oneof![4 => 0..SECTORS, 1 => SECTORS - 4..SECTORS + 4],
        area(),
        prop::collection::vec((area(), 0..5u32), 0..4),
        area(),
        prop::option::of((0..6usize, addr(), len(), any::<bool>())),
    )
        .prop_map(|(req_type, sector, header, data, status, perturb)| {
            let mut descs = vec![DescSpec {
                addr: header,
                len: 16,
                writable: false,
            }];
            for (addr, sectors) in data {
                descs.push(DescSpec {
                    addr,
                    len: if req_type == T_GET_ID { 20 } else { sectors * 512 },
                    writable: req_type != T_OUT,
                });
            }
            descs.push(DescSpec {
                addr: status,
                len: 1,
                writable: true,
            });
            if let Some((at, addr, len, writable)) = perturb {
                let at = at % descs.len();
                descs[at] = DescSpec { addr, len, writable };
            }
            ChainSpec {
                req_type,
                sector,
                descs,
            }
        })
}

fn chain() -> impl Strategy<Value = ChainSpec> {
    prop_oneof![1 => random_chain(), 2 => driver_chain()]
}

/// The address a descriptor holds, and the guest-physical range of it the
/// device may write if it is device-writable.
fn resolve(d: &DescSpec, iommu: bool) -> (u64, Option<(u64, u64)>) {
    let len = u64::from(d.len);
    match d.addr {
        Addr::Area(off) => {
            let at = if iommu { IOVA + off } else { AREA + off };
            // Writable without IOMMU: the whole buffer (clipped to RAM);
            // behind it: only what the read-write half maps.
            let limit = if iommu { AREA + AREA_LEN / 2 } else { MEM };
            let end = (AREA + off).saturating_add(len).min(limit);
            (at, (AREA + off < end).then_some((AREA + off, end)))
        }
        Addr::Any(a) => {
            let end = a.saturating_add(len).min(MEM);
            (a, (!iommu && a < end).then_some((a, end)))
        }
        Addr::Edge(back) => {
            if iommu {
                (u64::MAX - back, None)
            } else {
                let a = MEM.saturating_sub(back);
                let end = a.saturating_add(len).min(MEM);
                (a, (a < end).then_some((a, end)))
            }
        }
    }
}

struct Case {
    mem: GuestMemoryMap,
    driver: DriverQueue,
    dev: VirtioBlk,
    image: TempImage,
    iommu: Option<Iommu>,
}

fn setup(iommu: bool) -> Case {
    let mem = memory(MEM + 2 * MIB);
    let image = TempImage::new("random", SECTORS);
    let driver = DriverQueue::new(&mem, GuestAddress(0), 64, 4096).unwrap();
    let mut config = BlockConfig {
        id: "random".into(),
        ..BlockConfig::new(&image.path)
    };
    let iommu = iommu.then(|| {
        // The IOMMU's own queues live above the guest RAM under test.
        let mut i = Iommu::new(&mem, MEM, 1, false);
        i.attach(1, 1);
        i.map(
            1,
            QUEUE_IOVA,
            DriverQueue::footprint(64, 4096),
            0,
            MAP_F_READ | MAP_F_WRITE,
        );
        i.map(1, IOVA, AREA_LEN / 2, AREA, MAP_F_READ | MAP_F_WRITE);
        i.map(1, IOVA + AREA_LEN / 2, AREA_LEN / 2, AREA + AREA_LEN / 2, MAP_F_READ);
        config.iommu = Some((i.handle.clone(), 1));
        i
    });
    let mut dev = VirtioBlk::new(config).unwrap();
    dev.ack_features(dev.avail_features());
    let mut q = driver.device_queue();
    if iommu.is_some() {
        let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
        let (d, a, u) = (d + QUEUE_IOVA, a + QUEUE_IOVA, u + QUEUE_IOVA);
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    }
    dev.activate(mem.clone(), Arc::new(EventFdInterrupt::new(1).unwrap()), vec![q])
        .unwrap();
    Case {
        mem,
        driver,
        dev,
        image,
        iommu,
    }
}

/// The ranges of `a` and `b` (equally long) that differ.
fn changed(a: &[u8], b: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for (chunk, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x != y {
            out.extend(
                x.iter()
                    .zip(y)
                    .enumerate()
                    .filter(|(_, (p, q))| p != q)
                    .map(|(i, _)| (chunk * 4096 + i) as u64),
            );
        }
    }
    out
}

fn run(chains: &[ChainSpec], fill: u8, iommu: bool) -> Result<(), TestCaseError> {
    let mut c = setup(iommu);
    let driver_area = DriverQueue::footprint(64, 4096);
    // A pattern in all guest memory but the driver's rings.
    let pattern_mem: Vec<u8> = (driver_area..MEM).map(|i| (i as u8) ^ fill).collect();
    put(&c.mem, driver_area, &pattern_mem);
    for chain in chains {
        let mut raw = Vec::new();
        let mut allowed: Vec<(u64, u64)> = Vec::new();
        for d in &chain.descs {
            let (a, writable_range) = resolve(d, iommu);
            if d.writable
                && let Some(r) = writable_range
            {
                allowed.push(r);
            }
            raw.push((a, d.len, if d.writable { W } else { 0 }));
        }
        if let Some(DescSpec {
            addr: Addr::Area(off),
            writable: false,
            ..
        }) = chain.descs.first()
            && off + 16 <= AREA_LEN
        {
            put(&c.mem, AREA + off, &hdr(chain.req_type, chain.sector));
        }
        let before = get(&c.mem, 0, MEM as usize);
        let image_before = c.image.bytes();
        let head = c.driver.add_raw(&raw).unwrap();
        c.dev.queue_notify(0);

        // Memory: only the rings (in the driver's area) and the chain's
        // writable buffers may have changed.
        let after = get(&c.mem, 0, MEM as usize);
        for i in changed(&before, &after) {
            let ok = i < driver_area || allowed.iter().any(|&(s, e)| s <= i && i < e);
            prop_assert!(
                ok,
                "guest byte {:#x} written outside every writable buffer of {:x?}",
                i,
                chain
            );
        }
        // The chain was completed: random buffers never break the ring.
        prop_assert!(!c.dev.needs_reset());
        let used = c.driver.pop_used();
        prop_assert!(used.is_some(), "chain not completed");
        let used = used.unwrap();
        prop_assert_eq!(used.head, head);
        let writable: u64 = chain
            .descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        prop_assert!(
            u64::from(used.len) <= writable,
            "used {} > writable {}",
            used.len,
            writable
        );
        let mut written: Option<(u64, u64)> = None;
        if used.len > 0 {
            // The status byte is the last byte of the last descriptor.
            let last = chain.descs.last().unwrap();
            let (a, range) = resolve(last, iommu);
            let status_gpa = if iommu {
                range.map(|(_, e)| e - 1)
            } else {
                a.checked_add(u64::from(last.len) - 1)
            };
            prop_assert!(status_gpa.is_some(), "a status byte the device could not write");
            let status = get(&c.mem, status_gpa.unwrap(), 1)[0];
            prop_assert!([S_OK, S_IOERR, S_UNSUPP].contains(&status), "status {}", status);
            if status == S_OK && chain.req_type == T_OUT {
                let len: u64 = chain
                    .descs
                    .iter()
                    .filter(|d| !d.writable)
                    .map(|d| u64::from(d.len))
                    .sum();
                written = Some((chain.sector * 512, chain.sector * 512 + len - 16));
            }
        }
        // The image: changed only by a successful OUT, where it says.
        let image_after = c.image.bytes();
        prop_assert_eq!(image_after.len(), image_before.len());
        for i in changed(&image_before, &image_after) {
            prop_assert!(
                written.is_some_and(|(s, e)| s <= i && i < e),
                "image byte {:#x} written without a successful OUT",
                i
            );
        }
    }
    if let Some(i) = c.iommu.as_mut() {
        // Faults were reported, for the device's endpoint only.
        prop_assert!(i.faults().iter().all(|f| f.endpoint == 1));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_chains_with_physical_addresses(chains in prop::collection::vec(chain(), 1..8), fill in any::<u8>()) {
        run(&chains, fill, false)?;
    }

    #[test]
    fn random_chains_behind_an_iommu(chains in prop::collection::vec(chain(), 1..8), fill in any::<u8>()) {
        run(&chains, fill, true)?;
    }
}
