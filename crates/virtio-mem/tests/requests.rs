//! Every request type and every answer class, through a real split
//! virtqueue in guest memory.

mod common;

use common::*;
use memvisor_machine::VirtioMemSpec;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_test_support::range;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio_mem::SizeEvent;
use memvisor_virtio_mem::wire::{DEVICE_ID, F_ACPI_PXM, F_UNPLUGGED_INACCESSIBLE, config_offset};

const BS: u64 = 2 * MIB;

/// Address of block `i` of the region.
fn blk(i: u64) -> u64 {
    BASE + i * BS
}

#[test]
fn plug_unplug_and_state_answer_ack() {
    let mut g = Vm::with_requested(16 * MIB);
    assert_eq!(g.state(blk(0), 8), (ACK, UNPLUGGED));
    assert_eq!(g.plug(blk(0), 4), ACK);
    assert_eq!(g.config().plugged_size, 8 * MIB);
    assert!(g.region().is_populated(range(blk(0), 8 * MIB)));
    assert_eq!(g.state(blk(0), 4), (ACK, PLUGGED));
    assert_eq!(g.state(blk(2), 4), (ACK, MIXED));
    assert_eq!(g.state(blk(4), 4), (ACK, UNPLUGGED));
    assert_eq!(g.unplug(blk(1), 2), ACK);
    assert_eq!(g.config().plugged_size, 4 * MIB);
    assert_eq!(g.state(blk(0), 4), (ACK, MIXED));
    assert!(!g.region().is_populated(range(blk(1), BS)));
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(g.config().plugged_size, 0);
    assert_eq!(g.state(blk(0), 8), (ACK, UNPLUGGED));
    // UNPLUG_ALL with nothing plugged is acknowledged too.
    assert_eq!(g.unplug_all(), ACK);
}

#[test]
fn plug_errors_nacks_in_the_recorded_order() {
    // 16 MiB requested: the usable region is 64 MiB (the whole region).
    let mut g = Vm::with_requested(16 * MIB);
    assert_eq!(g.config().usable_region_size, 64 * MIB);
    assert_eq!(g.plug(blk(0) + MIB, 1), ERROR, "unaligned address");
    assert_eq!(g.plug(blk(0), 0), ERROR, "zero blocks");
    assert_eq!(g.plug(BASE - BS, 1), ERROR, "below the region");
    assert_eq!(g.plug(blk(32), 1), ERROR, "past the region");
    assert_eq!(g.plug(blk(31), 2), ERROR, "crosses the region's end");
    assert_eq!(g.plug(!(BS - 1), 2), ERROR, "overflows");
    assert_eq!(g.plug(!(BS - 1), u16::MAX), ERROR, "overflows a lot");
    // A bad range wins over a size violation.
    assert_eq!(g.plug(blk(31), 100), ERROR, "range before size");
    assert_eq!(g.plug(blk(0), 9), NACK, "above requested_size");
    assert_eq!(g.plug(blk(0), 8), ACK, "exactly requested_size");
    assert_eq!(g.plug(blk(8), 1), NACK, "anything more");
    // Size before state: already plugged AND above requested → NACK.
    assert_eq!(g.plug(blk(0), 1), NACK, "size before state");
    g.region().set_requested_size(32 * MIB).unwrap();
    assert_eq!(g.plug(blk(7), 2), ERROR, "one block already plugged");
    assert_eq!(g.plug(blk(0), 1), ERROR, "already plugged");
    assert_eq!(g.plug(blk(8), 2), ACK);
    assert_eq!(g.config().plugged_size, 20 * MIB);
}

#[test]
fn unplug_errors() {
    let mut g = Vm::with_requested(16 * MIB);
    assert_eq!(g.plug(blk(0), 4), ACK);
    assert_eq!(g.unplug(blk(0) + MIB, 1), ERROR, "unaligned address");
    assert_eq!(g.unplug(blk(0), 0), ERROR, "zero blocks");
    assert_eq!(g.unplug(BASE - BS, 1), ERROR, "below the region");
    assert_eq!(g.unplug(blk(32), 1), ERROR, "past the region");
    assert_eq!(g.unplug(!(BS - 1), 2), ERROR, "overflows");
    assert_eq!(g.unplug(blk(3), 2), ERROR, "one block not plugged");
    assert_eq!(g.unplug(blk(10), 1), ERROR, "not plugged");
    assert_eq!(g.config().plugged_size, 8 * MIB, "nothing changed");
    assert_eq!(g.unplug(blk(0), 4), ACK);
}

#[test]
fn requests_outside_the_usable_region_are_errors() {
    // A 512 MiB region with 2 MiB requested: usable = 258 MiB.
    let mut g = Vm::new(VirtioMemSpec {
        requested_size: BS,
        ..vmem(512 * MIB)
    });
    let usable_blocks = 129;
    assert_eq!(g.config().usable_region_size, usable_blocks * BS);
    // Inside the region but past the usable part.
    assert_eq!(g.state(blk(usable_blocks), 1), (ERROR, 0));
    assert_eq!(g.state(blk(usable_blocks - 1), 2), (ERROR, 0));
    assert_eq!(g.state(blk(usable_blocks - 1), 1), (ACK, UNPLUGGED));
    assert_eq!(g.plug(blk(usable_blocks), 1), ERROR);
    assert_eq!(g.unplug(blk(usable_blocks), 1), ERROR);
    assert_eq!(g.plug(blk(usable_blocks - 1), 1), ACK);
    // STATE checks the range like the others.
    assert_eq!(g.state(blk(0) + MIB, 1), (ERROR, 0));
    assert_eq!(g.state(blk(0), 0), (ERROR, 0));
    assert_eq!(g.state(!(BS - 1), 2), (ERROR, 0));
    // With nothing requested, nothing is usable.
    g.region().set_requested_size(0).unwrap();
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(g.config().usable_region_size, 0);
    assert_eq!(g.state(blk(0), 1), (ERROR, 0));
}

#[test]
fn migration_running_answers_busy() {
    let mut g = Vm::with_requested(16 * MIB);
    assert_eq!(g.plug(blk(0), 2), ACK);
    g.region().set_migration_running(true);
    assert_eq!(g.plug(blk(4), 1), BUSY);
    assert_eq!(g.unplug(blk(0), 1), BUSY);
    assert_eq!(g.unplug_all(), BUSY);
    // Invalid requests are still invalid; STATE is still answered.
    assert_eq!(g.plug(blk(0), 1), ERROR);
    assert_eq!(g.plug(blk(4), 20), NACK);
    assert_eq!(g.state(blk(0), 2), (ACK, PLUGGED));
    assert_eq!(g.config().plugged_size, 4 * MIB);
    assert!(g.region().system_reset().is_err(), "a reset leaves the blocks alone");
    assert_eq!(g.config().plugged_size, 4 * MIB);
    g.region().set_migration_running(false);
    assert_eq!(g.plug(blk(4), 1), ACK);
    assert_eq!(g.unplug_all(), ACK);
}

#[test]
fn config_space_reads_at_any_offset_and_width() {
    let g = Vm::new(VirtioMemSpec {
        requested_size: 8 * MIB,
        node_id: Some(0x0102),
        ..vmem(64 * MIB)
    });
    let read = |offset: u64, len: usize| {
        let mut data = vec![0xffu8; len];
        g.dev().read_config(offset, &mut data);
        data
    };
    let u64_at = |offset| u64::from_le_bytes(read(offset, 8).try_into().unwrap());
    assert_eq!(u64_at(config_offset::BLOCK_SIZE), BS);
    assert_eq!(read(config_offset::NODE_ID, 2), [0x02, 0x01]);
    assert_eq!(read(10, 6), [0; 6], "padding reads as zero");
    assert_eq!(u64_at(config_offset::ADDR), BASE);
    assert_eq!(u64_at(config_offset::REGION_SIZE), 64 * MIB);
    assert_eq!(u64_at(config_offset::USABLE_REGION_SIZE), 64 * MIB);
    assert_eq!(u64_at(config_offset::PLUGGED_SIZE), 0);
    assert_eq!(u64_at(config_offset::REQUESTED_SIZE), 8 * MIB);
    // Odd offsets and widths, and past the end.
    assert_eq!(read(config_offset::ADDR + 4, 1), [1], "byte 4 of 0x1_0000_0000");
    assert_eq!(read(config_offset::ADDR + 3, 3), [0, 1, 0]);
    assert_eq!(read(config_offset::REQUESTED_SIZE + 4, 8), [0; 8]);
    assert_eq!(read(1000, 4), [0; 4]);
    assert_eq!(read(u64::MAX, 2), [0; 2]);
    assert_eq!(g.config(), g.region().config());
}

#[test]
fn features_and_activation() {
    let mut g = Vm::new(vmem(64 * MIB));
    assert_eq!(g.dev().device_type(), DEVICE_ID);
    assert_eq!(g.dev().queue_max_sizes(), &[128]);
    let avail = g.dev().avail_features();
    assert_eq!(avail & F_ACPI_PXM, 0, "no node: no ACPI_PXM");
    assert_ne!(avail & F_UNPLUGGED_INACCESSIBLE, 0, "offered by default");
    assert_ne!(avail & VIRTIO_F_VERSION_1, 0);
    assert_eq!(g.config().node_id, 0);
    // A driver that does not accept UNPLUGGED_INACCESSIBLE cannot start it.
    let err = g.activate_with(Vm::legacy_features()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "virtio-mem: the driver did not accept required feature VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (bit 1)"
    );
    assert!(!g.dev().is_active());
    g.dev_mut().reset();
    g.activate_with(Vm::modern_features()).unwrap();
    assert!(g.dev().is_active());

    let g = Vm::new(VirtioMemSpec {
        node_id: Some(3),
        ..vmem(64 * MIB)
    });
    assert_ne!(g.dev().avail_features() & F_ACPI_PXM, 0, "node: ACPI_PXM");
    assert_eq!(g.config().node_id, 3);

    // Without UNPLUGGED_INACCESSIBLE offered, a legacy driver is fine.
    let mut g = Vm::new(VirtioMemSpec {
        unplugged_inaccessible: false,
        requested_size: BS,
        ..vmem(64 * MIB)
    });
    assert_eq!(g.dev().avail_features(), VIRTIO_F_VERSION_1);
    g.activate_with(Vm::legacy_features()).unwrap();
    assert_eq!(g.plug(blk(0), 1), ACK);
}

#[test]
fn config_interrupts_for_requested_and_usable_changes_only() {
    let mut g = Vm::new(VirtioMemSpec {
        requested_size: 64 * MIB,
        ..vmem(1024 * MIB)
    });
    // Activated by the test itself, which counts the interrupts.
    g.activate().unwrap();
    assert_eq!(g.config().usable_region_size, 320 * MIB);
    // Plugging and unplugging change plugged_size only: no interrupt.
    assert_eq!(g.plug(blk(0), 4), ACK);
    assert_eq!(g.unplug(blk(0), 2), ACK);
    assert_eq!(g.config_irqs(), 0);
    // Requested size grows (and the usable region with it): one interrupt.
    g.region().set_requested_size(128 * MIB).unwrap();
    assert_eq!(g.config_irqs(), 1);
    assert_eq!(g.config().usable_region_size, 384 * MIB);
    // Shrinks: the usable region stays, the requested size changes.
    g.region().set_requested_size(32 * MIB).unwrap();
    assert_eq!(g.config_irqs(), 1);
    assert_eq!(g.config().usable_region_size, 384 * MIB);
    // No change, no interrupt.
    g.region().set_requested_size(32 * MIB).unwrap();
    assert_eq!(g.config_irqs(), 0);
    // UNPLUG_ALL shrinks the usable region: announced.
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(g.config().usable_region_size, 288 * MIB);
    assert_eq!(g.config_irqs(), 1);
    assert_eq!(g.unplug_all(), ACK);
    assert_eq!(g.config_irqs(), 0, "nothing changed");
}

#[test]
fn size_events_reach_subscribers() {
    let mut g = Vm::with_requested(16 * MIB);
    let events = g.region().subscribe();
    assert_eq!(g.plug(blk(0), 2), ACK);
    g.region().set_requested_size(8 * MIB).unwrap();
    assert_eq!(g.plug(blk(2), 1), ACK);
    assert_eq!(g.plug(blk(2), 1), ERROR);
    assert_eq!(g.unplug_all(), ACK);
    let got: Vec<SizeEvent> = events.try_iter().collect();
    let ev = |plugged_size, requested_size| SizeEvent {
        plugged_size,
        requested_size,
        usable_region_size: 64 * MIB,
    };
    assert_eq!(
        got,
        vec![
            ev(4 * MIB, 16 * MIB),
            ev(4 * MIB, 8 * MIB),
            ev(6 * MIB, 8 * MIB),
            ev(0, 8 * MIB),
        ]
    );
    drop(events);
    // A dropped receiver is forgotten, not an error.
    assert_eq!(g.plug(blk(0), 1), ACK);
}

#[test]
fn manager_queries_see_plugged_blocks() {
    let mut g = Vm::with_requested(16 * MIB);
    assert_eq!(g.region().granularity(), BS);
    assert_eq!(g.region().region(), range(BASE, 64 * MIB));
    assert_eq!(g.plug(blk(2), 2), ACK);
    assert_eq!(g.plug(blk(6), 1), ACK);
    assert!(g.memory().is_populated_ram(range(blk(2), 4 * MIB)));
    assert!(!g.memory().is_populated_ram(range(blk(2), 5 * MIB)));
    let mut runs = vec![];
    g.region()
        .replay_populated(range(BASE, 64 * MIB), &mut |x| {
            runs.push(x);
            Ok(())
        })
        .unwrap();
    assert_eq!(runs, vec![range(blk(2), 4 * MIB), range(blk(6), BS)]);
    // A reader holding the view keeps its answer while it acts on it.
    let view = g.region().populated();
    assert!(view.is_populated(range(blk(6), BS)));
    drop(view);
}
