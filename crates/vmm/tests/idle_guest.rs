//! The idle guest of the live API tests: `tests/data/idle-pvh.elf`, a 268-byte ELF64 x86-64
//! kernel with a PVH note, whose 32-bit entry at 1 MiB writes a line on COM1 and then halts
//! with interrupts off, forever. It boots where Linux cannot (this host's PVM /dev/kvm runs
//! it), so `memvisor run` serves its API until it is asked to stop:
//!
//! ```text
//! memvisor run --kernel crates/vmm/tests/data/idle-pvh.elf --memory 64M \
//!     --vmem id=vmem0,size=256M,block=2M --api-socket /tmp/api.sock --serial off
//! ```
//!
//! The committed file is [`idle_pvh_elf`]'s output; `MEMVISOR_BLESS=1 cargo test -p
//! memvisor-vmm --test idle_guest` writes it again after a change here.

use std::path::PathBuf;

/// Where the kernel is loaded and entered (PVH: 32-bit protected mode, paging off).
const LOAD: u64 = 0x10_0000;
/// What it writes on COM1 at each boot (with `--serial file:F`, one line per boot).
pub const BANNER: &[u8] = b"memvisor idle guest\n";
const COM1: u16 = 0x3f8;

/// The guest's code: `mov dx, COM1`, `mov al, c; out dx, al` per banner byte, then
/// `cli; hlt; jmp .-1` (back to the `hlt`, should anything wake it).
fn code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&COM1.to_le_bytes());
    for &b in BANNER {
        c.extend_from_slice(&[0xb0, b, 0xee]);
    }
    c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    c
}

/// The ELF: header, a `PT_LOAD` (R+X) of the code at [`LOAD`], a `PT_NOTE` holding the Xen
/// note `XEN_ELFNOTE_PHYS32_ENTRY` (18) = [`LOAD`], the note, the code.
pub fn idle_pvh_elf() -> Vec<u8> {
    const PHDRS_AT: usize = 64;
    const NOTE_AT: usize = PHDRS_AT + 2 * 56;
    const NOTE_LEN: usize = 12 + 4 + 8;
    const CODE_AT: usize = NOTE_AT + NOTE_LEN;
    let code = code();
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
    put32(&mut b, 20, 1); // EV_CURRENT
    put64(&mut b, 24, LOAD); // e_entry (unused: the PVH note's entry is)
    put64(&mut b, 32, PHDRS_AT as u64); // e_phoff
    put16(&mut b, 52, 64); // e_ehsize
    put16(&mut b, 54, 56); // e_phentsize
    put16(&mut b, 56, 2); // e_phnum
    let ph = PHDRS_AT;
    put32(&mut b, ph, 1); // PT_LOAD
    put32(&mut b, ph + 4, 5); // PF_R | PF_X
    put64(&mut b, ph + 8, CODE_AT as u64);
    put64(&mut b, ph + 16, LOAD);
    put64(&mut b, ph + 24, LOAD);
    put64(&mut b, ph + 32, code.len() as u64);
    put64(&mut b, ph + 40, code.len() as u64);
    put64(&mut b, ph + 48, 0x1000);
    let ph = PHDRS_AT + 56;
    put32(&mut b, ph, 4); // PT_NOTE
    put32(&mut b, ph + 4, 4); // PF_R
    put64(&mut b, ph + 8, NOTE_AT as u64);
    put64(&mut b, ph + 32, NOTE_LEN as u64);
    put64(&mut b, ph + 40, NOTE_LEN as u64);
    put64(&mut b, ph + 48, 4);
    put32(&mut b, NOTE_AT, 4); // namesz: "Xen\0"
    put32(&mut b, NOTE_AT + 4, 8); // descsz
    put32(&mut b, NOTE_AT + 8, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    b[NOTE_AT + 12..NOTE_AT + 16].copy_from_slice(b"Xen\0");
    put64(&mut b, NOTE_AT + 16, LOAD);
    b.extend_from_slice(&code);
    b
}

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/idle-pvh.elf")
}

#[test]
fn the_committed_idle_guest_is_the_generated_one() {
    let bytes = idle_pvh_elf();
    if std::env::var_os("MEMVISOR_BLESS").is_some() {
        std::fs::write(committed(), &bytes).unwrap();
    }
    let on_disk = std::fs::read(committed()).unwrap();
    assert_eq!(
        on_disk, bytes,
        "tests/data/idle-pvh.elf differs from idle_pvh_elf(): MEMVISOR_BLESS=1 writes it again"
    );
}

#[test]
fn the_idle_guest_is_a_pvh_elf_entered_at_1_mib() {
    let b = idle_pvh_elf();
    let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(b.len(), 268);
    assert_eq!(&b[..7], b"\x7fELF\x02\x01\x01");
    assert_eq!(
        (u16_at(16), u16_at(18), u16_at(56)),
        (2, 62, 2),
        "ET_EXEC, x86-64, two headers"
    );
    // PT_LOAD: the file's tail at 1 MiB, all of it.
    let (offset, paddr, filesz, memsz) = (u64_at(64 + 8), u64_at(64 + 24), u64_at(64 + 32), u64_at(64 + 40));
    assert_eq!((u32_at(64), paddr, offset + filesz, memsz), (1, 0x10_0000, 268, filesz));
    // PT_NOTE at 176: "Xen", type 18, entry 1 MiB.
    assert_eq!((u32_at(120), u64_at(120 + 8), u64_at(120 + 32)), (4, 176, 24));
    assert_eq!((u32_at(176), u32_at(180), u32_at(184)), (4, 8, 18));
    assert_eq!((&b[188..192], u64_at(192)), (&b"Xen\0"[..], 0x10_0000));
    // The code: mov dx, 0x3f8; the banner byte by byte; cli; hlt; jmp back to the hlt.
    let code = &b[offset as usize..];
    assert_eq!(code[..4], [0x66, 0xba, 0xf8, 0x03]);
    let written: Vec<u8> = code[4..code.len() - 4]
        .chunks(3)
        .map(|op| {
            assert_eq!((op[0], op[2]), (0xb0, 0xee), "mov al, imm8; out dx, al");
            op[1]
        })
        .collect();
    assert_eq!(written, BANNER);
    assert_eq!(code[code.len() - 4..], [0xfa, 0xf4, 0xeb, 0xfd]);
}
