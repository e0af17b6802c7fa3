//! The guest-physical memory map: non-overlapping RAM regions, each a slice
//! of a [`RamBlock`], on top of `vm-memory`'s [`GuestMemoryMmap`] so that
//! `virtio-queue` reads and writes rings in it directly.
//!
//! Every region's mapping tracks the pages the VMM writes through it
//! ([`Region::take_dirty`], see [`crate::dirty`]).
//!
//! A region may carry a [`RamDiscardManager`] (a virtio-mem device's
//! region does); consumers that must not touch discarded memory look it up
//! with [`GuestMemoryMap::lookup`] and ask it.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, MemoryRegionAddress};

use crate::dirty::{DIRTY_PAGE_SIZE, DirtyBitmap, GuestSlice, PageSet};
use crate::discard::RamDiscardManager;
use crate::ram_block::RamBlock;
use crate::range::GuestRange;

/// `vm-memory`'s view of the map: its regions mark the VMM's writes in
/// their [`DirtyBitmap`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// One RAM region of the map.
#[derive(Clone)]
pub struct Region {
    range: GuestRange,
    block: Arc<RamBlock>,
    block_offset: u64,
    host_address: u64,
    manager: Option<Arc<dyn RamDiscardManager>>,
    /// The same region as `vm-memory` holds it (set by `build`).
    vm: Option<Arc<GuestRegionMmap>>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("range", &self.range)
            .field("block", &self.block.name())
            .field("block_offset", &format_args!("{:#x}", self.block_offset))
            .field("managed", &self.manager.is_some())
            .finish()
    }
}

impl Region {
    /// The guest-physical range the region covers.
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// The RAM block behind it.
    pub fn block(&self) -> &Arc<RamBlock> {
        &self.block
    }

    /// Offset of the region's first byte inside [`Region::block`].
    pub fn block_offset(&self) -> u64 {
        self.block_offset
    }

    /// Host address of the region's first byte.
    pub fn host_address(&self) -> u64 {
        self.host_address
    }

    /// The region's discard manager, if its memory can be discarded in a
    /// coordinated way (virtio-mem).
    #[inline]
    pub fn manager(&self) -> Option<&Arc<dyn RamDiscardManager>> {
        self.manager.as_ref()
    }

    /// `len` bytes of the region's memory from `offset` on, for volatile
    /// access; `None` if they are not all inside the region (or the region
    /// does not belong to a built map).
    #[inline]
    pub fn slice(&self, offset: u64, len: u64) -> Option<GuestSlice<'_>> {
        let end = offset.checked_add(len)?;
        if end > self.range.len() {
            return None;
        }
        self.vm
            .as_ref()?
            .get_slice(MemoryRegionAddress(offset), usize::try_from(len).ok()?)
            .ok()
    }

    /// The mapping's dirty bitmap (page 0 is the region's first page).
    #[inline]
    fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.vm.as_deref().map(|vm| {
            let mmap: &MmapRegion<DirtyBitmap> = vm;
            mmap.bitmap()
        })
    }

    /// Marks the pages of bytes `[offset, offset + len)` of the region
    /// dirty, for a write the VMM made without `vm-memory` (through a host
    /// pointer, or by the kernel on its behalf). Bytes past the region's
    /// end are ignored.
    #[inline]
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(bitmap) = self.dirty_bitmap() {
            // Pages by shift, not by `DirtyBitmap::mark_dirty`'s division
            // by its page size: rings are written through here on every
            // request.
            let first = offset / DIRTY_PAGE_SIZE;
            let last = (offset.saturating_add(len - 1) / DIRTY_PAGE_SIZE).min((bitmap.len() as u64).saturating_sub(1));
            for page in first..=last {
                bitmap.set_bit(page as usize);
            }
        }
    }

    /// The pages of the region the VMM wrote since the last call, through
    /// `vm-memory` or [`mark_dirty`](Self::mark_dirty), and clears them
    /// (word by word, atomically: a page written concurrently is in this
    /// set or in the next one). Page `i` is the 4 KiB page at byte offset
    /// `i * 4096` of the region. Guest (vCPU) writes are not in it: KVM
    /// logs those.
    ///
    /// A region that maps a *slice* of its block ([`GuestMemoryMapBuilder::ram_slice`])
    /// has a mapping, and so a bitmap, of its own: writes through the
    /// block's mapping ([`RamBlock::write`]) are not seen there.
    pub fn take_dirty(&self) -> PageSet {
        let pages = self.range.len().div_ceil(DIRTY_PAGE_SIZE);
        match self.dirty_bitmap() {
            Some(bitmap) => PageSet::from_words(&bitmap.get_and_reset(), pages),
            None => PageSet::new(pages),
        }
    }
}

/// A guest-physical range resolved to host memory by [`GuestMemoryMap::lookup`].
#[derive(Debug, Clone)]
pub struct HostRange<'a> {
    /// The region holding the whole range.
    pub region: &'a Region,
    /// The guest-physical range that was looked up.
    pub guest: GuestRange,
    /// Host address of its first byte.
    pub host_address: u64,
    /// Offset of its first byte inside the region's [`RamBlock`].
    pub block_offset: u64,
}

impl HostRange<'_> {
    /// The range's memory, for volatile access without any further lookup.
    pub fn slice(&self) -> GuestSlice<'_> {
        let offset = self.guest.start() - self.region.range.start();
        self.region
            .slice(offset, self.guest.len())
            .expect("a looked-up range lies inside its region")
    }
}

/// Errors of building or querying a [`GuestMemoryMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Two regions overlap.
    #[error("guest RAM region {new} overlaps region {existing}")]
    Overlap {
        /// The region being added.
        new: GuestRange,
        /// The region it overlaps.
        existing: GuestRange,
    },
    /// A region's slice does not fit its block.
    #[error("slice [{offset:#x}, +{len:#x}) does not fit RAM block '{block}' of {size:#x} bytes")]
    SliceOutOfBlock {
        /// The block's name.
        block: String,
        /// Offset of the slice.
        offset: u64,
        /// Length of the slice.
        len: u64,
        /// Size of the block.
        size: u64,
    },
    /// A partial slice of a block without a file (private anonymous memory).
    #[error("RAM block '{block}' has no file, so it can only be mapped whole (asked for [{offset:#x}, +{len:#x}))")]
    SliceOfAnonymousBlock {
        /// The block's name.
        block: String,
        /// Offset of the slice.
        offset: u64,
        /// Length of the slice.
        len: u64,
    },
    /// A region's guest range is empty or wraps.
    #[error("guest RAM region at {base:#x} of {len:#x} bytes is empty or wraps around the address space")]
    BadRange {
        /// Guest base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// A discard manager manages another range than its region.
    #[error("discard manager for {manager} does not match its region {region}")]
    ManagerMismatch {
        /// The manager's region.
        manager: GuestRange,
        /// The memory map region.
        region: GuestRange,
    },
    /// `vm-memory` refused a region.
    #[error("vm-memory refused region {range}: {reason}")]
    VmMemory {
        /// The region.
        range: GuestRange,
        /// What vm-memory said.
        reason: String,
    },
    /// Part of a looked-up range is not RAM.
    #[error("guest-physical range {0} is not RAM")]
    Hole(GuestRange),
    /// A looked-up range starts in one region and ends outside it.
    #[error("guest-physical range {range} crosses the end of RAM region {region}")]
    CrossesBoundary {
        /// The range looked up.
        range: GuestRange,
        /// The region it starts in.
        region: GuestRange,
    },
}

/// Collects regions for a [`GuestMemoryMap`].
#[derive(Default)]
pub struct GuestMemoryMapBuilder {
    regions: Vec<Region>,
}

impl fmt::Debug for GuestMemoryMapBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.regions).finish()
    }
}

impl GuestMemoryMapBuilder {
    /// Adds the whole of `block` at guest address `base`.
    pub fn ram(self, base: u64, block: Arc<RamBlock>) -> Result<Self, MapError> {
        let len = block.size();
        self.add(base, block, 0, len, None)
    }

    /// Adds `[offset, offset + len)` of `block` at guest address `base`.
    /// A partial slice needs a file-backed block (memfd or hugetlbfs).
    pub fn ram_slice(self, base: u64, block: Arc<RamBlock>, offset: u64, len: u64) -> Result<Self, MapError> {
        self.add(base, block, offset, len, None)
    }

    /// Adds the whole of `block` at `base`, managed by `manager`, whose
    /// [`RamDiscardManager::region`] must be exactly this region.
    pub fn managed_ram(
        self,
        base: u64,
        block: Arc<RamBlock>,
        manager: Arc<dyn RamDiscardManager>,
    ) -> Result<Self, MapError> {
        let len = block.size();
        self.add(base, block, 0, len, Some(manager))
    }

    fn add(
        mut self,
        base: u64,
        block: Arc<RamBlock>,
        offset: u64,
        len: u64,
        manager: Option<Arc<dyn RamDiscardManager>>,
    ) -> Result<Self, MapError> {
        let range = GuestRange::new(base, len)
            .filter(|r| !r.is_empty())
            .ok_or(MapError::BadRange { base, len })?;
        if offset.checked_add(len).is_none_or(|end| end > block.size()) {
            return Err(MapError::SliceOutOfBlock {
                block: block.name().to_string(),
                offset,
                len,
                size: block.size(),
            });
        }
        if let Some(existing) = self.regions.iter().find(|r| r.range.overlaps(&range)) {
            return Err(MapError::Overlap {
                new: range,
                existing: existing.range,
            });
        }
        if let Some(m) = &manager
            && m.region() != range
        {
            return Err(MapError::ManagerMismatch {
                manager: m.region(),
                region: range,
            });
        }
        self.regions.push(Region {
            range,
            block,
            block_offset: offset,
            host_address: 0,
            manager,
            vm: None,
        });
        Ok(self)
    }

    /// Builds the map; the `vm-memory` regions share the blocks' mappings
    /// (a whole block) or map the same memfd again (a slice).
    pub fn build(mut self) -> Result<GuestMemoryMap, MapError> {
        self.regions.sort_by_key(|r| r.range.start());
        let mut vm_regions = Vec::with_capacity(self.regions.len());
        for region in &mut self.regions {
            let vm_err = |reason: String| MapError::VmMemory {
                range: region.range,
                reason,
            };
            let mmap = if region.block_offset == 0 && region.range.len() == region.block.size() {
                region.block.mmap().clone()
            } else {
                let file = region.block.file().ok_or_else(|| MapError::SliceOfAnonymousBlock {
                    block: region.block.name().to_string(),
                    offset: region.block_offset,
                    len: region.range.len(),
                })?;
                let file = file.try_clone().map_err(|e| vm_err(e.to_string()))?;
                let len = region.range.len() as usize;
                let page = NonZeroUsize::new(DIRTY_PAGE_SIZE as usize).expect("4 KiB is not zero");
                let mmap = MmapRegionBuilder::new_with_bitmap(len, DirtyBitmap::new(len, page))
                    .with_file_offset(FileOffset::new(file, region.block_offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|e| vm_err(e.to_string()))?;
                Arc::new(mmap)
            };
            region.host_address = mmap.as_ptr() as u64;
            let vm_region = GuestRegionMmap::with_arc(mmap, GuestAddress(region.range.start()))
                .ok_or_else(|| vm_err("region wraps".into()))?;
            let vm_region = Arc::new(vm_region);
            region.vm = Some(vm_region.clone());
            vm_regions.push(vm_region);
        }
        let memory = GuestMemoryMmap::from_arc_regions(vm_regions).map_err(|e| MapError::VmMemory {
            range: GuestRange::default(),
            reason: e.to_string(),
        })?;
        Ok(GuestMemoryMap {
            inner: Arc::new(MapParts {
                memory,
                regions: self.regions,
            }),
        })
    }
}

struct MapParts {
    memory: GuestMemoryMmap,
    regions: Vec<Region>,
}

/// The guest-physical memory map. Cheap to clone (shared).
#[derive(Clone)]
pub struct GuestMemoryMap {
    inner: Arc<MapParts>,
}

impl fmt::Debug for GuestMemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.inner.regions).finish()
    }
}

impl GuestMemoryMap {
    /// Starts an empty map.
    pub fn builder() -> GuestMemoryMapBuilder {
        GuestMemoryMapBuilder::default()
    }

    /// The `vm-memory` view, for `virtio-queue` and for byte access.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.inner.memory
    }

    /// The regions, in ascending guest address order.
    pub fn regions(&self) -> &[Region] {
        &self.inner.regions
    }

    /// The region holding `addr`, if any.
    #[inline]
    pub fn region_at(&self, addr: u64) -> Option<&Region> {
        let regions = &self.inner.regions;
        let i = regions.partition_point(|r| r.range.end() <= addr);
        regions.get(i).filter(|r| r.range.start() <= addr)
    }

    /// The region holding every byte of the non-empty `range`, with its
    /// index in [`regions`](Self::regions): [`lookup`](Self::lookup)
    /// without building a [`HostRange`] or an error. Hot paths (a device's
    /// request and answer buffers) call it once per buffer and keep the
    /// index to find the region again without a search.
    #[inline]
    pub fn find(&self, range: GuestRange) -> Option<(usize, &Region)> {
        if range.is_empty() {
            return None;
        }
        let regions = &self.inner.regions;
        let i = regions.partition_point(|r| r.range.end() <= range.start());
        regions.get(i).filter(|r| r.range.contains(&range)).map(|r| (i, r))
    }

    /// Resolves `range` to host memory. Fails with [`MapError::Hole`] if
    /// its start is not RAM (or it is empty), and with
    /// [`MapError::CrossesBoundary`] if it starts in a region and ends
    /// outside it — even if the next region is adjacent, because the host
    /// mappings of two regions are not contiguous.
    pub fn lookup(&self, range: GuestRange) -> Result<HostRange<'_>, MapError> {
        let region = self
            .region_at(range.start())
            .filter(|_| !range.is_empty())
            .ok_or(MapError::Hole(range))?;
        if !region.range.contains(&range) {
            return Err(MapError::CrossesBoundary {
                range,
                region: region.range,
            });
        }
        let offset = range.start() - region.range.start();
        Ok(HostRange {
            region,
            guest: range,
            host_address: region.host_address + offset,
            block_offset: region.block_offset + offset,
        })
    }

    /// True if every byte of `range` is RAM that is populated now: plain
    /// regions always are, managed ones ask their manager. A caller that
    /// acts on the answer must hold the manager's
    /// [`populated`](RamDiscardManager::populated) view instead (rule 3).
    pub fn is_populated_ram(&self, range: GuestRange) -> bool {
        match self.lookup(range) {
            Ok(host) => host.region.manager().is_none_or(|m| m.is_populated(range)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discard::BlockDiscardManager;
    use crate::ram_block::Backing;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    fn block(name: &str, size: u64, backing: Backing) -> Arc<RamBlock> {
        Arc::new(RamBlock::new(name, size, backing).unwrap())
    }

    #[test]
    fn lookup_resolves_and_refuses_holes_and_crossings() {
        let a = block("a", 4 * MIB, Backing::Memfd);
        let b = block("b", 4 * MIB, Backing::Memfd);
        let map = GuestMemoryMap::builder()
            .ram(0, a.clone())
            .unwrap()
            .ram(4 * MIB, b.clone())
            .unwrap()
            .build()
            .unwrap();
        let r = |s, l| GuestRange::new(s, l).unwrap();
        let host = map.lookup(r(MIB, 4096)).unwrap();
        assert_eq!(host.host_address, a.host_address() + MIB);
        assert_eq!(host.block_offset, MIB);
        assert_eq!(map.lookup(r(5 * MIB, 1)).unwrap().host_address, b.host_address() + MIB);
        assert_eq!(
            map.lookup(r(4 * MIB - 1, 2)).unwrap_err(),
            MapError::CrossesBoundary {
                range: r(4 * MIB - 1, 2),
                region: r(0, 4 * MIB)
            }
        );
        assert_eq!(map.lookup(r(8 * MIB, 1)).unwrap_err(), MapError::Hole(r(8 * MIB, 1)));
        assert_eq!(map.lookup(r(0, 0)).unwrap_err(), MapError::Hole(r(0, 0)));
        assert!(map.lookup(r(7 * MIB, 2 * MIB)).is_err());
        assert!(map.region_at(u64::MAX - 1).is_none());
        // `find` succeeds exactly where `lookup` does, on the same region.
        for start in [0, MIB, 4 * MIB - 1, 4 * MIB, 8 * MIB - 1, 8 * MIB, 12 * MIB] {
            for len in [0, 1, 2, 4096, 4 * MIB, 5 * MIB] {
                let range = r(start, len);
                let found = map.find(range).map(|(i, region)| (i, region.range()));
                let looked_up = map.lookup(range).ok().map(|h| h.region.range());
                assert_eq!(found.map(|(_, region)| region), looked_up, "{range}");
                if let Some((i, region)) = found {
                    assert_eq!(map.regions()[i].range(), region);
                }
            }
        }
    }

    #[test]
    fn memory_is_shared_with_the_blocks() {
        let a = block("a", 2 * MIB, Backing::Memfd);
        let b = block("b", 8 * MIB, Backing::Memfd);
        let map = GuestMemoryMap::builder()
            .ram(0x10_0000, a.clone())
            .unwrap()
            // A slice maps the same memfd again: writes show through.
            .ram_slice(0x100_0000, b.clone(), 2 * MIB, 4 * MIB)
            .unwrap()
            .build()
            .unwrap();
        map.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x10_0010))
            .unwrap();
        // SAFETY: offset 0x10 is inside the 2 MiB mapping of `a`.
        let v = unsafe { std::ptr::read_volatile((a.host_address() + 0x10) as *const u32) };
        assert_eq!(v, 0xdead_beef);
        map.memory().write_obj(0x1234_u16, GuestAddress(0x100_0000)).unwrap();
        // SAFETY: 2 MiB is inside the 8 MiB mapping of `b`.
        let v = unsafe { std::ptr::read_volatile((b.host_address() + 2 * MIB) as *const u16) };
        assert_eq!(v, 0x1234);
        assert_eq!(map.memory().num_regions(), 2);
    }

    #[test]
    fn vmm_writes_mark_exactly_their_pages_until_taken() {
        let boot = block("boot", 2 * MIB, Backing::Memfd);
        let hot = block("hot", 4 * MIB, Backing::Memfd);
        let map = GuestMemoryMap::builder()
            .ram(0, boot.clone())
            .unwrap()
            .ram(0x1_0000_0000, hot.clone())
            .unwrap()
            .build()
            .unwrap();
        let runs = |region: &Region| region.take_dirty().runs().collect::<Vec<_>>();
        let (low, high) = (&map.regions()[0], &map.regions()[1]);
        assert!(low.take_dirty().is_empty() && high.take_dirty().is_empty());
        assert_eq!(high.take_dirty().pages(), 1024);

        // `Bytes` writes through the map: write_obj, and a write_slice
        // across a page boundary.
        map.memory().write_obj(7u64, GuestAddress(0x3008)).unwrap();
        map.memory()
            .write_slice(&[1; 16], GuestAddress(0x1_0000_0000 + 5 * 4096 - 8))
            .unwrap();
        assert_eq!(runs(low), vec![(3, 1)]);
        assert_eq!(runs(high), vec![(5 - 1, 2)]);
        assert!(low.take_dirty().is_empty() && high.take_dirty().is_empty());

        // Reads mark nothing.
        let _: u64 = map.memory().read_obj(GuestAddress(0x3008)).unwrap();
        let mut buf = [0u8; 4096];
        map.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(low.take_dirty().is_empty());

        // Slices: a copy, an atomic store; the block's own write.
        let slice = high.slice(MIB, 3 * 4096).unwrap();
        slice.copy_from(&[2u8; 4097]);
        slice
            .store(1u16, 3 * 4096 - 2, std::sync::atomic::Ordering::Relaxed)
            .unwrap();
        hot.write(3 * MIB, b"x").unwrap();
        assert_eq!(runs(high), vec![(256, 3), (768, 1)]);
        // A write outside the map's accessors, marked by hand (clipped to
        // the region).
        high.mark_dirty(4 * MIB - 1, 100);
        high.mark_dirty(0, 0);
        low.mark_dirty(4096, 2 * 4096 + 1);
        assert_eq!(runs(high), vec![(1023, 1)]);
        assert_eq!(runs(low), vec![(1, 3)]);
        assert!(low.take_dirty().is_empty() && high.take_dirty().is_empty());
    }

    #[test]
    fn a_slice_region_tracks_its_own_mapping() {
        let b = block("b", 8 * MIB, Backing::Memfd);
        let map = GuestMemoryMap::builder()
            .ram_slice(0, b.clone(), 2 * MIB, 4 * MIB)
            .unwrap()
            .build()
            .unwrap();
        let region = &map.regions()[0];
        map.memory().write_obj(1u8, GuestAddress(4096)).unwrap();
        let taken = region.take_dirty();
        assert_eq!((taken.pages(), taken.iter().collect::<Vec<_>>()), (1024, vec![1]));
        // The block's own mapping has a bitmap of its own.
        b.write(2 * MIB + 4096, b"y").unwrap();
        assert!(region.take_dirty().is_empty());
    }

    #[test]
    fn construction_errors_name_the_values() {
        let a = block("a", 4 * MIB, Backing::Memfd);
        let err = GuestMemoryMap::builder()
            .ram(0, a.clone())
            .unwrap()
            .ram(2 * MIB, a.clone())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest RAM region [0x200000, 0x600000) overlaps region [0x0, 0x400000)"
        );
        let err = GuestMemoryMap::builder()
            .ram_slice(0, a.clone(), 2 * MIB, 4 * MIB)
            .unwrap_err();
        assert!(err.to_string().contains("[0x200000, +0x400000)"), "{err}");
        let anon = block("anon", 4 * MIB, Backing::PrivateAnonymous);
        let err = GuestMemoryMap::builder()
            .ram_slice(0, anon, 0, 2 * MIB)
            .unwrap()
            .build()
            .unwrap_err();
        assert!(matches!(err, MapError::SliceOfAnonymousBlock { .. }), "{err}");
        let err = GuestMemoryMap::builder().ram(u64::MAX - MIB, a.clone()).unwrap_err();
        assert!(matches!(err, MapError::BadRange { .. }));
        let manager = Arc::new(BlockDiscardManager::new(GuestRange::new(0, 2 * MIB).unwrap(), 2 * MIB).unwrap());
        let err = GuestMemoryMap::builder().managed_ram(0, a, manager).unwrap_err();
        assert!(matches!(err, MapError::ManagerMismatch { .. }));
    }

    #[test]
    fn populated_ram_asks_the_manager() {
        let boot = block("boot", 2 * MIB, Backing::Memfd);
        let hot = block("hot", 8 * MIB, Backing::Memfd);
        let region = GuestRange::new(0x1_0000_0000, 8 * MIB).unwrap();
        let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, boot)
            .unwrap()
            .managed_ram(region.start(), hot, manager.clone())
            .unwrap()
            .build()
            .unwrap();
        let r = |s, l| GuestRange::new(s, l).unwrap();
        assert!(map.is_populated_ram(r(0, 2 * MIB)));
        assert!(!map.is_populated_ram(r(0, 2 * MIB + 1)));
        assert!(!map.is_populated_ram(r(region.start(), 4096)));
        manager
            .write()
            .plug(r(region.start(), 2 * MIB), || Ok::<_, ()>(()), |_| {})
            .unwrap();
        assert!(map.is_populated_ram(r(region.start(), 2 * MIB)));
        assert!(!map.is_populated_ram(r(region.start(), 2 * MIB + 4096)));
        assert!(map.lookup(r(region.start(), 1)).unwrap().region.manager().is_some());
    }
}
