//! Wire constants and structures of the virtio memory device, from the
//! virtio specification ("Memory Device", device ID 24), defined once.
//!
//! The structures are encoded and decoded field by field in little endian,
//! so no `unsafe` byte casting is needed and the layout is explicit.

/// Virtio device ID of the memory device.
pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_MEM;

/// `VIRTIO_MEM_F_ACPI_PXM`: `node_id` in the configuration is valid and is
/// an ACPI PXM.
pub const F_ACPI_PXM: u64 = 1 << 0;
/// `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`: the driver must not access
/// unplugged memory.
pub const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

/// Request type: plug consecutive unplugged blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug consecutive plugged blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug every plugged block.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: query the state of consecutive blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Response type: the request was carried out.
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// Response type: the request was refused (a plug beyond `requested_size`).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// Response type: the request cannot be processed now; the driver may retry.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// Response type: the request is invalid.
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

/// STATE answer: every block of the range is plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// STATE answer: every block of the range is unplugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// STATE answer: some blocks are plugged, some are not.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// Size of `struct virtio_mem_req` on the wire.
pub const REQUEST_SIZE: usize = 24;
/// Size of `struct virtio_mem_resp` on the wire.
pub const RESPONSE_SIZE: usize = 10;
/// Size of `struct virtio_mem_config`.
pub const CONFIG_SIZE: usize = 56;

/// Maximum size of the request queue (the only queue).
pub const QUEUE_SIZE: u16 = 128;

/// Smallest block size the device accepts (1 MiB), to keep the bitmap small.
pub const MIN_BLOCK_SIZE: u64 = 1 << 20;
/// Block size used when none is configured (2 MiB, the x86-64 THP size),
/// unless the backing's page size is larger.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// How far the usable region extends past `requested_size` (256 MiB, QEMU's
/// value on x86: twice the Linux memory section size), so that the driver
/// can pick whole memory blocks.
pub const USABLE_EXTENT: u64 = 256 << 20;

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// `struct virtio_mem_req`: `le16 type; le16 padding[3]; le64 addr;
/// le16 nb_blocks; le16 padding[3]` (24 bytes). UNPLUG_ALL ignores `addr`
/// and `nb_blocks`; the device ignores the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioMemReq {
    /// Request type (`VIRTIO_MEM_REQ_*`).
    pub req_type: u16,
    /// Guest-physical address of the first block.
    pub addr: u64,
    /// Number of consecutive blocks.
    pub nb_blocks: u16,
}

impl VirtioMemReq {
    /// Decodes the first [`REQUEST_SIZE`] bytes of `bytes`, or `None` if
    /// there are fewer.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < REQUEST_SIZE {
            return None;
        }
        Some(Self {
            req_type: le16(bytes, 0),
            addr: le64(bytes, 8),
            nb_blocks: le16(bytes, 16),
        })
    }

    /// Encodes the request as a driver puts it on the queue (padding zero).
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..2].copy_from_slice(&self.req_type.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..18].copy_from_slice(&self.nb_blocks.to_le_bytes());
        b
    }
}

/// `struct virtio_mem_resp`: `le16 type; le16 padding[3]; union { le16
/// state; }` (10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioMemResp {
    /// Response type (`VIRTIO_MEM_RESP_*`).
    pub resp_type: u16,
    /// For an acknowledged STATE request, `VIRTIO_MEM_STATE_*`; 0 otherwise.
    pub state: u16,
}

impl VirtioMemResp {
    /// Encodes the response (padding zero).
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..2].copy_from_slice(&self.resp_type.to_le_bytes());
        b[8..10].copy_from_slice(&self.state.to_le_bytes());
        b
    }

    /// Decodes a response, as a driver reads it, or `None` if `bytes` is
    /// shorter than [`RESPONSE_SIZE`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < RESPONSE_SIZE {
            return None;
        }
        Some(Self {
            resp_type: le16(bytes, 0),
            state: le16(bytes, 8),
        })
    }
}

/// `struct virtio_mem_config` (56 bytes): `le64 block_size; le16 node_id;
/// u8 padding[6]; le64 addr; le64 region_size; le64 usable_region_size;
/// le64 plugged_size; le64 requested_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioMemConfig {
    /// Size and alignment of a block in bytes.
    pub block_size: u64,
    /// ACPI proximity domain, meaningful only with `VIRTIO_MEM_F_ACPI_PXM`.
    pub node_id: u16,
    /// Guest-physical start of the device-managed region.
    pub addr: u64,
    /// Size of the device-managed region.
    pub region_size: u64,
    /// Size of its usable part, from `addr`.
    pub usable_region_size: u64,
    /// Bytes plugged.
    pub plugged_size: u64,
    /// Bytes the device asks the driver to plug.
    pub requested_size: u64,
}

/// Offsets of the configuration fields, for drivers and tests.
pub mod config_offset {
    /// `block_size`.
    pub const BLOCK_SIZE: u64 = 0;
    /// `node_id`.
    pub const NODE_ID: u64 = 8;
    /// `addr`.
    pub const ADDR: u64 = 16;
    /// `region_size`.
    pub const REGION_SIZE: u64 = 24;
    /// `usable_region_size`.
    pub const USABLE_REGION_SIZE: u64 = 32;
    /// `plugged_size`.
    pub const PLUGGED_SIZE: u64 = 40;
    /// `requested_size`.
    pub const REQUESTED_SIZE: u64 = 48;
}

impl VirtioMemConfig {
    /// Encodes the configuration space.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.block_size.to_le_bytes());
        b[8..10].copy_from_slice(&self.node_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.usable_region_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.plugged_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        b
    }

    /// Decodes a configuration space, or `None` if `bytes` is shorter than
    /// [`CONFIG_SIZE`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < CONFIG_SIZE {
            return None;
        }
        Some(Self {
            block_size: le64(bytes, 0),
            node_id: le16(bytes, 8),
            addr: le64(bytes, 16),
            region_size: le64(bytes, 24),
            usable_region_size: le64(bytes, 32),
            plugged_size: le64(bytes, 40),
            requested_size: le64(bytes, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_specification() {
        let req = VirtioMemReq {
            req_type: VIRTIO_MEM_REQ_STATE,
            addr: 0x1_0020_0000,
            nb_blocks: 0x1234,
        };
        let b = req.to_bytes();
        assert_eq!(&b[0..2], &[3, 0]);
        assert_eq!(&b[8..16], &0x1_0020_0000u64.to_le_bytes());
        assert_eq!(&b[16..18], &[0x34, 0x12]);
        assert_eq!(VirtioMemReq::from_bytes(&b), Some(req));
        assert_eq!(VirtioMemReq::from_bytes(&b[..23]), None);

        let resp = VirtioMemResp {
            resp_type: VIRTIO_MEM_RESP_ACK,
            state: VIRTIO_MEM_STATE_MIXED,
        };
        assert_eq!(resp.to_bytes(), [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(VirtioMemResp::from_bytes(&resp.to_bytes()), Some(resp));

        let cfg = VirtioMemConfig {
            block_size: 1,
            node_id: 2,
            addr: 3,
            region_size: 4,
            usable_region_size: 5,
            plugged_size: 6,
            requested_size: 7,
        };
        let b = cfg.to_bytes();
        for (offset, value) in [
            (config_offset::BLOCK_SIZE, 1u8),
            (config_offset::NODE_ID, 2),
            (config_offset::ADDR, 3),
            (config_offset::REGION_SIZE, 4),
            (config_offset::USABLE_REGION_SIZE, 5),
            (config_offset::PLUGGED_SIZE, 6),
            (config_offset::REQUESTED_SIZE, 7),
        ] {
            assert_eq!(b[offset as usize], value);
        }
        assert_eq!(VirtioMemConfig::from_bytes(&b), Some(cfg));
    }
}
