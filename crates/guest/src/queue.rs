//! The driver side of one split virtqueue, in real guest memory.
//!
//! [`DriverQueue`] does what a guest driver does: it lays out a descriptor
//! table, an avail ring and a used ring in guest RAM, places request
//! buffers there, publishes chains and reads completions. Device tests, the
//! trace replayer and the fuzzers drive devices through it, so every
//! request crosses guest memory exactly as it would from a real guest.

use std::sync::atomic::{Ordering, fence};

use memvisor_memory::map::{GuestMemoryMap, Region};
use memvisor_memory::{GuestRange, GuestSlice};
use smallvec::SmallVec;
use virtio_bindings::virtio_ring;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, VolatileMemory};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// One buffer of a request chain.
#[derive(Debug, Clone, Copy)]
pub enum Buf<'a> {
    /// Device-readable bytes (the request).
    In(&'a [u8]),
    /// A device-writable buffer of this many bytes (for the response).
    Out(u32),
}

/// A completed chain, read from the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Bytes the device said it wrote.
    pub len: u32,
    /// The first `len` bytes of the chain's writable buffers, concatenated
    /// (fewer if `len` exceeds them — a device bug the caller can detect).
    /// Short answers are kept inline, without an allocation.
    pub data: SmallVec<[u8; 64]>,
}

/// Errors of the driver side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The queue size is zero, not a power of two, or above 32768.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    Size(u16),
    /// The rings or the data area are not in guest memory.
    #[error("queue layout [{base:#x}, +{len:#x}) is not in guest memory")]
    Layout {
        /// First guest address of the layout.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Not enough free descriptors.
    #[error("need {need} descriptors, {free} free")]
    NoDescriptors {
        /// Descriptors the chain needs.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// The data area has no room for the buffers.
    #[error("data area full: need {need} bytes, {free} free")]
    NoData {
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        free: u64,
    },
    /// An empty chain.
    #[error("a chain needs at least one buffer")]
    Empty,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    layout: Layout,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data: GuestAddress,
    data_len: u64,
    data_next: u64,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Per head index: the chain's descriptors `(index, addr, len, flags)`
    /// while it is in flight (empty otherwise; capacity reused).
    chains: Vec<Vec<(u16, u64, u32, u16)>>,
    in_flight: usize,
}

/// Everything the driver lays out — descriptor table, rings, data area —
/// which one RAM region holds, so that it is one slice of guest memory.
#[derive(Debug)]
struct Layout {
    map: GuestMemoryMap,
    region: Region,
    /// Offset of the layout in `region`.
    offset: u64,
    len: u64,
}

impl Layout {
    fn area(&self) -> GuestSlice<'_> {
        self.region
            .slice(self.offset, self.len)
            .expect("layout checked in DriverQueue::new")
    }
}

const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

impl DriverQueue {
    /// Bytes of guest memory a queue of `size` entries with `data_len`
    /// bytes of buffer space occupies (rings page-aligned).
    pub const fn footprint(size: u16, data_len: u64) -> u64 {
        let n = size as u64;
        let avail = 16 * n;
        let used = align_up(avail + 6 + 2 * n, 4096);
        let data = align_up(used + 6 + 8 * n, 4096);
        data + data_len
    }

    /// Lays out a zeroed queue of `size` entries at `base` (4 KiB aligned),
    /// followed by `data_len` bytes for buffers.
    pub fn new(map: &GuestMemoryMap, base: GuestAddress, size: u16, data_len: u64) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(DriverError::Size(size));
        }
        let n = u64::from(size);
        let len = Self::footprint(size, data_len);
        let layout_err = DriverError::Layout { base: base.0, len };
        // One region must hold the whole layout, so that it is one slice.
        let host = GuestRange::new(base.0, len)
            .and_then(|range| map.lookup(range).ok())
            .ok_or(layout_err.clone())?;
        let layout = Layout {
            map: map.clone(),
            region: host.region.clone(),
            offset: base.0 - host.region.range().start(),
            len,
        };
        let avail = GuestAddress(base.0 + 16 * n);
        let used = GuestAddress(base.0 + align_up(16 * n + 6 + 2 * n, 4096));
        let data_off = align_up(used.0 - base.0 + 6 + 8 * n, 4096);
        layout
            .area()
            .write_slice(&vec![0u8; data_off as usize], 0)
            .map_err(|_| layout_err)?;
        Ok(Self {
            layout,
            size,
            desc: base,
            avail,
            used,
            data: GuestAddress(base.0 + data_off),
            data_len,
            data_next: 0,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            in_flight: 0,
        })
    }

    /// A device-side [`Queue`] configured for this layout and ready, as a
    /// transport would build it from the driver's register writes.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("size validated in new");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc
    }

    /// Guest address and length of the buffer area.
    pub fn data_area(&self) -> (GuestAddress, u64) {
        (self.data, self.data_len)
    }

    /// Number of chains published and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Copies the buffers into the data area, builds a chain and publishes
    /// it on the avail ring. Returns the head index.
    pub fn add(&mut self, bufs: &[Buf<'_>]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let need: u64 = bufs
            .iter()
            .map(|b| match b {
                Buf::In(d) => align_up(d.len() as u64, 8),
                Buf::Out(n) => align_up(u64::from(*n), 8),
            })
            .sum();
        if self.in_flight == 0 {
            self.data_next = 0;
        }
        let free = self.data_len - self.data_next;
        if need > free {
            return Err(DriverError::NoData { need, free });
        }
        let mut descs: SmallVec<[(u64, u32, u16); 4]> = SmallVec::with_capacity(bufs.len());
        let area = self.layout.area();
        for b in bufs {
            let addr = self.data.0 + self.data_next;
            let (len, flags) = match b {
                Buf::In(d) => {
                    area.write_slice(d, (addr - self.desc.0) as usize)
                        .expect("data area checked in new");
                    (d.len() as u32, 0)
                }
                // Like a real driver, the response buffer is not cleared:
                // only the `len` bytes the device reports are read back.
                Buf::Out(n) => (*n, VIRTQ_DESC_F_WRITE),
            };
            self.data_next += align_up(u64::from(len), 8);
            descs.push((addr, len, flags));
        }
        self.add_raw(&descs)
    }

    /// Publishes a chain of raw descriptors `(addr, len, flags)`, linking
    /// them with `VIRTQ_DESC_F_NEXT` (which this sets or clears itself).
    /// Addresses and flags are written as given, so hostile chains
    /// (writable before readable, buffers outside RAM) can be built.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16)]) -> Result<u16, DriverError> {
        if descs.is_empty() {
            return Err(DriverError::Empty);
        }
        if descs.len() > self.free.len() {
            return Err(DriverError::NoDescriptors {
                need: descs.len(),
                free: self.free.len(),
            });
        }
        // Descriptors are taken from the free list one by one; the chain
        // remembers them (with what was written) so that completion needs
        // no read-back of the table.
        let head = *self.free.last().expect("checked");
        let mut chain = std::mem::take(&mut self.chains[usize::from(head)]);
        chain.clear();
        for &(addr, len, flags) in descs {
            chain.push((self.free.pop().expect("checked"), addr, len, flags));
        }
        let area = self.layout.area();
        for i in 0..chain.len() {
            let (index, addr, len, flags) = chain[i];
            let (flags, next) = match chain.get(i + 1) {
                Some(&(next, ..)) => (flags | VIRTQ_DESC_F_NEXT, next),
                None => (flags & !VIRTQ_DESC_F_NEXT, 0),
            };
            Self::store_descriptor(&area, self.size, index, Descriptor::new(addr, len, flags, next));
        }
        self.chains[usize::from(head)] = chain;
        self.in_flight += 1;
        self.publish(head);
        Ok(head)
    }

    fn offset(&self, addr: GuestAddress) -> usize {
        (addr.0 - self.desc.0) as usize
    }

    fn store_descriptor(area: &GuestSlice<'_>, size: u16, index: u16, desc: Descriptor) {
        area.get_ref::<Descriptor>(16 * usize::from(index % size))
            .expect("descriptor table checked in new")
            .store(desc);
    }

    /// Writes descriptor `index` of the table as given (no bookkeeping):
    /// for tests that build loops or out-of-range links.
    pub fn write_descriptor(&self, index: u16, desc: Descriptor) {
        Self::store_descriptor(&self.layout.area(), self.size, index, desc);
    }

    /// Puts `head` on the avail ring and advances the avail index.
    pub fn publish(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        let area = self.layout.area();
        area.store(head.to_le(), self.offset(self.avail) + 4 + 2 * slot, Ordering::Relaxed)
            .expect("avail ring checked in new");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the entry (and the chain) before the index.
        area.store(self.avail_idx.to_le(), self.offset(self.avail) + 2, Ordering::Release)
            .expect("avail ring checked in new");
    }

    /// Asks the device not to interrupt when it uses buffers
    /// (`VRING_AVAIL_F_NO_INTERRUPT`), as a driver that polls the used ring
    /// does: Linux's virtio-iommu driver registers its request queue without
    /// a callback, which sets this flag.
    pub fn suppress_interrupts(&self, suppress: bool) {
        const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
        let flags: u16 = if suppress { VRING_AVAIL_F_NO_INTERRUPT } else { 0 };
        self.layout
            .area()
            .store(flags.to_le(), self.offset(self.avail), Ordering::Relaxed)
            .expect("avail ring checked in new");
    }

    /// Writes the avail index as given (a hostile driver may lie about it).
    pub fn set_avail_idx(&self, idx: u16) {
        self.layout
            .area()
            .store(idx.to_le(), self.offset(self.avail) + 2, Ordering::Release)
            .expect("avail ring checked in new");
    }

    /// Reads the next completion from the used ring, if the device made one,
    /// and frees its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        let area = self.layout.area();
        let used = self.offset(self.used);
        let used_idx = u16::from_le(area.load::<u16>(used + 2, Ordering::Acquire).ok()?);
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let [id, len] = area.get_ref::<[u32; 2]>(used + 4 + 8 * slot).ok()?.load();
        let (id, len) = (u32::from_le(id), u32::from_le(len));
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        let mut data = SmallVec::new();
        let mut chain = self
            .chains
            .get_mut(usize::from(head))
            .map(std::mem::take)
            .unwrap_or_default();
        if !chain.is_empty() {
            self.in_flight -= 1;
        }
        for &(_, addr, buf_len, flags) in &chain {
            if flags & VIRTQ_DESC_F_WRITE != 0 && data.len() < len as usize {
                let take = (len as usize - data.len()).min(buf_len as usize);
                let start = data.len();
                data.resize(start + take, 0);
                // Buffers of `add` are in the layout; hostile ones anywhere.
                let read = match addr.checked_sub(self.desc.0) {
                    Some(at) if at + take as u64 <= self.layout.len => {
                        area.read_slice(&mut data[start..], at as usize).is_ok()
                    }
                    _ => self
                        .layout
                        .map
                        .memory()
                        .read_slice(&mut data[start..], GuestAddress(addr))
                        .is_ok(),
                };
                if !read {
                    data.truncate(start);
                }
            }
        }
        // Returned in reverse, so the next chain takes the same ascending
        // indices again.
        self.free.extend(chain.iter().rev().map(|&(index, ..)| index));
        chain.clear();
        if let Some(slot) = self.chains.get_mut(usize::from(head)) {
            *slot = chain;
        }
        Some(Used { head, len, data })
    }
}
