//! The device-managed memory region: the shareable half of virtio-mem.
//!
//! [`VirtioMemRegion`] owns everything about the memory — the
//! [`RamBlock`] behind it, its geometry, the block states (a
//! [`BlockDiscardManager`]), the requested and usable sizes and the
//! migration-running flag — and is the region's [`RamDiscardManager`].
//! It lives in an `Arc` shared by the [`VirtioMem`](crate::VirtioMem)
//! device (which applies the guest's requests to it), the memory map
//! (`GuestMemoryMapBuilder::managed_ram`), the DMA layer (which queries it
//! from its own threads) and management (which resizes it).
//!
//! # Locks
//!
//! The block-state lock of the [`BlockDiscardManager`] comes first: a
//! request validates and changes the blocks under one write guard, so no
//! other thread sees a half-applied request (DESIGN.md rule 3). The sizes
//! have their own small mutex, always taken after the block-state lock and
//! never held while taking it. Listener callbacks run under the block-state
//! write lock and must not call back into the region.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_memory::discard::{
    BlockDiscardManager, DiscardWriter, ListenerId, PopulatedView, RamDiscardListener, RamDiscardManager, RegisterError,
};
use memvisor_memory::{GuestRange, RamBlock, RamBlockError};
use memvisor_virtio::interrupt::{InterruptKind, VirtioInterrupt};

use crate::wire::{DEFAULT_BLOCK_SIZE, MIN_BLOCK_SIZE, USABLE_EXTENT, VirtioMemConfig};

/// How to build a [`VirtioMemRegion`]. The region's size is the size of
/// the [`RamBlock`] given to [`VirtioMemRegion::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioMemOptions {
    /// Guest-physical start of the region; a multiple of the block size.
    pub addr: u64,
    /// Block size: a power of two, at least 1 MiB and at least the
    /// backing's page size. `None` picks 2 MiB, or the backing's page size
    /// if that is larger (a hugetlb backing).
    pub block_size: Option<u64>,
    /// Bytes the device asks the guest to plug at start; a multiple of the
    /// block size, at most the region size.
    pub requested_size: u64,
    /// The ACPI proximity domain, offered with `VIRTIO_MEM_F_ACPI_PXM`;
    /// `None` offers neither the feature nor a meaningful `node_id`.
    pub node_id: Option<u16>,
    /// Preallocate blocks when they are plugged ([`RamBlock::populate`]);
    /// a failure answers the plug with BUSY.
    pub prealloc: bool,
    /// Offer `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` (the default). A driver
    /// that does not accept it cannot activate the device.
    pub unplugged_inaccessible: bool,
}

impl Default for VirtioMemOptions {
    fn default() -> Self {
        Self {
            addr: 0,
            block_size: None,
            requested_size: 0,
            node_id: None,
            prealloc: false,
            unplugged_inaccessible: true,
        }
    }
}

impl VirtioMemOptions {
    /// The defaults, for a region at `addr`.
    pub fn new(addr: u64) -> Self {
        Self {
            addr,
            ..Self::default()
        }
    }
}

/// Errors of building and managing a [`VirtioMemRegion`]. Every variant
/// names the values involved, in hex.
#[derive(Debug, thiserror::Error)]
pub enum VirtioMemError {
    /// The block size is not a power of two.
    #[error("virtio-mem: block size {0:#x} is not a power of two")]
    BlockSizeNotPowerOfTwo(u64),
    /// The block size is below the minimum of 1 MiB.
    #[error("virtio-mem: block size {block_size:#x} is below the minimum {min:#x}")]
    BlockSizeTooSmall {
        /// The block size.
        block_size: u64,
        /// The minimum.
        min: u64,
    },
    /// The block size is below the backing's page size.
    #[error("virtio-mem: block size {block_size:#x} is below the page size {page_size:#x} of RAM block '{block}'")]
    BlockSizeBelowPageSize {
        /// The block size.
        block_size: u64,
        /// The backing's page size.
        page_size: u64,
        /// The RAM block's name.
        block: String,
    },
    /// A value that must be a multiple of the block size is not.
    #[error("virtio-mem: {what} {value:#x} is not a multiple of the block size {block_size:#x}")]
    NotBlockMultiple {
        /// Which value: "address", "region size" or "requested size".
        what: &'static str,
        /// The value.
        value: u64,
        /// The block size.
        block_size: u64,
    },
    /// The region would wrap around the guest-physical address space.
    #[error("virtio-mem: region at {addr:#x} of {size:#x} bytes wraps around the address space")]
    RegionWraps {
        /// Start address.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// The requested size exceeds the region.
    #[error("virtio-mem: requested size {requested:#x} exceeds the region size {region_size:#x}")]
    RequestedTooLarge {
        /// The requested size.
        requested: u64,
        /// The region size.
        region_size: u64,
    },
    /// A migration is running, so the blocks cannot change now.
    #[error("virtio-mem: a migration is running; {plugged:#x} bytes stay plugged")]
    MigrationRunning {
        /// Bytes plugged.
        plugged: u64,
    },
    /// A migration (or snapshot) is saving the device, so its requested
    /// size cannot change now.
    #[error(
        "virtio-mem: a migration or snapshot is saving the device; requested size {requested:#x} refused, it stays {current:#x}"
    )]
    ResizeWhileMigrating {
        /// The size asked for.
        requested: u64,
        /// The requested size that stays.
        current: u64,
    },
    /// Discarding the whole block at construction failed.
    #[error("virtio-mem: cannot discard the region's memory: {0}")]
    Discard(#[source] RamBlockError),
}

/// A snapshot of the sizes, sent to [`VirtioMemRegion::subscribe`]rs
/// whenever any of them changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeEvent {
    /// Bytes plugged.
    pub plugged_size: u64,
    /// Bytes requested.
    pub requested_size: u64,
    /// Size of the usable region.
    pub usable_region_size: u64,
}

/// The usable region for `requested` bytes in a region of `region_size`
/// bytes cut in `block_size` blocks: `min(region_size, requested + 256
/// MiB)` rounded up to the block size, and 0 when nothing is requested
/// (QEMU's rule on x86).
pub fn usable_region_size_for(region_size: u64, block_size: u64, requested: u64) -> u64 {
    if requested == 0 {
        return 0;
    }
    let size = region_size.min(requested.saturating_add(USABLE_EXTENT));
    // region_size is a block multiple, so rounding up stays inside it.
    size.div_ceil(block_size).saturating_mul(block_size).min(region_size)
}

/// Sizes under their own mutex (the plugged size is the bitmap's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) requested: u64,
    pub(crate) usable: u64,
}

/// Logs a warning the guest can provoke at will: the first few, then one
/// in a thousand.
pub(crate) fn warn_limited(counter: &AtomicU64, message: fmt::Arguments<'_>) {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    if n < 8 || n % 1000 == 0 {
        log::warn!("virtio-mem: {message} (occurrence {})", n + 1);
    }
}

/// The device-managed memory region of a virtio-mem device, and its
/// [`RamDiscardManager`]. See the [module documentation](self).
pub struct VirtioMemRegion {
    pub(crate) block: Arc<RamBlock>,
    pub(crate) addr: u64,
    pub(crate) block_size: u64,
    pub(crate) node_id: Option<u16>,
    pub(crate) prealloc: bool,
    pub(crate) unplugged_inaccessible: bool,
    pub(crate) manager: BlockDiscardManager,
    pub(crate) sizes: Mutex<Sizes>,
    migration_running: AtomicBool,
    subscribers: Mutex<Vec<Sender<SizeEvent>>>,
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    pub(crate) warnings: AtomicU64,
}

impl fmt::Debug for VirtioMemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes = *self.lock_sizes();
        f.debug_struct("VirtioMemRegion")
            .field("block", &self.block.name())
            .field("region", &self.manager.region())
            .field("block_size", &format_args!("{:#x}", self.block_size))
            .field("requested_size", &format_args!("{:#x}", sizes.requested))
            .field("usable_region_size", &format_args!("{:#x}", sizes.usable))
            .field("migration_running", &self.migration_running())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl VirtioMemRegion {
    /// A region over the whole of `block`, at `options.addr`, with every
    /// block unplugged (the backing memory is discarded, so a reused memfd
    /// starts clean) and the usable region sized for
    /// `options.requested_size`.
    ///
    /// # Errors
    ///
    /// A block size that is not a power of two, below 1 MiB or below the
    /// backing's page size; an address, region size or requested size that
    /// is not a multiple of the block size; a requested size above the
    /// region size; a region that wraps; a failing discard.
    pub fn new(block: Arc<RamBlock>, options: VirtioMemOptions) -> Result<Arc<Self>, VirtioMemError> {
        let page_size = block.page_size();
        let block_size = options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE.max(page_size));
        if !block_size.is_power_of_two() {
            return Err(VirtioMemError::BlockSizeNotPowerOfTwo(block_size));
        }
        if block_size < MIN_BLOCK_SIZE {
            return Err(VirtioMemError::BlockSizeTooSmall {
                block_size,
                min: MIN_BLOCK_SIZE,
            });
        }
        if block_size < page_size {
            return Err(VirtioMemError::BlockSizeBelowPageSize {
                block_size,
                page_size,
                block: block.name().to_string(),
            });
        }
        let region_size = block.size();
        for (what, value) in [
            ("address", options.addr),
            ("region size", region_size),
            ("requested size", options.requested_size),
        ] {
            if value % block_size != 0 {
                return Err(VirtioMemError::NotBlockMultiple {
                    what,
                    value,
                    block_size,
                });
            }
        }
        if options.requested_size > region_size {
            return Err(VirtioMemError::RequestedTooLarge {
                requested: options.requested_size,
                region_size,
            });
        }
        let wraps = VirtioMemError::RegionWraps {
            addr: options.addr,
            size: region_size,
        };
        let region = GuestRange::new(options.addr, region_size).ok_or(wraps)?;
        // The checks above leave nothing for the manager to refuse except a
        // bitmap too large for usize, which is a wrap in all but name.
        let manager = BlockDiscardManager::new(region, block_size).map_err(|_| VirtioMemError::RegionWraps {
            addr: options.addr,
            size: region_size,
        })?;
        block.discard(0, region_size).map_err(VirtioMemError::Discard)?;
        let usable = usable_region_size_for(region_size, block_size, options.requested_size);
        Ok(Arc::new(Self {
            block,
            addr: options.addr,
            block_size,
            node_id: options.node_id,
            prealloc: options.prealloc,
            unplugged_inaccessible: options.unplugged_inaccessible,
            manager,
            sizes: Mutex::new(Sizes {
                requested: options.requested_size,
                usable,
            }),
            migration_running: AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            interrupt: Mutex::new(None),
            warnings: AtomicU64::new(0),
        }))
    }

    /// The RAM block behind the region.
    pub fn block(&self) -> &Arc<RamBlock> {
        &self.block
    }

    /// Guest-physical start of the region.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size of the region in bytes (the RAM block's size).
    pub fn region_size(&self) -> u64 {
        self.block.size()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks in the region.
    pub fn nb_blocks(&self) -> usize {
        (self.region_size() / self.block_size) as usize
    }

    /// The ACPI proximity domain, if one was configured.
    pub fn node_id(&self) -> Option<u16> {
        self.node_id
    }

    /// True if plugged blocks are preallocated.
    pub fn prealloc(&self) -> bool {
        self.prealloc
    }

    /// True if `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` is offered.
    pub fn unplugged_inaccessible(&self) -> bool {
        self.unplugged_inaccessible
    }

    pub(crate) fn lock_sizes(&self) -> MutexGuard<'_, Sizes> {
        lock(&self.sizes)
    }

    /// Bytes plugged (derived from the block states).
    pub fn plugged_size(&self) -> u64 {
        self.manager.populated().populated_bytes()
    }

    /// Bytes the device asks the guest to plug.
    pub fn requested_size(&self) -> u64 {
        self.lock_sizes().requested
    }

    /// Size of the usable part of the region, from its start.
    pub fn usable_region_size(&self) -> u64 {
        self.lock_sizes().usable
    }

    /// The configuration space as the driver sees it now, consistent in
    /// itself (read under the block-state lock).
    pub fn config(&self) -> VirtioMemConfig {
        let view = self.manager.populated();
        let sizes = *self.lock_sizes();
        VirtioMemConfig {
            block_size: self.block_size,
            node_id: self.node_id.unwrap_or(0),
            addr: self.addr,
            region_size: self.region_size(),
            usable_region_size: sizes.usable,
            plugged_size: view.populated_bytes(),
            requested_size: sizes.requested,
        }
    }

    /// Asks the guest to plug `bytes` in total: a multiple of the block
    /// size, at most the region size. The usable region grows to fit (it
    /// never shrinks here), and the driver gets a configuration interrupt
    /// if `requested_size` changed. Allowed while a migration runs (the
    /// guest's plugs are answered BUSY until it ends).
    pub fn set_requested_size(&self, bytes: u64) -> Result<(), VirtioMemError> {
        if bytes % self.block_size != 0 {
            return Err(VirtioMemError::NotBlockMultiple {
                what: "requested size",
                value: bytes,
                block_size: self.block_size,
            });
        }
        if bytes > self.region_size() {
            return Err(VirtioMemError::RequestedTooLarge {
                requested: bytes,
                region_size: self.region_size(),
            });
        }
        let changed = {
            let mut sizes = self.lock_sizes();
            // Under the sizes lock: a save reads them under it after setting the flag.
            if self.migration_running() && sizes.requested != bytes {
                return Err(VirtioMemError::ResizeWhileMigrating {
                    requested: bytes,
                    current: sizes.requested,
                });
            }
            if sizes.requested == bytes {
                false
            } else {
                self.resize_usable(&mut sizes, bytes, false);
                sizes.requested = bytes;
                true
            }
        };
        if changed {
            self.signal_config();
            self.emit(self.plugged_size());
        }
        Ok(())
    }

    /// Recomputes the usable region for `requested`; it shrinks only if
    /// `can_shrink` (UNPLUG_ALL, system reset). Returns true if it changed.
    pub(crate) fn resize_usable(&self, sizes: &mut Sizes, requested: u64, can_shrink: bool) -> bool {
        let new = usable_region_size_for(self.region_size(), self.block_size, requested);
        if new == sizes.usable || (new < sizes.usable && !can_shrink) {
            return false;
        }
        sizes.usable = new;
        true
    }

    /// A receiver of a [`SizeEvent`] whenever the plugged, requested or
    /// usable size changes. Dropping the receiver unsubscribes.
    pub fn subscribe(&self) -> Receiver<SizeEvent> {
        let (tx, rx) = mpsc::channel();
        lock(&self.subscribers).push(tx);
        rx
    }

    /// Sends the current sizes to every subscriber, given the plugged size.
    pub(crate) fn emit(&self, plugged_size: u64) {
        let sizes = *self.lock_sizes();
        let event = SizeEvent {
            plugged_size,
            requested_size: sizes.requested,
            usable_region_size: sizes.usable,
        };
        lock(&self.subscribers).retain(|tx| tx.send(event).is_ok());
    }

    /// Marks a migration as running (`true`) or finished (`false`). While
    /// one runs, PLUG, UNPLUG and UNPLUG_ALL (with memory plugged) are
    /// answered BUSY and a system reset leaves the blocks alone, so the
    /// block states the migration stream carries stay true. STATE is still
    /// answered.
    pub fn set_migration_running(&self, running: bool) {
        self.migration_running.store(running, Ordering::SeqCst);
    }

    /// True while a migration runs; see [`Self::set_migration_running`].
    pub fn migration_running(&self) -> bool {
        self.migration_running.load(Ordering::SeqCst)
    }

    /// The interrupt the device signals configuration changes on; set by
    /// the device at activation, cleared at reset.
    pub(crate) fn set_interrupt(&self, interrupt: Option<Arc<dyn VirtioInterrupt>>) {
        *lock(&self.interrupt) = interrupt;
    }

    /// Sends a configuration-change interrupt, if a driver is attached.
    pub(crate) fn signal_config(&self) {
        if let Some(interrupt) = lock(&self.interrupt).as_ref()
            && let Err(e) = interrupt.trigger(InterruptKind::Config)
        {
            log::warn!("virtio-mem: config interrupt failed: {e}");
        }
    }

    /// The offset of `range` inside the RAM block.
    fn block_offset(&self, range: GuestRange) -> u64 {
        range.start() - self.addr
    }

    /// Returns the memory behind `range` to the host. A failure (which
    /// valid block ranges cannot cause) is logged: the blocks are unplugged
    /// either way.
    pub(crate) fn discard_backing(&self, range: GuestRange) {
        if let Err(e) = self.block.discard(self.block_offset(range), range.len()) {
            log::error!("virtio-mem: discarding {range} failed: {e}");
        }
    }

    /// Preallocates the memory behind `range`.
    pub(crate) fn populate_backing(&self, range: GuestRange) -> Result<(), RamBlockError> {
        self.block.populate(self.block_offset(range), range.len())
    }

    /// A system reset (machine reset): every block is unplugged — listeners
    /// are told, vetoes are overridden (logged), the memory is discarded —
    /// and the usable region is recomputed from the current requested size
    /// (it may shrink). The driver gets a configuration interrupt if the
    /// usable region changed and a driver is still attached.
    ///
    /// Unlike a device reset, which changes no block state.
    ///
    /// # Errors
    ///
    /// [`VirtioMemError::MigrationRunning`] if memory is plugged while a
    /// migration runs (QEMU's behaviour): nothing changes, and the guest's
    /// driver is expected to send UNPLUG_ALL once it starts.
    pub fn system_reset(&self) -> Result<(), VirtioMemError> {
        let mut writer = self.manager.write();
        let plugged = writer.populated_bytes();
        if plugged > 0 {
            if self.migration_running() {
                return Err(VirtioMemError::MigrationRunning { plugged });
            }
            let whole = self.manager.region();
            if let Err(veto) = writer.unplug(whole, true, |r| self.discard_backing(r)) {
                // Unreachable with force, but never leave a block plugged
                // behind a reset silently.
                log::error!("virtio-mem: system reset: {veto}");
            }
        }
        self.finish_unplug_all(writer);
        Ok(())
    }

    /// After everything was unplugged (UNPLUG_ALL or a system reset): the
    /// usable region is recomputed from the requested size — the only
    /// times it may shrink — and the change is announced.
    pub(crate) fn finish_unplug_all(&self, writer: DiscardWriter<'_>) {
        let plugged = writer.populated_bytes();
        let resized = {
            let mut sizes = self.lock_sizes();
            let requested = sizes.requested;
            self.resize_usable(&mut sizes, requested, true)
        };
        drop(writer);
        // The specification exempts UNPLUG_ALL from the notification, but
        // allows one; it is sent so that every change of the usable region
        // is announced the same way.
        if resized {
            self.signal_config();
        }
        self.emit(plugged);
    }
}

impl RamDiscardManager for VirtioMemRegion {
    fn granularity(&self) -> u64 {
        self.manager.granularity()
    }

    fn region(&self) -> GuestRange {
        self.manager.region()
    }

    fn populated(&self) -> PopulatedView<'_> {
        self.manager.populated()
    }

    fn register_listener(
        &self,
        listener: Arc<dyn RamDiscardListener>,
        range: GuestRange,
    ) -> Result<ListenerId, RegisterError> {
        self.manager.register_listener(listener, range)
    }

    fn unregister_listener(&self, id: ListenerId) -> bool {
        self.manager.unregister_listener(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_memory::Backing;

    const MIB: u64 = 1 << 20;

    fn block(size: u64) -> Arc<RamBlock> {
        Arc::new(RamBlock::new("vmem", size, Backing::Memfd).unwrap())
    }

    fn build(size: u64, options: VirtioMemOptions) -> Result<Arc<VirtioMemRegion>, VirtioMemError> {
        VirtioMemRegion::new(block(size), options)
    }

    #[test]
    fn construction_errors_name_the_values() {
        let base = VirtioMemOptions::new(0x1_0000_0000);
        let err = |size, o| build(size, o).unwrap_err().to_string();
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    block_size: Some(3 * MIB),
                    ..base.clone()
                }
            ),
            "virtio-mem: block size 0x300000 is not a power of two"
        );
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    block_size: Some(512 << 10),
                    ..base.clone()
                }
            ),
            "virtio-mem: block size 0x80000 is below the minimum 0x100000"
        );
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    addr: 0x1_0010_0000,
                    ..base.clone()
                }
            ),
            "virtio-mem: address 0x100100000 is not a multiple of the block size 0x200000"
        );
        assert_eq!(
            err(63 * MIB, base.clone()),
            "virtio-mem: region size 0x3f00000 is not a multiple of the block size 0x200000"
        );
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    requested_size: MIB,
                    ..base.clone()
                }
            ),
            "virtio-mem: requested size 0x100000 is not a multiple of the block size 0x200000"
        );
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    requested_size: 66 * MIB,
                    ..base.clone()
                }
            ),
            "virtio-mem: requested size 0x4200000 exceeds the region size 0x4000000"
        );
        assert_eq!(
            err(
                64 * MIB,
                VirtioMemOptions {
                    addr: 0xffff_ffff_fe00_0000,
                    ..base.clone()
                }
            ),
            "virtio-mem: region at 0xfffffffffe000000 of 0x4000000 bytes wraps around the address space"
        );
        let region = build(64 * MIB, base).unwrap();
        assert_eq!(region.block_size(), 2 * MIB, "default block size");
        assert_eq!(region.nb_blocks(), 32);
    }

    #[test]
    fn set_requested_size_is_validated() {
        let region = build(64 * MIB, VirtioMemOptions::new(0x1_0000_0000)).unwrap();
        assert_eq!(
            region.set_requested_size(3 * MIB).unwrap_err().to_string(),
            "virtio-mem: requested size 0x300000 is not a multiple of the block size 0x200000"
        );
        assert_eq!(
            region.set_requested_size(128 * MIB).unwrap_err().to_string(),
            "virtio-mem: requested size 0x8000000 exceeds the region size 0x4000000"
        );
        region.set_requested_size(64 * MIB).unwrap();
        assert_eq!(region.requested_size(), 64 * MIB);
        assert_eq!(region.usable_region_size(), 64 * MIB);
    }

    #[test]
    fn the_requested_size_stays_while_a_migration_saves_the_device() {
        let region = build(64 * MIB, VirtioMemOptions::new(0x1_0000_0000)).unwrap();
        region.set_requested_size(32 * MIB).unwrap();
        region.set_migration_running(true);
        assert_eq!(
            region.set_requested_size(16 * MIB).unwrap_err().to_string(),
            "virtio-mem: a migration or snapshot is saving the device; requested size 0x1000000 refused, it stays 0x2000000"
        );
        // Asking for what is already requested changes nothing and is not refused.
        region.set_requested_size(32 * MIB).unwrap();
        region.set_migration_running(false);
        region.set_requested_size(16 * MIB).unwrap();
        assert_eq!(region.requested_size(), 16 * MIB);
    }
}
