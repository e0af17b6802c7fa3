//! Device-side request handling over a split virtqueue.
//!
//! Request/response devices (virtio-mem, virtio-iommu) all do the same: pop
//! a descriptor chain, gather its device-readable bytes (the request), hand
//! them to a parser, and write the answer into its device-writable buffers.
//! [`drain_queue`] does that once for all of them, and turns every
//! structural fault of the chain — a writable descriptor before a readable
//! one, a buffer outside guest memory, a broken avail ring — into a
//! [`Malformed`] error, upon which the device enters NEEDS_RESET. A guest
//! can never make the host panic here.

use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::interrupt::{InterruptKind, VirtioInterrupt};

const VIRTQ_DESC_F_NEXT: u16 = 0x1;
const VIRTQ_DESC_F_WRITE: u16 = 0x2;
const VIRTQ_DESC_F_INDIRECT: u16 = 0x4;

/// Why a request or its descriptor chain cannot be processed. The device
/// that sees one stops processing and enters NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The avail ring or a descriptor index is broken.
    #[error("broken virtqueue: {0}")]
    Queue(String),
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor chain at head {head}: readable descriptor after a writable one")]
    WrongDirection {
        /// Head index of the chain.
        head: u16,
    },
    /// A descriptor points outside guest memory, or into discarded memory
    /// (an unplugged virtio-mem block), which the device must not touch.
    #[error("descriptor chain at head {head}: buffer [{addr:#x}, +{len:#x}) is not accessible guest memory")]
    BadBuffer {
        /// Head index of the chain.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain loops, is too long, or uses indirect descriptors (which
    /// these devices do not offer).
    #[error("descriptor chain at head {head}: {reason}")]
    BadChain {
        /// Head index of the chain.
        head: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// The request is shorter than its type needs.
    #[error("request too short: {got} bytes, need {need}")]
    RequestTooShort {
        /// Bytes the driver provided.
        got: usize,
        /// Bytes the request needs.
        need: usize,
    },
    /// The response buffer is shorter than the response.
    #[error("response buffer too short: {got} bytes, need {need}")]
    ResponseTooShort {
        /// Writable bytes the driver provided.
        got: usize,
        /// Bytes the response needs.
        need: usize,
    },
    /// The request type is unknown.
    #[error("unknown request type {0:#x}")]
    UnknownType(u16),
}

/// One request popped from a queue: its device-readable bytes and where to
/// put the answer.
pub struct RequestChain {
    head: u16,
    readable: Vec<u8>,
    writable: Vec<(GuestAddress, u32)>,
    writable_len: usize,
}

impl fmt::Debug for RequestChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestChain")
            .field("head", &self.head)
            .field("readable", &self.readable.len())
            .field("writable_len", &self.writable_len)
            .finish()
    }
}

impl RequestChain {
    /// The device-readable bytes, gathered from all readable descriptors
    /// (at most the `max_request` given to [`drain_queue`]; longer requests
    /// are truncated there, which parsers treat as trailing data).
    pub fn request(&self) -> &[u8] {
        &self.readable
    }

    /// Total bytes of the device-writable descriptors.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// Head descriptor index.
    pub fn head(&self) -> u16 {
        self.head
    }
}

/// Walks the chain at `head`, gathering up to `max_request` readable bytes.
fn read_chain(queue: &Queue, map: &GuestMemoryMap, head: u16, max_request: usize) -> Result<RequestChain, Malformed> {
    let mem = map.memory();
    let size = queue.size();
    let table = GuestAddress(queue.desc_table());
    let mut chain = RequestChain {
        head,
        readable: Vec::new(),
        writable: Vec::new(),
        writable_len: 0,
    };
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(Malformed::BadChain {
                head,
                reason: "descriptor index past the queue size",
            });
        }
        let desc: Descriptor = mem
            .read_obj(GuestAddress(table.0 + u64::from(index) * 16))
            .map_err(|e| Malformed::Queue(format!("descriptor {index}: {e}")))?;
        let (addr, len, flags) = (desc.addr(), desc.len(), desc.flags());
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(Malformed::BadChain {
                head,
                reason: "indirect descriptors are not offered",
            });
        }
        let bad = || Malformed::BadBuffer {
            head,
            addr: addr.0,
            len,
        };
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            if with_guest_buffer(map, addr, u64::from(len), |_| ()).is_none() {
                return Err(bad());
            }
            chain.writable.push((addr, len));
            chain.writable_len += len as usize;
        } else {
            if !chain.writable.is_empty() {
                return Err(Malformed::WrongDirection { head });
            }
            let want = (len as usize).min(max_request.saturating_sub(chain.readable.len()));
            let start = chain.readable.len();
            chain.readable.resize(start + want, 0);
            with_guest_buffer(map, addr, u64::from(len), |mem| {
                mem.read_slice(&mut chain.readable[start..], addr)
            })
            .ok_or_else(bad)?
            .map_err(|_| bad())?;
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
    Err(Malformed::BadChain {
        head,
        reason: "chain longer than the queue (a loop)",
    })
}

/// Runs `f` on guest memory if the buffer `[addr, +len)` may be accessed:
/// every byte is guest RAM and, in a managed region (virtio-mem), populated.
/// The populated views of the managed regions it touches are held while
/// `f` runs, so no unplug discards the buffer in between (DESIGN.md rule
/// 3). `None` if the buffer may not be accessed; an empty buffer always may.
///
/// A buffer in discarded memory is refused rather than accessed: reading
/// or writing it would populate memory the host has reclaimed (the
/// guest must not use unplugged memory, `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`),
/// so a chain pointing there is [`Malformed::BadBuffer`].
pub fn with_guest_buffer<T>(
    map: &GuestMemoryMap,
    addr: GuestAddress,
    len: u64,
    f: impl FnOnce(&GuestMemoryMmap) -> T,
) -> Option<T> {
    use vm_memory::GuestMemoryBackend;
    let mem = map.memory();
    if len == 0 {
        return Some(f(mem));
    }
    let range = GuestRange::new(addr.0, len)?;
    if !mem.check_range(addr, usize::try_from(len).ok()?) {
        return None;
    }
    // Regions in ascending order, so several views are always taken in the
    // same order. Buffers outside managed regions allocate nothing here.
    let mut views = Vec::new();
    let mut at = range.start();
    while at < range.end() {
        let region = map.region_at(at)?;
        let part = region.range().intersection(&range)?;
        if let Some(manager) = region.manager() {
            let view = manager.populated();
            if !view.is_populated(part) {
                return None;
            }
            views.push(view);
        }
        at = part.end();
    }
    let result = f(mem);
    drop(views);
    Some(result)
}

/// Whether the driver wants an interrupt for the buffers just used. With
/// `VIRTIO_F_EVENT_IDX` that is virtio-queue's `used_event` check; without
/// it, the driver's `VRING_AVAIL_F_NO_INTERRUPT` flag, which the
/// specification says a device should honour (virtio-queue ignores it).
fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    let flags: u16 = mem.read_obj(GuestAddress(queue.avail_ring())).unwrap_or(0);
    flags & VRING_AVAIL_F_NO_INTERRUPT == 0
}

/// Writes `response` into the chain's writable buffers and returns the
/// number of bytes written (the used length).
fn write_response(map: &GuestMemoryMap, chain: &RequestChain, response: &[u8]) -> Result<u32, Malformed> {
    if response.len() > chain.writable_len {
        return Err(Malformed::ResponseTooShort {
            got: chain.writable_len,
            need: response.len(),
        });
    }
    let mut rest = response;
    for &(addr, len) in &chain.writable {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        // Checked again now: handling the request may have unplugged the
        // memory of its own response buffer.
        let bad = || Malformed::BadBuffer {
            head: chain.head,
            addr: addr.0,
            len,
        };
        with_guest_buffer(map, addr, n as u64, |mem| mem.write_slice(&rest[..n], addr))
            .ok_or_else(bad)?
            .map_err(|_| bad())?;
        rest = &rest[n..];
    }
    Ok(response.len() as u32)
}

/// Processes every available request of `queue`: `handle` turns a request
/// into its response bytes, which are written back and the chain is put on
/// the used ring; the driver is notified once at the end if it asked to be.
///
/// A chain whose device-writable buffers hold fewer than `min_response`
/// bytes is [`Malformed::ResponseTooShort`] *before* `handle` sees it, so a
/// request is never applied when its answer cannot be delivered. (A
/// handler whose response may be longer, e.g. a PROBE, checks
/// [`RequestChain::writable_len`] itself before acting.)
///
/// Every buffer is read or written only while it is accessible guest RAM
/// ([`with_guest_buffer`]): a buffer outside RAM or in discarded memory of
/// a managed region (an unplugged virtio-mem block) is
/// [`Malformed::BadBuffer`] and is never touched.
///
/// Returns the number of requests answered. On the first [`Malformed`]
/// chain or request it stops and returns the error; requests answered
/// before it stay answered. The caller then enters NEEDS_RESET.
pub fn drain_queue(
    queue: &mut Queue,
    queue_index: u16,
    map: &GuestMemoryMap,
    interrupt: &dyn VirtioInterrupt,
    max_request: usize,
    min_response: usize,
    mut handle: impl FnMut(&RequestChain) -> Result<Vec<u8>, Malformed>,
) -> Result<usize, Malformed> {
    let mem = map.memory();
    let mut answered = 0;
    let result = loop {
        let avail = match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx,
            Err(e) => break Err(Malformed::Queue(e.to_string())),
        };
        let pending = (avail - Wrapping(queue.next_avail())).0;
        if pending == 0 {
            break Ok(answered);
        }
        if pending > queue.size() {
            break Err(Malformed::Queue(format!(
                "avail index {} is {pending} ahead of {}, more than the queue size {}",
                avail.0,
                queue.next_avail(),
                queue.size()
            )));
        }
        let head = match queue.iter(mem).map(|mut it| it.next().map(|c| c.head_index())) {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(answered),
            Err(e) => break Err(Malformed::Queue(e.to_string())),
        };
        let outcome = read_chain(queue, map, head, max_request).and_then(|chain| {
            if chain.writable_len < min_response {
                return Err(Malformed::ResponseTooShort {
                    got: chain.writable_len,
                    need: min_response,
                });
            }
            handle(&chain).and_then(|resp| write_response(map, &chain, &resp))
        });
        match outcome {
            Ok(used_len) => {
                if let Err(e) = queue.add_used(mem, head, used_len) {
                    break Err(Malformed::Queue(e.to_string()));
                }
                answered += 1;
            }
            Err(e) => break Err(e),
        }
    };
    if answered > 0 && wants_interrupt(queue, mem) {
        if let Err(e) = interrupt.trigger(InterruptKind::Queue(queue_index)) {
            log::warn!("queue {queue_index}: interrupt failed: {e}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Buf, DriverQueue};
    use crate::interrupt::EventFdInterrupt;
    use memvisor_memory::map::GuestMemoryMap;
    use memvisor_memory::{Backing, RamBlock};
    use std::sync::Arc;

    struct Fixture {
        map: GuestMemoryMap,
        driver: DriverQueue,
        queue: Queue,
        irq: EventFdInterrupt,
    }

    fn fixture() -> Fixture {
        let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
        let driver = DriverQueue::new(map.memory(), GuestAddress(0), 16, 8192).unwrap();
        let queue = driver.device_queue();
        Fixture {
            map,
            driver,
            queue,
            irq: EventFdInterrupt::new(1).unwrap(),
        }
    }

    fn drain(f: &mut Fixture) -> Result<usize, Malformed> {
        drain_queue(&mut f.queue, 0, &f.map, &f.irq, 16, 1, |req| {
            if req.request().len() < 2 {
                return Err(Malformed::RequestTooShort {
                    got: req.request().len(),
                    need: 2,
                });
            }
            Ok(req.request().to_vec())
        })
    }

    #[test]
    fn requests_split_over_descriptors_are_gathered() {
        let mut f = fixture();
        f.driver
            .add(&[Buf::In(b"ab"), Buf::In(b"cd"), Buf::Out(1), Buf::Out(7)])
            .unwrap();
        f.driver.add(&[Buf::In(b"xy"), Buf::Out(2)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 2);
        let used = f.driver.pop_used().unwrap();
        assert_eq!((used.len, used.data.as_slice()), (4, &b"abcd"[..]));
        assert_eq!(f.driver.pop_used().unwrap().data, b"xy");
        assert!(f.driver.pop_used().is_none());
        assert_eq!(f.irq.take(InterruptKind::Queue(0)), 1, "one interrupt per drain");
        assert_eq!(drain(&mut f).unwrap(), 0);
        // A polling driver asks for no interrupt, and gets none.
        f.driver.suppress_interrupts(true);
        f.driver.add(&[Buf::In(b"zz"), Buf::Out(2)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 1);
        assert_eq!(f.irq.take(InterruptKind::Queue(0)), 0);
        assert_eq!(f.driver.pop_used().unwrap().data, b"zz");
    }

    #[test]
    fn long_requests_are_truncated_to_the_maximum() {
        let mut f = fixture();
        f.driver.add(&[Buf::In(&[7u8; 100]), Buf::Out(100)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 1);
        assert_eq!(f.driver.pop_used().unwrap().data, vec![7u8; 16]);
    }

    #[test]
    fn structural_faults_are_malformed() {
        let mut f = fixture();
        f.driver.add(&[Buf::In(b"ok"), Buf::Out(2)]).unwrap();
        let bad = f
            .driver
            .add_raw(&[(0x8000, 2, VIRTQ_DESC_F_WRITE), (0x9000, 2, 0)])
            .unwrap();
        assert_eq!(drain(&mut f), Err(Malformed::WrongDirection { head: bad }));
        // The request before the bad one was answered.
        assert_eq!(f.driver.pop_used().unwrap().data, b"ok");

        let mut f = fixture();
        f.driver
            .add_raw(&[(0xfff_0000, 2, 0), (0x9000, 2, VIRTQ_DESC_F_WRITE)])
            .unwrap();
        assert!(matches!(
            drain(&mut f),
            Err(Malformed::BadBuffer { addr: 0xfff_0000, .. })
        ));

        let mut f = fixture();
        f.driver.add(&[Buf::In(b"abc"), Buf::Out(1)]).unwrap();
        assert_eq!(drain(&mut f), Err(Malformed::ResponseTooShort { got: 1, need: 3 }));

        let mut f = fixture();
        f.driver.add(&[Buf::In(b"a"), Buf::Out(1)]).unwrap();
        assert_eq!(drain(&mut f), Err(Malformed::RequestTooShort { got: 1, need: 2 }));

        // Below the minimum response length, the handler never runs.
        let mut f = fixture();
        f.driver.add(&[Buf::In(b"xy")]).unwrap();
        let mut ran = false;
        let result = drain_queue(&mut f.queue, 0, &f.map, &f.irq, 16, 1, |_| {
            ran = true;
            Ok(vec![])
        });
        assert_eq!(result, Err(Malformed::ResponseTooShort { got: 0, need: 1 }));
        assert!(!ran);
    }

    #[test]
    fn hostile_rings_are_malformed() {
        // A descriptor that links to itself.
        let mut f = fixture();
        let head = f.driver.add(&[Buf::In(b"ab"), Buf::Out(2)]).unwrap();
        f.driver
            .write_descriptor(head, Descriptor::new(0x9000, 2, VIRTQ_DESC_F_NEXT, head));
        assert!(matches!(drain(&mut f), Err(Malformed::BadChain { .. })));

        // A link past the queue size.
        let mut f = fixture();
        let head = f.driver.add(&[Buf::In(b"ab"), Buf::Out(2)]).unwrap();
        f.driver
            .write_descriptor(head, Descriptor::new(0x9000, 2, VIRTQ_DESC_F_NEXT, 999));
        assert!(matches!(drain(&mut f), Err(Malformed::BadChain { .. })));

        // An avail index far ahead of what was published.
        let mut f = fixture();
        f.driver.set_avail_idx(1000);
        assert!(matches!(drain(&mut f), Err(Malformed::Queue(_))));

        // Indirect descriptors are not offered.
        let mut f = fixture();
        f.driver.add_raw(&[(0x9000, 16, VIRTQ_DESC_F_INDIRECT)]).unwrap();
        assert!(matches!(drain(&mut f), Err(Malformed::BadChain { .. })));
    }
}
