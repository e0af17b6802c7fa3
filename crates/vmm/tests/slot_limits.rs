//! The bound of one slot per block, measured on this host's KVM: a 4 GiB
//! region of 2 MiB blocks fits with every block plugged, a region with
//! more blocks than `KVM_CAP_NR_MEMSLOTS` is refused before anything is
//! added. Needs `/dev/kvm`; fails without it.
#![cfg(target_arch = "x86_64")]

use memvisor_machine::{Machine, MachineConfig, RamSpec, VirtioMemSpec};
use memvisor_test_support::{GIB, MIB};
use memvisor_virtio_mem::{BlockRange, Request, Response};
use memvisor_vmm::memslots::MemslotError;
use memvisor_vmm::probe::ProbeGuest;
use memvisor_vmm::vm::{Vm, VmError};

const HOT: u64 = 4 * GIB;

fn machine(region_size: u64, block: u64) -> Machine {
    Machine::new(&MachineConfig {
        ram: vec![RamSpec { addr: 0, size: 2 * MIB }],
        virtio_mem: vec![VirtioMemSpec {
            requested_size: region_size,
            ..VirtioMemSpec::new("vmem0", HOT, region_size, block)
        }],
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn a_4_gib_region_of_2_mib_blocks_fits_fully_plugged() {
    let machine = machine(4 * GIB, 2 * MIB);
    let vm = Vm::new(&machine).unwrap_or_else(|e| panic!("this test needs a usable /dev/kvm: {e}"));
    eprintln!(
        "KVM_CAP_NR_MEMSLOTS = {}; worst case for 4 GiB of 2 MiB blocks plus boot RAM = {}",
        vm.nr_memslots(),
        vm.memslots().worst_case()
    );
    assert_eq!(vm.memslots().worst_case(), 2048 + 1);
    assert!(vm.nr_memslots() >= 2049, "KVM_CAP_NR_MEMSLOTS is {}", vm.nr_memslots());

    let region = &machine.vmems()[0].region;
    let all = BlockRange {
        addr: HOT,
        nb_blocks: 2048,
    };
    assert_eq!(region.apply(Request::Plug(all)), Response::Ack(None));
    assert_eq!(vm.memslots().in_use(), 2049);
    let last = HOT + 4 * GIB - 8;
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let probe = ProbeGuest::new().write(HOT, 1).write(last, 2).read(HOT).read(last);
    assert_eq!(probe.run(&mut vcpu, vm.memory(), 0x1000).unwrap().reads, [1, 2]);

    // Unplug every other block: the worst case for runs, and still one
    // slot per plugged block.
    for i in (0..2048).step_by(2) {
        let block = BlockRange {
            addr: HOT + i * 2 * MIB,
            nb_blocks: 1,
        };
        assert_eq!(region.apply(Request::Unplug(block)), Response::Ack(None));
    }
    assert_eq!(vm.memslots().in_use(), 1024 + 1);
    let odd = HOT + 2 * MIB;
    let probe = ProbeGuest::new().read(HOT).read(odd).read(last);
    assert_eq!(
        probe.run(&mut vcpu, vm.memory(), 0x1000).unwrap().reads,
        [u64::MAX, 0, 2]
    );
    assert_eq!(region.apply(Request::UnplugAll), Response::Ack(None));
    assert_eq!(vm.memslots().in_use(), 1);
}

#[test]
fn a_region_with_more_blocks_than_kvm_has_slots_is_refused() {
    // 64 GiB of 1 MiB blocks: 65536 blocks.
    let machine = machine(64 * GIB, MIB);
    let err = Vm::new(&machine).unwrap_err();
    let VmError::Memslots(MemslotError::TooManySlots { needed, limit, .. }) = &err else {
        panic!("expected TooManySlots, got {err}");
    };
    assert_eq!(*needed, 65536 + 1);
    assert!(*limit < *needed);
    let message = err.to_string();
    assert!(
        message.contains("'vmem0' [0x100000000, 0x1100000000) has 65536 blocks of 0x100000 bytes"),
        "{message}"
    );
    // The region is untouched and works on.
    let block = BlockRange {
        addr: HOT,
        nb_blocks: 1,
    };
    assert_eq!(
        machine.vmems()[0].region.apply(Request::Plug(block)),
        Response::Ack(None)
    );
}
