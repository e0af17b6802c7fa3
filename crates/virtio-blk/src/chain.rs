//! The descriptor chain of one request: walking it from the descriptor
//! table, and where its parts are.
//!
//! A virtio-blk request has no framing (virtio §2.7.4 "Message Framing"):
//! the header is the first 16 bytes of the device-readable stream, an OUT's
//! data the rest of it; the status is the last byte of the device-writable
//! stream, an IN's data (or GET_ID's serial) everything before it. Linux
//! puts each in descriptors of their own, but any split is valid.
//!
//! With `VIRTIO_RING_F_INDIRECT_DESC` the chain may end in a descriptor
//! that points to a table of descriptors (virtio §2.7.5.3), which holds
//! the rest of the chain from its entry 0: Linux puts every request of more
//! than one buffer there, so that it takes one ring entry.
//!
//! Faults of the *ring* (a descriptor index past the queue size, a loop,
//! an indirect descriptor when none was negotiated, one with NEXT set or
//! inside an indirect table, an indirect table that is not a whole number
//! of descriptors, longer than the queue, or not readable guest memory, a
//! descriptor table in unplugged memory) are [`Malformed`]: the device enters NEEDS_RESET,
//! since nothing after them can be trusted. Faults of the *chain* (no
//! status byte, a readable descriptor after a writable one, a header
//! shorter than 16 bytes, a buffer that wraps around the address space) are
//! answered per request ([`ShapeError`]) and the device goes on.

use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::queue::{Malformed, read_guest};
use virtio_bindings::virtio_ring;
use vm_memory::GuestAddress;

use crate::wire::OUTHDR_SIZE;

const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// One descriptor of a chain, as the driver wrote it (an address in the
/// device's address space: guest-physical, or an IOVA behind an IOMMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) writable: bool,
}

/// One descriptor's fields from its 16 bytes: address, length, flags,
/// next.
fn parse_descriptor(b: &[u8]) -> (u64, u32, u16, u16) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&b[0..8]);
    (
        u64::from_le_bytes(addr),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    )
}

/// Reads descriptor `index` of the table at guest-physical `table`.
fn read_descriptor(map: &GuestMemoryMap, table: u64, index: u16) -> Result<(u64, u32, u16, u16), Malformed> {
    let at = table
        .checked_add(16 * u64::from(index))
        .ok_or_else(|| Malformed::Queue(format!("descriptor table at {table:#x} wraps")))?;
    let mut b = [0u8; 16];
    // The table was resolved to RAM at activation; this fails only if its
    // memory was unplugged since, and then it is not touched.
    if !read_guest(map, GuestAddress(at), &mut b) {
        return Err(Malformed::Queue(format!(
            "descriptor {index} at {at:#x} is not accessible guest memory"
        )));
    }
    Ok(parse_descriptor(&b))
}

/// How a chain's indirect table is read, when `VIRTIO_RING_F_INDIRECT_DESC`
/// was negotiated: `load(addr, len, buf)` copies the `len` bytes the
/// driver's address `addr` names (translated by the IOMMU, if there is one)
/// into `buf`.
pub(crate) struct Indirect<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
    pub(crate) load: &'a mut LoadTable<'a>,
}

/// [`Indirect::load`]: `(addr, len, buf)`.
pub(crate) type LoadTable<'a> = dyn FnMut(u64, u32, &mut Vec<u8>) -> Result<(), Malformed> + 'a;

/// Walks the chain at `head` of a queue of `size` entries whose descriptor
/// table is at guest-physical `table`, into `out` (cleared first; at most
/// `size` ring entries plus an indirect table of at most `size`, so its
/// capacity stays bounded). An indirect descriptor is followed with
/// `indirect`, and refused without it.
pub(crate) fn read_chain(
    map: &GuestMemoryMap,
    table: u64,
    size: u16,
    head: u16,
    out: &mut Vec<Desc>,
    indirect: Option<Indirect<'_>>,
) -> Result<(), Malformed> {
    out.clear();
    let ring = |index: u16| read_descriptor(map, table, index);
    let Some((addr, len, flags)) = follow(head, Table::Ring, size, head, out, ring)? else {
        return Ok(());
    };
    let bad = |reason| Malformed::BadChain { head, reason };
    let Some(indirect) = indirect else {
        return Err(bad(
            "an indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated",
        ));
    };
    if flags & VIRTQ_DESC_F_NEXT != 0 {
        return Err(bad("an indirect descriptor with NEXT set"));
    }
    // The indirect descriptor's own WRITE flag is ignored (§2.7.5.3.2).
    if len == 0 || len % 16 != 0 {
        return Err(bad("an indirect table that is not a whole number of descriptors"));
    }
    let entries = u16::try_from(len / 16)
        .ok()
        .filter(|&n| n <= size)
        .ok_or_else(|| bad("an indirect table longer than the queue"))?;
    (indirect.load)(addr, len, indirect.buf)?;
    let table = &indirect.buf[..len as usize];
    let entry = |index: u16| {
        let at = usize::from(index) * 16;
        Ok(parse_descriptor(&table[at..at + 16]))
    };
    match follow(head, Table::Indirect, entries, 0, out, entry)? {
        None => Ok(()),
        Some(_) => Err(bad("an indirect descriptor inside an indirect table")),
    }
}

/// The descriptor table a chain is followed in.
#[derive(Clone, Copy)]
enum Table {
    /// The queue's.
    Ring,
    /// An indirect table.
    Indirect,
}

/// Follows a chain from descriptor `first` of `table`, of `entries`
/// descriptors, reading each with `fetch`, onto `out`, up to its end
/// (`None`) or up to an indirect descriptor, which is not added:
/// `Some((addr, len, flags))` of it.
fn follow(
    head: u16,
    table: Table,
    entries: u16,
    first: u16,
    out: &mut Vec<Desc>,
    fetch: impl Fn(u16) -> Result<(u64, u32, u16, u16), Malformed>,
) -> Result<Option<(u64, u32, u16)>, Malformed> {
    let mut index = first;
    for _ in 0..entries {
        if index >= entries {
            return Err(Malformed::BadChain {
                head,
                reason: match table {
                    Table::Ring => "descriptor index past the queue size",
                    Table::Indirect => "descriptor index past its indirect table",
                },
            });
        }
        let (addr, len, flags, next) = fetch(index)?;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Ok(Some((addr, len, flags)));
        }
        out.push(Desc {
            addr,
            len,
            writable: flags & VIRTQ_DESC_F_WRITE != 0,
        });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(None);
        }
        index = next;
    }
    Err(Malformed::BadChain {
        head,
        reason: match table {
            Table::Ring => "chain longer than the queue (a loop)",
            Table::Indirect => "chain longer than its indirect table (a loop)",
        },
    })
}

/// The address of the status byte: the last byte of the last descriptor,
/// if that one is device-writable, not empty, and does not wrap.
pub(crate) fn status_addr(descs: &[Desc]) -> Option<u64> {
    let last = descs.last().filter(|d| d.writable && d.len > 0)?;
    last.addr.checked_add(u64::from(last.len) - 1)
}

/// Why a chain (with a status byte) cannot carry a request; answered
/// `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ShapeError {
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    WrongDirection,
    /// Fewer than 16 device-readable bytes.
    #[error("request header too short: {got} bytes, need 16")]
    HeaderTooShort {
        /// Readable bytes.
        got: u64,
    },
    /// A descriptor's buffer wraps around the end of the address space.
    #[error("buffer at {addr:#x} of {len} bytes wraps around the address space")]
    Wraps {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// The lengths of a chain's two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Device-readable bytes after the 16-byte header.
    pub(crate) readable_data: u64,
    /// Device-writable bytes before the status byte.
    pub(crate) writable_data: u64,
}

/// Checks the shape of a chain that has a status byte ([`status_addr`]).
pub(crate) fn layout(descs: &[Desc]) -> Result<Layout, ShapeError> {
    let (mut readable, mut writable, mut seen_writable) = (0u64, 0u64, false);
    for d in descs {
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err(ShapeError::Wraps {
                addr: d.addr,
                len: d.len,
            });
        }
        if d.writable {
            seen_writable = true;
            writable += u64::from(d.len);
        } else if seen_writable {
            return Err(ShapeError::WrongDirection);
        } else {
            readable += u64::from(d.len);
        }
    }
    let header = OUTHDR_SIZE as u64;
    if readable < header {
        return Err(ShapeError::HeaderTooShort { got: readable });
    }
    Ok(Layout {
        readable_data: readable - header,
        // The caller found the status byte, so there is at least one.
        writable_data: writable.saturating_sub(1),
    })
}

/// Calls `f(addr, len)` for every piece of bytes `[start, end)` of the
/// chain's device-readable (`writable == false`) or device-writable stream,
/// in order; empty pieces are skipped. Only for a chain [`layout`]
/// accepted, whose buffers do not wrap.
pub(crate) fn for_each_part<E>(
    descs: &[Desc],
    writable: bool,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut at = 0u64;
    for d in descs.iter().filter(|d| d.writable == writable) {
        let len = u64::from(d.len);
        let (lo, hi) = (start.max(at), end.min(at + len));
        if lo < hi {
            // `layout` checked that `[addr, addr + len)` does not wrap.
            f(d.addr + (lo - at), hi - lo)?;
        }
        at += len;
        if at >= end {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }

    fn parts(descs: &[Desc], writable: bool, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for_each_part::<()>(descs, writable, start, end, |a, l| {
            v.push((a, l));
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn linux_layout() {
        let chain = [r(0x1000, 16), w(0x2000, 4096), w(0x3000, 4096), w(0x4000, 1)];
        assert_eq!(status_addr(&chain), Some(0x4000));
        assert_eq!(
            layout(&chain),
            Ok(Layout {
                readable_data: 0,
                writable_data: 8192
            })
        );
        assert_eq!(parts(&chain, false, 0, 16), [(0x1000, 16)]);
        assert_eq!(parts(&chain, true, 0, 8192), [(0x2000, 4096), (0x3000, 4096)]);
    }

    #[test]
    fn unframed_layouts() {
        // Header split over two descriptors, data sharing the first with
        // it; status sharing the last writable descriptor with data.
        let chain = [r(0x1000, 10), r(0x2000, 6 + 512), w(0x5000, 100), w(0x6000, 413)];
        assert_eq!(status_addr(&chain), Some(0x6000 + 412));
        assert_eq!(
            layout(&chain),
            Ok(Layout {
                readable_data: 512,
                writable_data: 512
            })
        );
        assert_eq!(parts(&chain, false, 0, 16), [(0x1000, 10), (0x2000, 6)]);
        assert_eq!(parts(&chain, false, 16, 528), [(0x2006, 512)]);
        assert_eq!(parts(&chain, true, 0, 512), [(0x5000, 100), (0x6000, 412)]);
        // Zero-length descriptors are skipped.
        let chain = [r(0x1000, 0), r(0x1000, 16), w(0x9000, 0), w(0x2000, 1)];
        assert_eq!(parts(&chain, false, 0, 16), [(0x1000, 16)]);
        assert_eq!(layout(&chain).unwrap().writable_data, 0);
    }

    #[test]
    fn bad_shapes() {
        assert_eq!(status_addr(&[]), None);
        assert_eq!(status_addr(&[r(0x1000, 16)]), None, "no writable descriptor");
        assert_eq!(status_addr(&[r(0x1000, 16), w(0x2000, 0)]), None, "empty status");
        assert_eq!(status_addr(&[w(0x2000, 1), r(0x1000, 16)]), None, "status not last");
        assert_eq!(status_addr(&[w(u64::MAX, 1)]), Some(u64::MAX));
        assert_eq!(status_addr(&[w(u64::MAX, 2)]), None, "wraps");

        assert_eq!(
            layout(&[r(0x1000, 8), r(0x1100, 7), w(0x2000, 1)]),
            Err(ShapeError::HeaderTooShort { got: 15 })
        );
        assert_eq!(layout(&[w(0x2000, 1)]), Err(ShapeError::HeaderTooShort { got: 0 }));
        assert_eq!(
            layout(&[r(0x1000, 16), w(0x2000, 4), r(0x3000, 4), w(0x4000, 1)]),
            Err(ShapeError::WrongDirection)
        );
        // A readable after a zero-length writable one is still out of order.
        assert_eq!(
            layout(&[r(0x1000, 16), w(0x2000, 0), r(0x3000, 4), w(0x4000, 1)]),
            Err(ShapeError::WrongDirection)
        );
        assert_eq!(
            layout(&[r(u64::MAX - 4, 16), w(0x4000, 1)]),
            Err(ShapeError::Wraps {
                addr: u64::MAX - 4,
                len: 16
            })
        );
    }
}
