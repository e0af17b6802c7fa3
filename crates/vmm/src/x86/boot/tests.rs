//! Tests of the kernel loader on images built here: a tiny ELF with (or
//! without) a PVH note and a minimal bzImage.

use std::fs::OpenOptions;
use std::io::{Seek, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memvisor_memory::{Backing, RamBlock};

use super::*;

pub(crate) const MIB: u64 = 1 << 20;

/// Guest memory of `size` bytes at 0, and its boot RAM ranges.
pub(crate) fn guest(size: u64) -> (GuestMemoryMap, Vec<(u64, u64)>) {
    let block = Arc::new(RamBlock::new("boot-test", size, Backing::Memfd).unwrap());
    let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
    (map, layout::boot_ram(size))
}

/// An unlinked temporary file holding `bytes`, positioned at its start.
pub(crate) fn file(bytes: &[u8]) -> File {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "memvisor-boot-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

pub(crate) fn read_bytes(mem: &GuestMemoryMap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.memory().read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

pub(crate) fn read_u8(mem: &GuestMemoryMap, addr: u64) -> u8 {
    read_bytes(mem, addr, 1)[0]
}

pub(crate) fn read_u16(mem: &GuestMemoryMap, addr: u64) -> u16 {
    u16::from_le_bytes(read_bytes(mem, addr, 2).try_into().unwrap())
}

pub(crate) fn read_u32(mem: &GuestMemoryMap, addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes(mem, addr, 4).try_into().unwrap())
}

pub(crate) fn read_u64(mem: &GuestMemoryMap, addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes(mem, addr, 8).try_into().unwrap())
}

/// A tiny ELF64 x86-64 executable: one `PT_LOAD` of `code` at `load` with
/// `bss` more bytes of memory, entry `load + entry_offset`, and a
/// `PT_NOTE` holding the Xen PVH entry note (`load`) if `pvh`, or another
/// Xen note otherwise.
pub(crate) fn tiny_elf(code: &[u8], load: u64, bss: u64, entry_offset: u64, pvh: bool) -> Vec<u8> {
    const NOTE_AT: usize = 64 + 2 * 56;
    const NOTE_LEN: usize = 12 + 4 + 8;
    const CODE_AT: usize = NOTE_AT + NOTE_LEN;
    let mut b = vec![0u8; CODE_AT];
    let put16 = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    put16(&mut b, 16, 2); // ET_EXEC
    put16(&mut b, 18, 62); // EM_X86_64
    put32(&mut b, 20, 1);
    put64(&mut b, 24, load + entry_offset);
    put64(&mut b, 32, 64); // e_phoff
    put16(&mut b, 52, 64); // e_ehsize
    put16(&mut b, 54, 56); // e_phentsize
    put16(&mut b, 56, 2); // e_phnum
    // PT_LOAD, R+X.
    let ph = 64;
    put32(&mut b, ph, 1);
    put32(&mut b, ph + 4, 5);
    put64(&mut b, ph + 8, CODE_AT as u64);
    put64(&mut b, ph + 16, load);
    put64(&mut b, ph + 24, load);
    put64(&mut b, ph + 32, code.len() as u64);
    put64(&mut b, ph + 40, code.len() as u64 + bss);
    put64(&mut b, ph + 48, 0x1000);
    // PT_NOTE.
    let ph = 64 + 56;
    put32(&mut b, ph, 4);
    put32(&mut b, ph + 4, 4);
    put64(&mut b, ph + 8, NOTE_AT as u64);
    put64(&mut b, ph + 32, NOTE_LEN as u64);
    put64(&mut b, ph + 40, NOTE_LEN as u64);
    put64(&mut b, ph + 48, 4);
    // The note: "Xen", XEN_ELFNOTE_PHYS32_ENTRY (18) with an 8-byte
    // descriptor like Linux's, or XEN_ELFNOTE_ENTRY (1).
    put32(&mut b, NOTE_AT, 4);
    put32(&mut b, NOTE_AT + 4, 8);
    put32(&mut b, NOTE_AT + 8, if pvh { 18 } else { 1 });
    b[NOTE_AT + 12..NOTE_AT + 16].copy_from_slice(b"Xen\0");
    put64(&mut b, NOTE_AT + 16, load);
    b.extend_from_slice(code);
    b
}

/// The fields of a minimal bzImage's setup header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FakeBzImage {
    pub version: u16,
    pub setup_sects: u8,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub pref_address: u64,
    pub init_size: u32,
}

impl Default for FakeBzImage {
    fn default() -> Self {
        Self {
            version: 0x020f,
            setup_sects: 1,
            loadflags: 0x01,
            xloadflags: 0x01,
            cmdline_size: 0x7ff,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x40_0000,
        }
    }
}

impl FakeBzImage {
    /// The image: `setup_sects + 1` sectors of setup with the header, then
    /// `payload` (the protected-mode kernel; its 64-bit entry at 0x200).
    pub(crate) fn build(&self, payload: &[u8]) -> Vec<u8> {
        let setup_len = (usize::from(self.setup_sects.max(1)) + 1) * 512;
        let mut b = vec![0u8; setup_len];
        b[0x1f1] = self.setup_sects;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        // jmp short over the header, whose end it gives: 0x202 + 0x6a = 0x26c.
        b[0x200] = 0xeb;
        b[0x201] = 0x6a;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&self.version.to_le_bytes());
        b[0x211] = self.loadflags;
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&self.initrd_addr_max.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&self.kernel_alignment.to_le_bytes());
        b[0x234] = 1; // relocatable
        b[0x236..0x238].copy_from_slice(&self.xloadflags.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&self.cmdline_size.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&self.pref_address.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&self.init_size.to_le_bytes());
        // Setup code after the header, which must not reach boot_params.
        b[0x26c..0x270].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b.extend_from_slice(payload);
        b
    }
}

/// A payload of `len` bytes with a recognisable pattern.
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn load(
    mem: &GuestMemoryMap,
    ram: &[(u64, u64)],
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let mut kernel = file(kernel);
    let mut initrd = initrd.map(file);
    load_kernel(
        mem,
        BootConfig {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline,
            ram,
            rsdp: Some(layout::ACPI_START),
        },
    )
}

/// The memory map of 64 MiB of boot RAM.
fn map_of_64m() -> Vec<(u64, u64, u32)> {
    vec![
        (0, layout::EBDA_START, E820_RAM),
        (layout::EBDA_START, MIB - layout::EBDA_START, E820_RESERVED),
        (MIB, 63 * MIB, E820_RAM),
        (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820_RESERVED),
    ]
}

#[test]
fn detects_formats_from_the_magic() {
    assert_eq!(KernelFormat::detect(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
    assert_eq!(
        KernelFormat::detect(&FakeBzImage::default().build(&[0; 1024])),
        Some(KernelFormat::BzImage)
    );
    assert_eq!(KernelFormat::detect(b""), None);
    assert_eq!(KernelFormat::detect(&[0u8; 0x205]), None);
    let mut almost = vec![0u8; 0x300];
    almost[0x202..0x206].copy_from_slice(b"HdrZ");
    assert_eq!(KernelFormat::detect(&almost), None);
}

#[test]
fn pvh_elf_is_loaded_with_start_info_memmap_and_initrd() {
    let (mem, ram) = guest(64 * MIB);
    let load_at = 2 * MIB;
    let code = pattern(300, 7);
    // Garbage where the bss will be: the loader must clear it.
    mem.memory()
        .write_slice(&[0xffu8; 0x2000], GuestAddress(load_at + 300))
        .unwrap();
    let initrd = pattern(5000, 99);
    let elf = tiny_elf(&code, load_at, 0x2000, 0x40, true);
    let entry = load(&mem, &ram, &elf, Some(&initrd), "console=ttyS0 quiet").unwrap();
    assert_eq!(
        entry,
        BootEntry::Pvh {
            entry: load_at,
            start_info: layout::PVH_INFO_START
        }
    );
    assert_eq!(read_bytes(&mem, load_at, code.len()), code);
    assert!(read_bytes(&mem, load_at + 300, 0x2000).iter().all(|&b| b == 0));

    // hvm_start_info, field by field at the ABI's offsets.
    let si = layout::PVH_INFO_START;
    assert_eq!(read_u32(&mem, si), 0x336e_c578);
    assert_eq!(read_u32(&mem, si + 4), 1, "version");
    assert_eq!(read_u32(&mem, si + 8), 0, "flags");
    assert_eq!(read_u32(&mem, si + 12), 1, "nr_modules");
    let modlist = read_u64(&mem, si + 16);
    assert_eq!(read_u64(&mem, si + 24), layout::CMDLINE_START);
    assert_eq!(read_u64(&mem, si + 32), layout::ACPI_START, "rsdp_paddr");
    let memmap = read_u64(&mem, si + 40);
    assert_eq!(memmap, si + 56, "the memmap follows the start info");
    assert_eq!(read_u32(&mem, si + 48), 4, "memmap_entries");
    let entries: Vec<(u64, u64, u32)> = (0..4)
        .map(|i| {
            let e = memmap + i * 24;
            (read_u64(&mem, e), read_u64(&mem, e + 8), read_u32(&mem, e + 16))
        })
        .collect();
    assert_eq!(entries, map_of_64m());

    // The initrd module: page-aligned, as high as it goes, above the kernel.
    assert_eq!(modlist, memmap + 4 * 24);
    let (paddr, size) = (read_u64(&mem, modlist), read_u64(&mem, modlist + 8));
    assert_eq!(size, 5000);
    assert_eq!(paddr % PAGE, 0);
    assert_eq!(paddr, (64 * MIB - 5000) & !(PAGE - 1));
    assert!(paddr >= load_at + 300 + 0x2000);
    assert_eq!(read_bytes(&mem, paddr, 5000), initrd);

    assert_eq!(read_bytes(&mem, layout::CMDLINE_START, 20), b"console=ttyS0 quiet\0");
    // The boot GDT: flat 32-bit code and data, 32-bit busy TSS.
    assert_eq!(read_u64(&mem, layout::BOOT_GDT_START), 0);
    assert_eq!(read_u64(&mem, layout::BOOT_GDT_START + 8), 0x00cf_9b00_0000_ffff);
    assert_eq!(read_u64(&mem, layout::BOOT_GDT_START + 16), 0x00cf_9300_0000_ffff);
    assert_eq!(read_u64(&mem, layout::BOOT_GDT_START + 24), 0x0000_8b00_0000_0067);
}

#[test]
fn pvh_without_initrd_has_no_module() {
    let (mem, ram) = guest(32 * MIB);
    let elf = tiny_elf(&[0xf4], 2 * MIB, 0, 0, true);
    load(&mem, &ram, &elf, None, "").unwrap();
    assert_eq!(read_u32(&mem, layout::PVH_INFO_START + 12), 0);
    assert_eq!(read_u64(&mem, layout::PVH_INFO_START + 16), 0);
    assert_eq!(read_u8(&mem, layout::CMDLINE_START), 0);
}

#[test]
fn elf_without_pvh_note_enters_at_the_64bit_entry() {
    let (mem, ram) = guest(32 * MIB);
    let elf = tiny_elf(&pattern(0x100, 1), 2 * MIB, 0, 0x80, false);
    let entry = load(&mem, &ram, &elf, Some(&[1, 2, 3]), "root=/dev/vda").unwrap();
    assert_eq!(
        entry,
        BootEntry::Linux64 {
            entry: 2 * MIB + 0x80,
            boot_params: layout::ZERO_PAGE_START
        }
    );
    let zp = layout::ZERO_PAGE_START;
    assert_eq!(read_u16(&mem, zp + 0x1fe), 0xaa55, "boot_flag");
    assert_eq!(&read_bytes(&mem, zp + 0x202, 4), b"HdrS");
    assert_eq!(read_u8(&mem, zp + 0x210), 0xff, "type_of_loader");
    assert_eq!(read_u32(&mem, zp + 0x228), layout::CMDLINE_START as u32);
    assert_eq!(read_u32(&mem, zp + 0x21c), 3, "ramdisk_size");
    assert_eq!(read_u32(&mem, zp + 0x230), 0x100_0000, "kernel_alignment");
    assert_eq!(read_u64(&mem, layout::PML4_START), PDPT_START | 3);
    // The 64-bit GDT.
    assert_eq!(read_u64(&mem, layout::BOOT_GDT_START + 8), 0x00af_9b00_0000_ffff);
}

#[test]
fn bzimage_gets_boot_params_page_tables_and_initrd() {
    let (mem, ram) = guest(64 * MIB);
    let payload = pattern(8192, 3);
    let image = FakeBzImage::default().build(&payload);
    let initrd = pattern(3 * 4096 + 17, 5);
    let cmdline = "console=ttyS0 reboot=k panic=1";
    let entry = load(&mem, &ram, &image, Some(&initrd), cmdline).unwrap();
    assert_eq!(
        entry,
        BootEntry::Linux64 {
            entry: MIB + 0x200,
            boot_params: layout::ZERO_PAGE_START
        }
    );
    assert_eq!(read_bytes(&mem, MIB, payload.len()), payload);

    // boot_params at the boot protocol's offsets.
    let zp = layout::ZERO_PAGE_START;
    assert_eq!(read_u64(&mem, zp + 0x70), layout::ACPI_START, "acpi_rsdp_addr");
    assert_eq!(read_u8(&mem, zp + 0x1f1), 1, "setup_sects");
    assert_eq!(&read_bytes(&mem, zp + 0x202, 4), b"HdrS");
    assert_eq!(read_u16(&mem, zp + 0x206), 0x020f, "version");
    assert_eq!(read_u8(&mem, zp + 0x210), 0xff, "type_of_loader");
    assert_eq!(read_u8(&mem, zp + 0x211), 0x81, "loadflags: LOADED_HIGH | CAN_USE_HEAP");
    assert_eq!(read_u32(&mem, zp + 0x214), MIB as u32, "code32_start");
    let ramdisk_image = u64::from(read_u32(&mem, zp + 0x218));
    assert_eq!(read_u32(&mem, zp + 0x21c) as usize, initrd.len(), "ramdisk_size");
    assert_eq!(read_u16(&mem, zp + 0x224), 0xfe00, "heap_end_ptr");
    assert_eq!(read_u32(&mem, zp + 0x228), layout::CMDLINE_START as u32, "cmd_line_ptr");
    assert_eq!(read_u32(&mem, zp + 0x238), 0x7ff, "cmdline_size");
    assert_eq!(read_u32(&mem, zp + 0x260), 0x40_0000, "init_size");
    assert_eq!(read_u32(&mem, zp + 0x26c), 0, "setup code past the header stays out");
    assert_eq!(read_u8(&mem, zp + 0x1e8), 4, "e820_entries");
    let e820: Vec<(u64, u64, u32)> = (0..4)
        .map(|i| {
            let e = zp + 0x2d0 + i * 20;
            (read_u64(&mem, e), read_u64(&mem, e + 8), read_u32(&mem, e + 16))
        })
        .collect();
    assert_eq!(e820, map_of_64m());
    assert_eq!(
        read_bytes(&mem, layout::CMDLINE_START, cmdline.len() + 1),
        [cmdline.as_bytes(), b"\0"].concat()
    );

    // The initrd: page-aligned, as high as low RAM allows, above the
    // kernel's decompression buffer (16 MiB + init_size).
    assert_eq!(ramdisk_image % PAGE, 0);
    assert_eq!(ramdisk_image, (64 * MIB - initrd.len() as u64) & !(PAGE - 1));
    assert!(ramdisk_image >= 16 * MIB + 0x40_0000);
    assert!(ramdisk_image + initrd.len() as u64 <= 64 * MIB);
    assert_eq!(read_bytes(&mem, ramdisk_image, initrd.len()), initrd);

    // Identity page tables: PML4[0] -> PDPT, PDPT[0] -> PD, 2 MiB pages
    // over the first GiB, nothing beyond.
    assert_eq!(read_u64(&mem, layout::PML4_START), 0xa003);
    assert_eq!(read_u64(&mem, layout::PML4_START + 8), 0);
    assert_eq!(read_u64(&mem, PDPT_START), 0xb003);
    assert_eq!(read_u64(&mem, PDPT_START + 8), 0);
    for i in 0..512 {
        assert_eq!(read_u64(&mem, PD_START + i * 8), (i << 21) | 0x83, "PD[{i}]");
    }
    // The 64-bit GDT and the empty IDT.
    let gdt: Vec<u64> = (0..4).map(|i| read_u64(&mem, layout::BOOT_GDT_START + i * 8)).collect();
    assert_eq!(
        gdt,
        [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff]
    );
    assert_eq!(read_u64(&mem, layout::BOOT_IDT_START), 0);
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let (mem, ram) = guest(64 * MIB);
    let image = FakeBzImage {
        initrd_addr_max: 32 * MIB as u32 - 1,
        ..Default::default()
    }
    .build(&[0x90; 1024]);
    load(&mem, &ram, &image, Some(&[7; 100]), "").unwrap();
    let image_at = u64::from(read_u32(&mem, layout::ZERO_PAGE_START + 0x218));
    assert_eq!(image_at, 32 * MIB - PAGE);
}

#[test]
fn initrd_placement_is_pure_arithmetic() {
    // Highest page below the top, not below the kernel.
    assert_eq!(
        initrd_address(5000, 0x30_0000, 64 * MIB, u64::MAX),
        Ok(64 * MIB - 2 * PAGE)
    );
    assert_eq!(initrd_address(PAGE, 0, 64 * MIB, 8 * MIB), Ok(8 * MIB - PAGE));
    // Exactly fits between the kernel's (page-aligned) end and the top.
    assert_eq!(
        initrd_address(2 * PAGE, 10 * PAGE - 1, 12 * PAGE, u64::MAX),
        Ok(10 * PAGE)
    );
    assert_eq!(
        initrd_address(2 * PAGE, 10 * PAGE + 1, 12 * PAGE, u64::MAX),
        Err((11 * PAGE, 12 * PAGE))
    );
    assert_eq!(initrd_address(u64::MAX, 0, 64 * MIB, u64::MAX), Err((0, 64 * MIB)));
}

#[test]
fn memory_map_covers_high_ram_and_reserves_the_holes() {
    let gib = 1u64 << 30;
    let ram = BootRam::new(&layout::boot_ram(5 * gib)).unwrap();
    let map: Vec<(u64, u64, u32)> = ram.memory_map().iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(
        map,
        [
            (0, layout::EBDA_START, E820_RAM),
            (layout::EBDA_START, MIB - layout::EBDA_START, E820_RESERVED),
            (MIB, 3 * gib - MIB, E820_RAM),
            (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, E820_RESERVED),
            (4 * gib, 2 * gib, E820_RAM),
        ]
    );
    assert_eq!(ram.low_end(), 3 * gib);
}

#[test]
fn bad_boot_ram_is_refused() {
    let gib = 1u64 << 30;
    for (ram, expected) in [
        (vec![], "no range starts at 0"),
        (vec![(MIB, 64 * MIB)], "no range starts at 0"),
        (vec![(0, MIB)], "no room for a kernel"),
        (vec![(0, 64 * MIB), (32 * MIB, MIB)], "overlap"),
        (vec![(0, 0)], "empty or wraps"),
        (vec![(0, 64 * MIB), (u64::MAX, 2)], "empty or wraps"),
        (vec![(0, 4 * gib)], "32-bit gap"),
    ] {
        let err = BootRam::new(&ram).unwrap_err();
        assert!(matches!(err, BootError::BadRam { .. }), "{ram:x?}: {err}");
        assert!(err.to_string().contains(expected), "{ram:x?}: {err}");
    }
}

#[test]
fn ram_outside_the_memory_map_is_refused() {
    let (mem, _) = guest(32 * MIB);
    let elf = tiny_elf(&[0xf4], 2 * MIB, 0, 0, true);
    let err = load(&mem, &layout::boot_ram(64 * MIB), &elf, None, "").unwrap_err();
    assert!(matches!(err, BootError::BadRam { .. }), "{err}");
    assert!(err.to_string().contains("0x2000000 is not RAM"), "{err}");
}

#[test]
fn page_tables_grow_with_what_must_be_mapped() {
    let gib = 1u64 << 30;
    let pt = |bytes: &[u8], at: u64| {
        let o = (at - layout::PML4_START) as usize;
        u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap())
    };
    let one = page_tables(16 * MIB);
    assert_eq!(one.len() as u64, 3 * PAGE);
    let four = page_tables(3 * gib + 1);
    assert_eq!(four.len() as u64, 6 * PAGE);
    for g in 0..4 {
        assert_eq!(pt(&four, PDPT_START + g * 8), (PD_START + g * PAGE) | 3);
    }
    assert_eq!(pt(&four, PD_START + 3 * PAGE + 511 * 8), (3 * gib + (511 << 21)) | 0x83);
    assert_eq!(page_tables(u64::MAX).len(), four.len());
}

fn load_err(kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> BootError {
    let (mem, ram) = guest(64 * MIB);
    load(&mem, &ram, kernel, initrd, cmdline).unwrap_err()
}

#[test]
fn garbage_is_not_a_kernel() {
    for bytes in [&b""[..], &[0u8; 100][..], &pattern(0x1000, 9)[..]] {
        let err = load_err(bytes, None, "");
        assert!(
            matches!(err, BootError::NotBootable { size, .. } if size == bytes.len() as u64),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("memvisor-boot-test"), "names the file: {msg}");
        assert!(msg.contains(&format!("({} bytes)", bytes.len())), "{msg}");
        assert!(
            msg.contains("not a bootable kernel: expected an ELF vmlinux with a PVH note"),
            "{msg}"
        );
    }
}

#[test]
fn truncated_or_foreign_elfs_are_refused() {
    let elf = tiny_elf(&pattern(300, 1), 2 * MIB, 0, 0, true);
    for (cut, expected) in [
        (20, "shorter than an ELF header"),
        (100, "program headers at 0x40 do not fit"),
        (elf.len() - 1, "run past the end of the file"),
    ] {
        let err = load_err(&elf[..cut], None, "");
        assert!(matches!(err, BootError::BadElf { .. }), "cut at {cut}: {err}");
        assert!(err.to_string().contains(expected), "cut at {cut}: {err}");
    }
    let mut elf32 = elf.clone();
    elf32[4] = 1;
    assert!(load_err(&elf32, None, "").to_string().contains("ELFCLASS64"));
    let mut arm = elf.clone();
    arm[18] = 183;
    assert!(load_err(&arm, None, "").to_string().contains("not x86-64"));
    let mut bad_phentsize = elf.clone();
    bad_phentsize[54] = 32;
    assert!(
        load_err(&bad_phentsize, None, "")
            .to_string()
            .contains("program header size")
    );
    // A note segment pointing past the end of the file.
    let mut bad_note = elf.clone();
    bad_note[64 + 56 + 8..64 + 56 + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
    assert!(
        load_err(&bad_note, None, "")
            .to_string()
            .contains("past the end of the file")
    );
}

#[test]
fn elf_segments_must_fit_boot_ram() {
    let low = tiny_elf(&[0xf4; 16], 0x1_0000, 0, 0, true);
    let err = load_err(&low, None, "");
    assert!(err.to_string().contains("below 0x100000"), "{err}");
    let high = tiny_elf(&[0xf4; 16], 63 * MIB, 2 * MIB, 0, true);
    let err = load_err(&high, None, "");
    assert!(
        matches!(err, BootError::OutsideRam { start, end, .. } if start == 63 * MIB && end == 65 * MIB + 16),
        "{err}"
    );
    // An entry point outside the segment.
    let outside = tiny_elf(&[0xf4; 16], 2 * MIB, 0, 0x100, false);
    assert!(
        load_err(&outside, None, "")
            .to_string()
            .contains("outside the loaded segments")
    );
}

#[test]
fn bad_bzimages_are_refused() {
    let bz = |f: FakeBzImage, payload: usize| f.build(&vec![0x90; payload]);
    let cases = [
        (
            bz(
                FakeBzImage {
                    version: 0x020b,
                    ..Default::default()
                },
                1024,
            ),
            "older than 2.12",
        ),
        (
            bz(
                FakeBzImage {
                    loadflags: 0,
                    ..Default::default()
                },
                1024,
            ),
            "LOADED_HIGH",
        ),
        (
            bz(
                FakeBzImage {
                    xloadflags: 0,
                    ..Default::default()
                },
                1024,
            ),
            "XLF_KERNEL_64",
        ),
        (bz(FakeBzImage::default(), 0x100), "ends before the 64-bit entry"),
        (
            bz(
                FakeBzImage {
                    setup_sects: 200,
                    ..Default::default()
                },
                0,
            )[..2048]
                .to_vec(),
            "ends before the 64-bit entry",
        ),
        (
            bz(
                FakeBzImage {
                    init_size: 0x7000_0000,
                    ..Default::default()
                },
                1024,
            ),
            "needs RAM up to 0x71000000",
        ),
        (
            bz(
                FakeBzImage {
                    pref_address: u64::MAX - 4,
                    ..Default::default()
                },
                1024,
            ),
            "overflows",
        ),
    ];
    for (image, expected) in cases {
        let err = load_err(&image, None, "");
        assert!(matches!(err, BootError::BadBzImage { .. }), "{expected}: {err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    // A header cut short inside the file is not a bzImage at all.
    let image = bz(FakeBzImage::default(), 1024);
    assert!(matches!(
        load_err(&image[..0x204], None, ""),
        BootError::NotBootable { .. }
    ));
    // A payload larger than RAM.
    let err = load_err(&bz(FakeBzImage::default(), 64 * MIB as usize), None, "");
    assert!(matches!(err, BootError::OutsideRam { .. }), "{err}");
}

#[test]
fn command_lines_are_limited() {
    let image = FakeBzImage {
        cmdline_size: 16,
        ..Default::default()
    }
    .build(&[0x90; 1024]);
    let (mem, ram) = guest(64 * MIB);
    load(&mem, &ram, &image, None, "0123456789abcdef").unwrap();
    let err = load(&mem, &ram, &image, None, "0123456789abcdefg").unwrap_err();
    assert!(
        matches!(err, BootError::CmdlineTooLong { len: 17, max: 16, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cmdline_size"), "{err}");

    let elf = tiny_elf(&[0xf4], 2 * MIB, 0, 0, true);
    let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
    let err = load(&mem, &ram, &elf, None, &long).unwrap_err();
    assert!(
        matches!(err, BootError::CmdlineTooLong { len, max, .. } if len == layout::CMDLINE_MAX_SIZE && max == layout::CMDLINE_MAX_SIZE - 1),
        "{err}"
    );
    load(&mem, &ram, &elf, None, &long[1..]).unwrap();
    assert_eq!(
        read_u8(&mem, layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64 - 1),
        0
    );

    let err = load(&mem, &ram, &elf, None, "a\0b").unwrap_err();
    assert!(matches!(err, BootError::CmdlineNul { offset: 1 }), "{err}");
}

#[test]
fn an_initrd_that_does_not_fit_is_an_error() {
    // 64 MiB of RAM, the bzImage's buffer up to 20 MiB: 44 MiB left.
    let image = FakeBzImage::default().build(&[0x90; 1024]);
    let (mem, ram) = guest(64 * MIB);
    let fits = vec![1u8; (44 * MIB) as usize];
    load(&mem, &ram, &image, Some(&fits), "").unwrap();
    assert_eq!(u64::from(read_u32(&mem, layout::ZERO_PAGE_START + 0x218)), 20 * MIB);
    let too_big = vec![1u8; (44 * MIB + 1) as usize];
    let err = load(&mem, &ram, &image, Some(&too_big), "").unwrap_err();
    assert!(
        matches!(err, BootError::InitrdTooLarge { size, lowest, top, .. }
            if size == 44 * MIB + 1 && lowest == 20 * MIB && top == 64 * MIB),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("0x2c00001 bytes") && msg.contains("0x1400000"), "{msg}");
}

#[test]
fn mangled_images_give_errors_not_panics() {
    let (mem, ram) = guest(32 * MIB);
    let elf = tiny_elf(&pattern(64, 1), 2 * MIB, 0x100, 0, true);
    for cut in 0..elf.len() {
        let err = load(&mem, &ram, &elf[..cut], None, "").unwrap_err();
        assert!(
            matches!(err, BootError::NotBootable { .. } | BootError::BadElf { .. }),
            "cut at {cut}: {err}"
        );
    }
    // Every header byte set to all ones, one at a time.
    for at in 0..elf.len() - 64 {
        let mut mangled = elf.clone();
        mangled[at] = 0xff;
        let _ = load(&mem, &ram, &mangled, None, "");
    }
    let bz = FakeBzImage::default().build(&pattern(0x400, 2));
    for cut in (0..bz.len()).step_by(7) {
        let _ = load(&mem, &ram, &bz[..cut], None, "");
    }
    for at in 0x1f1..0x270 {
        let mut mangled = bz.clone();
        mangled[at] = 0xff;
        let _ = load(&mem, &ram, &mangled, None, "");
    }
}
