//! [`VfioDeviceIo`]: every kernel interaction of a passthrough device, so
//! that everything above it runs against a test double.

use std::io;
use std::os::fd::BorrowedFd;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

/// VFIO region index of the configuration space.
pub const CONFIG_REGION_INDEX: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// VFIO interrupt index of MSI-X.
pub const MSIX_IRQ_INDEX: u32 = VFIO_PCI_MSIX_IRQ_INDEX;

/// What `VFIO_DEVICE_GET_REGION_INFO` reports of one region. BAR `i` is
/// region `i`, the configuration space region [`CONFIG_REGION_INDEX`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Bytes of the region; 0 if the device does not implement it.
    pub size: u64,
    /// Offset of the region in the device file (for `pread`, `pwrite` and
    /// `mmap`).
    pub offset: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
}

impl RegionInfo {
    /// The region can be read.
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// The region can be written.
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }

    /// The region can be mapped with `mmap` (of the device file, at
    /// [`offset`](Self::offset)).
    pub fn mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports of one interrupt index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupts of the index (for MSI-X: the table size).
    pub count: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
}

impl IrqInfo {
    /// The interrupts can signal eventfds.
    pub fn eventfd(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_EVENTFD != 0
    }
}

/// The kernel side of one VFIO PCI device: [`VfioDeviceFd`] on a VFIO
/// device file descriptor, or a test double. Implementations take `&self`
/// (the device file allows concurrent `pread`/`pwrite`/ioctls) and are
/// shared between the device and its interrupt router.
///
/// [`VfioDeviceFd`]: crate::VfioDeviceFd
pub trait VfioDeviceIo: Send + Sync {
    /// `VFIO_DEVICE_GET_REGION_INFO` of region `index`. A region the
    /// device does not have is an error or has size 0.
    fn region_info(&self, index: u32) -> io::Result<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` inside region `index` (one
    /// `pread`, so the access width reaches the device as the guest made
    /// it). Fails if the range leaves the region.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset` inside region `index` (one `pwrite`).
    /// Fails if the range leaves the region.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;

    /// `VFIO_DEVICE_GET_IRQ_INFO` of interrupt index `index`.
    fn irq_info(&self, index: u32) -> io::Result<IrqInfo>;

    /// `VFIO_DEVICE_SET_IRQS` with `ACTION_TRIGGER | DATA_EVENTFD`: from
    /// interrupt `start` of index `index` on, interrupt `start + i`
    /// signals `fds[i]` (`None`: signals nothing). With the index
    /// disabled, this enables it with `fds.len()` interrupts (`start` must
    /// be 0); enabled, it replaces the eventfds of those interrupts.
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<BorrowedFd<'_>>]) -> io::Result<()>;

    /// `VFIO_DEVICE_SET_IRQS` with `ACTION_TRIGGER | DATA_NONE` and count
    /// 0: disables interrupt index `index` (it must be enabled).
    fn disable_irqs(&self, index: u32) -> io::Result<()>;

    /// `VFIO_DEVICE_RESET`: a function-level reset (FLR, PM or bus reset,
    /// whatever the kernel has for the device). The kernel saves and
    /// restores the configuration space around it.
    fn reset(&self) -> io::Result<()>;

    /// Maps `len` bytes at `offset` of region `index` into this process
    /// (`mmap` of the device file, shared, read and write), for the guest
    /// to reach the device's memory without a trap; the mapping lasts as
    /// long as the returned value. The default cannot (a test double
    /// without device memory).
    fn map_region(&self, index: u32, offset: u64, len: u64) -> io::Result<RegionMapping> {
        let _ = (index, offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Device memory mapped into this process ([`VfioDeviceIo::map_region`]);
/// unmapped when dropped.
#[derive(Debug)]
pub struct RegionMapping {
    addr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory of the device file; the value
// only owns the right to unmap it, which any thread may do.
unsafe impl Send for RegionMapping {}
// SAFETY: as above; `&RegionMapping` only reads the address and length.
unsafe impl Sync for RegionMapping {}

impl RegionMapping {
    /// `mmap`s `len` bytes of `fd` at file offset `offset`, shared, read
    /// and write.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed
        // address), so no existing memory is affected; the result is
        // checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = std::ptr::NonNull::new(addr).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { addr, len })
    }

    /// Host address of the first byte.
    pub fn host_address(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Never true: a mapping has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, unmapped once.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}
