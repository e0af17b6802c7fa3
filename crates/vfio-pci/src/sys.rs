//! [`VfioDeviceFd`]: [`VfioDeviceIo`] on a real VFIO device file
//! descriptor, obtained with `VFIO_GROUP_GET_DEVICE_FD` from a group fd
//! (`memvisor_dma::vfio::VfioContainerMapper::group_fd`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY, VFIO_PCI_NUM_REGIONS, VFIO_TYPE, vfio_device_info,
    vfio_irq_info, vfio_irq_set, vfio_region_info,
};

use crate::VfioPciError;
use crate::io::{CONFIG_REGION_INDEX, IrqInfo, RegionInfo, RegionMapping, VfioDeviceIo};

// `_IO(VFIO_TYPE, VFIO_BASE + nr)`, as functions (asm-generic `_IOC`
// layout: x86_64, aarch64, riscv64).
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);

/// `struct vfio_device_feature` followed by `struct vfio_device_feature_migration`: the
/// argument of `VFIO_DEVICE_FEATURE` for `VFIO_DEVICE_FEATURE_MIGRATION`.
#[repr(C)]
struct MigrationFeature {
    argsz: u32,
    flags: u32,
    migration_flags: u64,
}

/// What a device's driver says of migration (`VFIO_DEVICE_FEATURE_MIGRATION`, the v2
/// migration protocol of Linux 5.18 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationSupport {
    /// The driver cannot migrate the device: the ioctl failed with this errno (`ENOTTY`
    /// from vfio-pci without a migration-capable variant driver, or from a kernel older
    /// than the v2 protocol).
    Unsupported(i32),
    /// The driver migrates the device; its `VFIO_MIGRATION_*` flags.
    Supported(u64),
}

impl std::fmt::Display for MigrationSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            MigrationSupport::Unsupported(errno) => write!(
                f,
                "its driver does not support migration (VFIO_DEVICE_FEATURE_MIGRATION: {})",
                io::Error::from_raw_os_error(errno)
            ),
            MigrationSupport::Supported(flags) => {
                let names: Vec<&str> = [
                    (VFIO_MIGRATION_STOP_COPY, "STOP_COPY"),
                    (VFIO_MIGRATION_P2P, "P2P"),
                    (VFIO_MIGRATION_PRE_COPY, "PRE_COPY"),
                ]
                .iter()
                .filter(|(bit, _)| flags & u64::from(*bit) != 0)
                .map(|(_, name)| *name)
                .collect();
                write!(f, "its driver supports migration ({})", names.join(", "))
            }
        }
    }
}

/// The longest device name accepted (a PCI BDF is 12 characters).
const MAX_NAME_LEN: usize = 64;

/// An ioctl's return value, or the errno of a failed one.
fn check_ioctl(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A VFIO PCI device file with its regions described once at open.
#[derive(Debug)]
pub struct VfioDeviceFd {
    file: File,
    name: String,
    flags: u32,
    /// Regions 0..=8 (BARs, ROM, configuration, VGA); size 0 if absent.
    regions: Vec<RegionInfo>,
}

impl VfioDeviceFd {
    /// Opens device `bdf` (the host's name for it, e.g. `0000:00:04.0`) of
    /// the VFIO group `group` with `VFIO_GROUP_GET_DEVICE_FD`, checks that
    /// it is a PCI device and reads its region descriptions.
    ///
    /// The group must be attached to a container with an IOMMU set
    /// (`memvisor_dma::vfio::VfioContainerMapper::open` does that), else
    /// the kernel refuses with `EINVAL`.
    pub fn open(group: BorrowedFd<'_>, bdf: &str) -> Result<Self, VfioPciError> {
        if bdf.is_empty() || bdf.len() > MAX_NAME_LEN {
            return Err(VfioPciError::InvalidBdf { bdf: bdf.to_string() });
        }
        let name = CString::new(bdf).map_err(|_| VfioPciError::InvalidBdf { bdf: bdf.to_string() })?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string
        // from the pointer, which stays valid for the call; on a file that
        // is not a VFIO group it fails without side effects.
        let fd = check_ioctl(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD() as _, name.as_ptr()) })
            .map_err(|source| VfioPciError::GetDeviceFd {
                bdf: bdf.to_string(),
                source,
            })?;
        // SAFETY: a successful VFIO_GROUP_GET_DEVICE_FD returns a new file
        // descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });

        let mut info = vfio_device_info {
            argsz: size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `info` is a valid vfio_device_info of `argsz` bytes the
        // kernel writes into.
        check_ioctl(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_DEVICE_GET_INFO() as _, &mut info) }).map_err(
            |source| VfioPciError::DeviceInfo {
                bdf: bdf.to_string(),
                source,
            },
        )?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 || info.num_regions <= CONFIG_REGION_INDEX {
            return Err(VfioPciError::NotPci {
                bdf: bdf.to_string(),
                flags: info.flags,
                regions: info.num_regions,
            });
        }
        let mut device = Self {
            file,
            name: bdf.to_string(),
            flags: info.flags,
            regions: Vec::new(),
        };
        // Regions a device lacks (VGA on most) fail with EINVAL: absent.
        let regions = (0..info.num_regions.min(VFIO_PCI_NUM_REGIONS))
            .map(|index| device.query_region(index).unwrap_or_default())
            .collect();
        device.regions = regions;
        log::debug!(
            "vfio device {bdf}: flags {:#x}, {} regions, {} irq indexes, regions {:x?}",
            info.flags,
            info.num_regions,
            info.num_irqs,
            device.regions
        );
        Ok(device)
    }

    /// The name the device was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the device's driver whether it can migrate the device
    /// (`VFIO_DEVICE_FEATURE` with `GET | MIGRATION`).
    pub fn migration_support(&self) -> MigrationSupport {
        let mut feature = MigrationFeature {
            argsz: size_of::<MigrationFeature>() as u32,
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            migration_flags: 0,
        };
        // SAFETY: `feature` is a valid vfio_device_feature of `argsz` bytes whose data is
        // a vfio_device_feature_migration; the kernel writes only within it.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_FEATURE(), &mut feature) };
        match check_ioctl(ret) {
            Ok(_) => MigrationSupport::Supported(feature.migration_flags),
            Err(e) => MigrationSupport::Unsupported(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// True if the kernel can reset the device (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn can_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    fn query_region(&self, index: u32) -> io::Result<RegionInfo> {
        let mut info = vfio_region_info {
            argsz: size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a valid vfio_region_info of `argsz` bytes; the
        // kernel writes at most `argsz` bytes (it reports a larger argsz
        // when capabilities do not fit, without writing them).
        check_ioctl(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO() as _, &mut info) })?;
        Ok(RegionInfo {
            size: info.size,
            offset: info.offset,
            flags: info.flags,
        })
    }

    /// The file offset of `len` bytes at `offset` of region `index`, if
    /// they lie inside it.
    fn file_offset(&self, index: u32, offset: u64, len: usize) -> io::Result<u64> {
        let region = self.regions.get(index as usize).copied().unwrap_or_default();
        let end = offset.checked_add(len as u64);
        if region.size == 0 || end.is_none_or(|end| end > region.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at {offset:#x} are outside region {index} ({:#x} bytes)",
                    self.name, region.size
                ),
            ));
        }
        Ok(region.offset + offset)
    }

    fn set_irqs(&self, flags: u32, index: u32, start: u32, fds: &[Option<BorrowedFd<'_>>]) -> io::Result<()> {
        let words = irq_set_words(flags, index, start, fds);
        // SAFETY: `words` is a vfio_irq_set header followed by `count`
        // eventfd numbers (-1 for none), `argsz` bytes in all, which the
        // kernel only reads. The eventfds are borrowed for the call; the
        // kernel takes its own references.
        check_ioctl(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_SET_IRQS() as _, words.as_ptr()) })?;
        Ok(())
    }
}

/// A `vfio_irq_set` for `fds` (-1 for none): argsz, flags, index, start,
/// count, then the eventfd numbers; u32 words keep the buffer aligned for
/// the struct.
fn irq_set_words(flags: u32, index: u32, start: u32, fds: &[Option<BorrowedFd<'_>>]) -> Vec<u32> {
    let header = size_of::<vfio_irq_set>() / 4;
    let mut words = Vec::with_capacity(header + fds.len());
    words.extend_from_slice(&[((header + fds.len()) * 4) as u32, flags, index, start, fds.len() as u32]);
    words.extend(fds.iter().map(|fd| fd.map_or(-1, |fd| fd.as_raw_fd()) as u32));
    words
}

impl AsFd for VfioDeviceFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl VfioDeviceIo for VfioDeviceFd {
    fn region_info(&self, index: u32) -> io::Result<RegionInfo> {
        match self.regions.get(index as usize) {
            Some(info) => Ok(*info),
            None => self.query_region(index),
        }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.read_exact_at(data, at)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.file_offset(index, offset, data.len())?;
        self.file.write_all_at(data, at)
    }

    fn irq_info(&self, index: u32) -> io::Result<IrqInfo> {
        let mut info = vfio_irq_info {
            argsz: size_of::<vfio_irq_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a valid vfio_irq_info of `argsz` bytes the
        // kernel writes into.
        check_ioctl(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_GET_IRQ_INFO() as _, &mut info) })?;
        Ok(IrqInfo {
            count: info.count,
            flags: info.flags,
        })
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<BorrowedFd<'_>>]) -> io::Result<()> {
        self.set_irqs(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds,
        )
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, &[])
    }

    fn map_region(&self, index: u32, offset: u64, len: u64) -> io::Result<RegionMapping> {
        let region = self.regions.get(index as usize).copied().unwrap_or_default();
        if !region.mappable() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: region {index} cannot be mapped", self.name),
            ));
        }
        let len_usize = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let at = self.file_offset(index, offset, len_usize)?;
        RegionMapping::map(self.file.as_fd(), at, len)
    }

    fn reset(&self) -> io::Result<()> {
        if !self.can_reset() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: the kernel has no reset method for the device", self.name),
            ));
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        check_ioctl(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_RESET() as _) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_device_ioctl_numbers_match_the_kernel() {
        // linux/vfio.h: _IO(';', 100 + n).
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_INFO(), 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO(), 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO(), 0x3b6d);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(VFIO_DEVICE_FEATURE(), 0x3b75);
        // struct vfio_device_feature (8 bytes) + struct vfio_device_feature_migration (8).
        assert_eq!(size_of::<MigrationFeature>(), 16);
    }

    #[test]
    fn migration_support_says_what_the_driver_said() {
        let none = MigrationSupport::Unsupported(libc::ENOTTY).to_string();
        assert!(none.contains("does not support migration"), "{none}");
        assert!(none.contains("Inappropriate ioctl"), "{none}");
        let some = MigrationSupport::Supported(u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY));
        assert_eq!(some.to_string(), "its driver supports migration (STOP_COPY, PRE_COPY)");
    }

    #[test]
    fn a_file_that_is_no_vfio_device_cannot_migrate() {
        let device = VfioDeviceFd {
            file: File::open("/dev/null").unwrap(),
            name: "null".into(),
            flags: 0,
            regions: Vec::new(),
        };
        assert_eq!(device.migration_support(), MigrationSupport::Unsupported(libc::ENOTTY));
    }

    #[test]
    fn irq_set_layout() {
        let file = File::open("/dev/null").unwrap();
        let fd = file.as_fd();
        let words = irq_set_words(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            2,
            7,
            &[Some(fd), None],
        );
        assert_eq!(
            words,
            [28, 0x24, 2, 7, 2, fd.as_raw_fd() as u32, u32::MAX],
            "argsz 20 + 4 per fd; -1 for none"
        );
        assert_eq!(
            irq_set_words(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, &[]),
            [20, 0x21, 2, 0, 0]
        );
    }

    #[test]
    fn region_accesses_at_file_offsets() {
        // A regular file stands in for the device file: region 0 at 0x1000
        // (16 bytes), region 7 at 0x2000 (256 bytes).
        let path = std::env::temp_dir().join(format!("memvisor-vfio-pci-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(0x2100).unwrap();
        let mut regions = vec![RegionInfo::default(); 8];
        regions[0] = RegionInfo {
            size: 16,
            offset: 0x1000,
            flags: 3,
        };
        regions[7] = RegionInfo {
            size: 256,
            offset: 0x2000,
            flags: 3,
        };
        let dev = VfioDeviceFd {
            file,
            name: "test".into(),
            flags: 0,
            regions,
        };
        dev.region_write(0, 12, &[1, 2, 3, 4]).unwrap();
        dev.region_write(7, 0, &[0x36, 0x1b]).unwrap();
        let mut b = [0u8; 4];
        dev.file.read_exact_at(&mut b, 0x100c).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        dev.region_read(7, 0, &mut b[..2]).unwrap();
        assert_eq!(&b[..2], [0x36, 0x1b]);
        // Outside a region (or an absent one): refused before the kernel.
        assert!(dev.region_read(0, 13, &mut b).is_err());
        assert!(dev.region_write(0, u64::MAX, &b).is_err());
        assert!(dev.region_read(3, 0, &mut b).is_err());
        assert!(dev.region_read(9, 0, &mut b).is_err());
        assert_eq!(dev.region_info(7).unwrap().size, 256);
        // No reset method.
        assert_eq!(dev.reset().unwrap_err().kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn open_refuses_bad_names_and_non_groups() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            VfioDeviceFd::open(file.as_fd(), ""),
            Err(VfioPciError::InvalidBdf { .. })
        ));
        assert!(matches!(
            VfioDeviceFd::open(file.as_fd(), "0000:00:04.0\0x"),
            Err(VfioPciError::InvalidBdf { .. })
        ));
        // /dev/null is no VFIO group: the ioctl fails (ENOTTY), named.
        let err = VfioDeviceFd::open(file.as_fd(), "0000:00:04.0").unwrap_err();
        assert!(matches!(err, VfioPciError::GetDeviceFd { ref bdf, .. } if bdf == "0000:00:04.0"));
        assert!(err.to_string().contains("0000:00:04.0"));
    }
}
