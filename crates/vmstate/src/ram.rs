//! RAM: only populated memory is sent, zero pages as a flag.
//!
//! One [`RamSection`] per region of the guest memory map (instance = the
//! region's index in address order). Its payload (`FORMAT.md`, "RAM
//! payload") is a sequence of records in ascending order:
//!
//! * `DATA(offset, len)` followed by `len` bytes of the region, written
//!   straight from guest memory and read straight into the destination's
//!   mapping;
//! * `ZERO(offset, len)`: populated memory that reads as zero, sent as a
//!   flag.
//!
//! What is sent: for a region with a discard manager, the runs its
//! `replay_populated` yields; for a plain region, all of it. Inside those,
//! the holes of a memfd are found with `SEEK_DATA`/`SEEK_HOLE` (never read,
//! so the source does not allocate them), and every other page is tested
//! for zero a word at a time. The destination discards everything that is
//! not `DATA` ([`RamBlock::discard`](memvisor_memory::RamBlock::discard)).
//!
//! Saving is two passes over the populated memory: the first finds the
//! zero pages (reading one cache line of a non-zero page) and so the exact
//! payload length the section header announces; the second writes. The
//! machine must be stopped while it runs: guest memory is read without
//! synchronisation, so a concurrent writer would make the stream stale or
//! fail its checksum (never unsound: the bytes are only copied).

use std::io::{Read, Write};

use memvisor_memory::map::{GuestMemoryMap, Region};
use memvisor_memory::{Backing, GuestRange, PageSet};

use crate::context::LoadContext;
use crate::context::Restores;
use crate::error::{SectionError, VmStateError};
use crate::registry::Registry;
use crate::section::{Phase, Priority, Section};

/// Name of the RAM sections.
pub const RAM_SECTION: &str = "ram";
/// Version of the RAM payload layout: 2 adds a mode byte after the header
/// (0 full, 1 delta); version 1 payloads (no mode byte, full) still load.
pub const RAM_VERSION: u16 = 2;
/// Unit of zero detection and of record alignment.
pub const RAM_PAGE: u64 = 4096;

const MODE_FULL: u8 = 0;
const MODE_DELTA: u8 = 1;

/// What a [`RamSection`] saves and what its load accepts.
///
/// A live migration sends RAM while the guest runs and then, with the
/// guest paused, only the pages written since: a *delta* payload, which
/// the destination applies over what it already holds. Anything else (a
/// snapshot file, a stop-and-copy stream) is *full*: the destination clears
/// what the payload does not mention. A delta is accepted only where asked
/// for, so a delta can never pass for a whole machine.
#[derive(Debug, Clone, Default)]
pub enum RamMode {
    /// Save everything populated; load only full payloads.
    #[default]
    Full,
    /// Save only these pages (of the region, one bit per [`RAM_PAGE`]), as
    /// far as they are populated.
    SendDelta(PageSet),
    /// Load full or delta payloads.
    AcceptDelta,
}

const KIND_END: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
/// Kind, offset, length.
const RECORD_HEADER: u64 = 17;
/// Region start, region length, page size.
const PAYLOAD_HEADER: u64 = 20;
/// Bytes of zeros kept for clearing unaligned edges on the destination.
const ZERO_CHUNK: usize = 64 << 10;

/// The RAM of one region of a guest memory map; see the
/// [module documentation](self).
pub struct RamSection {
    instance: u32,
    memory: GuestMemoryMap,
    plan: Option<Plan>,
    mode: RamMode,
}

impl std::fmt::Debug for RamSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamSection")
            .field("instance", &self.instance)
            .field("region", &self.region().range())
            .finish()
    }
}

/// What the first pass found: the populated runs (offsets into the region,
/// page-aligned) and, per page, whether it holds non-zero bytes.
#[derive(Debug, Default)]
struct Plan {
    runs: Vec<(u64, u64)>,
    data: Vec<u64>,
}

/// What a save of one region sends, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RamStats {
    /// Populated bytes (sent as data or zero runs).
    pub populated: u64,
    /// Bytes sent as data.
    pub data: u64,
    /// Records in the payload.
    pub records: u64,
    /// Payload bytes.
    pub payload: u64,
}

impl Plan {
    fn is_data(&self, page: u64) -> bool {
        self.data[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set_data(&mut self, page: u64) {
        self.data[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// First page in `[from, end)` whose data bit differs from `value`,
    /// or `end`; a word at a time.
    fn next_change(&self, from: u64, end: u64, value: bool) -> u64 {
        let mut i = from;
        while i < end {
            let w = self.data[(i / 64) as usize];
            let differs = if value { !w } else { w } >> (i % 64);
            if differs != 0 {
                return (i + u64::from(differs.trailing_zeros())).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Calls `f(kind, offset, len)` for every record, in order.
    fn records<E>(&self, region_len: u64, mut f: impl FnMut(u8, u64, u64) -> Result<(), E>) -> Result<(), E> {
        for &(start, end) in &self.runs {
            let mut page = start / RAM_PAGE;
            let end_page = end.div_ceil(RAM_PAGE);
            while page < end_page {
                let data = self.is_data(page);
                let next = self.next_change(page, end_page, data);
                let offset = page * RAM_PAGE;
                let len = (next * RAM_PAGE).min(region_len) - offset;
                f(if data { KIND_DATA } else { KIND_ZERO }, offset, len)?;
                page = next;
            }
        }
        Ok(())
    }
}

/// True if the `len` bytes at `ptr` are all zero; reads 8 words at a time
/// and stops at the first non-zero group.
///
/// # Safety
///
/// `[ptr, ptr + len)` must be mapped and readable, and `ptr` 8-byte
/// aligned.
unsafe fn is_zero(ptr: *const u8, len: usize) -> bool {
    let words = len / 8;
    // SAFETY: the caller guarantees the range is mapped and aligned; u64
    // has no invalid bit patterns. Guest memory is only read here.
    let w = unsafe { std::slice::from_raw_parts(ptr.cast::<u64>(), words) };
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        if (c[0] | c[1] | c[2] | c[3] | c[4] | c[5] | c[6] | c[7]) != 0 {
            return false;
        }
    }
    if chunks.remainder().iter().any(|&x| x != 0) {
        return false;
    }
    // SAFETY: the tail lies inside the caller's range.
    let tail = unsafe { std::slice::from_raw_parts(ptr.add(words * 8), len % 8) };
    tail.iter().all(|&b| b == 0)
}

/// The RAM sections of every region of `memory`.
pub fn ram_sections(memory: &GuestMemoryMap) -> Vec<RamSection> {
    (0..memory.regions().len())
        .map(|i| RamSection {
            instance: i as u32,
            memory: memory.clone(),
            plan: None,
            mode: RamMode::Full,
        })
        .collect()
}

/// Registers [`ram_sections`] of `memory` in `registry`.
pub fn register_ram(registry: &mut Registry, memory: &GuestMemoryMap) -> Result<(), VmStateError> {
    register_ram_with(registry, memory, |_| RamMode::Full)
}

/// Registers [`ram_sections`] of `memory` in `registry`, region `i` in
/// `mode(i)`.
pub fn register_ram_with(
    registry: &mut Registry,
    memory: &GuestMemoryMap,
    mode: impl Fn(usize) -> RamMode,
) -> Result<(), VmStateError> {
    for (i, mut section) in ram_sections(memory).into_iter().enumerate() {
        section.mode = mode(i);
        registry.register(section)?;
    }
    Ok(())
}

/// The populated runs of `region`, page-aligned and merged, as region
/// offsets: all of a plain region, what its discard manager's
/// `replay_populated` yields for a managed one.
pub fn populated_runs(region: &Region) -> Result<Vec<(u64, u64)>, SectionError> {
    let base = region.range().start();
    let len = region.range().len();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut push = |start: u64, end: u64| {
        let (s, e) = (align_down(start, RAM_PAGE), align_up(end, RAM_PAGE).min(len));
        match runs.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => runs.push((s, e)),
        }
    };
    match region.manager() {
        None => push(0, len),
        Some(manager) => manager
            .replay_populated(region.range(), &mut |r| {
                push(r.start() - base, r.end() - base);
                Ok(())
            })
            .map_err(|e| SectionError::Invalid(format!("replaying the populated memory of {}: {e}", region.range())))?,
    }
    Ok(runs)
}

/// Calls `f(start, end)` for the parts of `[start, end)` (offsets into
/// `region`) that may hold data: not the holes of a memfd, found without
/// reading them; see [`RamBlock::data_extents`].
///
/// [`RamBlock::data_extents`]: memvisor_memory::RamBlock::data_extents
pub fn data_extents(region: &Region, start: u64, end: u64, f: &mut dyn FnMut(u64, u64)) {
    let base = region.block_offset();
    let result = region
        .block()
        .data_extents(base + start, end - start, |s, e| f(s - base, e - base));
    if let Err(e) = result {
        // The range comes from the region itself; report everything as
        // data rather than lose any.
        log::warn!("data extents of {}: {e}", region.range());
        f(start, end);
    }
}

/// The parts of `runs` (sorted, disjoint region offsets) on `pages`.
fn intersect(runs: &[(u64, u64)], pages: &PageSet) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (first, count) in pages.runs() {
        let (ps, pe) = (first * RAM_PAGE, (first + count) * RAM_PAGE);
        for &(s, e) in runs {
            let (a, b) = (s.max(ps), e.min(pe));
            if a < b {
                match out.last_mut() {
                    Some((_, end)) if *end == a => *end = b,
                    _ => out.push((a, b)),
                }
            }
        }
    }
    out
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

impl RamSection {
    /// The region this section carries.
    pub fn region(&self) -> &Region {
        &self.memory.regions()[self.instance as usize]
    }

    /// What the next save would send (runs the first pass).
    pub fn stats(&mut self) -> Result<RamStats, SectionError> {
        let plan = self.plan()?;
        let len = self.region().range().len();
        let mut stats = RamStats {
            populated: plan.runs.iter().map(|(s, e)| e - s).sum(),
            // The header, the mode byte and the end record.
            payload: PAYLOAD_HEADER + 2,
            ..RamStats::default()
        };
        plan.records::<()>(len, |kind, _, n| {
            stats.records += 1;
            stats.payload += RECORD_HEADER;
            if kind == KIND_DATA {
                stats.data += n;
                stats.payload += n;
            }
            Ok(())
        })
        .expect("infallible");
        self.plan = Some(plan);
        Ok(stats)
    }

    /// The first pass: populated runs and their non-zero pages.
    fn plan(&mut self) -> Result<Plan, SectionError> {
        if let Some(plan) = self.plan.take() {
            return Ok(plan);
        }
        let mut runs = populated_runs(self.region())?;
        if let RamMode::SendDelta(pages) = &self.mode {
            runs = intersect(&runs, pages);
        }
        let region = self.region();
        let len = region.range().len();
        let host = region.host_address();
        let pages = len.div_ceil(RAM_PAGE);
        let mut plan = Plan {
            runs: Vec::new(),
            data: vec![0; pages.div_ceil(64) as usize],
        };
        for &(start, end) in &runs {
            let mut mark = |s: u64, e: u64| {
                let mut off = s;
                while off < e {
                    let n = RAM_PAGE.min(e - off);
                    // SAFETY: [host + off, host + off + n) lies inside the
                    // region's mapping, which `self.memory` keeps alive; the
                    // address is page-aligned.
                    if !unsafe { is_zero((host + off) as *const u8, n as usize) } {
                        plan.set_data(off / RAM_PAGE);
                    }
                    off += n;
                }
            };
            data_extents(self.region(), start, end, &mut mark);
        }
        plan.runs = runs;
        Ok(plan)
    }

    /// Clears `[from, to)` (region offsets) on the destination: discards
    /// the page-aligned middle and writes zeros over unaligned edges.
    fn clear(&self, from: u64, to: u64) -> Result<(), SectionError> {
        if from >= to {
            return Ok(());
        }
        let region = self.region();
        let block = region.block();
        let ps = block.page_size();
        let (bf, bt) = (region.block_offset() + from, region.block_offset() + to);
        let (a, b) = (align_up(bf, ps), align_down(bt, ps));
        let zero = |s: u64, e: u64| -> Result<(), SectionError> {
            let zeros = [0u8; ZERO_CHUNK];
            let mut at = s;
            while at < e {
                let n = (e - at).min(ZERO_CHUNK as u64);
                block.write(at, &zeros[..n as usize]).map_err(SectionError::device)?;
                at += n;
            }
            Ok(())
        };
        if a < b {
            zero(bf, a)?;
            block.discard(a, b - a).map_err(SectionError::device)?;
            zero(b, bt)
        } else {
            zero(bf, bt)
        }
    }

    /// Reads `len` payload bytes straight into the region at `offset`.
    fn read_into(&self, offset: u64, len: u64, payload: &mut dyn Read) -> Result<(), SectionError> {
        let region = self.region();
        let block = region.block();
        if matches!(block.backing(), Backing::Hugetlb { .. }) {
            // Allocate first: a shortage is an error, not SIGBUS.
            let ps = block.page_size();
            let s = align_down(region.block_offset() + offset, ps);
            let e = align_up(region.block_offset() + offset + len, ps).min(block.size());
            block.populate(s, e - s).map_err(SectionError::device)?;
        }
        let ptr = (region.host_address() + offset) as *mut u8;
        // SAFETY: [offset, offset + len) was checked to lie inside the
        // region, whose mapping `self.memory` keeps alive. The destination
        // machine is not running while it loads, so nothing else accesses
        // this memory; any byte pattern is a valid u8.
        let dest = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
        payload.read_exact(dest)?;
        Ok(())
    }
}

impl Section for RamSection {
    fn name(&self) -> &str {
        RAM_SECTION
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        RAM_VERSION
    }

    fn min_version(&self) -> u16 {
        1
    }

    fn priority(&self) -> Priority {
        Priority::RAM
    }

    fn phase(&self) -> Phase {
        Phase::Ram
    }

    fn max_payload(&self) -> u64 {
        let len = self.region().range().len();
        PAYLOAD_HEADER + 2 + len + (len.div_ceil(RAM_PAGE) + 1) * RECORD_HEADER
    }

    fn restores(&self) -> Vec<Restores> {
        vec![Restores::RamContents(self.region().range())]
    }

    fn streaming(&self) -> bool {
        true
    }

    fn save_len(&mut self) -> Result<u64, SectionError> {
        Ok(self.stats()?.payload)
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        let plan = self.plan()?;
        let region = self.region();
        let range = region.range();
        let host = region.host_address();
        let mut header = [0u8; PAYLOAD_HEADER as usize];
        header[..8].copy_from_slice(&range.start().to_le_bytes());
        header[8..16].copy_from_slice(&range.len().to_le_bytes());
        header[16..].copy_from_slice(&(RAM_PAGE as u32).to_le_bytes());
        out.write_all(&header)?;
        let mode = match self.mode {
            RamMode::SendDelta(_) => MODE_DELTA,
            RamMode::Full | RamMode::AcceptDelta => MODE_FULL,
        };
        out.write_all(&[mode])?;
        plan.records(range.len(), |kind, offset, len| -> Result<(), SectionError> {
            let mut rec = [0u8; RECORD_HEADER as usize];
            rec[0] = kind;
            rec[1..9].copy_from_slice(&offset.to_le_bytes());
            rec[9..].copy_from_slice(&len.to_le_bytes());
            out.write_all(&rec)?;
            if kind == KIND_DATA {
                // SAFETY: the record lies inside the region's mapping, which
                // `self.memory` keeps alive. The machine is stopped (module
                // documentation); the bytes are only copied out.
                let bytes = unsafe { std::slice::from_raw_parts((host + offset) as *const u8, len as usize) };
                out.write_all(bytes)?;
            }
            Ok(())
        })?;
        out.write_all(&[KIND_END])?;
        Ok(())
    }

    fn load(&mut self, ctx: &LoadContext, version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let id = self.id();
        let range = self.region().range();
        let manager = self.region().manager().cloned();
        if manager.is_some() {
            ctx.require_manager(&id, range, "says which of its blocks are plugged and may hold data")?;
        }
        let mut header = [0u8; PAYLOAD_HEADER as usize];
        payload.read_exact(&mut header)?;
        let start = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let page = u32::from_le_bytes(header[16..].try_into().expect("4 bytes"));
        if start != range.start() || len != range.len() || u64::from(page) != RAM_PAGE {
            return Err(SectionError::Invalid(format!(
                "the stream carries RAM region [{start:#x}, +{len:#x}) in {page:#x}-byte pages, but this region is {range} in {RAM_PAGE:#x}-byte pages"
            )));
        }
        let delta = if version >= 2 {
            let mut mode = [0u8; 1];
            payload.read_exact(&mut mode)?;
            match (mode[0], &self.mode) {
                (MODE_FULL, _) => false,
                (MODE_DELTA, RamMode::AcceptDelta) => true,
                (MODE_DELTA, _) => {
                    return Err(SectionError::Invalid(format!(
                        "RAM region {range} comes as a delta (only the pages written since a live migration's precopy), which only a live migration's destination accepts"
                    )));
                }
                (other, _) => return Err(SectionError::Invalid(format!("unknown RAM payload mode {other}"))),
            }
        } else {
            false
        };
        // A delta leaves what it does not mention alone; a full payload clears it.
        let clear = |this: &Self, from: u64, to: u64| if delta { Ok(()) } else { this.clear(from, to) };
        let mut cursor = 0u64;
        loop {
            let mut kind = [0u8; 1];
            payload.read_exact(&mut kind)?;
            let kind = kind[0];
            if kind == KIND_END {
                break;
            }
            if kind != KIND_DATA && kind != KIND_ZERO {
                return Err(SectionError::Invalid(format!(
                    "unknown RAM record kind {kind:#04x} after region offset {cursor:#x}"
                )));
            }
            let mut rec = [0u8; 16];
            payload.read_exact(&mut rec)?;
            let offset = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let n = u64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            let end = offset.checked_add(n).filter(|&e| e <= len);
            let valid = n > 0 && offset % RAM_PAGE == 0 && offset >= cursor;
            let Some(end) = end.filter(|&e| valid && (n % RAM_PAGE == 0 || e == len)) else {
                return Err(SectionError::Invalid(format!(
                    "RAM record [{offset:#x}, +{n:#x}) is empty, unaligned, out of order (after {cursor:#x}) or outside the region of {len:#x} bytes"
                )));
            };
            clear(self, cursor, offset)?;
            if kind == KIND_DATA {
                let guest = GuestRange::new(start + offset, n).expect("inside the region");
                if let Some(m) = &manager
                    && !m.is_populated(guest)
                {
                    return Err(SectionError::Invalid(format!(
                        "RAM data for {guest}, which the restored discard manager says is discarded"
                    )));
                }
                self.read_into(offset, n, payload)?;
            } else {
                self.clear(offset, end)?;
            }
            cursor = end;
        }
        clear(self, cursor, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_memory::RamBlock;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn map(backing: Backing) -> (GuestMemoryMap, Arc<RamBlock>) {
        let block = Arc::new(RamBlock::new("ram", 4 * MIB, backing).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, block.clone())
            .unwrap()
            .build()
            .unwrap();
        (map, block)
    }

    #[test]
    fn zero_detection() {
        let page = vec![0u64; 512];
        // SAFETY: a live, aligned buffer of 4096 bytes.
        assert!(unsafe { is_zero(page.as_ptr().cast(), 4096) });
        for at in [0usize, 7, 8, 63, 64, 4095] {
            let mut p = vec![0u64; 512];
            // SAFETY: at < 4096, inside the buffer.
            unsafe { *p.as_mut_ptr().cast::<u8>().add(at) = 1 };
            // SAFETY: as above.
            assert!(!unsafe { is_zero(p.as_ptr().cast(), 4096) }, "{at}");
            // SAFETY: as above; a prefix that excludes the byte.
            assert!(unsafe { is_zero(p.as_ptr().cast(), at) }, "{at}");
        }
    }

    #[test]
    fn next_change_walks_words() {
        let mut plan = Plan {
            runs: vec![],
            data: vec![0; 4],
        };
        for p in [3u64, 4, 5, 130] {
            plan.set_data(p);
        }
        assert_eq!(plan.next_change(0, 256, false), 3);
        assert_eq!(plan.next_change(3, 256, true), 6);
        assert_eq!(plan.next_change(6, 256, false), 130);
        assert_eq!(plan.next_change(6, 100, false), 100);
        assert_eq!(plan.next_change(131, 256, false), 256);
    }

    #[test]
    fn payload_sends_data_and_zero_runs_only() {
        for backing in [Backing::Memfd, Backing::PrivateAnonymous] {
            let (src_map, src) = map(backing);
            src.write(0, &[1; 8192]).unwrap(); // 2 data pages
            src.write(8192, &[0; 4096]).unwrap(); // a populated zero page
            src.write(3 * MIB + 5, b"x").unwrap();
            let mut section = ram_sections(&src_map).pop().unwrap();
            let stats = section.stats().unwrap();
            assert_eq!(stats.data, 3 * RAM_PAGE, "{backing:?}");
            if backing == Backing::Memfd {
                // data, zero (the zero page and the holes after it), data, zero.
                assert_eq!(stats.records, 4, "{stats:?}");
            }
            let mut payload = Vec::new();
            let len = section.save_len().unwrap();
            section.save(&mut payload).unwrap();
            assert_eq!(payload.len() as u64, len);

            let (dst_map, dst) = map(backing);
            dst.write(MIB, &[9; 4096]).unwrap(); // stale data must go
            let mut target = ram_sections(&dst_map).pop().unwrap();
            let ctx = LoadContext::new(Some(dst_map.clone()), vec![]);
            target.load(&ctx, RAM_VERSION, &mut &payload[..]).unwrap();
            // Before reading it back: reading a memfd hole allocates it.
            assert_eq!(dst.resident_bytes(MIB, MIB).unwrap(), 0, "{backing:?}");
            let (mut a, mut b) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
            src.read(0, &mut a).unwrap();
            dst.read(0, &mut b).unwrap();
            assert!(a == b, "{backing:?}: contents differ");
        }
    }

    #[test]
    fn bad_records_are_errors() {
        let (m, block) = map(Backing::Memfd);
        block.write(0, &[1; 4096]).unwrap();
        let mut s = ram_sections(&m).pop().unwrap();
        let len = s.save_len().unwrap();
        let mut payload = Vec::new();
        s.save(&mut payload).unwrap();
        assert_eq!(payload.len() as u64, len);
        let ctx = LoadContext::new(None, vec![]);
        // Every truncation and every byte change of the headers is refused
        // or harmless, and nothing panics.
        for cut in 0..payload.len() - 1 {
            assert!(s.load(&ctx, RAM_VERSION, &mut &payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = payload.clone();
        bad[21 + 9..21 + 17].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = s.load(&ctx, RAM_VERSION, &mut &bad[..]).unwrap_err().to_string();
        assert!(err.contains("outside the region"), "{err}");
        let mut bad = payload.clone();
        bad[21] = 7;
        assert!(
            s.load(&ctx, RAM_VERSION, &mut &bad[..])
                .unwrap_err()
                .to_string()
                .contains("kind 0x07")
        );
        let mut bad = payload.clone();
        bad[20] = 9;
        let err = s.load(&ctx, RAM_VERSION, &mut &bad[..]).unwrap_err().to_string();
        assert!(err.contains("mode 9"), "{err}");
    }

    #[test]
    fn a_version_1_payload_has_no_mode_byte_and_loads_as_full() {
        let (m, block) = map(Backing::Memfd);
        block.write(0, &[1; 4096]).unwrap();
        let mut s = ram_sections(&m).pop().unwrap();
        let mut payload = Vec::new();
        s.save(&mut payload).unwrap();
        assert_eq!(payload[20], MODE_FULL);
        payload.remove(20);
        let (dst_map, dst) = map(Backing::Memfd);
        dst.write(MIB, &[9; 4096]).unwrap();
        let mut target = ram_sections(&dst_map).pop().unwrap();
        let ctx = LoadContext::new(Some(dst_map.clone()), vec![]);
        target.load(&ctx, 1, &mut &payload[..]).unwrap();
        let mut b = vec![0u8; 4096];
        dst.read(0, &mut b).unwrap();
        assert_eq!(b, [1; 4096]);
        dst.read(MIB, &mut b).unwrap();
        assert_eq!(b, [0; 4096], "a full payload clears what it does not mention");
    }

    #[test]
    fn a_delta_carries_only_its_pages_and_only_a_live_destination_takes_it() {
        let (m, src) = map(Backing::Memfd);
        src.write(0, &[1; 4096]).unwrap();
        src.write(MIB, &[2; 4096]).unwrap();
        src.write(2 * MIB, &[3; 4096]).unwrap();
        // The destination holds an older copy: pages 0 and 2 MiB current, 1 MiB stale,
        // and page 3 MiB written since and zeroed on the source again.
        let (dst_map, dst) = map(Backing::Memfd);
        dst.write(0, &[1; 4096]).unwrap();
        dst.write(MIB, &[7; 4096]).unwrap();
        dst.write(2 * MIB, &[3; 4096]).unwrap();
        dst.write(3 * MIB, &[5; 4096]).unwrap();
        let pages = 4 * MIB / RAM_PAGE;
        let mut dirty = PageSet::new(pages);
        dirty.insert(MIB / RAM_PAGE, 1);
        dirty.insert(3 * MIB / RAM_PAGE, 1);
        let mut s = ram_sections(&m).pop().unwrap();
        s.mode = RamMode::SendDelta(dirty);
        let stats = s.stats().unwrap();
        assert_eq!((stats.data, stats.records), (RAM_PAGE, 2), "{stats:?}");
        let len = s.save_len().unwrap();
        let mut payload = Vec::new();
        s.save(&mut payload).unwrap();
        assert_eq!(payload.len() as u64, len);
        assert_eq!(payload[20], MODE_DELTA);
        let ctx = LoadContext::new(Some(dst_map.clone()), vec![]);
        // A snapshot restore (full only) refuses it: it would leave memory as it was.
        let mut full = ram_sections(&dst_map).pop().unwrap();
        let err = full.load(&ctx, RAM_VERSION, &mut &payload[..]).unwrap_err().to_string();
        assert!(err.contains("delta"), "{err}");
        let mut live = ram_sections(&dst_map).pop().unwrap();
        live.mode = RamMode::AcceptDelta;
        live.load(&ctx, RAM_VERSION, &mut &payload[..]).unwrap();
        let (mut a, mut b) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        assert!(a == b, "the delta brought the destination up to date");
    }
}
