//! A tiny hand-written guest that reads and writes guest-physical memory
//! through a real vCPU, for tests.
//!
//! A [`ProbeGuest`] is a list of 64-bit reads and writes. It is turned
//! into straight-line x86-64 machine code (only `mov`, `shr`, `out` and
//! `hlt`: no SSE, no string instructions, no interrupts, one memory access
//! per operation) and loaded, with identity-mapping page tables for every
//! address it touches, into plain RAM. The vCPU enters it in 64-bit mode;
//! each read reports the value it got on [`REPORT_PORT`] (two `out`s of a
//! dword, low half first), and the guest halts after the last operation.
//!
//! ```text
//!   66 ba e0 00                  mov dx, REPORT_PORT
//! write(addr, value):
//!   48 bb <addr>                 movabs rbx, addr
//!   48 b9 <value>                movabs rcx, value
//!   48 89 0b                     mov [rbx], rcx
//! read(addr):
//!   48 bb <addr>                 movabs rbx, addr
//!   48 8b 03                     mov rax, [rbx]
//!   ef                           out dx, eax
//!   48 c1 e8 20                  shr rax, 32
//!   ef                           out dx, eax
//! end:
//!   f4                           hlt
//! ```

use std::collections::BTreeSet;

use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;

use crate::vm::{LongModeEntry, RunReport, Vcpu, VmError};

/// The port a probe reports its reads on.
pub const REPORT_PORT: u16 = 0xe0;

const PAGE: u64 = 4096;
const GIB_SHIFT: u32 = 30;
const PML4_SHIFT: u32 = 39;
/// 4-level paging maps the lower half of a 48-bit space.
const ADDRESS_LIMIT: u64 = 1 << 47;
/// Present, writable, accessed. The accessed (and, for pages, dirty) bits
/// are set up front so that the processor's page walks write nothing: the
/// guest writes exactly what its operations write (dirty-logging tests
/// count the pages).
const TABLE: u64 = 0x23;
/// Present, writable, accessed, dirty, 2 MiB page.
const LARGE_PAGE: u64 = 0xe3;

/// One memory access of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOp {
    /// Store `value` at `addr` (8 bytes, one `mov`).
    Write {
        /// Guest-physical address.
        addr: u64,
        /// The value.
        value: u64,
    },
    /// Load 8 bytes at `addr` (one `mov`) and report them.
    Read {
        /// Guest-physical address.
        addr: u64,
    },
}

impl ProbeOp {
    fn addr(&self) -> u64 {
        match *self {
            ProbeOp::Write { addr, .. } | ProbeOp::Read { addr } => addr,
        }
    }
}

/// Why a probe could not be built, loaded or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// An address the identity map cannot reach.
    #[error("probe address {0:#x} is beyond the 47-bit space a 4-level identity map covers")]
    Unmappable(u64),
    /// The load address is not page-aligned.
    #[error("probe load address {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    /// The image does not fit plain RAM at the load address.
    #[error("the probe image needs {len:#x} bytes of plain (boot) RAM at {at:#x}: {reason}")]
    NoRoom {
        /// The load address.
        at: u64,
        /// The image's size.
        len: u64,
        /// Why it does not fit.
        reason: String,
    },
    /// Writing the image into guest RAM failed.
    #[error("writing the probe image at {at:#x}: {reason}")]
    Write {
        /// The load address.
        at: u64,
        /// Why.
        reason: String,
    },
    /// The guest did not report what its reads should have.
    #[error("the probe reported {got:?} on port {port:#x}, expected {expected} dwords (two per read)")]
    Reports {
        /// The port.
        port: u16,
        /// What it reported.
        got: Vec<Vec<u8>>,
        /// Dwords expected.
        expected: usize,
    },
    /// Running the vCPU failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The bytes to place at a load address and where the vCPU starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeImage {
    /// Page tables, code and stack, to be written at the load address.
    pub bytes: Vec<u8>,
    /// The vCPU state that runs it.
    pub entry: LongModeEntry,
}

/// What a probe read, and what the vCPU did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    /// The value of each [`ProbeOp::Read`], in order.
    pub reads: Vec<u64>,
    /// The vCPU's exits.
    pub report: RunReport,
}

/// A guest program of 64-bit reads and writes; see the
/// [module documentation](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeGuest {
    ops: Vec<ProbeOp>,
}

impl ProbeGuest {
    /// An empty program (it only halts).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a store of `value` at `addr`.
    pub fn write(mut self, addr: u64, value: u64) -> Self {
        self.ops.push(ProbeOp::Write { addr, value });
        self
    }

    /// Adds a load of `addr`, reported.
    pub fn read(mut self, addr: u64) -> Self {
        self.ops.push(ProbeOp::Read { addr });
        self
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[ProbeOp] {
        &self.ops
    }

    /// Number of reads.
    pub fn reads(&self) -> usize {
        self.ops.iter().filter(|op| matches!(op, ProbeOp::Read { .. })).count()
    }

    /// The machine code; see the [module documentation](self).
    pub fn code(&self) -> Vec<u8> {
        let mut code = vec![0x66, 0xba];
        code.extend_from_slice(&REPORT_PORT.to_le_bytes());
        for op in &self.ops {
            code.extend_from_slice(&[0x48, 0xbb]);
            code.extend_from_slice(&op.addr().to_le_bytes());
            match *op {
                ProbeOp::Write { value, .. } => {
                    code.extend_from_slice(&[0x48, 0xb9]);
                    code.extend_from_slice(&value.to_le_bytes());
                    code.extend_from_slice(&[0x48, 0x89, 0x0b]);
                }
                ProbeOp::Read { .. } => {
                    code.extend_from_slice(&[0x48, 0x8b, 0x03, 0xef, 0x48, 0xc1, 0xe8, 0x20, 0xef]);
                }
            }
        }
        code.push(0xf4);
        code
    }

    /// The image to load at `at`: a PML4, one PDPT per 512 GiB and one
    /// page directory (2 MiB pages) per GiB that the image or any
    /// operation touches, all identity-mapped; then the code and a stack
    /// page.
    pub fn image(&self, at: u64) -> Result<ProbeImage, ProbeError> {
        if at % PAGE != 0 {
            return Err(ProbeError::Unaligned(at));
        }
        let code = self.code();
        let code_pages = (code.len() as u64).div_ceil(PAGE);
        let mut touched = Vec::new();
        for op in &self.ops {
            let range = GuestRange::new(op.addr(), 8).ok_or(ProbeError::Unmappable(op.addr()))?;
            touched.push(range);
        }
        // The image maps itself too, and its size depends on how many
        // tables it needs: grow until it is stable.
        let mut len = (3 + code_pages) * PAGE;
        let (gibs, pml4s) = loop {
            let image = GuestRange::new(at, len).ok_or(ProbeError::Unmappable(at))?;
            let mut gibs = BTreeSet::new();
            for range in touched.iter().chain([&image]) {
                if range.end() > ADDRESS_LIMIT {
                    return Err(ProbeError::Unmappable(range.start()));
                }
                gibs.extend((range.start() >> GIB_SHIFT)..=((range.end() - 1) >> GIB_SHIFT));
            }
            let pml4s: BTreeSet<u64> = gibs.iter().map(|g| g >> (PML4_SHIFT - GIB_SHIFT)).collect();
            let needed = (1 + pml4s.len() as u64 + gibs.len() as u64 + code_pages + 1) * PAGE;
            if needed <= len {
                break (gibs, pml4s);
            }
            len = needed;
        };
        let mut bytes = vec![0u8; len as usize];
        let mut put = |offset: u64, value: u64| {
            let offset = offset as usize;
            bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        };
        let pdpt_page = |i: usize| (1 + i as u64) * PAGE;
        let pd_page = |i: usize| (1 + pml4s.len() as u64 + i as u64) * PAGE;
        for (i, &pml4) in pml4s.iter().enumerate() {
            put(pml4 * 8, (at + pdpt_page(i)) | TABLE);
        }
        for (i, &gib) in gibs.iter().enumerate() {
            let pml4 = gib >> (PML4_SHIFT - GIB_SHIFT);
            let pdpt = pml4s.iter().position(|&p| p == pml4).expect("collected above");
            put(pdpt_page(pdpt) + (gib & 511) * 8, (at + pd_page(i)) | TABLE);
            for entry in 0..512u64 {
                put(pd_page(i) + entry * 8, (gib << GIB_SHIFT) | (entry << 21) | LARGE_PAGE);
            }
        }
        let code_at = pd_page(gibs.len());
        bytes[code_at as usize..code_at as usize + code.len()].copy_from_slice(&code);
        Ok(ProbeImage {
            bytes,
            entry: LongModeEntry {
                cr3: at,
                rip: at + code_at,
                rsp: at + len,
            },
        })
    }

    /// Writes the image into plain RAM of `memory` at `at` and returns the
    /// entry state. The image must lie in one region without a discard
    /// manager (boot RAM).
    pub fn load(&self, memory: &GuestMemoryMap, at: u64) -> Result<LongModeEntry, ProbeError> {
        let image = self.image(at)?;
        let len = image.bytes.len() as u64;
        let no_room = |reason: String| ProbeError::NoRoom { at, len, reason };
        let range = GuestRange::new(at, len).ok_or_else(|| no_room("the range wraps".into()))?;
        let host = memory.lookup(range).map_err(|e| no_room(e.to_string()))?;
        if host.region.manager().is_some() {
            return Err(no_room(format!(
                "{} is managed memory that may be unplugged",
                host.region.range()
            )));
        }
        host.region
            .block()
            .write(host.block_offset, &image.bytes)
            .map_err(|e| ProbeError::Write {
                at,
                reason: e.to_string(),
            })?;
        Ok(image.entry)
    }

    /// The values of the reads, from the guest's reports in `report`.
    pub fn decode(&self, report: &RunReport) -> Result<Vec<u64>, ProbeError> {
        let dwords: Vec<&Vec<u8>> = report
            .port_writes
            .iter()
            .filter(|w| w.port == REPORT_PORT)
            .map(|w| &w.data)
            .collect();
        let expected = 2 * self.reads();
        if dwords.len() != expected || dwords.iter().any(|d| d.len() != 4) {
            return Err(ProbeError::Reports {
                port: REPORT_PORT,
                got: dwords.into_iter().cloned().collect(),
                expected,
            });
        }
        Ok(dwords
            .chunks(2)
            .map(|pair| {
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(pair[0]);
                bytes[4..].copy_from_slice(pair[1]);
                u64::from_le_bytes(bytes)
            })
            .collect())
    }

    /// Loads the probe at `at`, runs it on `vcpu` until it halts, and
    /// returns what it read.
    pub fn run(&self, vcpu: &mut Vcpu, memory: &GuestMemoryMap, at: u64) -> Result<ProbeRun, ProbeError> {
        let entry = self.load(memory, at)?;
        vcpu.enter_long_mode(entry)?;
        // One exit per memory access at most, two per report, the hlt, and
        // some room for exits the host takes on its own.
        let max_exits = 3 * self.ops.len() as u64 + 64;
        let report = vcpu.run(max_exits)?;
        Ok(ProbeRun {
            reads: self.decode(&report)?,
            report,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::PortWrite;

    const GIB: u64 = 1 << 30;

    #[test]
    fn code_is_the_documented_encoding() {
        let probe = ProbeGuest::new().write(0x1122, 0x55).read(0x1_0000_0000);
        #[rustfmt::skip]
        let expected = [
            0x66, 0xba, 0xe0, 0x00,
            0x48, 0xbb, 0x22, 0x11, 0, 0, 0, 0, 0, 0,
            0x48, 0xb9, 0x55, 0, 0, 0, 0, 0, 0, 0,
            0x48, 0x89, 0x0b,
            0x48, 0xbb, 0, 0, 0, 0, 1, 0, 0, 0,
            0x48, 0x8b, 0x03, 0xef, 0x48, 0xc1, 0xe8, 0x20, 0xef,
            0xf4,
        ];
        assert_eq!(probe.code(), expected);
        assert_eq!(ProbeGuest::new().code(), [0x66, 0xba, 0xe0, 0x00, 0xf4]);
    }

    fn entry(bytes: &[u8], offset: u64) -> u64 {
        u64::from_le_bytes(bytes[offset as usize..offset as usize + 8].try_into().unwrap())
    }

    /// Walks the image's page tables like the CPU does, for `addr`.
    fn translate(image: &ProbeImage, at: u64, addr: u64) -> Option<u64> {
        let b = &image.bytes;
        let table = |phys: u64| phys.checked_sub(at);
        let pml4e = entry(b, table(image.entry.cr3)? + ((addr >> 39) & 511) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = entry(b, table(pml4e & !0xfff)? + ((addr >> 30) & 511) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = entry(b, table(pdpte & !0xfff)? + ((addr >> 21) & 511) * 8);
        if pde & 0x81 != 0x81 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (addr & 0x1f_ffff))
    }

    #[test]
    fn the_image_identity_maps_what_it_touches_and_itself() {
        let at = 0x10_000;
        let probe = ProbeGuest::new()
            .write(4 * GIB + 0x20_0000, 1)
            .read(4 * GIB + 0x20_0000)
            .read(700 * GIB + 8) // another PML4 entry
            .read(2 * GIB - 4); // crosses into the next GiB
        let image = probe.image(at).unwrap();
        for addr in [
            at,
            image.entry.rip,
            image.entry.rsp - 8,
            4 * GIB + 0x20_0000,
            700 * GIB + 15,
            2 * GIB - 4,
            2 * GIB + 3,
        ] {
            assert_eq!(translate(&image, at, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&image, at, 3 * GIB), None);
        let code_at = (image.entry.rip - at) as usize;
        assert_eq!(&image.bytes[code_at..code_at + probe.code().len()], probe.code());
        // PML4, 2 PDPTs, 5 page directories (0, 1, 2, 4 and 700 GiB), code, stack.
        assert_eq!(image.bytes.len() as u64, 10 * PAGE);
        assert_eq!(image.entry.rsp, at + 10 * PAGE);
    }

    #[test]
    fn bad_addresses_are_errors() {
        assert!(matches!(
            ProbeGuest::new().read(1 << 47).image(0x1000),
            Err(ProbeError::Unmappable(_))
        ));
        assert!(matches!(
            ProbeGuest::new().read(u64::MAX - 3).image(0x1000),
            Err(ProbeError::Unmappable(_))
        ));
        assert!(matches!(
            ProbeGuest::new().image(0x1001),
            Err(ProbeError::Unaligned(0x1001))
        ));
    }

    #[test]
    fn decode_pairs_dwords_and_checks_their_count() {
        let probe = ProbeGuest::new().read(0).read(8);
        let out = |port, data: &[u8]| PortWrite {
            port,
            data: data.to_vec(),
        };
        let mut report = RunReport {
            port_writes: vec![
                out(REPORT_PORT, &[0x88, 0x77, 0x66, 0x55]),
                out(0x3f8, b"x"),
                out(REPORT_PORT, &[0x44, 0x33, 0x22, 0x11]),
                out(REPORT_PORT, &[0xff; 4]),
                out(REPORT_PORT, &[0xff; 4]),
            ],
            ..Default::default()
        };
        assert_eq!(probe.decode(&report).unwrap(), vec![0x1122_3344_5566_7788, u64::MAX]);
        report.port_writes.pop();
        let err = probe.decode(&report).unwrap_err();
        assert!(err.to_string().contains("expected 4 dwords"), "{err}");
    }
}
