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
use std::sync::atomic::{AtomicU16, Ordering, fence};

use std::sync::Arc;

use memvisor_memory::discard::{PopulatedView, RamDiscardManager};
use memvisor_memory::map::{GuestMemoryMap, Region};
use memvisor_memory::{GuestRange, GuestSlice};
use smallvec::SmallVec;
use virtio_bindings::virtio_ring;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestAddress};

use crate::interrupt::{InterruptKind, VirtioInterrupt};

const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Request bytes kept inline in a [`RequestChain`]: every request of
/// memvisor's devices fits (the longest, virtio-iommu's PROBE, has 72), so
/// gathering one allocates nothing.
const INLINE_REQUEST: usize = 80;

/// A device's answer to one request. Short answers (every virtio-mem
/// response, every virtio-iommu status tail) stay inline, without an
/// allocation; longer ones (a PROBE's properties) spill to the heap.
pub type Response = SmallVec<[u8; 16]>;

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

/// `WritableBuf::region` of a buffer that no single region holds (empty,
/// or spread over several regions).
const NO_REGION: u32 = u32::MAX;

/// One device-writable buffer of a chain, and the index (in the memory
/// map's [`regions`](GuestMemoryMap::regions)) of the RAM region that
/// holds all of it, found when the chain was read: the answer is then
/// written without searching the map again ([`write_response`]).
#[derive(Debug, Clone, Copy)]
struct WritableBuf {
    addr: GuestAddress,
    len: u32,
    region: u32,
}

/// One request popped from a queue: its device-readable bytes and where to
/// put the answer.
#[derive(Default)]
pub struct RequestChain {
    head: u16,
    readable: SmallVec<[u8; INLINE_REQUEST]>,
    readable_len: usize,
    writable: SmallVec<[WritableBuf; 4]>,
    writable_len: usize,
}

impl fmt::Debug for RequestChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestChain")
            .field("head", &self.head)
            .field("readable_len", &self.readable_len)
            .field("writable_len", &self.writable_len)
            .finish()
    }
}

impl RequestChain {
    /// An empty chain, to be filled by [`DeviceRing::read_chain`].
    pub fn new() -> Self {
        Self::default()
    }

    fn clear(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.readable_len = 0;
        self.writable.clear();
        self.writable_len = 0;
    }

    /// The device-readable bytes, gathered from all readable descriptors
    /// (at most the `max_request` given to [`drain_queue`]; longer requests
    /// are truncated there, which parsers treat as trailing data).
    pub fn request(&self) -> &[u8] {
        &self.readable
    }

    /// Total bytes of the device-readable descriptors, including any
    /// beyond `max_request`.
    pub fn readable_len(&self) -> usize {
        self.readable_len
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

/// Where one ring of a split virtqueue lies in guest memory, resolved to
/// its host address once: ring accesses are the hottest path of every
/// device, and a memory-map lookup (or a `vm-memory` slice) per access
/// costs more than the access. Writes go through the host address, which
/// `vm-memory` does not see: their writer marks the ring dirty afterwards
/// ([`mark_written`](Self::mark_written)), once for all the writes of a
/// drain ([`DeviceRing::finish`]).
#[derive(Debug, Clone)]
struct RingArea {
    /// The region holding the ring; holding it keeps the mapping alive.
    region: Region,
    /// Host address of the ring's first byte.
    host: usize,
    /// Offset of the ring's first byte in `region`.
    offset: u64,
    range: GuestRange,
    what: &'static str,
}

impl RingArea {
    /// The ring of `len` bytes at guest address `addr`.
    fn resolve(map: &GuestMemoryMap, addr: u64, len: u64, what: &'static str) -> Result<Self, String> {
        let range = GuestRange::new(addr, len).ok_or_else(|| format!("{what} at {addr:#x} (+{len:#x}) wraps"))?;
        let host = map.lookup(range).map_err(|e| format!("{what}: {e}"))?;
        Ok(Self {
            region: host.region.clone(),
            host: usize::try_from(host.host_address).map_err(|e| format!("{what}: {e}"))?,
            offset: range.start() - host.region.range().start(),
            range,
            what,
        })
    }

    /// Checks that the ring may be touched now. A ring in a managed region
    /// (virtio-mem memory) must be populated — touching it after its block
    /// was unplugged would populate reclaimed memory — and the returned
    /// view keeps it so while it is held. Plain RAM needs no check.
    ///
    /// Inlined, as every ring accessor below: a ring access is a handful of
    /// instructions, and for a ring in plain RAM (where drivers put them)
    /// this check is one branch, which a call would cost several times over.
    #[inline(always)]
    fn hold(&self) -> Result<Option<PopulatedView<'_>>, Malformed> {
        match self.region.manager() {
            None => Ok(None),
            Some(manager) => self.hold_managed(manager),
        }
    }

    /// [`hold`](Self::hold) for a ring in a managed region.
    #[inline(never)]
    fn hold_managed<'m>(
        &self,
        manager: &'m Arc<dyn RamDiscardManager>,
    ) -> Result<Option<PopulatedView<'m>>, Malformed> {
        let view = manager.populated();
        if !view.is_populated(self.range) {
            return Err(Malformed::Queue(format!(
                "{} {} is in unplugged memory",
                self.what, self.range
            )));
        }
        Ok(Some(view))
    }

    /// Host pointer to a `T` at `offset`. The offsets are the device's
    /// own (a ring field, or an entry `index % size`), so one outside the
    /// ring is a bug in this module, not guest input.
    #[inline(always)]
    fn ptr<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset + std::mem::size_of::<T>() <= self.range.len() as usize
                && (self.host + offset) % std::mem::align_of::<T>() == 0,
            "{} access at offset {offset:#x} is outside the ring or misaligned",
            self.what
        );
        (self.host + offset) as *mut T
    }

    /// The ring's little-endian 16-bit field at `offset`, shared with the
    /// driver.
    #[inline(always)]
    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: `ptr` checked that the two bytes lie inside the ring,
        // which lies inside `region`'s mapping (resolved by lookup), and
        // that they are aligned; `self.region` keeps the mapping alive for
        // as long as `self`. The driver changes the memory concurrently,
        // which is what an atomic allows.
        unsafe { AtomicU16::from_ptr(self.ptr::<u16>(offset)) }
    }

    #[inline(always)]
    fn load_u16(&self, offset: usize, order: Ordering) -> Result<u16, Malformed> {
        let _view = self.hold()?;
        Ok(u16::from_le(self.u16_at(offset).load(order)))
    }

    #[inline(always)]
    fn store_u16(&self, value: u16, offset: usize, order: Ordering) -> Result<(), Malformed> {
        let _view = self.hold()?;
        self.u16_at(offset).store(value.to_le(), order);
        Ok(())
    }

    #[inline(always)]
    fn read<T: ByteValued>(&self, offset: usize) -> Result<T, Malformed> {
        let _view = self.hold()?;
        // SAFETY: as in `u16_at`; `T` is plain data, valid for any bytes,
        // and read volatile because the driver may write it concurrently.
        Ok(unsafe { std::ptr::read_volatile(self.ptr::<T>(offset)) })
    }

    #[inline(always)]
    fn write<T: ByteValued>(&self, offset: usize, value: T) -> Result<(), Malformed> {
        let _view = self.hold()?;
        // SAFETY: as in `u16_at`; volatile because the driver reads it.
        unsafe { std::ptr::write_volatile(self.ptr::<T>(offset), value) };
        Ok(())
    }

    /// Marks the ring's pages dirty in its region, after writes through
    /// [`write`](Self::write) or [`store_u16`](Self::store_u16), which do
    /// not (live migration must see them, `crate::dirty` of
    /// memvisor-memory). The whole ring: a used ring is at most a few
    /// pages, written on every request anyway.
    #[inline]
    fn mark_written(&self) {
        self.region.mark_dirty(self.offset, self.range.len());
    }
}

/// A device's virtqueue: virtio-queue's [`Queue`] (size, ring addresses,
/// indices, negotiated ring features) and where its rings lie in guest
/// memory, resolved once when the device is activated rather than at every
/// ring access.
///
/// Each ring must lie in one RAM region — a ring is one physically
/// contiguous allocation of the guest. A ring in a managed region
/// (virtio-mem memory) is checked to be populated before every access, and
/// the queue is [`Malformed::Queue`] once it is not.
#[derive(Debug)]
pub struct DeviceQueue {
    queue: Queue,
    desc: RingArea,
    avail: RingArea,
    used: RingArea,
}

impl DeviceQueue {
    /// Resolves the rings of `queue`, which must be ready and valid, in
    /// `map`; the error says what is wrong.
    pub fn new(queue: Queue, map: &GuestMemoryMap) -> Result<Self, String> {
        let size = queue.size();
        if !queue.is_valid(map.memory()) {
            return Err(format!(
                "not ready, or size {size} or ring addresses (descriptors {:#x}, avail {:#x}, used {:#x}) invalid",
                queue.desc_table(),
                queue.avail_ring(),
                queue.used_ring()
            ));
        }
        let n = u64::from(size);
        // The event-index fields trail the rings; they are always included.
        Ok(Self {
            desc: RingArea::resolve(map, queue.desc_table(), 16 * n, "descriptor table")?,
            avail: RingArea::resolve(map, queue.avail_ring(), 6 + 2 * n, "avail ring")?,
            used: RingArea::resolve(map, queue.used_ring(), 6 + 8 * n, "used ring")?,
            queue,
        })
    }

    /// The queue's state.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Where the device is in the queue: see [`QueueIndices`].
    pub fn indices(&self) -> QueueIndices {
        QueueIndices::of(&self.queue)
    }
}

/// Where a device is in one of its queues: the next avail-ring entry it
/// will take, the next used-ring entry it will fill, and whether
/// `VIRTIO_RING_F_EVENT_IDX` is in force. This is all of a split
/// virtqueue's state that lives only in the device (the rings, their
/// indices and flags are guest memory; size and ring addresses are the
/// transport's registers), so it is what a transport saves for migration
/// ([`VirtioDevice::queue_indices`](crate::VirtioDevice::queue_indices))
/// and sets again ([`apply`](Self::apply)) on the queues it hands the
/// destination's device at activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct QueueIndices {
    /// The next avail-ring entry the device takes (`Queue::next_avail`).
    pub next_avail: u16,
    /// The next used-ring entry the device fills (`Queue::next_used`); the
    /// used ring's `idx` in guest memory equals it between requests.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` is in force.
    pub event_idx: bool,
}

impl QueueIndices {
    /// The indices `queue` is at.
    pub fn of(queue: &Queue) -> Self {
        Self {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx: queue.event_idx_enabled(),
        }
    }

    /// Sets the indices on `queue` (before it is given to `activate`).
    pub fn apply(&self, queue: &mut Queue) {
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_event_idx(self.event_idx);
    }
}

/// The device side of one [`DeviceQueue`] during one drain: takes
/// available chains, reads them, and puts them on the used ring.
pub struct DeviceRing<'a> {
    queue: &'a mut Queue,
    size: u16,
    desc: &'a RingArea,
    avail: &'a RingArea,
    used: &'a RingArea,
    /// The avail index last read: requests up to it need no new read.
    avail_idx: Wrapping<u16>,
    /// The used index when the drain began, for `VIRTIO_F_EVENT_IDX`.
    first_used: Wrapping<u16>,
    /// The used ring was written: [`finish`](Self::finish) marks it dirty,
    /// once however many chains were used.
    used_written: bool,
}

impl<'a> DeviceRing<'a> {
    /// Starts a drain of `queue`.
    pub fn new(queue: &'a mut DeviceQueue) -> Self {
        let DeviceQueue {
            queue,
            desc,
            avail,
            used,
        } = queue;
        let next_avail = Wrapping(queue.next_avail());
        let first_used = Wrapping(queue.next_used());
        Self {
            size: queue.size(),
            queue,
            desc,
            avail,
            used,
            avail_idx: next_avail,
            first_used,
            used_written: false,
        }
    }

    /// Takes the next available chain's head index, if the driver made one
    /// available.
    pub fn pop(&mut self) -> Result<Option<u16>, Malformed> {
        let next = Wrapping(self.queue.next_avail());
        if next == self.avail_idx {
            self.avail_idx = Wrapping(self.avail.load_u16(2, Ordering::Acquire)?);
            let pending = (self.avail_idx - next).0;
            if pending == 0 {
                return Ok(None);
            }
            if pending > self.size {
                return Err(Malformed::Queue(format!(
                    "avail index {} is {pending} ahead of {}, more than the queue size {}",
                    self.avail_idx.0, next.0, self.size
                )));
            }
        }
        let slot = usize::from(next.0 % self.size);
        let head = self.avail.load_u16(4 + 2 * slot, Ordering::Relaxed)?;
        self.queue.set_next_avail((next + Wrapping(1)).0);
        Ok(Some(head))
    }

    fn descriptor(&self, index: u16) -> Result<Descriptor, Malformed> {
        self.desc.read(16 * usize::from(index))
    }

    /// Walks the chain at `head` into `chain` (whose buffers are reused),
    /// gathering up to `max_request` readable bytes and noting the writable
    /// buffers. Every buffer must be accessible guest memory
    /// ([`read_guest`]).
    pub fn read_chain(
        &self,
        map: &GuestMemoryMap,
        head: u16,
        max_request: usize,
        chain: &mut RequestChain,
    ) -> Result<(), Malformed> {
        chain.clear(head);
        let mut index = head;
        for _ in 0..self.size {
            if index >= self.size {
                return Err(Malformed::BadChain {
                    head,
                    reason: "descriptor index past the queue size",
                });
            }
            let desc = self.descriptor(index)?;
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
            // The common case, a buffer inside one region, is resolved
            // with one search of the memory map (`find`); a buffer spread
            // over several regions takes the general path.
            let whole = GuestRange::new(addr.0, u64::from(len)).ok_or_else(bad)?;
            let found = map.find(whole);
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                let region = match found {
                    Some((i, region)) if accessible(region, whole) => i as u32,
                    Some(_) => return Err(bad()),
                    None if guest_buffer_accessible(map, addr, u64::from(len)) => NO_REGION,
                    None => return Err(bad()),
                };
                chain.writable.push(WritableBuf { addr, len, region });
                chain.writable_len += len as usize;
            } else {
                if !chain.writable.is_empty() {
                    return Err(Malformed::WrongDirection { head });
                }
                let want = (len as usize).min(max_request.saturating_sub(chain.readable.len()));
                let read = match found {
                    // The whole buffer is checked, also the part beyond
                    // `max_request` that is not read, under the view the
                    // copy runs under.
                    Some((_, region)) => {
                        with_region(region, whole, |slice| {
                            gather(&mut chain.readable, want, |dst| slice.copy_to(dst) == dst.len())
                        }) == Some(true)
                    }
                    None => {
                        // The part beyond `max_request` is not read, but
                        // must be accessible all the same.
                        (want == len as usize || guest_buffer_accessible(map, addr, u64::from(len)))
                            && gather(&mut chain.readable, want, |dst| read_guest(map, addr, dst))
                    }
                };
                if !read {
                    return Err(bad());
                }
                chain.readable_len += len as usize;
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = desc.next();
        }
        Err(Malformed::BadChain {
            head,
            reason: "chain longer than the queue (a loop)",
        })
    }

    /// Puts chain `head` on the used ring with `len` bytes written.
    pub fn push_used(&mut self, head: u16, len: u32) -> Result<(), Malformed> {
        let next = Wrapping(self.queue.next_used());
        let offset = 4 + 8 * usize::from(next.0 % self.size);
        self.used_written = true;
        self.used.write(offset, [u32::from(head).to_le(), len.to_le()])?;
        let next = next + Wrapping(1);
        self.used.store_u16(next.0, 2, Ordering::Release)?;
        self.queue.set_next_used(next.0);
        Ok(())
    }

    /// Ends the drain and says whether the driver wants an interrupt for
    /// the buffers used in it. With `VIRTIO_F_EVENT_IDX` that is the
    /// `used_event` check, and the device publishes `avail_event` so that
    /// the driver kicks for its next request; without it, the driver's
    /// `VRING_AVAIL_F_NO_INTERRUPT` flag, which the specification says a
    /// device should honour.
    ///
    /// It also marks the used ring dirty if the drain wrote it (for live
    /// migration; its writes bypass `vm-memory`), so a drain that used a
    /// chain must end here.
    pub fn finish(mut self) -> bool {
        let notify = self.publish_and_decide();
        if self.used_written {
            self.used.mark_written();
        }
        notify
    }

    /// [`finish`](Self::finish) but for the marking.
    #[inline(always)]
    fn publish_and_decide(&mut self) -> bool {
        let size = usize::from(self.size);
        let new = Wrapping(self.queue.next_used());
        if self.queue.event_idx_enabled() {
            self.used_written = true;
            let published = self
                .used
                .store_u16(self.queue.next_avail(), 4 + 8 * size, Ordering::Relaxed);
            if new == self.first_used {
                return false;
            }
            // The used index must be visible before the driver's field is read.
            fence(Ordering::SeqCst);
            return match (published, self.avail.load_u16(4 + 2 * size, Ordering::Relaxed)) {
                // vring_need_event(): the driver's event index lies in [first, new).
                (Ok(()), Ok(used_event)) => (new - Wrapping(used_event) - Wrapping(1)) < (new - self.first_used),
                _ => true,
            };
        }
        if new == self.first_used {
            return false;
        }
        fence(Ordering::SeqCst);
        !matches!(self.avail.load_u16(0, Ordering::Relaxed), Ok(flags) if flags & VRING_AVAIL_F_NO_INTERRUPT != 0)
    }
}

/// Runs `f` on the bytes of `range` (non-empty), which lie inside
/// `region`, if they may be accessed: always in plain RAM; in a managed
/// region (virtio-mem) only if they are populated, checked under the
/// region's populated view, which is held while `f` runs (DESIGN.md rule
/// 3). `None`, without running `f`, if not.
#[inline]
fn with_region<R>(region: &Region, range: GuestRange, f: impl FnOnce(GuestSlice<'_>) -> R) -> Option<R> {
    let slice = region.slice(range.start() - region.range().start(), range.len())?;
    match region.manager() {
        None => Some(f(slice)),
        Some(manager) => {
            let view = manager.populated();
            view.is_populated(range).then(|| f(slice))
        }
    }
}

/// `slice.copy_from(data)` for `slice`, bytes `offset..` of `region`:
/// the same copy, with the written pages marked dirty by
/// [`Region::mark_dirty`] rather than by `vm-memory`'s general marking,
/// which divides by the bitmap's page size and doubles what a short answer
/// (a status, a few bytes) costs on every request.
#[inline]
fn copy_and_mark(region: &Region, offset: u64, slice: &GuestSlice<'_>, data: &[u8]) {
    let guard = slice.ptr_guard_mut();
    // SAFETY: the guard keeps `slice`'s `guard.len()` bytes of guest memory
    // mapped while `raw` is used; guest memory is only ever accessed
    // volatile (or atomically), never through a Rust reference, so a second
    // volatile view of it aliases nothing.
    let raw = unsafe { vm_memory::VolatileSlice::new(guard.as_ptr(), guard.len()) };
    raw.copy_from(data);
    // After the copy, so that a dirty-page taker who clears the bit before
    // copying the page sees the new bytes or the bit again.
    region.mark_dirty(offset, data.len().min(guard.len()) as u64);
}

/// True if `range` (non-empty), which lies inside `region`, may be
/// accessed now: [`with_region`] without the access.
#[inline]
fn accessible(region: &Region, range: GuestRange) -> bool {
    region.manager().is_none_or(|m| m.populated().is_populated(range))
}

/// Appends `n` bytes to `readable`, filled by `fill` (which says whether
/// it could): through a buffer on the stack for a request of up to
/// [`INLINE_REQUEST`] bytes, so that nothing is zeroed twice or moved.
#[inline]
fn gather(readable: &mut SmallVec<[u8; INLINE_REQUEST]>, n: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
    if n <= INLINE_REQUEST {
        let mut piece = [0u8; INLINE_REQUEST];
        let ok = fill(&mut piece[..n]);
        readable.extend_from_slice(&piece[..n]);
        ok
    } else {
        let start = readable.len();
        readable.resize(start + n, 0);
        fill(&mut readable[start..])
    }
}

/// True if the buffer `[addr, +len)` is entirely guest RAM and, in managed
/// regions, populated now. Buffers are checked again when they are read or
/// written ([`read_guest`], [`write_guest`]).
fn guest_buffer_accessible(map: &GuestMemoryMap, addr: GuestAddress, len: u64) -> bool {
    with_guest_slices(map, addr, len, |_, _| ())
}

/// Runs `f(offset, slice)` over the pieces of the guest buffer
/// `[addr, +len)` in order — one piece per RAM region it spans, `offset`
/// being the piece's position in the buffer — if every byte is RAM and, in
/// a managed region (virtio-mem), populated. The populated views of the
/// managed regions are held while `f` runs, so no unplug discards the
/// buffer in between (DESIGN.md rule 3). Returns false, without running
/// `f`, if the buffer may not be accessed; an empty buffer always may.
///
/// A buffer in discarded memory is refused rather than accessed: touching
/// it would populate memory the host has reclaimed (the guest must not use
/// unplugged memory, `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`).
fn with_guest_slices(
    map: &GuestMemoryMap,
    addr: GuestAddress,
    len: u64,
    mut f: impl FnMut(usize, GuestSlice<'_>),
) -> bool {
    if len == 0 {
        return true;
    }
    let Some(range) = GuestRange::new(addr.0, len) else {
        return false;
    };
    // The common case: the buffer lies in one region.
    if let Some((_, region)) = map.find(range) {
        return with_region(region, range, |slice| f(0, slice)).is_some();
    }
    // Across regions (in ascending order, so several views are always
    // taken in the same order): check every piece before touching any.
    let mut pieces = Vec::new();
    let mut views = Vec::new();
    let mut at = range.start();
    while at < range.end() {
        let Some(region) = map.region_at(at) else {
            return false;
        };
        let Some(host) = region
            .range()
            .intersection(&range)
            .and_then(|part| map.lookup(part).ok())
        else {
            return false;
        };
        if let Some(manager) = region.manager() {
            let view = manager.populated();
            if !view.is_populated(host.guest) {
                return false;
            }
            views.push(view);
        }
        at = host.guest.end();
        pieces.push(host);
    }
    for host in &pieces {
        f((host.guest.start() - range.start()) as usize, host.slice());
    }
    drop(views);
    true
}

/// Copies the guest buffer at `addr` into `dst`, if it may be accessed
/// (see [`write_guest`]); false, with nothing read, if not.
pub fn read_guest(map: &GuestMemoryMap, addr: GuestAddress, dst: &mut [u8]) -> bool {
    with_guest_slices(map, addr, dst.len() as u64, |at, slice| {
        slice.copy_to(&mut dst[at..]);
    })
}

/// Copies `src` into the guest buffer at `addr` if every byte of it is
/// guest RAM and, in a managed region (virtio-mem), populated — checked
/// under the region's populated view, held for the copy; false, with
/// nothing written, if not. A device never writes into discarded memory,
/// which would populate memory the host has reclaimed.
pub fn write_guest(map: &GuestMemoryMap, addr: GuestAddress, src: &[u8]) -> bool {
    with_guest_slices(map, addr, src.len() as u64, |at, slice| {
        slice.copy_from(&src[at..]);
    })
}

/// Writes `response` into the chain's writable buffers and returns the
/// number of bytes written (the used length).
pub fn write_response(map: &GuestMemoryMap, chain: &RequestChain, response: &[u8]) -> Result<u32, Malformed> {
    if response.len() > chain.writable_len {
        return Err(Malformed::ResponseTooShort {
            got: chain.writable_len,
            need: response.len(),
        });
    }
    let mut rest = response;
    for &WritableBuf { addr, len, region } in &chain.writable {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        if n == 0 {
            continue;
        }
        let (part, next) = rest.split_at(n);
        // Checked again now: handling the request may have unplugged the
        // memory of its own response buffer. The region found when the
        // chain was read is taken again by its index if it (still, in the
        // `map` given) holds the buffer; otherwise the map is searched.
        let target = GuestRange::new(addr.0, n as u64)
            .and_then(|range| Some((range, map.regions().get(region as usize)?)))
            .filter(|(range, r)| r.range().contains(range));
        let written = match target {
            Some((range, r)) => with_region(r, range, |slice| {
                copy_and_mark(r, range.start() - r.range().start(), &slice, part);
            })
            .is_some(),
            None => write_guest(map, addr, part),
        };
        if !written {
            return Err(Malformed::BadBuffer {
                head: chain.head,
                addr: addr.0,
                len,
            });
        }
        rest = next;
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
/// ([`read_guest`], [`write_guest`]): a buffer outside RAM or in discarded
/// memory of a managed region (an unplugged virtio-mem block) is
/// [`Malformed::BadBuffer`] and is never touched; the rings likewise
/// ([`DeviceRing`]).
///
/// Returns the number of requests answered. On the first [`Malformed`]
/// chain or request it stops and returns the error; requests answered
/// before it stay answered. The caller then enters NEEDS_RESET.
pub fn drain_queue(
    queue: &mut DeviceQueue,
    queue_index: u16,
    map: &GuestMemoryMap,
    interrupt: &dyn VirtioInterrupt,
    max_request: usize,
    min_response: usize,
    mut handle: impl FnMut(&RequestChain) -> Result<Response, Malformed>,
) -> Result<usize, Malformed> {
    let mut ring = DeviceRing::new(queue);
    let mut chain = RequestChain::new();
    let mut answered = 0;
    let result = loop {
        let head = match ring.pop() {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(answered),
            Err(e) => break Err(e),
        };
        let outcome = ring.read_chain(map, head, max_request, &mut chain).and_then(|()| {
            if chain.writable_len < min_response {
                return Err(Malformed::ResponseTooShort {
                    got: chain.writable_len,
                    need: min_response,
                });
            }
            handle(&chain).and_then(|resp| write_response(map, &chain, &resp))
        });
        match outcome.and_then(|used_len| ring.push_used(head, used_len)) {
            Ok(()) => answered += 1,
            Err(e) => break Err(e),
        }
    };
    if ring.finish()
        && let Err(e) = interrupt.trigger(InterruptKind::Queue(queue_index))
    {
        log::warn!("queue {queue_index}: interrupt failed: {e}");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::EventFdInterrupt;
    use memvisor_guest::{Buf, DriverQueue};
    use memvisor_memory::map::GuestMemoryMap;
    use memvisor_memory::{Backing, RamBlock};
    use std::sync::Arc;

    struct Fixture {
        map: GuestMemoryMap,
        driver: DriverQueue,
        queue: DeviceQueue,
        irq: EventFdInterrupt,
    }

    fn fixture() -> Fixture {
        let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
        let driver = DriverQueue::new(&map, GuestAddress(0), 16, 8192).unwrap();
        let queue = DeviceQueue::new(driver.device_queue(), &map).unwrap();
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
            Ok(Response::from_slice(req.request()))
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
        assert_eq!(&f.driver.pop_used().unwrap().data[..], b"xy");
        assert!(f.driver.pop_used().is_none());
        assert_eq!(f.irq.take(InterruptKind::Queue(0)), 1, "one interrupt per drain");
        assert_eq!(drain(&mut f).unwrap(), 0);
        // A polling driver asks for no interrupt, and gets none.
        f.driver.suppress_interrupts(true);
        f.driver.add(&[Buf::In(b"zz"), Buf::Out(2)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 1);
        assert_eq!(f.irq.take(InterruptKind::Queue(0)), 0);
        assert_eq!(&f.driver.pop_used().unwrap().data[..], b"zz");
    }

    /// A device queue built anew on the same rings (a migrated device)
    /// and set to the old one's indices takes only what is new.
    #[test]
    fn indices_carry_a_queue_over_to_a_new_device_queue() {
        let mut f = fixture();
        assert_eq!(f.queue.indices(), QueueIndices::default());
        for _ in 0..3 {
            f.driver.add(&[Buf::In(b"ab"), Buf::Out(2)]).unwrap();
        }
        assert_eq!(drain(&mut f).unwrap(), 3);
        for _ in 0..3 {
            f.driver.pop_used().unwrap();
        }
        // One more made available before the move, one after.
        f.driver.add(&[Buf::In(b"cd"), Buf::Out(2)]).unwrap();
        let at = f.queue.indices();
        assert_eq!(
            at,
            QueueIndices {
                next_avail: 3,
                next_used: 3,
                event_idx: false
            }
        );
        let mut queue = f.driver.device_queue();
        at.apply(&mut queue);
        assert_eq!(QueueIndices::of(&queue), at);
        f.queue = DeviceQueue::new(queue, &f.map).unwrap();
        f.driver.add(&[Buf::In(b"ef"), Buf::Out(2)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 2, "only the two new requests");
        assert_eq!(&f.driver.pop_used().unwrap().data[..], b"cd");
        assert_eq!(&f.driver.pop_used().unwrap().data[..], b"ef");
        assert!(f.driver.pop_used().is_none());
        assert_eq!((f.queue.indices().next_avail, f.queue.indices().next_used), (5, 5));
        // The event-index setting travels too.
        let mut queue = f.driver.device_queue();
        QueueIndices { event_idx: true, ..at }.apply(&mut queue);
        assert!(queue.event_idx_enabled());
    }

    /// The device's writes — the used element and index, the response —
    /// mark exactly their pages dirty in the region (both are written
    /// behind `vm-memory`'s back and marked by hand: the used ring when the
    /// drain finishes, the response as it is copied), and a take clears
    /// them.
    #[test]
    fn device_writes_mark_exactly_their_pages_dirty() {
        let mut f = fixture();
        let region = f.map.regions()[0].clone();
        let pages = |region: &Region| region.take_dirty().iter().collect::<Vec<_>>();
        // The driver's layout: descriptors and avail ring in page 0, the
        // used ring in page 1.
        assert_eq!(f.driver.desc_table(), GuestAddress(0));
        f.driver.add(&[Buf::In(b"ab"), Buf::Out(2)]).unwrap();
        region.take_dirty(); // What the driver wrote.

        // A used-ring push on its own.
        let mut ring = DeviceRing::new(&mut f.queue);
        let head = ring.pop().unwrap().unwrap();
        ring.push_used(head, 0).unwrap();
        ring.finish();
        assert_eq!(pages(&region), vec![1]);
        assert!(region.take_dirty().is_empty());
        f.driver.pop_used().unwrap();

        // A whole request whose 32-byte answer straddles pages 5 and 6.
        vm_memory::Bytes::write_slice(f.map.memory(), &[9u8; 32], GuestAddress(0x8000)).unwrap();
        f.driver
            .add_raw(&[(0x8000, 32, 0), (0x6000 - 16, 32, VIRTQ_DESC_F_WRITE)])
            .unwrap();
        region.take_dirty();
        assert_eq!(
            drain_queue(&mut f.queue, 0, &f.map, &f.irq, 64, 1, |req| Ok(Response::from_slice(
                req.request()
            ))),
            Ok(1)
        );
        assert_eq!(pages(&region), vec![1, 5, 6]);
        assert!(region.take_dirty().is_empty());
        // With event index, `avail_event` is in the used ring too.
        f.queue.queue.set_event_idx(true);
        f.driver.add(&[Buf::In(b"cd"), Buf::Out(2)]).unwrap();
        let (data, _) = f.driver.data_area();
        region.take_dirty();
        drain(&mut f).unwrap();
        assert_eq!(pages(&region), vec![1, data.0 / 4096]);
    }

    #[test]
    fn long_requests_are_truncated_to_the_maximum() {
        let mut f = fixture();
        f.driver.add(&[Buf::In(&[7u8; 100]), Buf::Out(100)]).unwrap();
        assert_eq!(drain(&mut f).unwrap(), 1);
        assert_eq!(f.driver.pop_used().unwrap().data[..], [7u8; 16]);
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
        assert_eq!(&f.driver.pop_used().unwrap().data[..], b"ok");

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
            Ok(Response::new())
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

    #[test]
    fn rings_in_unplugged_memory_are_never_touched() {
        use memvisor_memory::discard::BlockDiscardManager;
        const MIB: u64 = 1 << 20;
        let hot = Arc::new(RamBlock::new("hot", 4 * MIB, Backing::Memfd).unwrap());
        let region = GuestRange::new(0x1_0000_0000, 4 * MIB).unwrap();
        let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, Arc::new(RamBlock::new("boot", MIB, Backing::Memfd).unwrap()))
            .unwrap()
            .managed_ram(region.start(), hot.clone(), manager.clone())
            .unwrap()
            .build()
            .unwrap();
        let first = GuestRange::new(region.start(), 2 * MIB).unwrap();
        manager.write().plug(first, || Ok::<_, ()>(()), |_| {}).unwrap();
        // A guest that puts a queue (rings and buffers) in a plugged block.
        let mut driver = DriverQueue::new(&map, GuestAddress(region.start()), 16, 8192).unwrap();
        let mut queue = DeviceQueue::new(driver.device_queue(), &map).unwrap();
        let irq = EventFdInterrupt::new(1).unwrap();
        let echo = |req: &RequestChain| Ok(Response::from_slice(req.request()));
        driver.add(&[Buf::In(b"ok"), Buf::Out(2)]).unwrap();
        assert_eq!(drain_queue(&mut queue, 0, &map, &irq, 16, 1, echo), Ok(1));
        assert_eq!(&driver.pop_used().unwrap().data[..], b"ok");

        // ... then unplugs that block and kicks the queue.
        driver.add(&[Buf::In(b"no"), Buf::Out(2)]).unwrap();
        manager
            .write()
            .unplug(first, false, |r| {
                hot.discard(r.start() - region.start(), r.len()).unwrap()
            })
            .unwrap();
        assert_eq!(hot.resident_bytes(0, 2 * MIB).unwrap(), 0);
        let result = drain_queue(&mut queue, 0, &map, &irq, 16, 1, echo);
        assert!(
            matches!(&result, Err(Malformed::Queue(why)) if why.contains("unplugged memory")),
            "{result:?}"
        );
        assert_eq!(
            hot.resident_bytes(0, 2 * MIB).unwrap(),
            0,
            "the device populated discarded memory"
        );
    }

    /// Two adjacent 1 MiB regions at 0, each its own memfd: the map and
    /// its two blocks.
    fn two_regions() -> (GuestMemoryMap, Arc<RamBlock>, Arc<RamBlock>) {
        const MIB: u64 = 1 << 20;
        let low = Arc::new(RamBlock::new("low", MIB, Backing::Memfd).unwrap());
        let high = Arc::new(RamBlock::new("high", MIB, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, low.clone())
            .unwrap()
            .ram(MIB, high.clone())
            .unwrap()
            .build()
            .unwrap();
        (map, low, high)
    }

    /// A request and an answer buffer across the boundary of two adjacent
    /// regions take the general path, piece by piece.
    #[test]
    fn buffers_across_two_regions_are_read_and_written() {
        const MIB: u64 = 1 << 20;
        let (map, low, high) = two_regions();
        let mut driver = DriverQueue::new(&map, GuestAddress(0), 16, 8192).unwrap();
        let mut queue = DeviceQueue::new(driver.device_queue(), &map).unwrap();
        let irq = EventFdInterrupt::new(1).unwrap();
        low.write(MIB - 2, b"ab").unwrap();
        high.write(0, b"cd").unwrap();
        driver
            .add_raw(&[(MIB - 2, 4, VIRTQ_DESC_F_NEXT), (MIB - 1, 3, VIRTQ_DESC_F_WRITE)])
            .unwrap();
        let echo = |req: &RequestChain| Ok(Response::from_slice(&req.request()[1..]));
        assert_eq!(drain_queue(&mut queue, 0, &map, &irq, 16, 1, echo), Ok(1));
        let mut answer = [0u8; 3];
        low.read(MIB - 1, &mut answer[..1]).unwrap();
        high.read(0, &mut answer[1..]).unwrap();
        assert_eq!(&answer, b"bcd");
    }

    /// `write_response` finds the answer buffer again by the region the
    /// chain was read in, but only if that region (of the map it is given)
    /// holds it: given another map, it searches that map instead.
    #[test]
    fn an_answer_goes_where_the_given_map_has_its_buffer() {
        const MIB: u64 = 1 << 20;
        let whole = Arc::new(RamBlock::new("whole", 2 * MIB, Backing::Memfd).unwrap());
        let read_with = GuestMemoryMap::builder().ram(0, whole).unwrap().build().unwrap();
        let mut driver = DriverQueue::new(&read_with, GuestAddress(0), 16, 8192).unwrap();
        let mut queue = DeviceQueue::new(driver.device_queue(), &read_with).unwrap();
        driver
            .add_raw(&[(0x9000, 2, VIRTQ_DESC_F_NEXT), (MIB + MIB / 2, 2, VIRTQ_DESC_F_WRITE)])
            .unwrap();
        let mut ring = DeviceRing::new(&mut queue);
        let head = ring.pop().unwrap().unwrap();
        let mut chain = RequestChain::new();
        ring.read_chain(&read_with, head, 16, &mut chain).unwrap();
        // The buffer's region had index 0; in this map index 0 is `low`,
        // which does not hold it.
        let (other, low, high) = two_regions();
        assert_eq!(write_response(&other, &chain, b"xy"), Ok(2));
        let mut answer = [0u8; 2];
        high.read(MIB / 2, &mut answer).unwrap();
        assert_eq!(&answer, b"xy");
        assert_eq!(low.resident_bytes(0, MIB).unwrap(), 0, "nothing was written into `low`");
    }
}
