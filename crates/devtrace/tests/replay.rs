//! The replay engine against the recorded Linux traces and hand-made
//! hostile ones, with the real devices, the real DMA layer (io_uring
//! pinning) and real memory.
//!

use std::num::NonZeroUsize;

use memvisor_devtrace::{
    DmaBackend, ReplayMachine, ReplayMachineOptions, ReplayOptions, Report, Trace, UnplugGuard, builtin, replay,
};

fn options(dma: Option<DmaBackend>, guard: UnplugGuard, migrate_every: Option<usize>) -> ReplayOptions {
    ReplayOptions {
        machine: ReplayMachineOptions {
            dma,
            unplug_guard: guard,
            pin_budget: None,
        },
        migrate_every: migrate_every.and_then(NonZeroUsize::new),
    }
}

fn run(trace: &Trace, options: &ReplayOptions) -> Report {
    let report = replay(trace, options, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.is_ok(),
        "{}: {} mismatches, first: {}",
        trace.name,
        report.mismatches.len(),
        report.mismatches[0]
    );
    report
}

fn builtin_trace(name: &str) -> Trace {
    let (file, text) = builtin::get(name).unwrap();
    Trace::parse(file, text).unwrap()
}

/// The counts a replay must reproduce whatever the DMA backend or migration.
fn counts(r: &Report) -> (usize, usize, usize, usize, usize, usize, u64) {
    (
        r.events,
        r.requests,
        r.checked,
        r.refused_maps,
        r.busy_unplugs,
        r.resets,
        r.plugged_size,
    )
}

#[test]
fn vmem_resize_replays_without_mismatch() {
    let trace = builtin_trace("vmem-resize");
    for dma in [Some(DmaBackend::Uring), None] {
        let r = run(&trace, &options(dma, UnplugGuard::Reject, None));
        // 22 requests and 7 expects of 2 values.
        assert_eq!(counts(&r), (35, 22, 22 + 14, 0, 0, 2, 384 << 20), "{dma:?}");
        if dma == Some(DmaBackend::Uring) {
            // Without a vIOMMU the assigned device maps boot RAM (1 GiB),
            // every plugged block and the driver's 1 MiB.
            assert_eq!(r.pinned_bytes, (1 << 30) + (384 << 20) + (1 << 20));
        } else {
            assert_eq!(r.pinned_bytes, 0);
        }
    }
}

#[test]
fn vmem_kexec_replays_without_mismatch() {
    let trace = builtin_trace("vmem-kexec");
    for dma in [Some(DmaBackend::Uring), None] {
        let r = run(&trace, &options(dma, UnplugGuard::Reject, None));
        // 403 requests (384 STATE with a state), 6 expects of 2 values.
        assert_eq!(counts(&r), (411, 403, 403 + 384 + 12, 0, 0, 2, 700 << 20), "{dma:?}");
    }
}

#[test]
fn viommu_dma_strict_replays_without_mismatch() {
    let trace = builtin_trace("viommu-dma-strict");
    for dma in [Some(DmaBackend::Uring), None] {
        let r = run(&trace, &options(dma, UnplugGuard::Reject, None));
        // Only MAP has a recorded answer in the QEMU 7.2 recordings.
        assert_eq!(counts(&r), (7772, 7772, 3886, 0, 0, 0, 0), "{dma:?}");
        if dma == Some(DmaBackend::Uring) {
            // Two 4 KiB-page mappings are left at the end of the recording.
            assert!(r.pinned_bytes > 0 && r.pinned_bytes % 4096 == 0, "{}", r.pinned_bytes);
        }
    }
}

/// Replays `name` with and without migrating every `every` events, with
/// each backend given, and requires the same results.
fn migrating_changes_no_result(name: &str, runs: &[(Option<DmaBackend>, usize)]) {
    let trace = builtin_trace(name);
    for &(dma, every) in runs {
        let plain = run(&trace, &options(dma, UnplugGuard::Reject, None));
        let migrated = run(&trace, &options(dma, UnplugGuard::Reject, Some(every)));
        assert_eq!(counts(&migrated), counts(&plain), "{name} {dma:?}");
        assert_eq!(migrated.pinned_bytes, plain.pinned_bytes, "{name} {dma:?}");
        assert_eq!(migrated.migrations, (trace.events.len() - 1) / every, "{name}");
        assert!(migrated.migration_bytes > 0);
    }
}

fn migrating_every_7_events_changes_no_result(name: &str) {
    migrating_changes_no_result(name, &[(Some(DmaBackend::Uring), 7), (None, 7)]);
}

#[test]
fn vmem_resize_migrating_every_7_events() {
    migrating_every_7_events_changes_no_result("vmem-resize");
}

/// Every restore of a vmem trace re-pins its 1 GiB of boot RAM with
/// io_uring; kexec's 411 events would make 58 of them. Re-pinning after a
/// restore is what vmem-resize tests every 7 events; here every 7 events
/// without pinning, and every 103 (4 restores) with it.
#[test]
fn vmem_kexec_migrating_every_7_events() {
    migrating_changes_no_result("vmem-kexec", &[(None, 7), (Some(DmaBackend::Uring), 103)]);
}

#[test]
fn viommu_dma_strict_migrating_every_7_events() {
    migrating_every_7_events_changes_no_result("viommu-dma-strict");
}

const MIB: u64 = 1 << 20;
const HOT: u64 = 4 << 30;

/// A hostile guest: boot RAM (16 MiB at 0), a virtio-mem region (64 MiB at
/// 4 GiB, 2 MiB blocks) and a virtio-iommu with endpoint 8, whose driver
/// maps onto unplugged, half-plugged and non-RAM memory and unplugs memory
/// it still maps. `unplug_resp` is what the unplugs of mapped memory get.
fn hostile(unplug_resp: &str) -> Trace {
    let header = r#"{"format":"devtrace","version":1,"source":"hand-made: a hostile guest","ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":8388608,"unplugged_inaccessible":true},{"device":"virtio-iommu","id":"viommu0","page_size_mask":18446744073709547520,"input_start":0,"input_end":18446744073709551615,"domain_start":0,"domain_end":1023,"bypass":false,"endpoints":[8]}]}"#;
    let map = |iova: u64, len: u64, phys: u64, resp: &str| {
        format!(
            r#"{{"dev":"viommu0","op":"map","domain":1,"virt_start":{iova},"virt_end":{},"phys_start":{phys},"flags":3,"resp":"{resp}"}}"#,
            iova + len - 1
        )
    };
    let unmap = |iova: u64, len: u64| {
        format!(
            r#"{{"dev":"viommu0","op":"unmap","domain":1,"virt_start":{iova},"virt_end":{},"resp":"ok"}}"#,
            iova + len - 1
        )
    };
    let lines = [
        header.to_string(),
        // Blocks 0 and 1 plugged.
        format!(r#"{{"dev":"vmem0","op":"plug","addr":{HOT},"nb_blocks":2,"resp":"ack"}}"#),
        r#"{"dev":"viommu0","op":"probe","endpoint":8,"resp":"ok"}"#.to_string(),
        r#"{"dev":"viommu0","op":"attach","domain":1,"endpoint":8,"resp":"ok"}"#.to_string(),
        // Block 1: plugged, mapped.
        map(0x1000_0000, 2 * MIB, HOT + 2 * MIB, "ok"),
        // Boot RAM: mapped.
        map(0x2000_0000, 64 << 10, MIB, "ok"),
        // Block 2: unplugged.
        map(0x3000_0000, 2 * MIB, HOT + 4 * MIB, "inval"),
        // Blocks 1 and 2: half plugged.
        map(0x4000_0000, 4 * MIB, HOT + 2 * MIB, "inval"),
        // A hole between boot RAM and the region: not RAM.
        map(0x5000_0000, 64 << 10, 0x8000_0000, "inval"),
        // Unplug the block still mapped, then everything.
        format!(
            r#"{{"dev":"vmem0","op":"unplug","addr":{},"nb_blocks":1,"resp":"{unplug_resp}"}}"#,
            HOT + 2 * MIB
        ),
        format!(r#"{{"dev":"vmem0","op":"unplug_all","resp":"{unplug_resp}"}}"#),
        // The guest unmaps; now everything may go.
        unmap(0x1000_0000, 2 * MIB),
        unmap(0x2000_0000, 64 << 10),
        r#"{"dev":"vmem0","op":"unplug_all","resp":"ack"}"#.to_string(),
        r#"{"dev":"vmem0","op":"expect","plugged_size":0,"usable_region_size":67108864}"#.to_string(),
    ];
    Trace::parse("hostile.jsonl", &lines.join("\n")).unwrap()
}

#[test]
fn hostile_guest_gets_inval_and_busy_under_reject() {
    let trace = hostile("busy");
    let r = run(&trace, &options(Some(DmaBackend::Uring), UnplugGuard::Reject, None));
    assert_eq!(r.refused_maps, 3);
    assert_eq!(r.busy_unplugs, 2);
    assert_eq!(r.plugged_size, 0);
    assert_eq!(r.pinned_bytes, 0, "everything was unmapped");
}

#[test]
fn hostile_guest_unplugs_are_acked_under_warn() {
    let trace = hostile("ack");
    let r = run(&trace, &options(Some(DmaBackend::Uring), UnplugGuard::Warn, None));
    assert_eq!(r.refused_maps, 3);
    assert_eq!(r.busy_unplugs, 0);
    assert_eq!(r.pinned_bytes, 0, "the pins held past the unplug went with the unmap");
    // The same guest under `reject` disagrees with this recording.
    let r = replay(
        &trace,
        &options(Some(DmaBackend::Uring), UnplugGuard::Reject, None),
        &mut |_| {},
    )
    .unwrap();
    let lines: Vec<usize> = r.mismatches.iter().map(|m| m.line).collect();
    assert_eq!(lines, vec![10, 11]);
    assert_eq!(
        r.mismatches[0].to_string(),
        "line 10: UNPLUG 0x100200000 x1: expected resp ack, got busy"
    );
}

/// Under `warn` the source keeps the pin of a block the guest unplugged
/// while mapping it; a destination must not re-populate that memory to pin
/// it again. Restoring after every event, the replay gives every recorded
/// answer, the mapping is restored unpinned (and counted), and nothing
/// stays pinned at the end.
#[test]
fn a_restore_over_an_unplugged_mapping_restores_it_unpinned() {
    let trace = hostile("ack");
    let plain = run(&trace, &options(Some(DmaBackend::Uring), UnplugGuard::Warn, None));
    let migrated = run(&trace, &options(Some(DmaBackend::Uring), UnplugGuard::Warn, Some(1)));
    assert_eq!(counts(&migrated), counts(&plain));
    assert_eq!(plain.restored_unpinned_maps, 0);
    // Block 1 stays mapped (0x1000_0000) from its unplug (line 10) to its
    // unmap (line 12): restored unpinned after lines 10 and 11.
    assert_eq!(migrated.restored_unpinned_maps, 2);
    assert_eq!(migrated.pinned_bytes, 0);
}

/// A trace that resets its devices in either order, with a save between
/// the two lines: the machine resets in its declared order (the IOMMU's
/// endpoints detach before memory is unplugged) at the first line, so no
/// mapping is ever restored over reclaimed memory, and both orders end
/// alike.
#[test]
fn both_reset_orders_end_alike_with_a_save_between_them() {
    let header = r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":8388608},{"device":"virtio-iommu","id":"viommu0","page_size_mask":18446744073709547520,"input_start":0,"input_end":18446744073709551615,"domain_start":0,"domain_end":1023,"bypass":false,"endpoints":[8]}]}"#;
    let before = [
        format!(r#"{{"dev":"vmem0","op":"plug","addr":{HOT},"nb_blocks":2,"resp":"ack"}}"#),
        r#"{"dev":"viommu0","op":"attach","domain":1,"endpoint":8,"resp":"ok"}"#.to_string(),
        format!(
            r#"{{"dev":"viommu0","op":"map","domain":1,"virt_start":268435456,"virt_end":270532607,"phys_start":{},"flags":3,"resp":"ok"}}"#,
            HOT + 2 * MIB
        ),
    ];
    let after = [
        r#"{"dev":"vmem0","op":"expect","plugged_size":0}"#.to_string(),
        // After the reset the old domain is gone and the memory unplugged.
        format!(
            r#"{{"dev":"viommu0","op":"map","domain":1,"virt_start":268435456,"virt_end":270532607,"phys_start":{},"flags":3,"resp":"noent"}}"#,
            HOT + 2 * MIB
        ),
        r#"{"dev":"viommu0","op":"attach","domain":1,"endpoint":8,"resp":"ok"}"#.to_string(),
        format!(
            r#"{{"dev":"viommu0","op":"map","domain":1,"virt_start":268435456,"virt_end":270532607,"phys_start":{},"flags":3,"resp":"inval"}}"#,
            HOT + 2 * MIB
        ),
    ];
    let reset = |dev: &str| format!(r#"{{"dev":"{dev}","op":"system_reset"}}"#);
    let mut reports = Vec::new();
    for order in [["vmem0", "viommu0"], ["viommu0", "vmem0"]] {
        let lines: Vec<String> = std::iter::once(header.to_string())
            .chain(before.iter().cloned())
            .chain(order.iter().map(|d| reset(d)))
            .chain(after.iter().cloned())
            .collect();
        let trace = Trace::parse("resets.jsonl", &lines.join("\n")).unwrap();
        for guard in [UnplugGuard::Reject, UnplugGuard::Warn] {
            // A save after every event puts one between the two reset lines.
            let r = run(&trace, &options(Some(DmaBackend::Uring), guard, Some(1)));
            assert_eq!(r.restored_unpinned_maps, 0, "{order:?} {guard:?}");
            assert_eq!(
                (r.resets, r.pinned_bytes, r.plugged_size),
                (2, 0, 0),
                "{order:?} {guard:?}"
            );
            reports.push(counts(&r));
        }
    }
    assert!(reports.windows(2).all(|w| w[0] == w[1]), "{reports:?}");
}

#[test]
fn hostile_guest_pins_exactly_its_accepted_mappings() {
    let trace = hostile("busy");
    let mut machine = ReplayMachine::new(
        &trace.header,
        &options(Some(DmaBackend::Uring), UnplugGuard::Reject, None).machine,
    )
    .unwrap();
    let mut report_events = trace.events.iter();
    // Replay up to and including the refused maps, through the public driver API.
    for event in report_events.by_ref().take(7) {
        match event.op {
            op if matches!(op, memvisor_devtrace::Op::Plug { .. }) => {
                machine
                    .vmem_request(memvisor_devtrace::machine::mem_request(&op).unwrap())
                    .unwrap();
            }
            op => {
                machine
                    .iommu_request(memvisor_devtrace::machine::iommu_request(&op).unwrap())
                    .unwrap();
            }
        }
    }
    assert_eq!(machine.machine().pinned_bytes(), 2 * MIB + (64 << 10));
    assert_eq!(machine.machine().budget().used(), 2 * MIB + (64 << 10));
    let ranges: Vec<(u64, u64)> = machine
        .machine()
        .pinned_ranges()
        .iter()
        .map(|r| (r.start(), r.len()))
        .collect();
    assert_eq!(ranges, vec![(MIB, 64 << 10), (HOT + 2 * MIB, 2 * MIB)]);
    // Save, drop, restore: the pins go with the machine and come back.
    let mut stream = Vec::new();
    machine.save(&mut stream).unwrap();
    drop(machine);
    let machine = ReplayMachine::restore(
        &trace.header,
        &options(Some(DmaBackend::Uring), UnplugGuard::Reject, None).machine,
        &mut stream.as_slice(),
    )
    .unwrap();
    assert_eq!(machine.machine().pinned_bytes(), 2 * MIB + (64 << 10));
    assert_eq!(machine.machine().plugged_size(), 4 * MIB);
}

#[test]
fn the_pin_budget_refuses_maps_with_nomem() {
    let trace = hostile("busy");
    let mut o = options(Some(DmaBackend::Uring), UnplugGuard::Reject, None);
    o.machine.pin_budget = Some(MIB);
    let r = replay(&trace, &o, &mut |_| {}).unwrap();
    // The 2 MiB mapping does not fit: NOMEM; the unplugs then go through
    // (and the UNMAP of nothing is OK, as in QEMU).
    let got: Vec<String> = r.mismatches.iter().map(|m| m.to_string()).collect();
    assert_eq!(
        got,
        vec![
            "line 5: MAP domain 1 [0x10000000, 0x101fffff] -> 0x100200000 (flags 0x3): expected resp ok, got nomem",
            "line 10: UNPLUG 0x100200000 x1: expected resp busy, got ack",
            "line 11: UNPLUG_ALL: expected resp busy, got ack",
        ]
    );
    assert_eq!(r.refused_maps, 4);
    assert_eq!(r.pinned_bytes, 0);
}

#[test]
fn header_errors_name_line_1() {
    let trace = Trace::parse(
        "two.jsonl",
        r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216},{"addr":8388608,"size":16777216}],"devices":[]}"#,
    )
    .unwrap();
    let err = replay(&trace, &ReplayOptions::default(), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("two.jsonl: trace header (line 1): guest memory map"),
        "{err}"
    );
    // Errors the device finds in the header's values name the line too.
    let odd_block = Trace::parse(
        "odd.jsonl",
        r#"{"format":"devtrace","version":1,"ram":[{"addr":0,"size":16777216}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":3145728,"requested_size":0}]}"#,
    )
    .unwrap();
    let err = replay(&odd_block, &ReplayOptions::default(), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("odd.jsonl: trace header (line 1): virtio-mem `vmem0`: "),
        "{err}"
    );
    assert!(err.to_string().contains("0x300000"), "{err}");
}
