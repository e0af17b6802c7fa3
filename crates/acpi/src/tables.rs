//! The static tables: RSDP, XSDT, FADT, MADT, MCFG and VIOT.

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::viot::{PciDevice, PciRange, VIOT, VirtIoPciIommu};
use acpi_tables::xsdt::XSDT;

use crate::{AcpiConfig, ViotConfig};

/// Length of the standard table header.
pub(crate) const HEADER_LEN: u64 = 36;
/// Length of an ACPI 2.0+ RSDP.
pub(crate) const RSDP_LEN: u64 = 36;
/// Length of an ACPI 6.x FADT (up to the hypervisor vendor identity).
pub(crate) const FADT_LEN: u64 = 276;

/// OEM revision of every table.
const OEM_REVISION: u32 = 1;

/// FADT `IAPC_BOOT_ARCH`: VGA Not Present (bit 2).
pub(crate) const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// FADT `IAPC_BOOT_ARCH`: CMOS RTC Not Present (bit 5).
pub(crate) const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT flags: PCAT_COMPAT (a dual 8259 is present).
pub(crate) const MADT_PCAT_COMPAT: u32 = 1;
/// MADT Interrupt Source Override flags: polarity and trigger conform to the
/// bus (ISA: active high, edge), exactly as QEMU describes IRQ0 -> GSI 2.
pub(crate) const MPS_INTI_CONFORMING: u16 = 0;
/// MADT Local APIC NMI processor UID meaning "all processors".
pub(crate) const ALL_PROCESSORS: u8 = 0xff;

fn serialize(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Rewrites the header length (offset 4) and checksum (offset 9) of a table
/// after raw bytes were patched in or appended.
pub(crate) fn seal(table: &mut [u8]) {
    let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
    table[4..8].copy_from_slice(&len.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// RSDP revision 2 pointing at the XSDT (the 32-bit RSDT pointer is 0).
pub(crate) fn rsdp(config: &AcpiConfig, xsdt_addr: u64) -> Vec<u8> {
    serialize(&Rsdp::new(config.oem_id, xsdt_addr))
}

/// XSDT listing `tables` in order.
pub(crate) fn xsdt(config: &AcpiConfig, tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(config.oem_id, config.oem_table_id, OEM_REVISION);
    for &addr in tables {
        xsdt.add_entry(addr);
    }
    let mut bytes = serialize(&xsdt);
    seal(&mut bytes);
    bytes
}

/// An 8-bit, byte-access System I/O register at `port`.
fn io_port_u8(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port.into())
}

/// FADT revision 6.5 for a HW-reduced platform, pointing at the DSDT via
/// `X_DSDT` only.
pub(crate) fn fadt(config: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(config.oem_id, config.oem_table_id, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: the power button is the PNP0C0C device
        // behind the GED. Without these Linux would register LNXPWRBN and
        // LNXSLPBN fixed buttons that can never fire.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = io_port_u8(config.pm.reset_port);
    fadt.reset_value = config.pm.reset_value;
    fadt.sleep_control_reg = io_port_u8(config.pm.sleep_control_port);
    fadt.sleep_status_reg = io_port_u8(config.pm.sleep_status_port);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"MEMVISOR").into();
    let mut bytes = serialize(&fadt.finalize());
    debug_assert_eq!(bytes.len() as u64, FADT_LEN);
    seal(&mut bytes);
    bytes
}

/// MADT Interrupt Source Override (type 2) for an ISA IRQ.
fn interrupt_source_override(isa_irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut entry = vec![2, 10, 0 /* bus: ISA */, isa_irq];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&flags.to_le_bytes());
    entry
}

/// MADT Local APIC NMI (type 4).
fn local_apic_nmi(processor_uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut entry = vec![4, 6, processor_uid];
    entry.extend_from_slice(&flags.to_le_bytes());
    entry.push(lint);
    entry
}

/// MADT: LAPIC address, PCAT_COMPAT, one enabled LAPIC per vCPU, the IOAPIC,
/// ISA IRQ0 -> GSI 2 and LINT1 NMI on all processors.
pub(crate) fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        config.oem_id,
        config.oem_table_id,
        OEM_REVISION,
        LocalInterruptController::Address(config.lapic_addr),
    );
    for cpu in 0..config.cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    let ioapic = &config.ioapic;
    madt.add_structure(IoApic::new(ioapic.id, ioapic.addr, ioapic.gsi_base));

    let mut bytes = serialize(&madt);
    // acpi_tables has no setter for the MADT flags nor entry types 2 and 4.
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    bytes.extend(interrupt_source_override(0, 2, MPS_INTI_CONFORMING));
    bytes.extend(local_apic_nmi(ALL_PROCESSORS, MPS_INTI_CONFORMING, 1));
    seal(&mut bytes);
    bytes
}

/// MCFG with the single ECAM allocation of the host bridge.
pub(crate) fn mcfg(config: &AcpiConfig) -> Vec<u8> {
    let pci = &config.pci;
    let mut mcfg = MCFG::new(config.oem_id, config.oem_table_id, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, pci.segment, pci.bus_start, pci.bus_end);
    let mut bytes = serialize(&mcfg);
    seal(&mut bytes);
    bytes
}

/// Splits a BDF into the crate's `PciDevice` on segment 0 (the device and
/// function fields are masked, so `PciDevice::new` cannot panic).
fn pci_device(bdf: u16) -> PciDevice {
    let [bus, devfn] = bdf.to_be_bytes();
    PciDevice::new(0, bus, devfn >> 3, devfn & 7)
}

/// VIOT: the virtio-iommu-pci node first (offset 48), then one PCI range
/// node per endpoint range, each pointing back at the IOMMU node. The range
/// nodes' `endpoint_start` equals their first BDF, so endpoint ID == BDF.
pub(crate) fn viot(config: &AcpiConfig, viot_config: &ViotConfig) -> Vec<u8> {
    let mut viot = VIOT::new(config.oem_id, config.oem_table_id, OEM_REVISION);
    let iommu = viot.add_virtio_pci_iommu(VirtIoPciIommu::new(pci_device(viot_config.iommu_bdf)));
    for &(first, last) in &viot_config.endpoints {
        viot.add_pci_range(PciRange::new(pci_device(first), pci_device(last), &iommu));
    }
    let mut bytes = serialize(&viot);
    // The crate's incremental checksum assumes fewer than 256 nodes.
    seal(&mut bytes);
    bytes
}
