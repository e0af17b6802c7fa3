//! Wire structures of the virtio-iommu device, from the virtio
//! specification ("IOMMU device", section 5.13 of virtio 1.2/1.3). They are
//! not in `virtio-bindings`, so they are defined here, once.
//!
//! All multi-byte fields are little-endian. Requests start with a 4-byte
//! head (`type`, `reserved[3]`) in the device-readable part and end with a
//! 4-byte tail (`status`, `reserved[3]`) in the device-writable part.

use std::fmt;

/// The virtio device ID of an IOMMU.
pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_IOMMU;

/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue (fault reports).
pub const EVENT_QUEUE: u16 = 1;

/// `VIRTIO_IOMMU_F_INPUT_RANGE`: `input_range` is valid.
pub const F_INPUT_RANGE: u64 = 1 << 0;
/// `VIRTIO_IOMMU_F_DOMAIN_RANGE`: `domain_range` is valid.
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
/// `VIRTIO_IOMMU_F_MAP_UNMAP`: MAP and UNMAP requests are available.
pub const F_MAP_UNMAP: u64 = 1 << 2;
/// `VIRTIO_IOMMU_F_BYPASS` (legacy, superseded by `BYPASS_CONFIG`; not offered).
pub const F_BYPASS: u64 = 1 << 3;
/// `VIRTIO_IOMMU_F_PROBE`: the PROBE request is available.
pub const F_PROBE: u64 = 1 << 4;
/// `VIRTIO_IOMMU_F_MMIO`: the `MAP_F_MMIO` flag is available.
pub const F_MMIO: u64 = 1 << 5;
/// `VIRTIO_IOMMU_F_BYPASS_CONFIG`: the `bypass` config field and the
/// `ATTACH_F_BYPASS` flag are available.
pub const F_BYPASS_CONFIG: u64 = 1 << 6;

/// `VIRTIO_IOMMU_T_ATTACH`.
pub const T_ATTACH: u8 = 1;
/// `VIRTIO_IOMMU_T_DETACH`.
pub const T_DETACH: u8 = 2;
/// `VIRTIO_IOMMU_T_MAP`.
pub const T_MAP: u8 = 3;
/// `VIRTIO_IOMMU_T_UNMAP`.
pub const T_UNMAP: u8 = 4;
/// `VIRTIO_IOMMU_T_PROBE`.
pub const T_PROBE: u8 = 5;

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`: the domain is a bypass domain.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;

/// `VIRTIO_IOMMU_MAP_F_READ`.
pub const MAP_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_WRITE`.
pub const MAP_F_WRITE: u32 = 1 << 1;
/// `VIRTIO_IOMMU_MAP_F_MMIO`.
pub const MAP_F_MMIO: u32 = 1 << 2;

// The notification contract's flags carry the wire bits unchanged.
const _: () = assert!(
    memvisor_iommu::MapFlags::READ.bits() == MAP_F_READ
        && memvisor_iommu::MapFlags::WRITE.bits() == MAP_F_WRITE
        && memvisor_iommu::MapFlags::MMIO.bits() == MAP_F_MMIO
);

/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED`.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// `VIRTIO_IOMMU_RESV_MEM_T_MSI`.
pub const RESV_MEM_T_MSI: u8 = 1;

/// `VIRTIO_IOMMU_FAULT_R_UNKNOWN`.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// `VIRTIO_IOMMU_FAULT_R_DOMAIN`: the endpoint is not attached to a domain.
pub const FAULT_R_DOMAIN: u8 = 1;
/// `VIRTIO_IOMMU_FAULT_R_MAPPING`: no mapping, or wrong permissions.
pub const FAULT_R_MAPPING: u8 = 2;
/// `VIRTIO_IOMMU_FAULT_F_READ`.
pub const FAULT_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_FAULT_F_WRITE`.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// `VIRTIO_IOMMU_FAULT_F_ADDRESS`: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// Bytes of the request head and of the response tail.
pub const HEAD_SIZE: usize = 4;
/// Bytes of the response tail.
pub const TAIL_SIZE: usize = 4;
/// Device-readable bytes of an ATTACH request (head, domain, endpoint, flags, `reserved[4]`).
pub const ATTACH_SIZE: usize = HEAD_SIZE + 16;
/// Device-readable bytes of a DETACH request (head, domain, endpoint, `reserved[8]`).
pub const DETACH_SIZE: usize = HEAD_SIZE + 16;
/// Device-readable bytes of a MAP request (head, domain, virt_start, virt_end, phys_start, flags).
pub const MAP_SIZE: usize = HEAD_SIZE + 32;
/// Device-readable bytes of an UNMAP request (head, domain, virt_start, virt_end, `reserved[4]`).
pub const UNMAP_SIZE: usize = HEAD_SIZE + 24;
/// Device-readable bytes of a PROBE request (head, endpoint, `reserved[64]`).
pub const PROBE_SIZE: usize = HEAD_SIZE + 68;
/// Bytes of a `virtio_iommu_fault` event.
pub const FAULT_SIZE: usize = 24;
/// Bytes of a RESV_MEM property including its 4-byte property header.
pub const RESV_MEM_PROPERTY_SIZE: usize = 24;
/// Bytes of `struct virtio_iommu_config`.
pub const CONFIG_SIZE: usize = 40;
/// Offset of the `bypass` byte in the configuration space.
pub const CONFIG_BYPASS_OFFSET: u64 = 36;

/// A request status (`virtio_iommu_req_tail.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_IOMMU_S_OK`.
    Ok = 0,
    /// `VIRTIO_IOMMU_S_IOERR`: virtio communication error.
    IoErr = 1,
    /// `VIRTIO_IOMMU_S_UNSUPP`: unsupported request.
    Unsupp = 2,
    /// `VIRTIO_IOMMU_S_DEVERR`: internal device error.
    DevErr = 3,
    /// `VIRTIO_IOMMU_S_INVAL`: invalid parameters.
    Inval = 4,
    /// `VIRTIO_IOMMU_S_RANGE`: out-of-range parameters.
    Range = 5,
    /// `VIRTIO_IOMMU_S_NOENT`: entry not found.
    NoEnt = 6,
    /// `VIRTIO_IOMMU_S_FAULT`: bad address.
    Fault = 7,
    /// `VIRTIO_IOMMU_S_NOMEM`: insufficient resources.
    NoMem = 8,
}

impl Status {
    /// The status for a wire value, if it is one.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Ok,
            1 => Self::IoErr,
            2 => Self::Unsupp,
            3 => Self::DevErr,
            4 => Self::Inval,
            5 => Self::Range,
            6 => Self::NoEnt,
            7 => Self::Fault,
            8 => Self::NoMem,
            _ => return None,
        })
    }

    /// The lower-case name used by the devtrace format (`ok`, `inval`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::IoErr => "ioerr",
            Self::Unsupp => "unsupp",
            Self::DevErr => "deverr",
            Self::Inval => "inval",
            Self::Range => "range",
            Self::NoEnt => "noent",
            Self::Fault => "fault",
            Self::NoMem => "nomem",
        }
    }

    /// The 4-byte response tail carrying this status.
    pub fn tail(self) -> [u8; TAIL_SIZE] {
        [self as u8, 0, 0, 0]
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VIRTIO_IOMMU_S_{}", self.name().to_ascii_uppercase())
    }
}

/// Little-endian field readers over a request that is known to be long
/// enough (the parser checks the length first).
pub(crate) fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(b)
}

/// See [`le_u32`].
pub(crate) fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(b)
}

/// The configuration space, `struct virtio_iommu_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// `input_range.start`.
    pub input_start: u64,
    /// `input_range.end` (inclusive).
    pub input_end: u64,
    /// `domain_range.start`.
    pub domain_start: u32,
    /// `domain_range.end` (inclusive).
    pub domain_end: u32,
    /// `probe_size`.
    pub probe_size: u32,
    /// `bypass` (0 or 1).
    pub bypass: bool,
}

impl ConfigSpace {
    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_start.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_end.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_start.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_end.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[36] = u8::from(self.bypass);
        b
    }
}

/// Encodes a RESV_MEM property: header (type, length = 20), subtype,
/// `reserved[3]`, start, end (inclusive).
pub fn resv_mem_property(subtype: u8, start: u64, end: u64) -> [u8; RESV_MEM_PROPERTY_SIZE] {
    let mut b = [0u8; RESV_MEM_PROPERTY_SIZE];
    b[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    b[2..4].copy_from_slice(&((RESV_MEM_PROPERTY_SIZE - 4) as u16).to_le_bytes());
    b[4] = subtype;
    b[8..16].copy_from_slice(&start.to_le_bytes());
    b[16..24].copy_from_slice(&end.to_le_bytes());
    b
}

/// A `virtio_iommu_fault` event as written to the event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultEvent {
    /// `reason` (`FAULT_R_*`).
    pub reason: u8,
    /// `flags` (`FAULT_F_*`).
    pub flags: u32,
    /// The endpoint that faulted.
    pub endpoint: u32,
    /// The faulting address, valid if `flags` has [`FAULT_F_ADDRESS`].
    pub address: u64,
}

impl FaultEvent {
    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; FAULT_SIZE] {
        let mut b = [0u8; FAULT_SIZE];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }

    /// Decodes wire bytes (for drivers and tests); `None` if too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < FAULT_SIZE {
            return None;
        }
        Some(Self {
            reason: b[0],
            flags: le_u32(b, 4),
            endpoint: le_u32(b, 8),
            address: le_u64(b, 16),
        })
    }
}
