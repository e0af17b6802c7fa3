//! Loading an x86-64 Linux kernel (and initrd) into boot RAM, and the boot
//! structures its entry point expects.
//!
//! [`load_kernel`] reads the kernel file, recognises its format and
//! returns where the boot vCPU starts ([`BootEntry`]), which
//! [`configure_vcpu`](super::cpu::configure_vcpu) turns into registers:
//!
//! * **ELF vmlinux with a PVH note** (`XEN_ELFNOTE_PHYS32_ENTRY`): the PVH
//!   boot ABI. Segments are loaded at their physical addresses by
//!   linux-loader; `hvm_start_info` (version 1) goes to
//!   [`PVH_INFO_START`](layout::PVH_INFO_START), the memory map right after
//!   it, then the initrd's module entry. The vCPU enters the note's address
//!   in 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
//! * **ELF vmlinux without a PVH note**: loaded the same way and entered at
//!   its ELF entry point (`startup_64`, a physical address) with the Linux
//!   64-bit boot protocol, like the bzImage below, with a `boot_params`
//!   whose setup header is synthesised (`HdrS`, boot flag, 16 MiB
//!   alignment), as Firecracker does for a vmlinux.
//! * **bzImage** (`HdrS` at 0x202, boot protocol 2.12 or later with
//!   `XLF_KERNEL_64`): the protected-mode part is loaded at
//!   [`HIGH_RAM_START`](layout::HIGH_RAM_START) and entered at its 64-bit
//!   entry (load address + 0x200) in long mode, `rsi` = `boot_params` at
//!   [`ZERO_PAGE_START`](layout::ZERO_PAGE_START), with identity page tables
//!   at [`PML4_START`](layout::PML4_START) (PML4, PDPT, then one page
//!   directory of 2 MiB pages per GiB mapped: at least 1 GiB, and up to the
//!   end of the kernel, initrd and decompression buffer).
//!
//! Every format gets the command line at
//! [`CMDLINE_START`](layout::CMDLINE_START) and a GDT at
//! [`BOOT_GDT_START`](layout::BOOT_GDT_START) (null, code, data, TSS; see
//! [`boot_gdt`]) with an empty IDT at
//! [`BOOT_IDT_START`](layout::BOOT_IDT_START). The PVH ABI needs no GDT in
//! memory (the vCPU's segment caches suffice), but its descriptors match
//! the registers the vCPU gets, which keeps them consistent should the
//! guest reload a selector before installing its own table.
//!
//! # Memory map
//!
//! The same map goes to the PVH memmap and the E820 table, in address
//! order: RAM `[0, EBDA_START)`, reserved `[EBDA_START, 1 MiB)` (EBDA, the
//! ACPI tables at [`ACPI_START`](layout::ACPI_START), the BIOS area), RAM
//! from 1 MiB to the end of low RAM, every other boot RAM range (above
//! 4 GiB) as RAM, and the PCI ECAM window as reserved, so that Linux
//! accepts the MCFG table's MMCONFIG area (it checks that E820 reserves
//! it). virtio-mem regions are device memory and are not in the map.
//!
//! # Initrd
//!
//! Placed page-aligned at the highest address below the end of low RAM and
//! below the kernel's limit (`initrd_addr_max` + 1 for a bzImage, 4 GiB
//! otherwise), and above everything the kernel occupies (its segments, or
//! for a bzImage the loaded image and the buffer it decompresses into:
//! `init_size` bytes at `max(pref_address, 1 MiB aligned to
//! kernel_alignment)`). It is an error if it does not fit.
//!
//! # Hostile images
//!
//! Every write lands inside the boot RAM ranges given in [`BootConfig`],
//! checked before writing; ELF headers are checked (64-bit little-endian
//! x86-64 executable, program headers and segments inside the file,
//! segments at or above 1 MiB, not overlapping, entry points inside a
//! segment) before linux-loader reads them, and a bzImage's header and
//! payload size before it is loaded. Bad input is an error, never a panic.

mod elf;
#[cfg(test)]
pub(crate) mod tests;

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;

use linux_loader::loader::bootparam::{
    CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH, XLF_KERNEL_64, boot_e820_entry, boot_params, setup_header,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use memvisor_memory::map::{GuestMemoryMap, GuestMemoryMmap};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout;

/// A 4 KiB page.
const PAGE: u64 = 0x1000;
/// One GiB, the span of one page directory of 2 MiB pages.
const GIB: u64 = 1 << 30;
/// The most the boot page tables map: everything below 4 GiB.
const MAX_MAPPED: u64 = 4 * GIB;
/// The PDPT follows the PML4.
const PDPT_START: u64 = layout::PML4_START + PAGE;
/// Page directories follow the PDPT, one per GiB mapped.
const PD_START: u64 = PDPT_START + PAGE;
// The page tables (up to 4 page directories) end below the command line.
const _: () = assert!(PD_START + 4 * PAGE <= layout::CMDLINE_START);
/// Page-table entry bits: present, writable.
const PTE_TABLE: u64 = 0x3;
/// Page-directory entry bits: present, writable, 2 MiB page.
const PDE_LARGE: u64 = 0x83;

/// Offset of the setup header in a bzImage and in `boot_params`.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the `HdrS` magic.
const HDRS_OFFSET: usize = 0x202;
/// `HdrS`, little-endian.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector's `0xaa55` signature.
const BOOT_FLAG: u16 = 0xaa55;
/// Oldest boot protocol with `xloadflags` and a documented 64-bit entry.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// The 64-bit entry's offset in the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `type_of_loader` of a loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `heap_end_ptr`: the end of the setup heap, relative to the real-mode
/// code, minus 0x200 (unused by the 64-bit entry; the customary value).
const HEAP_END_PTR: u16 = 0xfe00;
/// The setup header's `kernel_alignment` given to a vmlinux (Firecracker's).
const VMLINUX_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// E820 / `hvm_memmap_table_entry` type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 / `hvm_memmap_table_entry` type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `hvm_start_info.magic`.
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// GDT selector of the boot code segment.
pub const GDT_CODE_SELECTOR: u16 = 0x08;
/// GDT selector of the boot data segment.
pub const GDT_DATA_SELECTOR: u16 = 0x10;
/// GDT selector of the boot TSS.
pub const GDT_TSS_SELECTOR: u16 = 0x18;
/// Entries of the boot GDT.
pub const GDT_ENTRIES: usize = 4;

/// The kernel formats [`load_kernel`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF vmlinux (entered through its PVH note if it has
    /// one, at its 64-bit ELF entry otherwise).
    Elf,
    /// A bzImage (Linux boot protocol 2.12 or later).
    BzImage,
}

impl KernelFormat {
    /// Bytes of the file's beginning [`detect`](Self::detect) needs at most.
    pub const HEAD_LEN: usize = SETUP_HEADER_OFFSET + size_of::<setup_header>();

    /// The format of a file beginning with `head`: the ELF magic at 0, or
    /// `HdrS` at 0x202. `None` if neither.
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.starts_with(b"\x7fELF") {
            Some(Self::Elf)
        } else if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(&HDRS_MAGIC.to_le_bytes()[..]) {
            Some(Self::BzImage)
        } else {
            None
        }
    }
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `start_info`.
    Pvh {
        /// The PVH entry point (physical).
        entry: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode on the boot page tables,
    /// `rsi` = `boot_params`.
    Linux64 {
        /// The 64-bit entry point (physical, identity-mapped).
        entry: u64,
        /// Guest-physical address of `boot_params` (the zero page).
        boot_params: u64,
    },
}

impl BootEntry {
    /// The first instruction's address.
    pub fn entry(&self) -> u64 {
        match *self {
            BootEntry::Pvh { entry, .. } | BootEntry::Linux64 { entry, .. } => entry,
        }
    }
}

/// What to boot, and the RAM to boot it in.
#[derive(Debug)]
pub struct BootConfig<'a> {
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel: &'a mut File,
    /// The initrd (initramfs), if any.
    pub initrd: Option<&'a mut File>,
    /// The kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Boot RAM as `(start, size)` ranges, already split around the 32-bit
    /// gap ([`layout::boot_ram`]): one range at 0, maybe one at 4 GiB. Must
    /// be plain (not hot-pluggable) RAM of the memory map.
    pub ram: &'a [(u64, u64)],
    /// Guest-physical address of the ACPI RSDP, if there are ACPI tables.
    pub rsdp: Option<u64>,
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The file is neither an ELF nor a bzImage.
    #[error(
        "{path} ({size} bytes) is not a bootable kernel: expected an ELF vmlinux with a PVH note \
         (XEN_ELFNOTE_PHYS32_ENTRY) or a bzImage"
    )]
    NotBootable {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Reading the kernel or initrd failed.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// An ELF kernel that cannot be loaded.
    #[error("ELF kernel {path}: {reason}")]
    BadElf {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bzImage that cannot be loaded.
    #[error("bzImage {path}: {reason}")]
    BadBzImage {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// linux-loader refused the kernel.
    #[error("loading kernel {path}: {source}")]
    Loader {
        /// The file.
        path: String,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
    /// The boot RAM ranges are unusable.
    #[error("boot RAM {ram}: {reason}")]
    BadRam {
        /// The ranges, as given.
        ram: String,
        /// What is wrong.
        reason: String,
    },
    /// Something would be written outside boot RAM.
    #[error("{what} at [{start:#x}, {end:#x}) is not inside boot RAM {ram}")]
    OutsideRam {
        /// What.
        what: String,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// The boot RAM ranges.
        ram: String,
    },
    /// The command line is longer than the kernel (or the layout) accepts.
    #[error("the kernel command line is {len} bytes, longer than the {max}-byte limit ({limit})")]
    CmdlineTooLong {
        /// Its length, without the terminating NUL.
        len: usize,
        /// The limit, without the terminating NUL.
        max: usize,
        /// Where the limit comes from.
        limit: &'static str,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line has a NUL byte at offset {offset}")]
    CmdlineNul {
        /// Offset of the first NUL.
        offset: usize,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error(
        "initrd {path} of {size:#x} bytes does not fit in RAM between the kernel's end {lowest:#x} and \
         {top:#x} (end of low RAM or the kernel's initrd limit)"
    )]
    InitrdTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// Lowest address it may start at (page-aligned end of the kernel).
        lowest: u64,
        /// Address it must end below.
        top: u64,
    },
    /// Writing into guest memory failed.
    #[error("writing {what} ({len:#x} bytes at {addr:#x}) into guest memory: {reason}")]
    Write {
        /// What.
        what: &'static str,
        /// Where.
        addr: u64,
        /// How many bytes.
        len: u64,
        /// vm-memory's error.
        reason: String,
    },
}

/// A file's name for messages: its path if `/proc` tells it.
fn file_name(file: &File) -> String {
    let fd = file.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("file descriptor {fd}"))
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Boot RAM, checked: sorted, non-overlapping `[start, end)` ranges, one at 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BootRam {
    ranges: Vec<(u64, u64)>,
}

impl BootRam {
    /// Checks `ram` (`(start, size)` ranges): non-empty, no wrap, no
    /// overlap, one range from 0 past 1 MiB and ending below the 32-bit
    /// gap.
    pub(crate) fn new(ram: &[(u64, u64)]) -> Result<Self, BootError> {
        let bad = |reason: String| BootError::BadRam {
            ram: describe(ram.iter().map(|&(s, l)| (s, s.saturating_add(l)))),
            reason,
        };
        let mut ranges = Vec::with_capacity(ram.len());
        for &(start, size) in ram {
            let end = start
                .checked_add(size)
                .filter(|_| size > 0)
                .ok_or_else(|| bad(format!("range at {start:#x} of {size:#x} bytes is empty or wraps")))?;
            ranges.push((start, end));
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(bad(format!(
                    "ranges [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap",
                    pair[0].0, pair[0].1, pair[1].0, pair[1].1
                )));
            }
        }
        let low_end = match ranges.first() {
            Some(&(0, end)) => end,
            _ => return Err(bad("no range starts at 0".into())),
        };
        if low_end <= layout::HIGH_RAM_START {
            return Err(bad(format!(
                "low RAM ends at {low_end:#x}, leaving no room for a kernel above {:#x}",
                layout::HIGH_RAM_START
            )));
        }
        if low_end > layout::MEM_32BIT_GAP_START {
            return Err(bad(format!(
                "low RAM ends at {low_end:#x}, inside the 32-bit gap at {:#x} (split it with layout::boot_ram)",
                layout::MEM_32BIT_GAP_START
            )));
        }
        Ok(Self { ranges })
    }

    /// End of the RAM range at 0.
    pub(crate) fn low_end(&self) -> u64 {
        self.ranges[0].1
    }

    /// True if `[start, start + len)` lies inside one range.
    pub(crate) fn contains(&self, start: u64, len: u64) -> bool {
        start
            .checked_add(len)
            .is_some_and(|end| self.ranges.iter().any(|&(s, e)| s <= start && end <= e))
    }

    fn check(&self, what: impl Into<String>, start: u64, len: u64) -> Result<(), BootError> {
        if self.contains(start, len) {
            Ok(())
        } else {
            Err(BootError::OutsideRam {
                what: what.into(),
                start,
                end: start.saturating_add(len),
                ram: self.to_string(),
            })
        }
    }

    /// Checks that every range is plain RAM of `mem` (no hole, no
    /// hot-pluggable region).
    fn check_map(&self, mem: &GuestMemoryMap) -> Result<(), BootError> {
        for &(start, end) in &self.ranges {
            let mut at = start;
            while at < end {
                let bad = |reason: String| BootError::BadRam {
                    ram: self.to_string(),
                    reason,
                };
                let region = mem
                    .region_at(at)
                    .ok_or_else(|| bad(format!("{at:#x} is not RAM of the memory map")))?;
                if region.manager().is_some() {
                    return Err(bad(format!(
                        "{at:#x} is in hot-pluggable region {}, not boot RAM",
                        region.range()
                    )));
                }
                at = region.range().end();
            }
        }
        Ok(())
    }

    /// The memory map given to the guest, in address order: see the
    /// [module documentation](self).
    pub(crate) fn memory_map(&self) -> Vec<MemoryMapEntry> {
        let mut map = Vec::new();
        for &(start, end) in &self.ranges {
            if start < layout::EBDA_START {
                map.push(MemoryMapEntry::ram(start, end.min(layout::EBDA_START)));
            }
            if end > layout::HIGH_RAM_START {
                map.push(MemoryMapEntry::ram(start.max(layout::HIGH_RAM_START), end));
            }
        }
        map.push(MemoryMapEntry {
            addr: layout::EBDA_START,
            size: layout::HIGH_RAM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        });
        map.push(MemoryMapEntry {
            addr: layout::PCI_ECAM_START,
            size: layout::PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        });
        map.sort_by_key(|e| e.addr);
        map
    }
}

fn describe(ranges: impl IntoIterator<Item = (u64, u64)>) -> String {
    let parts: Vec<String> = ranges.into_iter().map(|(s, e)| format!("[{s:#x}, {e:#x})")).collect();
    parts.join(", ")
}

impl std::fmt::Display for BootRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(self.ranges.iter().copied()))
    }
}

/// One entry of the guest's memory map (E820 / PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

impl MemoryMapEntry {
    fn ram(start: u64, end: u64) -> Self {
        Self {
            addr: start,
            size: end - start,
            kind: E820_RAM,
        }
    }
}

/// Writes into guest memory, inside boot RAM only.
struct Writer<'a> {
    mem: &'a GuestMemoryMmap,
    ram: &'a BootRam,
}

impl Writer<'_> {
    fn write(&self, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
        let len = bytes.len() as u64;
        self.ram.check(what, addr, len)?;
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| BootError::Write {
                what,
                addr,
                len,
                reason: e.to_string(),
            })
    }

    fn zero(&self, what: &'static str, addr: u64, len: u64) -> Result<(), BootError> {
        const CHUNK: u64 = 64 * 1024;
        self.ram.check(what, addr, len)?;
        let zeros = [0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(what, addr + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Reads `len` bytes of `file` (from its start) to `addr`.
    fn read_file(&self, what: &'static str, file: &mut File, addr: u64, len: u64) -> Result<(), BootError> {
        self.ram.check(what, addr, len)?;
        let read_err = |file: &File, source| BootError::Read {
            what,
            path: file_name(file),
            source,
        };
        if let Err(e) = file.rewind() {
            return Err(read_err(file, e));
        }
        let Ok(len_usize) = usize::try_from(len) else {
            let e = io::Error::other(format!("{len} bytes do not fit this host's address space"));
            return Err(read_err(file, e));
        };
        self.mem
            .read_exact_volatile_from(GuestAddress(addr), file, len_usize)
            .map_err(|e| BootError::Write {
                what,
                addr,
                len,
                reason: e.to_string(),
            })
    }
}

/// Reads up to `len` bytes of the file's beginning.
fn read_head(file: &mut File, len: usize) -> io::Result<Vec<u8>> {
    file.rewind()?;
    let mut head = Vec::with_capacity(len);
    file.by_ref().take(len as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// What the loaded kernel occupies and what its boot protocol needs.
struct LoadedKernel {
    /// End of everything the kernel occupies (exclusive).
    end: u64,
    /// The protocol-specific part.
    kind: LoadedKind,
}

enum LoadedKind {
    Pvh {
        entry: u64,
    },
    Linux64 {
        entry: u64,
        /// The setup header for `boot_params`.
        header: setup_header,
        /// Longest command line, without the NUL.
        cmdline_max: usize,
        /// Where the limit comes from.
        cmdline_limit: &'static str,
        /// The initrd must end at or below this.
        initrd_top: u64,
    },
}

/// Loads the kernel (and initrd) of `cfg` into `mem` and writes the boot
/// structures; see the [module documentation](self) for the formats and
/// the layout.
///
/// # Errors
///
/// A file that is not a bootable kernel, a malformed or truncated image,
/// an image or initrd that does not fit boot RAM, a command line that is
/// too long, bad boot RAM ranges, or a failed read or write.
pub fn load_kernel(mem: &GuestMemoryMap, cfg: BootConfig<'_>) -> Result<BootEntry, BootError> {
    let ram = BootRam::new(cfg.ram)?;
    ram.check_map(mem)?;
    if let Some(offset) = cfg.cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineNul { offset });
    }
    let writer = Writer {
        mem: mem.memory(),
        ram: &ram,
    };

    let path = file_name(cfg.kernel);
    let kernel_err = |source| BootError::Read {
        what: "kernel",
        path: path.clone(),
        source,
    };
    let size = cfg.kernel.metadata().map_err(kernel_err)?.len();
    let head = read_head(cfg.kernel, KernelFormat::HEAD_LEN).map_err(kernel_err)?;
    let format = KernelFormat::detect(&head).ok_or_else(|| BootError::NotBootable {
        path: path.clone(),
        size,
    })?;
    let kernel = match format {
        KernelFormat::Elf => load_elf(&writer, cfg.kernel, &path, size)?,
        KernelFormat::BzImage => load_bzimage(&writer, cfg.kernel, &path, size, &head)?,
    };

    let (cmdline_max, cmdline_limit) = match &kernel.kind {
        LoadedKind::Pvh { .. } => (layout::CMDLINE_MAX_SIZE - 1, "the command line area"),
        LoadedKind::Linux64 {
            cmdline_max,
            cmdline_limit,
            ..
        } => (*cmdline_max, *cmdline_limit),
    };
    write_cmdline(&writer, cfg.cmdline, cmdline_max, cmdline_limit)?;

    let initrd_top = match &kernel.kind {
        LoadedKind::Pvh { .. } => layout::RAM_64BIT_START,
        LoadedKind::Linux64 { initrd_top, .. } => *initrd_top,
    };
    let initrd = match cfg.initrd {
        Some(file) => Some(load_initrd(&writer, file, kernel.end, initrd_top)?),
        None => None,
    };

    let memory_map = ram.memory_map();
    let entry = match kernel.kind {
        LoadedKind::Pvh { entry } => {
            write_pvh_start_info(&writer, &memory_map, initrd, cfg.rsdp)?;
            BootEntry::Pvh {
                entry,
                start_info: layout::PVH_INFO_START,
            }
        }
        LoadedKind::Linux64 { entry, header, .. } => {
            let params = boot_params_for(header, cfg.cmdline.len(), &memory_map, initrd, cfg.rsdp)?;
            writer.write("boot_params", layout::ZERO_PAGE_START, params.as_slice())?;
            let mapped = [kernel.end, initrd.map_or(0, |(a, s)| a + s), GIB]
                .into_iter()
                .max()
                .unwrap_or(GIB);
            writer.write("boot page tables", layout::PML4_START, &page_tables(mapped))?;
            BootEntry::Linux64 {
                entry,
                boot_params: layout::ZERO_PAGE_START,
            }
        }
    };
    write_boot_gdt(&writer, &entry)?;
    log::info!(
        "loaded {format:?} kernel {path} ({size} bytes, up to {:#x}), entry {entry:x?}{}",
        kernel.end,
        initrd.map_or(String::new(), |(a, s)| format!(", initrd [{a:#x}, {:#x})", a + s))
    );
    Ok(entry)
}

/// Loads an ELF vmlinux: PVH if it has the note, Linux 64-bit otherwise.
fn load_elf(writer: &Writer<'_>, file: &mut File, path: &str, size: u64) -> Result<LoadedKernel, BootError> {
    let bad = |reason: String| BootError::BadElf {
        path: path.to_string(),
        reason,
    };
    let image = elf::inspect(file, size).map_err(bad)?;
    for s in &image.segments {
        if s.paddr < layout::HIGH_RAM_START {
            return Err(bad(format!(
                "segment at {:#x} lies below {:#x}, where the boot structures are",
                s.paddr,
                layout::HIGH_RAM_START
            )));
        }
        writer.ram.check("an ELF kernel segment", s.paddr, s.memsz)?;
    }
    // No high-memory check of `e_entry`: a PVH kernel's ELF entry may be
    // virtual; the segments were checked above, and the entry used is.
    let result = Elf::load(writer.mem, None, file, None).map_err(|source| BootError::Loader {
        path: path.to_string(),
        source,
    })?;
    for s in &image.segments {
        if s.memsz > s.filesz {
            writer.zero("an ELF kernel's bss", s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
    }
    let end = image.end();
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            let entry = addr.0;
            if !image.contains(entry) {
                return Err(bad(format!(
                    "PVH entry point {entry:#x} is outside the loaded segments"
                )));
            }
            Ok(LoadedKernel {
                end,
                kind: LoadedKind::Pvh { entry },
            })
        }
        _ => {
            if !image.contains(image.entry) {
                return Err(bad(format!(
                    "entry point {:#x} is outside the loaded segments",
                    image.entry
                )));
            }
            log::info!(
                "{path} has no PVH note: entering it at its 64-bit entry {:#x}",
                image.entry
            );
            let header = setup_header {
                boot_flag: BOOT_FLAG,
                header: HDRS_MAGIC,
                kernel_alignment: VMLINUX_KERNEL_ALIGNMENT,
                ..Default::default()
            };
            Ok(LoadedKernel {
                end,
                kind: LoadedKind::Linux64 {
                    entry: image.entry,
                    header,
                    cmdline_max: layout::CMDLINE_MAX_SIZE - 1,
                    cmdline_limit: "the command line area",
                    initrd_top: layout::RAM_64BIT_START,
                },
            })
        }
    }
}

/// The setup header as far as the image declares it (up to `0x202` plus
/// the byte at `0x201`), the rest zero.
fn declared_setup_header(head: &[u8]) -> setup_header {
    let mut header = setup_header::default();
    let declared_end = HDRS_OFFSET + usize::from(head.get(HDRS_OFFSET - 1).copied().unwrap_or(0));
    let end = declared_end
        .min(SETUP_HEADER_OFFSET + size_of::<setup_header>())
        .min(head.len());
    if end > SETUP_HEADER_OFFSET {
        header.as_mut_slice()[..end - SETUP_HEADER_OFFSET].copy_from_slice(&head[SETUP_HEADER_OFFSET..end]);
    }
    header
}

/// What a bzImage needs, from its header and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BzImageLayout {
    /// Bytes of the protected-mode kernel (loaded at `HIGH_RAM_START`).
    payload: u64,
    /// End of the loaded image and of its decompression buffer.
    end: u64,
}

fn bzimage_layout(header: &setup_header, size: u64) -> Result<BzImageLayout, String> {
    let version = header.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12 (no 64-bit entry point)",
            version >> 8,
            version & 0xff
        ));
    }
    let loadflags = header.loadflags;
    if loadflags & LOADED_HIGH == 0 {
        return Err(format!(
            "loadflags {loadflags:#x} lack LOADED_HIGH: a zImage, not a bzImage"
        ));
    }
    let xloadflags = header.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(format!(
            "xloadflags {xloadflags:#x} lack XLF_KERNEL_64: no 64-bit entry point"
        ));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload = size
        .checked_sub(setup_size)
        .filter(|&p| p > STARTUP_64_OFFSET)
        .ok_or_else(|| {
            format!(
                "the file of {size} bytes ends before the 64-bit entry ({setup_size} bytes of setup, then {STARTUP_64_OFFSET:#x})"
            )
        })?;
    let alignment = u64::from(header.kernel_alignment);
    let aligned_load = if alignment.is_power_of_two() {
        align_up(layout::HIGH_RAM_START, alignment).unwrap_or(layout::HIGH_RAM_START)
    } else {
        layout::HIGH_RAM_START
    };
    let pref_address = header.pref_address;
    let init_size = u64::from(header.init_size);
    let decompress_end = aligned_load
        .max(pref_address)
        .checked_add(init_size)
        .ok_or_else(|| format!("pref_address {pref_address:#x} + init_size {init_size:#x} overflows"))?;
    let end = (layout::HIGH_RAM_START + payload).max(decompress_end);
    Ok(BzImageLayout { payload, end })
}

fn load_bzimage(
    writer: &Writer<'_>,
    file: &mut File,
    path: &str,
    size: u64,
    head: &[u8],
) -> Result<LoadedKernel, BootError> {
    let bad = |reason: String| BootError::BadBzImage {
        path: path.to_string(),
        reason,
    };
    let mut header = declared_setup_header(head);
    let bz = bzimage_layout(&header, size).map_err(bad)?;
    writer
        .ram
        .check("the bzImage kernel", layout::HIGH_RAM_START, bz.payload)?;
    if bz.end > writer.ram.low_end() {
        return Err(bad(format!(
            "the kernel needs RAM up to {:#x} (image, then init_size {:#x} bytes to decompress into at \
             pref_address {:#x}), but low RAM ends at {:#x}",
            bz.end,
            { header.init_size },
            { header.pref_address },
            writer.ram.low_end()
        )));
    }
    let result: KernelLoaderResult = BzImage::load(writer.mem, Some(GuestAddress(layout::HIGH_RAM_START)), file, None)
        .map_err(|source| BootError::Loader {
            path: path.to_string(),
            source,
        })?;
    header.code32_start = layout::HIGH_RAM_START as u32;
    let cmdline_size = header.cmdline_size as usize;
    let (cmdline_max, cmdline_limit) = if cmdline_size < layout::CMDLINE_MAX_SIZE {
        (cmdline_size, "the bzImage's cmdline_size")
    } else {
        (layout::CMDLINE_MAX_SIZE - 1, "the command line area")
    };
    let initrd_top = u64::from(header.initrd_addr_max) + 1;
    Ok(LoadedKernel {
        end: bz.end.max(result.kernel_end),
        kind: LoadedKind::Linux64 {
            entry: layout::HIGH_RAM_START + STARTUP_64_OFFSET,
            header,
            cmdline_max,
            cmdline_limit,
            initrd_top,
        },
    })
}

fn write_cmdline(writer: &Writer<'_>, cmdline: &str, max: usize, limit: &'static str) -> Result<(), BootError> {
    let max = max.min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    writer.write("the kernel command line", layout::CMDLINE_START, &bytes)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible
/// below `min(low_end, top)`, at or above `kernel_end` (page-aligned).
fn initrd_address(size: u64, kernel_end: u64, low_end: u64, top: u64) -> Result<u64, (u64, u64)> {
    let top = low_end.min(top);
    let lowest = align_up(kernel_end, PAGE).unwrap_or(u64::MAX);
    top.checked_sub(size)
        .map(|a| a & !(PAGE - 1))
        .filter(|&a| a >= lowest)
        .ok_or((lowest, top))
}

fn load_initrd(writer: &Writer<'_>, file: &mut File, kernel_end: u64, top: u64) -> Result<(u64, u64), BootError> {
    let path = file_name(file);
    let size = file
        .metadata()
        .map_err(|source| BootError::Read {
            what: "initrd",
            path: path.clone(),
            source,
        })?
        .len();
    let addr = initrd_address(size, kernel_end, writer.ram.low_end(), top).map_err(|(lowest, top)| {
        BootError::InitrdTooLarge {
            path,
            size,
            lowest,
            top,
        }
    })?;
    writer.read_file("initrd", file, addr, size)?;
    Ok((addr, size))
}

fn write_pvh_start_info(
    writer: &Writer<'_>,
    memory_map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let memmap_at = layout::PVH_INFO_START + size_of::<hvm_start_info>() as u64;
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let memmap_len = (memmap.len() * size_of::<hvm_memmap_table_entry>()) as u64;
    let modlist_at = memmap_at + memmap_len;
    let end = modlist_at + size_of::<hvm_modlist_entry>() as u64;
    if end > layout::ZERO_PAGE_START {
        return Err(BootError::OutsideRam {
            what: format!("the PVH start info with {} memory map entries", memmap.len()),
            start: layout::PVH_INFO_START,
            end,
            ram: format!("area [{:#x}, {:#x})", layout::PVH_INFO_START, layout::ZERO_PAGE_START),
        });
    }
    let info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_at } else { 0 },
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: memmap_at,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    writer.write("the PVH start info", layout::PVH_INFO_START, info.as_slice())?;
    let mut table = Vec::with_capacity(memmap_len as usize);
    for e in &memmap {
        table.extend_from_slice(e.as_slice());
    }
    writer.write("the PVH memory map", memmap_at, &table)?;
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        writer.write("the PVH module list", modlist_at, module.as_slice())?;
    }
    Ok(())
}

/// `boot_params` for the 64-bit entry: the image's setup header with the
/// loader's fields filled in, the E820 table and the ACPI RSDP.
fn boot_params_for(
    mut header: setup_header,
    cmdline_len: usize,
    memory_map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<boot_params, BootError> {
    header.type_of_loader = LOADER_TYPE_UNDEFINED;
    header.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    header.heap_end_ptr = HEAP_END_PTR;
    header.cmd_line_ptr = layout::CMDLINE_START as u32;
    debug_assert!(cmdline_len < layout::CMDLINE_MAX_SIZE);
    // Below 4 GiB by construction: the initrd ends below low RAM's end.
    let (image, size) = initrd.unwrap_or((0, 0));
    header.ramdisk_image = image as u32;
    header.ramdisk_size = size as u32;
    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if memory_map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::OutsideRam {
            what: format!("an E820 table of {} entries", memory_map.len()),
            start: layout::ZERO_PAGE_START,
            end: layout::ZERO_PAGE_START + PAGE,
            ram: format!("the zero page's {E820_MAX_ENTRIES_ZEROPAGE} entries"),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = memory_map.len() as u8;
    Ok(params)
}

/// The boot page tables, to be written at `PML4_START`: PML4, PDPT, then
/// page directories of 2 MiB pages identity-mapping `[0, end)` rounded up
/// to a GiB (at least 1 GiB, at most 4 GiB).
pub(crate) fn page_tables(end: u64) -> Vec<u8> {
    let gibs = end.clamp(GIB, MAX_MAPPED).div_ceil(GIB);
    let mut bytes = vec![0u8; ((2 + gibs) * PAGE) as usize];
    let mut put = |at: u64, value: u64| {
        let offset = (at - layout::PML4_START) as usize;
        bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(layout::PML4_START, PDPT_START | PTE_TABLE);
    for gib in 0..gibs {
        let pd = PD_START + gib * PAGE;
        put(PDPT_START + gib * 8, pd | PTE_TABLE);
        for i in 0..512 {
            put(pd + i * 8, (gib * GIB + (i << 21)) | PDE_LARGE);
        }
    }
    bytes
}

/// A GDT descriptor: `flags` is the access byte (bits 0..8) and the flags
/// nibble (bits 12..16), as in Firecracker and Cloud Hypervisor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT for `entry`: null, code ([`GDT_CODE_SELECTOR`]), data
/// ([`GDT_DATA_SELECTOR`]), TSS ([`GDT_TSS_SELECTOR`]). PVH: flat 32-bit
/// code and data, a 32-bit busy TSS of 0x68 bytes (the PVH ABI's `tr`).
/// Linux64: flat 64-bit code, flat data, a busy TSS (Firecracker's).
pub fn boot_gdt(entry: &BootEntry) -> [u64; GDT_ENTRIES] {
    match entry {
        BootEntry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        BootEntry::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

fn write_boot_gdt(writer: &Writer<'_>, entry: &BootEntry) -> Result<(), BootError> {
    let gdt: Vec<u8> = boot_gdt(entry).iter().flat_map(|e| e.to_le_bytes()).collect();
    writer.write("the boot GDT", layout::BOOT_GDT_START, &gdt)?;
    writer.write("the boot IDT", layout::BOOT_IDT_START, &0u64.to_le_bytes())
}
