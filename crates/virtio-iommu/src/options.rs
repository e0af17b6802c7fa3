//! What the VMM decides about a virtio-iommu device: its topology
//! (endpoints), what its configuration space offers, the reserved regions PROBE
//! reports, and the limits that bound what a hostile guest can allocate.

use crate::wire::{RESV_MEM_PROPERTY_SIZE, RESV_MEM_T_MSI, RESV_MEM_T_RESERVED};

/// The x86 MSI doorbell window, `[0xfee0_0000, 0xfeef_ffff]`.
pub const X86_MSI_WINDOW: ReservedRegion = ReservedRegion {
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
    kind: ReservedKind::Msi,
};

/// What a reserved IOVA region is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReservedKind {
    /// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED`: not mappable.
    Reserved,
    /// `VIRTIO_IOMMU_RESV_MEM_T_MSI`: an MSI doorbell, not mappable.
    Msi,
}

impl ReservedKind {
    /// The RESV_MEM subtype on the wire.
    pub fn subtype(self) -> u8 {
        match self {
            Self::Reserved => RESV_MEM_T_RESERVED,
            Self::Msi => RESV_MEM_T_MSI,
        }
    }
}

/// A reserved IOVA region, reported by PROBE as a RESV_MEM property for
/// every endpoint; MAP requests overlapping it are refused (`S_INVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReservedRegion {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Its kind.
    pub kind: ReservedKind,
}

/// Bounds on what a guest can make the host allocate. Reaching one answers
/// `S_NOMEM` and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Domains that may exist at once.
    pub max_domains: usize,
    /// Mappings one domain may hold.
    pub max_mappings_per_domain: usize,
}

impl Default for Limits {
    /// 1024 domains, 262144 mappings per domain (1 GiB in 4 KiB pages;
    /// VFIO's own default `dma_entry_limit` is 65535).
    fn default() -> Self {
        Self {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 18,
        }
    }
}

/// What the VMM decides about the device (its guest-visible configuration
/// space is [`ConfigSpace`](crate::wire::ConfigSpace)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuOptions {
    /// `page_size_mask`: its least significant set bit is the mapping
    /// granularity. Default: 4 KiB and every larger power of two.
    pub page_size_mask: u64,
    /// First mappable IOVA (`input_range.start`).
    pub input_start: u64,
    /// Last mappable IOVA (`input_range.end`, inclusive).
    pub input_end: u64,
    /// First valid domain ID (`domain_range.start`).
    pub domain_start: u32,
    /// Last valid domain ID (`domain_range.end`, inclusive).
    pub domain_end: u32,
    /// Bytes of properties a PROBE returns (`probe_size`).
    pub probe_size: u32,
    /// Initial `bypass` value: unattached endpoints bypass translation.
    /// Restored on system reset, kept across device reset.
    pub bypass: bool,
    /// Reserved regions reported by PROBE for every endpoint.
    pub reserved_regions: Vec<ReservedRegion>,
    /// Endpoint IDs behind the IOMMU (the topology).
    pub endpoints: Vec<u32>,
    /// Limits against a hostile guest.
    pub limits: Limits,
}

impl Default for IommuOptions {
    /// QEMU's defaults on x86: 4 KiB pages, the whole 64-bit input range,
    /// 32-bit domain IDs, 512 bytes of probe properties, bypass on, the
    /// MSI doorbell window reserved; no endpoints.
    fn default() -> Self {
        Self {
            page_size_mask: !0xfff,
            input_start: 0,
            input_end: u64::MAX,
            domain_start: 0,
            domain_end: u32::MAX,
            probe_size: 512,
            bypass: true,
            reserved_regions: vec![X86_MSI_WINDOW],
            endpoints: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// Options the device cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// `page_size_mask` is zero.
    #[error("page_size_mask must have at least one bit set")]
    PageSizeMask,
    /// An empty input or domain range.
    #[error("{what} range [{start:#x}, {end:#x}] is empty")]
    Range {
        /// Which range.
        what: &'static str,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A reserved region with `end < start`.
    #[error("reserved region [{start:#x}, {end:#x}] is empty")]
    ReservedRegion {
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// The reserved regions do not fit in `probe_size`.
    #[error("{regions} reserved regions need {need} bytes of probe properties, probe_size is {probe_size}")]
    ProbeSize {
        /// Number of regions.
        regions: usize,
        /// Bytes they need.
        need: usize,
        /// The configured size.
        probe_size: u32,
    },
    /// An endpoint ID is listed twice.
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(u32),
}

impl IommuOptions {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.page_size_mask == 0 {
            return Err(OptionsError::PageSizeMask);
        }
        if self.input_end < self.input_start {
            return Err(OptionsError::Range {
                what: "input",
                start: self.input_start,
                end: self.input_end,
            });
        }
        if self.domain_end < self.domain_start {
            return Err(OptionsError::Range {
                what: "domain",
                start: self.domain_start.into(),
                end: self.domain_end.into(),
            });
        }
        if let Some(r) = self.reserved_regions.iter().find(|r| r.end < r.start) {
            return Err(OptionsError::ReservedRegion {
                start: r.start,
                end: r.end,
            });
        }
        let need = self.reserved_regions.len() * RESV_MEM_PROPERTY_SIZE;
        if need > self.probe_size as usize {
            return Err(OptionsError::ProbeSize {
                regions: self.reserved_regions.len(),
                need,
                probe_size: self.probe_size,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(&dup) = self.endpoints.iter().find(|&&e| !seen.insert(e)) {
            return Err(OptionsError::DuplicateEndpoint(dup));
        }
        Ok(())
    }

    /// The mapping granularity: the least significant bit of `page_size_mask`.
    pub fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }
}
