//! The crate's error type.

use std::io;

use memvisor_pci::PciError;

/// Why a passthrough device could not be opened, built or reset. Guest
/// accesses never fail: a failed device access reads all-ones and drops
/// the write, and is logged.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// A device name that cannot be passed to the kernel.
    #[error("VFIO device name {bdf:?} is empty, too long or contains a NUL byte")]
    InvalidBdf {
        /// The name.
        bdf: String,
    },
    /// `VFIO_GROUP_GET_DEVICE_FD` failed.
    #[error(
        "VFIO_GROUP_GET_DEVICE_FD({bdf}) failed: {source} (is {bdf} in the group, bound to vfio-pci, and the group in a container with an IOMMU set?)"
    )]
    GetDeviceFd {
        /// The device name.
        bdf: String,
        /// The error.
        source: io::Error,
    },
    /// `VFIO_DEVICE_GET_INFO` failed.
    #[error("VFIO_DEVICE_GET_INFO on {bdf} failed: {source}")]
    DeviceInfo {
        /// The device name.
        bdf: String,
        /// The error.
        source: io::Error,
    },
    /// The VFIO device is not a PCI device (or lacks the configuration
    /// region).
    #[error("VFIO device {bdf} is not a PCI device: flags {flags:#x}, {regions} regions")]
    NotPci {
        /// The device name.
        bdf: String,
        /// `VFIO_DEVICE_FLAGS_*`.
        flags: u32,
        /// Number of regions.
        regions: u32,
    },
    /// `VFIO_DEVICE_GET_REGION_INFO` failed.
    #[error("VFIO_DEVICE_GET_REGION_INFO of region {index} failed: {source}")]
    RegionInfo {
        /// Region index.
        index: u32,
        /// The error.
        source: io::Error,
    },
    /// The configuration region is missing or smaller than the 256-byte
    /// conventional configuration space.
    #[error("the VFIO configuration region has {size} bytes; a PCI function has at least 256")]
    ConfigRegionTooSmall {
        /// Its size.
        size: u64,
    },
    /// A read of the device's configuration space failed.
    #[error("reading {len} bytes of configuration space at {offset:#x} failed: {source}")]
    ConfigRead {
        /// Offset.
        offset: u16,
        /// Bytes.
        len: usize,
        /// The error.
        source: io::Error,
    },
    /// A write of the device's configuration space failed.
    #[error("writing configuration space at {offset:#x} failed: {source}")]
    ConfigWrite {
        /// Offset.
        offset: u16,
        /// The error.
        source: io::Error,
    },
    /// The vendor ID reads all-ones or zero: no function answers.
    #[error("the device's vendor ID reads {vendor_id:#06x}: no function answers")]
    DeviceAbsent {
        /// What the vendor ID read.
        vendor_id: u16,
    },
    /// Not a type-0 (endpoint) header: bridges cannot be passed through.
    #[error("header type {header_type:#04x} is not a type-0 endpoint header")]
    UnsupportedHeaderType {
        /// The header type register (bit 7: multi-function).
        header_type: u8,
    },
    /// A memory BAR with a reserved type, or a 64-bit BAR in the last slot.
    #[error("BAR {index} has an unusable type: register {register:#010x}")]
    InvalidBarType {
        /// BAR index.
        index: u8,
        /// The BAR register's value.
        register: u32,
    },
    /// A memory BAR whose VFIO region size memvisor's configuration space
    /// cannot present.
    #[error("BAR {index}: VFIO reports {size:#x} bytes: {source}")]
    BarSize {
        /// BAR index.
        index: u8,
        /// Region size.
        size: u64,
        /// Why it does not fit.
        source: PciError,
    },
    /// The MSI-X table or PBA lives in a BAR that is not a memory BAR of
    /// the device.
    #[error("the MSI-X {what} is in BAR {bir}, which is not a memory BAR of the device")]
    MsixBar {
        /// "table" or "PBA".
        what: &'static str,
        /// The BAR indicator register value.
        bir: u8,
    },
    /// The MSI-X table or PBA does not fit in its BAR.
    #[error("the MSI-X {what} ({len:#x} bytes at {offset:#x}) does not fit in BAR {bar} ({bar_size:#x} bytes)")]
    MsixOutsideBar {
        /// "table" or "PBA".
        what: &'static str,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u64,
        /// Bytes.
        len: u64,
        /// BAR size.
        bar_size: u64,
    },
    /// `VFIO_DEVICE_GET_IRQ_INFO` failed.
    #[error("VFIO_DEVICE_GET_IRQ_INFO of interrupt index {index} failed: {source}")]
    IrqInfo {
        /// Interrupt index.
        index: u32,
        /// The error.
        source: io::Error,
    },
    /// VFIO cannot deliver the MSI-X table's vectors through eventfds.
    #[error(
        "the MSI-X table has {vectors} vectors but VFIO offers {count} MSI-X interrupts (flags {flags:#x}, eventfd support needed)"
    )]
    MsixIrqs {
        /// Table size.
        vectors: u16,
        /// What VFIO reports.
        count: u32,
        /// `VFIO_IRQ_INFO_*`.
        flags: u32,
    },
    /// The VMM passed another number of irqfds than the device has MSI-X
    /// vectors.
    #[error("the device has {vectors} MSI-X vectors but {irqfds} irqfds were given (one per vector)")]
    VectorCountMismatch {
        /// MSI-X table size (0: no MSI-X capability).
        vectors: u16,
        /// irqfds given.
        irqfds: usize,
    },
    /// An eventfd could not be created.
    #[error("creating an eventfd failed: {0}")]
    EventFd(#[source] io::Error),
    /// memvisor's PCI layer refused a structure (MSI-X vector count).
    #[error(transparent)]
    Pci(#[from] PciError),
    /// `VFIO_DEVICE_RESET` failed.
    #[error("VFIO_DEVICE_RESET failed: {source}")]
    Reset {
        /// The error.
        source: io::Error,
    },
}
