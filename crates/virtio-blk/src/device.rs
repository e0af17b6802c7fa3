//! The virtio-blk device: [`VirtioBlk`], what a transport drives, and the
//! request path that applies the guest's requests to the image.
//!
//! # One request, in order
//!
//! 1. The chain is walked from the descriptor table (`chain.rs`); a broken
//!    ring puts the device into NEEDS_RESET.
//! 2. The status byte (the last byte of the last, device-writable,
//!    descriptor) is resolved for writing. Without one — or if it cannot
//!    be written (not RAM, not mapped in the IOMMU) — the request is
//!    completed with used length 0 and nothing else happens.
//! 3. The chain's shape, the header and the request are checked
//!    (`chain.rs`, [`request`](crate::request)); every data buffer is
//!    resolved ([`dma`](crate::dma)). A refusal or an unreachable buffer is
//!    answered `VIRTIO_BLK_S_IOERR` (`VIRTIO_BLK_S_UNSUPP` for an unknown
//!    type) before a byte of guest memory or of the image is touched.
//! 4. The transfer runs on the backend with the buffers' memory held
//!    populated; then the status is written and the chain used with the
//!    number of bytes written into device-writable buffers (an IN's or a
//!    GET_ID's data plus the status byte; 1 for a refused or failed
//!    request).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memvisor_dma::attach::AttachLatch;
use memvisor_dma::uring::{Transfer, TransferError, UringPinner};
use memvisor_memory::GuestRange;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::config::read_config;
use memvisor_virtio::device::{Active, VIRTIO_F_VERSION_1};
use memvisor_virtio::queue::{DeviceQueue, DeviceRing, Malformed, write_guest};
use memvisor_virtio::{ActivateError, InterruptKind, VirtioCommon, VirtioDevice, VirtioInterrupt};
use memvisor_virtio_iommu::{Access, IommuHandle};
use smallvec::SmallVec;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vm_memory::bitmap::Bitmap;

use crate::backend::{Backend, ImageError, RawFile};
use crate::chain::{self, Desc};
use crate::dma::{self, Dma, DmaError, Piece};
use crate::request::{Disk, Request};
use crate::wire::{
    BlkConfig, DEVICE_ID, F_ACCESS_PLATFORM, F_BLK_SIZE, F_FLUSH, F_INDIRECT_DESC, F_RO, F_SEG_MAX, F_SIZE_MAX,
    ID_BYTES, OUTHDR_SIZE, OutHdr, S_IOERR, S_OK, S_UNSUPP, SECTOR_SHIFT, SECTOR_SIZE,
};

/// The device's name in errors and logs.
const NAME: &str = "virtio-blk";

/// Queue size when none is configured.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest data segment (descriptor) the driver is told to use
/// (`size_max`, 1 MiB).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request the driver is told to use (`seg_max`),
/// further limited to the queue size minus the header and status
/// descriptors: a chain in the ring, or in an indirect table (which may
/// be at most the queue size long), has room for them.
pub const MAX_SEGMENTS: u32 = 128;
/// Most data bytes one request may carry (128 segments of 1 MiB); a larger
/// IN or OUT is answered `VIRTIO_BLK_S_IOERR`. A driver that honours
/// `size_max` and `seg_max` never reaches it.
pub const MAX_REQUEST_BYTES: u64 = MAX_SEGMENTS as u64 * SIZE_MAX as u64;

/// How a [`VirtioBlk`] is made.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The serial the guest reads with GET_ID (at most 20 bytes; shorter
    /// ones are NUL-padded).
    pub id: String,
    /// The raw image (a file or a block device) whose size, a multiple of
    /// 512 bytes, is the disk's.
    pub path: PathBuf,
    /// The disk is read-only: the image is opened for reading only,
    /// `VIRTIO_BLK_F_RO` is offered and every OUT fails.
    pub read_only: bool,
    /// Maximum size of the request queue: a power of two in 4..=32768.
    pub queue_size: u16,
    /// The IOMMU the device sits behind, and its endpoint ID there. Then
    /// `VIRTIO_F_ACCESS_PLATFORM` is offered and required, and every
    /// address the driver gives — rings and buffers — is an IOVA.
    pub iommu: Option<(IommuHandle, u32)>,
    /// The disk's DMA context, for zero-copy I/O: INs and OUTs move data
    /// straight on the buffers this pinner has registered (pinned) for the
    /// device's addresses — all populated RAM without an IOMMU, what the
    /// guest maps with one — so the disk pins guest memory exactly like an
    /// assigned device, and a buffer it has not pinned is answered
    /// `VIRTIO_BLK_S_IOERR` untouched. Without it, requests are
    /// `preadv`/`pwritev` into guest memory and nothing is pinned.
    pub zero_copy: Option<Arc<UringPinner>>,
    /// Opens once `zero_copy`'s device is attached: a VMM may attach it
    /// while the guest starts (pinning all RAM takes a while), and every
    /// zero-copy transfer first waits for this, so none is refused for
    /// memory not pinned yet. If the attachment failed, zero-copy requests
    /// are answered `VIRTIO_BLK_S_IOERR`. Open by default.
    pub zero_copy_ready: AttachLatch,
}

impl BlockConfig {
    /// A writable disk on the image at `path`, with an empty serial, a
    /// queue of [`DEFAULT_QUEUE_SIZE`] and no IOMMU.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            id: String::new(),
            path: path.into(),
            read_only: false,
            queue_size: DEFAULT_QUEUE_SIZE,
            iommu: None,
            zero_copy: None,
            zero_copy_ready: AttachLatch::open(),
        }
    }
}

/// Why a [`VirtioBlk`] cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be used (the message names its path).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The serial is longer than 20 bytes.
    #[error("virtio-blk serial {id:?} is {} bytes long, at most 20 fit", id.len())]
    IdTooLong {
        /// The serial.
        id: String,
    },
    /// The queue size is not a power of two in 4..=32768.
    #[error("virtio-blk queue size {0} is not a power of two in 4..=32768")]
    QueueSize(u16),
}

/// The device's counters (since it was made; a reset keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStats {
    /// Requests completed, whatever their outcome.
    pub requests: u64,
    /// Bytes read from the image by successful INs.
    pub read_bytes: u64,
    /// Bytes written to the image by successful OUTs.
    pub written_bytes: u64,
    /// Successful FLUSHes.
    pub flushes: u64,
    /// Requests answered `VIRTIO_BLK_S_IOERR`, or completed without a
    /// status because the chain had no writable status byte.
    pub errors: u64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// IOMMU translation faults the device met (each one is also reported
    /// by the IOMMU to its driver).
    pub iommu_faults: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    unsupported: AtomicU64,
    iommu_faults: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BlockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            requests: get(&self.requests),
            read_bytes: get(&self.read_bytes),
            written_bytes: get(&self.written_bytes),
            flushes: get(&self.flushes),
            errors: get(&self.errors),
            unsupported: get(&self.unsupported),
            iommu_faults: get(&self.iommu_faults),
        }
    }
}

/// A handle on a device's counters, readable from any thread while the
/// transport owns the device.
#[derive(Debug, Clone)]
pub struct BlockStatsHandle(Arc<Counters>);

impl BlockStatsHandle {
    /// The counters now.
    pub fn get(&self) -> BlockStats {
        self.0.snapshot()
    }
}

/// Why a request is answered with an error status rather than carried out.
#[derive(Debug)]
enum Failure {
    /// The chain cannot carry a request.
    Shape(chain::ShapeError),
    /// The request is refused by the specification's rules.
    Refused(crate::request::Refusal),
    /// A buffer cannot be reached.
    Dma(DmaError),
    /// The image failed.
    Io(std::io::Error),
    /// A zero-copy transfer was refused (a buffer not pinned) or failed.
    ZeroCopy(TransferError),
    /// The zero-copy pinner's device failed to attach.
    Unattached(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape(e) => e.fmt(f),
            Self::Refused(e) => e.fmt(f),
            Self::Dma(e) => e.fmt(f),
            Self::Io(e) => write!(f, "image I/O failed: {e}"),
            Self::ZeroCopy(e) => write!(f, "zero-copy I/O failed: {e}"),
            Self::Unattached(e) => write!(f, "zero-copy I/O: the disk's DMA attachment failed: {e}"),
        }
    }
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Self::Refused(r) => r.status(),
            _ => S_IOERR,
        }
    }
}

/// Everything the request path needs besides the queue: the image, how
/// addresses resolve, the disk's rules, counters, and scratch space reused
/// from request to request.
struct Engine {
    backend: Box<dyn Backend>,
    dma: Dma,
    /// The pinner of the zero-copy path, if the disk has one, and the
    /// latch every transfer waits on (it blocks only until it opens).
    zero_copy: Option<(Arc<UringPinner>, AttachLatch)>,
    id: [u8; ID_BYTES],
    disk: Disk,
    counters: Arc<Counters>,
    /// The chain being handled (at most the queue size).
    descs: Vec<Desc>,
    /// Its resolved data buffers (at most [`dma::MAX_PIECES`]).
    pieces: Vec<Piece>,
    /// Its indirect descriptor table, if it has one (at most the queue
    /// size in descriptors).
    table: Vec<u8>,
}

impl Engine {
    /// Notes a resolution error (an IOMMU fault is counted).
    fn dma_failure(&self, e: DmaError) -> Failure {
        if e.is_fault() {
            Counters::add(&self.counters.iommu_faults, 1);
        }
        Failure::Dma(e)
    }

    /// Resolves bytes `[start, end)` of the readable or writable stream
    /// into `self.pieces` (cleared first).
    fn resolve_stream(&mut self, map: &GuestMemoryMap, writable: bool, start: u64, end: u64) -> Result<(), Failure> {
        let access = if writable { Access::Write } else { Access::Read };
        self.pieces.clear();
        let Self { dma, descs, pieces, .. } = self;
        let result = chain::for_each_part(descs, writable, start, end, |addr, len| {
            dma.resolve(map, addr, len, access, pieces)
        });
        result.map_err(|e| self.dma_failure(e))
    }

    /// Processes every request the driver made available on `queue`;
    /// `indirect`: `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    fn drain(
        &mut self,
        queue: &mut DeviceQueue,
        map: &GuestMemoryMap,
        interrupt: &dyn VirtioInterrupt,
        indirect: bool,
    ) -> Result<usize, Malformed> {
        let (table, size) = (queue.queue().desc_table(), queue.queue().size());
        let mut ring = DeviceRing::new(queue);
        let mut answered = 0;
        let result = loop {
            let head = match ring.pop() {
                Ok(Some(head)) => head,
                Ok(None) => break Ok(answered),
                Err(e) => break Err(e),
            };
            let Self {
                dma,
                pieces,
                table: buf,
                descs,
                counters,
                ..
            } = self;
            let mut load = |addr: u64, len: u32, buf: &mut Vec<u8>| {
                pieces.clear();
                buf.clear();
                buf.resize(len as usize, 0);
                dma.resolve(map, addr, u64::from(len), Access::Read, pieces)
                    .and_then(|()| dma::read_pieces(map, pieces, buf))
                    .map_err(|e| {
                        if e.is_fault() {
                            Counters::add(&counters.iommu_faults, 1);
                        }
                        Malformed::Queue(format!(
                            "the indirect table of chain {head} at {addr:#x} (+{len:#x}): {e}"
                        ))
                    })
            };
            let indirect = indirect.then_some(chain::Indirect { buf, load: &mut load });
            if let Err(e) = chain::read_chain(map, table, size, head, descs, indirect) {
                break Err(e);
            }
            let used = self.handle(map, head);
            if let Err(e) = ring.push_used(head, used) {
                break Err(e);
            }
            answered += 1;
        };
        if ring.finish()
            && let Err(e) = interrupt.trigger(InterruptKind::Queue(0))
        {
            log::warn!("{NAME}: queue interrupt failed: {e}");
        }
        result
    }

    /// Handles the chain in `self.descs` and returns its used length.
    fn handle(&mut self, map: &GuestMemoryMap, head: u16) -> u32 {
        let c = self.counters.clone();
        Counters::add(&c.requests, 1);
        let Some(status_addr) = chain::status_addr(&self.descs) else {
            log::debug!("{NAME}: chain {head} has no device-writable status byte; completed without status");
            Counters::add(&c.errors, 1);
            return 0;
        };
        self.pieces.clear();
        let resolved = self
            .dma
            .resolve(map, status_addr, 1, Access::Write, &mut self.pieces)
            .and_then(|()| {
                // One byte resolves to one piece, which must be populated
                // RAM before the request is carried out (it is checked
                // again, under the region's view, when it is written).
                let gpa = self.pieces.first().map(|p| p.gpa).ok_or(DmaError::NotRam {
                    addr: status_addr,
                    len: 1,
                })?;
                match GuestRange::new(gpa, 1) {
                    Some(r) if map.is_populated_ram(r) => Ok(gpa),
                    _ => Err(DmaError::NotPopulated { gpa, len: 1 }),
                }
            });
        let status_gpa = match resolved {
            Ok(gpa) => gpa,
            Err(e) => {
                let e = self.dma_failure(e);
                log::debug!("{NAME}: chain {head}: status byte at {status_addr:#x}: {e}; completed without status");
                Counters::add(&c.errors, 1);
                return 0;
            }
        };
        let (status, written) = match self.execute(map) {
            Ok(written) => (S_OK, written),
            Err(failure) => {
                log::debug!("{NAME}: chain {head}: {failure}");
                (failure.status(), 0)
            }
        };
        if !write_guest(map, GuestAddress(status_gpa), &[status]) {
            // Unplugged meanwhile: never write into discarded memory.
            Counters::add(&c.errors, 1);
            return 0;
        }
        match status {
            S_OK => {}
            S_UNSUPP => Counters::add(&c.unsupported, 1),
            _ => Counters::add(&c.errors, 1),
        }
        written + 1
    }

    /// Moves the data of `self.pieces` from (`Read`) or to the image at
    /// `offset`, with every managed region involved held populated: through
    /// the zero-copy pinner's registered buffers if the disk has one, with
    /// `preadv`/`pwritev` otherwise. Either way the kernel writes a read's
    /// buffers behind `vm-memory`'s back, so they are marked dirty here
    /// (zero-copy) or by the backend (`preadv`) once it is done — also
    /// after a failure, which may have filled part of them.
    fn transfer(&self, map: &GuestMemoryMap, offset: u64, dir: Transfer) -> Result<(), Failure> {
        let backend = &self.backend;
        let pieces = &self.pieces;
        match &self.zero_copy {
            Some((pinner, ready)) => {
                ready.wait().map_err(Failure::Unattached)?;
                dma::with_slices(map, pieces, |slices| {
                    let ranges: SmallVec<[(u64, u64); 16]> = pieces.iter().map(|p| (p.iova, p.len)).collect();
                    let result = pinner.transfer(backend.raw_fd(), offset, &ranges, dir);
                    if matches!(dir, Transfer::Read) {
                        for slice in slices {
                            slice.bitmap().mark_dirty(0, slice.len());
                        }
                    }
                    result
                })
                .map_err(Failure::Dma)?
                .map_err(Failure::ZeroCopy)
            }
            None => dma::with_slices(map, pieces, |bufs| match dir {
                Transfer::Read => backend.read_vectored_at(offset, bufs),
                Transfer::Write => backend.write_vectored_at(offset, bufs),
            })
            .map_err(Failure::Dma)?
            .map_err(Failure::Io),
        }
    }

    /// Checks and carries out the request; returns the data bytes written
    /// into device-writable buffers.
    fn execute(&mut self, map: &GuestMemoryMap) -> Result<u32, Failure> {
        let layout = chain::layout(&self.descs).map_err(Failure::Shape)?;
        let mut header = [0u8; OUTHDR_SIZE];
        self.resolve_stream(map, false, 0, OUTHDR_SIZE as u64)?;
        dma::read_pieces(map, &self.pieces, &mut header).map_err(Failure::Dma)?;
        let hdr = OutHdr::from_bytes(&header);
        let request =
            Request::parse(&hdr, layout.readable_data, layout.writable_data, &self.disk).map_err(Failure::Refused)?;
        let c = self.counters.clone();
        match request {
            Request::In { sector, len } => {
                self.resolve_stream(map, true, 0, u64::from(len))?;
                self.transfer(map, sector << SECTOR_SHIFT, Transfer::Read)?;
                Counters::add(&c.read_bytes, u64::from(len));
                Ok(len)
            }
            Request::Out { sector, len } => {
                let start = OUTHDR_SIZE as u64;
                self.resolve_stream(map, false, start, start + u64::from(len))?;
                self.transfer(map, sector << SECTOR_SHIFT, Transfer::Write)?;
                Counters::add(&c.written_bytes, u64::from(len));
                Ok(0)
            }
            Request::Flush => {
                if !self.disk.read_only {
                    self.backend.flush().map_err(Failure::Io)?;
                }
                Counters::add(&c.flushes, 1);
                Ok(0)
            }
            Request::GetId { len } => {
                self.resolve_stream(map, true, 0, u64::from(len))?;
                dma::write_pieces(map, &self.pieces, &self.id[..len as usize]).map_err(Failure::Dma)?;
                Ok(len)
            }
        }
    }
}

/// Where one queue's rings are, behind an IOMMU: the IOVAs the driver
/// wrote and the guest-physical addresses they translated to when the
/// device was activated (see [`VirtioBlk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RingTranslation {
    /// `(what, IOVA, length, access, guest-physical address)` of the
    /// descriptor table, the avail ring and the used ring.
    rings: [(&'static str, u64, u64, Access, u64); 3],
}

impl RingTranslation {
    /// Translates the rings of `queue`, which must be ready.
    fn translate(dma: &Dma, map: &GuestMemoryMap, queue: &Queue) -> Result<Self, String> {
        if !queue.ready() {
            return Err("not ready".into());
        }
        let n = u64::from(queue.size());
        // The same extents `DeviceQueue` resolves: event-index fields included.
        let areas = [
            ("descriptor table", queue.desc_table(), 16 * n, Access::Read),
            ("avail ring", queue.avail_ring(), 6 + 2 * n, Access::Read),
            ("used ring", queue.used_ring(), 6 + 8 * n, Access::Write),
        ];
        let mut rings = [("", 0, 0, Access::Read, 0); 3];
        for (slot, (what, iova, len, access)) in rings.iter_mut().zip(areas) {
            let gpa = dma
                .resolve_contiguous(map, iova, len, access)
                .map_err(|e| format!("{what} at IOVA {iova:#x} (+{len:#x}): {e}"))?;
            *slot = (what, iova, len, access, gpa);
        }
        Ok(Self { rings })
    }

    /// Points `queue` at the guest-physical addresses.
    fn apply(&self, queue: &mut Queue) -> Result<(), String> {
        let [(_, _, _, _, desc), (_, _, _, _, avail), (_, _, _, _, used)] = self.rings;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(used)))
            .map_err(|e| format!("translated ring addresses: {e:?}"))
    }

    /// Checks that the rings still translate to where they did.
    fn check(&self, dma: &Dma, map: &GuestMemoryMap) -> Result<(), String> {
        for &(what, iova, len, access, gpa) in &self.rings {
            match dma.resolve_contiguous(map, iova, len, access) {
                Ok(now) if now == gpa => {}
                Ok(now) => {
                    return Err(format!(
                        "{what} at IOVA {iova:#x} now translates to {now:#x}, not {gpa:#x}"
                    ));
                }
                Err(e) => return Err(format!("{what} at IOVA {iova:#x} (+{len:#x}): {e}")),
            }
        }
        Ok(())
    }
}

/// The virtio block device (virtio device ID 2): a raw image, one request
/// queue, IN, OUT, FLUSH and GET_ID.
///
/// Features: `VIRTIO_F_VERSION_1` (required), `VIRTIO_BLK_F_SIZE_MAX`,
/// `VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_BLK_SIZE`, `VIRTIO_BLK_F_FLUSH`,
/// `VIRTIO_BLK_F_RO` for a read-only disk, `VIRTIO_RING_F_INDIRECT_DESC`,
/// and `VIRTIO_F_ACCESS_PLATFORM` behind an IOMMU (required there). No
/// event index.
///
/// A request the specification refuses gets its status; a chain without
/// a writable status byte is completed with used length 0; a broken ring
/// (bad avail index, descriptor index past the queue, loop, a bad or
/// unreadable indirect table, ring memory unplugged) puts the device into
/// NEEDS_RESET.
///
/// # Behind an IOMMU
///
/// With `VIRTIO_F_ACCESS_PLATFORM` the ring addresses the driver writes
/// are IOVAs too (Linux allocates the rings with `dma_alloc_coherent`).
/// [`activate`](VirtioDevice::activate) translates each ring — the
/// descriptor table and avail ring for reading, the used ring for writing —
/// to one contiguous range of guest RAM, and refuses activation, naming the
/// ring and the fault, when one is not mapped (the IOMMU reports the
/// fault). Before every drain the device translates them again; if a ring
/// was unmapped or moved since, it enters NEEDS_RESET instead of touching
/// the old address. Every data buffer, header and status byte is
/// translated per request, so a buffer is never used after its mapping is
/// gone (beyond a request in flight while the guest unmaps it, as with
/// hardware).
pub struct VirtioBlk {
    common: VirtioCommon,
    engine: Engine,
    config: BlkConfig,
    /// Per queue, behind an IOMMU: where its rings were translated.
    rings: Vec<RingTranslation>,
}

impl fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("common", &self.common)
            .field("config", &self.config)
            .field("disk", &self.engine.disk)
            .field("iommu", &matches!(self.engine.dma, Dma::Iommu { .. }))
            .field("zero_copy", &self.engine.zero_copy.is_some())
            .finish()
    }
}

impl VirtioBlk {
    /// Opens the image, locks it (see [`lock_image`](Self::lock_image))
    /// and makes the device; errors name the image's path.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        Self::open(config, true)
    }

    /// [`new`](Self::new) without taking the image's lock: a migration's
    /// destination, whose source holds it until the switch-over, then
    /// [`lock_image`](Self::lock_image)s.
    pub fn new_unlocked(config: BlockConfig) -> Result<Self, BlockError> {
        Self::open(config, false)
    }

    /// Takes the image's advisory lock (exclusive, shared for a read-only
    /// disk), failing at once if another process holds a conflicting one.
    pub fn lock_image(&self) -> Result<(), BlockError> {
        Ok(self.engine.backend.set_lock(true)?)
    }

    /// Makes every write the guest was told is done durable (`fdatasync`
    /// of the image): a migration's source, before it hands the image
    /// over, so that a destination on another host sharing the image reads
    /// all of them.
    pub fn sync_image(&self) -> Result<(), BlockError> {
        Ok(self.engine.backend.sync()?)
    }

    /// Drops the image's lock (a migration's source, at the switch-over).
    pub fn release_image(&self) -> Result<(), BlockError> {
        Ok(self.engine.backend.set_lock(false)?)
    }

    fn open(config: BlockConfig, lock: bool) -> Result<Self, BlockError> {
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong { id: config.id });
        }
        let size = config.queue_size;
        if !size.is_power_of_two() || !(4..=32768).contains(&size) {
            return Err(BlockError::QueueSize(size));
        }
        let backend = RawFile::open(&config.path, config.read_only, lock)?;
        Ok(Self::with_backend(config, Box::new(backend)))
    }

    fn with_backend(config: BlockConfig, backend: Box<dyn Backend>) -> Self {
        let mut id = [0u8; ID_BYTES];
        id[..config.id.len()].copy_from_slice(config.id.as_bytes());
        let mut features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_INDIRECT_DESC;
        if config.read_only {
            features |= F_RO;
        }
        let dma = match config.iommu {
            Some((handle, endpoint)) => {
                features |= F_ACCESS_PLATFORM;
                Dma::Iommu { handle, endpoint }
            }
            None => Dma::Physical,
        };
        let zero_copy = config.zero_copy.map(|pinner| (pinner, config.zero_copy_ready));
        let capacity = backend.size() / SECTOR_SIZE;
        Self {
            common: VirtioCommon::new(NAME, features, vec![config.queue_size]),
            config: BlkConfig {
                capacity,
                size_max: SIZE_MAX,
                seg_max: MAX_SEGMENTS.min(u32::from(config.queue_size) - 2),
                blk_size: SECTOR_SIZE as u32,
            },
            engine: Engine {
                backend,
                dma,
                zero_copy,
                id,
                disk: Disk {
                    capacity,
                    read_only: config.read_only,
                    max_data: MAX_REQUEST_BYTES,
                },
                counters: Arc::default(),
                descs: Vec::new(),
                pieces: Vec::new(),
                table: Vec::new(),
            },
            rings: Vec::new(),
        }
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    /// The configuration space the driver reads.
    pub fn config_space(&self) -> BlkConfig {
        self.config
    }

    /// True while activated (even in NEEDS_RESET).
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    /// The counters now.
    pub fn stats(&self) -> BlockStats {
        self.engine.counters.snapshot()
    }

    /// A handle on the counters for the VMM, readable from any thread.
    pub fn stats_handle(&self) -> BlockStatsHandle {
        BlockStatsHandle(self.engine.counters.clone())
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.common.avail_features()
    }

    fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.common.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(&self.config.to_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not
        // offered; a guest can do this at will, so no warning.
        log::debug!(
            "{NAME}: ignoring a {}-byte write to read-only config offset {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let device = NAME;
        // The common checks first, so that nothing is translated (and no
        // fault reported) for an activation that fails anyway.
        if self.common.is_active() {
            return Err(ActivateError::AlreadyActive { device });
        }
        if !self.common.has_feature(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::MissingFeature {
                device,
                feature: "VIRTIO_F_VERSION_1",
                bit: VIRTIO_F_VERSION_1.trailing_zeros(),
            });
        }
        let expected = self.common.queue_max_sizes().len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                device,
                expected,
                got: queues.len(),
            });
        }
        let mut rings = Vec::new();
        if matches!(self.engine.dma, Dma::Iommu { .. }) {
            if !self.common.has_feature(F_ACCESS_PLATFORM) {
                return Err(ActivateError::MissingFeature {
                    device,
                    feature: "VIRTIO_F_ACCESS_PLATFORM",
                    bit: F_ACCESS_PLATFORM.trailing_zeros(),
                });
            }
            for (index, queue) in queues.iter_mut().enumerate() {
                let invalid = |reason| ActivateError::InvalidQueue { device, index, reason };
                let t = RingTranslation::translate(&self.engine.dma, &mem, queue).map_err(invalid)?;
                t.apply(queue).map_err(invalid)?;
                rings.push(t);
            }
        }
        self.common.activate(mem, interrupt, queues)?;
        self.rings = rings;
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if index != 0 {
            log::debug!("{NAME}: notify of queue {index}, which does not exist; ignored");
            return;
        }
        let Self {
            common, engine, rings, ..
        } = self;
        let Some(Active { mem, .. }) = common.active_mut() else {
            return;
        };
        // Behind an IOMMU: are the rings still where they were?
        if let Some(why) = rings.iter().find_map(|r| r.check(&engine.dma, mem).err()) {
            common.set_needs_reset(&why);
            return;
        }
        let indirect = common.has_feature(F_INDIRECT_DESC);
        let Some(Active { mem, interrupt, queues }) = common.active_mut() else {
            return;
        };
        let Some(queue) = queues.first_mut() else {
            return;
        };
        if let Err(malformed) = engine.drain(queue, mem, interrupt.as_ref(), indirect) {
            common.set_needs_reset(&malformed);
        }
    }

    fn queue_indices(&self) -> Vec<memvisor_virtio::QueueIndices> {
        self.common.queue_indices()
    }

    fn reset(&mut self) {
        self.common.reset();
        self.rings.clear();
    }

    fn needs_reset(&self) -> bool {
        self.common.needs_reset()
    }

    fn observe_needs_reset(&mut self, observer: memvisor_virtio::NeedsResetObserver) {
        self.common.observe_needs_reset(observer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_and_config_follow_the_options() {
        let path = std::env::temp_dir().join(format!("memvisor-blk-device-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8 * 512]).unwrap();
        let mut config = BlockConfig::new(&path);
        config.read_only = true;
        config.queue_size = 64;
        let dev = VirtioBlk::new(config.clone()).unwrap();
        assert_eq!(dev.device_type(), 2);
        assert_eq!(dev.queue_max_sizes(), [64]);
        assert_eq!(
            dev.avail_features(),
            VIRTIO_F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_INDIRECT_DESC | F_RO
        );
        assert_eq!(
            dev.config_space(),
            BlkConfig {
                capacity: 8,
                size_max: 1 << 20,
                seg_max: 62,
                blk_size: 512
            }
        );
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        drop(dev);

        config.queue_size = 48;
        assert!(matches!(VirtioBlk::new(config.clone()), Err(BlockError::QueueSize(48))));
        config.queue_size = 2;
        assert!(matches!(VirtioBlk::new(config.clone()), Err(BlockError::QueueSize(2))));
        config.queue_size = 256;
        config.id = "x".repeat(21);
        let err = VirtioBlk::new(config.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("virtio-blk serial {:?} is 21 bytes long, at most 20 fit", config.id)
        );
        config.id = "x".repeat(20);
        assert_eq!(VirtioBlk::new(config).unwrap().config_space().seg_max, 128);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn syncing_the_image_names_it_when_the_kernel_cannot() {
        let path = std::env::temp_dir().join(format!("memvisor-blk-sync-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8 * 512]).unwrap();
        VirtioBlk::new(BlockConfig::new(&path)).unwrap().sync_image().unwrap();
        std::fs::remove_file(&path).unwrap();
        // A character device has nothing to synchronize: fdatasync fails
        // (EINVAL), and the error says which image.
        let null = VirtioBlk::new_unlocked(BlockConfig::new("/dev/null")).unwrap();
        let err = null.sync_image().unwrap_err();
        assert!(
            matches!(&err, BlockError::Image(ImageError::Sync { path, source })
                if path.as_os_str() == "/dev/null" && source.raw_os_error() == Some(libc::EINVAL)),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "virtio-blk image /dev/null: fdatasync: {}",
                std::io::Error::from_raw_os_error(libc::EINVAL)
            )
        );
    }
}
