//! Parsing: guest bytes → a [`Request`], or a [`Malformed`] error.
//!
//! Only the *shape* of a request is checked here (its length and type);
//! what its fields mean is decided by the device (`effects.rs`), which
//! answers bad values with a virtio status. [`Request::to_bytes`] is the inverse, for
//! drivers, tests and the trace replayer.

use memvisor_virtio::queue::Malformed;

use smallvec::SmallVec;

use crate::wire::{
    ATTACH_SIZE, DETACH_SIZE, HEAD_SIZE, MAP_SIZE, PROBE_SIZE, T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP, UNMAP_SIZE,
    le_u32, le_u64,
};

/// The largest request the device reads (a PROBE); longer chains are
/// truncated to it, the rest being padding the device ignores.
pub const MAX_REQUEST: usize = PROBE_SIZE;

/// `VIRTIO_IOMMU_T_ATTACH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    /// Domain to attach to (created if it does not exist).
    pub domain: u32,
    /// Endpoint to attach.
    pub endpoint: u32,
    /// `ATTACH_F_*` flags.
    pub flags: u32,
    /// The `reserved[4]` bytes, which must be zero.
    pub reserved: [u8; 4],
}

/// `VIRTIO_IOMMU_T_DETACH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detach {
    /// Domain to detach from.
    pub domain: u32,
    /// Endpoint to detach.
    pub endpoint: u32,
}

/// `VIRTIO_IOMMU_T_MAP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Map {
    /// Domain to map into.
    pub domain: u32,
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA (inclusive).
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// `MAP_F_*` flags, unchecked.
    pub flags: u32,
}

/// `VIRTIO_IOMMU_T_UNMAP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmap {
    /// Domain to unmap from.
    pub domain: u32,
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA (inclusive).
    pub virt_end: u64,
}

/// `VIRTIO_IOMMU_T_PROBE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Endpoint to describe.
    pub endpoint: u32,
}

/// A request whose shape is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// ATTACH.
    Attach(Attach),
    /// DETACH.
    Detach(Detach),
    /// MAP.
    Map(Map),
    /// UNMAP.
    Unmap(Unmap),
    /// PROBE.
    Probe(Probe),
}

fn need(bytes: &[u8], n: usize) -> Result<(), Malformed> {
    if bytes.len() < n {
        Err(Malformed::RequestTooShort {
            got: bytes.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

impl Request {
    /// Parses the device-readable bytes of a request. Too short for its
    /// type, or an unknown type, is [`Malformed`]; trailing bytes are
    /// ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, Malformed> {
        need(bytes, HEAD_SIZE)?;
        let body = HEAD_SIZE;
        Ok(match bytes[0] {
            T_ATTACH => {
                need(bytes, ATTACH_SIZE)?;
                let mut reserved = [0u8; 4];
                reserved.copy_from_slice(&bytes[body + 12..body + 16]);
                Self::Attach(Attach {
                    domain: le_u32(bytes, body),
                    endpoint: le_u32(bytes, body + 4),
                    flags: le_u32(bytes, body + 8),
                    reserved,
                })
            }
            T_DETACH => {
                need(bytes, DETACH_SIZE)?;
                Self::Detach(Detach {
                    domain: le_u32(bytes, body),
                    endpoint: le_u32(bytes, body + 4),
                })
            }
            T_MAP => {
                need(bytes, MAP_SIZE)?;
                Self::Map(Map {
                    domain: le_u32(bytes, body),
                    virt_start: le_u64(bytes, body + 4),
                    virt_end: le_u64(bytes, body + 12),
                    phys_start: le_u64(bytes, body + 20),
                    flags: le_u32(bytes, body + 28),
                })
            }
            T_UNMAP => {
                need(bytes, UNMAP_SIZE)?;
                Self::Unmap(Unmap {
                    domain: le_u32(bytes, body),
                    virt_start: le_u64(bytes, body + 4),
                    virt_end: le_u64(bytes, body + 12),
                })
            }
            T_PROBE => {
                need(bytes, PROBE_SIZE)?;
                Self::Probe(Probe {
                    endpoint: le_u32(bytes, body),
                })
            }
            other => return Err(Malformed::UnknownType(u16::from(other))),
        })
    }

    /// The device-readable bytes a driver sends for this request (reserved
    /// fields zero, except ATTACH's as given), without an allocation.
    pub fn to_bytes(&self) -> SmallVec<[u8; MAX_REQUEST]> {
        let mut buf = [0u8; MAX_REQUEST];
        let mut len = 0;
        let mut put = |bytes: &[u8]| {
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        };
        match self {
            Self::Attach(a) => {
                put(&[T_ATTACH, 0, 0, 0]);
                put(&a.domain.to_le_bytes());
                put(&a.endpoint.to_le_bytes());
                put(&a.flags.to_le_bytes());
                put(&a.reserved);
            }
            Self::Detach(d) => {
                put(&[T_DETACH, 0, 0, 0]);
                put(&d.domain.to_le_bytes());
                put(&d.endpoint.to_le_bytes());
                put(&[0; 8]);
            }
            Self::Map(m) => {
                put(&[T_MAP, 0, 0, 0]);
                put(&m.domain.to_le_bytes());
                put(&m.virt_start.to_le_bytes());
                put(&m.virt_end.to_le_bytes());
                put(&m.phys_start.to_le_bytes());
                put(&m.flags.to_le_bytes());
            }
            Self::Unmap(u) => {
                put(&[T_UNMAP, 0, 0, 0]);
                put(&u.domain.to_le_bytes());
                put(&u.virt_start.to_le_bytes());
                put(&u.virt_end.to_le_bytes());
                put(&[0; 4]);
            }
            Self::Probe(p) => {
                put(&[T_PROBE, 0, 0, 0]);
                put(&p.endpoint.to_le_bytes());
                put(&[0; 64]);
            }
        }
        SmallVec::from_buf_and_len(buf, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_lengths() {
        let reqs = [
            Request::Attach(Attach {
                domain: 1,
                endpoint: 2,
                flags: 1,
                reserved: [0; 4],
            }),
            Request::Detach(Detach { domain: 3, endpoint: 4 }),
            Request::Map(Map {
                domain: 5,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0xa000,
                flags: 3,
            }),
            Request::Unmap(Unmap {
                domain: 6,
                virt_start: 0,
                virt_end: u64::MAX,
            }),
            Request::Probe(Probe { endpoint: 7 }),
        ];
        let sizes = [ATTACH_SIZE, DETACH_SIZE, MAP_SIZE, UNMAP_SIZE, PROBE_SIZE];
        for (r, size) in reqs.iter().zip(sizes) {
            let bytes = r.to_bytes();
            assert_eq!(bytes.len(), size);
            assert_eq!(Request::parse(&bytes).unwrap(), *r);
            assert_eq!(
                Request::parse(&bytes[..size - 1]),
                Err(Malformed::RequestTooShort {
                    got: size - 1,
                    need: size
                })
            );
        }
        assert_eq!(Request::parse(&[9, 0, 0, 0]), Err(Malformed::UnknownType(9)));
        assert!(matches!(Request::parse(&[1]), Err(Malformed::RequestTooShort { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = Request::parse(&bytes);
        }
    }
}
