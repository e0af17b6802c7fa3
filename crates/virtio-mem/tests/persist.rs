//! Migration: save on a source, load into a fresh destination.

mod common;

use common::*;
use memvisor_machine::VirtioMemSpec;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_test_support::{RecordingListener, range};
use memvisor_virtio_mem::{PersistError, VirtioMemState};

const BS: u64 = 2 * MIB;

fn blk(i: u64) -> u64 {
    BASE + i * BS
}

/// A 512 MiB region on node 1 with `requested` bytes requested.
fn spec(requested: u64) -> VirtioMemSpec {
    VirtioMemSpec {
        requested_size: requested,
        node_id: Some(1),
        ..vmem(512 * MIB)
    }
}

/// A source with a few runs plugged, requested size lowered after growth.
fn source() -> Vm {
    let mut g = Vm::new(spec(64 * MIB));
    assert_eq!(g.plug(blk(0), 4), ACK);
    assert_eq!(g.plug(blk(10), 1), ACK);
    assert_eq!(g.plug(blk(63), 2), ACK);
    g.region().set_requested_size(256 * MIB).unwrap();
    g.region().set_requested_size(32 * MIB).unwrap();
    g
}

#[test]
fn save_then_load_gives_an_identical_device() {
    let mut src = source();
    src.region().set_migration_running(true);
    let state = src.region().save_state();
    assert_eq!(VirtioMemState::VERSION, 1);
    assert_eq!(state.plugged_size(), 14 * MIB);
    assert_eq!(state.usable_region_size, 512 * MIB);
    assert_eq!(state.requested_size, 32 * MIB);
    // Through the serialised form, as the stream carries it.
    let json = serde_json::to_string(&state).unwrap();
    let state: VirtioMemState = serde_json::from_str(&json).unwrap();

    // A fresh destination, built with another requested size, with memory
    // touched that the source does not have plugged.
    let mut dst = Vm::new(spec(2 * MIB));
    let listener = RecordingListener::new("vfio");
    dst.region()
        .register_listener(listener.clone(), range(BASE, 512 * MIB))
        .unwrap();
    dst.touch(blk(100), 4 * MIB);
    assert!(dst.resident() >= 4 * MIB);

    dst.region().load_state(&state).unwrap();
    assert_eq!(dst.config(), src.config(), "identical configuration space");
    assert_eq!(dst.region().save_state(), state, "identical state");
    assert_eq!(dst.region().populated().bitmap(), src.region().populated().bitmap());
    assert_eq!(
        listener.take(),
        vec![
            ('p', range(blk(0), 8 * MIB)),
            ('p', range(blk(10), BS)),
            ('p', range(blk(63), 4 * MIB))
        ],
        "plugged blocks are replayed to listeners"
    );
    assert_eq!(dst.resident(), 0, "unplugged blocks were discarded");

    // The destination answers like the source (its guest's driver sets
    // the device up before the first request).
    src.region().set_migration_running(false);
    for (addr, n) in [(blk(0), 4), (blk(0), 6), (blk(10), 1), (blk(63), 2), (blk(200), 4)] {
        assert_eq!(dst.state(addr, n), src.state(addr, n), "STATE {addr:#x} {n}");
    }
    assert_eq!(
        dst.plug(blk(20), 10),
        NACK,
        "14 MiB plugged, 32 MiB requested: 18 more fit"
    );
    assert_eq!(dst.plug(blk(20), 9), ACK);
}

#[test]
fn mismatching_configuration_is_refused() {
    let src = source();
    let state = src.region().save_state();

    let other_block = Vm::new(VirtioMemSpec {
        block_size: 4 * MIB,
        ..spec(0)
    });
    let err = other_block.region().load_state(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "virtio-mem state: block size is 0x200000 in the stream but 0x400000 here"
    );

    let other_addr = Vm::new(VirtioMemSpec {
        addr: 8 * GIB,
        ..spec(0)
    });
    let err = other_addr.region().load_state(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "virtio-mem state: address is 0x100000000 in the stream but 0x200000000 here"
    );

    let other_size = Vm::new(VirtioMemSpec {
        region_size: 256 * MIB,
        ..spec(0)
    });
    assert_eq!(
        other_size.region().load_state(&state).unwrap_err(),
        PersistError::Mismatch {
            field: "region size",
            saved: 512 * MIB,
            local: 256 * MIB
        }
    );

    let other_node = Vm::new(VirtioMemSpec {
        node_id: None,
        ..spec(0)
    });
    assert_eq!(
        other_node.region().load_state(&state).unwrap_err(),
        PersistError::NodeMismatch {
            saved: Some(1),
            local: None
        }
    );
}

#[test]
fn corrupt_state_is_refused_and_changes_nothing() {
    let src = source();
    let good = src.region().save_state();
    let dst = Vm::new(spec(8 * MIB));
    let listener = RecordingListener::new("vfio");
    dst.region()
        .register_listener(listener.clone(), range(BASE, 512 * MIB))
        .unwrap();

    let mut s = good.clone();
    s.bitmap.push(0);
    assert_eq!(
        dst.region().load_state(&s).unwrap_err(),
        PersistError::BitmapLength {
            words: 5,
            expected: 4,
            blocks: 256
        }
    );
    // 500 MiB with 2 MiB blocks: 250 blocks, bits 250..256 must be clear.
    let dst250 = Vm::new(VirtioMemSpec {
        region_size: 500 * MIB,
        ..spec(8 * MIB)
    });
    let mut s = dst250.region().save_state();
    s.bitmap[3] |= 1 << 60;
    assert_eq!(
        dst250.region().load_state(&s).unwrap_err(),
        PersistError::PhantomBits { blocks: 250 }
    );

    let mut s = good.clone();
    s.requested_size = 3 * MIB;
    assert!(matches!(dst.region().load_state(&s), Err(PersistError::BadSize { .. })));
    let mut s = good.clone();
    s.usable_region_size = 16 * MIB;
    assert!(matches!(
        dst.region().load_state(&s),
        Err(PersistError::UsableBelowRequested { .. })
    ));
    let mut s = good.clone();
    s.usable_region_size = 64 * MIB;
    s.requested_size = 64 * MIB;
    assert_eq!(
        dst.region().load_state(&s).unwrap_err().to_string(),
        "virtio-mem state: plugged blocks [0x107e00000, 0x108200000) lie outside the usable region of 0x4000000 bytes"
    );
    assert!(listener.take().is_empty());
    assert_eq!(dst.region().plugged_size(), 0);
    assert_eq!(dst.region().requested_size(), 8 * MIB);
}
