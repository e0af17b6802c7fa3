//! Real long-term kernel pinning through io_uring registered buffers.
//!
//! Registering a buffer with io_uring pins its pages with `FOLL_LONGTERM`,
//! exactly as VFIO type1 does for a DMA mapping: the pages are accounted in
//! the process's `VmPin`, and a pinned shmem page survives a hole punched
//! under it (the host does not get it back until it is unpinned). That
//! makes [`UringPinner`] a faithful stand-in for an assigned device's IOMMU
//! context on a machine without one — and a real backend for zero-copy
//! userspace I/O.
//!
//! Each ring holds a sparse table of [`SLOTS_PER_RING`] buffers, updated per
//! map and unmap (`IORING_REGISTER_BUFFERS_UPDATE`); more rings are created
//! as the tables fill. The kernel refuses buffers over 1 GiB, so longer
//! mappings are split over several slots.
//!
//! The per-request path allocates nothing in the common case: a mapping of
//! up to 1 GiB keeps its one slot inline, an unmap gathers the slots it
//! frees on the stack, and slots are cleared from a static table of empty
//! iovecs.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::sync::{Arc, Mutex};

use io_uring::IoUring;
use smallvec::SmallVec;

use crate::mapper::{DmaError, DmaLimits, DmaMapper, IovaRange, Permissions, PinBudget};

/// Buffers in one ring's table: the kernel's maximum (`IORING_MAX_REG_BUFFERS`).
pub const SLOTS_PER_RING: u32 = 1 << 14;

/// Longest buffer the kernel registers in one slot.
pub const MAX_SLOT_BYTES: u64 = 1 << 30;

/// Mapping granularity: the base page size.
pub const PAGE_SIZE: u64 = 4096;

/// Default limit on live mappings (64 rings' worth of slots).
pub const DEFAULT_MAX_MAPPINGS: u64 = 64 * SLOTS_PER_RING as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    ring: u32,
    index: u32,
}

struct RingTable {
    ring: IoUring,
    free: Vec<u32>,
}

/// The slots of one mapping, in IOVA order: a single one, stored inline,
/// for any mapping of up to [`MAX_SLOT_BYTES`].
type MappingSlots = SmallVec<[Slot; 1]>;

/// Slots gathered by one unmap: inline for up to four mappings of up to
/// [`MAX_SLOT_BYTES`] each, spilling to the heap past that.
type FreedSlots = SmallVec<[Slot; 4]>;

struct Mapping {
    len: u64,
    slots: MappingSlots,
}

#[derive(Default)]
struct PinnerState {
    rings: Vec<RingTable>,
    mappings: BTreeMap<u64, Mapping>,
    pinned: u64,
}

/// A [`DmaMapper`] that pins through io_uring registered buffers.
///
/// ```
/// use std::sync::Arc;
/// use memvisor_dma::mapper::{Permissions, DmaMapper, PinBudget};
/// use memvisor_dma::uring::UringPinner;
/// use memvisor_memory::{Backing, RamBlock};
///
/// let ram = RamBlock::new("ram", 4 << 20, Backing::Memfd).unwrap();
/// let pinner = UringPinner::new("dev0", Arc::new(PinBudget::limited(2 << 20)));
/// pinner.map(0x10000, ram.host_address(), 2 << 20, Permissions::READ_WRITE).unwrap();
/// assert_eq!(pinner.pinned_bytes(), 2 << 20);
/// // The budget is full: nothing more is pinned.
/// assert!(pinner.map(0x300000, ram.host_address() + (2 << 20), 4096, Permissions::READ).is_err());
/// assert_eq!(pinner.unmap(0, 1 << 40).unwrap(), 2 << 20);
/// assert_eq!(pinner.pinned_bytes(), 0);
/// ```
pub struct UringPinner {
    name: String,
    budget: Arc<PinBudget>,
    max_mappings: u64,
    inner: Mutex<PinnerState>,
}

impl fmt::Debug for UringPinner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("UringPinner")
            .field("name", &self.name)
            .field("rings", &inner.rings.len())
            .field("mappings", &inner.mappings.len())
            .field("pinned", &inner.pinned)
            .finish()
    }
}

fn iovec(host: u64, len: u64) -> libc::iovec {
    libc::iovec {
        iov_base: host as *mut libc::c_void,
        iov_len: len as usize,
    }
}

/// Slots cleared by one system call at most: one page of empty iovecs.
const CLEAR_CHUNK: usize = 256;

/// Empty iovecs, each clearing the slot it is given to. A constant rather
/// than a `static` because `libc::iovec` holds a raw pointer (so is not
/// `Sync`); [`RingTable::clear`] borrows it as a promoted `'static`, so it
/// is neither built nor copied per call.
const EMPTY_IOVECS: [libc::iovec; CLEAR_CHUNK] = [libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
}; CLEAR_CHUNK];

impl RingTable {
    fn new() -> std::io::Result<Self> {
        let ring = IoUring::new(1)?;
        ring.submitter().register_buffers_sparse(SLOTS_PER_RING)?;
        Ok(Self {
            ring,
            free: (0..SLOTS_PER_RING).rev().collect(),
        })
    }

    /// Points slots `[first, first + bufs.len())` at `bufs`; an empty
    /// iovec clears a slot, which unpins its pages before returning.
    fn update(&self, first: u32, bufs: &[libc::iovec]) -> std::io::Result<()> {
        // SAFETY: every iovec is either empty (clears the slot) or a range
        // of host memory the caller keeps mapped while it is registered
        // (the DmaMapper contract); the kernel pins it and never writes
        // through it unless a read I/O names the slot, which memvisor never
        // submits (its tests only submit writes *from* a slot).
        unsafe { self.ring.submitter().register_buffers_update(first, bufs, None) }
    }

    /// Clears slots `[first, first + n)`, unpinning them, and returns them
    /// to the free list: one system call per [`CLEAR_CHUNK`] slots. A chunk
    /// the kernel fails to clear is logged and kept off the free list.
    fn clear(&mut self, ring: u32, first: u32, n: u32) {
        let empty: &'static [libc::iovec; CLEAR_CHUNK] = &EMPTY_IOVECS;
        let end = first + n;
        let mut index = first;
        while index < end {
            let count = (end - index).min(CLEAR_CHUNK as u32);
            if let Err(e) = self.update(index, &empty[..count as usize]) {
                // Clearing a slot cannot fail on a valid table; if it ever
                // does, the slot stays pinned and must not be reused.
                log::error!("unpinning io_uring slots {index}+{count} of ring {ring} failed: {e}");
            } else {
                self.free.extend((index..index + count).rev());
            }
            index += count;
        }
    }
}

impl UringPinner {
    /// A pinner charging `budget`, with [`DEFAULT_MAX_MAPPINGS`].
    pub fn new(name: &str, budget: Arc<PinBudget>) -> Self {
        Self::with_max_mappings(name, budget, DEFAULT_MAX_MAPPINGS)
    }

    /// A pinner with a limit of `max_mappings` live mappings.
    pub fn with_max_mappings(name: &str, budget: Arc<PinBudget>, max_mappings: u64) -> Self {
        Self {
            name: name.to_string(),
            budget,
            max_mappings,
            inner: Mutex::new(PinnerState::default()),
        }
    }

    /// Number of io_uring instances (tables) in use.
    pub fn ring_count(&self) -> usize {
        self.lock().rings.len()
    }

    /// The budget this pinner charges.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PinnerState> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Unpins `slots`, which held the `bytes` of mappings just removed from
    /// the table, and gives the bytes back to the budget.
    fn unpin(&self, inner: &mut PinnerState, slots: &mut [Slot], bytes: u64) {
        Self::release_slots(inner, slots);
        inner.pinned -= bytes;
        self.budget.release(bytes);
    }

    /// Clears `slots` (unpinning them) and returns them to the free lists,
    /// with one system call per run of consecutive slots in one ring (per
    /// [`CLEAR_CHUNK`] slots of a longer run). Sorts `slots` in place.
    fn release_slots(inner: &mut PinnerState, slots: &mut [Slot]) {
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let start = slots[i];
            let mut n = 1;
            while i + n < slots.len() && slots[i + n].ring == start.ring && slots[i + n].index == start.index + n as u32
            {
                n += 1;
            }
            inner.rings[start.ring as usize].clear(start.ring, start.index, n as u32);
            i += n;
        }
    }

    fn alloc_slot(inner: &mut PinnerState) -> std::io::Result<Slot> {
        if let Some(ring) = inner.rings.iter().position(|r| !r.free.is_empty()) {
            let index = inner.rings[ring].free.pop().expect("non-empty");
            return Ok(Slot {
                ring: ring as u32,
                index,
            });
        }
        let mut table = RingTable::new()?;
        let index = table.free.pop().expect("fresh table");
        inner.rings.push(table);
        Ok(Slot {
            ring: inner.rings.len() as u32 - 1,
            index,
        })
    }

    /// Pins `[host, host + len)` into fresh slots; on failure everything
    /// pinned so far is released.
    fn pin(inner: &mut PinnerState, iova: u64, host: u64, len: u64) -> Result<MappingSlots, DmaError> {
        let mut slots = MappingSlots::with_capacity(len.div_ceil(MAX_SLOT_BYTES) as usize);
        let mut offset = 0;
        while offset < len {
            let chunk = (len - offset).min(MAX_SLOT_BYTES);
            let result = Self::alloc_slot(inner).and_then(|slot| {
                let r = inner.rings[slot.ring as usize].update(slot.index, &[iovec(host + offset, chunk)]);
                if r.is_err() {
                    inner.rings[slot.ring as usize].free.push(slot.index);
                }
                r.map(|()| slot)
            });
            match result {
                Ok(slot) => slots.push(slot),
                Err(source) => {
                    Self::release_slots(inner, &mut slots);
                    return Err(DmaError::Os {
                        op: "io_uring buffer registration",
                        iova,
                        len,
                        source,
                    });
                }
            }
            offset += chunk;
        }
        Ok(slots)
    }
}

/// The last byte of the mapping of `len` (non-zero) bytes at `start`; never
/// overflows, since a mapping ends at the top of the IOVA space at most.
fn last_byte(start: u64, len: u64) -> u64 {
    start + (len - 1)
}

impl DmaMapper for UringPinner {
    fn name(&self) -> &str {
        &self.name
    }

    fn map(&self, iova: u64, host: u64, len: u64, _access: Permissions) -> Result<(), DmaError> {
        if len == 0 || (iova | host | len) % PAGE_SIZE != 0 {
            return Err(DmaError::Unaligned {
                iova,
                host,
                len,
                page_size: PAGE_SIZE,
            });
        }
        // Inclusive ends: the page at the top of the IOVA space is mappable.
        let last = iova
            .checked_add(len - 1)
            .filter(|_| host.checked_add(len - 1).is_some())
            .ok_or(DmaError::IovaOutOfRange { iova, len })?;
        let mut inner = self.lock();
        if let Some((&start, m)) = inner.mappings.range(..=last).next_back()
            && last_byte(start, m.len) >= iova
        {
            return Err(DmaError::Overlap {
                iova,
                len,
                existing: start,
            });
        }
        if inner.mappings.len() as u64 >= self.max_mappings {
            return Err(DmaError::TooManyMappings {
                limit: self.max_mappings,
            });
        }
        self.budget.charge(iova, len)?;
        match Self::pin(&mut inner, iova, host, len) {
            Ok(slots) => {
                inner.mappings.insert(iova, Mapping { len, slots });
                inner.pinned += len;
                Ok(())
            }
            Err(e) => {
                self.budget.release(len);
                Err(e)
            }
        }
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let mut inner = self.lock();
        // The common case, one search: the range is exactly one mapping
        // (which leaves no room for another in it or reaching into it).
        if let Entry::Occupied(found) = inner.mappings.entry(iova)
            && found.get().len == len
        {
            let mut slots = found.remove().slots;
            self.unpin(&mut inner, &mut slots, len);
            return Ok(len);
        }
        // A mapping starting before the range but reaching into it would be split.
        if let Some((&start, m)) = inner.mappings.range(..iova).next_back()
            && last_byte(start, m.len) >= iova
        {
            return Err(DmaError::Split {
                iova,
                len,
                start,
                mapping_len: m.len,
            });
        }
        // Inclusive ends, so that a range reaching the top of the IOVA
        // space does not wrap; past the top there is nothing to unmap.
        let Some(last) = len.checked_sub(1).map(|l| iova.saturating_add(l)) else {
            return Ok(0);
        };
        // Remove the mappings starting in `[iova, last]`, last first, each
        // search looking below the previous one's start (so unmapping a
        // mapping by its own start searches once). Only the last can reach
        // past `last` (mappings do not overlap), and it is checked before
        // anything is removed.
        let mut slots = FreedSlots::new();
        let mut bytes = 0;
        let mut upper = Some(last);
        while let Some(top) = upper
            && let Some((&start, m)) = inner.mappings.range(iova..=top).next_back()
        {
            if last_byte(start, m.len) > last {
                return Err(DmaError::Split {
                    iova,
                    len,
                    start,
                    mapping_len: m.len,
                });
            }
            let m = inner.mappings.remove(&start).expect("found above");
            bytes += m.len;
            slots.extend(m.slots);
            upper = start.checked_sub(1).filter(|&below| below >= iova);
        }
        if bytes == 0 {
            // A hole: nothing to release.
            return Ok(0);
        }
        self.unpin(&mut inner, &mut slots, bytes);
        Ok(bytes)
    }

    fn limits(&self) -> DmaLimits {
        DmaLimits {
            max_mappings: self.max_mappings,
            page_sizes: !(PAGE_SIZE - 1),
            iova_ranges: vec![IovaRange {
                start: 0,
                end: u64::MAX,
            }],
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.lock().pinned
    }

    fn mapping_count(&self) -> u64 {
        self.lock().mappings.len() as u64
    }
}

impl Drop for UringPinner {
    fn drop(&mut self) {
        // Closing a ring releases its buffer table asynchronously (in a
        // kernel worker), so pins would outlive the pinner for a while:
        // clear every slot synchronously first.
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut slots: Vec<Slot> = std::mem::take(&mut inner.mappings)
            .into_values()
            .flat_map(|m| m.slots)
            .collect();
        Self::release_slots(inner, &mut slots);
        self.budget.release(std::mem::take(&mut inner.pinned));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::vm_pin_kib;
    use crate::test_util::serial;
    use memvisor_memory::{Backing, RamBlock};

    const MIB: u64 = 1 << 20;

    fn pinner(budget: Option<u64>) -> UringPinner {
        let budget = budget.map_or_else(PinBudget::unlimited, PinBudget::limited);
        UringPinner::new("test", Arc::new(budget))
    }

    #[test]
    fn pins_are_real_and_visible_in_vmpin() {
        let _g = serial();
        let ram = RamBlock::new("ram", 16 * MIB, Backing::Memfd).unwrap();
        let p = pinner(None);
        let before = vm_pin_kib();
        p.map(0, ram.host_address(), 8 * MIB, Permissions::READ_WRITE).unwrap();
        assert_eq!(vm_pin_kib() - before, 8 * 1024);
        // Pinning faulted the pages in.
        assert_eq!(ram.resident_bytes(0, 8 * MIB).unwrap(), 8 * MIB);
        p.map(8 * MIB, ram.host_address() + 8 * MIB, 4096, Permissions::READ)
            .unwrap();
        assert_eq!(vm_pin_kib() - before, 8 * 1024 + 4);
        assert_eq!((p.pinned_bytes(), p.mapping_count()), (8 * MIB + 4096, 2));
        assert_eq!(p.unmap(0, 16 * MIB).unwrap(), 8 * MIB + 4096);
        assert_eq!(vm_pin_kib(), before);
        assert_eq!(p.pinned_bytes(), 0);
    }

    /// Reads `len` bytes of the pinned buffer behind `iova` through the
    /// kernel's own reference to it (`IORING_OP_WRITE_FIXED` into a pipe).
    fn read_through_pin(p: &UringPinner, iova: u64, host: u64, len: u32) -> Vec<u8> {
        use io_uring::{opcode, types};
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe returned two fresh descriptors we now own.
        let (mut rx, tx) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let mut inner = p.lock();
        let slot = inner.mappings[&iova].slots[0];
        let ring = &mut inner.rings[slot.ring as usize].ring;
        let sqe = opcode::WriteFixed::new(types::Fd(tx.as_raw_fd()), host as *const u8, len, slot.index as u16).build();
        // SAFETY: the buffer is a registered slot that stays pinned while the
        // lock is held; the kernel only reads from it.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.result(), len as i32);
        let mut out = vec![0u8; len as usize];
        rx.read_exact(&mut out).unwrap();
        out
    }

    #[test]
    fn a_pinned_page_survives_a_hole_punched_under_it() {
        let _g = serial();
        let ram = RamBlock::new("ram", 4 * MIB, Backing::Memfd).unwrap();
        ram.write(0, b"still here").unwrap();
        let p = pinner(None);
        let before = vm_pin_kib();
        p.map(0, ram.host_address(), 4 * MIB, Permissions::READ_WRITE).unwrap();
        ram.discard(0, 4 * MIB).unwrap();
        // The file now reads back zeros...
        let mut fresh = [0xffu8; 10];
        ram.read(0, &mut fresh).unwrap();
        assert_eq!(&fresh, &[0; 10]);
        // ...but the pinned page is still alive behind the registered
        // buffer, with its old contents, and still counted: the host did
        // not get it back. This is what DESIGN.md rule 2 prevents.
        assert_eq!(read_through_pin(&p, 0, ram.host_address(), 10), b"still here");
        assert_eq!(vm_pin_kib() - before, 4 * 1024);
        p.unmap(0, 4 * MIB).unwrap();
        assert_eq!(vm_pin_kib(), before);
    }

    #[test]
    fn mappings_over_1gib_are_split_into_slots() {
        let _g = serial();
        // Private anonymous and NORESERVE: pinning faults in zero pages.
        let ram = RamBlock::new("big", (1 << 30) + 8 * MIB, Backing::PrivateAnonymous).unwrap();
        let p = pinner(None);
        let before = vm_pin_kib();
        p.map(
            1 << 32,
            ram.host_address(),
            (1 << 30) + 8 * MIB,
            Permissions::READ_WRITE,
        )
        .unwrap();
        assert_eq!(vm_pin_kib() - before, (1 << 20) + 8 * 1024);
        assert_eq!(p.mapping_count(), 1);
        assert_eq!(p.unmap(1 << 32, (1 << 30) + 8 * MIB).unwrap(), (1 << 30) + 8 * MIB);
        assert_eq!(vm_pin_kib(), before);
    }

    #[test]
    fn scales_past_one_ring_table() {
        let _g = serial();
        let n = u64::from(SLOTS_PER_RING) + 100;
        let ram = RamBlock::new("ram", n * PAGE_SIZE, Backing::Memfd).unwrap();
        let p = pinner(None);
        let fill = || {
            for i in 0..n {
                let at = i * PAGE_SIZE;
                p.map(at, ram.host_address() + at, PAGE_SIZE, Permissions::READ)
                    .unwrap();
            }
        };
        fill();
        assert_eq!(p.ring_count(), 2);
        assert_eq!(p.pinned_bytes(), n * PAGE_SIZE);
        // One unmap clears them all, coalesced per ring.
        assert_eq!(p.unmap(0, n * PAGE_SIZE).unwrap(), n * PAGE_SIZE);
        assert_eq!(p.mapping_count(), 0);
        // Freed slots are reused before any new ring is made.
        fill();
        assert_eq!(p.ring_count(), 2);
        p.unmap(0, u64::MAX).unwrap();
    }

    #[test]
    fn budget_is_enforced_and_nothing_is_pinned_on_refusal() {
        let _g = serial();
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let p = pinner(Some(4 * MIB));
        let before = vm_pin_kib();
        p.map(0, ram.host_address(), 3 * MIB, Permissions::READ_WRITE).unwrap();
        let err = p
            .map(3 * MIB, ram.host_address() + 3 * MIB, 2 * MIB, Permissions::READ_WRITE)
            .unwrap_err();
        assert!(
            matches!(err, DmaError::BudgetExceeded { budget, .. } if budget == 4 * MIB),
            "{err}"
        );
        assert_eq!(vm_pin_kib() - before, 3 * 1024);
        assert_eq!(p.budget().used(), 3 * MIB);
        p.map(3 * MIB, ram.host_address() + 3 * MIB, MIB, Permissions::READ_WRITE)
            .unwrap();
        drop(p);
        assert_eq!(vm_pin_kib(), before, "dropping the pinner unpins everything");
    }

    #[test]
    fn overlap_split_and_alignment_are_refused() {
        let _g = serial();
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        let p = pinner(None);
        p.map(2 * MIB, h, 2 * MIB, Permissions::READ).unwrap();
        assert!(matches!(
            p.map(3 * MIB, h, 2 * MIB, Permissions::READ),
            Err(DmaError::Overlap { existing, .. }) if existing == 2 * MIB
        ));
        assert!(matches!(
            p.map(MIB, h, 2 * MIB, Permissions::READ),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            p.map(0, h + 1, 4096, Permissions::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            p.map(0, h, 0, Permissions::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            p.map(u64::MAX - 4095, h, 8192, Permissions::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(matches!(p.unmap(3 * MIB, 4 * MIB), Err(DmaError::Split { start, .. }) if start == 2 * MIB));
        assert!(matches!(p.unmap(MIB, 2 * MIB), Err(DmaError::Split { .. })));
        // Starting where the mapping starts is not enough to take it whole.
        assert!(matches!(p.unmap(2 * MIB, MIB), Err(DmaError::Split { start, .. }) if start == 2 * MIB));
        assert_eq!(p.pinned_bytes(), 2 * MIB);
        // Holes are fine.
        assert_eq!(p.unmap(0, 2 * MIB).unwrap(), 0);
        assert_eq!(p.unmap(0, 8 * MIB).unwrap(), 2 * MIB);
        // A range starting at a mapping and reaching past it takes the
        // mappings inside it, whatever lies between.
        p.map(2 * MIB, h, MIB, Permissions::READ).unwrap();
        p.map(4 * MIB, h, MIB, Permissions::READ).unwrap();
        assert_eq!(p.unmap(2 * MIB, 4 * MIB).unwrap(), 2 * MIB);
        assert_eq!(p.pinned_bytes(), 0);
    }

    #[test]
    fn mapping_limit_is_enforced() {
        let _g = serial();
        let ram = RamBlock::new("ram", MIB, Backing::Memfd).unwrap();
        let p = UringPinner::with_max_mappings("small", Arc::new(PinBudget::unlimited()), 2);
        p.map(0, ram.host_address(), 4096, Permissions::READ).unwrap();
        p.map(4096, ram.host_address(), 4096, Permissions::READ).unwrap();
        assert!(matches!(
            p.map(8192, ram.host_address(), 4096, Permissions::READ),
            Err(DmaError::TooManyMappings { limit: 2 })
        ));
        assert_eq!(p.limits().max_mappings, 2);
    }

    /// The page at the top of the IOVA space (its end, 2^64, does not fit
    /// a u64) maps, refuses overlaps and unmaps like any other.
    #[test]
    fn the_top_iova_page_maps_and_unmaps() {
        let _g = serial();
        let ram = RamBlock::new("ram", MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        let p = pinner(None);
        let top = u64::MAX - 4095;
        p.map(top, h, 4096, Permissions::READ_WRITE).unwrap();
        assert_eq!(p.pinned_bytes(), 4096);
        assert!(matches!(
            p.map(top - 4096, h, 8192, Permissions::READ),
            Err(DmaError::Overlap { existing, .. }) if existing == top
        ));
        p.map(top - 4096, h, 4096, Permissions::READ).unwrap();
        // Exactly the top page, then everything up to the top.
        assert_eq!(p.unmap(top, 4096).unwrap(), 4096);
        p.map(top, h, 4096, Permissions::READ).unwrap();
        assert!(matches!(p.unmap(top - 4096, 4096 + 1), Err(DmaError::Split { start, .. }) if start == top));
        // A length cannot reach the last byte from 0: [0, 2^64 - 2] would
        // split the top page.
        assert!(matches!(p.unmap(0, u64::MAX), Err(DmaError::Split { start, .. }) if start == top));
        assert_eq!(p.unmap(top - 4096, 8192).unwrap(), 8192);
        assert_eq!(p.pinned_bytes(), 0);
        // A range reaching past the top unmaps what is there.
        p.map(top, h, 4096, Permissions::READ).unwrap();
        assert_eq!(p.unmap(top, 8192).unwrap(), 4096);
    }
}
