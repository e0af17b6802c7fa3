//! `VFIO_IOMMU_GET_INFO` parsing: the type1 info header and its capability
//! chain (IOVA ranges, DMA mappings available), bounds-checked, with no
//! system calls.

use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, vfio_info_cap_header, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_dma_avail, vfio_iova_range,
};

use crate::mapper::IovaRange;

/// Type1's default `dma_entry_limit`: the mapping limit assumed when the
/// kernel does not report `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL` (before 5.10).
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65535;

/// Size of `struct vfio_iommu_type1_info`: where its capability chain may begin.
pub(super) const INFO_SIZE: usize = size_of::<vfio_iommu_type1_info>();
/// Size of `struct vfio_info_cap_header`.
const CAP_HEADER_SIZE: usize = size_of::<vfio_info_cap_header>();
/// `struct vfio_iommu_type1_info_cap_iova_range` up to its array.
const IOVA_RANGE_CAP_SIZE: usize = size_of::<vfio_iommu_type1_info_cap_iova_range>();
/// `struct vfio_iommu_type1_info_dma_avail`.
const DMA_AVAIL_CAP_SIZE: usize = size_of::<vfio_iommu_type1_info_dma_avail>();

// The layouts the parser reads: the header, then the capability's fields.
const _: () = assert!(IOVA_RANGE_CAP_SIZE == CAP_HEADER_SIZE + 8);
const _: () = assert!(DMA_AVAIL_CAP_SIZE == CAP_HEADER_SIZE + 4);

/// What is wrong with a `VFIO_IOMMU_GET_INFO` buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// The buffer is shorter than `struct vfio_iommu_type1_info`.
    #[error("info buffer of {len} bytes is shorter than the {INFO_SIZE}-byte header")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// The kernel reported no IOMMU page sizes.
    #[error("no IOMMU page sizes reported (flags {flags:#x}, iova_pgsizes {pgsizes:#x})")]
    NoPageSizes {
        /// The info flags.
        flags: u32,
        /// The page size mask.
        pgsizes: u64,
    },
    /// The kernel says the capabilities need more room than the buffer has.
    #[error("capabilities need {argsz} bytes but the buffer holds {len}")]
    ArgszTooLarge {
        /// The `argsz` reported.
        argsz: u32,
        /// The buffer length.
        len: usize,
    },
    /// A capability lies (partly) outside the buffer or inside the header.
    #[error("capability at offset {offset:#x} ({needed} bytes) lies outside the {len}-byte buffer or its header")]
    CapOutOfBounds {
        /// Offset of the capability.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// The buffer length.
        len: usize,
    },
    /// A `next` offset does not point past the current capability: the
    /// chain would loop or overlap.
    #[error("capability at offset {offset:#x} has next offset {next:#x}, which does not move forward")]
    CapChainLoop {
        /// Offset of the capability.
        offset: u64,
        /// Its `next` field.
        next: u32,
    },
    /// A capability appears twice.
    #[error("capability id {id} appears twice (second at offset {offset:#x})")]
    DuplicateCap {
        /// The capability id.
        id: u16,
        /// Offset of the second one.
        offset: u64,
    },
    /// An IOVA range ends before it starts.
    #[error("IOVA range {index} is inverted: start {start:#x} > end {end:#x}")]
    InvertedRange {
        /// Index of the range in the capability.
        index: u32,
        /// Its start.
        start: u64,
        /// Its (inclusive) end.
        end: u64,
    },
}

/// What `VFIO_IOMMU_GET_INFO` reports for a type1 container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (bit n set: 2^n-byte pages), never 0.
    pub page_sizes: u64,
    /// Usable IOVA ranges, sorted, if the kernel reported them
    /// (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`, Linux 5.4+).
    pub iova_ranges: Option<Vec<IovaRange>>,
    /// DMA mappings still available, if reported
    /// (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`, Linux 5.10+).
    pub dma_avail: Option<u32>,
}

impl IommuInfo {
    /// The smallest IOMMU page size: the alignment of every mapping.
    pub fn min_page_size(&self) -> u64 {
        1 << self.page_sizes.trailing_zeros().min(63)
    }

    /// The usable IOVA ranges: the reported ones, or all of the address
    /// space when the kernel does not report them.
    pub fn usable_ranges(&self) -> Vec<IovaRange> {
        self.iova_ranges.clone().unwrap_or_else(|| {
            vec![IovaRange {
                start: 0,
                end: u64::MAX,
            }]
        })
    }

    /// The mapping limit of a container with `live` mappings when this info
    /// was read: `dma_avail + live`, or [`DEFAULT_DMA_ENTRY_LIMIT`].
    pub fn max_mappings(&self, live: u64) -> u64 {
        self.dma_avail
            .map_or(DEFAULT_DMA_ENTRY_LIMIT, |avail| u64::from(avail) + live)
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

pub(super) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks that `needed` bytes at `offset` lie in `buf` after the info
/// header, and returns the offset as a `usize`.
fn cap_bounds(buf: &[u8], offset: u64, needed: u64) -> Result<usize, InfoError> {
    let err = InfoError::CapOutOfBounds {
        offset,
        needed,
        len: buf.len(),
    };
    match offset.checked_add(needed) {
        Some(end) if offset >= INFO_SIZE as u64 && end <= buf.len() as u64 => Ok(offset as usize),
        _ => Err(err),
    }
}

/// Parses a `VFIO_IOMMU_GET_INFO` result: `struct vfio_iommu_type1_info`
/// followed by its capability chain, in native byte order, as the kernel
/// wrote it into `buf`.
///
/// Every offset and count is bounds-checked; the chain must move strictly
/// forward (so it ends); a malformed buffer is an [`InfoError`], never a
/// panic. Unknown capabilities (and the migration one) are skipped.
pub fn parse_iommu_info(buf: &[u8]) -> Result<IommuInfo, InfoError> {
    if buf.len() < INFO_SIZE {
        return Err(InfoError::Truncated { len: buf.len() });
    }
    let argsz = read_u32(buf, 0);
    let flags = read_u32(buf, 4);
    let pgsizes = read_u64(buf, 8);
    let cap_offset = read_u32(buf, 16);
    if flags & VFIO_IOMMU_INFO_PGSIZES == 0 || pgsizes == 0 {
        return Err(InfoError::NoPageSizes { flags, pgsizes });
    }
    let mut info = IommuInfo {
        page_sizes: pgsizes,
        iova_ranges: None,
        dma_avail: None,
    };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || cap_offset == 0 {
        return Ok(info);
    }
    if argsz as usize > buf.len() {
        return Err(InfoError::ArgszTooLarge { argsz, len: buf.len() });
    }
    let mut offset = u64::from(cap_offset);
    loop {
        let at = cap_bounds(buf, offset, CAP_HEADER_SIZE as u64)?;
        let id = read_u16(buf, at);
        let next = read_u32(buf, at + 4);
        match u32::from(id) {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                if info.iova_ranges.is_some() {
                    return Err(InfoError::DuplicateCap { id, offset });
                }
                cap_bounds(buf, offset, IOVA_RANGE_CAP_SIZE as u64)?;
                let nr = read_u32(buf, at + CAP_HEADER_SIZE);
                let needed = IOVA_RANGE_CAP_SIZE as u64 + u64::from(nr) * size_of::<vfio_iova_range>() as u64;
                cap_bounds(buf, offset, needed)?;
                let mut ranges = Vec::with_capacity(nr as usize);
                for index in 0..nr {
                    let r = at + IOVA_RANGE_CAP_SIZE + index as usize * size_of::<vfio_iova_range>();
                    let (start, end) = (read_u64(buf, r), read_u64(buf, r + 8));
                    if start > end {
                        return Err(InfoError::InvertedRange { index, start, end });
                    }
                    ranges.push(IovaRange { start, end });
                }
                ranges.sort_by_key(|r| r.start);
                info.iova_ranges = Some(ranges);
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                if info.dma_avail.is_some() {
                    return Err(InfoError::DuplicateCap { id, offset });
                }
                cap_bounds(buf, offset, DMA_AVAIL_CAP_SIZE as u64)?;
                info.dma_avail = Some(read_u32(buf, at + CAP_HEADER_SIZE));
            }
            _ => {}
        }
        if next == 0 {
            return Ok(info);
        }
        if u64::from(next) < offset + CAP_HEADER_SIZE as u64 {
            return Err(InfoError::CapChainLoop { offset, next });
        }
        offset = u64::from(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PGSIZES_4K: u64 = 0x4020_1000; // 4K | 2M | 1G, as on x86 VT-d

    /// Builds an info buffer: header, then `caps` (already laid out at
    /// their offsets by the caller).
    struct InfoBuf(Vec<u8>);

    impl InfoBuf {
        fn new(flags: u32, pgsizes: u64, cap_offset: u32) -> Self {
            let mut b = vec![0u8; INFO_SIZE];
            b[4..8].copy_from_slice(&flags.to_ne_bytes());
            b[8..16].copy_from_slice(&pgsizes.to_ne_bytes());
            b[16..20].copy_from_slice(&cap_offset.to_ne_bytes());
            let mut s = Self(b);
            s.fix_argsz();
            s
        }

        fn fix_argsz(&mut self) {
            let len = self.0.len() as u32;
            self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        }

        fn header(&mut self, id: u16, next: u32) -> &mut Self {
            self.0.extend_from_slice(&id.to_ne_bytes());
            self.0.extend_from_slice(&1u16.to_ne_bytes());
            self.0.extend_from_slice(&next.to_ne_bytes());
            self
        }

        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }

        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }

        fn done(&mut self) -> Vec<u8> {
            self.fix_argsz();
            self.0.clone()
        }
    }

    const CAPS: u32 = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;

    /// Header, IOVA-range cap at 24 (two ranges, 48 bytes), migration cap
    /// at 72 (32 bytes, skipped), DMA-avail cap at 104.
    fn full_chain() -> Vec<u8> {
        InfoBuf::new(CAPS, PGSIZES_4K, 24)
            .header(1, 72)
            .u32(2)
            .u32(0)
            .u64(0xfee0_0000) // listed out of order: sorted by the parser
            .u64(u64::MAX >> 16)
            .u64(0)
            .u64(0xfedf_ffff)
            .header(2, 104)
            .u32(0)
            .u32(0)
            .u64(0x1000)
            .u64(1 << 20)
            .header(3, 0)
            .u32(65000)
            .done()
    }

    #[test]
    fn vfio_info_without_caps_gives_defaults() {
        let buf = InfoBuf::new(VFIO_IOMMU_INFO_PGSIZES, PGSIZES_4K, 0).done();
        let info = parse_iommu_info(&buf).unwrap();
        assert_eq!(
            info,
            IommuInfo {
                page_sizes: PGSIZES_4K,
                iova_ranges: None,
                dma_avail: None
            }
        );
        assert_eq!(info.min_page_size(), 4096);
        assert_eq!(
            info.usable_ranges(),
            vec![IovaRange {
                start: 0,
                end: u64::MAX
            }]
        );
        assert_eq!(info.max_mappings(0), DEFAULT_DMA_ENTRY_LIMIT);
    }

    #[test]
    fn vfio_info_chain_with_ranges_avail_and_unknown_cap() {
        let info = parse_iommu_info(&full_chain()).unwrap();
        assert_eq!(info.page_sizes, PGSIZES_4K);
        assert_eq!(
            info.iova_ranges.as_deref(),
            Some(
                &[
                    IovaRange {
                        start: 0,
                        end: 0xfedf_ffff
                    },
                    IovaRange {
                        start: 0xfee0_0000,
                        end: u64::MAX >> 16
                    }
                ][..]
            )
        );
        assert_eq!(info.dma_avail, Some(65000));
        assert_eq!(info.max_mappings(3), 65003);
    }

    #[test]
    fn vfio_info_caps_flag_without_offset_is_no_caps() {
        // The kernel leaves cap_offset 0 when argsz was too small for the caps.
        let mut buf = InfoBuf::new(CAPS, PGSIZES_4K, 0).done();
        buf[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(parse_iommu_info(&buf).unwrap().iova_ranges, None);
    }

    #[test]
    fn vfio_info_malformed_buffers_are_errors() {
        use InfoError::*;
        /// What is tested, the buffer, and the error expected.
        type Case = (&'static str, Vec<u8>, fn(&InfoError) -> bool);
        let cases: Vec<Case> = vec![
            ("empty", vec![], |e| matches!(e, Truncated { len: 0 })),
            ("short header", vec![0; 23], |e| matches!(e, Truncated { len: 23 })),
            ("no pgsizes flag", InfoBuf::new(0, PGSIZES_4K, 0).done(), |e| {
                matches!(e, NoPageSizes { flags: 0, .. })
            }),
            (
                "zero pgsizes",
                InfoBuf::new(VFIO_IOMMU_INFO_PGSIZES, 0, 0).done(),
                |e| matches!(e, NoPageSizes { pgsizes: 0, .. }),
            ),
            (
                "cap offset past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 4096).done(),
                |e| matches!(e, CapOutOfBounds { offset: 4096, .. }),
            ),
            (
                "cap offset inside header",
                InfoBuf::new(CAPS, PGSIZES_4K, 8).header(3, 0).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { offset: 8, .. }),
            ),
            (
                "cap header cut short",
                {
                    let mut b = InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0).done();
                    b.truncate(28);
                    b[0..4].copy_from_slice(&28u32.to_ne_bytes());
                    b
                },
                |e| {
                    matches!(
                        e,
                        CapOutOfBounds {
                            offset: 24,
                            needed: 8,
                            ..
                        }
                    )
                },
            ),
            (
                "dma avail cut short",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0).done(),
                |e| matches!(e, CapOutOfBounds { needed: 12, .. }),
            ),
            (
                "iova cap without count",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(1, 0).done(),
                |e| matches!(e, CapOutOfBounds { needed: 16, .. }),
            ),
            (
                "nr_iovas past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(2)
                    .u32(0)
                    .u64(0)
                    .u64(1)
                    .done(),
                |e| matches!(e, CapOutOfBounds { needed: 48, .. }),
            ),
            (
                "nr_iovas huge",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(u32::MAX)
                    .u32(0)
                    .done(),
                |e| matches!(e, CapOutOfBounds { .. }),
            ),
            (
                "inverted range",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(1, 0)
                    .u32(1)
                    .u32(0)
                    .u64(9)
                    .u64(8)
                    .done(),
                |e| {
                    matches!(
                        e,
                        InvertedRange {
                            index: 0,
                            start: 9,
                            end: 8
                        }
                    )
                },
            ),
            (
                "self loop",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 24).u32(1).done(),
                |e| matches!(e, CapChainLoop { offset: 24, next: 24 }),
            ),
            (
                "backward next",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(3, 36)
                    .u32(1)
                    .header(2, 24)
                    .done(),
                |e| matches!(e, CapChainLoop { offset: 36, next: 24 }),
            ),
            (
                "overlapping next",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 28).u32(1).u32(0).done(),
                |e| matches!(e, CapChainLoop { next: 28, .. }),
            ),
            (
                "next past end",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, 0x10_0000).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { offset: 0x10_0000, .. }),
            ),
            (
                "next at u32::MAX",
                InfoBuf::new(CAPS, PGSIZES_4K, 24).header(3, u32::MAX).u32(1).done(),
                |e| matches!(e, CapOutOfBounds { .. }),
            ),
            (
                "duplicate dma avail",
                InfoBuf::new(CAPS, PGSIZES_4K, 24)
                    .header(3, 36)
                    .u32(1)
                    .header(3, 0)
                    .u32(2)
                    .done(),
                |e| matches!(e, DuplicateCap { id: 3, offset: 36 }),
            ),
            (
                "argsz larger than buffer",
                {
                    let mut b = full_chain();
                    b[0..4].copy_from_slice(&4096u32.to_ne_bytes());
                    b
                },
                |e| matches!(e, ArgszTooLarge { argsz: 4096, .. }),
            ),
        ];
        for (what, buf, expected) in cases {
            match parse_iommu_info(&buf) {
                Err(e) => assert!(expected(&e), "{what}: unexpected error {e:?}"),
                Ok(info) => panic!("{what}: parsed as {info:?}"),
            }
        }
        // The messages carry the values.
        let e = parse_iommu_info(&InfoBuf::new(CAPS, PGSIZES_4K, 0x40).done()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capability at offset 0x40 (8 bytes) lies outside the 24-byte buffer or its header"
        );
    }

    proptest! {
        #[test]
        fn vfio_info_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), offset in 0u32..300) {
            let mut buf = bytes;
            if buf.len() >= INFO_SIZE {
                buf[4..8].copy_from_slice(&CAPS.to_ne_bytes());
                buf[16..20].copy_from_slice(&offset.to_ne_bytes());
            }
            let _ = parse_iommu_info(&buf);
        }

        #[test]
        fn vfio_info_truncated_chain_never_parses_more(cut in 0usize..128) {
            let full = full_chain();
            let cut = cut.min(full.len());
            let mut buf = full[..cut].to_vec();
            if buf.len() >= 4 {
                let len = buf.len() as u32;
                buf[0..4].copy_from_slice(&len.to_ne_bytes());
            }
            prop_assert_eq!(parse_iommu_info(&buf).is_ok(), cut == full.len());
        }
    }
}
