//! The DSDT: PCI host bridge, motherboard resources, COM1, power button GED
//! and `\_S5_`.
//!
//! In ASL terms:
//! ```text
//! Scope (\_SB) {
//!     Device (PCI0) {
//!         Name (_HID, EisaId ("PNP0A08"))  Name (_CID, EisaId ("PNP0A03"))
//!         Name (_SEG, segment)  Name (_UID, 0)  Name (_BBN, bus_start)
//!         Name (_CRS, ResourceTemplate () {
//!             WordBusNumber (bus_start..bus_end)  IO (Decode16, 0xcf8, 0xcf8, 1, 8)
//!             DWordMemory (mmio32, NonCacheable, ReadWrite)
//!             QWordMemory (mmio64, NonCacheable, ReadWrite)  // if size > 0
//!         })
//!     }
//!     Device (MRES) {  // reserves the ECAM so Linux trusts the MCFG
//!         Name (_HID, EisaId ("PNP0C02"))  Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, ecam, len) })
//!     }
//!     Device (COM1) {  // if configured
//!         Name (_HID, EisaId ("PNP0501"))  Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () { IO (Decode16, port, port, 1, 8)  IRQNoFlags () {irq} })
//!     }
//!     Device (GED_) {  // if configured
//!         Name (_HID, "ACPI0013")  Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () {
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}
//!         })
//!         Method (_EVT, 1) { If (Arg0 == gsi) { Notify (\_SB.PWRB, 0x80) } }
//!     }
//!     Device (PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, 0) }  // if configured
//! }
//! Name (\_S5_, Package () { s5_sleep_type, 0, 0, 0 })
//! ```

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method,
    Name, Notify, Package, Path, ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use crate::{AcpiConfig, GedConfig, PciHostConfig, SerialConfig};

/// DSDT revision 2: 64-bit AML integers.
const DSDT_REVISION: u8 = 2;

/// Notify value for a power button press (ACPI "S0 Power Button Pressed").
pub(crate) const NOTIFY_POWER_BUTTON: u8 = 0x80;

/// Already-serialized AML, so helpers can return owned bytes.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(object: &dyn Aml) -> Raw {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    Raw(bytes)
}

/// ASL `IRQNoFlags () {irq}`: the 2-byte small IRQ descriptor (edge, active
/// high, exclusive), which acpi_tables does not provide. `irq` is < 16.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item 0x4 (IRQ), length 2
        sink.word(1 << self.0);
    }
}

/// Builds the whole DSDT (header + AML), checksummed.
pub(crate) fn build(config: &AcpiConfig) -> Vec<u8> {
    let mut devices = vec![pci_host_bridge(&config.pci), motherboard_resources(&config.pci)];
    if let Some(serial) = &config.serial {
        devices.push(com1(serial));
    }
    if let Some(ged) = &config.power_button {
        devices.push(ged_device(ged));
        devices.push(power_button());
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let sb = Scope::new(Path::new("\\_SB_"), children);

    let s5_type = config.pm.s5_sleep_type;
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&s5_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, config.oem_id, config.oem_table_id, 1);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    let mut bytes = dsdt.as_slice().to_vec();
    crate::tables::seal(&mut bytes);
    bytes
}

fn pci_host_bridge(pci: &PciHostConfig) -> Raw {
    let (mmio32_start, mmio32_size) = pci.mmio32;
    // Validated: the window is non-empty and ends at or below 4 GiB.
    let mmio32_start = mmio32_start as u32;
    let mmio32_last = mmio32_start.wrapping_add((mmio32_size - 1) as u32);
    let bus = AddressSpace::<u16>::new_bus_number(pci.bus_start.into(), pci.bus_end.into());
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_start,
        mmio32_last,
        None,
    );
    let (mmio64_start, mmio64_size) = pci.mmio64;
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start.wrapping_add(mmio64_size.wrapping_sub(1)),
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&bus, &cf8, &mmio32];
    if mmio64_size != 0 {
        resources.push(&mmio64);
    }

    raw(&Device::new(
        Path::new("PCI0"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
            &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
            &Name::new(Path::new("_SEG"), &pci.segment),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_BBN"), &pci.bus_start),
            &Name::new(Path::new("_CRS"), &ResourceTemplate::new(resources)),
        ],
    ))
}

/// PNP0C02 reserving the ECAM of buses `bus_start..=bus_end`. Linux only
/// uses the MCFG region if it finds it "reserved in ACPI motherboard
/// resources". The MCFG base is bus 0's address, hence the bus offset.
fn motherboard_resources(pci: &PciHostConfig) -> Raw {
    let start = pci.ecam_base + (u64::from(pci.bus_start) << 20);
    let len = (u64::from(pci.bus_end - pci.bus_start) + 1) << 20;
    let fixed;
    let qword;
    let resource: &dyn Aml = match (u32::try_from(start), u32::try_from(len)) {
        (Ok(start32), Ok(len32)) if start + len <= 1 << 32 => {
            fixed = Memory32Fixed::new(true, start32, len32);
            &fixed
        }
        _ => {
            qword = AddressSpace::<u64>::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                start,
                start + len - 1,
                None,
            );
            &qword
        }
    };
    raw(&Device::new(
        Path::new("MRES"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![resource])),
        ],
    ))
}

fn com1(serial: &SerialConfig) -> Raw {
    // Validated: irq < 16.
    let irq = IrqNoFlags(serial.irq as u8);
    raw(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&aml::IO::new(serial.port, serial.port, 1, 8), &irq]),
            ),
        ],
    ))
}

/// GED whose single interrupt notifies the power button. Linux's acpi-ged
/// driver calls `_EVT` with the GSI as Arg0.
fn ged_device(ged: &GedConfig) -> Raw {
    let interrupt = Interrupt::new(true, true, false, false, ged.gsi);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb, &NOTIFY_POWER_BUTTON);
    let is_ours = Equal::new(&Arg(0), &ged.gsi);
    raw(&Device::new(
        Path::new("GED_"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&interrupt])),
            &Method::new(Path::new("_EVT"), 1, false, vec![&If::new(&is_ours, vec![&notify])]),
        ],
    ))
}

fn power_button() -> Raw {
    raw(&Device::new(
        Path::new("PWRB"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
        ],
    ))
}
