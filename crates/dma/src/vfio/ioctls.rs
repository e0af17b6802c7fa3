//! The VFIO ioctls this backend issues itself, and the thin wrappers around
//! them: opening the container and the group, the group status, attaching
//! the group, selecting the type1v2 IOMMU, `VFIO_IOMMU_GET_INFO`, and
//! `VFIO_IOMMU_MAP_DMA` / `VFIO_IOMMU_UNMAP_DMA` on the container.
//!
//! `vfio-ioctls` opens the container and checks its API version and
//! extensions; the rest is here because its map always sets read and write
//! and its unmap refuses ranges with holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_BASE, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE,
    VFIO_TYPE1v2_IOMMU, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
};
use vfio_ioctls::{VfioContainer, VfioError};

use super::info::{INFO_SIZE, InfoError, read_u32};

/// The VFIO container device.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// The directory holding the VFIO group devices (`/dev/vfio/<group>`).
pub const VFIO_GROUP_DIR: &str = "/dev/vfio";

// `_IO(VFIO_TYPE, VFIO_BASE + nr)`, as functions. vmm-sys-util encodes the
// asm-generic `_IOC` layout: the kernel's on x86_64, aarch64 and riscv64,
// the targets memvisor builds for.
vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

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

/// An ioctl's return value, or the errno of a failed one.
fn check_ioctl(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens [`VFIO_CONTAINER_PATH`] through `vfio-ioctls`, which checks the
/// API version and the type1v2 extension; its errors name the path.
pub(super) fn open_container() -> Result<VfioContainer, VfioSetupError> {
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

/// `VFIO_GET_API_VERSION` on a fresh container fd, for error messages.
fn api_version(path: &Path) -> i64 {
    match File::open(path) {
        // SAFETY: VFIO_GET_API_VERSION takes no argument; on a file that
        // is not a container it fails without side effects.
        Ok(f) => i64::from(unsafe { libc::ioctl(f.as_raw_fd(), VFIO_GET_API_VERSION() as _) }),
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
    }
}

/// Opens `dir/<group>`.
pub(super) fn open_group(dir: &Path, group: u32) -> Result<File, VfioSetupError> {
    let path = dir.join(group.to_string());
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| VfioSetupError::OpenGroup { group, path, source })
}

/// `VFIO_GROUP_GET_STATUS`: the group must be viable and not in a container.
pub(super) fn check_group_status(file: &File, group: u32) -> Result<(), VfioSetupError> {
    let mut status = vfio_group_status {
        argsz: size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: `status` is a valid vfio_group_status the kernel writes into;
    // on a file that is not a VFIO group the ioctl fails (ENOTTY) without
    // touching it.
    check_ioctl(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GROUP_GET_STATUS() as _, &mut status) })
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

/// `VFIO_GROUP_SET_CONTAINER`: attaches `group` to the container `container`.
pub(super) fn set_container(group: &File, container: RawFd) -> io::Result<()> {
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container fd,
    // from a valid reference.
    check_ioctl(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER() as _, &container) })?;
    Ok(())
}

/// `VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)` on the container `container`.
pub(super) fn set_type1v2_iommu(container: RawFd) -> io::Result<()> {
    // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
    check_ioctl(unsafe {
        libc::ioctl(
            container,
            VFIO_SET_IOMMU() as _,
            libc::c_ulong::from(VFIO_TYPE1v2_IOMMU),
        )
    })?;
    Ok(())
}

/// Reads `VFIO_IOMMU_GET_INFO` with its capability chain into a buffer.
pub(super) fn read_iommu_info(container: RawFd) -> io::Result<Vec<u8>> {
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
        check_ioctl(unsafe { libc::ioctl(container, VFIO_IOMMU_GET_INFO() as _, words.as_mut_ptr()) })?;
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

/// The type1 IOMMU operations the mapper needs: the real container, or a
/// test double.
pub(super) trait Type1Iommu: Send + Sync {
    /// `VFIO_IOMMU_MAP_DMA`. The caller guarantees what
    /// [`DmaMapper::map`](crate::mapper::DmaMapper::map) asks of its caller.
    fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes the kernel unmapped.
    fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64>;
    /// The group file, if there is one.
    fn group_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// A container with its group attached and the type1v2 IOMMU set.
pub(super) struct Type1Container {
    /// Declared first: the group leaves the container before it closes.
    pub(super) group: File,
    pub(super) container: VfioContainer,
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
        check_ioctl(unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_MAP_DMA() as _, &map) })?;
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
        check_ioctl(unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA() as _, &mut unmap) })?;
        Ok(unmap.size)
    }

    fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.group.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_ioctl_numbers_match_the_kernel() {
        // Values from linux/vfio.h on x86_64 and arm64.
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
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
}
