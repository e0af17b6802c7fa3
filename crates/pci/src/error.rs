//! The crate's error type.

/// Why a PCI object could not be built or placed. Guest accesses never
/// fail: they are absorbed (ignored writes, all-ones or zero reads).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A device slot outside 1..=31 (slot 0 is the host bridge).
    #[error("PCI slot {0} is not in 1..=31")]
    InvalidSlot(u8),
    /// The slot already holds a device.
    #[error("PCI slot {0} is already occupied")]
    SlotOccupied(u8),
    /// Every slot of bus 0 is occupied.
    #[error("no free PCI slot on bus 0: all 31 device slots are occupied")]
    BusFull,
    /// A BAR index outside 0..=5, or 5 for a 64-bit BAR (which takes two).
    #[error("BAR index {0} is not usable (0..=5, 0..=4 for a 64-bit BAR)")]
    InvalidBarIndex(u8),
    /// The BAR (or the upper half a 64-bit BAR needs) is already defined.
    #[error("BAR {0} is already defined")]
    BarInUse(u8),
    /// A BAR size that is not a power of two of at least 16 bytes, or too
    /// large for a 32-bit BAR.
    #[error("BAR size {size:#x} is not a power of two in 16..={max:#x}")]
    InvalidBarSize {
        /// The size asked for.
        size: u64,
        /// The largest size the BAR type allows.
        max: u64,
    },
    /// A BAR window that is empty-inverted or, for the 32-bit window,
    /// reaches above 4 GiB.
    #[error("BAR window {start:#x}..{end:#x} is invalid: {reason}")]
    InvalidWindow {
        /// First address.
        start: u64,
        /// End address (exclusive).
        end: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The windows have no room left for a BAR.
    #[error("no room for a {size:#x}-byte BAR in the {window} window")]
    OutOfBarSpace {
        /// The BAR size.
        size: u64,
        /// Which window(s) were tried.
        window: &'static str,
    },
    /// A capability that does not fit in the 256-byte configuration space.
    #[error("a {len}-byte capability does not fit in configuration space at offset {offset:#x}")]
    CapabilitySpace {
        /// Bytes the capability needs.
        len: usize,
        /// Where it would start.
        offset: usize,
    },
    /// An MSI-X table size outside what the device supports.
    #[error("MSI-X vector count {got} is not in 1..={max}")]
    InvalidVectorCount {
        /// Vectors asked for.
        got: u16,
        /// The most supported.
        max: u16,
    },
    /// A virtio device type a non-transitional PCI device ID cannot carry.
    #[error("virtio device type {0} is above 0x3f: no PCI device ID 0x1040 + type exists")]
    DeviceType(u32),
    /// A virtio device with no queues or more than the transport supports.
    #[error("virtio device has {got} queues; the transport supports 1..={max}")]
    QueueCount {
        /// The device's queue count.
        got: usize,
        /// The most supported.
        max: usize,
    },
    /// A queue whose maximum size is not a power of two in 1..=32768.
    #[error("queue {index}: maximum size {size} is not a power of two in 1..=32768")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The maximum size the device reports.
        size: u16,
    },
    /// The device behind a [`DeviceAccess`](crate::DeviceAccess) could not
    /// be reached.
    #[error("the virtio device is not reachable through its DeviceAccess")]
    DeviceUnavailable,
    /// A queue notification eventfd could not be created.
    #[error("queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Why a saved transport state (a [`VirtioPciState`], or the
/// [`ConfigSpaceState`] or [`MsixState`] in it) cannot be restored here.
/// A refused restore changes nothing, except
/// [`Activation`](Self::Activation), which comes last.
///
/// [`VirtioPciState`]: crate::virtio_pci::persist::VirtioPciState
/// [`ConfigSpaceState`]: crate::config::ConfigSpaceState
/// [`MsixState`]: crate::msix::MsixState
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportStateError {
    /// A value of the saved state differs from the destination's own: the
    /// destination was not built with the same device in the same shape.
    #[error("transport state: {field} is {saved:#x} in the state but {local:#x} here")]
    Mismatch {
        /// What differs, e.g. "device type" or "queue 1 maximum size".
        field: String,
        /// The saved (source's) value.
        saved: u64,
        /// The destination's value.
        local: u64,
    },
    /// A value of the saved state is invalid in itself (a garbled state).
    #[error("transport state: {field} {value:#x} is invalid: {reason}")]
    Invalid {
        /// Which value, e.g. "queue 0 size".
        field: String,
        /// The value.
        value: u64,
        /// Why it is invalid.
        reason: String,
    },
    /// The destination transport was already used by a driver; a state is
    /// restored into a freshly built one.
    #[error("transport state: the transport is in use (device status {status:#x}); restore into a freshly built one")]
    InUse {
        /// The transport's device status now.
        status: u8,
    },
    /// The device did not take the features the state says it accepted.
    #[error("transport state: the device kept features {kept:#x} of {wanted:#x}")]
    Features {
        /// The features given to the device.
        wanted: u64,
        /// What it kept.
        kept: u64,
    },
    /// The device was active on the source but could not be activated
    /// here. The registers are restored and the status reads
    /// DEVICE_NEEDS_RESET, as after a failed activation; the restore (the
    /// migration) must fail.
    #[error("transport state: activating the device with the restored queues failed: {0}")]
    Activation(String),
    /// The device behind the transport could not be reached.
    #[error("transport state: the virtio device is not reachable through its DeviceAccess")]
    DeviceUnavailable,
}
