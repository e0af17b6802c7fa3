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
