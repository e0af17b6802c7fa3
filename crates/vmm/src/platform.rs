//! The glue between a [`VmmConfig`] and the platform crates: the ACPI
//! description of the machine, and loading the kernel into guest memory.

use std::fs::File;

use memvisor_acpi::{
    AcpiConfig, DEFAULT_OEM_ID, DEFAULT_OEM_TABLE_ID, GedConfig, IoApicConfig, PciHostConfig, PmConfig,
    SerialConfig as AcpiSerial, ViotConfig,
};
use memvisor_memory::map::GuestMemoryMap;
use vm_memory::{Bytes, GuestAddress};

use crate::config::{PciSlots, SerialConfig, VmmConfig};
use crate::runner::RunError;
use crate::x86::boot::{self, BootConfig, BootEntry};
use crate::x86::layout;

/// The machine as ACPI describes it: CPUs, the IOAPIC, the PCI host
/// bridge and its windows, the PM block, the power button, COM1 and, with a virtio-iommu,
/// the VIOT naming each endpoint behind it.
pub fn acpi_config(config: &VmmConfig, slots: &PciSlots, mmio64: (u64, u64)) -> AcpiConfig {
    let viot = slots.iommu.map(|iommu| ViotConfig {
        iommu_bdf: PciSlots::bdf(iommu),
        endpoints: config
            .iommu_endpoints()
            .into_iter()
            .map(|ep| (ep as u16, ep as u16))
            .collect(),
    });
    AcpiConfig {
        cpus: config.cpus,
        lapic_addr: layout::APIC_START as u32,
        ioapic: IoApicConfig {
            id: config.cpus,
            addr: layout::IOAPIC_START as u32,
            gsi_base: 0,
        },
        pci: PciHostConfig {
            segment: 0,
            ecam_base: layout::PCI_ECAM_START,
            bus_start: 0,
            bus_end: (layout::ECAM_BUSES - 1) as u8,
            mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            mmio64,
        },
        pm: PmConfig {
            sleep_control_port: layout::PM_PORT,
            sleep_status_port: layout::PM_PORT + 1,
            reset_port: layout::PM_PORT + 2,
            reset_value: layout::PM_RESET_VALUE,
            s5_sleep_type: layout::S5_SLEEP_TYPE,
        },
        serial: (!matches!(config.serial, SerialConfig::Off)).then_some(AcpiSerial {
            port: layout::COM1_PORT,
            irq: layout::COM1_IRQ,
        }),
        power_button: Some(GedConfig {
            gsi: layout::POWER_BUTTON_GSI,
        }),
        viot,
        oem_id: DEFAULT_OEM_ID,
        oem_table_id: DEFAULT_OEM_TABLE_ID,
    }
}

/// Where a PC starts in real mode after a reset, F000:FFF0.
pub const RESET_VECTOR: u64 = 0xf_fff0;

/// The code at the reset vector: a machine with no firmware has nothing
/// there, and Linux on a hardware-reduced ACPI machine reboots by trying
/// EFI, then jumping to this vector in real mode (`machine_real_restart`)
/// before it would try the FADT's reset register. So the vector asks the
/// PM block for the reset itself:
/// `mov dx, PM_PORT + 2; mov al, PM_RESET_VALUE; out dx, al; hlt; jmp $-1`.
pub fn reset_stub() -> [u8; 9] {
    let [lo, hi] = (layout::PM_PORT + 2).to_le_bytes();
    [0xba, lo, hi, 0xb0, layout::PM_RESET_VALUE, 0xee, 0xf4, 0xeb, 0xfd]
}

/// Writes [`reset_stub`] at [`RESET_VECTOR`] (inside the E820-reserved
/// BIOS area, which the kernel leaves alone).
pub fn write_reset_stub(memory: &GuestMemoryMap) -> Result<(), vm_memory::GuestMemoryError> {
    write_guest(memory, RESET_VECTOR, &reset_stub())
}

/// Writes `bytes` at guest-physical `addr`.
pub fn write_guest(memory: &GuestMemoryMap, addr: u64, bytes: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    memory.memory().write_slice(bytes, GuestAddress(addr))
}

/// Loads the kernel, initramfs and command line into boot RAM.
pub fn load_kernel(config: &VmmConfig, memory: &GuestMemoryMap, rsdp: u64) -> Result<BootEntry, RunError> {
    let open = |path: &std::path::Path, what: &str| {
        File::open(path).map_err(|e| RunError::Setup {
            what: format!("{what} {}", path.display()),
            source: Box::new(e),
        })
    };
    let mut kernel = open(&config.kernel, "kernel")?;
    let mut initrd = match &config.initrd {
        Some(path) => Some(open(path, "initramfs")?),
        None => None,
    };
    let ram = layout::boot_ram(config.memory);
    boot::load_kernel(
        memory,
        BootConfig {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline: &config.cmdline,
            ram: &ram,
            rsdp: Some(rsdp),
        },
    )
    .map_err(|e| RunError::Setup {
        what: format!("kernel {}", config.kernel.display()),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvm_bindings::kvm_segment;
    use memvisor_memory::{Backing, RamBlock};

    use super::*;
    use crate::vm::Vm;

    #[test]
    fn the_reset_vector_asks_the_pm_block_for_a_reset() {
        let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
        let memory = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
        write_reset_stub(&memory).unwrap();
        let vm = match Vm::with_memory(&memory) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIPPED the_reset_vector_asks_the_pm_block_for_a_reset: /dev/kvm is not usable ({e})");
                return;
            }
        };
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // Real mode at F000:FFF0, as after a reset (but below 1 MiB, where
        // the stub is, rather than at the top of 4 GiB).
        let mut sregs = vcpu.fd().get_sregs().unwrap();
        sregs.cs = kvm_segment {
            base: 0xf_0000,
            selector: 0xf000,
            ..sregs.cs
        };
        vcpu.fd().set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        vcpu.fd().set_regs(&regs).unwrap();
        let report = vcpu.run(16).unwrap();
        assert_eq!(report.port_writes.len(), 1, "{report:?}");
        assert_eq!(report.port_writes[0].port, layout::PM_PORT + 2);
        assert_eq!(report.port_writes[0].data, [layout::PM_RESET_VALUE]);
    }
}
