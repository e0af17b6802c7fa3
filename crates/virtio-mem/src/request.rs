//! Guest bytes to a validated [`Request`], and [`Response`]s back to bytes.
//!
//! Everything here is pure: parsing has no effects, so the device can
//! refuse a malformed request before anything changes. Structural faults
//! (a request shorter than 24 bytes, a response buffer shorter than 10, an
//! unknown type) are [`Malformed`]: the device enters NEEDS_RESET. Range
//! faults (unaligned, zero blocks, outside the usable region, overflowing)
//! are not malformed: the specification answers them with
//! `VIRTIO_MEM_RESP_ERROR`, decided by [`BlockRange::resolve`].

use memvisor_memory::GuestRange;
use memvisor_virtio::queue::Malformed;

use crate::wire::{
    REQUEST_SIZE, RESPONSE_SIZE, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL, VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY, VIRTIO_MEM_RESP_ERROR, VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED, VIRTIO_MEM_STATE_PLUGGED, VIRTIO_MEM_STATE_UNPLUGGED, VirtioMemReq, VirtioMemResp,
};

/// The blocks a PLUG, UNPLUG or STATE request names, as the guest wrote
/// them (not yet checked against the device's geometry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// Guest-physical address of the first block.
    pub addr: u64,
    /// Number of consecutive blocks.
    pub nb_blocks: u16,
}

impl BlockRange {
    /// The guest range these blocks cover, if the specification allows it:
    /// `addr` aligned to `block_size`, at least one block, no overflow, and
    /// every block inside the usable region `[region_start, region_start +
    /// usable_size)`. `None` is answered `VIRTIO_MEM_RESP_ERROR`.
    ///
    /// `block_size` must be a power of two.
    pub fn resolve(&self, block_size: u64, region_start: u64, usable_size: u64) -> Option<GuestRange> {
        debug_assert!(block_size.is_power_of_two());
        if self.addr & (block_size - 1) != 0 || self.nb_blocks == 0 {
            return None;
        }
        let len = u64::from(self.nb_blocks).checked_mul(block_size)?;
        let range = GuestRange::new(self.addr, len)?;
        let usable = GuestRange::new(region_start, usable_size)?;
        usable.contains(&range).then_some(range)
    }
}

impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} blocks at {:#x}", self.nb_blocks, self.addr)
    }
}

/// A request of the guest-request queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `VIRTIO_MEM_REQ_PLUG`.
    Plug(BlockRange),
    /// `VIRTIO_MEM_REQ_UNPLUG`.
    Unplug(BlockRange),
    /// `VIRTIO_MEM_REQ_UNPLUG_ALL`.
    UnplugAll,
    /// `VIRTIO_MEM_REQ_STATE`.
    State(BlockRange),
}

impl Request {
    /// Parses the device-readable bytes of a chain whose device-writable
    /// buffers hold `writable_len` bytes.
    ///
    /// Checked in QEMU's order: the request must have all 24 bytes of
    /// `struct virtio_mem_req` ([`Malformed::RequestTooShort`]), the
    /// response buffer room for the 10 of `struct virtio_mem_resp`
    /// ([`Malformed::ResponseTooShort`]), and the type must be known
    /// ([`Malformed::UnknownType`]). Trailing bytes and padding are ignored,
    /// as the specification requires.
    pub fn parse(request: &[u8], writable_len: usize) -> Result<Self, Malformed> {
        let req = VirtioMemReq::from_bytes(request).ok_or(Malformed::RequestTooShort {
            got: request.len(),
            need: REQUEST_SIZE,
        })?;
        if writable_len < RESPONSE_SIZE {
            return Err(Malformed::ResponseTooShort {
                got: writable_len,
                need: RESPONSE_SIZE,
            });
        }
        let blocks = BlockRange {
            addr: req.addr,
            nb_blocks: req.nb_blocks,
        };
        match req.req_type {
            VIRTIO_MEM_REQ_PLUG => Ok(Self::Plug(blocks)),
            VIRTIO_MEM_REQ_UNPLUG => Ok(Self::Unplug(blocks)),
            VIRTIO_MEM_REQ_UNPLUG_ALL => Ok(Self::UnplugAll),
            VIRTIO_MEM_REQ_STATE => Ok(Self::State(blocks)),
            other => Err(Malformed::UnknownType(other)),
        }
    }

    /// The wire form, as a driver sends it.
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let (req_type, blocks) = match *self {
            Self::Plug(b) => (VIRTIO_MEM_REQ_PLUG, Some(b)),
            Self::Unplug(b) => (VIRTIO_MEM_REQ_UNPLUG, Some(b)),
            Self::UnplugAll => (VIRTIO_MEM_REQ_UNPLUG_ALL, None),
            Self::State(b) => (VIRTIO_MEM_REQ_STATE, Some(b)),
        };
        let b = blocks.unwrap_or(BlockRange { addr: 0, nb_blocks: 0 });
        VirtioMemReq {
            req_type,
            addr: b.addr,
            nb_blocks: b.nb_blocks,
        }
        .to_bytes()
    }
}

/// The state of a range of blocks, answered to STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Every block is plugged (`VIRTIO_MEM_STATE_PLUGGED`).
    Plugged,
    /// Every block is unplugged (`VIRTIO_MEM_STATE_UNPLUGGED`).
    Unplugged,
    /// Some of each (`VIRTIO_MEM_STATE_MIXED`).
    Mixed,
}

impl BlockState {
    /// The `VIRTIO_MEM_STATE_*` value.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Plugged => VIRTIO_MEM_STATE_PLUGGED,
            Self::Unplugged => VIRTIO_MEM_STATE_UNPLUGGED,
            Self::Mixed => VIRTIO_MEM_STATE_MIXED,
        }
    }

    /// The state named by a `VIRTIO_MEM_STATE_*` value.
    pub fn from_wire(value: u16) -> Option<Self> {
        match value {
            VIRTIO_MEM_STATE_PLUGGED => Some(Self::Plugged),
            VIRTIO_MEM_STATE_UNPLUGGED => Some(Self::Unplugged),
            VIRTIO_MEM_STATE_MIXED => Some(Self::Mixed),
            _ => None,
        }
    }
}

/// The device's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// `VIRTIO_MEM_RESP_ACK`, carrying the blocks' state for STATE.
    Ack(Option<BlockState>),
    /// `VIRTIO_MEM_RESP_NACK`: a plug beyond `requested_size`.
    Nack,
    /// `VIRTIO_MEM_RESP_BUSY`: migration running, a listener refused or
    /// vetoed, or preallocation failed. Nothing changed; the driver may
    /// retry.
    Busy,
    /// `VIRTIO_MEM_RESP_ERROR`: an invalid range, or blocks not all in the
    /// state the request needs.
    Error,
}

impl Response {
    /// The `VIRTIO_MEM_RESP_*` value.
    pub fn resp_type(&self) -> u16 {
        match self {
            Self::Ack(_) => VIRTIO_MEM_RESP_ACK,
            Self::Nack => VIRTIO_MEM_RESP_NACK,
            Self::Busy => VIRTIO_MEM_RESP_BUSY,
            Self::Error => VIRTIO_MEM_RESP_ERROR,
        }
    }

    /// The wire form (10 bytes).
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let state = match self {
            Self::Ack(Some(s)) => s.to_wire(),
            _ => 0,
        };
        VirtioMemResp {
            resp_type: self.resp_type(),
            state,
        }
        .to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 0x1_0000_0000;

    fn blocks(addr: u64, nb_blocks: u16) -> BlockRange {
        BlockRange { addr, nb_blocks }
    }

    #[test]
    fn parse_checks_sizes_then_type() {
        let plug = Request::Plug(blocks(BASE, 3));
        assert_eq!(Request::parse(&plug.to_bytes(), 10), Ok(plug));
        // Trailing bytes are ignored.
        let mut long = plug.to_bytes().to_vec();
        long.extend_from_slice(&[0xff; 8]);
        assert_eq!(Request::parse(&long, 64), Ok(plug));
        // Padding is ignored.
        let mut padded = Request::State(blocks(BASE, 1)).to_bytes();
        padded[2..8].fill(0xaa);
        padded[18..24].fill(0xbb);
        assert_eq!(Request::parse(&padded, 10), Ok(Request::State(blocks(BASE, 1))));
        assert_eq!(
            Request::parse(&plug.to_bytes()[..23], 10),
            Err(Malformed::RequestTooShort { got: 23, need: 24 })
        );
        assert_eq!(
            Request::parse(&plug.to_bytes(), 9),
            Err(Malformed::ResponseTooShort { got: 9, need: 10 })
        );
        // A short request is reported before a short response buffer.
        assert!(matches!(Request::parse(&[], 0), Err(Malformed::RequestTooShort { .. })));
        let mut unknown = plug.to_bytes();
        unknown[0] = 4;
        assert_eq!(Request::parse(&unknown, 10), Err(Malformed::UnknownType(4)));
        for r in [
            Request::Unplug(blocks(5, 6)),
            Request::UnplugAll,
            Request::State(blocks(BASE, 1)),
        ] {
            assert_eq!(Request::parse(&r.to_bytes(), 10), Ok(r));
        }
    }

    #[test]
    fn resolve_applies_the_specification_range_rules() {
        let bs = 2 * MIB;
        let usable = 64 * MIB;
        let ok = |b: BlockRange| b.resolve(bs, BASE, usable);
        assert_eq!(ok(blocks(BASE, 32)), GuestRange::new(BASE, usable));
        assert_eq!(ok(blocks(BASE + 62 * MIB, 1)), GuestRange::new(BASE + 62 * MIB, bs));
        assert_eq!(ok(blocks(BASE + MIB, 1)), None, "unaligned");
        assert_eq!(ok(blocks(BASE, 0)), None, "zero blocks");
        assert_eq!(ok(blocks(BASE - bs, 1)), None, "below the region");
        assert_eq!(ok(blocks(BASE + 62 * MIB, 2)), None, "crosses the usable end");
        assert_eq!(ok(blocks(BASE + usable, 1)), None, "past the usable end");
        assert_eq!(ok(blocks(!(bs - 1), 2)), None, "overflows");
        assert_eq!(blocks(BASE, 1).resolve(bs, BASE, 0), None, "empty usable region");
    }

    #[test]
    fn responses_encode() {
        assert_eq!(Response::Ack(None).to_bytes(), [0; 10]);
        assert_eq!(Response::Nack.to_bytes()[0], 1);
        assert_eq!(Response::Busy.to_bytes()[0], 2);
        assert_eq!(Response::Error.to_bytes()[0], 3);
        let b = Response::Ack(Some(BlockState::Unplugged)).to_bytes();
        assert_eq!((b[0], b[8]), (0, 1));
        for s in [BlockState::Plugged, BlockState::Unplugged, BlockState::Mixed] {
            assert_eq!(BlockState::from_wire(s.to_wire()), Some(s));
        }
        assert_eq!(BlockState::from_wire(3), None);
    }
}
