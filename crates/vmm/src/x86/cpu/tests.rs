//! Tests of the vCPU state: the CPUID transform and the register values as
//! pure functions, then on real KVM (skipped, saying so, without a usable
//! `/dev/kvm`): read back after [`configure_vcpu`], and two boots of tiny
//! kernels from [`load_kernel`](crate::x86::boot::load_kernel) that report
//! what they see.

use kvm_bindings::{
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    kvm_cpuid_entry2, kvm_userspace_memory_region,
};
use kvm_ioctls::{VcpuExit, VmFd};
use memvisor_memory::map::GuestMemoryMap;

use super::*;
use crate::x86::boot::tests::{FakeBzImage, MIB, file, guest, pattern, tiny_elf};
use crate::x86::boot::{BootConfig, load_kernel};

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if matches!(function, 4 | 0xb | 0x1f | 0x8000_001d) {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// A vendor id in leaf 0's EBX, EDX, ECX order.
fn vendor_regs(id: &[u8; 12]) -> (u32, u32, u32) {
    let word = |i: usize| u32::from_le_bytes(id[i..i + 4].try_into().unwrap());
    (word(0), word(4), word(8))
}

/// A hand-made supported CPUID of vendor `id`: the leaves the transform
/// touches, with bits set that it must clear and keep.
fn hand_made(id: &[u8; 12]) -> CpuId {
    let (ebx, edx, ecx) = vendor_regs(id);
    CpuId::from_entries(&[
        entry(0, 0, 0x1f, ebx, ecx, edx),
        // Leaf 1: clflush 8, a stale APIC id 0x55, TSC-deadline, SSE4.2.
        entry(
            1,
            0,
            0x00a1_0f11,
            0x5501_0800,
            (1 << 24) | (1 << 20),
            0x078b_fbff | (1 << 28),
        ),
        entry(4, 0, 0x0000_0121, 0x01c0_003f, 0x3f, 0),
        entry(4, 1, 0x0000_4163, 0x03c0_003f, 0x7fff, 1),
        entry(4, 2, 0, 0, 0, 0),
        entry(6, 0, 0x7, 0x1, 0x9, 0),
        entry(7, 0, 0, 0x0180_0002, 0x104, 0x2000_0000),
        entry(0xa, 0, 0x0703_0802, 0xff, 0, 0x8503),
        entry(0xb, 0, 1, 2, 0x100, 0x33),
        entry(0x1f, 0, 1, 2, 0x100, 0x33),
        entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        entry(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
        entry(0x8000_0000, 0, 0x8000_0021, ebx, ecx, edx),
        entry(0x8000_0001, 0, 0x00a1_0f11, 0, 0x0040_0397, 0x23d3_fbff),
        entry(0x8000_0008, 0, 0x3030, 0x5002_0005, 0x7001, 0),
        entry(0x8000_001d, 0, 0x0000_0121, 0x01c0_003f, 0x3f, 0),
        entry(0x8000_001d, 1, 0x0000_4163, 0x03c0_003f, 0x7fff, 1),
        entry(0x8000_001d, 2, 0, 0, 0, 0),
        entry(0x8000_001e, 0, 0x11, 0x0105, 0x0302, 0),
    ])
    .unwrap()
}

fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
    *cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
        .unwrap_or_else(|| panic!("no CPUID leaf {function:#x}.{index}"))
}

fn count(cpuid: &CpuId, function: u32) -> usize {
    cpuid.as_slice().iter().filter(|e| e.function == function).count()
}

#[test]
fn cpuid_carries_the_topology_of_each_vcpu() {
    let supported = hand_made(b"AuthenticAMD");
    let c = vcpu_cpuid(&supported, 2, 3).unwrap();

    let l1 = find(&c, 1, 0);
    assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
    assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical processors");
    assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line size kept");
    assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
    assert_ne!(l1.ecx & (1 << 24), 0, "TSC-deadline kept");
    assert_ne!(l1.ecx & (1 << 20), 0, "other features kept");
    assert_ne!(l1.edx & (1 << 28), 0, "HTT with 3 CPUs");

    // Leaf 0xB: SMT level of one thread, core level of 3 cores, 2 bits.
    assert_eq!(count(&c, 0xb), 3);
    for (index, eax, ebx, ecx) in [(0, 0, 1, 0x100), (1, 2, 3, 0x201), (2, 0, 0, 0x2)] {
        let e = find(&c, 0xb, index);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (eax, ebx, ecx, 2), "0xb.{index}");
        assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        let e = find(&c, 0x1f, index);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (eax, ebx, ecx, 2), "0x1f.{index}");
    }

    // Leaf 4: cores per package and sharing.
    assert_eq!(find(&c, 4, 0).eax, 0x0800_0121, "L1: 3 cores, not shared");
    assert_eq!(find(&c, 4, 1).eax, 0x0800_8163, "L3: 3 cores, shared by 3");
    assert_eq!(find(&c, 4, 2).eax, 0, "end of the list untouched");

    let l6 = find(&c, 6, 0);
    assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (0x4, 0, 0, 0), "only ARAT");
    let la = find(&c, 0xa, 0);
    assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0), "no PMU");

    // AMD: SVM hidden, CmpLegacy with more than one core, consistent counts.
    let e1 = find(&c, 0x8000_0001, 0);
    assert_eq!(e1.ecx & (1 << 2), 0, "SVM cleared");
    assert_eq!(e1.ecx, 0x0040_0393, "only SVM changed (CmpLegacy already set)");
    assert_eq!(find(&c, 0x8000_0008, 0).ecx, 0x2002, "NC = 2, ApicIdSize = 2");
    assert_eq!(find(&c, 0x8000_001d, 0).eax, 0x0000_0121, "L1 not shared");
    assert_eq!(find(&c, 0x8000_001d, 1).eax, 0x0000_8163, "L3 shared by 3");
    let e1e = find(&c, 0x8000_001e, 0);
    assert_eq!((e1e.eax, e1e.ebx, e1e.ecx, e1e.edx), (2, 2, 0, 0));

    // KVM's paravirtual leaves and the rest, as given.
    assert_eq!(find(&c, 0x4000_0000, 0), find(&supported, 0x4000_0000, 0));
    assert_eq!(find(&c, 0x4000_0001, 0), find(&supported, 0x4000_0001, 0));
    assert_eq!(find(&c, 7, 0), find(&supported, 7, 0));
    assert_eq!(c.as_slice().len(), supported.as_slice().len() + 4);
}

#[test]
fn a_single_cpu_is_alone_in_its_package() {
    let c = vcpu_cpuid(&hand_made(b"AuthenticAMD"), 0, 1).unwrap();
    let l1 = find(&c, 1, 0);
    assert_eq!(l1.ebx >> 16, 0x01, "APIC id 0, one logical processor");
    assert_eq!(l1.edx & (1 << 28), 0, "no HTT");
    assert_eq!(find(&c, 0x8000_0001, 0).ecx & 0x6, 0, "no CmpLegacy, no SVM");
    assert_eq!(find(&c, 0x8000_0008, 0).ecx, 0);
    assert_eq!(find(&c, 0xb, 1).eax, 0, "no core bits");
    assert_eq!(find(&c, 0xb, 1).ebx, 1);
    assert_eq!(find(&c, 4, 1).eax, 0x0000_0163);
}

#[test]
fn intel_keeps_the_amd_leaves() {
    let supported = hand_made(b"GenuineIntel");
    let c = vcpu_cpuid(&supported, 1, 4).unwrap();
    for leaf in [0x8000_0008, 0x8000_001e] {
        assert_eq!(find(&c, leaf, 0), find(&supported, leaf, 0), "{leaf:#x}");
    }
    assert_eq!(find(&c, 0x8000_001d, 1), find(&supported, 0x8000_001d, 1));
    assert_eq!(
        find(&c, 0x8000_0001, 0).ecx,
        0x0040_0393,
        "SVM cleared, CmpLegacy untouched"
    );
    assert_eq!(find(&c, 0xb, 1).eax, 2);
    assert_eq!(find(&c, 4, 1).eax, 0x0c00_c163, "4 cores, L3 shared by 4");
}

#[test]
fn topology_leaves_follow_the_max_basic_leaf() {
    let mut entries: Vec<kvm_cpuid_entry2> = hand_made(b"AuthenticAMD")
        .as_slice()
        .iter()
        .filter(|e| e.function != 0x1f)
        .copied()
        .collect();
    // KVM lists only 0xB.0 (newer kernels): the core level is added.
    let c = vcpu_cpuid(&CpuId::from_entries(&entries).unwrap(), 0, 2).unwrap();
    assert_eq!(count(&c, 0xb), 3);
    assert_eq!(count(&c, 0x1f), 0, "0x1F only where KVM lists it");
    entries[0].eax = 0xa;
    let c = vcpu_cpuid(&CpuId::from_entries(&entries).unwrap(), 0, 2).unwrap();
    assert_eq!(find(&c, 0xb, 0), find(&CpuId::from_entries(&entries).unwrap(), 0xb, 0));
    assert_eq!(count(&c, 0xb), 1, "beyond the max basic leaf: left alone");
}

#[test]
fn bad_topologies_are_refused() {
    let supported = hand_made(b"AuthenticAMD");
    for (id, cpus) in [(0, 0), (1, 1), (255, 255)] {
        let err = vcpu_cpuid(&supported, id, cpus).unwrap_err();
        assert!(matches!(err, CpuError::Topology { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{id}")), "{err}");
    }
    assert!(vcpu_cpuid(&supported, 254, 255).is_ok());
    assert_eq!(cpuid::core_bits(255), 8);
    assert_eq!(cpuid::core_bits(4), 2);
    assert_eq!(cpuid::core_bits(5), 3);
}

#[test]
fn segments_follow_the_boot_gdt() {
    let linux = BootEntry::Linux64 {
        entry: 0x10_0200,
        boot_params: layout::ZERO_PAGE_START,
    };
    let sregs = boot_sregs(kvm_sregs::default(), &linux);
    assert_eq!(
        (
            sregs.cs.selector,
            sregs.cs.l,
            sregs.cs.db,
            sregs.cs.type_,
            sregs.cs.limit
        ),
        (0x08, 1, 0, 0xb, 0xffff_ffff)
    );
    assert_eq!(
        (sregs.ss.selector, sregs.ss.db, sregs.ss.type_, sregs.ss.present),
        (0x10, 1, 3, 1)
    );
    assert_eq!((sregs.tr.selector, sregs.tr.type_, sregs.tr.s), (0x18, 0xb, 0));
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (layout::BOOT_GDT_START, 31));
    assert_eq!((sregs.idt.base, sregs.idt.limit), (layout::BOOT_IDT_START, 7));
    assert_eq!(sregs.cr0, CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG);
    assert_eq!(
        (sregs.cr3, sregs.cr4, sregs.efer),
        (layout::PML4_START, CR4_PAE, EFER_LME | EFER_LMA)
    );
    let regs = boot_regs(&linux);
    assert_eq!(
        (regs.rip, regs.rsi, regs.rflags),
        (0x10_0200, layout::ZERO_PAGE_START, 2)
    );
    assert_eq!(
        (regs.rsp, regs.rbp),
        (layout::BOOT_STACK_POINTER, layout::BOOT_STACK_POINTER)
    );

    let pvh = BootEntry::Pvh {
        entry: 0x20_0000,
        start_info: layout::PVH_INFO_START,
    };
    let sregs = boot_sregs(kvm_sregs::default(), &pvh);
    assert_eq!(
        (sregs.cs.l, sregs.cs.db, sregs.cs.limit, sregs.cs.base),
        (0, 1, 0xffff_ffff, 0)
    );
    assert_eq!((sregs.tr.limit, sregs.tr.type_, sregs.tr.g), (0x67, 0xb, 0));
    assert_eq!(
        (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer),
        (CR0_PE | CR0_ET, 0, 0, 0)
    );
    let regs = boot_regs(&pvh);
    assert_eq!(
        (regs.rip, regs.rbx, regs.rsi, regs.rflags),
        (0x20_0000, layout::PVH_INFO_START, 0, 2)
    );
    assert_eq!(segment_from_gdt(0, 0).unusable, 1);
}

// ---- On real KVM ----

/// KVM, or `None` after saying why the test is skipped.
fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable ({e})");
            None
        }
    }
}

/// A VM with the in-kernel irqchip and a slot per region of `mem`. Fields
/// drop in order: the fds before the memory their slots point into.
struct TestVm {
    vm: VmFd,
    mem: GuestMemoryMap,
}

impl TestVm {
    fn new(kvm: &Kvm, mem: &GuestMemoryMap) -> Self {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        for (slot, region) in mem.regions().iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.range().start(),
                memory_size: region.range().len(),
                userspace_addr: region.host_address(),
            };
            // SAFETY: the region's host mapping is `memory_size` bytes at
            // `userspace_addr`, kept alive by `self.mem` (a clone of the
            // map), which drops after `self.vm` and after every vCPU fd,
            // which the tests drop before their `TestVm`.
            unsafe { vm.set_user_memory_region(r) }.unwrap();
        }
        Self { vm, mem: mem.clone() }
    }
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1, "MSR {index:#x}");
    msrs.as_slice()[0].data
}

#[test]
fn kvm_boot_vcpu_in_long_mode() {
    let Some(kvm) = kvm_or_skip("kvm_boot_vcpu_in_long_mode") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let supported = supported_cpuid(&kvm).unwrap();
    let entry = BootEntry::Linux64 {
        entry: 0x10_0200,
        boot_params: layout::ZERO_PAGE_START,
    };
    configure_vcpu(&vcpu, &supported, 0, 2, Some(&entry)).unwrap();

    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG, "cr0 {:#x}", sregs.cr0);
    assert_eq!(sregs.cr3, layout::PML4_START);
    assert_ne!(sregs.cr4 & CR4_PAE, 0);
    assert_eq!(
        sregs.efer & (EFER_LME | EFER_LMA),
        EFER_LME | EFER_LMA,
        "efer {:#x}",
        sregs.efer
    );
    assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
    assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
    let regs = vcpu.get_regs().unwrap();
    assert_eq!((regs.rip, regs.rsi), (0x10_0200, layout::ZERO_PAGE_START));
    assert_eq!(
        (regs.rsp, regs.rbp),
        (layout::BOOT_STACK_POINTER, layout::BOOT_STACK_POINTER)
    );
    assert_eq!(regs.rflags, 2);

    assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
    assert_eq!(read_msr(&vcpu, MSR_MTRR_DEF_TYPE), 0x806);
    assert_ne!(read_msr(&vcpu, MSR_IA32_MISC_ENABLE) & MISC_ENABLE_FAST_STRING, 0);
    assert_eq!(read_msr(&vcpu, MSR_IA32_SYSENTER_CS), 0);
    assert_eq!(read_msr(&vcpu, MSR_LSTAR), 0);

    let lapic = vcpu.get_lapic().unwrap();
    assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
    assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);

    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let l1 = find(&cpuid, 1, 0);
    assert_eq!(l1.ebx >> 24, 0);
    assert_eq!((l1.ebx >> 16) & 0xff, 2);
    assert_ne!(l1.ecx & (1 << 31), 0);
    assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx & (1 << 2), 0, "no SVM");
    assert_eq!(find(&cpuid, 0xb, 1).ebx, 2);
    assert_eq!(vcpu.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);
}

#[test]
fn kvm_boot_vcpu_in_pvh_mode_and_an_application_processor() {
    let Some(kvm) = kvm_or_skip("kvm_boot_vcpu_in_pvh_mode_and_an_application_processor") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let bsp = vm.create_vcpu(0).unwrap();
    let ap = vm.create_vcpu(1).unwrap();
    let supported = supported_cpuid(&kvm).unwrap();
    let entry = BootEntry::Pvh {
        entry: 0x100_0000,
        start_info: layout::PVH_INFO_START,
    };
    configure_vcpu(&bsp, &supported, 0, 2, Some(&entry)).unwrap();
    let ap_regs = ap.get_regs().unwrap();
    configure_vcpu(&ap, &supported, 1, 2, Some(&entry)).unwrap();

    let sregs = bsp.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE, "cr0 {:#x}", sregs.cr0);
    assert_eq!(sregs.cr4 & CR4_PAE, 0);
    assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), 0);
    assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.base), (1, 0, 0));
    let regs = bsp.get_regs().unwrap();
    assert_eq!(
        (regs.rip, regs.rbx, regs.rflags),
        (0x100_0000, layout::PVH_INFO_START, 2)
    );

    // The AP keeps its reset state and waits for INIT-SIPI.
    assert_eq!(ap.get_regs().unwrap(), ap_regs);
    assert_eq!(ap.get_regs().unwrap().rip, 0xfff0);
    assert_eq!(ap.get_mp_state().unwrap().mp_state, KVM_MP_STATE_UNINITIALIZED);
    let cpuid = ap.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    assert_eq!(find(&cpuid, 1, 0).ebx >> 24, 1, "the AP's APIC id");
    assert_eq!(find(&cpuid, 0xb, 0).edx, 1, "the AP's x2APIC id");
    assert_eq!(read_msr(&ap, MSR_MTRR_DEF_TYPE), 0x806);
}

#[test]
fn kvm_without_irqchip_has_no_lapic() {
    let Some(kvm) = kvm_or_skip("kvm_without_irqchip_has_no_lapic") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let err = configure_vcpu(&vcpu, &supported_cpuid(&kvm).unwrap(), 0, 1, None).unwrap_err();
    assert!(matches!(err, CpuError::NoLapic { id: 0, .. }), "{err}");
    assert!(err.to_string().contains("KVM_CREATE_IRQCHIP"), "{err}");
}

/// Port the test kernels report dwords on.
const REPORT_PORT: u16 = 0xe0;
/// Port a test kernel writes to when it is done (`hlt` would block in the
/// in-kernel LAPIC instead of exiting).
const DONE_PORT: u16 = 0xe1;

/// Runs `vcpu` until the guest writes to [`DONE_PORT`]; its reports.
fn run_until_done(vcpu: &mut VcpuFd) -> Vec<u32> {
    let mut reports = Vec::new();
    for _ in 0..1000 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(REPORT_PORT, data)) => {
                reports.push(u32::from_le_bytes(data.try_into().expect("a dword")));
            }
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => return reports,
            Ok(other) => {
                let exit = format!("{other:?}");
                panic!("unexpected exit {exit} at rip {:#x}", vcpu.get_regs().unwrap().rip);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
    panic!("the guest did not finish; reports so far: {reports:x?}")
}

/// Loads `kernel` with an initrd into 32 MiB, configures vCPU 0 and runs it.
fn boot(kvm: &Kvm, kernel: &[u8]) -> (BootEntry, Vec<u32>) {
    let (mem, ram) = guest(32 * MIB);
    let test_vm = TestVm::new(kvm, &mem);
    let mut vcpu = test_vm.vm.create_vcpu(0).unwrap();
    let mut kernel = file(kernel);
    let mut initrd = file(&[0x78, 0x56, 0x34, 0x12, 0xff]);
    let entry = load_kernel(
        &test_vm.mem,
        BootConfig {
            kernel: &mut kernel,
            initrd: Some(&mut initrd),
            cmdline: "console=ttyS0",
            ram: &ram,
            rsdp: None,
        },
    )
    .unwrap();
    configure_vcpu(&vcpu, &supported_cpuid(kvm).unwrap(), 0, 1, Some(&entry)).unwrap();
    let reports = run_until_done(&mut vcpu);
    drop(vcpu);
    drop(test_vm);
    (entry, reports)
}

#[test]
fn kvm_boots_a_bzimage_at_its_64bit_entry() {
    let Some(kvm) = kvm_or_skip("kvm_boots_a_bzimage_at_its_64bit_entry") else {
        return;
    };
    #[rustfmt::skip]
    let code = [
        0x56,                               // push rsi
        0x58,                               // pop rax: the stack works
        0xe7, 0xe0,                         // out 0xe0, eax: boot_params
        0x8b, 0x9e, 0x28, 0x02, 0, 0,       // mov ebx, [rsi + 0x228]: cmd_line_ptr
        0x0f, 0xb6, 0x03,                   // movzx eax, byte [rbx]
        0xe7, 0xe0,                         // out: first command line byte
        0x8b, 0x9e, 0x18, 0x02, 0, 0,       // mov ebx, [rsi + 0x218]: ramdisk_image
        0x8b, 0x03,                         // mov eax, [rbx]
        0xe7, 0xe0,                         // out: the initrd's first dword
        0x0f, 0x20, 0xc0,                   // mov rax, cr0
        0xe7, 0xe0,                         // out: cr0
        0xe6, 0xe1,                         // out 0xe1, al: done
        0xf4,                               // hlt
    ];
    let mut payload = pattern(0x200, 0);
    payload.extend_from_slice(&code);
    let image = FakeBzImage {
        pref_address: 0x20_0000,
        init_size: 0x10_0000,
        ..Default::default()
    }
    .build(&payload);
    let (entry, reports) = boot(&kvm, &image);
    assert_eq!(entry.entry(), MIB + 0x200);
    assert_eq!(reports.len(), 4, "{reports:x?}");
    assert_eq!(reports[0], layout::ZERO_PAGE_START as u32);
    assert_eq!(reports[1], u32::from(b'c'));
    assert_eq!(reports[2], 0x1234_5678, "the initrd, read through the identity map");
    assert_eq!(
        reports[3] & 0x8000_0001,
        0x8000_0001,
        "paging and protection on: {:#x}",
        reports[3]
    );
}

#[test]
fn kvm_boots_a_pvh_elf_in_protected_mode() {
    let Some(kvm) = kvm_or_skip("kvm_boots_a_pvh_elf_in_protected_mode") else {
        return;
    };
    #[rustfmt::skip]
    let code = [
        0x8b, 0x03,                         // mov eax, [ebx]: magic
        0xe7, 0xe0,                         // out 0xe0, eax
        0x89, 0xd8,                         // mov eax, ebx
        0xe7, 0xe0,                         // out: start_info's address
        0x8b, 0x43, 0x18,                   // mov eax, [ebx + 0x18]: cmdline_paddr
        0xe7, 0xe0,                         // out
        0x8b, 0x5b, 0x10,                   // mov ebx, [ebx + 0x10]: modlist_paddr
        0x8b, 0x1b,                         // mov ebx, [ebx]: the initrd's paddr
        0x8b, 0x03,                         // mov eax, [ebx]
        0xe7, 0xe0,                         // out: the initrd's first dword
        0x0f, 0x20, 0xc0,                   // mov eax, cr0
        0xe7, 0xe0,                         // out: cr0
        0xe6, 0xe1,                         // out 0xe1, al: done
        0xf4,                               // hlt
    ];
    let elf = tiny_elf(&code, 2 * MIB, 0x1000, 0, true);
    let (entry, reports) = boot(&kvm, &elf);
    assert_eq!(
        entry,
        BootEntry::Pvh {
            entry: 2 * MIB,
            start_info: layout::PVH_INFO_START
        }
    );
    assert_eq!(reports.len(), 5, "{reports:x?}");
    assert_eq!(reports[0], 0x336e_c578);
    assert_eq!(reports[1], layout::PVH_INFO_START as u32);
    assert_eq!(reports[2], layout::CMDLINE_START as u32);
    assert_eq!(reports[3], 0x1234_5678);
    assert_eq!(
        reports[4] & 0x8000_0001,
        1,
        "protected mode, paging off: {:#x}",
        reports[4]
    );
}
