//! The driver side of a split virtqueue, in real guest memory.
//!
//! [`DriverQueue`] does what a guest driver does: it lays out a descriptor
//! table, an avail ring and a used ring in guest RAM, places request
//! buffers there, publishes chains and reads completions. Device tests, the
//! trace replayer and the fuzzers drive devices through it, so every
//! request crosses guest memory exactly as it would from a real guest.
//!
//! ```
//! # use std::sync::Arc;
//! # use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_virtio::driver::{Buf, DriverQueue};
//! use vm_memory::GuestAddress;
//! # let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
//! # let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
//! let mut driver = DriverQueue::new(map.memory(), GuestAddress(0x1000), 16, 4096).unwrap();
//! let head = driver.add(&[Buf::In(&[1, 2, 3]), Buf::Out(10)]).unwrap();
//! // Hand `driver.device_queue()` to a device, kick it, then:
//! assert!(driver.pop_used().is_none()); // nothing was processed yet
//! # let _ = head;
//! ```

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 0x1;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 0x2;

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
    pub data: Vec<u8>,
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
    mem: GuestMemoryMmap,
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
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16, data_len: u64) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(DriverError::Size(size));
        }
        let n = u64::from(size);
        let len = Self::footprint(size, data_len);
        let layout_err = DriverError::Layout { base: base.0, len };
        use vm_memory::GuestMemoryBackend;
        if base.0.checked_add(len).is_none() || !mem.check_range(base, len as usize) {
            return Err(layout_err);
        }
        let avail = GuestAddress(base.0 + 16 * n);
        let used = GuestAddress(base.0 + align_up(16 * n + 6 + 2 * n, 4096));
        let data_off = align_up(used.0 - base.0 + 6 + 8 * n, 4096);
        let zeros = vec![0u8; data_off as usize];
        mem.write_slice(&zeros, base).map_err(|_| layout_err)?;
        Ok(Self {
            mem: mem.clone(),
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
        let mut descs = Vec::with_capacity(bufs.len());
        for b in bufs {
            let addr = GuestAddress(self.data.0 + self.data_next);
            let (len, flags) = match b {
                Buf::In(d) => {
                    self.mem.write_slice(d, addr).expect("data area checked in new");
                    (d.len() as u32, 0)
                }
                // Like a real driver, the response buffer is not cleared:
                // only the `len` bytes the device reports are read back.
                Buf::Out(n) => (*n, VIRTQ_DESC_F_WRITE),
            };
            self.data_next += align_up(u64::from(len), 8);
            descs.push((addr.0, len, flags));
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
        for i in 0..chain.len() {
            let (index, addr, len, flags) = chain[i];
            let (flags, next) = match chain.get(i + 1) {
                Some(&(next, ..)) => (flags | VIRTQ_DESC_F_NEXT, next),
                None => (flags & !VIRTQ_DESC_F_NEXT, 0),
            };
            self.write_descriptor(index, Descriptor::new(addr, len, flags, next));
        }
        self.chains[usize::from(head)] = chain;
        self.in_flight += 1;
        self.publish(head);
        Ok(head)
    }

    /// Writes descriptor `index` of the table as given (no bookkeeping):
    /// for tests that build loops or out-of-range links.
    pub fn write_descriptor(&self, index: u16, desc: Descriptor) {
        let addr = GuestAddress(self.desc.0 + 16 * u64::from(index % self.size));
        self.mem.write_obj(desc, addr).expect("descriptor table checked in new");
    }

    /// Puts `head` on the avail ring and advances the avail index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .expect("avail ring checked in new");
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Asks the device not to interrupt when it uses buffers
    /// (`VRING_AVAIL_F_NO_INTERRUPT`), as a driver that polls the used ring
    /// does: Linux's virtio-iommu driver registers its request queue without
    /// a callback, which sets this flag.
    pub fn suppress_interrupts(&self, suppress: bool) {
        const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
        let flags = if suppress { VRING_AVAIL_F_NO_INTERRUPT } else { 0 };
        self.mem
            .write_obj(flags, self.avail)
            .expect("avail ring checked in new");
    }

    /// Writes the avail index as given (a hostile driver may lie about it).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail.0 + 2))
            .expect("avail ring checked in new");
    }

    /// Reads the next completion from the used ring, if the device made one,
    /// and frees its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.used.0 + 2)).ok()?;
        if used_idx == self.last_used {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let elem = GuestAddress(self.used.0 + 4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).ok()?;
        let len: u32 = self.mem.read_obj(GuestAddress(elem.0 + 4)).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        let mut data = Vec::new();
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
                if self.mem.read_slice(&mut data[start..], GuestAddress(addr)).is_err() {
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
