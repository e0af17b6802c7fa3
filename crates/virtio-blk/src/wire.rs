//! Wire constants and structures of the virtio block device, from the
//! virtio specification (§5.2 "Block Device", device ID 2), with the values
//! taken from `virtio-bindings` so that they are defined once.
//!
//! The structures are encoded and decoded field by field in little endian
//! at the offsets of the specification's (packed) C structures, so no
//! `unsafe` byte casting is needed and the layout is explicit.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{self as vb, virtio_blk_config, virtio_blk_outhdr};
use virtio_bindings::virtio_config;

/// Virtio device ID of the block device.
pub const DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Bytes per sector: `sector` and `capacity` always count 512-byte units,
/// whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` bounds the size of one segment.
pub const F_SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` bounds the segments of one request.
pub const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is the logical block size.
pub const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
/// `VIRTIO_BLK_F_FLUSH`: the device has a write cache and accepts FLUSH.
pub const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
/// `VIRTIO_RING_F_INDIRECT_DESC` (bit 28): a ring descriptor may point to a
/// table of descriptors holding the chain, so that a request of many
/// segments takes one ring entry.
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_F_ACCESS_PLATFORM` (bit 33): the device reaches memory through
/// the platform's IOMMU, so every address the driver gives it (rings and
/// buffers) is an I/O virtual address.
pub const F_ACCESS_PLATFORM: u64 = 1 << virtio_config::VIRTIO_F_ACCESS_PLATFORM;

/// Request type: read sectors into the device-writable buffers.
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
/// Request type: write the device-readable buffers to sectors.
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
/// Request type: make every completed write durable.
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
/// Request type: return the device's serial (up to [`ID_BYTES`] bytes).
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;

/// Status: success.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Status: the request failed (or was invalid).
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Status: the request type is not supported.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Bytes of the serial a GET_ID returns (NUL-padded).
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// Size of `struct virtio_blk_outhdr`, the request header.
pub const OUTHDR_SIZE: usize = size_of::<virtio_blk_outhdr>();
/// Size of `struct virtio_blk_config`, the configuration space.
pub const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

const _: () = assert!(OUTHDR_SIZE == 16 && CONFIG_SIZE == 96);

/// Offsets of the configuration fields the device fills, for drivers and tests.
pub mod config_offset {
    use super::*;

    /// `capacity` (le64, in 512-byte sectors).
    pub const CAPACITY: usize = offset_of!(virtio_blk_config, capacity);
    /// `size_max` (le32, bytes per segment).
    pub const SIZE_MAX: usize = offset_of!(virtio_blk_config, size_max);
    /// `seg_max` (le32, segments per request).
    pub const SEG_MAX: usize = offset_of!(virtio_blk_config, seg_max);
    /// `blk_size` (le32, bytes).
    pub const BLK_SIZE: usize = offset_of!(virtio_blk_config, blk_size);
}

const _: () = assert!(
    config_offset::CAPACITY == 0
        && config_offset::SIZE_MAX == 8
        && config_offset::SEG_MAX == 12
        && config_offset::BLK_SIZE == 20
);

/// `struct virtio_blk_outhdr`: `le32 type; le32 reserved (Linux: ioprio);
/// le64 sector` — the first 16 device-readable bytes of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutHdr {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub req_type: u32,
    /// Reserved by the specification; Linux puts the I/O priority here. Ignored.
    pub reserved: u32,
    /// First 512-byte sector of an IN or OUT.
    pub sector: u64,
}

impl OutHdr {
    /// Decodes the header.
    pub fn from_bytes(b: &[u8; OUTHDR_SIZE]) -> Self {
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&b[8..16]);
        Self {
            req_type: le32(0),
            reserved: le32(4),
            sector: u64::from_le_bytes(sector),
        }
    }

    /// Encodes the header as a driver puts it on the queue.
    pub fn to_bytes(&self) -> [u8; OUTHDR_SIZE] {
        let mut b = [0u8; OUTHDR_SIZE];
        b[0..4].copy_from_slice(&self.req_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// The fields of `struct virtio_blk_config` this device fills; every other
/// field (geometry, topology, discard, write zeroes, secure erase, zoned)
/// belongs to a feature it does not offer and reads as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Size of the disk in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (descriptor) in bytes, with `VIRTIO_BLK_F_SIZE_MAX`.
    pub size_max: u32,
    /// Most data segments per request, with `VIRTIO_BLK_F_SEG_MAX`.
    pub seg_max: u32,
    /// Logical block size in bytes, with `VIRTIO_BLK_F_BLK_SIZE`.
    pub blk_size: u32,
}

impl BlkConfig {
    /// Encodes the whole configuration space ([`CONFIG_SIZE`] bytes).
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        use config_offset::*;
        let mut b = [0u8; CONFIG_SIZE];
        b[CAPACITY..CAPACITY + 8].copy_from_slice(&self.capacity.to_le_bytes());
        b[SIZE_MAX..SIZE_MAX + 4].copy_from_slice(&self.size_max.to_le_bytes());
        b[SEG_MAX..SEG_MAX + 4].copy_from_slice(&self.seg_max.to_le_bytes());
        b[BLK_SIZE..BLK_SIZE + 4].copy_from_slice(&self.blk_size.to_le_bytes());
        b
    }

    /// Decodes a configuration space as a driver reads it, or `None` if
    /// `bytes` is shorter than the fields this device fills.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        use config_offset::*;
        let b = bytes.get(..BLK_SIZE + 4)?;
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&b[CAPACITY..CAPACITY + 8]);
        Some(Self {
            capacity: u64::from_le_bytes(capacity),
            size_max: le32(SIZE_MAX),
            seg_max: le32(SEG_MAX),
            blk_size: le32(BLK_SIZE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_specification() {
        let hdr = OutHdr {
            req_type: T_GET_ID,
            reserved: 0x0102_0304,
            sector: 0x1122_3344_5566_7788,
        };
        let b = hdr.to_bytes();
        assert_eq!(&b[0..4], &[8, 0, 0, 0]);
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(&b[8..16], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(OutHdr::from_bytes(&b), hdr);

        let cfg = BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            size_max: 0x0010_0000,
            seg_max: 126,
            blk_size: 512,
        };
        let b = cfg.to_bytes();
        assert_eq!(b.len(), 96);
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..12], &[0, 0, 0x10, 0]);
        assert_eq!(&b[12..16], &[126, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0; 4], "geometry");
        assert_eq!(&b[20..24], &[0, 2, 0, 0]);
        assert!(b[24..].iter().all(|&x| x == 0));
        assert_eq!(BlkConfig::from_bytes(&b), Some(cfg));
        assert_eq!(BlkConfig::from_bytes(&b[..23]), None);
    }

    #[test]
    fn constants_are_the_specification_values() {
        assert_eq!(DEVICE_ID, 2);
        assert_eq!((T_IN, T_OUT, T_FLUSH, T_GET_ID), (0, 1, 4, 8));
        assert_eq!((S_OK, S_IOERR, S_UNSUPP), (0, 1, 2));
        assert_eq!(
            (F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH),
            (1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9)
        );
        assert_eq!(F_ACCESS_PLATFORM, 1 << 33);
        assert_eq!(F_INDIRECT_DESC, 1 << 28);
        assert_eq!(ID_BYTES, 20);
    }
}
