//! A property-based state machine over random sequences of plug, unplug,
//! unplug-all, set-requested-size, attach, detach, map, unmap and system
//! reset, on both DMA paths, all through the devices' real virtqueues.
//! After every step: no pinned byte lies in a discarded block, the
//! backend's pinned bytes equal the live mappings (path 2) or boot RAM and
//! the plugged blocks (path 1), and `VmPin` agrees with the backend.
//!
//! Runs 10,000 cases by default; set `MEMVISOR_PROPTEST_CASES` for more.

mod common;

use common::*;
use memvisor_machine::{AssignedPath, UnplugGuard};
use memvisor_test_support::machines::dma::{BLOCK, BOOT, DOMAIN, ENDPOINT, HOT, behind_viommu, rig};
use memvisor_test_support::{MIB, Rig, serial};
use proptest::prelude::*;

/// 16 blocks of 2 MiB.
const HOT_SIZE: u64 = 32 * MIB;
const BLOCKS: u64 = HOT_SIZE / BLOCK;
const PAGE: u64 = 4096;

#[derive(Debug, Clone)]
enum Target {
    /// A page of boot RAM.
    Boot(u64),
    /// A page of the virtio-mem region (plugged or not).
    Hot(u64),
    /// Past the end of the virtio-mem region: a hole.
    Hole,
}

#[derive(Debug, Clone)]
enum Op {
    Plug(u64, u16),
    Unplug(u64, u16),
    UnplugAll,
    SetRequested(u64),
    Attach,
    Detach,
    Map {
        iova_page: u64,
        target: Target,
        pages: u64,
        mmio: bool,
    },
    Unmap {
        iova_page: u64,
        pages: u64,
    },
    Reset,
}

/// The page at the top of the IOVA space: its end, 2^64, does not fit a
/// u64, so every IOVA range computation must use inclusive ends.
const TOP_PAGE: u64 = u64::MAX / PAGE;

fn op() -> impl Strategy<Value = Op> {
    let target = prop_oneof![
        (0..BOOT / PAGE).prop_map(Target::Boot),
        (0..HOT_SIZE / PAGE).prop_map(Target::Hot),
        Just(Target::Hole),
    ];
    let top = target.clone();
    prop_oneof![
        4 => (0..BLOCKS, 1..4u16).prop_map(|(b, n)| Op::Plug(b, n)),
        3 => (0..BLOCKS, 1..4u16).prop_map(|(b, n)| Op::Unplug(b, n)),
        1 => Just(Op::UnplugAll),
        1 => (0..=BLOCKS).prop_map(Op::SetRequested),
        1 => Just(Op::Attach),
        1 => Just(Op::Detach),
        6 => (0..64u64, target, 1..1024u64, proptest::bool::weighted(0.1))
            .prop_map(|(iova_page, target, pages, mmio)| Op::Map { iova_page: iova_page * 256, target, pages, mmio }),
        3 => (0..64u64, 1..2048u64).prop_map(|(i, pages)| Op::Unmap { iova_page: i * 256, pages }),
        1 => top.prop_map(|target| Op::Map { iova_page: TOP_PAGE, target, pages: 1, mmio: false }),
        1 => Just(Op::Unmap { iova_page: TOP_PAGE, pages: 1 }),
        1 => Just(Op::Reset),
    ]
}

fn apply(m: &mut Rig, op: &Op) {
    match *op {
        Op::Plug(b, n) => {
            m.plug(b, n);
        }
        Op::Unplug(b, n) => {
            m.unplug(b, n);
        }
        Op::UnplugAll => {
            m.unplug_all();
        }
        Op::SetRequested(blocks) => m.machine.vmems()[0].region.set_requested_size(blocks * BLOCK).unwrap(),
        Op::Attach => {
            m.attach(DOMAIN, ENDPOINT);
        }
        Op::Detach => {
            m.detach(DOMAIN, ENDPOINT);
        }
        Op::Map {
            iova_page,
            ref target,
            pages,
            mmio,
        } => {
            let phys = match *target {
                Target::Boot(p) => p * PAGE,
                Target::Hot(p) => HOT + p * PAGE,
                Target::Hole => HOT + HOT_SIZE,
            };
            let handle = m.machine.iommu().unwrap().handle.clone();
            let free = handle.endpoint_domain(ENDPOINT) == Some(DOMAIN)
                && handle
                    .mappings(DOMAIN)
                    .is_some_and(|ms| ms.iter().all(|x| x.virt_end < iova_page * PAGE));
            let status = m.map(
                DOMAIN,
                iova_page * PAGE,
                phys,
                pages * PAGE,
                if mmio { RW | MMIO } else { RW },
            );
            // The top page onto boot RAM (always populated) in a domain
            // with room for it maps, whatever pins it.
            if iova_page == TOP_PAGE && matches!(*target, Target::Boot(_)) && free {
                assert_eq!(status, memvisor_virtio_iommu::Status::Ok, "MAP of the top IOVA page");
            }
        }
        Op::Unmap { iova_page, pages } => {
            m.unmap(DOMAIN, iova_page * PAGE, pages * PAGE);
        }
        Op::Reset => {
            // In the machine's declared order: the IOMMU forgets its
            // mappings (unpinning them), then virtio-mem unplugs everything.
            m.machine.system_reset().unwrap();
            m.guest.forget();
        }
    }
}

/// 2,000 cases by default, so that the test command stays quick;
/// `.ci/run` sets `MEMVISOR_PROPTEST_CASES=10000`, the full depth.
fn cases() -> u32 {
    std::env::var("MEMVISOR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn run(path: AssignedPath, ops: &[Op]) {
    let mut m = rig(path, HOT_SIZE, Some(24 * MIB));
    check_invariants(&m.machine);
    for op in ops {
        apply(&mut m, op);
        check_invariants(&m.machine);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn viommu_path_keeps_rules_1_and_2(ops in prop::collection::vec(op(), 1..40)) {
        let _s = serial();
        run(behind_viommu(UnplugGuard::Reject), &ops);
    }

    #[test]
    fn plain_path_keeps_rules_1_and_2(ops in prop::collection::vec(op(), 1..40)) {
        let _s = serial();
        run(AssignedPath::Ram, &ops);
    }
}
