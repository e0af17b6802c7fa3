//! [`MachineConfig`]: one serde description of a machine — boot RAM,
//! virtio-mem regions, the virtio-iommu and its endpoints, the assigned
//! devices with their DMA path and backend, the pin budget and the unplug
//! guard. The replay engine derives one from a trace header; tests,
//! benchmarks, fuzzers and the VMM write theirs directly (or as JSON).

use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_virtio_iommu::{IommuOptions, ReservedRegion};
use serde::{Deserialize, Serialize};

/// A whole machine. Unknown fields are refused, so a typo is an error
/// rather than a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Boot RAM: plain memfd-backed RAM, never discarded.
    pub ram: Vec<RamSpec>,
    /// The virtio-mem devices, each with a region of its own.
    #[serde(default)]
    pub virtio_mem: Vec<VirtioMemSpec>,
    /// The virtio-iommu, if the machine has one.
    #[serde(default)]
    pub virtio_iommu: Option<VirtioIommuSpec>,
    /// The assigned (DMA-capable) devices and the limits they share.
    #[serde(default)]
    pub dma: DmaSpec,
}

/// One range of boot RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamSpec {
    /// Guest-physical start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

/// One virtio-mem device and its region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMemSpec {
    /// The device's name (its RAM block's and discard-policy holder's too).
    pub id: String,
    /// Guest-physical start of the region.
    pub addr: u64,
    /// Bytes of the region.
    pub region_size: u64,
    /// Block size: a power of two of at least 1 MiB.
    pub block_size: u64,
    /// Bytes requested at start.
    #[serde(default)]
    pub requested_size: u64,
    /// Offer `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`.
    #[serde(default = "yes")]
    pub unplugged_inaccessible: bool,
    /// ACPI proximity domain, if any.
    #[serde(default)]
    pub node_id: Option<u16>,
    /// Preallocate blocks when they are plugged.
    #[serde(default)]
    pub prealloc: bool,
}

fn yes() -> bool {
    true
}

impl VirtioMemSpec {
    /// A region of `region_size` bytes at `addr` in blocks of `block_size`:
    /// nothing requested, `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` offered, no
    /// node, no preallocation (the serde defaults).
    pub fn new(id: impl Into<String>, addr: u64, region_size: u64, block_size: u64) -> Self {
        Self {
            id: id.into(),
            addr,
            region_size,
            block_size,
            requested_size: 0,
            unplugged_inaccessible: true,
            node_id: None,
            prealloc: false,
        }
    }
}

/// The virtio-iommu: topology and what its configuration space offers.
/// Every field but `id` and `endpoints` defaults to
/// [`IommuOptions::default`] (QEMU's x86 defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtioIommuSpec {
    /// The device's name.
    pub id: String,
    /// Endpoint IDs behind the IOMMU.
    pub endpoints: Vec<u32>,
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// First mappable IOVA.
    pub input_start: u64,
    /// Last mappable IOVA (inclusive).
    pub input_end: u64,
    /// First valid domain ID.
    pub domain_start: u32,
    /// Last valid domain ID (inclusive).
    pub domain_end: u32,
    /// Unattached endpoints bypass translation at start.
    pub bypass: bool,
    /// Reserved IOVA regions PROBE reports.
    pub reserved_regions: Vec<ReservedRegion>,
}

impl Default for VirtioIommuSpec {
    fn default() -> Self {
        let d = IommuOptions::default();
        Self {
            id: "viommu0".to_string(),
            endpoints: d.endpoints,
            page_size_mask: d.page_size_mask,
            input_start: d.input_start,
            input_end: d.input_end,
            domain_start: d.domain_start,
            domain_end: d.domain_end,
            bypass: d.bypass,
            reserved_regions: d.reserved_regions,
        }
    }
}

impl VirtioIommuSpec {
    /// The device options this describes (default limits and probe size).
    pub fn options(&self) -> IommuOptions {
        IommuOptions {
            page_size_mask: self.page_size_mask,
            input_start: self.input_start,
            input_end: self.input_end,
            domain_start: self.domain_start,
            domain_end: self.domain_end,
            bypass: self.bypass,
            reserved_regions: self.reserved_regions.clone(),
            endpoints: self.endpoints.clone(),
            ..IommuOptions::default()
        }
    }
}

/// The assigned devices and what they share.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaSpec {
    /// The devices.
    #[serde(default)]
    pub devices: Vec<AssignedDeviceSpec>,
    /// The VM's pin budget in bytes, shared by every device; `None` is
    /// unlimited.
    #[serde(default)]
    pub pin_budget: Option<u64>,
}

/// One DMA-capable device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedDeviceSpec {
    /// Its name, in errors, logs and the discard policy.
    pub name: String,
    /// What pins for it.
    pub backend: DmaBackend,
    /// How it reaches guest memory.
    pub path: AssignedPath,
}

/// Which [`DmaMapper`](memvisor_dma::mapper::DmaMapper) backs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DmaBackend {
    /// Real long-term pinning through io_uring registered buffers.
    Uring,
    /// io_uring registered buffers that are also the target of the
    /// device's own I/O: a zero-copy disk's DMA context
    /// ([`UringPinner::for_io`](memvisor_dma::uring::UringPinner::for_io)).
    UringIo,
    /// A VFIO type1v2 container holding this IOMMU group.
    Vfio {
        /// The IOMMU group number.
        group: u32,
    },
}

/// How an assigned device reaches guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignedPath {
    /// Path 1: all populated RAM at its guest-physical address.
    Ram,
    /// Path 2: an endpoint of the virtio-iommu.
    Viommu {
        /// The endpoint ID.
        endpoint: u32,
        /// What the device's bridge does when the guest unplugs memory a
        /// live mapping of it pins.
        #[serde(default)]
        guard: UnplugGuard,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_reads_from_json_with_defaults_and_refuses_unknown_fields() {
        let json = r#"{
            "ram": [{"addr": 0, "size": 1048576}],
            "virtio_mem": [{"id": "vmem0", "addr": 4294967296, "region_size": 67108864, "block_size": 2097152}],
            "virtio_iommu": {"id": "viommu0", "endpoints": [8]},
            "dma": {"devices": [{"name": "nic0", "backend": "uring", "path": {"viommu": {"endpoint": 8, "guard": "warn"}}}]}
        }"#;
        let config: MachineConfig = serde_json::from_str(json).unwrap();
        assert!(config.virtio_mem[0].unplugged_inaccessible);
        assert_eq!(config.virtio_mem[0].requested_size, 0);
        let iommu = config.virtio_iommu.as_ref().unwrap();
        assert_eq!(iommu.options().input_end, u64::MAX);
        assert!(iommu.bypass);
        assert_eq!(
            config.dma.devices[0].path,
            AssignedPath::Viommu {
                endpoint: 8,
                guard: UnplugGuard::Warn
            }
        );
        let back: MachineConfig = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);

        let typo = json.replace("\"block_size\"", "\"blok_size\"");
        let err = serde_json::from_str::<MachineConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("blok_size"), "{err}");
    }
}
