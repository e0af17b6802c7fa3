//! VFIO type1 backend: a [`DmaMapper`] over one VFIO container holding one
//! IOMMU group.
//!
//! [`VfioContainerMapper::open`] opens `/dev/vfio/vfio` (through
//! `vfio-ioctls`'s [`VfioContainer`], which checks the API version and the
//! `VFIO_TYPE1v2_IOMMU` extension), opens `/dev/vfio/<group>`, checks that
//! the group is viable and not already in a container, attaches it
//! (`VFIO_GROUP_SET_CONTAINER`), selects the type1v2 IOMMU
//! (`VFIO_SET_IOMMU`) and reads `VFIO_IOMMU_GET_INFO` with its capability
//! chain: the IOMMU page sizes, the usable IOVA ranges
//! (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`) and the number of DMA mappings
//! still available (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`).
//!
//! Every mapping is one `VFIO_IOMMU_MAP_DMA` (read and write permissions
//! from [`Access`]) and is unmapped by one `VFIO_IOMMU_UNMAP_DMA` of exactly
//! its range, whose returned size is checked. The mapper keeps its own table
//! of live mappings, so it refuses overlaps and splits before the kernel
//! sees them, and [`DmaMapper::pinned_bytes`] and
//! [`DmaMapper::mapping_count`] are exact. The [`PinBudget`] is charged
//! before the kernel pins and released if it refuses.
//!
//! The kernel pins with the container's memory-lock accounting (`locked_vm`,
//! not `VmPin`); a VMM holding `CAP_IPC_LOCK` is bounded only by the
//! [`PinBudget`]. Dropping the mapper unmaps what is left, then closes the
//! group and the container.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memvisor_dma::mapper::{Access, DmaMapper, PinBudget};
//! use memvisor_dma::vfio::VfioContainerMapper;
//!
//! // IOMMU group 42 holds a device bound to vfio-pci.
//! let mapper = VfioContainerMapper::open("nic0", 42, Arc::new(PinBudget::unlimited()))?;
//! let limits = mapper.limits();
//! println!("page sizes {:#x}, iova ranges {:?}", limits.page_sizes, limits.iova_ranges);
//! # let host = 0;
//! mapper.map(0x1_0000_0000, host, 2 << 20, Access::READ_WRITE)?;
//! assert_eq!(mapper.unmap(0, u64::MAX)?, 2 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The device itself is opened from the group with
//! `VFIO_GROUP_GET_DEVICE_FD` on [`VfioContainerMapper::group_fd`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_TYPE, VFIO_TYPE1v2_IOMMU, vfio_group_status, vfio_info_cap_header,
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, vfio_iova_range,
};
use vfio_ioctls::{VfioContainer, VfioError};

use crate::mapper::{Access, DmaError, DmaLimits, DmaMapper, IovaRange, PinBudget};

/// The VFIO container device.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// The directory holding the VFIO group devices (`/dev/vfio/<group>`).
pub const VFIO_GROUP_DIR: &str = "/dev/vfio";

/// Type1's default `dma_entry_limit`: the mapping limit assumed when the
/// kernel does not report `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL` (before 5.10).
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65535;

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`.
const fn vfio_io(nr: u32) -> libc::c_ulong {
    // _IOC_NONE is 1 (at bit 29) on these architectures, 0 elsewhere.
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    ))]
    const IOC_NONE: libc::c_ulong = 1 << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    )))]
    const IOC_NONE: libc::c_ulong = 0;
    IOC_NONE | ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + nr) as libc::c_ulong
}

const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

/// Size of `struct vfio_iommu_type1_info`: where its capability chain may begin.
const INFO_SIZE: usize = size_of::<vfio_iommu_type1_info>();
/// Size of `struct vfio_info_cap_header`.
const CAP_HEADER_SIZE: usize = size_of::<vfio_info_cap_header>();
/// `struct vfio_iommu_type1_info_cap_iova_range` up to its array.
const IOVA_RANGE_CAP_SIZE: usize = CAP_HEADER_SIZE + 8;
/// `struct vfio_iommu_type1_info_dma_avail`.
const DMA_AVAIL_CAP_SIZE: usize = CAP_HEADER_SIZE + 4;
/// Largest info buffer accepted from the kernel (a sanity bound on `argsz`).
const MAX_INFO_SIZE: u32 = 1 << 20;

/// Errors opening a container and attaching a group.
#[derive(Debug, thiserror::Error)]
pub enum VfioSetupError {
    /// The container device could not be opened.
    #[error("cannot open the VFIO container {path}: {source} (is the vfio module loaded?)")]
    OpenContainer {
        /// Its path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The kernel speaks another VFIO API version.
    #[error("VFIO container {path}: the kernel reports API version {found}, memvisor speaks {expected}")]
    ApiVersion {
        /// The container path.
        path: PathBuf,
        /// What `VFIO_GET_API_VERSION` returned (negative: the failing errno).
        found: i64,
        /// The version memvisor speaks.
        expected: u32,
    },
    /// The kernel lacks the type1v2 IOMMU backend.
    #[error("VFIO container {path} does not support the type1v2 IOMMU (VFIO_TYPE1v2_IOMMU)")]
    NoType1v2 {
        /// The container path.
        path: PathBuf,
    },
    /// Any other container error from `vfio-ioctls`.
    #[error("VFIO container {path}: {source}")]
    Container {
        /// The container path.
        path: PathBuf,
        /// The error.
        source: VfioError,
    },
    /// The group device could not be opened.
    #[error("cannot open VFIO group {group} at {path}: {source} (is a device of the group bound to vfio-pci?)")]
    OpenGroup {
        /// The group number.
        group: u32,
        /// Its path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `VFIO_GROUP_GET_STATUS` failed.
    #[error("VFIO_GROUP_GET_STATUS on group {group} failed: {source}")]
    GroupStatus {
        /// The group number.
        group: u32,
        /// The error.
        source: io::Error,
    },
    /// Some device of the group is bound to a host driver other than vfio.
    #[error(
        "VFIO group {group} is not viable (status flags {flags:#x}): bind every device of the group to vfio-pci or unbind it"
    )]
    GroupNotViable {
        /// The group number.
        group: u32,
        /// The status flags.
        flags: u32,
    },
    /// The group already belongs to a container (another process or mapper).
    #[error("VFIO group {group} is already attached to a container (status flags {flags:#x})")]
    GroupInUse {
        /// The group number.
        group: u32,
        /// The status flags.
        flags: u32,
    },
    /// `VFIO_GROUP_SET_CONTAINER` failed.
    #[error("VFIO_GROUP_SET_CONTAINER of group {group} failed: {source}")]
    SetContainer {
        /// The group number.
        group: u32,
        /// The error.
        source: io::Error,
    },
    /// `VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)` failed.
    #[error("VFIO_SET_IOMMU(type1v2) on the container of group {group} failed: {source}")]
    SetIommu {
        /// The group number.
        group: u32,
        /// The error.
        source: io::Error,
    },
    /// `VFIO_IOMMU_GET_INFO` failed.
    #[error("VFIO_IOMMU_GET_INFO on the container of group {group} failed: {source}")]
    IommuInfo {
        /// The group number.
        group: u32,
        /// The error.
        source: io::Error,
    },
    /// `VFIO_IOMMU_GET_INFO` returned something malformed.
    #[error("VFIO_IOMMU_GET_INFO on the container of group {group}: {source}")]
    MalformedInfo {
        /// The group number.
        group: u32,
        /// What is wrong with it.
        source: InfoError,
    },
}

/// What is wrong with a `VFIO_IOMMU_GET_INFO` buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// The buffer is shorter than `struct vfio_iommu_type1_info`.
    #[error("info buffer of {len} bytes is shorter than the {INFO_SIZE}-byte header")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// The kernel reported no IOMMU page sizes.
    #[error("no IOMMU page sizes reported (flags {flags:#x}, iova_pgsizes {pgsizes:#x})")]
    NoPageSizes {
        /// The info flags.
        flags: u32,
        /// The page size mask.
        pgsizes: u64,
    },
    /// The kernel says the capabilities need more room than the buffer has.
    #[error("capabilities need {argsz} bytes but the buffer holds {len}")]
    ArgszTooLarge {
        /// The `argsz` reported.
        argsz: u32,
        /// The buffer length.
        len: usize,
    },
    /// A capability lies (partly) outside the buffer or inside the header.
    #[error("capability at offset {offset:#x} ({needed} bytes) lies outside the {len}-byte buffer or its header")]
    CapOutOfBounds {
        /// Offset of the capability.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// The buffer length.
        len: usize,
    },
    /// A `next` offset does not point past the current capability: the
    /// chain would loop or overlap.
    #[error("capability at offset {offset:#x} has next offset {next:#x}, which does not move forward")]
    CapChainLoop {
        /// Offset of the capability.
        offset: u64,
        /// Its `next` field.
        next: u32,
    },
    /// A capability appears twice.
    #[error("capability id {id} appears twice (second at offset {offset:#x})")]
    DuplicateCap {
        /// The capability id.
        id: u16,
        /// Offset of the second one.
        offset: u64,
    },
    /// An IOVA range ends before it starts.
    #[error("IOVA range {index} is inverted: start {start:#x} > end {end:#x}")]
    InvertedRange {
        /// Index of the range in the capability.
        index: u32,
        /// Its start.
        start: u64,
        /// Its (inclusive) end.
        end: u64,
    },
}

/// What `VFIO_IOMMU_GET_INFO` reports for a type1 container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (bit n set: 2^n-byte pages), never 0.
    pub page_sizes: u64,
    /// Usable IOVA ranges, sorted, if the kernel reported them
    /// (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`, Linux 5.4+).
    pub iova_ranges: Option<Vec<IovaRange>>,
    /// DMA mappings still available, if reported
    /// (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`, Linux 5.10+).
    pub dma_avail: Option<u32>,
}

impl IommuInfo {
    /// The smallest IOMMU page size: the alignment of every mapping.
    pub fn min_page_size(&self) -> u64 {
        1 << self.page_sizes.trailing_zeros().min(63)
    }

    /// The usable IOVA ranges: the reported ones, or all of the address
    /// space when the kernel does not report them.
    pub fn usable_ranges(&self) -> Vec<IovaRange> {
        self.iova_ranges.clone().unwrap_or_else(|| {
            vec![IovaRange {
                start: 0,
                end: u64::MAX,
            }]
        })
    }

    /// The mapping limit of a container with `live` mappings when this info
    /// was read: `dma_avail + live`, or [`DEFAULT_DMA_ENTRY_LIMIT`].
    pub fn max_mappings(&self, live: u64) -> u64 {
        self.dma_avail
            .map_or(DEFAULT_DMA_ENTRY_LIMIT, |avail| u64::from(avail) + live)
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks that `needed` bytes at `offset` lie in `buf` after the info
/// header, and returns the offset as a `usize`.
fn cap_bounds(buf: &[u8], offset: u64, needed: u64) -> Result<usize, InfoError> {
    let err = InfoError::CapOutOfBounds {
        offset,
        needed,
        len: buf.len(),
    };
    match offset.checked_add(needed) {
        Some(end) if offset >= INFO_SIZE as u64 && end <= buf.len() as u64 => Ok(offset as usize),
        _ => Err(err),
    }
}

/// Parses a `VFIO_IOMMU_GET_INFO` result: `struct vfio_iommu_type1_info`
/// followed by its capability chain, in native byte order, as the kernel
/// wrote it into `buf`.
///
/// Every offset and count is bounds-checked; the chain must move strictly
/// forward (so it ends); a malformed buffer is an [`InfoError`], never a
/// panic. Unknown capabilities (and the migration one) are skipped.
pub fn parse_iommu_info(buf: &[u8]) -> Result<IommuInfo, InfoError> {
    if buf.len() < INFO_SIZE {
        return Err(InfoError::Truncated { len: buf.len() });
    }
    let argsz = read_u32(buf, 0);
    let flags = read_u32(buf, 4);
    let pgsizes = read_u64(buf, 8);
    let cap_offset = read_u32(buf, 16);
    if flags & VFIO_IOMMU_INFO_PGSIZES == 0 || pgsizes == 0 {
        return Err(InfoError::NoPageSizes { flags, pgsizes });
    }
    let mut info = IommuInfo {
        page_sizes: pgsizes,
        iova_ranges: None,
        dma_avail: None,
    };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || cap_offset == 0 {
        return Ok(info);
    }
    if argsz as usize > buf.len() {
        return Err(InfoError::ArgszTooLarge { argsz, len: buf.len() });
    }
    let mut offset = u64::from(cap_offset);
    loop {
        let at = cap_bounds(buf, offset, CAP_HEADER_SIZE as u64)?;
        let id = read_u16(buf, at);
        let next = read_u32(buf, at + 4);
        match u32::from(id) {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                if info.iova_ranges.is_some() {
                    return Err(InfoError::DuplicateCap { id, offset });
                }
                cap_bounds(buf, offset, IOVA_RANGE_CAP_SIZE as u64)?;
                let nr = read_u32(buf, at + CAP_HEADER_SIZE);
                let needed = IOVA_RANGE_CAP_SIZE as u64 + u64::from(nr) * size_of::<vfio_iova_range>() as u64;
                cap_bounds(buf, offset, needed)?;
                let mut ranges = Vec::with_capacity(nr as usize);
                for index in 0..nr {
                    let r = at + IOVA_RANGE_CAP_SIZE + index as usize * size_of::<vfio_iova_range>();
                    let (start, end) = (read_u64(buf, r), read_u64(buf, r + 8));
                    if start > end {
                        return Err(InfoError::InvertedRange { index, start, end });
                    }
                    ranges.push(IovaRange { start, end });
                }
                ranges.sort_by_key(|r| r.start);
                info.iova_ranges = Some(ranges);
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                if info.dma_avail.is_some() {
                    return Err(InfoError::DuplicateCap { id, offset });
                }
                cap_bounds(buf, offset, DMA_AVAIL_CAP_SIZE as u64)?;
                info.dma_avail = Some(read_u32(buf, at + CAP_HEADER_SIZE));
            }
            _ => {}
        }
        if next == 0 {
            return Ok(info);
        }
        if u64::from(next) < offset + CAP_HEADER_SIZE as u64 {
            return Err(InfoError::CapChainLoop { offset, next });
        }
        offset = u64::from(next);
    }
}

/// The live mappings of one container: IOVA → length. Pure bookkeeping,
/// no system calls; ranges are handled as inclusive ends so the top of the
/// address space is reachable without overflow.
#[derive(Debug, Default)]
struct MappingTable {
    mappings: BTreeMap<u64, u64>,
    bytes: u64,
}

impl MappingTable {
    /// Refuses `[iova, last]` if it overlaps a live mapping.
    fn check_free(&self, iova: u64, last: u64, len: u64) -> Result<(), DmaError> {
        match self.mappings.range(..=last).next_back() {
            Some((&start, &mlen)) if start + (mlen - 1) >= iova => Err(DmaError::Overlap {
                iova,
                len,
                existing: start,
            }),
            _ => Ok(()),
        }
    }

    fn insert(&mut self, iova: u64, len: u64) {
        let previous = self.mappings.insert(iova, len);
        debug_assert!(previous.is_none(), "checked free before inserting");
        self.bytes += len;
    }

    fn remove(&mut self, iova: u64) -> Option<u64> {
        let len = self.mappings.remove(&iova)?;
        self.bytes -= len;
        Some(len)
    }

    /// The mappings an unmap of `[iova, iova + len)` removes, in IOVA
    /// order, or [`DmaError::Split`] if it would cut one.
    fn plan_unmap(&self, iova: u64, len: u64) -> Result<Vec<(u64, u64)>, DmaError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = iova.saturating_add(len - 1);
        let split = |start: u64, mapping_len: u64| DmaError::Split {
            iova,
            len,
            start,
            mapping_len,
        };
        if let Some((&start, &mlen)) = self.mappings.range(..iova).next_back()
            && start + (mlen - 1) >= iova
        {
            return Err(split(start, mlen));
        }
        if let Some((&start, &mlen)) = self.mappings.range(iova..=last).next_back()
            && start + (mlen - 1) > last
        {
            return Err(split(start, mlen));
        }
        Ok(self.mappings.range(iova..=last).map(|(&s, &l)| (s, l)).collect())
    }

    fn len(&self) -> u64 {
        self.mappings.len() as u64
    }
}

/// The type1 IOMMU operations the mapper needs: the real container, or a
/// test double.
trait Type1Iommu: Send + Sync {
    /// `VFIO_IOMMU_MAP_DMA`. The caller guarantees what
    /// [`DmaMapper::map`] asks of its caller.
    fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes the kernel unmapped.
    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64>;
    /// The group file, if there is one.
    fn group_fd(&self) -> Option<BorrowedFd<'_>>;
}

fn check_ioctl(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A container with its group attached and the type1v2 IOMMU set.
struct Type1Container {
    /// Declared first: the group leaves the container before it closes.
    group: File,
    container: VfioContainer,
}

impl Type1Iommu for Type1Container {
    fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()> {
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the fd is our type1 container and `map` is a valid
        // vfio_iommu_type1_dma_map the kernel only reads. The host range is
        // mapped memory that stays mapped until it is unmapped here (the
        // DmaMapper contract); the device may access it at any time, which
        // memvisor treats as guest memory (accessed only through volatile
        // copies, never Rust references).
        check_ioctl(unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_MAP_DMA as _, &map) })?;
        Ok(())
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: the fd is our type1 container; `unmap` is a valid
        // vfio_iommu_type1_dma_unmap without flags (so no trailing bitmap),
        // whose size field the kernel overwrites with the bytes unmapped.
        check_ioctl(unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA as _, &mut unmap) })?;
        Ok(unmap.size)
    }

    fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.group.as_fd())
    }
}

/// Opens `dir/<group>`.
fn open_group(dir: &Path, group: u32) -> Result<File, VfioSetupError> {
    let path = dir.join(group.to_string());
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| VfioSetupError::OpenGroup { group, path, source })
}

/// `VFIO_GROUP_GET_STATUS`: the group must be viable and not in a container.
fn check_group_status(file: &File, group: u32) -> Result<(), VfioSetupError> {
    let mut status = vfio_group_status {
        argsz: size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: `status` is a valid vfio_group_status the kernel writes into;
    // on a file that is not a VFIO group the ioctl fails (ENOTTY) without
    // touching it.
    check_ioctl(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GROUP_GET_STATUS as _, &mut status) })
        .map_err(|source| VfioSetupError::GroupStatus { group, source })?;
    let flags = status.flags;
    if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(VfioSetupError::GroupNotViable { group, flags });
    }
    if flags & VFIO_GROUP_FLAGS_CONTAINER_SET != 0 {
        return Err(VfioSetupError::GroupInUse { group, flags });
    }
    Ok(())
}

/// `VFIO_GET_API_VERSION` on a fresh container fd, for error messages.
fn api_version(path: &Path) -> i64 {
    match File::open(path) {
        // SAFETY: VFIO_GET_API_VERSION takes no argument; on a file that
        // is not a container it fails without side effects.
        Ok(f) => i64::from(unsafe { libc::ioctl(f.as_raw_fd(), VFIO_GET_API_VERSION as _) }),
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
    }
}

fn open_container() -> Result<VfioContainer, VfioSetupError> {
    let path = PathBuf::from(VFIO_CONTAINER_PATH);
    VfioContainer::new(None).map_err(|e| match e {
        VfioError::OpenContainer(source) => VfioSetupError::OpenContainer { path, source },
        VfioError::VfioApiVersion => VfioSetupError::ApiVersion {
            found: api_version(&path),
            expected: VFIO_API_VERSION,
            path,
        },
        VfioError::VfioExtension | VfioError::VfioType1V2 => VfioSetupError::NoType1v2 { path },
        source => VfioSetupError::Container { path, source },
    })
}

/// Reads `VFIO_IOMMU_GET_INFO` with its capability chain into a buffer.
fn read_iommu_info(container: RawFd) -> io::Result<Vec<u8>> {
    let mut argsz = INFO_SIZE as u32;
    // Twice at most: the first answer says how much room the caps need.
    for _ in 0..2 {
        // u64 words: the buffer is aligned for the struct; argsz goes in
        // its first four bytes.
        let mut words = vec![0u64; (argsz as usize).div_ceil(8)];
        let mut first = [0u8; 8];
        first[..4].copy_from_slice(&argsz.to_ne_bytes());
        words[0] = u64::from_ne_bytes(first);
        // SAFETY: the fd is a type1 container; the kernel writes at most
        // `argsz` bytes (the value at offset 0) into the buffer, which has
        // at least that many.
        check_ioctl(unsafe { libc::ioctl(container, VFIO_IOMMU_GET_INFO as _, words.as_mut_ptr()) })?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let wanted = read_u32(&bytes, 0);
        if wanted <= argsz {
            return Ok(bytes);
        }
        if wanted > MAX_INFO_SIZE {
            return Err(io::Error::other(format!(
                "the kernel asks for a {wanted}-byte info buffer (limit {MAX_INFO_SIZE})"
            )));
        }
        argsz = wanted;
    }
    Err(io::Error::other(
        "capability size changed between two VFIO_IOMMU_GET_INFO calls",
    ))
}

/// A [`DmaMapper`] over a VFIO type1v2 container holding one IOMMU group;
/// see the [module documentation](self).
pub struct VfioContainerMapper {
    name: String,
    group: u32,
    budget: Arc<PinBudget>,
    info: IommuInfo,
    ranges: Vec<IovaRange>,
    max_mappings: u64,
    table: Mutex<MappingTable>,
    iommu: Box<dyn Type1Iommu>,
}

impl fmt::Debug for VfioContainerMapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.lock();
        f.debug_struct("VfioContainerMapper")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("info", &self.info)
            .field("mappings", &table.len())
            .field("pinned", &table.bytes)
            .finish()
    }
}

impl VfioContainerMapper {
    /// Opens a new container for IOMMU group `group`, attaches the group
    /// and selects the type1v2 IOMMU; mappings charge `budget`.
    ///
    /// Every device of the group must be bound to `vfio-pci` (or unbound),
    /// and the group must not be in use. Errors name the step, the path or
    /// group and the errno.
    pub fn open(name: &str, group: u32, budget: Arc<PinBudget>) -> Result<Self, VfioSetupError> {
        let container = open_container()?;
        let group_file = open_group(Path::new(VFIO_GROUP_DIR), group)?;
        check_group_status(&group_file, group)?;
        let container_fd: libc::c_int = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container fd,
        // from a valid reference.
        check_ioctl(unsafe { libc::ioctl(group_file.as_raw_fd(), VFIO_GROUP_SET_CONTAINER as _, &container_fd) })
            .map_err(|source| VfioSetupError::SetContainer { group, source })?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        check_ioctl(unsafe {
            libc::ioctl(
                container_fd,
                VFIO_SET_IOMMU as _,
                libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
            )
        })
        .map_err(|source| VfioSetupError::SetIommu { group, source })?;
        // Closing the group file on any later error detaches it again.
        let bytes = read_iommu_info(container_fd).map_err(|source| VfioSetupError::IommuInfo { group, source })?;
        let info = parse_iommu_info(&bytes).map_err(|source| VfioSetupError::MalformedInfo { group, source })?;
        log::info!("vfio mapper {name}: group {group}, {info:?}");
        let iommu = Type1Container {
            group: group_file,
            container,
        };
        Ok(Self::with_iommu(name, group, budget, info, Box::new(iommu)))
    }

    fn with_iommu(name: &str, group: u32, budget: Arc<PinBudget>, info: IommuInfo, iommu: Box<dyn Type1Iommu>) -> Self {
        Self {
            name: name.to_string(),
            group,
            budget,
            ranges: info.usable_ranges(),
            max_mappings: info.max_mappings(0),
            info,
            table: Mutex::new(MappingTable::default()),
            iommu,
        }
    }

    /// The IOMMU group number.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// What the container reported when it was opened.
    pub fn iommu_info(&self) -> &IommuInfo {
        &self.info
    }

    /// The budget this mapper charges.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.budget
    }

    /// The group's file, for `VFIO_GROUP_GET_DEVICE_FD`.
    pub fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        self.iommu.group_fd()
    }

    fn lock(&self) -> MutexGuard<'_, MappingTable> {
        self.table.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Validates a mapping request against alignment and the IOVA ranges;
    /// returns its inclusive last IOVA.
    fn check_request(&self, iova: u64, host: u64, len: u64, access: Access) -> Result<u64, DmaError> {
        let page_size = self.info.min_page_size();
        if len == 0 || (iova | host | len) & (page_size - 1) != 0 {
            return Err(DmaError::Unaligned {
                iova,
                host,
                len,
                page_size,
            });
        }
        let last = iova
            .checked_add(len - 1)
            .filter(|_| host.checked_add(len - 1).is_some())
            .ok_or(DmaError::IovaOutOfRange { iova, len })?;
        if !self.ranges.iter().any(|r| r.start <= iova && last <= r.end) {
            return Err(DmaError::IovaOutOfRange { iova, len });
        }
        if !access.read && !access.write {
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                iova,
                len,
                source: io::Error::new(io::ErrorKind::InvalidInput, "access grants neither read nor write"),
            });
        }
        Ok(last)
    }

    /// Unmaps one mapping of the table; on success it leaves the table and
    /// the budget. Under type1v2 a successful unmap of exactly its range
    /// leaves nothing mapped there, so the entry goes even if the kernel
    /// reports another size (which is then an error: the kernel's view and
    /// the table disagreed).
    fn unmap_one(&self, table: &mut MappingTable, iova: u64, len: u64) -> Result<(), DmaError> {
        let unmapped = self.iommu.unmap_dma(iova, len).map_err(|source| DmaError::Os {
            op: "VFIO_IOMMU_UNMAP_DMA",
            iova,
            len,
            source,
        })?;
        table.remove(iova);
        self.budget.release(len);
        if unmapped != len {
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_UNMAP_DMA",
                iova,
                len,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("kernel unmapped {unmapped:#x} bytes, expected {len:#x}"),
                ),
            });
        }
        Ok(())
    }
}

impl DmaMapper for VfioContainerMapper {
    fn name(&self) -> &str {
        &self.name
    }

    /// Maps with one `VFIO_IOMMU_MAP_DMA`. Beyond the trait's errors:
    /// [`DmaError::Unaligned`] uses the IOMMU's smallest page size, an IOVA
    /// range not inside one usable range is [`DmaError::IovaOutOfRange`],
    /// and the kernel's `ENOSPC` (no DMA entries left) is
    /// [`DmaError::TooManyMappings`].
    fn map(&self, iova: u64, host: u64, len: u64, access: Access) -> Result<(), DmaError> {
        let last = self.check_request(iova, host, len, access)?;
        let mut table = self.lock();
        table.check_free(iova, last, len)?;
        if table.len() >= self.max_mappings {
            return Err(DmaError::TooManyMappings {
                limit: self.max_mappings,
            });
        }
        self.budget.charge(iova, len)?;
        let mut flags = 0;
        if access.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if access.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        if let Err(source) = self.iommu.map_dma(iova, host, len, flags) {
            self.budget.release(len);
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(DmaError::TooManyMappings { limit: table.len() });
            }
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                iova,
                len,
                source,
            });
        }
        table.insert(iova, len);
        Ok(())
    }

    /// Unmaps with one `VFIO_IOMMU_UNMAP_DMA` per mapping, in IOVA order,
    /// checking the size the kernel reports. A split is refused before any
    /// system call. If the kernel fails one, the walk stops there: the
    /// mappings before it are gone (and released), it and the rest stay,
    /// and `pinned_bytes` remains exact.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let mut table = self.lock();
        let plan = table.plan_unmap(iova, len)?;
        let mut bytes = 0;
        for (start, mlen) in plan {
            self.unmap_one(&mut table, start, mlen)?;
            bytes += mlen;
        }
        Ok(bytes)
    }

    fn limits(&self) -> DmaLimits {
        DmaLimits {
            max_mappings: self.max_mappings,
            page_sizes: self.info.page_sizes,
            iova_ranges: self.ranges.clone(),
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn mapping_count(&self) -> u64 {
        self.lock().len()
    }
}

impl Drop for VfioContainerMapper {
    fn drop(&mut self) {
        let table = self.table.get_mut().unwrap_or_else(|poison| poison.into_inner());
        let mut table = std::mem::take(table);
        let live: Vec<(u64, u64)> = table.mappings.iter().map(|(&s, &l)| (s, l)).collect();
        for (iova, len) in live {
            if let Err(e) = self.unmap_one(&mut table, iova, len) {
                log::error!("vfio mapper {}: {e}", self.name);
            }
        }
        // What the kernel refused to unmap goes when the container closes.
        self.budget.release(table.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_memory::{Backing, RamBlock};
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const PGSIZES_4K: u64 = 0x4020_1000; // 4K | 2M | 1G, as on x86 VT-d

    // ---- capability-chain parsing ------------------------------------

    /// Builds an info buffer: header, then `caps` (already laid out at
    /// their offsets by the caller).
    struct InfoBuf(Vec<u8>);

    impl InfoBuf {
        fn new(flags: u32, pgsizes: u64, cap_offset: u32) -> Self {
            let mut b = vec![0u8; INFO_SIZE];
            b[4..8].copy_from_slice(&flags.to_ne_bytes());
            b[8..16].copy_from_slice(&pgsizes.to_ne_bytes());
            b[16..20].copy_from_slice(&cap_offset.to_ne_bytes());
            let mut s = Self(b);
            s.fix_argsz();
            s
        }

        fn fix_argsz(&mut self) {
            let len = self.0.len() as u32;
            self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        }

        fn header(&mut self, id: u16, next: u32) -> &mut Self {
            self.0.extend_from_slice(&id.to_ne_bytes());
            self.0.extend_from_slice(&1u16.to_ne_bytes());
            self.0.extend_from_slice(&next.to_ne_bytes());
            self
        }

        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }

        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }

        fn done(&mut self) -> Vec<u8> {
            self.fix_argsz();
            self.0.clone()
        }
    }

    const CAPS: u32 = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;

    /// Header, IOVA-range cap at 24 (two ranges, 48 bytes), migration cap
    /// at 72 (32 bytes, skipped), DMA-avail cap at 104.
    fn full_chain() -> Vec<u8> {
        InfoBuf::new(CAPS, PGSIZES_4K, 24)
            .header(1, 72)
            .u32(2)
            .u32(0)
            .u64(0xfee0_0000) // listed out of order: sorted by the parser
            .u64(u64::MAX >> 16)
            .u64(0)
            .u64(0xfedf_ffff)
            .header(2, 104)
            .u32(0)
            .u32(0)
            .u64(0x1000)
            .u64(1 << 20)
            .header(3, 0)
            .u32(65000)
            .done()
    }

    #[test]
    fn vfio_info_without_caps_gives_defaults() {
        let buf = InfoBuf::new(VFIO_IOMMU_INFO_PGSIZES, PGSIZES_4K, 0).done();
        let info = parse_iommu_info(&buf).unwrap();
        assert_eq!(
            info,
            IommuInfo {
                page_sizes: PGSIZES_4K,
                iova_ranges: None,
                dma_avail: None
            }
        );
        assert_eq!(info.min_page_size(), 4096);
        assert_eq!(
            info.usable_ranges(),
            vec![IovaRange {
                start: 0,
                end: u64::MAX
            }]
        );
        assert_eq!(info.max_mappings(0), DEFAULT_DMA_ENTRY_LIMIT);
    }

    #[test]
    fn vfio_info_chain_with_ranges_avail_and_unknown_cap() {
        let info = parse_iommu_info(&full_chain()).unwrap();
        assert_eq!(info.page_sizes, PGSIZES_4K);
        assert_eq!(
            info.iova_ranges.as_deref(),
            Some(
                &[
                    IovaRange {
                        start: 0,
                        end: 0xfedf_ffff
                    },
                    IovaRange {
                        start: 0xfee0_0000,
                        end: u64::MAX >> 16
                    }
                ][..]
            )
        );
        assert_eq!(info.dma_avail, Some(65000));
        assert_eq!(info.max_mappings(3), 65003);
    }

    #[test]
    fn vfio_info_caps_flag_without_offset_is_no_caps() {
        // The kernel leaves cap_offset 0 when argsz was too small for the caps.
        let mut buf = InfoBuf::new(CAPS, PGSIZES_4K, 0).done();
        buf[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(parse_iommu_info(&buf).unwrap().iova_ranges, None);
    }

    #[test]
    fn vfio_info_malformed_buffers_are_errors() {
        use InfoError::*;
        /// What is tested, the buffer, and the error expected.
        type Case = (&'static str, Vec<u8>, fn(&InfoError) -> bool);
        let cases: Vec<Case> = vec![
            ("empty", vec![], |e| matches!(e, Truncated { len: 0 })),
            ("short header", vec![0; 23], |e| matches!(e, Truncated { len: 23 })),
            ("no pgsizes flag", InfoBuf::new(0, PGSIZES_4K, 0).done(), |e| {
                matches!(e, NoPageSizes { flags: 0, .. })
            }),
            (
                "zero pgsizes",
                InfoBuf::new(VFIO_IOMMU_INFO_PGSIZES, 0, 0).done(),
                |e| matches!(e, NoPageSizes { pgsizes: 0, .. }),
            ),
            (
                "cap offset past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 4096).done(),
                |e| matches!(e, CapOutOfBounds { offset: 4096, .. }),
            ),
            (
                "cap offset inside header",
                InfoBuf::new(CAPS, PGSIZES_4K, 8).header(3, 0).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { offset: 8, .. }),
            ),
            (
                "cap header cut short",
                {
                    let mut b = InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0).done();
                    b.truncate(28);
                    b[0..4].copy_from_slice(&28u32.to_ne_bytes());
                    b
                },
                |e| {
                    matches!(
                        e,
                        CapOutOfBounds {
                            offset: 24,
                            needed: 8,
                            ..
                        }
                    )
                },
            ),
            (
                "dma avail cut short",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0).done(),
                |e| matches!(e, CapOutOfBounds { needed: 12, .. }),
            ),
            (
                "iova cap without count",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(1, 0).done(),
                |e| matches!(e, CapOutOfBounds { needed: 16, .. }),
            ),
            (
                "nr_iovas past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(2)
                    .u32(0)
                    .u64(0)
                    .u64(1)
                    .done(),
                |e| matches!(e, CapOutOfBounds { needed: 48, .. }),
            ),
            (
                "nr_iovas huge",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(u32::MAX)
                    .u32(0)
                    .done(),
                |e| matches!(e, CapOutOfBounds { .. }),
            ),
            (
                "inverted range",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(1)
                    .u32(0)
                    .u64(9)
                    .u64(8)
                    .done(),
                |e| {
                    matches!(
                        e,
                        InvertedRange {
                            index: 0,
                            start: 9,
                            end: 8
                        }
                    )
                },
            ),
            (
                "self loop",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 24).u32(1).done(),
                |e| matches!(e, CapChainLoop { offset: 24, next: 24 }),
            ),
            (
                "backward next",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(3, 36)
                    .u32(1)
                    .header(2, 24)
                    .done(),
                |e| matches!(e, CapChainLoop { offset: 36, next: 24 }),
            ),
            (
                "overlapping next",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 28).u32(1).u32(0).done(),
                |e| matches!(e, CapChainLoop { next: 28, .. }),
            ),
            (
                "next past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0x10_0000).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { offset: 0x10_0000, .. }),
            ),
            (
                "next at u32::MAX",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, u32::MAX).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { .. }),
            ),
            (
                "duplicate dma avail",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(3, 36)
                    .u32(1)
                    .header(3, 0)
                    .u32(2)
                    .done(),
                |e| matches!(e, DuplicateCap { id: 3, offset: 36 }),
            ),
            (
                "argsz larger than buffer",
                {
                    let mut b = full_chain();
                    b[0..4].copy_from_slice(&4096u32.to_ne_bytes());
                    b
                },
                |e| matches!(e, ArgszTooLarge { argsz: 4096, .. }),
            ),
        ];
        for (what, buf, expected) in cases {
            match parse_iommu_info(&buf) {
                Err(e) => assert!(expected(&e), "{what}: unexpected error {e:?}"),
                Ok(info) => panic!("{what}: parsed as {info:?}"),
            }
        }
        // The messages carry the values.
        let e = parse_iommu_info(&InfoBuf::new(CAPS, PGSIZES_4K, 0x40).done()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capability at offset 0x40 (8 bytes) lies outside the 24-byte buffer or its header"
        );
    }

    proptest! {
        #[test]
        fn vfio_info_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), offset in 0u32..300) {
            let mut buf = bytes;
            if buf.len() >= INFO_SIZE {
                buf[4..8].copy_from_slice(&CAPS.to_ne_bytes());
                buf[16..20].copy_from_slice(&offset.to_ne_bytes());
            }
            let _ = parse_iommu_info(&buf);
        }

        #[test]
        fn vfio_info_truncated_chain_never_parses_more(cut in 0usize..128) {
            let full = full_chain();
            let cut = cut.min(full.len());
            let mut buf = full[..cut].to_vec();
            if buf.len() >= 4 {
                let len = buf.len() as u32;
                buf[0..4].copy_from_slice(&len.to_ne_bytes());
            }
            prop_assert_eq!(parse_iommu_info(&buf).is_ok(), cut == full.len());
        }
    }

    // ---- bookkeeping --------------------------------------------------

    #[test]
    fn vfio_table_overlap_split_and_holes() {
        let mut t = MappingTable::default();
        t.check_free(0x2000, 0x3fff, 0x2000).unwrap();
        t.insert(0x2000, 0x2000);
        t.insert(0x8000, 0x1000);
        assert!(matches!(
            t.check_free(0x3000, 0x3fff, 0x1000),
            Err(DmaError::Overlap { existing: 0x2000, .. })
        ));
        assert!(matches!(
            t.check_free(0x1000, 0x2fff, 0x2000),
            Err(DmaError::Overlap { existing: 0x2000, .. })
        ));
        t.check_free(0x4000, 0x7fff, 0x4000).unwrap();
        t.check_free(0x1000, 0x1fff, 0x1000).unwrap();
        assert!(matches!(
            t.plan_unmap(0x3000, 0x1000),
            Err(DmaError::Split {
                start: 0x2000,
                mapping_len: 0x2000,
                ..
            })
        ));
        assert!(matches!(
            t.plan_unmap(0x0, 0x3000),
            Err(DmaError::Split { start: 0x2000, .. })
        ));
        assert!(matches!(
            t.plan_unmap(0x4000, 0x4800),
            Err(DmaError::Split { start: 0x8000, .. })
        ));
        assert_eq!(t.plan_unmap(0x4000, 0x4000).unwrap(), vec![]);
        assert_eq!(
            t.plan_unmap(0x3000, 0).unwrap(),
            vec![],
            "an empty range removes nothing"
        );
        assert_eq!(
            t.plan_unmap(0, u64::MAX).unwrap(),
            vec![(0x2000, 0x2000), (0x8000, 0x1000)]
        );
        assert_eq!((t.len(), t.bytes), (2, 0x3000));
        assert_eq!(t.remove(0x2000), Some(0x2000));
        assert_eq!(t.remove(0x2000), None);
        assert_eq!((t.len(), t.bytes), (1, 0x1000));
    }

    #[test]
    fn vfio_table_reaches_the_top_of_the_address_space() {
        let mut t = MappingTable::default();
        let top = u64::MAX - 0xfff;
        t.check_free(top, u64::MAX, 0x1000).unwrap();
        t.insert(top, 0x1000);
        assert!(matches!(
            t.check_free(top, u64::MAX, 0x1000),
            Err(DmaError::Overlap { .. })
        ));
        assert_eq!(t.plan_unmap(top - 0x1000, u64::MAX).unwrap(), vec![(top, 0x1000)]);
    }

    // ---- the mapper over a test double --------------------------------

    /// A type1v2 IOMMU in memory: refuses overlaps and splits like the
    /// kernel, and fails on request.
    #[derive(Default)]
    struct FakeIommu {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        /// iova → (len, vaddr, flags)
        mappings: BTreeMap<u64, (u64, u64, u32)>,
        fail_map: Option<i32>,
        fail_unmap_at: Option<u64>,
        unmap_reports: Option<u64>,
        unmap_calls: u32,
    }

    impl Type1Iommu for Arc<FakeIommu> {
        fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if let Some(errno) = s.fail_map {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let end = iova + size;
            if s.mappings
                .range(..end)
                .next_back()
                .is_some_and(|(&a, &(l, _, _))| a + l > iova)
            {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            s.mappings.insert(iova, (size, vaddr, flags));
            Ok(())
        }

        fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64> {
            let mut s = self.state.lock().unwrap();
            s.unmap_calls += 1;
            if s.fail_unmap_at == Some(iova) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            let end = iova + size;
            let inside: Vec<u64> = s.mappings.range(iova..end).map(|(&a, _)| a).collect();
            let mut bytes = 0;
            for a in inside {
                let (l, _, _) = s.mappings[&a];
                if a + l > end {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                s.mappings.remove(&a);
                bytes += l;
            }
            Ok(s.unmap_reports.unwrap_or(bytes))
        }

        fn group_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    fn info(page_sizes: u64, iova_ranges: Option<Vec<IovaRange>>, dma_avail: Option<u32>) -> IommuInfo {
        IommuInfo {
            page_sizes,
            iova_ranges,
            dma_avail,
        }
    }

    fn fake_mapper(budget: Option<u64>, info: IommuInfo) -> (VfioContainerMapper, Arc<FakeIommu>) {
        let fake = Arc::new(FakeIommu::default());
        let budget = Arc::new(budget.map_or_else(PinBudget::unlimited, PinBudget::limited));
        let m = VfioContainerMapper::with_iommu("fake", 7, budget, info, Box::new(fake.clone()));
        (m, fake)
    }

    fn default_info() -> IommuInfo {
        info(PGSIZES_4K, None, None)
    }

    const HOST: u64 = 0x7f00_0000_0000;

    #[test]
    fn vfio_map_unmap_counts_and_access_flags() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(0x10_0000, HOST, 2 * MIB, Access::READ_WRITE).unwrap();
        m.map(0x40_0000, HOST + 2 * MIB, 4096, Access::READ).unwrap();
        let write_only = Access {
            read: false,
            write: true,
        };
        m.map(0x50_0000, HOST, 4096, write_only).unwrap();
        {
            let s = fake.state.lock().unwrap();
            assert_eq!(
                s.mappings[&0x10_0000],
                (2 * MIB, HOST, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)
            );
            assert_eq!(s.mappings[&0x40_0000], (4096, HOST + 2 * MIB, VFIO_DMA_MAP_FLAG_READ));
            assert_eq!(s.mappings[&0x50_0000].2, VFIO_DMA_MAP_FLAG_WRITE);
        }
        assert_eq!((m.pinned_bytes(), m.mapping_count()), (2 * MIB + 8192, 3));
        assert_eq!(m.budget().used(), 2 * MIB + 8192);
        assert_eq!(m.unmap(0, u64::MAX).unwrap(), 2 * MIB + 8192);
        assert_eq!(fake.state.lock().unwrap().unmap_calls, 3, "one UNMAP_DMA per mapping");
        assert!(fake.state.lock().unwrap().mappings.is_empty());
        assert_eq!((m.pinned_bytes(), m.mapping_count(), m.budget().used()), (0, 0, 0));
        let none = Access {
            read: false,
            write: false,
        };
        let e = m.map(0, HOST, 4096, none).unwrap_err();
        assert!(e.to_string().contains("neither read nor write"), "{e}");
        assert_eq!(m.budget().used(), 0);
    }

    #[test]
    fn vfio_alignment_follows_the_iommu_page_size() {
        // 64 KiB IOMMU pages (arm64 SMMU with a 64K granule).
        let (m, _) = fake_mapper(None, info(0x2001_0000, None, None));
        let e = m.map(0x1000, HOST, 0x1_0000, Access::READ).unwrap_err();
        assert!(
            matches!(
                e,
                DmaError::Unaligned {
                    page_size: 0x1_0000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            m.map(0x1_0000, HOST + 0x1000, 0x1_0000, Access::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            m.map(0x1_0000, HOST, 0x1000, Access::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            m.map(0x1_0000, HOST, 0, Access::READ),
            Err(DmaError::Unaligned { .. })
        ));
        m.map(0x1_0000, HOST, 0x2_0000, Access::READ).unwrap();
        assert_eq!(m.limits().min_page_size(), 0x1_0000);
    }

    #[test]
    fn vfio_mappings_stay_inside_one_usable_iova_range() {
        let ranges = vec![
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: (1 << 39) - 1,
            },
        ];
        let (m, fake) = fake_mapper(None, info(PGSIZES_4K, Some(ranges.clone()), Some(100)));
        assert_eq!(
            m.limits(),
            DmaLimits {
                max_mappings: 100,
                page_sizes: PGSIZES_4K,
                iova_ranges: ranges
            }
        );
        // Straddles the hole at the interrupt window.
        let e = m.map(0xfed0_0000, HOST, 0x20_0000, Access::READ).unwrap_err();
        assert_eq!(
            e.to_string(),
            "iova range [0xfed00000, +0x200000) is outside the usable IOVA ranges"
        );
        // Inside the hole, and past the address width.
        assert!(matches!(
            m.map(0xfee0_0000, HOST, 4096, Access::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(matches!(
            m.map(1 << 39, HOST, 4096, Access::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(matches!(
            m.map(u64::MAX - 4095, HOST, 8192, Access::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(fake.state.lock().unwrap().mappings.is_empty());
        m.map(0xfedf_f000, HOST, 4096, Access::READ).unwrap();
        m.map(0xfef0_0000, HOST, 4096, Access::READ).unwrap();
        m.map((1 << 39) - 4096, HOST, 4096, Access::READ).unwrap();
    }

    #[test]
    fn vfio_overlap_and_split_change_nothing() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(2 * MIB, HOST, 2 * MIB, Access::READ).unwrap();
        assert!(matches!(
            m.map(3 * MIB, HOST, 2 * MIB, Access::READ),
            Err(DmaError::Overlap { existing, .. }) if existing == 2 * MIB
        ));
        assert!(matches!(
            m.map(MIB, HOST, 2 * MIB, Access::READ),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(m.unmap(3 * MIB, 4 * MIB), Err(DmaError::Split { start, .. }) if start == 2 * MIB));
        assert!(matches!(m.unmap(MIB, 2 * MIB), Err(DmaError::Split { .. })));
        assert_eq!(
            fake.state.lock().unwrap().unmap_calls,
            0,
            "refused before any system call"
        );
        assert_eq!((m.pinned_bytes(), m.budget().used()), (2 * MIB, 2 * MIB));
        assert_eq!(m.unmap(0, 2 * MIB).unwrap(), 0, "holes are fine");
        assert_eq!(m.unmap(0, 8 * MIB).unwrap(), 2 * MIB);
    }

    #[test]
    fn vfio_budget_is_charged_first_and_released_on_failure() {
        let (m, fake) = fake_mapper(Some(4 * MIB), default_info());
        m.map(0, HOST, 3 * MIB, Access::READ_WRITE).unwrap();
        let e = m.map(3 * MIB, HOST, 2 * MIB, Access::READ_WRITE).unwrap_err();
        assert!(
            matches!(e, DmaError::BudgetExceeded { budget, .. } if budget == 4 * MIB),
            "{e}"
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 1, "the kernel never saw it");
        fake.state.lock().unwrap().fail_map = Some(libc::EFAULT);
        let e = m.map(3 * MIB, HOST, MIB, Access::READ_WRITE).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "VFIO_IOMMU_MAP_DMA of iova 0x300000 len 0x100000 failed: {}",
                io::Error::from_raw_os_error(libc::EFAULT)
            )
        );
        assert_eq!(
            (m.budget().used(), m.pinned_bytes(), m.mapping_count()),
            (3 * MIB, 3 * MIB, 1)
        );
        fake.state.lock().unwrap().fail_map = None;
        m.map(3 * MIB, HOST, MIB, Access::READ_WRITE).unwrap();
        assert_eq!(m.budget().used(), 4 * MIB);
    }

    #[test]
    fn vfio_mapping_limit_from_dma_avail_and_enospc() {
        let (m, fake) = fake_mapper(None, info(PGSIZES_4K, None, Some(2)));
        m.map(0, HOST, 4096, Access::READ).unwrap();
        m.map(4096, HOST, 4096, Access::READ).unwrap();
        assert!(matches!(
            m.map(8192, HOST, 4096, Access::READ),
            Err(DmaError::TooManyMappings { limit: 2 })
        ));
        // The kernel running out first (another container sharing the
        // user's dma_entry_limit would not, but a lowered limit would).
        let (m2, fake2) = fake_mapper(None, default_info());
        m2.map(0, HOST, 4096, Access::READ).unwrap();
        fake2.state.lock().unwrap().fail_map = Some(libc::ENOSPC);
        assert!(matches!(
            m2.map(4096, HOST, 4096, Access::READ),
            Err(DmaError::TooManyMappings { limit: 1 })
        ));
        assert_eq!((m2.budget().used(), m2.mapping_count()), (4096, 1));
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 2);
    }

    #[test]
    fn vfio_unmap_failure_stops_the_walk_and_stays_exact() {
        let (m, fake) = fake_mapper(None, default_info());
        for i in 0..3 {
            m.map(i * MIB, HOST, 4096, Access::READ).unwrap();
        }
        fake.state.lock().unwrap().fail_unmap_at = Some(MIB);
        let e = m.unmap(0, 4 * MIB).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("VFIO_IOMMU_UNMAP_DMA of iova 0x100000 len 0x1000 failed"),
            "{e}"
        );
        assert_eq!(
            (m.mapping_count(), m.pinned_bytes(), m.budget().used()),
            (2, 8192, 8192)
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 2);
        fake.state.lock().unwrap().fail_unmap_at = None;
        assert_eq!(m.unmap(0, 4 * MIB).unwrap(), 8192);
    }

    #[test]
    fn vfio_unmap_checks_the_size_the_kernel_reports() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(0, HOST, 8192, Access::READ).unwrap();
        fake.state.lock().unwrap().unmap_reports = Some(4096);
        let e = m.unmap(0, 8192).unwrap_err();
        assert!(
            e.to_string().contains("kernel unmapped 0x1000 bytes, expected 0x2000"),
            "{e}"
        );
        // The range is empty in the kernel now: the table agrees.
        assert_eq!((m.mapping_count(), m.pinned_bytes(), m.budget().used()), (0, 0, 0));
    }

    #[test]
    fn vfio_drop_unmaps_and_releases_the_budget() {
        let budget = Arc::new(PinBudget::limited(8 * MIB));
        let fake = Arc::new(FakeIommu::default());
        let m = VfioContainerMapper::with_iommu("fake", 7, budget.clone(), default_info(), Box::new(fake.clone()));
        m.map(0, HOST, MIB, Access::READ).unwrap();
        m.map(MIB, HOST, MIB, Access::READ).unwrap();
        fake.state.lock().unwrap().fail_unmap_at = Some(MIB);
        assert!(format!("{m:?}").contains("mappings: 2"));
        drop(m);
        assert_eq!(
            budget.used(),
            0,
            "even what the kernel refused: closing the container unpins it"
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 1);
    }

    // ---- setup ----------------------------------------------------------

    #[test]
    fn vfio_ioctl_numbers_match_the_kernel() {
        // Values from linux/vfio.h on x86_64 and arm64.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn vfio_open_without_dev_vfio_names_the_path() {
        let budget = Arc::new(PinBudget::unlimited());
        if Path::new(VFIO_CONTAINER_PATH).exists() {
            // A real VFIO host: an absent group is named instead.
            let e = VfioContainerMapper::open("t", u32::MAX, budget).unwrap_err();
            assert!(e.to_string().contains("/dev/vfio/4294967295"), "{e}");
            return;
        }
        let e = VfioContainerMapper::open("t", 3, budget).unwrap_err();
        assert!(matches!(e, VfioSetupError::OpenContainer { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot open the VFIO container /dev/vfio/vfio: "),
            "{msg}"
        );
        assert!(msg.contains("No such file or directory"), "{msg}");
    }

    #[test]
    fn vfio_group_errors_name_group_path_and_errno() {
        let e = open_group(Path::new("/nonexistent/vfio"), 17).unwrap_err();
        assert!(matches!(e, VfioSetupError::OpenGroup { group: 17, .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("cannot open VFIO group 17 at /nonexistent/vfio/17: No such file"),
            "{e}"
        );
        // /dev/null is no group: GET_STATUS fails with ENOTTY.
        let null = OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let e = check_group_status(&null, 17).unwrap_err();
        match &e {
            VfioSetupError::GroupStatus { group: 17, source } => assert_eq!(source.raw_os_error(), Some(libc::ENOTTY)),
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string().starts_with("VFIO_GROUP_GET_STATUS on group 17 failed: "),
            "{e}"
        );
        let e = VfioSetupError::GroupNotViable { group: 5, flags: 0 };
        assert!(
            e.to_string().contains("group 5 is not viable (status flags 0x0)"),
            "{e}"
        );
    }

    // ---- on a real device ---------------------------------------------

    /// The group to test with, or `None` (after printing why) when this
    /// machine has no VFIO device for the tests.
    fn device_group() -> Option<u32> {
        let group = std::env::var("MEMVISOR_VFIO_GROUP").ok().and_then(|g| g.parse().ok());
        match group {
            Some(g) if Path::new(VFIO_CONTAINER_PATH).exists() => Some(g),
            _ => {
                println!(
                    "skipped: no /dev/vfio on this machine (set MEMVISOR_VFIO_GROUP=<n> with a device bound to vfio-pci)"
                );
                None
            }
        }
    }

    #[test]
    fn vfio_device_map_unmap_roundtrip() {
        let Some(group) = device_group() else { return };
        let budget = Arc::new(PinBudget::limited(64 * MIB));
        let m = VfioContainerMapper::open("dev", group, budget.clone()).unwrap();
        assert!(m.group_fd().is_some());
        let limits = m.limits();
        assert_ne!(limits.page_sizes, 0);
        assert!(limits.max_mappings > 0);
        let page = limits.min_page_size();
        let range = *limits
            .iova_ranges
            .iter()
            .find(|r| r.end - r.start >= 16 * MIB)
            .expect("usable range");
        let base = range.start.next_multiple_of(2 * MIB);
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        m.map(base, h, 4 * MIB, Access::READ_WRITE).unwrap();
        m.map(base + 4 * MIB, h + 4 * MIB, page, Access::READ).unwrap();
        assert_eq!((m.pinned_bytes(), m.mapping_count()), (4 * MIB + page, 2));
        assert!(matches!(m.unmap(base + MIB, MIB), Err(DmaError::Split { .. })));
        assert_eq!(m.unmap(base, 16 * MIB).unwrap(), 4 * MIB + page);
        assert_eq!((m.pinned_bytes(), budget.used()), (0, 0));
        // A second container cannot take the same group.
        let e = VfioContainerMapper::open("again", group, budget.clone());
        m.map(base, h, 4 * MIB, Access::READ_WRITE).unwrap();
        drop(m);
        assert_eq!(budget.used(), 0);
        assert!(e.is_err(), "the group was in use");
    }
}
