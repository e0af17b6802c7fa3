//! Rule 7 on real KVM: a guest vCPU reaches a virtio-mem block exactly
//! while it is plugged. Plugs and unplugs go through the virtio-mem device
//! (its request queue, driven by the test guest's driver), so the memory
//! slot listener is told by the region's discard manager, as in a VM.
//!
//! These tests need `/dev/kvm` and fail without it: they never pass
//! without having run a guest.
#![cfg(target_arch = "x86_64")]

use memvisor_machine::{MachineConfig, RamSpec, VirtioMemSpec};
use memvisor_test_support::{MIB, Rig};
use memvisor_virtio_mem::wire::VIRTIO_MEM_RESP_ACK;
use memvisor_vmm::memslots::SlotInfo;
use memvisor_vmm::probe::ProbeGuest;
use memvisor_vmm::unassigned::AccessCounts;
use memvisor_vmm::vm::{Vcpu, Vm};

/// Boot RAM at 0: the probe's code and page tables at [`PROBE_AT`], the
/// test guest's virtio driver area at [`DRIVER_AREA`].
const BOOT: u64 = 4 * MIB;
const PROBE_AT: u64 = 0x1_0000;
const DRIVER_AREA: u64 = 2 * MIB;
/// The virtio-mem region: 32 MiB of 2 MiB blocks at 4 GiB, all requested.
const HOT: u64 = 4 << 30;
const HOT_SIZE: u64 = 32 * MIB;
const BLOCK: u64 = 2 * MIB;

fn config() -> MachineConfig {
    MachineConfig {
        ram: vec![RamSpec { addr: 0, size: BOOT }],
        virtio_mem: vec![VirtioMemSpec {
            requested_size: HOT_SIZE,
            ..VirtioMemSpec::new("vmem0", HOT, HOT_SIZE, BLOCK)
        }],
        ..Default::default()
    }
}

/// The machine, its VM (built before anything is plugged) and vCPU 0.
fn setup() -> (Rig, Vm, Vcpu) {
    let rig = Rig::new(&config(), DRIVER_AREA);
    let vm = Vm::new(&rig.machine).unwrap_or_else(|e| panic!("this test needs a usable /dev/kvm: {e}"));
    let vcpu = vm.create_vcpu(0).unwrap_or_else(|e| panic!("creating vCPU 0: {e}"));
    (rig, vm, vcpu)
}

fn run(vm: &Vm, vcpu: &mut Vcpu, probe: &ProbeGuest) -> Vec<u64> {
    probe
        .run(vcpu, vm.memory(), PROBE_AT)
        .unwrap_or_else(|e| panic!("running the probe guest: {e}"))
        .reads
}

/// Block 3 of the region, and three addresses in it: first, middle and
/// last quadword.
const B: u64 = 3;
fn block_start() -> u64 {
    HOT + B * BLOCK
}
fn spots() -> [u64; 3] {
    [
        block_start(),
        block_start() + BLOCK / 2 + 0x28,
        block_start() + BLOCK - 8,
    ]
}
fn pattern(addr: u64) -> u64 {
    0xa5a5_0000_0000_0000 | addr
}

/// The block's bytes in its RAM block, seen by the host.
fn host_u64(rig: &Rig, addr: u64) -> u64 {
    let mut bytes = [0u8; 8];
    rig.machine.vmems()[0]
        .region
        .block()
        .read(addr - HOT, &mut bytes)
        .unwrap();
    u64::from_le_bytes(bytes)
}

fn resident(rig: &Rig) -> u64 {
    rig.machine.vmems()[0]
        .region
        .block()
        .resident_bytes(block_start() - HOT, BLOCK)
        .unwrap()
}

/// Plugs the block and has the guest write the pattern and read it back.
fn plug_and_write(rig: &mut Rig, vm: &Vm, vcpu: &mut Vcpu) {
    assert_eq!(rig.plug(B, 1), VIRTIO_MEM_RESP_ACK);
    let mut probe = ProbeGuest::new();
    for addr in spots() {
        probe = probe.write(addr, pattern(addr));
    }
    for addr in spots() {
        probe = probe.read(addr);
    }
    assert_eq!(run(vm, vcpu, &probe), spots().map(pattern));
}

#[test]
fn a_plugged_block_is_reachable_and_the_host_sees_the_guests_writes() {
    let (mut rig, vm, mut vcpu) = setup();
    // Before the plug the block has no slot.
    assert_eq!(vm.memslots().slot_at(block_start()), None);
    plug_and_write(&mut rig, &vm, &mut vcpu);
    let slot = vm
        .memslots()
        .slot_at(block_start())
        .expect("the plugged block has a slot");
    assert_eq!(
        (slot.range.start(), slot.range.len(), slot.managed),
        (block_start(), BLOCK, true)
    );
    // The guest's writes went to the region's RAM block, not to MMIO.
    for addr in spots() {
        assert_eq!(host_u64(&rig, addr), pattern(addr), "{addr:#x}");
    }
    assert_eq!(vm.unassigned().total(), AccessCounts::default());
    assert!(resident(&rig) > 0);
    // And what the host writes, the guest reads.
    let addr = block_start() + 0x1000;
    rig.machine.vmems()[0]
        .region
        .block()
        .write(addr - HOT, &0x0123_4567_89ab_cdef_u64.to_le_bytes())
        .unwrap();
    assert_eq!(
        run(&vm, &mut vcpu, &ProbeGuest::new().read(addr)),
        [0x0123_4567_89ab_cdef]
    );
}

#[test]
fn an_unplugged_block_is_unassigned_memory_and_stays_discarded() {
    let (mut rig, vm, mut vcpu) = setup();
    plug_and_write(&mut rig, &vm, &mut vcpu);
    assert_eq!(rig.unplug(B, 1), VIRTIO_MEM_RESP_ACK);
    assert_eq!(vm.memslots().slot_at(block_start()), None);
    assert_eq!(resident(&rig), 0, "the unplug discarded the block");

    // Two reads, one write in between, one more read: three reads, one write.
    let [first, middle, last] = spots();
    let probe = ProbeGuest::new()
        .read(first)
        .read(middle)
        .write(first, 0x1111_2222_3333_4444)
        .read(first);
    let outcome = probe.run(&mut vcpu, vm.memory(), PROBE_AT).unwrap();
    assert_eq!(outcome.reads, [u64::MAX; 3], "unassigned memory reads all ones");
    assert_eq!((outcome.report.mmio_reads, outcome.report.mmio_writes), (3, 1));
    assert_eq!(
        vm.unassigned().counts_of("vmem0"),
        Some(AccessCounts { reads: 3, writes: 1 })
    );
    assert_eq!(vm.unassigned().outside_counts(), AccessCounts::default());
    // The write went nowhere: nothing re-populated the block.
    assert_eq!(resident(&rig), 0, "a guest access re-populated the unplugged block");
    let _ = last;
    // The rest of the region's blocks were never plugged: unassigned too.
    let other = HOT + 10 * BLOCK;
    assert_eq!(
        run(&vm, &mut vcpu, &ProbeGuest::new().write(other, 7).read(other)),
        [u64::MAX]
    );
    assert_eq!(
        vm.unassigned().counts_of("vmem0"),
        Some(AccessCounts { reads: 4, writes: 2 })
    );
}

#[test]
fn a_replugged_block_is_fresh_zeroed_memory() {
    let (mut rig, vm, mut vcpu) = setup();
    plug_and_write(&mut rig, &vm, &mut vcpu);
    assert_eq!(rig.unplug(B, 1), VIRTIO_MEM_RESP_ACK);
    assert_eq!(run(&vm, &mut vcpu, &ProbeGuest::new().read(spots()[0])), [u64::MAX]);
    assert_eq!(rig.plug(B, 1), VIRTIO_MEM_RESP_ACK);
    assert!(vm.memslots().slot_at(block_start()).is_some(), "the slot is back");
    let mut probe = ProbeGuest::new();
    for addr in spots() {
        probe = probe.read(addr);
    }
    assert_eq!(run(&vm, &mut vcpu, &probe), [0; 3], "the old data is gone");
    // Writable again, and no access of these went unassigned.
    let addr = spots()[1];
    assert_eq!(run(&vm, &mut vcpu, &ProbeGuest::new().write(addr, 9).read(addr)), [9]);
    assert_eq!(host_u64(&rig, addr), 9);
    assert_eq!(
        vm.unassigned().counts_of("vmem0"),
        Some(AccessCounts { reads: 1, writes: 0 })
    );
}

#[test]
fn blocks_plugged_before_the_vm_exists_get_their_slots_at_attach() {
    let mut rig = Rig::new(&config(), DRIVER_AREA);
    assert_eq!(rig.plug(0, 4), VIRTIO_MEM_RESP_ACK);
    let region = &rig.machine.vmems()[0].region;
    region.block().write(BLOCK + 16, &77u64.to_le_bytes()).unwrap();
    let vm = Vm::new(&rig.machine).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // Boot RAM, then one slot per plugged block.
    let slots = vm.memslots().slots();
    let ranges: Vec<(u64, u64, bool)> = slots
        .iter()
        .map(|s: &SlotInfo| (s.range.start(), s.range.len(), s.managed))
        .collect();
    assert_eq!(
        ranges,
        vec![
            (0, BOOT, false),
            (HOT, BLOCK, true),
            (HOT + BLOCK, BLOCK, true),
            (HOT + 2 * BLOCK, BLOCK, true),
            (HOT + 3 * BLOCK, BLOCK, true),
        ]
    );
    assert_eq!(run(&vm, &mut vcpu, &ProbeGuest::new().read(HOT + BLOCK + 16)), [77]);
    // UNPLUG_ALL removes every block's slot; boot RAM keeps its own.
    assert_eq!(rig.unplug_all(), VIRTIO_MEM_RESP_ACK);
    assert_eq!(vm.memslots().slots().len(), 1);
    assert_eq!(
        run(&vm, &mut vcpu, &ProbeGuest::new().read(HOT + BLOCK + 16)),
        [u64::MAX]
    );
}

#[test]
fn accesses_outside_all_ram_are_counted_apart() {
    let (_rig, vm, mut vcpu) = setup();
    let hole = 0xd000_0000;
    assert_eq!(
        run(&vm, &mut vcpu, &ProbeGuest::new().write(hole, 1).read(hole)),
        [u64::MAX]
    );
    assert_eq!(vm.unassigned().outside_counts(), AccessCounts { reads: 1, writes: 1 });
    assert_eq!(vm.unassigned().counts_of("vmem0"), Some(AccessCounts::default()));
    // Boot RAM is a plain slot: reading it exits nowhere.
    let outcome = ProbeGuest::new().write(0x8000, 5).read(0x8000);
    assert_eq!(outcome.run(&mut vcpu, vm.memory(), PROBE_AT).unwrap().reads, [5]);
}

#[test]
fn dropping_the_vm_unregisters_its_listener() {
    let (mut rig, vm, vcpu) = setup();
    assert_eq!(rig.plug(0, 2), VIRTIO_MEM_RESP_ACK);
    let listener = vm.memslots().listeners().next().unwrap().clone();
    assert_eq!(listener.slot_count(), 2);
    drop(vcpu);
    drop(vm);
    assert_eq!(listener.slot_count(), 0, "unregistering removed the slots");
    // Plugging and unplugging still works without a VM.
    assert_eq!(rig.plug(4, 1), VIRTIO_MEM_RESP_ACK);
    assert_eq!(listener.slot_count(), 0);
    assert_eq!(rig.unplug_all(), VIRTIO_MEM_RESP_ACK);
}

/// Dirty logging on real KVM: with `KVM_MEM_LOG_DIRTY_PAGES` on every
/// slot, the guest's writes — one to boot RAM, one to a block plugged
/// before logging went on, one to a block plugged after — are exactly the
/// pages `take_dirty` reports for their regions, and a second take is
/// empty.
#[test]
fn the_dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    use memvisor_memory::GuestRange;
    let (mut rig, vm, mut vcpu) = setup();
    assert_eq!(rig.plug(B, 1), VIRTIO_MEM_RESP_ACK);
    let boot = GuestRange::new(0, BOOT).unwrap();
    let hot = GuestRange::new(HOT, HOT_SIZE).unwrap();
    let pages = |range: GuestRange| -> Vec<u64> {
        let set = vm
            .memslots()
            .take_dirty(range)
            .unwrap_or_else(|e| panic!("taking the dirty log of {range}: {e}"));
        assert_eq!(set.pages(), range.len() / 4096);
        set.iter().map(|page| range.start() + page * 4096).collect()
    };
    vm.memslots()
        .set_dirty_logging(true)
        .unwrap_or_else(|e| panic!("switching dirty logging on: {e}"));
    // A block plugged while logging is on logs from the start.
    let later = HOT + 9 * BLOCK;
    assert_eq!(rig.plug(9, 1), VIRTIO_MEM_RESP_ACK);
    // Whatever the setup wrote is not the guest's doing: start afresh.
    pages(boot);
    pages(hot);

    let boot_spot = 3 * MIB + 0x5008;
    let block_spot = block_start() + 0x7_3010;
    let probe = ProbeGuest::new()
        .write(boot_spot, 1)
        .write(block_spot, 2)
        .write(later + BLOCK - 8, 3)
        .read(block_spot);
    assert_eq!(run(&vm, &mut vcpu, &probe), [2]);
    let page = |addr: u64| addr & !0xfff;
    assert_eq!(pages(boot), vec![page(boot_spot)]);
    assert_eq!(pages(hot), vec![page(block_spot), page(later + BLOCK - 8)]);
    assert_eq!(pages(boot), Vec::<u64>::new(), "a second take is empty");
    assert_eq!(pages(hot), Vec::<u64>::new());

    // Off again: no slot logs, and the log cannot be taken.
    vm.memslots().set_dirty_logging(false).unwrap();
    assert!(vm.memslots().take_dirty(hot).is_err());
    assert_eq!(run(&vm, &mut vcpu, &ProbeGuest::new().read(block_spot)), [2]);
}
