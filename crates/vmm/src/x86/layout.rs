//! The guest-physical layout of a memvisor x86-64 machine: where boot
//! structures, RAM, the PCI windows, the interrupt controllers and
//! hot-pluggable memory sit. One table for the boot loader, ACPI, the PCI
//! root and the memory map to agree on.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA          RAM (E820 type 1 up to EBDA_START)
//! 0x0000_0500  GDT, IDT                   (boot structures, in RAM)
//! 0x0000_6000  PVH start info + memmap
//! 0x0000_7000  Linux boot_params (zero page)
//! 0x0000_9000  boot page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA                       reserved
//! 0x000e_0000  ACPI tables (RSDP first)   reserved
//! 0x0010_0000  kernel, initrd, free RAM   RAM up to min(size, 3 GiB)
//! 0xc000_0000  PCI 32-bit MMIO window     (512 MiB)
//! 0xe000_0000  PCI ECAM                   (bus 0..ECAM_BUSES)
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  LAPIC
//! 4 GiB        RAM above 3 GiB, if any
//! aligned 1G   virtio-mem regions (device memory, not in E820)
//! aligned 1G   PCI 64-bit MMIO window
//! ```
//!
//! I/O ports: COM1 `0x3f8` (IRQ 4), i8042 `0x60`/`0x64` (reset),
//! PCI `0xcf8`/`0xcfc`, the ACPI PM block at [`PM_PORT`].

/// Start of the extended BIOS data area; RAM below it is guest RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// The GDT used to enter the kernel.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) IDT used to enter the kernel.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, then PDPT, then PD (identity map of the first 1 GiB).
pub const PML4_START: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Where the ACPI tables are written, RSDP first (inside the BIOS area the
/// kernel scans, and outside E820 RAM).
pub const ACPI_START: u64 = 0xe_0000;
/// Size reserved for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x2_0000;
/// First byte of RAM above the legacy hole: the kernel's load address.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// End of boot RAM below 4 GiB; more RAM continues at 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// The PCI 32-bit MMIO window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the PCI 32-bit MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Buses the ECAM covers (1 MiB each).
pub const ECAM_BUSES: u64 = 1;
/// Size of the ECAM window.
pub const PCI_ECAM_SIZE: u64 = ECAM_BUSES << 20;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Start of the 64-bit address space.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// Alignment of the device-memory area and of the 64-bit PCI window.
pub const DEVICE_MEMORY_ALIGN: u64 = 1 << 30;
/// Size of the PCI 64-bit MMIO window.
pub const PCI_MMIO64_SIZE: u64 = 16 << 30;

/// COM1's I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (ISA IRQ, equal to its GSI).
pub const COM1_IRQ: u32 = 4;
/// The ACPI power button's interrupt (a GED in the DSDT; edge, active high).
pub const POWER_BUTTON_GSI: u32 = 5;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command port (0xfe there resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The ACPI PM block: sleep control at `+0`, sleep status at `+1`, reset
/// register at `+2` (write [`PM_RESET_VALUE`]).
pub const PM_PORT: u16 = 0x600;
/// Size of the ACPI PM block.
pub const PM_PORT_LEN: u16 = 4;
/// The value written to the reset register to reset the machine.
pub const PM_RESET_VALUE: u8 = 0x1;
/// `SLP_TYP` for S5 (soft off) in the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// First GSI handed to MSI routes (0..24 are the IOAPIC's pins).
pub const MSI_GSI_START: u32 = 24;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;

/// Boot RAM of `size` bytes: `[0, min(size, 3 GiB))` and, for the rest,
/// `[4 GiB, 4 GiB + rest)`.
pub fn boot_ram(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((RAM_64BIT_START, size - low));
    }
    ranges
}

/// The first address of the device-memory area (virtio-mem regions) for
/// boot RAM of `size` bytes.
pub fn device_memory_start(size: u64) -> u64 {
    let end = boot_ram(size).last().map_or(0, |&(a, s)| a + s).max(RAM_64BIT_START);
    end.next_multiple_of(DEVICE_MEMORY_ALIGN)
}

// The windows do not overlap (checked when the crate compiles).
const _: () = {
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(ACPI_START + ACPI_SIZE <= HIGH_RAM_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ram_splits_at_the_32bit_gap() {
        assert_eq!(boot_ram(512 << 20), [(0, 512 << 20)]);
        assert_eq!(boot_ram(4 << 30), [(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(device_memory_start(512 << 20), 4 << 30);
        assert_eq!(device_memory_start((4 << 30) + 1), 6 << 30);
    }
}
