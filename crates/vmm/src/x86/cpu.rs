//! A vCPU's initial state: CPUID, MSRs, FPU, local APIC, and for the boot
//! vCPU the registers of the kernel entry [`load_kernel`](super::boot::load_kernel)
//! returned.
//!
//! The integrator's order, per VM:
//!
//! 1. `KVM_CREATE_IRQCHIP` (the in-kernel PIC, IOAPIC and local APICs)
//!    **before** creating vCPUs: [`configure_vcpu`] programs the local
//!    APIC and fails without one;
//! 2. [`supported_cpuid`] once;
//! 3. [`load_kernel`](super::boot::load_kernel) (writes the boot GDT the
//!    boot vCPU's segment registers describe);
//! 4. for every vCPU `id` in `0..cpus`: `KVM_CREATE_VCPU(id)` (the APIC id
//!    is the vCPU id), then [`configure_vcpu`] with the entry for vCPU 0
//!    and `None` for the others, all before the first `KVM_RUN`.
//!
//! Application processors get CPUID, MSRs, FPU and LAPIC only: with the
//! in-kernel irqchip KVM holds them in wait-for-SIPI until the boot vCPU
//! starts them with INIT-SIPI-SIPI.
//!
//! # MSRs
//!
//! The boot MSRs are the SYSENTER and SYSCALL ones, `KERNEL_GS_BASE` and
//! the TSC (0), `IA32_MISC_ENABLE` (fast strings) and `MTRRdefType`
//! (0x806: MTRRs on, write-back default). An MSR this vCPU does not have
//! is skipped with a debug log: support is asked of the vCPU itself with a
//! one-MSR `KVM_GET_MSRS` (what `KVM_SET_MSRS` accepts, it reads). KVM's
//! `KVM_GET_MSR_INDEX_LIST` is not used for this, because it leaves out
//! MSRs KVM emulates in full: the MTRRs (`MTRRdefType` is missing from it
//! on hosts that do support it, which would leave a guest with MTRRs off).
//! The MSRs kept must then all be set: a short `KVM_SET_MSRS` count is an
//! error naming the first MSR refused.

mod cpuid;
#[cfg(test)]
mod tests;

use std::io;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

pub use cpuid::vcpu_cpuid;

use super::boot::{BootEntry, GDT_ENTRIES, boot_gdt};
use super::layout;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SYSCALL_MASK` (`FMASK`).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `IA32_MISC_ENABLE`: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MTRRdefType`: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_BOOT: u64 = (1 << 11) | 0x6;

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE (native FPU errors).
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP (supervisor write protection).
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;

/// Local APIC LVT LINT0 register offset.
const APIC_LVT0: usize = 0x350;
/// Local APIC LVT LINT1 register offset.
const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The vCPU id does not fit the CPU count.
    #[error("vCPU id {id} is not below the vCPU count {cpus}")]
    Topology {
        /// The vCPU id.
        id: u8,
        /// The vCPU count.
        cpus: u8,
    },
    /// The CPUID has more entries than KVM takes.
    #[error("the vCPU's CPUID has {entries} entries, more than KVM's {max}")]
    TooManyCpuidEntries {
        /// Entries.
        entries: usize,
        /// KVM's maximum.
        max: usize,
    },
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call and its vCPU.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// `KVM_SET_MSRS` set fewer MSRs than asked.
    #[error("KVM_SET_MSRS of vCPU {id} set {set} of {asked} MSRs: MSR {refused:#x} was refused")]
    Msrs {
        /// The vCPU id.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were asked.
        asked: usize,
        /// The first MSR not set.
        refused: u32,
    },
    /// The vCPU has no in-kernel local APIC.
    #[error(
        "KVM_GET_LAPIC of vCPU {id}: {source} (the in-kernel irqchip must be created, KVM_CREATE_IRQCHIP, \
         before the vCPUs)"
    )]
    NoLapic {
        /// The vCPU id.
        id: u8,
        /// The error.
        source: io::Error,
    },
}

fn kvm_error(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    let what = what.into();
    move |e| CpuError::Kvm { what, source: e.into() }
}

/// KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`), with the
/// TSC-deadline timer (leaf 1 ECX bit 24) added when KVM has
/// `KVM_CAP_TSC_DEADLINE_TIMER` (KVM emulates it in the in-kernel local
/// APIC but may leave it out of the supported bits). The input of
/// [`configure_vcpu`] and [`vcpu_cpuid`].
///
/// # Errors
///
/// The ioctl failing.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= cpuid::LEAF1_ECX_TSC_DEADLINE;
        }
    }
    Ok(cpuid)
}

/// The boot MSRs and their values (see the [module documentation](self)).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_BOOT),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// A flat segment of the boot GDT, as KVM's segment registers hold it.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// `sregs` (as KVM reset them) set up for `entry`: segments from the boot
/// GDT, GDT and IDT registers, and PVH's 32-bit protected mode (CR0 =
/// PE|ET, CR3 = CR4 = EFER = 0) or the 64-bit protocol's long mode (CR0 =
/// PE|ET|NE|WP|PG, CR3 = the boot PML4, CR4 = PAE, EFER = LME|LMA).
pub fn boot_sregs(mut sregs: kvm_sregs, entry: &BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(entry);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// The general registers for `entry`: `rflags` = 2 (interrupts off), `rip`
/// the entry, and `rbx` = `hvm_start_info` (PVH) or `rsi` =
/// `boot_params` with `rsp` = `rbp` = [`layout::BOOT_STACK_POINTER`]
/// (Linux64).
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    match *entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
        BootEntry::Linux64 { entry, boot_params } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsi: boot_params,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            ..Default::default()
        },
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// `reg` with delivery mode `mode` (bits 8..11).
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets the boot MSRs this vCPU has; see the [module documentation](self).
fn set_boot_msrs(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let mut kept = Vec::new();
    for msr in boot_msrs() {
        let mut probe = Msrs::from_entries(&[kvm_msr_entry {
            index: msr.index,
            ..Default::default()
        }])
        .expect("one MSR fits");
        let read = vcpu
            .get_msrs(&mut probe)
            .map_err(kvm_error(format!("KVM_GET_MSRS({:#x}) of vCPU {id}", msr.index)))?;
        if read == 1 {
            kept.push(msr);
        } else {
            log::debug!("vCPU {id}: KVM does not have MSR {:#x}, not setting it", msr.index);
        }
    }
    let msrs = Msrs::from_entries(&kept).expect("the boot MSRs fit");
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(kvm_error(format!("KVM_SET_MSRS of vCPU {id}")))?;
    if set != kept.len() {
        return Err(CpuError::Msrs {
            id,
            set,
            asked: kept.len(),
            refused: kept[set].index,
        });
    }
    Ok(())
}

/// Configures vCPU `id` (created with that KVM vCPU id, which is its APIC
/// id) of `cpus`: CPUID ([`vcpu_cpuid`] of `cpuid`, then
/// `KVM_SET_CPUID2`), the boot MSRs, the FPU (FCW 0x37f, MXCSR 0x1f80),
/// the local APIC (LINT0 ExtINT, LINT1 NMI), and for vCPU 0 with an
/// `entry` the registers of [`boot_sregs`] and [`boot_regs`]. `entry` is
/// ignored for the other vCPUs, which wait for INIT-SIPI.
///
/// Call it before the vCPU's first `KVM_RUN`, after `KVM_CREATE_IRQCHIP`
/// and (for vCPU 0) after [`load_kernel`](super::boot::load_kernel); see
/// the [module documentation](self).
///
/// # Errors
///
/// A bad `id`/`cpus`, a KVM call failing, an MSR refused, or no in-kernel
/// local APIC.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    cpuid: &CpuId,
    id: u8,
    cpus: u8,
    entry: Option<&BootEntry>,
) -> Result<(), CpuError> {
    // CPUID first: KVM checks MSRs and control registers against it
    // (EFER.LME needs long mode in CPUID).
    let own = vcpu_cpuid(cpuid, id, cpus)?;
    vcpu.set_cpuid2(&own)
        .map_err(kvm_error(format!("KVM_SET_CPUID2 of vCPU {id}")))?;
    set_boot_msrs(vcpu, id)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(kvm_error(format!("KVM_SET_FPU of vCPU {id}")))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::NoLapic { id, source: e.into() })?;
    let lint0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, with_delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)
        .map_err(kvm_error(format!("KVM_SET_LAPIC of vCPU {id}")))?;

    match entry {
        Some(entry) if id == 0 => {
            let sregs = vcpu
                .get_sregs()
                .map_err(kvm_error(format!("KVM_GET_SREGS of vCPU {id}")))?;
            vcpu.set_sregs(&boot_sregs(sregs, entry))
                .map_err(kvm_error(format!("KVM_SET_SREGS of vCPU {id}")))?;
            vcpu.set_regs(&boot_regs(entry))
                .map_err(kvm_error(format!("KVM_SET_REGS of vCPU {id}")))?;
        }
        Some(_) => log::debug!("vCPU {id} is an application processor: ignoring the boot entry"),
        None => {}
    }
    Ok(())
}
