//! Both DMA paths end to end, through the devices' real virtqueues.

mod common;

use common::*;
use memvisor_dma::events::DmaEvent;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_machine::{AssignedPath, UnplugGuard};
use memvisor_test_support::machines::dma::{BOOT, DOMAIN, HOT, behind_viommu, rig};
use memvisor_test_support::machines::dma::{DEVICE, ENDPOINT};
use memvisor_test_support::{MIB, serial};
use memvisor_virtio_iommu::Status;
use memvisor_virtio_iommu::request::{Attach, Request as IommuRequest};
use memvisor_virtio_iommu::wire::ATTACH_F_BYPASS;

#[test]
fn path1_plug_and_unplug_move_vmpin_by_exactly_the_plugged_bytes() {
    let _s = serial();
    let mut m = rig(AssignedPath::Ram, 64 * MIB, None);
    let base = vm_pin_kib();
    assert_eq!(base * 1024, BOOT, "boot RAM is pinned whole at attach");
    assert_eq!(m.plug(0, 4), ACK);
    assert_eq!(vm_pin_kib() - base, 8 * 1024);
    assert_eq!(m.plug(10, 3), ACK);
    assert_eq!(vm_pin_kib() - base, 14 * 1024);
    assert_eq!(m.unplug(1, 2), ACK);
    assert_eq!(vm_pin_kib() - base, 10 * 1024);
    // One mapping per granule, so a single block can be unmapped alone.
    let device = m.machine.dma_devices().next().unwrap().clone();
    assert_eq!(device.mapper().mapping_count(), 1 + 5);
    assert_eq!(m.machine.distinct_pinned_bytes(), BOOT + 10 * MIB);
    assert_eq!(m.unplug_all(), ACK);
    assert_eq!(vm_pin_kib(), base);
    // The unplugged memory really left the host.
    let hot = m.machine.vmems()[0].region.block().clone();
    assert_eq!(hot.resident_bytes(0, 64 * MIB).unwrap(), 0);
    check_invariants(&m.machine);
}

#[test]
fn path2_maps_only_populated_ram() {
    let _s = serial();
    let mut m = rig(behind_viommu(UnplugGuard::Reject), 64 * MIB, None);
    assert_eq!(m.plug(0, 2), ACK);
    // Plugged memory and boot RAM: mapped and pinned.
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT, 4 * MIB, RW), Status::Ok);
    assert_eq!(m.map(DOMAIN, 0x80_0000, 0x30_0000, 64 * 1024, RW), Status::Ok);
    assert_eq!(m.machine.pinned_bytes(), 4 * MIB + 64 * 1024);
    // Unplugged, half-plugged, a hole: refused, nothing pinned.
    assert_eq!(m.map(DOMAIN, 0x100_0000, HOT + 8 * MIB, 4096, RW), Status::Inval);
    assert_eq!(m.map(DOMAIN, 0x100_0000, HOT + 2 * MIB, 4 * MIB, RW), Status::Inval);
    assert_eq!(m.map(DOMAIN, 0x100_0000, 1 << 40, 4096, RW), Status::Inval);
    // MMIO onto a hole: accepted, never pinned.
    assert_eq!(m.map(DOMAIN, 0x200_0000, 0xfe00_0000, 4096, RW | MMIO), Status::Ok);
    assert_eq!(m.machine.pinned_bytes(), 4 * MIB + 64 * 1024);
    check_invariants(&m.machine);
    assert_eq!(m.unmap(DOMAIN, 0, 1 << 40), Status::Ok);
    assert_eq!(m.machine.pinned_bytes(), 0);
    check_invariants(&m.machine);
}

/// An endpoint in a bypass domain (Linux with `iommu.passthrough=1`)
/// reaches all guest memory without mapping any: the bridge then pins like
/// path 1 (boot RAM and plugged blocks, following plug and unplug, no veto)
/// and unpins it all when the endpoint is translated again.
#[test]
fn path2_in_bypass_pins_like_path1_both_ways() {
    let _s = serial();
    let mut m = rig(behind_viommu(UnplugGuard::Reject), 64 * MIB, None);
    let events = m.machine.dma_events().subscribe();
    assert_eq!(m.plug(0, 2), ACK);
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT, 4096, RW), Status::Ok);
    let device = m.machine.dma_devices().next().unwrap().clone();
    assert_eq!((device.pinned_bytes(), device.in_bypass()), (4096, false));
    let identity = Attach {
        domain: DOMAIN + 1,
        endpoint: ENDPOINT,
        flags: ATTACH_F_BYPASS,
        reserved: [0; 4],
    };
    assert_eq!(m.iommu(IommuRequest::Attach(identity)), Status::Ok);
    assert!(device.in_bypass());
    assert_eq!(
        device.pinned_bytes(),
        BOOT + 4 * MIB,
        "boot RAM and the two plugged blocks"
    );
    check_invariants(&m.machine);
    // Plug and unplug are followed; the block the old mapping pinned
    // unplugs (that mapping left with its domain).
    assert_eq!(m.plug(2, 3), ACK);
    assert_eq!(device.pinned_bytes(), BOOT + 10 * MIB);
    assert_eq!(m.unplug(0, 2), ACK);
    assert_eq!(device.pinned_bytes(), BOOT + 6 * MIB);
    check_invariants(&m.machine);
    // Translated again: nothing pinned but what the guest maps.
    assert_eq!(m.attach(DOMAIN, ENDPOINT), Status::Ok);
    assert_eq!((device.pinned_bytes(), device.in_bypass()), (0, false));
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT + 4 * MIB, 4096, RW), Status::Ok);
    assert_eq!(device.pinned_bytes(), 4096);
    check_invariants(&m.machine);
    // Unattached with the `bypass` config field off: nothing reachable.
    assert_eq!(m.detach(DOMAIN, ENDPOINT), Status::Ok);
    assert_eq!(device.pinned_bytes(), 0);
    let bypass = |on| DmaEvent::Bypass {
        device: DEVICE.into(),
        endpoint: ENDPOINT,
        bypass: on,
    };
    assert_eq!(events.try_iter().collect::<Vec<_>>(), [bypass(true), bypass(false)]);
}

/// The same guest page mapped at two IOVAs is pinned twice (the kernel's
/// count), but is one page of guest memory (the distinct count), with an
/// unlimited budget too (computed from the bridge's ranges).
#[test]
fn a_page_mapped_twice_is_pinned_twice_and_counted_once() {
    let _s = serial();
    let mut m = rig(behind_viommu(UnplugGuard::Reject), 64 * MIB, None);
    assert_eq!(m.plug(0, 1), ACK);
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT, 8192, RW), Status::Ok);
    assert_eq!(m.map(DOMAIN, 0x20_0000, HOT + 4096, 8192, RW), Status::Ok);
    assert_eq!(m.machine.pinned_bytes(), 16384);
    assert_eq!(vm_pin_kib(), 16, "the kernel pins each mapping");
    assert_eq!(m.machine.distinct_pinned_bytes(), 12288);
    assert_eq!(
        m.machine.budget().distinct(),
        None,
        "an unlimited budget does not track it"
    );
    check_invariants(&m.machine);
}

#[test]
fn path2_reject_vetoes_unplug_of_mapped_blocks() {
    let _s = serial();
    let mut m = rig(behind_viommu(UnplugGuard::Reject), 64 * MIB, None);
    let events = m.machine.dma_events().subscribe();
    assert_eq!(m.plug(0, 4), ACK);
    assert_eq!(m.map(DOMAIN, 0x10_0000, HOT + 2 * MIB + 4096, 4096, RW), Status::Ok);
    assert_eq!(m.unplug(1, 1), BUSY);
    assert_eq!(
        events.try_recv(),
        Ok(DmaEvent::UnplugVetoed {
            device: DEVICE.into(),
            gpa: HOT + 2 * MIB,
            size: 2 * MIB
        })
    );
    assert_eq!(m.unplug(0, 4), BUSY);
    assert_eq!(m.unplug_all(), BUSY);
    assert_eq!(m.machine.plugged_size(), 8 * MIB, "a veto changes nothing");
    let device = m.machine.dma_devices().next().unwrap().clone();
    let vetoed = device.counts().vetoed_unplugs;
    assert_eq!(vetoed, 1 + events.try_iter().count() as u64, "each veto is one event");
    assert!(vetoed >= 3, "{vetoed}");
    // Blocks the mapping does not touch unplug fine.
    assert_eq!(m.unplug(2, 2), ACK);
    check_invariants(&m.machine);
    assert_eq!(m.unmap(DOMAIN, 0x10_0000, 4096), Status::Ok);
    assert_eq!(m.unplug_all(), ACK);
    assert_eq!(m.machine.pinned_bytes(), 0);
    check_invariants(&m.machine);
}

#[test]
fn hostile_map_flood_stops_at_the_pin_budget() {
    let _s = serial();
    let budget = 8 * MIB;
    let chunk = 64 * 1024;
    let mut m = rig(behind_viommu(UnplugGuard::Reject), 64 * MIB, Some(budget));
    assert_eq!(m.plug(0, 32), ACK);
    let pin_budget = m.machine.budget().clone();
    let (mut ok, mut nomem) = (0u64, 0u64);
    // Map 64 MiB of guest memory, 64 KiB at a time at fresh IOVAs, four
    // times over: the budget counts distinct guest bytes, so the first 8
    // MiB fit (again and again), the rest never does.
    for i in 0..4096u64 {
        let status = m.map(DOMAIN, i * chunk, HOT + (i % 1024) * chunk, chunk, RW);
        match status {
            Status::Ok => ok += 1,
            Status::NoMem => nomem += 1,
            other => panic!("unexpected {other:?}"),
        }
        assert!(pin_budget.distinct().unwrap() <= budget);
    }
    assert_eq!(ok, 4 * budget / chunk, "the same 8 MiB, four times");
    assert_eq!(pin_budget.distinct(), Some(budget), "counted once");
    // The kernel pins each mapping: it accounts the 8 MiB four times.
    assert_eq!(m.machine.pinned_bytes(), 4 * budget);
    assert_eq!(vm_pin_kib() * 1024, 4 * budget);
    assert_eq!(nomem, 4096 - ok);
    let device = m.machine.dma_devices().next().unwrap().clone();
    assert_eq!(device.counts().refused_maps, nomem, "every refusal is counted");
    check_invariants(&m.machine);
    // Memory leaves the budget with its last mapping: new memory then fits.
    for round in 0..4u64 {
        assert_eq!(m.map(DOMAIN, 0x4000_0000, HOT + 200 * chunk, chunk, RW), Status::NoMem);
        assert_eq!(m.unmap(DOMAIN, round * 1024 * chunk, chunk), Status::Ok);
    }
    assert_eq!(pin_budget.distinct(), Some(budget - chunk));
    assert_eq!(m.map(DOMAIN, 0x4000_0000, HOT + 200 * chunk, chunk, RW), Status::Ok);
    check_invariants(&m.machine);
}
