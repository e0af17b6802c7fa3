//! The per-vCPU CPUID: KVM's supported CPUID with this vCPU's topology and
//! what the guest must not see. A pure function of its inputs.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};

use super::CpuError;

/// Leaf 1 ECX: TSC-deadline timer.
pub(crate) const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub(crate) const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (EBX[23:16] is valid).
pub(crate) const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX: APIC timer always running (ARAT).
pub(crate) const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 0x80000001 ECX: CmpLegacy (AMD).
pub(crate) const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0x80000001 ECX: SVM.
pub(crate) const EXT1_ECX_SVM: u32 = 1 << 2;

/// x2APIC topology level types of leaves 0xB and 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD or Hygon (same extended leaves).
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// `value` with bits `[lo, lo + width)` replaced by `field` (truncated to
/// the width).
fn set_bits(value: u32, lo: u32, width: u32, field: u32) -> u32 {
    let mask = if width >= 32 {
        u32::MAX
    } else {
        ((1u32 << width) - 1) << lo
    };
    (value & !mask) | ((field << lo) & mask)
}

/// Bits of an x2APIC id that number the cores of a package of `cpus`
/// (ceil(log2(cpus))).
pub(crate) fn core_bits(cpus: u8) -> u32 {
    u32::from(cpus).next_power_of_two().trailing_zeros()
}

/// The x2APIC topology subleaves of leaf 0xB or 0x1F: one thread per core,
/// `cpus` cores per package, then the invalid level that ends the list.
fn topology_leaf(function: u32, id: u8, cpus: u8) -> [kvm_cpuid_entry2; 3] {
    let apic_id = u32::from(id);
    let subleaf = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        subleaf(0, 0, 1, LEVEL_SMT),
        subleaf(1, core_bits(cpus), u32::from(cpus), LEVEL_CORE),
        subleaf(2, 0, 0, 0),
    ]
}

/// The CPUID of vCPU `id` (its initial APIC id, `0..cpus`) in a machine of
/// `cpus` single-threaded cores in one package, from `supported` (KVM's
/// supported CPUID, see [`supported_cpuid`](super::supported_cpuid)):
///
/// * leaf 1: `EBX[31:24]` APIC id, `EBX[23:16]` `cpus`, EDX HTT iff
///   `cpus > 1`, ECX hypervisor bit set (TSC-deadline kept as given);
/// * leaf 4 (Intel caches): `EAX[31:26]` cores per package − 1, `EAX[25:14]`
///   sharing: 1 for L1/L2, `cpus` for L3;
/// * leaf 6: only ARAT kept (no thermal or power management);
/// * leaf 0xA: zero (no PMU);
/// * leaves 0xB and (if KVM lists it) 0x1F: SMT level of 1 thread, core
///   level of `cpus` cores shifted by ceil(log2(cpus)), EDX the x2APIC id;
/// * leaf 0x80000001 ECX: SVM cleared; on AMD, CmpLegacy iff `cpus > 1`;
/// * AMD 0x80000008 ECX: NC = `cpus` − 1, ApicIdSize = ceil(log2(cpus));
///   0x8000001D: sharing like leaf 4; 0x8000001E: extended APIC id and core
///   id = `id`, one thread per core, node 0;
/// * everything else, the KVM paravirtual leaves 0x40000000.. included, as
///   KVM gave it.
///
/// # Errors
///
/// `cpus` is 0 or `id >= cpus`, or the result has more entries than KVM
/// takes.
pub fn vcpu_cpuid(supported: &CpuId, id: u8, cpus: u8) -> Result<CpuId, CpuError> {
    if cpus == 0 || id >= cpus {
        return Err(CpuError::Topology { id, cpus });
    }
    let input = supported.as_slice();
    let vendor = vendor(input);
    let max_basic = input.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let has_leaf_1f = input.iter().any(|e| e.function == 0x1f);
    let apic_id = u32::from(id);
    let count = u32::from(cpus);
    let shift = core_bits(cpus);

    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(input.len() + 6);
    for e in input {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = set_bits(e.ebx, 24, 8, apic_id);
                e.ebx = set_bits(e.ebx, 16, 8, count);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 | 0x8000_001d => {
                let amd_leaf = e.function == 0x8000_001d;
                if amd_leaf && vendor != Vendor::Amd {
                    out.push(e);
                    continue;
                }
                // Cache type 0: no more caches.
                if e.eax & 0x1f != 0 {
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { count - 1 } else { 0 };
                    e.eax = set_bits(e.eax, 14, 12, sharing);
                    if !amd_leaf {
                        e.eax = set_bits(e.eax, 26, 6, (count - 1).min(63));
                    }
                }
            }
            0x6 => {
                e.eax &= LEAF6_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Replaced below.
            0xb if max_basic >= 0xb => continue,
            0x1f if max_basic >= 0x1f => continue,
            0x8000_0001 => {
                e.ecx &= !EXT1_ECX_SVM;
                if vendor == Vendor::Amd {
                    if cpus > 1 {
                        e.ecx |= EXT1_ECX_CMP_LEGACY;
                    } else {
                        e.ecx &= !EXT1_ECX_CMP_LEGACY;
                    }
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = set_bits(e.ecx, 0, 8, count - 1);
                e.ecx = set_bits(e.ecx, 12, 4, shift);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                // Compute unit (core) id; threads per compute unit − 1 = 0.
                e.ebx = apic_id & 0xff;
                // Node 0, one node per processor.
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    if max_basic >= 0xb {
        out.extend(topology_leaf(0xb, id, cpus));
    }
    if max_basic >= 0x1f && has_leaf_1f {
        out.extend(topology_leaf(0x1f, id, cpus));
    }
    CpuId::from_entries(&out).map_err(|_| CpuError::TooManyCpuidEntries {
        entries: out.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })
}
