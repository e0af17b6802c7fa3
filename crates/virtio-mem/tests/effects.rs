//! The effects of requests: listeners (refusal, rollback, veto), real
//! discards and preallocation, system reset versus device reset.

mod common;

use common::*;
use memvisor_machine::VirtioMemSpec;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_test_support::{RecordingListener, range};
use memvisor_virtio::VirtioDevice;

const BS: u64 = 2 * MIB;

fn blk(i: u64) -> u64 {
    BASE + i * BS
}

fn whole() -> memvisor_memory::GuestRange {
    range(BASE, 64 * MIB)
}

#[test]
fn listeners_are_told_in_order() {
    let mut g = Vm::with_requested(32 * MIB);
    let a = RecordingListener::new("a");
    let b = RecordingListener::new("b");
    g.region().register_listener(a.clone(), whole()).unwrap();
    // b only cares about the first 8 MiB.
    g.region().register_listener(b.clone(), range(BASE, 8 * MIB)).unwrap();
    assert_eq!(g.plug(blk(2), 4), ACK);
    assert_eq!(a.take(), vec![('p', range(blk(2), 8 * MIB))]);
    assert_eq!(b.take(), vec![('p', range(blk(2), 4 * MIB))]);
    assert_eq!(g.unplug(blk(2), 4), ACK);
    // Each listener is told about its own part only.
    assert_eq!(b.take(), vec![('d', range(blk(2), 4 * MIB))]);
    assert_eq!(a.take(), vec![('d', range(blk(2), 8 * MIB))]);
    // Outside b's range: only a hears of it.
    assert_eq!(g.plug(blk(20), 1), ACK);
    assert_eq!(a.take(), vec![('p', range(blk(20), BS))]);
    assert!(b.take().is_empty());
}

#[test]
fn listener_refusal_rolls_back_and_answers_busy() {
    let mut g = Vm::with_requested(32 * MIB);
    let a = RecordingListener::new("a");
    let b = RecordingListener::new("picky");
    g.region().register_listener(a.clone(), whole()).unwrap();
    g.region().register_listener(b.clone(), whole()).unwrap();
    b.refuse(Some(whole()));
    // `a` faults the memory in as a DMA mapper pinning it would.
    g.touch(blk(4), 4 * MIB);
    let before = g.resident();
    assert!(before >= 4 * MIB, "touched memory is resident: {before:#x}");
    assert_eq!(g.plug(blk(4), 2), BUSY);
    assert_eq!(
        a.take(),
        vec![('p', range(blk(4), 4 * MIB)), ('d', range(blk(4), 4 * MIB))]
    );
    assert_eq!(b.take(), vec![], "the refusing listener gets no discard");
    assert_eq!(g.config().plugged_size, 0);
    assert_eq!(g.state(blk(4), 2), (ACK, UNPLUGGED));
    assert_eq!(g.resident(), 0, "the memory was discarded again");
    // Once the listener accepts, the same plug works.
    b.refuse(None);
    assert_eq!(g.plug(blk(4), 2), ACK);
    assert_eq!(b.take(), vec![('p', range(blk(4), 4 * MIB))]);
}

#[test]
fn veto_answers_busy_and_changes_nothing() {
    let mut g = Vm::with_requested(32 * MIB);
    let a = RecordingListener::new("a");
    let v = RecordingListener::new("iommu");
    g.region().register_listener(a.clone(), whole()).unwrap();
    g.region().register_listener(v.clone(), whole()).unwrap();
    assert_eq!(g.plug(blk(0), 4), ACK);
    g.touch(blk(0), 8 * MIB);
    let resident = g.resident();
    a.take();
    v.take();
    v.veto(Some(whole()));
    assert_eq!(g.unplug(blk(0), 2), BUSY);
    assert_eq!(g.unplug_all(), BUSY, "UNPLUG_ALL is all or nothing");
    assert!(a.take().is_empty() && v.take().is_empty(), "nobody was told anything");
    assert_eq!(g.config().plugged_size, 8 * MIB);
    assert_eq!(g.state(blk(0), 4), (ACK, PLUGGED));
    assert_eq!(g.resident(), resident, "nothing was discarded");
    v.veto(None);
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(v.take(), vec![('d', range(blk(0), 8 * MIB))]);
    assert_eq!(g.resident(), 0);
}

#[test]
fn unplug_returns_memory_to_the_host() {
    let mut g = Vm::with_requested(32 * MIB);
    assert_eq!(g.resident(), 0, "nothing plugged, nothing resident");
    assert_eq!(g.plug(blk(0), 8), ACK);
    // Without prealloc, plugged memory becomes resident when touched.
    g.touch(blk(0), 16 * MIB);
    assert_eq!(g.resident(), 16 * MIB);
    assert_eq!(g.unplug(blk(2), 4), ACK);
    assert_eq!(g.resident(), 8 * MIB, "the unplugged 8 MiB went back to the host");
    assert_eq!(g.block().resident_bytes(4 * MIB, 8 * MIB).unwrap(), 0);
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(g.resident(), 0);
}

#[test]
fn prealloc_populates_on_plug() {
    let mut g = Vm::new(VirtioMemSpec {
        requested_size: 32 * MIB,
        prealloc: true,
        ..vmem(64 * MIB)
    });
    assert_eq!(g.plug(blk(1), 3), ACK);
    assert_eq!(g.resident(), 6 * MIB, "preallocated without being touched");
    assert_eq!(g.block().resident_bytes(2 * MIB, 6 * MIB).unwrap(), 6 * MIB);
    assert_eq!(g.unplug(blk(1), 3), ACK);
    assert_eq!(g.resident(), 0);
}

#[test]
fn device_reset_keeps_blocks_system_reset_unplugs() {
    let mut g = Vm::new(VirtioMemSpec {
        requested_size: 64 * MIB,
        ..vmem(1024 * MIB)
    });
    let a = RecordingListener::new("a");
    g.region()
        .register_listener(a.clone(), range(BASE, 1024 * MIB))
        .unwrap();
    assert_eq!(g.plug(blk(0), 8), ACK);
    g.region().set_requested_size(512 * MIB).unwrap();
    assert_eq!(g.config().usable_region_size, 768 * MIB);
    g.region().set_requested_size(16 * MIB).unwrap();
    g.touch(blk(0), 16 * MIB);
    a.take();

    // Device reset (driver writes status 0): block state untouched.
    g.dev_mut().reset();
    assert!(!g.dev().is_active());
    assert_eq!(g.region().plugged_size(), 16 * MIB);
    assert!(g.region().is_populated(range(blk(0), 16 * MIB)));
    assert_eq!(g.resident(), 16 * MIB, "memory untouched");
    assert!(a.take().is_empty());
    // The guest's driver sets the device up again before its next request.
    assert_eq!(g.state(blk(0), 8), (ACK, PLUGGED), "the new driver finds it plugged");
    assert!(g.dev().is_active());
    assert_eq!(g.config().usable_region_size, 768 * MIB);

    // System reset: everything unplugged, even against a veto, and the
    // usable region recomputed from the requested size.
    a.veto(Some(range(BASE, 1024 * MIB)));
    g.dev_mut().system_reset().unwrap();
    assert!(!g.dev().is_active());
    assert_eq!(g.region().plugged_size(), 0);
    assert_eq!(a.take(), vec![('d', range(blk(0), 16 * MIB))]);
    assert_eq!(g.resident(), 0);
    assert_eq!(g.region().usable_region_size(), 272 * MIB);
    assert_eq!(g.region().requested_size(), 16 * MIB);
    assert_eq!(g.config().plugged_size, 0);
    assert_eq!(g.state(blk(0), 8), (ACK, UNPLUGGED));
    assert!(g.dev().is_active());
}

#[test]
fn other_threads_query_while_the_device_works() {
    let mut g = Vm::with_requested(64 * MIB);
    let region = g.region().clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // A DMA-path thread: whatever it sees populated under its view stays
    // populated until it drops the view.
    let started = std::sync::Arc::new(std::sync::Barrier::new(2));
    let started2 = started.clone();
    let reader = std::thread::spawn(move || {
        let mut checks = 0u64;
        started2.wait();
        // At least one check, however the threads are scheduled.
        loop {
            let view = region.populated();
            if view.is_populated(range(blk(0), BS)) {
                std::thread::yield_now();
                assert!(view.is_populated(range(blk(0), BS)));
            }
            checks += 1;
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                break checks;
            }
        }
    });
    started.wait();
    for _ in 0..200 {
        assert_eq!(g.plug(blk(0), 1), ACK);
        assert_eq!(g.unplug(blk(0), 1), ACK);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}
