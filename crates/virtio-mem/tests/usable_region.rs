//! The usable region: min(region_size, requested_size + 256 MiB) rounded
//! up to the block size, 0 when nothing is requested; it grows with
//! requested_size, and shrinks only on UNPLUG_ALL and system reset.

mod common;

use common::*;
use memvisor_machine::VirtioMemSpec;
use memvisor_virtio_mem::usable_region_size_for;

/// (region size, block size, requested size, usable region size)
const CASES: &[(u64, u64, u64, u64)] = &[
    (2 * GIB, 2 * MIB, 0, 0),
    (2 * GIB, 2 * MIB, 2 * MIB, 258 * MIB),
    (2 * GIB, 2 * MIB, 512 * MIB, 768 * MIB),
    (2 * GIB, 2 * MIB, 700 * MIB, 956 * MIB),
    (2 * GIB, 2 * MIB, GIB, 1280 * MIB),
    (2 * GIB, 2 * MIB, 1792 * MIB, 2 * GIB),
    (2 * GIB, 2 * MIB, 1900 * MIB, 2 * GIB),
    (2 * GIB, 2 * MIB, 2 * GIB, 2 * GIB),
    (64 * MIB, 2 * MIB, 2 * MIB, 64 * MIB),
    (64 * MIB, MIB, 0, 0),
    (512 * MIB, MIB, MIB, 257 * MIB),
    // 8 + 256 = 264 MiB is already a multiple of 8 MiB blocks.
    (512 * MIB, 8 * MIB, 8 * MIB, 264 * MIB),
    // 512 + 256 = 768 MiB rounds up to 1 GiB with 512 MiB blocks.
    (2 * GIB, 512 * MIB, 512 * MIB, GIB),
    // 1 GiB blocks: 1.25 GiB rounds up to 2 GiB.
    (4 * GIB, GIB, GIB, 2 * GIB),
];

#[test]
fn sizing_table() {
    for &(region, block, requested, usable) in CASES {
        assert_eq!(
            usable_region_size_for(region, block, requested),
            usable,
            "region {region:#x} block {block:#x} requested {requested:#x}"
        );
    }
}

#[test]
fn sizing_table_through_the_config_space() {
    for &(region, block, requested, usable) in CASES.iter().filter(|c| c.0 <= 2 * GIB) {
        let g = Vm::new(VirtioMemSpec {
            block_size: block,
            requested_size: requested,
            ..vmem(region)
        });
        let config = g.config();
        assert_eq!(
            (config.usable_region_size, config.requested_size, config.block_size),
            (usable, requested, block),
            "region {region:#x} block {block:#x} requested {requested:#x}"
        );
    }
}

#[test]
fn grows_with_requests_shrinks_only_on_unplug_all_and_system_reset() {
    let mut g = Vm::new(VirtioMemSpec {
        requested_size: 512 * MIB,
        ..vmem(2 * GIB)
    });
    // (action, expected usable region size)
    let steps: &[(&str, u64, u64)] = &[
        ("set", GIB, 1280 * MIB),
        ("set", 256 * MIB, 1280 * MIB),
        ("set", 0, 1280 * MIB),
        ("set", 384 * MIB, 1280 * MIB),
        ("unplug_all", 0, 640 * MIB),
        ("set", 1920 * MIB, 2 * GIB),
        ("set", 64 * MIB, 2 * GIB),
        ("system_reset", 0, 320 * MIB),
        ("set", 0, 320 * MIB),
        ("unplug_all", 0, 0),
    ];
    for &(action, value, usable) in steps {
        match action {
            "set" => g.region().set_requested_size(value).unwrap(),
            "unplug_all" => assert_eq!(g.unplug_all(), ACK),
            "system_reset" => {
                g.region().system_reset().unwrap();
            }
            _ => unreachable!(),
        }
        assert_eq!(g.config().usable_region_size, usable, "after {action} {value:#x}");
    }
}
