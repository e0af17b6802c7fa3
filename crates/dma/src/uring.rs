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
//!
//! A pinner's [session](DmaMapper::session) (the vIOMMU bridge's) has
//! rings of its own, so that its pins take no lock of the pinner's (the
//! bridge's own lock orders them), and keeps its mappings out of the
//! pinner's IOVA-ordered map: the [`PinKey`] of one of up to 1 GiB names its
//! slot, next to which its IOVA and length are kept, so that pinning and
//! unpinning it costs no search, whatever the number of live mappings.
//! (Longer ones, several slots each, are kept in a slab.) The budget, the
//! mapping limit and the counts of pinned bytes and mappings are the
//! pinner's, shared with its sessions.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::IoUring;
use smallvec::SmallVec;

use crate::mapper::{DmaError, DmaLimits, DmaMapper, IovaRange, Permissions, PinBudget, PinKey, PinSession};

/// Buffers in one ring's table: the kernel's maximum (`IORING_MAX_REG_BUFFERS`).
pub const SLOTS_PER_RING: u32 = 1 << 14;

/// Longest buffer the kernel registers in one slot.
pub const MAX_SLOT_BYTES: u64 = 1 << 30;

/// Mapping granularity: the base page size.
pub const PAGE_SIZE: u64 = 4096;

/// Most pieces one `preadv`/`pwritev` of [`UringPinner::transfer`] takes
/// (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Default limit on live mappings (64 rings' worth of slots).
pub const DEFAULT_MAX_MAPPINGS: u64 = 64 * SLOTS_PER_RING as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    ring: u32,
    index: u32,
}

/// The [`PinKey`] of a session's pin: for one of up to [`MAX_SLOT_BYTES`],
/// its slot (ring in the high 32 bits, index in the low ones); with this
/// bit set, an index into `UringSession::long`.
const LONG_KEY: u64 = 1 << 63;

impl Slot {
    fn key(self) -> PinKey {
        PinKey(u64::from(self.ring) << 32 | u64::from(self.index))
    }
}

struct RingTable {
    ring: IoUring,
    /// Slots that were used and are free again, last freed on top.
    free: Vec<u32>,
    /// Slots `[unused, SLOTS_PER_RING)` were never used: a new table lists
    /// no slot, rather than all 16,384 of them.
    unused: u32,
    /// For every slot ever used, the IOVA and length of the mapping a
    /// session pinned there (a length of 0 if none): what `unpin` checks
    /// its key against.
    pinned: Vec<SessionPin>,
}

/// A session's pin, kept beside its slot: IOVA and length (what `unpin`
/// checks its key against; a length of 0 if the slot holds none), and the
/// host address (what the budget releases).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SessionPin {
    iova: u64,
    len: u64,
    host: u64,
}

/// The slots of one mapping, in IOVA order: a single one, stored inline,
/// for any mapping of up to [`MAX_SLOT_BYTES`].
type MappingSlots = SmallVec<[Slot; 1]>;

/// Slots gathered by one unmap: inline for up to four mappings of up to
/// [`MAX_SLOT_BYTES`] each, spilling to the heap past that.
type FreedSlots = SmallVec<[Slot; 4]>;

struct Mapping {
    len: u64,
    /// Host address of the mapping's first byte (its slots follow on, one
    /// per [`MAX_SLOT_BYTES`]).
    host: u64,
    slots: MappingSlots,
}

fn iovec(host: u64, len: u64) -> libc::iovec {
    libc::iovec {
        iov_base: host as *mut libc::c_void,
        iov_len: len as usize,
    }
}

/// `IORING_REGISTER_BUFFERS_UPDATE` (`include/uapi/linux/io_uring.h`).
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;

/// `struct io_uring_rsrc_update2` (`include/uapi/linux/io_uring.h`), the
/// argument of `IORING_REGISTER_BUFFERS_UPDATE`.
#[repr(C)]
struct RsrcUpdate2 {
    offset: u32,
    resv: u32,
    data: u64,
    tags: u64,
    nr: u32,
    resv2: u32,
}

const _: () = assert!(std::mem::size_of::<RsrcUpdate2>() == 32);

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
    /// A table on a ring of one entry: registration needs no submission.
    fn new() -> std::io::Result<Self> {
        let ring = IoUring::new(1)?;
        ring.submitter().register_buffers_sparse(SLOTS_PER_RING)?;
        Ok(Self {
            ring,
            free: Vec::new(),
            unused: 0,
            pinned: Vec::new(),
        })
    }

    /// A free slot of this table, if it has one.
    #[inline]
    fn take_slot(&mut self) -> Option<u32> {
        if let Some(index) = self.free.pop() {
            return Some(index);
        }
        let index = self.unused;
        (index < SLOTS_PER_RING).then(|| {
            self.unused += 1;
            self.pinned.push(SessionPin::default());
            index
        })
    }

    /// Points slots `[first, first + bufs.len())` at `bufs`; an empty
    /// iovec clears a slot, which unpins its pages before returning.
    ///
    /// This is the system call `io_uring::Submitter::register_buffers_update`
    /// makes (`IORING_REGISTER_BUFFERS_UPDATE`, no tags), made directly: it
    /// runs twice per vIOMMU MAP + UNMAP, and the crate's path to it (a
    /// `Submitter` built per call, the registered-ring check, two layers of
    /// `Result`) took more instructions than the rest of a slot update.
    #[inline]
    fn update(&self, first: u32, bufs: &[libc::iovec]) -> std::io::Result<()> {
        let update = RsrcUpdate2 {
            offset: first,
            resv: 0,
            data: bufs.as_ptr() as u64,
            tags: 0,
            nr: bufs.len() as u32,
            resv2: 0,
        };
        // SAFETY: `update` is a valid `io_uring_rsrc_update2` naming `bufs`,
        // which outlives the call. Every iovec is either empty (clears the
        // slot) or a range of host memory the caller keeps mapped while it
        // is registered (the DmaMapper contract); the kernel pins it and
        // writes through it only for a read I/O naming the slot, which only
        // `UringPinner::transfer` submits, into guest memory the mapping
        // gives the device.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring.as_raw_fd(),
                IORING_REGISTER_BUFFERS_UPDATE,
                &update as *const RsrcUpdate2,
                std::mem::size_of::<RsrcUpdate2>() as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// [`clear`](Self::clear) of one slot, the common case (a mapping of
    /// up to 1 GiB), without the chunking.
    #[inline(always)]
    fn clear_one(&mut self, ring: u32, index: u32) {
        let empty: &'static [libc::iovec; CLEAR_CHUNK] = &EMPTY_IOVECS;
        match self.update(index, &empty[..1]) {
            Ok(()) => self.free.push(index),
            Err(e) => log::error!("unpinning io_uring slot {index} of ring {ring} failed: {e}"),
        }
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
            } else if count == 1 {
                self.free.push(index);
            } else {
                self.free.extend((index..index + count).rev());
            }
            index += count;
        }
    }
}

/// The rings of a pinner or of a session, and their free slots.
#[derive(Default)]
struct Slots {
    rings: Vec<RingTable>,
    /// The lowest ring that may have a free slot (every ring below it is
    /// full), where the search for a free slot starts.
    first_free_ring: usize,
}

impl Slots {
    /// Slots with their first ring set up now (a session's, when its
    /// device is attached) rather than inside the guest's first MAP; if
    /// that fails (no io_uring), it is tried again at the first pin, which
    /// then fails with the reason.
    fn with_first_ring() -> Self {
        Self {
            rings: RingTable::new().map(|ring| vec![ring]).unwrap_or_default(),
            first_free_ring: 0,
        }
    }

    /// A free slot, in the lowest ring that has one (a new ring if all are
    /// full). The search starts at `first_free_ring`, so that it does not
    /// walk the full rings on every pin.
    #[inline]
    fn alloc(&mut self) -> std::io::Result<Slot> {
        let mut ring = self.first_free_ring;
        while let Some(table) = self.rings.get_mut(ring) {
            if let Some(index) = table.take_slot() {
                self.first_free_ring = ring;
                return Ok(Slot {
                    ring: ring as u32,
                    index,
                });
            }
            ring += 1;
        }
        self.new_ring()
    }

    /// A slot of a new ring, made because every ring is full (or none
    /// exists yet): rare, so kept out of the pinning path.
    #[cold]
    #[inline(never)]
    fn new_ring(&mut self) -> std::io::Result<Slot> {
        let mut table = RingTable::new()?;
        let index = table.take_slot().expect("fresh table");
        self.rings.push(table);
        self.first_free_ring = self.rings.len() - 1;
        Ok(Slot {
            ring: self.rings.len() as u32 - 1,
            index,
        })
    }

    /// Pins `[host, host + len)` (at most [`MAX_SLOT_BYTES`]) into a free
    /// slot; on failure the slot is free again.
    #[inline(always)]
    fn pin(&mut self, host: u64, len: u64) -> std::io::Result<Slot> {
        let slot = self.alloc()?;
        let ring = &mut self.rings[slot.ring as usize];
        if let Err(e) = ring.update(slot.index, &[iovec(host, len)]) {
            // Never pinned: back on the free list.
            ring.free.push(slot.index);
            self.first_free_ring = self.first_free_ring.min(slot.ring as usize);
            return Err(e);
        }
        Ok(slot)
    }

    /// Pins `[host, host + len)` into fresh slots, one per
    /// [`MAX_SLOT_BYTES`]; on failure everything pinned so far is released.
    fn pin_all(&mut self, iova: u64, host: u64, len: u64) -> Result<MappingSlots, DmaError> {
        let os = |source| DmaError::Os {
            op: "io_uring buffer registration",
            iova,
            len,
            source,
        };
        if len <= MAX_SLOT_BYTES {
            // Every mapping of up to 1 GiB: one slot, no loop.
            return self.pin(host, len).map(|slot| smallvec::smallvec![slot]).map_err(os);
        }
        let mut slots = MappingSlots::new();
        let mut offset = 0;
        while offset < len {
            let chunk = (len - offset).min(MAX_SLOT_BYTES);
            match self.pin(host + offset, chunk) {
                Ok(slot) => slots.push(slot),
                Err(source) => {
                    self.release(&mut slots);
                    return Err(os(source));
                }
            }
            offset += chunk;
        }
        Ok(slots)
    }

    /// Clears the one slot of a mapping of up to 1 GiB, unpinning it.
    #[inline(always)]
    fn release_one(&mut self, slot: Slot) {
        self.rings[slot.ring as usize].clear_one(slot.ring, slot.index);
        self.first_free_ring = self.first_free_ring.min(slot.ring as usize);
    }

    /// Clears `slots` (unpinning them) and returns them to the free lists,
    /// with one system call per run of consecutive slots in one ring (per
    /// [`CLEAR_CHUNK`] slots of a longer run). Sorts `slots` in place.
    fn release(&mut self, slots: &mut [Slot]) {
        if let [slot] = slots {
            // A mapping of up to 1 GiB: nothing to sort or coalesce.
            self.release_one(*slot);
            return;
        }
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let start = slots[i];
            let mut n = 1;
            while i + n < slots.len() && slots[i + n].ring == start.ring && slots[i + n].index == start.index + n as u32
            {
                n += 1;
            }
            self.rings[start.ring as usize].clear(start.ring, start.index, n as u32);
            self.first_free_ring = self.first_free_ring.min(start.ring as usize);
            i += n;
        }
    }

    /// Every slot a session pinned one mapping in, with the pin
    /// (`RingTable::pinned`).
    fn session_slots(&self) -> impl Iterator<Item = (Slot, SessionPin)> + '_ {
        self.rings.iter().enumerate().flat_map(|(ring, table)| {
            table
                .pinned
                .iter()
                .enumerate()
                .filter(|(_, pin)| pin.len != 0)
                .map(move |(index, &pin)| {
                    let slot = Slot {
                        ring: ring as u32,
                        index: index as u32,
                    };
                    (slot, pin)
                })
        })
    }
}

/// What the pinner's lock guards: its own rings and its mappings by IOVA.
struct PinnerState {
    slots: Slots,
    mappings: BTreeMap<u64, Mapping>,
    /// Bytes pinned by `map` (the sessions count their own).
    pinned: u64,
}

/// What a pinner shares with its sessions: the budget, the mapping limit,
/// and the counts of every pin, its own and its sessions'.
struct Accounts {
    budget: Arc<PinBudget>,
    max_mappings: u64,
    pinned: AtomicU64,
    mappings: AtomicU64,
}

impl Accounts {
    /// Takes one mapping of the limit and charges `len` bytes at `host`
    /// to the budget, all or nothing.
    #[inline]
    fn charge(&self, iova: u64, host: u64, len: u64) -> Result<(), DmaError> {
        let max = self.max_mappings;
        self.mappings
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| DmaError::TooManyMappings { limit: max })?;
        if let Err(e) = self.budget.charge(iova, host, len) {
            self.mappings.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// Counts `len` pinned bytes, after [`charge`](Self::charge) and the pin.
    #[inline]
    fn pinned(&self, len: u64) {
        self.pinned.fetch_add(len, Ordering::AcqRel);
    }

    /// Undoes [`charge`](Self::charge) for one mapping of `len` bytes at
    /// `host` that was never pinned, or is unpinned now.
    #[inline]
    fn refund(&self, host: u64, len: u64) {
        self.mappings.fetch_sub(1, Ordering::AcqRel);
        self.budget.release(host, len);
    }

    /// [`refund`](Self::refund) of a mapping that was counted pinned.
    #[inline]
    fn unpinned(&self, host: u64, len: u64) {
        self.pinned.fetch_sub(len, Ordering::AcqRel);
        self.refund(host, len);
    }
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
    /// Whether sessions pin through `map` (see [`UringPinner::for_io`]).
    io: bool,
    accounts: Arc<Accounts>,
    inner: Mutex<PinnerState>,
}

impl fmt::Debug for UringPinner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringPinner")
            .field("name", &self.name)
            .field("rings", &self.ring_count())
            .field("mappings", &self.mapping_count())
            .field("pinned", &self.pinned_bytes())
            .finish()
    }
}

impl UringPinner {
    /// A pinner charging `budget`, with [`DEFAULT_MAX_MAPPINGS`].
    pub fn new(name: &str, budget: Arc<PinBudget>) -> Self {
        Self::with_max_mappings(name, budget, DEFAULT_MAX_MAPPINGS)
    }

    /// A pinner with a limit of `max_mappings` live mappings (its
    /// sessions' included).
    pub fn with_max_mappings(name: &str, budget: Arc<PinBudget>, max_mappings: u64) -> Self {
        Self::build(name, budget, max_mappings, false)
    }

    fn build(name: &str, budget: Arc<PinBudget>, max_mappings: u64, io: bool) -> Self {
        Self {
            name: name.to_string(),
            io,
            accounts: Arc::new(Accounts {
                budget,
                max_mappings,
                pinned: AtomicU64::new(0),
                mappings: AtomicU64::new(0),
            }),
            inner: Mutex::new(PinnerState {
                // Made at the first `map`: a pinner used only through a
                // session (path 2) needs no ring of its own.
                slots: Slots::default(),
                mappings: BTreeMap::new(),
                pinned: 0,
            }),
        }
    }

    /// A pinner whose registered buffers are also the target of I/O
    /// ([`transfer`](Self::transfer)): a zero-copy device's DMA context.
    /// Its [sessions](DmaMapper::session) pin through [`map`](DmaMapper::map),
    /// so that every mapping, the vIOMMU bridge's included, is found by
    /// IOVA; they take the pinner's lock (and a search) per pin, which the
    /// pinning-only pinner avoids.
    pub fn for_io(name: &str, budget: Arc<PinBudget>) -> Self {
        Self::build(name, budget, DEFAULT_MAX_MAPPINGS, true)
    }

    /// Moves data between the file `fd` from `offset` on and the guest
    /// memory the mappings of the IOVA `ranges` (`(iova, len)`, in file
    /// order) pin: `preadv` ([`Transfer::Read`]: file → memory) or
    /// `pwritev` (memory → file) straight on the pinned pages, pieces that
    /// are adjacent in host memory merged, up to `IOV_MAX` of them per
    /// call. No copy in memvisor and no page pinned per I/O: the pages are
    /// pinned already. A range may span several mappings, but every byte
    /// of every range must be mapped, or nothing is transferred.
    ///
    /// Not io_uring's `READ_FIXED`/`WRITE_FIXED` on the registered
    /// buffers: those take one submission per piece, and a guest request
    /// is up to 128 scattered 4 KiB pages; a buffered write to a file
    /// system without asynchronous buffered writes (tmpfs) is then handed
    /// to a kernel worker piece by piece. Measured on tmpfs, 32 MiB in
    /// requests of 128 scattered pages: 32–83 ms as fixed submissions,
    /// 8–11 ms as one vectored call per request.
    ///
    /// Runs under the pinner's lock, so no mapping of the range is
    /// unpinned until the I/O is complete. A short transfer is continued;
    /// end of file is an error ([`std::io::ErrorKind::UnexpectedEof`]).
    pub fn transfer(&self, fd: RawFd, offset: u64, ranges: &[(u64, u64)], dir: Transfer) -> Result<(), TransferError> {
        let inner = self.lock();
        // (host address, length) in file order, adjacent pieces merged.
        let mut pieces: SmallVec<[(u64, u64); 16]> = SmallVec::new();
        for &(iova, len) in ranges {
            let not_mapped = || TransferError::NotMapped { iova, len };
            let end = iova.checked_add(len).ok_or_else(not_mapped)?;
            let mut at = iova;
            while at < end {
                let Some((&start, m)) = inner.mappings.range(..=at).next_back() else {
                    return Err(not_mapped());
                };
                let offset_in = at - start;
                if offset_in >= m.len {
                    return Err(not_mapped());
                }
                let n = (end - at).min(m.len - offset_in);
                let host = m.host + offset_in;
                match pieces.last_mut() {
                    Some((h, l)) if *h + *l == host => *l += n,
                    _ => pieces.push((host, n)),
                }
                at += n;
            }
        }
        let mut file_offset = offset;
        // The next byte to move: piece `index`, `skip` bytes in.
        let (mut index, mut skip) = (0usize, 0u64);
        while index < pieces.len() {
            let iov: SmallVec<[libc::iovec; 16]> = pieces[index..]
                .iter()
                .take(IOV_MAX)
                .enumerate()
                .map(|(k, &(host, len))| {
                    let from = if k == 0 { skip } else { 0 };
                    libc::iovec {
                        iov_base: (host + from) as *mut libc::c_void,
                        iov_len: (len - from) as usize,
                    }
                })
                .collect();
            let at = file_offset as libc::off_t;
            // SAFETY: every iovec lies inside a mapping of this pinner,
            // which pins (and the VMM maps) its memory while the lock is
            // held, which it is until the call returns.
            let n = unsafe {
                match dir {
                    Transfer::Read => libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, at),
                    Transfer::Write => libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, at),
                }
            };
            let source = match n {
                0 if matches!(dir, Transfer::Read) => std::io::ErrorKind::UnexpectedEof.into(),
                0 => std::io::ErrorKind::WriteZero.into(),
                n if n < 0 => std::io::Error::last_os_error(),
                _ => {
                    let mut n = n as u64;
                    file_offset += n;
                    while n > 0 {
                        let rest = pieces[index].1 - skip;
                        if n < rest {
                            skip += n;
                            break;
                        }
                        n -= rest;
                        (index, skip) = (index + 1, 0);
                    }
                    continue;
                }
            };
            if source.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TransferError::Io {
                dir,
                offset: file_offset,
                source,
            });
        }
        Ok(())
    }

    /// Number of io_uring instances (tables) the pinner's own mappings use
    /// (its sessions have their own).
    pub fn ring_count(&self) -> usize {
        self.lock().slots.rings.len()
    }

    /// The budget this pinner charges.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.accounts.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PinnerState> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Unpins `slots`, which held the mappings `unpinned` (host address,
    /// length) just removed from the table, and gives them back to the
    /// accounts.
    fn release(&self, inner: &mut PinnerState, slots: &mut [Slot], unpinned: &[(u64, u64)]) {
        inner.slots.release(slots);
        for &(host, len) in unpinned {
            inner.pinned -= len;
            self.accounts.unpinned(host, len);
        }
    }

    /// Checks what `map` and `pin` are given: page-aligned, non-empty, and
    /// not wrapping around the IOVA or host address space.
    #[inline]
    fn check(iova: u64, host: u64, len: u64) -> Result<(), DmaError> {
        if len == 0 || (iova | host | len) % PAGE_SIZE != 0 {
            return Err(DmaError::Unaligned {
                iova,
                host,
                len,
                page_size: PAGE_SIZE,
            });
        }
        // Inclusive ends: the page at the top of the IOVA space is mappable.
        if iova.checked_add(len - 1).is_none() || host.checked_add(len - 1).is_none() {
            return Err(DmaError::IovaOutOfRange { iova, len });
        }
        Ok(())
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
        Self::check(iova, host, len)?;
        let last = last_byte(iova, len);
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
        self.accounts.charge(iova, host, len)?;
        let slots = match inner.slots.pin_all(iova, host, len) {
            Ok(slots) => slots,
            Err(e) => {
                self.accounts.refund(host, len);
                return Err(e);
            }
        };
        inner.mappings.insert(iova, Mapping { len, host, slots });
        inner.pinned += len;
        self.accounts.pinned(len);
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let mut inner = self.lock();
        // The common case, one search: the range is exactly one mapping
        // (which leaves no room for another in it or reaching into it).
        if let Entry::Occupied(found) = inner.mappings.entry(iova)
            && found.get().len == len
        {
            let Mapping { host, mut slots, .. } = found.remove();
            self.release(&mut inner, &mut slots, &[(host, len)]);
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
        let mut unpinned: SmallVec<[(u64, u64); 4]> = SmallVec::new();
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
            unpinned.push((m.host, m.len));
            slots.extend(m.slots);
            upper = start.checked_sub(1).filter(|&below| below >= iova);
        }
        if unpinned.is_empty() {
            // A hole: nothing to release.
            return Ok(0);
        }
        self.release(&mut inner, &mut slots, &unpinned);
        Ok(unpinned.iter().map(|&(_, len)| len).sum())
    }

    fn session(self: Arc<Self>) -> Box<dyn PinSession> {
        if self.io {
            return crate::mapper::mapper_session(self);
        }
        Box::new(UringSession {
            accounts: self.accounts.clone(),
            slots: Slots::with_first_ring(),
            long: Vec::new(),
            vacant: Vec::new(),
            pinned: 0,
            count: 0,
        })
    }

    fn limits(&self) -> DmaLimits {
        DmaLimits {
            max_mappings: self.accounts.max_mappings,
            page_sizes: !(PAGE_SIZE - 1),
            iova_ranges: vec![IovaRange {
                start: 0,
                end: u64::MAX,
            }],
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.accounts.pinned.load(Ordering::Acquire)
    }

    fn mapping_count(&self) -> u64 {
        self.accounts.mappings.load(Ordering::Acquire)
    }
}

impl Drop for UringPinner {
    fn drop(&mut self) {
        // Closing a ring releases its buffer table asynchronously (in a
        // kernel worker), so pins would outlive the pinner for a while:
        // clear every slot synchronously first.
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let mappings = std::mem::take(&mut inner.mappings);
        let unpinned: Vec<(u64, u64)> = mappings.values().map(|m| (m.host, m.len)).collect();
        let mut slots: Vec<Slot> = mappings.into_values().flat_map(|m| m.slots).collect();
        inner.slots.release(&mut slots);
        for (host, len) in unpinned {
            self.accounts.unpinned(host, len);
        }
        inner.pinned = 0;
    }
}

/// Which way a [`UringPinner::transfer`] moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// From the file into guest memory (`preadv`).
    Read,
    /// From guest memory into the file (`pwritev`).
    Write,
}

/// Why a [`UringPinner::transfer`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Part of a range is not mapped (not pinned): nothing was transferred.
    #[error("IOVA range [{iova:#x}, +{len:#x}) is not entirely mapped")]
    NotMapped {
        /// Start of the range.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// The I/O failed at `offset` of the file (what came before it is done).
    #[error("{dir:?} at file offset {offset}: {source}")]
    Io {
        /// Its direction.
        dir: Transfer,
        /// The file offset of the failed part.
        offset: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A mapping of more than [`MAX_SLOT_BYTES`] pinned by a session.
struct Long {
    iova: u64,
    mapping: Mapping,
}

/// The [`PinSession`] of a [`UringPinner`]: rings of its own, so that its
/// pins take no lock (its owner orders its calls), and mappings kept by
/// [`PinKey`] rather than by IOVA; the accounts are the pinner's.
struct UringSession {
    accounts: Arc<Accounts>,
    slots: Slots,
    /// Mappings of more than one slot, by key: a slab whose vacant entries
    /// are listed in `vacant`. (The others are kept beside their slot,
    /// `RingTable::pinned`.)
    long: Vec<Option<Long>>,
    vacant: Vec<u32>,
    /// Bytes and mappings pinned by this session.
    pinned: u64,
    count: u64,
}

impl UringSession {
    /// `pin` of a mapping longer than one slot: kept in the `long` slab.
    #[cold]
    fn pin_long(&mut self, iova: u64, host: u64, len: u64) -> Result<PinKey, DmaError> {
        if self.vacant.is_empty() && self.long.len() >= u32::MAX as usize {
            return Err(DmaError::TooManyMappings {
                limit: u64::from(u32::MAX),
            });
        }
        self.accounts.charge(iova, host, len)?;
        let slots = match self.slots.pin_all(iova, host, len) {
            Ok(slots) => slots,
            Err(e) => {
                self.accounts.refund(host, len);
                return Err(e);
            }
        };
        let long = Some(Long {
            iova,
            mapping: Mapping { len, host, slots },
        });
        let index = match self.vacant.pop() {
            Some(index) => {
                self.long[index as usize] = long;
                index
            }
            None => {
                self.long.push(long);
                self.long.len() as u32 - 1
            }
        };
        self.pinned(len);
        Ok(PinKey(LONG_KEY | u64::from(index)))
    }

    /// `unpin` of a mapping made by `pin_long`: the bytes unpinned.
    #[cold]
    fn unpin_long(&mut self, index: u64, iova: u64, len: u64) -> u64 {
        let Some(entry) = usize::try_from(index).ok().and_then(|i| self.long.get_mut(i)) else {
            return 0;
        };
        if !entry.as_ref().is_some_and(|l| l.iova == iova && l.mapping.len == len) {
            return 0;
        }
        let Long { mapping, .. } = entry.take().expect("checked above");
        self.vacant.push(index as u32);
        let mut slots = mapping.slots;
        self.slots.release(&mut slots);
        self.unpinned(mapping.host, len);
        len
    }

    #[inline]
    fn pinned(&mut self, len: u64) {
        self.pinned += len;
        self.count += 1;
        self.accounts.pinned(len);
    }

    #[inline]
    fn unpinned(&mut self, host: u64, len: u64) {
        self.pinned -= len;
        self.count -= 1;
        self.accounts.unpinned(host, len);
    }
}

impl PinSession for UringSession {
    fn pin(&mut self, iova: u64, host: u64, len: u64, _access: Permissions) -> Result<PinKey, DmaError> {
        UringPinner::check(iova, host, len)?;
        if len > MAX_SLOT_BYTES {
            return self.pin_long(iova, host, len);
        }
        // The common case: one slot, no slot list, kept beside the slot.
        self.accounts.charge(iova, host, len)?;
        let slot = match self.slots.pin(host, len) {
            Ok(slot) => slot,
            Err(source) => {
                self.accounts.refund(host, len);
                return Err(DmaError::Os {
                    op: "io_uring buffer registration",
                    iova,
                    len,
                    source,
                });
            }
        };
        self.slots.rings[slot.ring as usize].pinned[slot.index as usize] = SessionPin { iova, len, host };
        self.pinned(len);
        Ok(slot.key())
    }

    fn unpin(&mut self, key: PinKey, iova: u64, len: u64) -> Result<u64, DmaError> {
        if key.0 & LONG_KEY != 0 {
            return Ok(self.unpin_long(key.0 & !LONG_KEY, iova, len));
        }
        let slot = Slot {
            ring: (key.0 >> 32) as u32,
            index: key.0 as u32,
        };
        let entry = self
            .slots
            .rings
            .get_mut(slot.ring as usize)
            .and_then(|table| table.pinned.get_mut(slot.index as usize));
        let host = match entry {
            Some(entry) if len != 0 && (entry.iova, entry.len) == (iova, len) => {
                // A length of 0 frees the entry (the rest is overwritten
                // by the next pin).
                entry.len = 0;
                entry.host
            }
            _ => return Ok(0),
        };
        self.slots.release_one(slot);
        self.unpinned(host, len);
        Ok(len)
    }
}

impl Drop for UringSession {
    fn drop(&mut self) {
        // As for the pinner: clear every slot synchronously, before the
        // rings close.
        let long: Vec<Long> = std::mem::take(&mut self.long).into_iter().flatten().collect();
        let mut unpinned: Vec<(u64, u64)> = long.iter().map(|l| (l.mapping.host, l.mapping.len)).collect();
        let mut slots: Vec<Slot> = long.into_iter().flat_map(|l| l.mapping.slots).collect();
        for (slot, pin) in self.slots.session_slots() {
            slots.push(slot);
            unpinned.push((pin.host, pin.len));
        }
        self.slots.release(&mut slots);
        for (host, len) in unpinned {
            self.accounts.unpinned(host, len);
        }
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
        let ring = &mut inner.slots.rings[slot.ring as usize].ring;
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

    /// A session's pins are real, charged to the pinner's budget and limit
    /// and counted in its figures, kept apart from its IOVA index, found by
    /// their key alone, and unpinned when the session is dropped.
    #[test]
    fn session_pins_are_keyed_and_share_the_accounts() {
        let _g = serial();
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        let rw = Permissions::READ_WRITE;
        let p = Arc::new(UringPinner::with_max_mappings(
            "s",
            Arc::new(PinBudget::limited(3 * MIB)),
            3,
        ));
        let before = vm_pin_kib();
        let mut s = p.clone().session();
        let a = s.pin(0x1000_0000, h, MIB, rw).unwrap();
        // The pinner's own map does not see the session's pins (its owner
        // keeps its mappings apart), but shares the accounts.
        p.map(0x1000_0000, h + MIB, MIB, rw).unwrap();
        assert_eq!((p.pinned_bytes(), p.mapping_count()), (2 * MIB, 2));
        assert_eq!(vm_pin_kib() - before, 2 * 1024);
        assert_eq!(p.ring_count(), 1, "the session pinned into rings of its own");
        assert!(matches!(
            s.pin(0x2000_0000, h + 2 * MIB, 2 * MIB, rw),
            Err(DmaError::BudgetExceeded { .. })
        ));
        let b = s.pin(0x2000_0000, h + 2 * MIB, 4096, rw).unwrap();
        assert!(matches!(
            s.pin(0x3000_0000, h, 4096, rw),
            Err(DmaError::TooManyMappings { limit: 3 })
        ));
        assert!(matches!(s.pin(0, h + 1, 4096, rw), Err(DmaError::Unaligned { .. })));
        // Nothing refused was charged or pinned.
        assert_eq!((p.budget().used(), p.mapping_count()), (2 * MIB + 4096, 3));
        // A key unpins only the mapping it names, once.
        assert_eq!(s.unpin(a, 0x1000_0000 + 4096, MIB).unwrap(), 0);
        assert_eq!(s.unpin(a, 0x1000_0000, 4096).unwrap(), 0);
        assert_eq!(s.unpin(PinKey(7 << 32), 0x1000_0000, MIB).unwrap(), 0);
        assert_eq!(s.unpin(a, 0x1000_0000, MIB).unwrap(), MIB);
        assert_eq!(s.unpin(a, 0x1000_0000, MIB).unwrap(), 0);
        // `unmap` removes the pinner's own mapping, not the session's.
        assert_eq!(p.unmap(0x2000_0000, 4096).unwrap(), 0);
        assert_eq!(p.unmap(0x1000_0000, MIB).unwrap(), MIB);
        assert_eq!(
            (p.pinned_bytes(), p.mapping_count(), p.budget().used()),
            (4096, 1, 4096)
        );
        assert_eq!(vm_pin_kib() - before, 4);
        // Dropping the session unpins what it still holds (`b`).
        let _ = b;
        drop(s);
        assert_eq!((p.pinned_bytes(), p.mapping_count(), p.budget().used()), (0, 0, 0));
        assert_eq!(vm_pin_kib(), before);
    }

    #[test]
    fn session_pins_over_1gib_take_several_slots() {
        let _g = serial();
        let len = (1 << 30) + 8 * MIB;
        let ram = RamBlock::new("big", len, Backing::PrivateAnonymous).unwrap();
        let p = Arc::new(pinner(None));
        let before = vm_pin_kib();
        let mut s = p.clone().session();
        let key = s
            .pin(1 << 32, ram.host_address(), len, Permissions::READ_WRITE)
            .unwrap();
        assert_eq!(vm_pin_kib() - before, (1 << 20) + 8 * 1024);
        assert_eq!((p.pinned_bytes(), p.mapping_count()), (len, 1));
        assert_eq!(s.unpin(key, 1 << 32, len - 4096).unwrap(), 0);
        assert_eq!(s.unpin(key, 1 << 32, len).unwrap(), len);
        assert_eq!(vm_pin_kib(), before);
        // Dropped with a long pin still held: unpinned too.
        s.pin(1 << 32, ram.host_address(), len, Permissions::READ).unwrap();
        drop(s);
        assert_eq!((p.pinned_bytes(), p.mapping_count()), (0, 0));
        assert_eq!(vm_pin_kib(), before);
    }

    #[test]
    fn transfers_use_the_pinned_buffers_across_mappings_and_sessions() {
        use std::os::fd::AsRawFd;
        let _g = serial();
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        let path = std::env::temp_dir().join(format!("memvisor-uring-transfer-{}", std::process::id()));
        let pattern: Vec<u8> = (0..6 * MIB).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &pattern).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let fd = file.as_raw_fd();
        let p = Arc::new(UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited())));
        // Two adjacent mappings, one of them a session's (the vIOMMU
        // bridge's path): a transfer spans both.
        p.map(0x10_0000, h, 2 * MIB, Permissions::READ_WRITE).unwrap();
        let mut s = p.clone().session();
        s.pin(0x30_0000, h + 2 * MIB, 2 * MIB, Permissions::READ_WRITE).unwrap();
        p.transfer(fd, MIB, &[(0x10_0000, 4 * MIB)], Transfer::Read).unwrap();
        let mut back = vec![0u8; 4 * MIB as usize];
        ram.read(0, &mut back).unwrap();
        assert!(
            back == pattern[MIB as usize..5 * MIB as usize],
            "the file's bytes are in guest memory"
        );
        // Memory → file, from the middle of the second mapping.
        ram.write(3 * MIB, &[0xAB; 4096]).unwrap();
        p.transfer(fd, 0, &[(0x30_0000 + MIB, 4096)], Transfer::Write).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[..4096], [0xAB; 4096]);
        // A range reaching past the mappings, even after a good one:
        // refused, nothing moved.
        ram.write(0, &[7; 16]).unwrap();
        assert!(matches!(
            p.transfer(fd, 0, &[(0x10_0000, 4096), (0x10_0000, 4 * MIB + 4096)], Transfer::Read),
            Err(TransferError::NotMapped { len, .. }) if len == 4 * MIB + 4096
        ));
        assert!(matches!(
            p.transfer(fd, 0, &[(0, 4096)], Transfer::Read),
            Err(TransferError::NotMapped { .. })
        ));
        let mut first = [0u8; 16];
        ram.read(0, &mut first).unwrap();
        assert_eq!(first, [7; 16], "a refused transfer touches no memory");
        // Reading past the end of the file is an error, not a silent zero fill.
        let eof = p
            .transfer(fd, 6 * MIB, &[(0x10_0000, 4096)], Transfer::Read)
            .unwrap_err();
        assert!(
            matches!(&eof, TransferError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{eof}"
        );
        // Unpinned by the session: no longer a target.
        drop(s);
        assert!(matches!(
            p.transfer(fd, 0, &[(0x30_0000, 4096)], Transfer::Read),
            Err(TransferError::NotMapped { .. })
        ));
        assert_eq!(p.pinned_bytes(), 2 * MIB);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_transfer_of_many_scattered_pieces_is_batched_and_complete() {
        use std::os::fd::AsRawFd;
        let _g = serial();
        const PAGES: u64 = 3 * IOV_MAX as u64 + 5;
        let ram = RamBlock::new("ram", PAGES * PAGE_SIZE, Backing::Memfd).unwrap();
        let path = std::env::temp_dir().join(format!("memvisor-uring-batch-{}", std::process::id()));
        let pattern: Vec<u8> = (0..PAGES * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ (i % 253) as u8)
            .collect();
        std::fs::write(&path, &pattern).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let p = UringPinner::for_io("disk0", Arc::new(PinBudget::unlimited()));
        // IOVA page i is host page PAGES-1-i: every piece is a mapping of its own.
        for i in 0..PAGES {
            let host = ram.host_address() + (PAGES - 1 - i) * PAGE_SIZE;
            p.map(i * PAGE_SIZE, host, PAGE_SIZE, Permissions::READ_WRITE).unwrap();
        }
        p.transfer(file.as_raw_fd(), 0, &[(0, PAGES * PAGE_SIZE)], Transfer::Read)
            .unwrap();
        for i in 0..PAGES {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            ram.read((PAGES - 1 - i) * PAGE_SIZE, &mut page).unwrap();
            let want = &pattern[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
            assert!(page == want, "page {i}");
        }
        // And back out, reversed in the file by the same scatter.
        std::fs::write(&path, vec![0u8; pattern.len()]).unwrap();
        p.transfer(file.as_raw_fd(), 0, &[(0, PAGES * PAGE_SIZE)], Transfer::Write)
            .unwrap();
        assert!(std::fs::read(&path).unwrap() == pattern);
        std::fs::remove_file(&path).unwrap();
    }
}
