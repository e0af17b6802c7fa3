//! The KVM state of a running x86 guest, for snapshots and live migration:
//! per vCPU ([`VcpuState`], [`save_vcpu`], [`restore_vcpu`]) and VM-wide
//! ([`PlatformState`]: the PIT, both 8259s, the IOAPIC and kvmclock; saved
//! and restored by [`Vm`](crate::vm::Vm)).
//!
//! # Storage
//!
//! KVM's structs (`kvm_regs`, `kvm_sregs`, `kvm_lapic_state`, ...) are
//! plain old data in the kernel's ABI. Each is stored as the raw bytes of
//! the struct (`Vec<u8>`), so the state serializes with any serde format
//! without mirroring every kernel field. Loading checks the length first: a
//! field of the wrong size (a truncated or garbled file) is a
//! [`StateError::Length`] naming the field, never a panic. Every bit
//! pattern of the right length is a valid value of these structs (they hold
//! only integers); KVM itself validates what it is given.
//!
//! # Order
//!
//! Saving and restoring follow Firecracker and Cloud Hypervisor, see
//! [`save_vcpu`] and [`restore_vcpu`]. The vCPU must not be running: save
//! from a parked vCPU thread (see
//! [`VcpuControl::with_parked`](crate::vcpu::VcpuControl::with_parked)),
//! whose pending port or MMIO exit has been completed.

use std::io;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// `IA32_TSC_DEADLINE`: restored last, after `IA32_TSC` and the local
/// APIC's timer mode it depends on.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MTRRs, which KVM emulates in full but leaves out of
/// `KVM_GET_MSR_INDEX_LIST`: `MTRRdefType`, the 8 variable-range
/// base/mask pairs and the 11 fixed-range MSRs.
pub fn mtrr_msrs() -> impl Iterator<Item = u32> {
    [0x2ff, 0x250, 0x258, 0x259]
        .into_iter()
        .chain(0x200..=0x20f)
        .chain(0x268..=0x26f)
}

/// A TSC frequency within this many parts per million of the saved one is
/// kept as it is on restore (the same host model's rate varies a little
/// from boot to boot; KVM's own scaling tolerance is 250 ppm too).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Why a vCPU's or the VM's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("{ioctl}: {source}")]
    Kvm {
        /// The ioctl (and its argument, if any).
        ioctl: String,
        /// The error KVM returned.
        source: io::Error,
    },
    /// A saved struct does not have the size of its KVM struct.
    #[error("saved field `{field}` is {got} bytes, but its KVM struct is {expected} bytes")]
    Length {
        /// The field.
        field: &'static str,
        /// The size of the KVM struct.
        expected: usize,
        /// The size saved.
        got: usize,
    },
    /// A saved struct has a value that cannot be right.
    #[error("saved field `{field}`: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// More entries than KVM takes in one call.
    #[error("saved field `{field}` has {got} entries, more than KVM's {max}")]
    TooManyEntries {
        /// The field.
        field: &'static str,
        /// Entries saved.
        got: usize,
        /// KVM's maximum.
        max: usize,
    },
    /// `KVM_SET_MSRS` set fewer MSRs than asked.
    #[error("KVM_SET_MSRS set {set} of {asked} MSRs: MSR {refused:#x} was refused")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were asked.
        asked: usize,
        /// The first MSR not set.
        refused: u32,
    },
    /// The state is another vCPU's.
    #[error("the state of vCPU {state} cannot be restored into vCPU {vcpu}")]
    WrongVcpu {
        /// The id in the state.
        state: u64,
        /// The vCPU restored into.
        vcpu: u64,
    },
}

fn kvm_error(ioctl: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    let ioctl = ioctl.into();
    move |e| StateError::Kvm {
        ioctl,
        source: e.into(),
    }
}

/// A KVM ABI struct that is stored as its raw bytes.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` kernel structs made only of integers,
/// arrays of integers and structs or unions of those: no pointers, no
/// `bool`s or enums, no implicit padding (kvm-bindings derives zerocopy's
/// `IntoBytes` and `FromBytes` for every one of them, which proves it), so
/// every byte of a value is initialized and every bit pattern is a value.
pub(crate) unsafe trait KvmPod: Sized {}

// SAFETY: see the trait; each is a kvm-bindings struct with zerocopy's
// derives, or (`kvm_fpu`) integers and integer arrays whose sizes add up to
// its 416 bytes.
unsafe impl KvmPod for kvm_regs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_sregs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_fpu {}
// SAFETY: see above; the flexible array member is zero-sized.
unsafe impl KvmPod for kvm_xsave {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_xcrs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_debugregs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_lapic_state {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_pit_state2 {}
// SAFETY: see above; its union has a 512-byte array member that covers
// it whole.
unsafe impl KvmPod for kvm_irqchip {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_clock_data {}

/// The raw bytes of `value`.
pub(crate) fn to_bytes<T: KvmPod>(value: &T) -> Vec<u8> {
    // SAFETY: `value` is `size_of::<T>()` readable bytes, all initialized
    // (`KvmPod`: no padding), borrowed for the copy.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// The `T` whose raw bytes are `bytes`; `field` names it in the error.
///
/// # Errors
///
/// `bytes` not being `size_of::<T>()` long.
pub(crate) fn from_bytes<T: KvmPod>(field: &'static str, bytes: &[u8]) -> Result<T, StateError> {
    if bytes.len() != size_of::<T>() {
        return Err(StateError::Length {
            field,
            expected: size_of::<T>(),
            got: bytes.len(),
        });
    }
    // SAFETY: `bytes` holds exactly `size_of::<T>()` bytes (checked), read
    // unaligned; any bit pattern is a `T` (`KvmPod`).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// One CPUID leaf (`kvm_cpuid_entry2` without its padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX on input: the leaf.
    pub function: u32,
    /// ECX on input: the sub-leaf.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// EAX on output.
    pub eax: u32,
    /// EBX on output.
    pub ebx: u32,
    /// ECX on output.
    pub ecx: u32,
    /// EDX on output.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// The floating-point and vector registers, as the host's KVM gives them.
///
/// XSAVE is preferred: it has every component, and on an XSAVE host
/// `KVM_SET_FPU` writes the legacy area without marking x87 or SSE in use
/// (`XSTATE_BV`), so a guest whose FPU was in its init state would not see
/// the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// `KVM_GET_XSAVE`: a `kvm_xsave` (4096 bytes), all XSAVE components.
    Xsave(Vec<u8>),
    /// `KVM_GET_FPU`: a `kvm_fpu` (x87 and SSE only), where
    /// `KVM_GET_XSAVE` fails (a host without XSAVE).
    Fpu(Vec<u8>),
}

/// A vCPU's KVM state; each `Vec<u8>` is the raw bytes of the KVM struct
/// named (see the [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU id (its APIC id). [`save_vcpu`] cannot know it and leaves
    /// it 0: [`Vcpu::save_state`](crate::vm::Vcpu::save_state) sets it.
    pub id: u64,
    /// `KVM_GET_CPUID2`.
    pub cpuid: Vec<CpuidEntry>,
    /// `KVM_GET_MP_STATE`: `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// `kvm_regs`.
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    pub sregs: Vec<u8>,
    /// `kvm_xsave` or `kvm_fpu`.
    pub fpu: FpuState,
    /// `kvm_xcrs`, if KVM has `KVM_GET_XCRS`.
    pub xcrs: Option<Vec<u8>>,
    /// `kvm_debugregs`.
    pub debugregs: Vec<u8>,
    /// `kvm_lapic_state`.
    pub lapic: Vec<u8>,
    /// `KVM_GET_TSC_KHZ`, if KVM knows the vCPU's TSC frequency.
    pub tsc_khz: Option<u32>,
    /// The MSRs KVM read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// `kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMM.
    pub vcpu_events: Vec<u8>,
}

impl VcpuState {
    /// The general registers.
    pub fn regs(&self) -> Result<kvm_regs, StateError> {
        from_bytes("regs", &self.regs)
    }

    /// The segment and control registers.
    pub fn sregs(&self) -> Result<kvm_sregs, StateError> {
        from_bytes("sregs", &self.sregs)
    }

    /// The local APIC.
    pub fn lapic(&self) -> Result<kvm_lapic_state, StateError> {
        from_bytes("lapic", &self.lapic)
    }

    /// The pending events.
    pub fn vcpu_events(&self) -> Result<kvm_vcpu_events, StateError> {
        from_bytes("vcpu_events", &self.vcpu_events)
    }
}

/// The VM-wide state of the in-kernel platform: each `Vec<u8>` is the raw
/// bytes of the KVM struct named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformState {
    /// `kvm_pit_state2`.
    pub pit: Vec<u8>,
    /// `kvm_irqchip` of `KVM_IRQCHIP_PIC_MASTER`.
    pub pic_master: Vec<u8>,
    /// `kvm_irqchip` of `KVM_IRQCHIP_PIC_SLAVE`.
    pub pic_slave: Vec<u8>,
    /// `kvm_irqchip` of `KVM_IRQCHIP_IOAPIC`.
    pub ioapic: Vec<u8>,
    /// `kvm_clock_data`.
    pub clock: Vec<u8>,
}

/// Whether a failed optional ioctl means "KVM does not have it" (the
/// state is then not saved) rather than a real failure.
fn unsupported(e: &kvm_ioctls::Error) -> bool {
    matches!(
        e.errno(),
        libc::EINVAL | libc::ENOTSUP | libc::ENOTTY | libc::ENOSYS | libc::ENXIO
    )
}

/// Reads `indices` with `KVM_GET_MSRS`, 256 at a time. KVM stops at the
/// first MSR it cannot read: that one is left out (logged) and the read
/// goes on after it.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("a chunk fits KVM_MAX_MSR_ENTRIES");
        let n = fd.get_msrs(&mut msrs).map_err(kvm_error("KVM_GET_MSRS"))?;
        read.extend(msrs.as_slice()[..n.min(chunk.len())].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            log::debug!("KVM_GET_MSRS cannot read MSR {:#x}: not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(read)
}

/// Writes `msrs` with `KVM_SET_MSRS`, 256 at a time; all must be set.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let wrapped = Msrs::from_entries(&entries).expect("a chunk fits KVM_MAX_MSR_ENTRIES");
        let set = fd.set_msrs(&wrapped).map_err(kvm_error("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(StateError::Msrs {
                set,
                asked: chunk.len(),
                refused: chunk[set.min(chunk.len() - 1)].0,
            });
        }
    }
    Ok(())
}

/// Whether MSR `index` can be read on `vcpu` (what `KVM_SET_MSRS` takes,
/// `KVM_GET_MSRS` reads).
fn readable(vcpu: &VcpuFd, index: u32) -> bool {
    let mut probe = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .expect("one MSR fits");
    matches!(vcpu.get_msrs(&mut probe), Ok(1))
}

/// The MSRs to save for migration: KVM's `KVM_GET_MSR_INDEX_LIST` (the
/// MSRs it saves and emulates), the [`mtrr_msrs`] (which that list leaves
/// out) and the [boot MSRs](crate::x86::cpu::boot_msrs), sorted, each kept
/// only if a one-MSR `KVM_GET_MSRS` on `vcpu` reads it.
pub fn migratable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let mut indices: Vec<u32> = match kvm.get_msr_index_list() {
        Ok(list) => list.as_slice().to_vec(),
        Err(e) => {
            log::warn!("KVM_GET_MSR_INDEX_LIST: {e}; saving only the MTRRs and the boot MSRs");
            Vec::new()
        }
    };
    indices.extend(mtrr_msrs());
    indices.extend(crate::x86::cpu::boot_msrs().iter().map(|m| m.index));
    indices.sort_unstable();
    indices.dedup();
    indices.retain(|&index| {
        let keep = readable(vcpu, index);
        if !keep {
            log::debug!("MSR {index:#x} cannot be read on this vCPU: not migrated");
        }
        keep
    });
    indices
}

/// Saves the state of the (not running) vCPU `fd`, with the MSRs `msrs`
/// (see [`migratable_msrs`]); [`VcpuState::id`] is left 0.
///
/// In this order: `KVM_GET_MP_STATE` (first: it also makes KVM finish
/// pending APIC events), `KVM_GET_VCPU_EVENTS` (before the registers:
/// without `KVM_CAP_EXCEPTION_PAYLOAD`, KVM delivers a pending exception's
/// payload here, writing CR2 for a #PF or DR6 for a #DB, which the
/// registers saved after it must hold), `KVM_GET_REGS`, `KVM_GET_SREGS`,
/// `KVM_GET_XSAVE` (`KVM_GET_FPU` where KVM has no XSAVE), `KVM_GET_XCRS`
/// (if KVM has it), `KVM_GET_DEBUGREGS`, `KVM_GET_LAPIC`,
/// `KVM_GET_TSC_KHZ` (if KVM knows it), `KVM_GET_CPUID2`, `KVM_GET_MSRS`
/// (an MSR KVM cannot read is left out).
///
/// # Errors
///
/// A KVM call failing.
pub fn save_vcpu(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, StateError> {
    let mp_state = fd.get_mp_state().map_err(kvm_error("KVM_GET_MP_STATE"))?.mp_state;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?;
    let regs = fd.get_regs().map_err(kvm_error("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    let fpu = match fd.get_xsave() {
        Ok(xsave) => FpuState::Xsave(to_bytes(&xsave)),
        Err(e) => {
            log::debug!("KVM_GET_XSAVE: {e}; saving the FPU with KVM_GET_FPU");
            FpuState::Fpu(to_bytes(&fd.get_fpu().map_err(kvm_error("KVM_GET_FPU"))?))
        }
    };
    let xcrs = match fd.get_xcrs() {
        Ok(xcrs) => Some(to_bytes(&xcrs)),
        Err(e) if unsupported(&e) => {
            log::debug!("KVM_GET_XCRS: {e}; not saved");
            None
        }
        Err(e) => return Err(kvm_error("KVM_GET_XCRS")(e)),
    };
    let debugregs = fd.get_debug_regs().map_err(kvm_error("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?;
    let tsc_khz = match fd.get_tsc_khz() {
        Ok(khz) if khz > 0 => Some(khz),
        Ok(_) => None,
        Err(e) => {
            log::debug!("KVM_GET_TSC_KHZ: {e}; not saved");
            None
        }
    };
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("KVM_GET_CPUID2"))?;
    let msrs = read_msrs(fd, msrs)?;
    Ok(VcpuState {
        id: 0,
        cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
        mp_state,
        regs: to_bytes(&regs),
        sregs: to_bytes(&sregs),
        fpu,
        xcrs,
        debugregs: to_bytes(&debugregs),
        lapic: to_bytes(&lapic),
        tsc_khz,
        msrs,
        vcpu_events: to_bytes(&vcpu_events),
    })
}

/// Sets the vCPU's TSC frequency to `khz` if it differs by more than
/// [`TSC_KHZ_TOLERANCE_PPM`] from the current one; where KVM cannot tell
/// or scale the TSC the guest keeps the host's rate (logged).
fn restore_tsc_khz(fd: &VcpuFd, khz: u32) {
    let current = match fd.get_tsc_khz() {
        Ok(current) => current,
        Err(e) => {
            log::warn!("KVM_GET_TSC_KHZ: {e}; the guest's TSC keeps this host's rate, not {khz} kHz");
            return;
        }
    };
    let diff = u64::from(current.abs_diff(khz));
    if diff * 1_000_000 <= TSC_KHZ_TOLERANCE_PPM * u64::from(khz) {
        return;
    }
    if let Err(e) = fd.set_tsc_khz(khz) {
        log::warn!("KVM_SET_TSC_KHZ({khz}): {e}; the guest's TSC runs at this host's {current} kHz");
    }
}

/// Restores `state` into the vCPU `fd` (created, not yet run; its VM's
/// irqchip created). In this order: `KVM_SET_CPUID2` (first: KVM checks
/// MSRs and control registers against it), `KVM_SET_MP_STATE`,
/// `KVM_SET_REGS`, `KVM_SET_SREGS`, `KVM_SET_XSAVE` or `KVM_SET_FPU`,
/// `KVM_SET_XCRS`, `KVM_SET_DEBUGREGS`, `KVM_SET_LAPIC`, `KVM_SET_TSC_KHZ`
/// (only if it differs by more than 250 ppm), `KVM_SET_MSRS` with
/// `IA32_TSC_DEADLINE` alone in a last call (after the TSC and the APIC
/// timer mode it is relative to), `KVM_SET_VCPU_EVENTS` last.
///
/// # Errors
///
/// A field of the wrong size, too many CPUID entries, a KVM call failing,
/// an MSR refused.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    // Decode everything first: a garbled state fails before the vCPU is
    // half restored.
    let regs: kvm_regs = from_bytes("regs", &state.regs)?;
    let sregs: kvm_sregs = from_bytes("sregs", &state.sregs)?;
    let xcrs: Option<kvm_xcrs> = state.xcrs.as_deref().map(|b| from_bytes("xcrs", b)).transpose()?;
    let debugregs: kvm_debugregs = from_bytes("debugregs", &state.debugregs)?;
    let lapic: kvm_lapic_state = from_bytes("lapic", &state.lapic)?;
    let vcpu_events: kvm_vcpu_events = from_bytes("vcpu_events", &state.vcpu_events)?;
    enum Fpu {
        Xsave(Box<kvm_xsave>),
        Fpu(Box<kvm_fpu>),
    }
    let fpu = match &state.fpu {
        FpuState::Xsave(b) => Fpu::Xsave(Box::new(from_bytes("fpu (xsave)", b)?)),
        FpuState::Fpu(b) => Fpu::Fpu(Box::new(from_bytes("fpu", b)?)),
    };
    if state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(StateError::TooManyEntries {
            field: "cpuid",
            got: state.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        });
    }
    let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
    let cpuid = CpuId::from_entries(&entries).expect("checked against KVM_MAX_CPUID_ENTRIES");

    fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(kvm_error(format!("KVM_SET_MP_STATE({})", state.mp_state)))?;
    fd.set_regs(&regs).map_err(kvm_error("KVM_SET_REGS"))?;
    fd.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;
    match &fpu {
        // SAFETY: KVM reads the vCPU's XSAVE buffer size from the struct,
        // which is 4096 bytes (`kvm_xsave`) unless the process asked for
        // dynamically enabled XSTATE features for its guests
        // (`arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`), which memvisor never
        // does.
        Fpu::Xsave(xsave) => unsafe { fd.set_xsave(xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))?,
        Fpu::Fpu(fpu) => fd.set_fpu(fpu).map_err(kvm_error("KVM_SET_FPU"))?,
    }
    if let Some(xcrs) = &xcrs {
        fd.set_xcrs(xcrs).map_err(kvm_error("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&debugregs).map_err(kvm_error("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&lapic).map_err(kvm_error("KVM_SET_LAPIC"))?;
    if let Some(khz) = state.tsc_khz {
        restore_tsc_khz(fd, khz);
    }
    let (deadline, others): (Vec<_>, Vec<_>) = state
        .msrs
        .iter()
        .partition(|&&(index, _)| index == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, &others)?;
    write_msrs(fd, &deadline)?;
    fd.set_vcpu_events(&vcpu_events)
        .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn bytes_round_trip_and_a_wrong_length_names_the_field() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let bytes = to_bytes(&regs);
        assert_eq!(bytes.len(), size_of::<kvm_regs>());
        assert_eq!(from_bytes::<kvm_regs>("regs", &bytes).unwrap(), regs);
        for len in [0, bytes.len() - 1, bytes.len() + 1] {
            let mut wrong = bytes.clone();
            wrong.resize(len, 0);
            let err = from_bytes::<kvm_regs>("regs", &wrong).unwrap_err();
            assert!(
                matches!(err, StateError::Length { field: "regs", expected: 144, got } if got == len),
                "{err}"
            );
            assert!(err.to_string().contains("`regs`"), "{err}");
        }
        let xsave = kvm_xsave::default();
        assert_eq!(to_bytes(&xsave).len(), 4096);
        assert_eq!(to_bytes(&kvm_irqchip::default()).len(), 520);
    }

    #[test]
    fn cpuid_entries_keep_every_field_but_the_padding() {
        let raw = kvm_cpuid_entry2 {
            function: 0xd,
            index: 1,
            flags: 1,
            eax: 2,
            ebx: 3,
            ecx: 4,
            edx: 5,
            padding: [6, 7, 8],
        };
        let back = kvm_cpuid_entry2::from(&CpuidEntry::from(&raw));
        assert_eq!(back, kvm_cpuid_entry2 { padding: [0; 3], ..raw });
    }

    #[test]
    fn the_mtrrs_are_def_type_8_variable_pairs_and_11_fixed_ranges() {
        let mtrrs: Vec<u32> = mtrr_msrs().collect();
        assert_eq!(mtrrs.len(), 1 + 16 + 11);
        assert!(mtrrs.contains(&0x2ff) && mtrrs.contains(&0x20f) && mtrrs.contains(&0x26f));
    }

    /// Where KVM has no XSAVE, the FPU travels as `kvm_fpu`
    /// (`KVM_SET_FPU` of what `KVM_GET_FPU` saved); forced here, as this
    /// host has XSAVE.
    #[test]
    fn the_kvm_fpu_fallback_restores_what_kvm_get_fpu_saved() {
        use memvisor_machine::{Machine, MachineConfig, RamSpec};
        let machine = Machine::new(&MachineConfig {
            ram: vec![RamSpec { addr: 0, size: 2 << 20 }],
            ..Default::default()
        })
        .unwrap();
        let vm = || {
            let vm = crate::vm::Vm::new(&machine).unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
            vm.create_platform().unwrap();
            vm
        };
        let source = vm();
        let vcpu = source.create_vcpu(0).unwrap();
        let mut fpu = vcpu.fd().get_fpu().unwrap();
        fpu.fcw = 0x27f;
        fpu.xmm[3] = *b"memvisor-fpu-xmm";
        vcpu.fd().set_fpu(&fpu).unwrap();
        let mut state = vcpu.save_state(&[]).unwrap();
        let saved = to_bytes(&vcpu.fd().get_fpu().unwrap());
        state.fpu = FpuState::Fpu(saved.clone());

        let target = vm();
        let fresh = target.create_bare_vcpu(0).unwrap();
        assert_ne!(to_bytes(&fresh.fd().get_fpu().unwrap()), saved);
        fresh.restore_state(&state).unwrap();
        assert_eq!(to_bytes(&fresh.fd().get_fpu().unwrap()), saved);
    }

    proptest! {
        /// Whatever a file holds, decoding it never panics: the right
        /// length decodes (to the same bytes), any other is a length
        /// error.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            fn check<T: KvmPod>(bytes: &[u8]) {
                match from_bytes::<T>("field", bytes) {
                    Ok(value) => assert_eq!(to_bytes(&value), bytes),
                    Err(StateError::Length { got, .. }) => assert_eq!(got, bytes.len()),
                    Err(e) => panic!("{e}"),
                }
                // Any bytes of the right length are a value, bit for bit.
                let mut exact = bytes.to_vec();
                exact.resize(size_of::<T>(), 0xa5);
                assert_eq!(to_bytes(&from_bytes::<T>("field", &exact).unwrap()), exact);
            }
            check::<kvm_regs>(&bytes);
            check::<kvm_sregs>(&bytes);
            check::<kvm_fpu>(&bytes);
            check::<kvm_xcrs>(&bytes);
            check::<kvm_debugregs>(&bytes);
            check::<kvm_lapic_state>(&bytes);
            check::<kvm_vcpu_events>(&bytes);
            check::<kvm_pit_state2>(&bytes);
            check::<kvm_irqchip>(&bytes);
            check::<kvm_clock_data>(&bytes);
        }
    }
}
