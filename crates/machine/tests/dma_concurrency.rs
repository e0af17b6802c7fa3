//! Rule 3 under fire: one thread maps and unmaps through the IOMMU's
//! request queue while another unplugs and re-plugs the same blocks through
//! virtio-mem's, and an observer checks, at every observation, that no
//! pinned byte lies in a discarded block.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use memvisor_dma::mapper::DmaMapper;
use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_memory::GuestRange;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_virtio_iommu::Status;

const ROUNDS: u64 = 3000;
const BLOCKS: u64 = 4;

#[test]
fn maps_racing_unplugs_never_pin_discarded_memory() {
    let mut m = Machine::new(Path::Viommu(UnplugGuard::Reject), 16 * MIB, None);
    assert_eq!(m.plug(0, BLOCKS as u16), ACK);
    let done = AtomicBool::new(false);
    let (maps_ok, maps_refused, unplugs_ok, unplugs_busy) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let observations = AtomicU64::new(0);

    // Split the machine into what each thread drives.
    let Machine {
        vmem,
        vmem_q,
        iommu,
        iommu_q,
        region,
        bridge,
        pinner,
        ..
    } = &mut m;
    let bridge = bridge.as_ref().unwrap();
    let region = &**region;
    let hot = GuestRange::new(HOT, 16 * MIB).unwrap();

    std::thread::scope(|s| {
        // The guest's IOMMU driver: map a page in a block, unmap it.
        s.spawn(|| {
            let mut tmp = Machine::driver_pair(iommu, iommu_q);
            for i in 0..ROUNDS {
                let block = i % BLOCKS;
                let phys = HOT + block * BLOCK + (i % 7) * 4096;
                match tmp.map(0x100_0000, phys, 4096, RW) {
                    Status::Ok => {
                        maps_ok.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(tmp.unmap(0x100_0000, 4096), Status::Ok);
                    }
                    Status::Inval => {
                        maps_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("map answered {other:?}"),
                }
            }
        });
        // The guest's virtio-mem driver: unplug a block and plug it again.
        s.spawn(|| {
            let mut tmp = Machine::mem_driver(vmem, vmem_q);
            let mut i = 0;
            while !done.load(Ordering::Relaxed) && i < 4 * ROUNDS {
                let block = i % BLOCKS;
                match tmp.unplug(block) {
                    ACK => {
                        unplugs_ok.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(tmp.plug(block), ACK);
                    }
                    BUSY => {
                        unplugs_busy.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unplug answered {other}"),
                }
                i += 1;
            }
        });
        // The observer: under the manager's read guard, every pinned range
        // in the virtio-mem region must be populated.
        s.spawn(|| {
            while maps_ok.load(Ordering::Relaxed) + maps_refused.load(Ordering::Relaxed) < ROUNDS {
                let view = region.populated();
                for r in bridge.pinned_ranges() {
                    if r.overlaps(&hot) {
                        assert!(view.is_populated(r), "pinned {r} while it is discarded");
                    }
                }
                drop(view);
                observations.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
            done.store(true, Ordering::Relaxed);
        });
    });

    let (ok, refused) = (maps_ok.into_inner(), maps_refused.into_inner());
    let (unplugged, busy) = (unplugs_ok.into_inner(), unplugs_busy.into_inner());
    eprintln!(
        "maps ok {ok}, refused {refused}; unplugs ok {unplugged}, busy {busy}; observations {}",
        observations.into_inner()
    );
    assert_eq!(ok + refused, ROUNDS);
    // The race was really run: both outcomes happened on both sides.
    assert!(ok > 0 && refused > 0, "maps: {ok} ok, {refused} refused");
    assert!(unplugged > 0, "no unplug succeeded");
    assert_eq!(pinner.pinned_bytes(), 0);
    drop(m);
}
