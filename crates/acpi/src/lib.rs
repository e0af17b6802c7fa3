//! ACPI tables for memvisor's x86-64 guests.
//!
//! [`build`] produces the tables an unmodified Linux guest needs on a
//! firmware-less, HW-reduced ACPI machine with the in-kernel KVM PIC, IOAPIC
//! and PIT: RSDP, XSDT, FADT, DSDT, MADT, MCFG and (optionally) VIOT.
//! Table building and AML come from the rust-vmm `acpi_tables` crate; raw
//! bytes are written only for what it lacks (MADT flags, interrupt source
//! overrides and NMI entries, the `IRQNoFlags` resource descriptor).
//!
//! The VMM writes every returned blob at its guest-physical address. The
//! RSDP is placed at `base`, so with `base` in `0xe_0000..0xf_ffff` Linux
//! finds it by its legacy BIOS-area scan.

#![deny(missing_docs)]

mod dsdt;
mod tables;
#[cfg(test)]
mod tests;

use thiserror::Error;

/// OEM ID memvisor puts in the RSDP and every table header (use it in
/// [`AcpiConfig::oem_id`] unless you have a reason not to).
pub const DEFAULT_OEM_ID: [u8; 6] = *b"MEMVSR";
/// OEM table ID memvisor puts in every table header (use it in
/// [`AcpiConfig::oem_table_id`] unless you have a reason not to).
pub const DEFAULT_OEM_TABLE_ID: [u8; 8] = *b"MEMVISOR";

/// Number of pins of KVM's in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: u32 = 24;

/// Most endpoint ranges a [`ViotConfig`] may list: VIOT node offsets are
/// 16-bit, and each range node takes 24 bytes after the 64 bytes of header
/// and IOMMU node.
pub const MAX_VIOT_RANGES: usize = (u16::MAX as usize - 64) / 24;

/// Alignment of every table after the RSDP (the RSDP itself must be 16-byte
/// aligned for the BIOS-area scan).
pub const TABLE_ALIGN: u64 = 16;

/// The IOAPIC as reported in the MADT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicConfig {
    /// IOAPIC id.
    pub id: u8,
    /// MMIO base address, normally `0xfec0_0000`.
    pub addr: u32,
    /// First GSI routed through this IOAPIC, normally 0.
    pub gsi_base: u32,
}

/// The PCIe host bridge (`\_SB.PCI0`) and its ECAM (MCFG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostConfig {
    /// PCI segment group.
    pub segment: u16,
    /// ECAM base address as defined by the MCFG: the address of bus 0's
    /// configuration space, even when `bus_start > 0`. Must be 1 MiB aligned.
    pub ecam_base: u64,
    /// First bus decoded by the host bridge.
    pub bus_start: u8,
    /// Last bus decoded by the host bridge (inclusive).
    pub bus_end: u8,
    /// 32-bit MMIO window `(start, size)`; must lie below 4 GiB, size > 0.
    pub mmio32: (u64, u64),
    /// 64-bit MMIO window `(start, size)`; a size of 0 omits the window.
    pub mmio64: (u64, u64),
}

/// HW-reduced ACPI power-management registers (all 8-bit System I/O ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmConfig {
    /// FADT `SLEEP_CONTROL_REG` port. Linux powers off by writing
    /// `(s5_sleep_type << 2) | 0x20` (SLP_TYP | SLP_EN) to it.
    pub sleep_control_port: u16,
    /// FADT `SLEEP_STATUS_REG` port. Linux writes 0x80 (WAK_STS) to it
    /// before entering a sleep state.
    pub sleep_status_port: u16,
    /// FADT `RESET_REG` port; Linux reboots by writing `reset_value` to it.
    pub reset_port: u16,
    /// FADT `RESET_VALUE`.
    pub reset_value: u8,
    /// SLP_TYP for S5 (3 bits, 0..=7), published as `\_S5_`.
    pub s5_sleep_type: u8,
}

/// A 16550 UART described as `\_SB.COM1` (PNP0501).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialConfig {
    /// First I/O port (8 ports are decoded), normally 0x3f8.
    pub port: u16,
    /// ISA IRQ (0..=15, edge, active high), normally 4.
    pub irq: u32,
}

/// A Generic Event Device (ACPI0013) signalling the power button.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedConfig {
    /// IOAPIC GSI of the GED interrupt (edge, active high, exclusive).
    pub gsi: u32,
}

/// A virtio-iommu on PCI segment 0 and the endpoints it translates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViotConfig {
    /// BDF (`bus << 8 | dev << 3 | fn`) of the virtio-iommu-pci device.
    pub iommu_bdf: u16,
    /// Inclusive BDF ranges `(first, last)` translated by the IOMMU. The
    /// endpoint ID the guest uses for a device is its BDF.
    pub endpoints: Vec<(u16, u16)>,
}

/// Everything [`build`] needs to describe the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (1..=255); LAPIC ids and processor UIDs are `0..cpus`.
    pub cpus: u8,
    /// Local APIC address, normally `0xfee0_0000`.
    pub lapic_addr: u32,
    /// The IOAPIC.
    pub ioapic: IoApicConfig,
    /// The PCIe host bridge.
    pub pci: PciHostConfig,
    /// Power-management (sleep/reset) registers.
    pub pm: PmConfig,
    /// COM1, if present.
    pub serial: Option<SerialConfig>,
    /// Power button GED, if present.
    pub power_button: Option<GedConfig>,
    /// VIOT (virtio-iommu topology), if present.
    pub viot: Option<ViotConfig>,
    /// OEM ID of the RSDP and every table (normally [`DEFAULT_OEM_ID`]).
    pub oem_id: [u8; 6],
    /// OEM table ID of every table (normally [`DEFAULT_OEM_TABLE_ID`]).
    pub oem_table_id: [u8; 8],
}

/// The built tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP (equal to `base`).
    pub rsdp_addr: u64,
    /// `(guest-physical address, bytes)` of every table, in increasing,
    /// non-overlapping address order, starting with the RSDP.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Why the tables could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AcpiError {
    /// `cpus` must be at least 1.
    #[error("invalid vCPU count {0}: must be at least 1")]
    InvalidCpuCount(u8),
    /// The PCI bus range is reversed.
    #[error("invalid PCI bus range {start}..={end}: end is below start")]
    InvalidBusRange {
        /// First bus.
        start: u8,
        /// Last bus.
        end: u8,
    },
    /// The ECAM base is not 1 MiB aligned or its range overflows.
    #[error("invalid ECAM base {0:#x}: must be 1 MiB aligned and cover the bus range")]
    InvalidEcamBase(u64),
    /// The 32-bit MMIO window is empty or does not fit below 4 GiB.
    #[error("invalid 32-bit MMIO window start {start:#x} size {size:#x}")]
    InvalidMmio32Window {
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// The 64-bit MMIO window overflows the address space.
    #[error("invalid 64-bit MMIO window start {start:#x} size {size:#x}")]
    InvalidMmio64Window {
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// A power-management register port is 0 (Linux treats 0 as absent).
    #[error("invalid {register} port {port:#x}")]
    InvalidPort {
        /// Which register.
        register: &'static str,
        /// The port.
        port: u16,
    },
    /// SLP_TYP is a 3-bit field.
    #[error("invalid S5 sleep type {0}: must be 0..=7")]
    InvalidSleepType(u8),
    /// The serial IRQ does not fit an ISA `IRQNoFlags` descriptor.
    #[error("invalid serial IRQ {0}: must be an ISA IRQ 0..=15")]
    InvalidSerialIrq(u32),
    /// The GED GSI is not routed by the IOAPIC.
    #[error("invalid power button GSI {0}: not an IOAPIC pin")]
    InvalidGedGsi(u32),
    /// A VIOT endpoint range is reversed.
    #[error("invalid VIOT endpoint range {first:#06x}..={last:#06x}: last is below first")]
    InvalidViotRange {
        /// First BDF.
        first: u16,
        /// Last BDF.
        last: u16,
    },
    /// More VIOT ranges than [`MAX_VIOT_RANGES`].
    #[error("too many VIOT endpoint ranges: {0} (at most {MAX_VIOT_RANGES})")]
    TooManyViotRanges(usize),
    /// The RSDP must be 16-byte aligned.
    #[error("invalid base address {0:#x}: must be 16-byte aligned")]
    UnalignedBase(u64),
    /// The tables need more room than `max_size`.
    #[error("ACPI tables need {needed:#x} bytes but max_size is {max_size:#x}")]
    TooLarge {
        /// Bytes needed from `base`.
        needed: u64,
        /// The limit.
        max_size: u64,
    },
    /// The table area would extend past the end of the address space.
    #[error("ACPI table area at base {0:#x} overflows the address space")]
    AddressOverflow(u64),
}

/// Builds the ACPI tables for `config`, placing the RSDP at `base` and the
/// other tables at increasing [`TABLE_ALIGN`]-aligned addresses after it,
/// all within `base..base + max_size`.
///
/// The XSDT lists the FADT, MADT, MCFG and (when configured) VIOT; the DSDT
/// is reachable only through the FADT's `X_DSDT`.
///
/// # Errors
/// [`AcpiError`] for an invalid configuration (naming the bad value) or when
/// the tables do not fit in `max_size`.
///
/// # Example
/// ```
/// use memvisor_acpi::*;
///
/// let config = AcpiConfig {
///     cpus: 2,
///     lapic_addr: 0xfee0_0000,
///     ioapic: IoApicConfig { id: 0, addr: 0xfec0_0000, gsi_base: 0 },
///     pci: PciHostConfig {
///         segment: 0,
///         ecam_base: 0xb000_0000,
///         bus_start: 0,
///         bus_end: 0,
///         mmio32: (0xc000_0000, 0x3000_0000),
///         mmio64: (0x100_0000_0000, 0x10_0000_0000),
///     },
///     pm: PmConfig {
///         sleep_control_port: 0x3c0,
///         sleep_status_port: 0x3c1,
///         reset_port: 0xcf9,
///         reset_value: 0x6,
///         s5_sleep_type: 5,
///     },
///     serial: Some(SerialConfig { port: 0x3f8, irq: 4 }),
///     power_button: Some(GedConfig { gsi: 9 }),
///     viot: None,
///     oem_id: DEFAULT_OEM_ID,
///     oem_table_id: DEFAULT_OEM_TABLE_ID,
/// };
/// let tables = build(&config, 0xe_0000, 0x2_0000)?;
/// assert_eq!(tables.rsdp_addr, 0xe_0000);
/// assert_eq!(&tables.blobs[0].1[..8], b"RSD PTR ");
/// assert!(matches!(build(&config, 0xe_0000, 64), Err(AcpiError::TooLarge { .. })));
/// # Ok::<(), AcpiError>(())
/// ```
pub fn build(config: &AcpiConfig, base: u64, max_size: u64) -> Result<AcpiTables, AcpiError> {
    validate(config)?;
    if base % TABLE_ALIGN != 0 {
        return Err(AcpiError::UnalignedBase(base));
    }

    // Address-independent tables first, so the layout knows their sizes.
    let dsdt = dsdt::build(config);
    let madt = tables::madt(config);
    let mcfg = tables::mcfg(config);
    let viot = config.viot.as_ref().map(|v| tables::viot(config, v));

    let mut layout = Layout { base, next: base };
    let rsdp_addr = layout.place(tables::RSDP_LEN)?;
    let xsdt_entries = 3 + u64::from(viot.is_some());
    let xsdt_addr = layout.place(tables::HEADER_LEN + 8 * xsdt_entries)?;
    let fadt_addr = layout.place(tables::FADT_LEN)?;
    let dsdt_addr = layout.place(len(&dsdt))?;
    let madt_addr = layout.place(len(&madt))?;
    let mcfg_addr = layout.place(len(&mcfg))?;
    let viot_addr = viot.as_ref().map(|v| layout.place(len(v))).transpose()?;

    let needed = layout.next - base;
    if needed > max_size {
        return Err(AcpiError::TooLarge { needed, max_size });
    }

    let mut xsdt_tables = vec![fadt_addr, madt_addr, mcfg_addr];
    xsdt_tables.extend(viot_addr);

    let mut blobs = vec![
        (rsdp_addr, tables::rsdp(config, xsdt_addr)),
        (xsdt_addr, tables::xsdt(config, &xsdt_tables)),
        (fadt_addr, tables::fadt(config, dsdt_addr)),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
        (mcfg_addr, mcfg),
    ];
    if let (Some(addr), Some(viot)) = (viot_addr, viot) {
        blobs.push((addr, viot));
    }
    Ok(AcpiTables { rsdp_addr, blobs })
}

fn len(table: &[u8]) -> u64 {
    table.len() as u64
}

/// Hands out aligned, increasing guest-physical addresses.
struct Layout {
    base: u64,
    next: u64,
}

impl Layout {
    fn place(&mut self, len: u64) -> Result<u64, AcpiError> {
        let overflow = AcpiError::AddressOverflow(self.base);
        let addr = self
            .next
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or(overflow.clone())?;
        self.next = addr.checked_add(len).ok_or(overflow)?;
        Ok(addr)
    }
}

fn validate(config: &AcpiConfig) -> Result<(), AcpiError> {
    if config.cpus == 0 {
        return Err(AcpiError::InvalidCpuCount(config.cpus));
    }

    let pci = &config.pci;
    if pci.bus_end < pci.bus_start {
        return Err(AcpiError::InvalidBusRange {
            start: pci.bus_start,
            end: pci.bus_end,
        });
    }
    // The MCFG base covers buses 0..=bus_end (1 MiB each).
    let ecam_end = (u64::from(pci.bus_end) + 1) << 20;
    if pci.ecam_base % (1 << 20) != 0 || pci.ecam_base.checked_add(ecam_end).is_none() {
        return Err(AcpiError::InvalidEcamBase(pci.ecam_base));
    }
    let (start, size) = pci.mmio32;
    if size == 0 || size > u64::from(u32::MAX) || start.saturating_add(size) > 1 << 32 {
        return Err(AcpiError::InvalidMmio32Window { start, size });
    }
    let (start, size) = pci.mmio64;
    if size != 0 && start.checked_add(size - 1).is_none() {
        return Err(AcpiError::InvalidMmio64Window { start, size });
    }

    let pm = &config.pm;
    for (register, port) in [
        ("sleep control", pm.sleep_control_port),
        ("sleep status", pm.sleep_status_port),
        ("reset", pm.reset_port),
    ] {
        if port == 0 {
            return Err(AcpiError::InvalidPort { register, port });
        }
    }
    if pm.s5_sleep_type > 7 {
        return Err(AcpiError::InvalidSleepType(pm.s5_sleep_type));
    }

    if let Some(serial) = &config.serial {
        if serial.irq > 15 {
            return Err(AcpiError::InvalidSerialIrq(serial.irq));
        }
    }
    if let Some(ged) = &config.power_button {
        let first = config.ioapic.gsi_base;
        if ged.gsi < first || ged.gsi - first >= IOAPIC_PINS {
            return Err(AcpiError::InvalidGedGsi(ged.gsi));
        }
    }
    if let Some(viot) = &config.viot {
        if viot.endpoints.len() > MAX_VIOT_RANGES {
            return Err(AcpiError::TooManyViotRanges(viot.endpoints.len()));
        }
        if let Some(&(first, last)) = viot.endpoints.iter().find(|(f, l)| l < f) {
            return Err(AcpiError::InvalidViotRange { first, last });
        }
    }
    Ok(())
}
