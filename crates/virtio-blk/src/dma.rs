//! How the device reaches guest memory: the addresses in its descriptors
//! (and, behind an IOMMU, in its ring registers) resolved to pieces of
//! guest RAM, and the pieces accessed only while they are populated.
//!
//! * Without an IOMMU ([`Dma::Physical`]) an address is guest-physical: a
//!   buffer is split where it crosses from one RAM region to the next, and
//!   one that touches a hole is refused.
//! * Behind virtio-iommu ([`Dma::Iommu`]) an address is an IOVA of the
//!   device's endpoint: each piece is a [`translate`](IommuHandle::translate)
//!   with the access the device makes (read for device-readable buffers,
//!   write for device-writable ones), and a buffer spans as many
//!   translations as its mappings need. A fault is reported to the guest by
//!   the IOMMU itself, and the request is refused before anything is read
//!   or written.
//!
//! Resolution never touches memory. Access does, through [`with_slices`]:
//! it takes the populated view of every managed (virtio-mem) region the
//! pieces lie in — once per region, in ascending order — checks every
//! piece under it and holds it for the whole access, so no unplug can
//! discard a buffer while the device reads or writes it, and a buffer in
//! unplugged memory is refused untouched (DESIGN.md rules 3 and 7). It is
//! never called with the IOMMU lock held, nor does it call the IOMMU: the
//! lock order is *IOMMU → discard manager*.

use memvisor_memory::discard::PopulatedView;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{GuestRange, GuestSlice};
use memvisor_virtio_iommu::{Access, Fault, IommuHandle};
use smallvec::SmallVec;

/// Most pieces one request's data may resolve to (a 128 MiB transfer
/// mapped page by page needs 32768): a bound on what a request can make
/// the device allocate.
pub(crate) const MAX_PIECES: usize = 1 << 16;

/// How the device's addresses become guest-physical ones.
#[derive(Debug, Clone)]
pub(crate) enum Dma {
    /// Addresses are guest-physical.
    Physical,
    /// Addresses are IOVAs of `endpoint`, translated by the IOMMU.
    Iommu {
        /// The IOMMU.
        handle: IommuHandle,
        /// The device's endpoint ID.
        endpoint: u32,
    },
}

/// A resolved piece of a buffer: guest RAM inside one region, and the
/// device address it was reached through (the IOVA behind an IOMMU, the
/// guest-physical address itself otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    pub(crate) iova: u64,
}

/// Why a buffer cannot be accessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DmaError {
    /// The IOMMU refused the translation (and reported the fault).
    #[error("IOMMU fault: {0}")]
    Fault(Fault),
    /// The IOVA translates to MMIO, which the device cannot reach.
    #[error("IOVA {iova:#x} translates to MMIO")]
    Mmio {
        /// The IOVA.
        iova: u64,
    },
    /// Part of the buffer is not guest RAM.
    #[error("[{addr:#x}, +{len:#x}) is not guest RAM")]
    NotRam {
        /// Address of the part.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Part of the buffer is in unplugged (discarded) memory.
    #[error("guest memory [{gpa:#x}, +{len:#x}) is not populated")]
    NotPopulated {
        /// Guest-physical address of the part.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// The buffers need more than [`MAX_PIECES`] pieces.
    #[error("the buffers need more than {MAX_PIECES} pieces of guest memory")]
    Fragmented,
    /// A ring is not one contiguous piece of guest RAM.
    #[error("[{addr:#x}, +{len:#x}) is not contiguous guest RAM")]
    NotContiguous {
        /// Address of the ring.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

impl DmaError {
    /// True for an IOMMU fault.
    pub(crate) fn is_fault(&self) -> bool {
        matches!(self, Self::Fault(_))
    }
}

/// Appends `piece` to `out`, merged into the last piece when it continues
/// it inside the same region, at both its guest-physical and its device
/// address.
fn push(map: &GuestMemoryMap, out: &mut Vec<Piece>, piece: Piece) -> Result<(), DmaError> {
    if let Some(last) = out.last_mut()
        && last.gpa.checked_add(last.len) == Some(piece.gpa)
        && last.iova.checked_add(last.len) == Some(piece.iova)
        && GuestRange::new(last.gpa, last.len + piece.len).is_some_and(|r| map.lookup(r).is_ok())
    {
        last.len += piece.len;
        return Ok(());
    }
    if out.len() >= MAX_PIECES {
        return Err(DmaError::Fragmented);
    }
    out.push(piece);
    Ok(())
}

impl Dma {
    /// Resolves the buffer `[addr, +len)` for `access`, appending its
    /// pieces to `out`. Touches no memory; behind an IOMMU, a fault is
    /// reported by the IOMMU.
    pub(crate) fn resolve(
        &self,
        map: &GuestMemoryMap,
        addr: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Piece>,
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        let not_ram = DmaError::NotRam { addr, len };
        let range = GuestRange::new(addr, len).ok_or(not_ram.clone())?;
        match self {
            Self::Physical => {
                let mut at = range.start();
                while at < range.end() {
                    let region = map.region_at(at).ok_or(DmaError::NotRam {
                        addr: at,
                        len: range.end() - at,
                    })?;
                    let end = region.range().end().min(range.end());
                    push(
                        map,
                        out,
                        Piece {
                            gpa: at,
                            len: end - at,
                            iova: at,
                        },
                    )?;
                    at = end;
                }
            }
            Self::Iommu { handle, endpoint } => {
                let mut at = range.start();
                while at < range.end() {
                    let t = handle.translate(*endpoint, at, access).map_err(DmaError::Fault)?;
                    if t.mmio {
                        return Err(DmaError::Mmio { iova: at });
                    }
                    let n = t.len.min(range.end() - at);
                    // A translation to RAM stays inside one region; check
                    // it all the same rather than trust it.
                    let piece = GuestRange::new(t.gpa, n)
                        .filter(|r| n > 0 && map.lookup(*r).is_ok())
                        .ok_or(DmaError::NotRam { addr: t.gpa, len: n })?;
                    push(
                        map,
                        out,
                        Piece {
                            gpa: piece.start(),
                            len: n,
                            iova: at,
                        },
                    )?;
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// Resolves `[addr, +len)` (a ring) to one contiguous range of guest
    /// RAM inside one region, and returns its guest-physical start.
    pub(crate) fn resolve_contiguous(
        &self,
        map: &GuestMemoryMap,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<u64, DmaError> {
        let mut pieces = Vec::new();
        self.resolve(map, addr, len, access, &mut pieces)?;
        match pieces.as_slice() {
            [one] if one.len == len => Ok(one.gpa),
            _ => Err(DmaError::NotContiguous { addr, len }),
        }
    }
}

/// Runs `f` on the guest memory of `pieces`, in order, if every piece is
/// populated RAM now, holding the populated view of every managed region
/// involved until `f` returns (see the [module documentation](self)).
pub(crate) fn with_slices<R>(
    map: &GuestMemoryMap,
    pieces: &[Piece],
    f: impl FnOnce(&[GuestSlice<'_>]) -> R,
) -> Result<R, DmaError> {
    // The managed regions involved, by start address, each once.
    let mut managed: SmallVec<[u64; 4]> = SmallVec::new();
    for p in pieces {
        let region = map.region_at(p.gpa).ok_or(DmaError::NotRam {
            addr: p.gpa,
            len: p.len,
        })?;
        if region.manager().is_some() {
            managed.push(region.range().start());
        }
    }
    managed.sort_unstable();
    managed.dedup();
    let mut views: SmallVec<[(u64, PopulatedView<'_>); 4]> = SmallVec::new();
    for &start in &managed {
        if let Some(manager) = map.region_at(start).and_then(|r| r.manager()) {
            views.push((start, manager.populated()));
        }
    }
    let mut slices: SmallVec<[GuestSlice<'_>; 16]> = SmallVec::with_capacity(pieces.len());
    for p in pieces {
        let not_ram = DmaError::NotRam {
            addr: p.gpa,
            len: p.len,
        };
        let range = GuestRange::new(p.gpa, p.len).ok_or(not_ram.clone())?;
        let host = map.lookup(range).map_err(|_| not_ram.clone())?;
        let region = host.region;
        if let Some((_, view)) = views.iter().find(|(start, _)| *start == region.range().start())
            && !view.is_populated(range)
        {
            return Err(DmaError::NotPopulated { gpa: p.gpa, len: p.len });
        }
        let slice = region
            .slice(range.start() - region.range().start(), range.len())
            .ok_or(not_ram)?;
        slices.push(slice);
    }
    let result = f(&slices);
    drop(slices);
    drop(views);
    Ok(result)
}

/// Copies the guest memory of `pieces` into `buf` (as long as their total).
pub(crate) fn read_pieces(map: &GuestMemoryMap, pieces: &[Piece], buf: &mut [u8]) -> Result<(), DmaError> {
    with_slices(map, pieces, |slices| {
        let mut at = 0;
        for s in slices {
            at += s.copy_to(&mut buf[at..]);
        }
    })
}

/// Copies `data` into the guest memory of `pieces` (as long as their total).
pub(crate) fn write_pieces(map: &GuestMemoryMap, pieces: &[Piece], data: &[u8]) -> Result<(), DmaError> {
    with_slices(map, pieces, |slices| {
        let mut at = 0;
        for s in slices {
            let n = s.len().min(data.len() - at);
            s.copy_from(&data[at..at + n]);
            at += n;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use memvisor_memory::discard::BlockDiscardManager;
    use memvisor_memory::{Backing, RamBlock};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A piece reached at its guest-physical address (no IOMMU).
    fn phys(gpa: u64, len: u64) -> Piece {
        Piece { gpa, len, iova: gpa }
    }
    const HOT: u64 = 0x1_0000_0000;

    fn map() -> (GuestMemoryMap, Arc<BlockDiscardManager>) {
        let ram = |n| Arc::new(RamBlock::new("ram", n, Backing::Memfd).unwrap());
        let manager = Arc::new(BlockDiscardManager::new(GuestRange::new(HOT, 4 * MIB).unwrap(), 2 * MIB).unwrap());
        let map = GuestMemoryMap::builder()
            .ram(0, ram(MIB))
            .unwrap()
            .ram(MIB, ram(MIB))
            .unwrap()
            .managed_ram(HOT, ram(4 * MIB), manager.clone())
            .unwrap()
            .build()
            .unwrap();
        (map, manager)
    }

    #[test]
    fn physical_buffers_split_at_regions_and_merge_inside_them() {
        let (map, _) = map();
        let mut out = Vec::new();
        Dma::Physical
            .resolve(&map, MIB - 16, 32, Access::Write, &mut out)
            .unwrap();
        assert_eq!(out, [phys(MIB - 16, 16), phys(MIB, 16)]);
        // The next buffer continues the last piece: merged.
        Dma::Physical
            .resolve(&map, MIB + 16, 16, Access::Write, &mut out)
            .unwrap();
        assert_eq!(out[1], phys(MIB, 32));
        assert_eq!(
            Dma::Physical.resolve(&map, 2 * MIB - 1, 2, Access::Read, &mut out),
            Err(DmaError::NotRam { addr: 2 * MIB, len: 1 })
        );
        assert!(
            Dma::Physical
                .resolve(&map, u64::MAX, 2, Access::Read, &mut out)
                .is_err()
        );
        assert_eq!(
            Dma::Physical.resolve_contiguous(&map, 0x1000, 0x100, Access::Read),
            Ok(0x1000)
        );
        assert_eq!(
            Dma::Physical.resolve_contiguous(&map, MIB - 8, 16, Access::Read),
            Err(DmaError::NotContiguous { addr: MIB - 8, len: 16 })
        );
    }

    #[test]
    fn unplugged_memory_is_never_touched() {
        let (map, manager) = map();
        let mut out = Vec::new();
        // Resolution does not look at the populated state...
        Dma::Physical.resolve(&map, HOT, 4096, Access::Write, &mut out).unwrap();
        // ...access does, and refuses.
        assert_eq!(
            write_pieces(&map, &out, &[1; 4096]),
            Err(DmaError::NotPopulated { gpa: HOT, len: 4096 })
        );
        let first = GuestRange::new(HOT, 2 * MIB).unwrap();
        manager.write().plug(first, || Ok::<_, ()>(()), |_| {}).unwrap();
        write_pieces(&map, &out, &[1; 4096]).unwrap();
        let mut back = [0u8; 4096];
        read_pieces(&map, &out, &mut back).unwrap();
        assert_eq!(back, [1; 4096]);
        // Pieces in plain RAM and in the managed region, several pieces in
        // the region: one view, all checked.
        let mut mixed = vec![phys(0x1000, 8)];
        Dma::Physical
            .resolve(&map, HOT + 0x100, 8, Access::Read, &mut mixed)
            .unwrap();
        Dma::Physical
            .resolve(&map, HOT + 0x200, 8, Access::Read, &mut mixed)
            .unwrap();
        assert_eq!(mixed.len(), 3);
        assert!(read_pieces(&map, &mixed, &mut [0; 24]).is_ok());
        mixed.push(phys(HOT + 2 * MIB, 8));
        assert!(matches!(
            read_pieces(&map, &mixed, &mut [0; 32]),
            Err(DmaError::NotPopulated { .. })
        ));
    }
}
