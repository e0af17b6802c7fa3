//! `RamBlock`: a host mapping of guest RAM.
//!
//! A [`RamBlock`] owns one contiguous host mapping that backs guest RAM. It
//! can give memory back to the host ([`RamBlock::discard`]), preallocate it
//! ([`RamBlock::populate`]) and measure how much of it is really resident
//! ([`RamBlock::resident_bytes`]).
//!
//! ```
//! use memvisor_memory::{Backing, RamBlock};
//!
//! let block = RamBlock::new("ram0", 2 << 20, Backing::Memfd).unwrap();
//! block.write(0, b"hello").unwrap();
//! block.discard(0, block.size()).unwrap();
//! let mut buf = [0xffu8; 5];
//! block.read(0, &mut buf).unwrap();
//! assert_eq!(buf, [0; 5]);
//! ```
//!
//! # Ranges
//!
//! Every range argument is `[offset, offset + len)`, relative to the start of
//! the block. `discard`, `populate` and `resident_bytes` require `offset` and
//! `len` to be multiples of [`RamBlock::page_size`] and the range to lie
//! inside the block; otherwise they fail with [`RamBlockError::Unaligned`] or
//! [`RamBlockError::OutOfRange`] (which also covers an `offset + len` that
//! overflows `u64`) and do nothing. An empty range (`len == 0`) at a valid
//! offset is accepted and does nothing.
//!
//! # Thread safety
//!
//! `RamBlock` is `Send + Sync`. All operations take `&self`; discarding,
//! populating and measuring *disjoint* ranges from several threads at once is
//! fine. Overlapping concurrent operations are memory-safe too, but their
//! outcome is whatever order the kernel applies them in (a populate racing a
//! discard of the same range may leave it either way): serialising plug and
//! unplug of one range is the caller's job (the `RamDiscardManager` does it).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use std::num::NonZeroUsize;

use vm_memory::FileOffset;
use vm_memory::VolatileMemory;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};

use crate::dirty::{DIRTY_PAGE_SIZE, DirtyBitmap, GuestSlice};

/// `madvise` advice that populates (prefaults writable) page tables, Linux 5.14+.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `MFD_HUGETLB`: create the memfd on the internal hugetlbfs mount.
const MFD_HUGETLB: libc::c_uint = 0x0004;
/// Shift of the log2 of the huge page size in `memfd_create` flags.
const MFD_HUGE_SHIFT: libc::c_uint = 26;
/// Longest name `memfd_create` accepts, without the terminating NUL.
const MEMFD_NAME_MAX: usize = 249;
/// Number of `mincore` entries examined per call by `resident_bytes`.
const MINCORE_CHUNK_PAGES: usize = 64 * 1024;

/// What backs a [`RamBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// A shared memfd (the default), mapped `MAP_SHARED | MAP_NORESERVE`:
    /// discard punches holes in the file.
    #[default]
    Memfd,
    /// Private anonymous memory, mapped
    /// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, with no file: discard
    /// is `MADV_DONTNEED`.
    PrivateAnonymous,
    /// A memfd on hugetlbfs with pages of `page_size` bytes, mapped
    /// `MAP_SHARED | MAP_NORESERVE`: discard punches holes in the file.
    ///
    /// Nothing is reserved up front. Touching a page the host cannot supply
    /// raises `SIGBUS`, so populate a range with [`RamBlock::populate`]
    /// (which reports shortage as [`RamBlockError::OutOfMemory`]) before the
    /// guest or a device may touch it.
    Hugetlb {
        /// Huge page size in bytes (2 MiB or 1 GiB on x86-64).
        page_size: u64,
    },
}

/// Errors of [`RamBlock`] operations. Every variant names the block and the
/// values involved (offsets, lengths and sizes in hex).
#[derive(Debug, thiserror::Error)]
pub enum RamBlockError {
    /// A system call failed.
    #[error("{op} failed for RAM block '{name}': {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The block.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The block's name contains a NUL byte, so it cannot name a memfd.
    #[error("RAM block name {name:?} contains a NUL byte")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The requested size is zero, not a multiple of the page size, or too
    /// large to map.
    #[error("RAM block '{name}': invalid size {size:#x} for page size {page_size:#x}: {reason}")]
    InvalidSize {
        /// The block.
        name: String,
        /// The requested size in bytes.
        size: u64,
        /// The backing's page size in bytes.
        page_size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A [`Backing::Hugetlb`] page size that is not a power of two at least
    /// as large as the base page size.
    #[error("RAM block '{name}': invalid huge page size {page_size:#x}")]
    InvalidPageSize {
        /// The block.
        name: String,
        /// The requested huge page size in bytes.
        page_size: u64,
    },
    /// The host does not have enough huge pages of the requested size (or
    /// does not support that size at all).
    #[error(
        "RAM block '{name}': needs {needed} huge pages of {page_size:#x} bytes but the host has \
         {free} available (see /sys/kernel/mm/hugepages/hugepages-{}kB)",
        page_size / 1024
    )]
    NoHugePages {
        /// The block.
        name: String,
        /// The huge page size in bytes.
        page_size: u64,
        /// Huge pages the block needs (`size / page_size`).
        needed: u64,
        /// Huge pages the host has available: free minus reserved, plus
        /// whatever overcommit still allows; 0 if the size is unsupported.
        free: u64,
    },
    /// A range whose offset or length is not a multiple of the page size.
    #[error(
        "{op} on RAM block '{name}': range offset {offset:#x} length {len:#x} is not aligned to \
         the page size {page_size:#x}"
    )]
    Unaligned {
        /// The operation.
        op: &'static str,
        /// The block.
        name: String,
        /// Start of the range, relative to the block.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The block's page size.
        page_size: u64,
    },
    /// A range that does not lie inside the block, including one whose end
    /// overflows `u64`.
    #[error(
        "{op} on RAM block '{name}': range offset {offset:#x} length {len:#x} is outside the \
         block of size {size:#x}"
    )]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// The block.
        name: String,
        /// Start of the range, relative to the block.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The block's size.
        size: u64,
    },
    /// The host could not supply the memory to populate a range. Part of
    /// the range may have been populated.
    #[error(
        "populate of RAM block '{name}': out of memory at range offset {offset:#x} length \
         {len:#x}: {source}"
    )]
    OutOfMemory {
        /// The block.
        name: String,
        /// Start of the range, relative to the block.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The OS error (`ENOMEM`, `EFAULT` or `ENOSPC`).
        source: std::io::Error,
    },
}

/// A host mapping of guest RAM.
///
/// The mapping is an `Arc<MmapRegion<DirtyBitmap>>` that the guest memory map shares
/// (`GuestRegionMmap::with_arc`). Dropping the block drops its reference:
/// `MmapRegion` unmaps once the last reference is gone, and the memfd
/// (if any) is closed once neither the block nor the mapping holds it.
///
/// See the [module documentation](self) for the range rules and thread
/// safety.
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    size: u64,
    backing: Backing,
    page_size: u64,
    file: Option<Arc<File>>,
    mmap: Arc<MmapRegion<DirtyBitmap>>,
}

/// The base page size of the host.
fn host_page_size() -> u64 {
    // SAFETY: sysconf has no side effects and takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// Huge pages of `page_size` bytes the host can still hand out, or `None` if
/// it does not support that size.
fn available_huge_pages(page_size: u64) -> Option<u64> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024);
    let read = |file: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{file}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let free = read("free_hugepages")?;
    let reserved = read("resv_hugepages").unwrap_or(0);
    let overcommit = read("nr_overcommit_hugepages").unwrap_or(0);
    let surplus = read("surplus_hugepages").unwrap_or(0);
    Some(free.saturating_sub(reserved) + overcommit.saturating_sub(surplus))
}

/// The calling thread's last OS error.
fn last_error() -> io::Error {
    io::Error::last_os_error()
}

impl RamBlock {
    /// Creates a block of `size` bytes backed by `backing`, mapped read-write
    /// with `MAP_NORESERVE`. Nothing is populated: the block starts with
    /// (almost) nothing resident and reads as zero.
    ///
    /// The caller guarantees nothing beyond the arguments. `size` must be a
    /// non-zero multiple of the backing's page size (the base page size, or
    /// the huge page size for [`Backing::Hugetlb`]).
    ///
    /// # Errors
    ///
    /// - [`RamBlockError::InvalidName`] if `name` contains a NUL byte;
    /// - [`RamBlockError::InvalidPageSize`] for a huge page size that is not
    ///   a power of two at least the base page size;
    /// - [`RamBlockError::InvalidSize`] for a zero, unaligned or unmappable
    ///   size;
    /// - [`RamBlockError::NoHugePages`] if a hugetlb block needs more huge
    ///   pages than the host has available;
    /// - [`RamBlockError::Os`] if `memfd_create`, `ftruncate` or `mmap` fails.
    ///
    /// Nothing is left behind on failure.
    pub fn new(name: &str, size: u64, backing: Backing) -> Result<Self, RamBlockError> {
        Self::create(name, size, backing, true)
    }

    /// [`Self::new`], optionally without the huge page availability check
    /// (tests use that to reach the kernel's own out-of-memory answers).
    fn create(name: &str, size: u64, backing: Backing, check_huge_pages: bool) -> Result<Self, RamBlockError> {
        let base_page_size = host_page_size();
        let page_size = match backing {
            Backing::Memfd | Backing::PrivateAnonymous => base_page_size,
            Backing::Hugetlb { page_size } => {
                if !page_size.is_power_of_two() || page_size < base_page_size {
                    return Err(RamBlockError::InvalidPageSize {
                        name: name.to_string(),
                        page_size,
                    });
                }
                page_size
            }
        };
        let invalid_size = |reason| RamBlockError::InvalidSize {
            name: name.to_string(),
            size,
            page_size,
            reason,
        };
        if size == 0 {
            return Err(invalid_size("the size is zero"));
        }
        if size % page_size != 0 {
            return Err(invalid_size("the size is not a multiple of the page size"));
        }
        // The mapping length is a usize and file offsets are off_t (i64).
        let map_len = usize::try_from(size)
            .ok()
            .filter(|_| i64::try_from(size).is_ok() && isize::try_from(size).is_ok())
            .ok_or_else(|| invalid_size("the size is too large to map"))?;
        let os = |op| {
            move |source| RamBlockError::Os {
                op,
                name: name.to_string(),
                source,
            }
        };

        let (file, flags) = match backing {
            Backing::PrivateAnonymous => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            Backing::Memfd | Backing::Hugetlb { .. } => {
                let mut mfd_flags = libc::MFD_CLOEXEC;
                if let Backing::Hugetlb { page_size } = backing {
                    let needed = size / page_size;
                    let free = available_huge_pages(page_size).unwrap_or(0);
                    if check_huge_pages && free < needed {
                        return Err(RamBlockError::NoHugePages {
                            name: name.to_string(),
                            page_size,
                            needed,
                            free,
                        });
                    }
                    mfd_flags |= MFD_HUGETLB | (page_size.trailing_zeros() << MFD_HUGE_SHIFT);
                }
                let file = Arc::new(Self::memfd(name, mfd_flags).map_err(|e| match e {
                    Some(source) => os("memfd_create")(source),
                    None => RamBlockError::InvalidName { name: name.to_string() },
                })?);
                file.set_len(size).map_err(os("ftruncate"))?;
                (Some(file), libc::MAP_SHARED | libc::MAP_NORESERVE)
            }
        };

        let page = NonZeroUsize::new(DIRTY_PAGE_SIZE as usize).expect("4 KiB is not zero");
        let mut builder = MmapRegionBuilder::new_with_bitmap(map_len, DirtyBitmap::new(map_len, page))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(matches!(backing, Backing::Hugetlb { .. }));
        if let Some(file) = &file {
            builder = builder.with_file_offset(FileOffset::from_arc(Arc::clone(file), 0));
        }
        let mmap = builder.build().map_err(|e| {
            os("mmap")(match e {
                vm_memory::mmap::MmapRegionError::Mmap(source) => source,
                other => io::Error::other(other.to_string()),
            })
        })?;
        if matches!(backing, Backing::Memfd) {
            // Transparent huge pages where the host allows them for shmem
            // (`shmem_enabled` = `advise` or more): a guest's memory is then
            // mapped in 2 MiB pages by KVM too, as QEMU's anonymous RAM is.
            // A host that does not allow them ignores the advice.
            // SAFETY: the range is the mapping just created, owned by `mmap`;
            // MADV_HUGEPAGE changes no contents and no protection.
            let ret = unsafe { libc::madvise(mmap.as_ptr().cast(), map_len, libc::MADV_HUGEPAGE) };
            if ret != 0 {
                log::debug!("RAM block {name}: MADV_HUGEPAGE: {}", io::Error::last_os_error());
            }
        }
        Ok(Self {
            name: name.to_string(),
            size,
            backing,
            page_size,
            file,
            mmap: Arc::new(mmap),
        })
    }

    /// Creates a memfd named after the block (truncated to what the kernel
    /// accepts). `Err(None)` means the name contains a NUL byte.
    fn memfd(name: &str, flags: libc::c_uint) -> Result<File, Option<io::Error>> {
        if name.contains('\0') {
            return Err(None);
        }
        let mut end = name.len().min(MEMFD_NAME_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let cname = CString::new(&name[..end]).map_err(|_| None)?;
        // SAFETY: cname is a valid NUL-terminated C string that outlives the
        // call; memfd_create does not keep the pointer.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(Some(last_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The block's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes: a non-zero multiple of [`Self::page_size`].
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The backing's page size: every discard, populate and residency query
    /// is aligned to it.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Host address of the block's first byte. It stays valid for as long as
    /// the block or any clone of [`Self::mmap`] is alive.
    pub fn host_address(&self) -> u64 {
        self.mmap.as_ptr() as u64
    }

    /// The mapping, shared with the guest memory map. Its
    /// [`bitmap`](MmapRegion::bitmap) marks the pages written through it
    /// (see [`crate::dirty`]).
    pub fn mmap(&self) -> &Arc<MmapRegion<DirtyBitmap>> {
        &self.mmap
    }

    /// The memfd, for [`Backing::Memfd`] and [`Backing::Hugetlb`]; `None`
    /// for [`Backing::PrivateAnonymous`].
    pub fn file(&self) -> Option<&File> {
        self.file.as_deref()
    }

    /// Calls `f(start, end)`, in ascending order, for the parts of
    /// `[offset, offset + len)` that may hold data, as block offsets
    /// rounded outward to the base page size and clipped to the range.
    ///
    /// For a file-backed block (memfd, hugetlbfs) these are the file's data
    /// extents (`SEEK_DATA` / `SEEK_HOLE`): holes — discarded or never
    /// touched memory — are skipped without being read, which matters
    /// because reading a hole through the mapping would allocate it. For a
    /// private anonymous block, or if the file system does not support
    /// seeking for data, the whole range is reported.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::Unaligned`] or [`RamBlockError::OutOfRange`] for a bad
    /// range.
    pub fn data_extents(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64)) -> Result<(), RamBlockError> {
        self.check_range("data_extents", offset, len)?;
        let end = offset + len;
        let Some(file) = &self.file else {
            if len > 0 {
                f(offset, end);
            }
            return Ok(());
        };
        let fd = file.as_raw_fd();
        let page = host_page_size();
        let mut pos = offset;
        while pos < end {
            // SAFETY: lseek on a descriptor the block owns; it only moves
            // the file position, which nothing uses (the memory is accessed
            // through mappings).
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    // SEEK_DATA unsupported: everything may be data.
                    f(pos, end);
                }
                // ENXIO: no data at or after `pos`.
                return Ok(());
            }
            let data = data as u64;
            if data >= end {
                return Ok(());
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { (hole as u64).min(end) };
            let start = (data / page * page).max(pos);
            let stop = hole.div_ceil(page).saturating_mul(page).min(end);
            if start < stop {
                f(start, stop);
            }
            pos = stop.max(pos + page);
        }
        Ok(())
    }

    /// Checks that `[offset, offset + len)` is page-aligned and inside the
    /// block, and returns it as a host pointer and length.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(*mut u8, usize), RamBlockError> {
        if offset % self.page_size != 0 || len % self.page_size != 0 {
            return Err(RamBlockError::Unaligned {
                op,
                name: self.name.clone(),
                offset,
                len,
                page_size: self.page_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(RamBlockError::OutOfRange {
                    op,
                    name: self.name.clone(),
                    offset,
                    len,
                    size: self.size,
                });
            }
        }
        // Both fit: the block's size was checked to fit usize at creation.
        let (start, len) = (offset as usize, len as usize);
        // SAFETY: start <= size, so the result is inside the mapping or one
        // past its end.
        let ptr = unsafe { self.mmap.as_ptr().add(start) };
        Ok((ptr, len))
    }

    /// Returns `[offset, offset + len)` to the host: afterwards the range
    /// reads as zero and (up to what other mappings of the memfd pin) no
    /// longer counts as resident.
    ///
    /// Memfd and hugetlb blocks punch a hole in the file
    /// (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`), which also
    /// drops the pages from every mapping of it; private anonymous blocks use
    /// `madvise(MADV_DONTNEED)`.
    ///
    /// The caller guarantees that nobody relies on the range's contents, and
    /// that no device has it pinned for DMA (rule 2 of the design): a pinned
    /// page would stay allocated behind the discard.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::Unaligned`] or [`RamBlockError::OutOfRange`] for a bad
    /// range (nothing is discarded); [`RamBlockError::Os`] if the system call
    /// fails. `len == 0` is a no-op.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), RamBlockError> {
        let (ptr, map_len) = self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match &self.file {
            Some(file) => {
                // SAFETY: fallocate on our own descriptor, with a range that
                // was checked to lie inside the file (offset + len <= size <=
                // i64::MAX); it touches no memory of this process directly.
                let ret = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if ret != 0 {
                    return Err(self.os_error("fallocate(PUNCH_HOLE)", last_error()));
                }
            }
            None => {
                // SAFETY: [ptr, ptr + map_len) is a page-aligned range inside
                // our private anonymous mapping. MADV_DONTNEED only replaces
                // its contents with zero pages; no Rust reference into guest
                // memory is held across the call.
                let ret = unsafe { libc::madvise(ptr.cast(), map_len, libc::MADV_DONTNEED) };
                if ret != 0 {
                    return Err(self.os_error("madvise(MADV_DONTNEED)", last_error()));
                }
            }
        }
        Ok(())
    }

    /// Preallocates `[offset, offset + len)` and maps it writable, without
    /// changing its contents.
    ///
    /// Uses `madvise(MADV_POPULATE_WRITE)`. On kernels without it (before
    /// 5.14, `EINVAL`) it falls back to `fallocate(mode 0)` for memfd and
    /// hugetlb blocks followed by touching every page with an atomic
    /// `fetch_add(0)`, which faults the page in writable but cannot lose a
    /// concurrent write. On a private anonymous block the fallback cannot
    /// detect a shortage: the host's OOM handling applies instead.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::Unaligned`] or [`RamBlockError::OutOfRange`] for a bad
    /// range (nothing is populated); [`RamBlockError::OutOfMemory`] if the
    /// host cannot supply the memory (`ENOMEM`, `EFAULT` — including the
    /// hugetlb case that would otherwise be a `SIGBUS` — or `ENOSPC`); part
    /// of the range may then be populated, and the caller may
    /// [`discard`](Self::discard) it. [`RamBlockError::Os`] for any other
    /// failure. `len == 0` is a no-op.
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), RamBlockError> {
        let (ptr, map_len) = self.check_range("populate", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        loop {
            // SAFETY: [ptr, ptr + map_len) is a page-aligned range inside our
            // read-write mapping; MADV_POPULATE_WRITE faults pages in without
            // changing their contents.
            let ret = unsafe { libc::madvise(ptr.cast(), map_len, MADV_POPULATE_WRITE) };
            if ret == 0 {
                return Ok(());
            }
            let err = last_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::EINVAL) => return self.populate_fallback(offset, len),
                _ => {
                    return Err(self.populate_error("madvise(MADV_POPULATE_WRITE)", offset, len, err));
                }
            }
        }
    }

    /// The pre-5.14 path of [`Self::populate`]; the range is already checked.
    fn populate_fallback(&self, offset: u64, len: u64) -> Result<(), RamBlockError> {
        let (ptr, map_len) = self.check_range("populate", offset, len)?;
        if let Some(file) = &self.file {
            loop {
                // SAFETY: fallocate on our own descriptor with a range inside
                // the file; mode 0 only allocates, existing data is kept (the
                // size cannot grow since offset + len <= size).
                let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
                if ret == 0 {
                    break;
                }
                let err = last_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    return Err(self.populate_error("fallocate", offset, len, err));
                }
            }
        }
        let step = usize::try_from(self.page_size).unwrap_or(usize::MAX);
        for page in (0..map_len).step_by(step) {
            // SAFETY: ptr + page lies inside our read-write mapping, which
            // lives as long as &self. AtomicU8 has size and alignment 1, and
            // every access this crate makes to guest memory is volatile or
            // atomic, so an atomic view of the byte is sound. For file
            // backings the page was just allocated by fallocate, so the
            // access does not fault with SIGBUS.
            let byte = unsafe { AtomicU8::from_ptr(ptr.add(page)) };
            // A write fault, which populates the page. (An idempotent
            // `fetch_add(0)` is compiled to a plain load in release builds,
            // and a read fault maps no page of its own.) Writing 0 over 0
            // changes nothing; a non-zero byte means the page has content,
            // so it is populated already.
            let _ = byte.compare_exchange(0, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Bytes of `[offset, offset + len)` resident in host memory, measured
    /// with `mincore` on the mapping.
    ///
    /// The range must be aligned to [`Self::page_size`] like every other
    /// range (it is not rounded). The result is a multiple of the base page
    /// size. For memfd and hugetlb blocks `mincore` reports page-cache
    /// residency, i.e. pages allocated in the file even if this mapping has
    /// not faulted them in; for private anonymous blocks it reports the pages
    /// present in this mapping. Swapped-out pages do not count. The answer is
    /// a snapshot: concurrent faults, discards and populates change it.
    ///
    /// Memory use is bounded: the range is examined in chunks of 64 Ki pages.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::Unaligned`] or [`RamBlockError::OutOfRange`] for a bad
    /// range; [`RamBlockError::Os`] if `mincore` fails. `len == 0` gives 0.
    pub fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, RamBlockError> {
        let (ptr, map_len) = self.check_range("resident_bytes", offset, len)?;
        let base = host_page_size() as usize;
        let mut vec = vec![0u8; MINCORE_CHUNK_PAGES.min(map_len / base)];
        let mut resident = 0u64;
        let mut done = 0usize;
        while done < map_len {
            let chunk = (map_len - done).min(MINCORE_CHUNK_PAGES * base);
            let pages = chunk / base;
            // SAFETY: [ptr + done, ptr + done + chunk) is a base-page-aligned
            // range inside our mapping, and vec holds at least chunk / base
            // bytes for the kernel to fill.
            let ret = unsafe { libc::mincore(ptr.add(done).cast(), chunk, vec.as_mut_ptr()) };
            if ret != 0 {
                return Err(self.os_error("mincore", last_error()));
            }
            resident += vec[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64 * base as u64;
            done += chunk;
        }
        Ok(resident)
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the block (with
    /// volatile accesses, as guest memory may change under us). Any offset
    /// and length are accepted.
    ///
    /// On a [`Backing::Hugetlb`] block only read populated ranges: reading an
    /// unpopulated page the host cannot supply raises `SIGBUS`.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::OutOfRange`] if the range is not inside the block.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RamBlockError> {
        let slice = self.byte_range("read", offset, buf.len())?;
        slice.copy_to(buf);
        Ok(())
    }

    /// Copies `data` into the block at `offset` (with volatile accesses),
    /// marking the pages written dirty in the mapping's bitmap. Any offset
    /// and length are accepted.
    ///
    /// On a [`Backing::Hugetlb`] block only write populated ranges: writing an
    /// unpopulated page the host cannot supply raises `SIGBUS`.
    ///
    /// # Errors
    ///
    /// [`RamBlockError::OutOfRange`] if the range is not inside the block.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), RamBlockError> {
        let slice = self.byte_range("write", offset, data.len())?;
        slice.copy_from(data);
        Ok(())
    }

    /// A volatile slice of `len` bytes at `offset`, for [`Self::read`] and
    /// [`Self::write`].
    fn byte_range(&self, op: &'static str, offset: u64, len: usize) -> Result<GuestSlice<'_>, RamBlockError> {
        let out_of_range = || RamBlockError::OutOfRange {
            op,
            name: self.name.clone(),
            offset,
            len: len as u64,
            size: self.size,
        };
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        self.mmap.get_slice(start, len).map_err(|_| out_of_range())
    }

    fn os_error(&self, op: &'static str, source: io::Error) -> RamBlockError {
        RamBlockError::Os {
            op,
            name: self.name.clone(),
            source,
        }
    }

    fn populate_error(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> RamBlockError {
        match source.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EFAULT) | Some(libc::ENOSPC) => RamBlockError::OutOfMemory {
                name: self.name.clone(),
                offset,
                len,
                source,
            },
            _ => self.os_error(op, source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn backings() -> [Backing; 2] {
        [Backing::Memfd, Backing::PrivateAnonymous]
    }

    /// Writes a non-zero pattern over `[offset, offset + len)`.
    fn touch(block: &RamBlock, offset: u64, len: u64) {
        let pattern: Vec<u8> = (0..block.page_size()).map(|i| (i % 251) as u8 + 1).collect();
        let mut at = offset;
        while at < offset + len {
            block.write(at, &pattern).unwrap();
            at += block.page_size();
        }
    }

    fn assert_zero(block: &RamBlock, offset: u64, len: u64) {
        let mut buf = vec![0xffu8; len as usize];
        block.read(offset, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "range at {offset:#x} is not zero after discard"
        );
    }

    #[test]
    fn ram_block_data_extents_skip_holes() {
        const MIB: u64 = 1 << 20;
        let block = RamBlock::new("extents", 8 * MIB, Backing::Memfd).unwrap();
        let extents = |offset, len| {
            let mut v = Vec::new();
            block.data_extents(offset, len, |s, e| v.push((s, e))).unwrap();
            v
        };
        assert_eq!(extents(0, 8 * MIB), vec![]);
        block.write(MIB, b"x").unwrap();
        block.write(5 * MIB + 4096, b"y").unwrap();
        let all = extents(0, 8 * MIB);
        assert_eq!(all.len(), 2, "{all:x?}");
        assert!(all[0].0 <= MIB && all[0].1 > MIB, "{all:x?}");
        assert!(all[1].0 <= 5 * MIB + 4096 && all[1].1 > 5 * MIB + 4096, "{all:x?}");
        // Clipped to the range asked for.
        assert_eq!(extents(MIB, 4096), vec![(MIB, MIB + 4096)]);
        block.discard(0, 8 * MIB).unwrap();
        assert_eq!(extents(0, 8 * MIB), vec![]);
        assert_eq!(
            block.resident_bytes(0, 8 * MIB).unwrap(),
            0,
            "walking extents allocates nothing"
        );
        // Anonymous memory has no file: everything may be data.
        let anon = RamBlock::new("anon", 2 * MIB, Backing::PrivateAnonymous).unwrap();
        let mut v = Vec::new();
        anon.data_extents(0, 2 * MIB, |s, e| v.push((s, e))).unwrap();
        assert_eq!(v, vec![(0, 2 * MIB)]);
        assert!(block.data_extents(1, 4096, |_, _| {}).is_err());
    }

    #[test]
    fn ram_block_is_send_sync_and_memfd_by_default() {
        fn check<T: Send + Sync>() {}
        check::<RamBlock>();
        assert_eq!(Backing::default(), Backing::Memfd);
        let block = RamBlock::new("ram0", 2 * MIB, Backing::default()).unwrap();
        assert!(block.file().is_some());
        assert_eq!(block.mmap().size() as u64, block.size());
        assert_eq!(block.host_address(), block.mmap().as_ptr() as u64);
        let anon = RamBlock::new("anon", 2 * MIB, Backing::PrivateAnonymous).unwrap();
        assert!(anon.file().is_none());
    }

    #[test]
    fn ram_block_touch_raises_and_discard_lowers_resident_bytes() {
        for backing in backings() {
            let block = RamBlock::new("touch", 16 * MIB, backing).unwrap();
            let before = block.resident_bytes(0, block.size()).unwrap();
            touch(&block, 4 * MIB, 8 * MIB);
            let touched = block.resident_bytes(0, block.size()).unwrap();
            assert!(
                touched >= before + 8 * MIB,
                "{backing:?}: resident {before:#x} -> {touched:#x} after touching 8 MiB"
            );
            assert_eq!(block.resident_bytes(4 * MIB, 8 * MIB).unwrap(), 8 * MIB);

            block.discard(4 * MIB, 8 * MIB).unwrap();
            let after = block.resident_bytes(0, block.size()).unwrap();
            let freed = touched.saturating_sub(after);
            assert!(
                freed * 100 >= 8 * MIB * 99,
                "{backing:?}: discard freed only {freed:#x} of {:#x}",
                8 * MIB
            );
            assert!(block.resident_bytes(4 * MIB, 8 * MIB).unwrap() * 100 <= 8 * MIB);
            assert_zero(&block, 4 * MIB, 8 * MIB);
        }
    }

    #[test]
    fn ram_block_discard_keeps_neighbours() {
        for backing in backings() {
            let block = RamBlock::new("neighbours", 4 * MIB, backing).unwrap();
            block.write(0, &[0xaa; 4096]).unwrap();
            block.write(2 * MIB, &[0xbb; 4096]).unwrap();
            block.discard(MIB, MIB).unwrap();
            let mut buf = [0u8; 4096];
            block.read(0, &mut buf).unwrap();
            assert_eq!(buf, [0xaa; 4096], "{backing:?}");
            block.read(2 * MIB, &mut buf).unwrap();
            assert_eq!(buf, [0xbb; 4096], "{backing:?}");
        }
    }

    #[test]
    fn ram_block_populate_raises_resident_bytes_and_keeps_content() {
        for backing in backings() {
            let block = RamBlock::new("populate", 64 * MIB, backing).unwrap();
            block.write(0, b"keep me").unwrap();
            let range = 64 * MIB;
            block.populate(0, range).unwrap();
            let resident = block.resident_bytes(0, range).unwrap();
            assert!(
                resident * 100 >= range * 99,
                "{backing:?}: populate left only {resident:#x} of {range:#x} resident"
            );
            let mut buf = [0u8; 7];
            block.read(0, &mut buf).unwrap();
            assert_eq!(&buf, b"keep me", "{backing:?}");
            block.discard(0, range).unwrap();
            assert!(block.resident_bytes(0, range).unwrap() * 100 <= range);
        }
    }

    #[test]
    fn ram_block_populate_fallback_populates_and_keeps_content() {
        for backing in backings() {
            let block = RamBlock::new("fallback", 8 * MIB, backing).unwrap();
            block.write(MIB, b"fallback").unwrap();
            block.populate_fallback(0, 8 * MIB).unwrap();
            let resident = block.resident_bytes(0, 8 * MIB).unwrap();
            assert!(resident * 100 >= 8 * MIB * 99, "{backing:?}: {resident:#x}");
            let mut buf = [0u8; 8];
            block.read(MIB, &mut buf).unwrap();
            assert_eq!(&buf, b"fallback", "{backing:?}");
        }
    }

    #[test]
    fn ram_block_empty_ranges_are_no_ops() {
        let block = RamBlock::new("empty", 2 * MIB, Backing::Memfd).unwrap();
        block.discard(2 * MIB, 0).unwrap();
        block.populate(0, 0).unwrap();
        assert_eq!(block.resident_bytes(MIB, 0).unwrap(), 0);
    }

    #[test]
    fn ram_block_rejects_bad_ranges_naming_values_in_hex() {
        let block = RamBlock::new("ranges", 4 * MIB, Backing::Memfd).unwrap();
        let page = block.page_size();
        type Op = fn(&RamBlock, u64, u64) -> Result<(), RamBlockError>;
        let ops: [(&str, Op); 3] = [
            ("discard", |b, o, l| b.discard(o, l)),
            ("populate", |b, o, l| b.populate(o, l)),
            ("resident_bytes", |b, o, l| b.resident_bytes(o, l).map(drop)),
        ];
        let near_max = u64::MAX - (page - 1);
        for (name, op) in ops {
            let err = op(&block, 0x801, page).unwrap_err();
            assert!(matches!(err, RamBlockError::Unaligned { .. }), "{name}: {err}");
            assert!(err.to_string().contains("0x801"), "{name}: {err}");

            let err = op(&block, 0, 0x1234).unwrap_err();
            assert!(matches!(err, RamBlockError::Unaligned { .. }), "{name}: {err}");
            assert!(err.to_string().contains("0x1234"), "{name}: {err}");

            let err = op(&block, 4 * MIB, page).unwrap_err();
            assert!(matches!(err, RamBlockError::OutOfRange { .. }), "{name}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("0x400000") && text.contains(&format!("{page:#x}")),
                "{name}: {text}"
            );

            let err = op(&block, near_max, 2 * page).unwrap_err();
            assert!(matches!(err, RamBlockError::OutOfRange { .. }), "{name}: {err}");
            assert!(err.to_string().contains(&format!("{near_max:#x}")), "{name}: {err}");
        }
        let err = block.write(4 * MIB - 1, &[0, 0]).unwrap_err();
        assert!(matches!(err, RamBlockError::OutOfRange { .. }), "{err}");
        let err = block.read(u64::MAX, &mut [0]).unwrap_err();
        assert!(matches!(err, RamBlockError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn ram_block_rejects_zero_and_unaligned_sizes() {
        for backing in backings() {
            let err = RamBlock::new("zero", 0, backing).unwrap_err();
            assert!(matches!(err, RamBlockError::InvalidSize { size: 0, .. }), "{err}");
            let err = RamBlock::new("odd", 0x1001, backing).unwrap_err();
            assert!(matches!(err, RamBlockError::InvalidSize { .. }), "{err}");
            assert!(err.to_string().contains("0x1001"), "{err}");
        }
        let err = RamBlock::new("bad\0name", 2 * MIB, Backing::Memfd).unwrap_err();
        assert!(matches!(err, RamBlockError::InvalidName { .. }), "{err}");
        let err = RamBlock::new("hp", 2 * MIB, Backing::Hugetlb { page_size: 3 << 20 }).unwrap_err();
        assert!(matches!(err, RamBlockError::InvalidPageSize { .. }), "{err}");
        let err = RamBlock::new("hp", MIB, Backing::Hugetlb { page_size: 2 * MIB }).unwrap_err();
        assert!(matches!(err, RamBlockError::InvalidSize { .. }), "{err}");
    }

    #[test]
    fn ram_block_hugetlb_needs_huge_pages() {
        let page_size = 2 * MIB;
        let size = 4 * MIB;
        let available = available_huge_pages(page_size).unwrap_or(0);
        match RamBlock::new("huge", size, Backing::Hugetlb { page_size }) {
            Err(RamBlockError::NoHugePages {
                page_size: p,
                needed,
                free,
                ..
            }) => {
                assert!(available < 2, "refused although {available} pages are available");
                assert_eq!((p, needed, free), (page_size, 2, available));
                let err = RamBlock::new("huge", size, Backing::Hugetlb { page_size }).unwrap_err();
                let text = err.to_string();
                assert!(text.contains("0x200000") && text.contains("needs 2"), "{text}");
            }
            Ok(block) => {
                assert!(available >= 2);
                assert_eq!(block.page_size(), page_size);
                block.populate(0, size).unwrap();
                block.write(0, b"huge").unwrap();
                assert_eq!(block.resident_bytes(0, size).unwrap(), size);
                block.discard(0, size).unwrap();
                assert_eq!(block.resident_bytes(0, size).unwrap(), 0);
                let err = block.discard(4096, page_size).unwrap_err();
                assert!(matches!(err, RamBlockError::Unaligned { .. }), "{err}");
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn ram_block_hugetlb_shortage_is_an_error_not_sigbus() {
        let page_size = 2 * MIB;
        let size = 4 * MIB;
        if available_huge_pages(page_size).unwrap_or(0) >= 2 {
            return; // The host can supply the pages: no shortage to provoke.
        }
        let block = match RamBlock::create("short", size, Backing::Hugetlb { page_size }, false) {
            Ok(block) => block,
            // A host without hugetlbfs support at all cannot get this far.
            Err(RamBlockError::Os { .. }) => return,
            Err(other) => panic!("unexpected error: {other}"),
        };
        let err = block.populate(0, size).unwrap_err();
        assert!(matches!(err, RamBlockError::OutOfMemory { .. }), "{err}");
        assert!(err.to_string().contains("0x400000"), "{err}");
        let err = block.populate_fallback(0, size).unwrap_err();
        assert!(matches!(err, RamBlockError::OutOfMemory { .. }), "{err}");
        assert_eq!(block.resident_bytes(0, size).unwrap(), 0);
        block.discard(0, size).unwrap();
    }

    #[test]
    fn ram_block_disjoint_ranges_from_several_threads() {
        let block = RamBlock::new("threads", 16 * MIB, Backing::Memfd).unwrap();
        std::thread::scope(|s| {
            for i in 0..4 {
                let block = &block;
                s.spawn(move || {
                    let offset = i * 4 * MIB;
                    block.populate(offset, 4 * MIB).unwrap();
                    if i % 2 == 0 {
                        block.discard(offset, 4 * MIB).unwrap();
                    }
                });
            }
        });
        assert_eq!(block.resident_bytes(4 * MIB, 4 * MIB).unwrap(), 4 * MIB);
        assert!(block.resident_bytes(0, 4 * MIB).unwrap() * 100 <= 4 * MIB);
    }
}
