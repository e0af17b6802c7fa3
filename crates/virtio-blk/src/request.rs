//! Guest bytes to a validated [`Request`], or the status that refuses it.
//!
//! Everything here is pure: a request is checked completely — type, the
//! read-only flag, the data length (a whole number of sectors, at most
//! [`MAX_REQUEST_BYTES`](crate::MAX_REQUEST_BYTES)), the sector range
//! against the capacity without overflow — before the device resolves a
//! single data buffer or touches the image. What the specification answers
//! with a status is a [`Refusal`]: `VIRTIO_BLK_S_UNSUPP` for an unknown
//! type, `VIRTIO_BLK_S_IOERR` for everything else.
//!
//! The shape of the descriptor chain (where the header, the data and the
//! status byte are) is checked before, by the device; this module sees only
//! the header and the lengths of the two data parts.

use crate::wire::{OutHdr, S_IOERR, S_UNSUPP, SECTOR_SHIFT, SECTOR_SIZE, T_FLUSH, T_GET_ID, T_IN, T_OUT};

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    /// Size of the disk in 512-byte sectors.
    pub capacity: u64,
    /// OUT requests are refused.
    pub read_only: bool,
    /// Most data bytes one IN or OUT may carry.
    pub max_data: u64,
}

/// A request the device may carry out as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `VIRTIO_BLK_T_IN`: read `len` bytes from `sector` on into the
    /// device-writable data buffers.
    In {
        /// First sector.
        sector: u64,
        /// Bytes, a multiple of 512.
        len: u32,
    },
    /// `VIRTIO_BLK_T_OUT`: write the `len` bytes of the device-readable
    /// data buffers from `sector` on.
    Out {
        /// First sector.
        sector: u64,
        /// Bytes, a multiple of 512.
        len: u32,
    },
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the first `len` bytes of the
    /// NUL-padded 20-byte serial.
    GetId {
        /// Bytes to write: the device-writable data bytes, at most 20.
        len: u32,
    },
}

/// Why a request is refused, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The type is none of IN, OUT, FLUSH, GET_ID (`VIRTIO_BLK_S_UNSUPP`).
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// An OUT on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The data length is not a whole number of sectors.
    #[error("data length {len} is not a multiple of 512")]
    Unaligned {
        /// Data bytes.
        len: u64,
    },
    /// More data than one request may carry.
    #[error("data length {len} exceeds the limit of {max} bytes per request")]
    TooLarge {
        /// Data bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The sectors are not all inside the disk (or their end overflows).
    #[error("sectors [{sector}, +{sectors}) are not inside the {capacity}-sector disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Capacity of the disk.
        capacity: u64,
    },
}

impl Refusal {
    /// The status byte the request is answered with.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

impl Request {
    /// Checks the request of header `hdr` whose chain carries
    /// `readable_data` device-readable bytes after the header and
    /// `writable_data` device-writable bytes before the status byte.
    ///
    /// An IN uses the writable bytes as its data and an OUT the readable
    /// ones; the other part is ignored (it should be empty). FLUSH and
    /// GET_ID ignore `sector`. A GET_ID with fewer than 20 writable bytes
    /// gets the serial truncated, as QEMU does.
    pub fn parse(hdr: &OutHdr, readable_data: u64, writable_data: u64, disk: &Disk) -> Result<Self, Refusal> {
        match hdr.req_type {
            T_IN => {
                let len = data_len(hdr.sector, writable_data, disk)?;
                Ok(Self::In {
                    sector: hdr.sector,
                    len,
                })
            }
            T_OUT => {
                if disk.read_only {
                    return Err(Refusal::ReadOnly);
                }
                let len = data_len(hdr.sector, readable_data, disk)?;
                Ok(Self::Out {
                    sector: hdr.sector,
                    len,
                })
            }
            T_FLUSH => Ok(Self::Flush),
            T_GET_ID => Ok(Self::GetId {
                len: writable_data.min(crate::wire::ID_BYTES as u64) as u32,
            }),
            other => Err(Refusal::Unsupported(other)),
        }
    }
}

/// The data length of an IN or OUT of `len` bytes at `sector`, checked.
fn data_len(sector: u64, len: u64, disk: &Disk) -> Result<u32, Refusal> {
    if len > disk.max_data || len > u64::from(u32::MAX) {
        return Err(Refusal::TooLarge {
            len,
            max: disk.max_data,
        });
    }
    if len % SECTOR_SIZE != 0 {
        return Err(Refusal::Unaligned { len });
    }
    let sectors = len >> SECTOR_SHIFT;
    let out_of_range = Refusal::OutOfRange {
        sector,
        sectors,
        capacity: disk.capacity,
    };
    match sector.checked_add(sectors) {
        Some(end) if end <= disk.capacity => Ok(len as u32),
        _ => Err(out_of_range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: Disk = Disk {
        capacity: 100,
        read_only: false,
        max_data: 1 << 20,
    };

    fn hdr(req_type: u32, sector: u64) -> OutHdr {
        OutHdr {
            req_type,
            reserved: 7,
            sector,
        }
    }

    #[test]
    fn in_and_out_use_their_own_data_part() {
        assert_eq!(
            Request::parse(&hdr(T_IN, 3), 999, 1024, &DISK),
            Ok(Request::In { sector: 3, len: 1024 })
        );
        assert_eq!(
            Request::parse(&hdr(T_OUT, 3), 512, 77, &DISK),
            Ok(Request::Out { sector: 3, len: 512 })
        );
        // Empty transfers are valid, even at the very end.
        assert_eq!(
            Request::parse(&hdr(T_IN, 100), 0, 0, &DISK),
            Ok(Request::In { sector: 100, len: 0 })
        );
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        let last = Request::parse(&hdr(T_IN, 99), 0, 512, &DISK);
        assert_eq!(last, Ok(Request::In { sector: 99, len: 512 }));
        assert_eq!(
            Request::parse(&hdr(T_IN, 99), 0, 1024, &DISK),
            Err(Refusal::OutOfRange {
                sector: 99,
                sectors: 2,
                capacity: 100
            })
        );
        assert!(matches!(
            Request::parse(&hdr(T_OUT, 101), 0, 0, &DISK),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            Request::parse(&hdr(T_IN, u64::MAX), 0, 512, &DISK),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            Request::parse(&hdr(T_OUT, u64::MAX - 1), 1 << 20, 0, &DISK),
            Err(Refusal::OutOfRange { .. })
        ));
        assert_eq!(
            Request::parse(&hdr(T_IN, 0), 0, 513, &DISK),
            Err(Refusal::Unaligned { len: 513 })
        );
        assert_eq!(
            Request::parse(&hdr(T_IN, 0), 0, (1 << 20) + 512, &DISK),
            Err(Refusal::TooLarge {
                len: (1 << 20) + 512,
                max: 1 << 20
            })
        );
        let huge = Disk {
            max_data: u64::MAX,
            capacity: u64::MAX,
            ..DISK
        };
        assert!(matches!(
            Request::parse(&hdr(T_IN, 0), 0, 1 << 32, &huge),
            Err(Refusal::TooLarge { .. })
        ));
    }

    #[test]
    fn statuses() {
        let ro = Disk {
            read_only: true,
            ..DISK
        };
        let refused = Request::parse(&hdr(T_OUT, 0), 512, 0, &ro).unwrap_err();
        assert_eq!((refused, refused.status()), (Refusal::ReadOnly, S_IOERR));
        // Reads, flushes and GET_ID still work on a read-only disk.
        assert!(Request::parse(&hdr(T_IN, 0), 0, 512, &ro).is_ok());
        assert_eq!(Request::parse(&hdr(T_FLUSH, 12345), 0, 0, &ro), Ok(Request::Flush));
        assert_eq!(
            Request::parse(&hdr(T_GET_ID, 0), 0, 64, &ro),
            Ok(Request::GetId { len: 20 })
        );
        assert_eq!(
            Request::parse(&hdr(T_GET_ID, 0), 0, 5, &ro),
            Ok(Request::GetId { len: 5 })
        );
        for unknown in [2, 10, 11, 13, 14, 0x8000_0000] {
            let refused = Request::parse(&hdr(unknown, 0), 0, 0, &DISK).unwrap_err();
            assert_eq!((refused, refused.status()), (Refusal::Unsupported(unknown), S_UNSUPP));
        }
    }
}
