//! Checks of an ELF kernel's headers before linux-loader reads it: the
//! loader trusts program header offsets and sizes, and accepts 32-bit or
//! foreign-machine files.

use std::fs::File;
use std::os::unix::fs::FileExt;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `e_phnum` value meaning "extended numbering", which kernels never use.
const PN_XNUM: u16 = 0xffff;

/// A `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    /// Physical load address.
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
}

/// What the kernel's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ElfKernel {
    /// `e_entry`.
    pub entry: u64,
    /// Non-empty `PT_LOAD` segments.
    pub segments: Vec<Segment>,
}

impl ElfKernel {
    /// End of the highest segment.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0)
    }

    /// True if `addr` lies inside a segment.
    pub fn contains(&self, addr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| s.paddr <= addr && addr < s.paddr + s.memsz)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks the ELF header and program headers of `file` (`size`
/// bytes): a 64-bit little-endian x86-64 executable whose program headers,
/// loadable segments and notes lie inside the file, with non-overlapping
/// segments that do not wrap around.
pub(super) fn inspect(file: &File, size: u64) -> Result<ElfKernel, String> {
    let mut ehdr = [0u8; EHDR_SIZE];
    if size < EHDR_SIZE as u64 {
        return Err(format!(
            "the file of {size} bytes is shorter than an ELF header ({EHDR_SIZE} bytes)"
        ));
    }
    file.read_exact_at(&mut ehdr, 0)
        .map_err(|e| format!("reading the ELF header: {e}"))?;
    if ehdr[4] != ELFCLASS64 {
        return Err(format!("ELF class {} is not ELFCLASS64", ehdr[4]));
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(format!("ELF data encoding {} is not little-endian", ehdr[5]));
    }
    let e_type = u16_at(&ehdr, 16);
    if e_type != ET_EXEC {
        return Err(format!("ELF type {e_type} is not an executable (ET_EXEC)"));
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(format!("ELF machine {machine} is not x86-64 ({EM_X86_64})"));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(format!("program header size {phentsize} is not {PHDR_SIZE}"));
    }
    if phnum == 0 || phnum == PN_XNUM {
        return Err(format!("unsupported number of program headers {phnum}"));
    }
    let table_len = u64::from(phnum) * PHDR_SIZE as u64;
    if phoff < EHDR_SIZE as u64 || phoff.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(format!(
            "{phnum} program headers at {phoff:#x} do not fit in the file of {size} bytes"
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, phoff)
        .map_err(|e| format!("reading the program headers: {e}"))?;

    let mut segments = Vec::new();
    for (i, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let p_type = u32_at(ph, 0);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|end| end > size) {
            return Err(format!(
                "program header {i}: {filesz:#x} bytes at file offset {offset:#x} run past the end of the \
                 file ({size} bytes): truncated?"
            ));
        }
        if p_type == PT_NOTE || memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(format!(
                "program header {i}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            ));
        }
        if paddr.checked_add(memsz).is_none() {
            return Err(format!(
                "program header {i}: segment at {paddr:#x} of {memsz:#x} bytes wraps around"
            ));
        }
        segments.push(Segment { paddr, filesz, memsz });
    }
    if segments.is_empty() {
        return Err("no loadable segment".into());
    }
    let mut sorted = segments.clone();
    sorted.sort_by_key(|s| s.paddr);
    for pair in sorted.windows(2) {
        if pair[1].paddr < pair[0].paddr + pair[0].memsz {
            return Err(format!(
                "segments at {:#x} (+{:#x}) and {:#x} overlap",
                pair[0].paddr, pair[0].memsz, pair[1].paddr
            ));
        }
    }
    Ok(ElfKernel { entry, segments })
}
