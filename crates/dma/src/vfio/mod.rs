//! VFIO type1 backend: a [`DmaMapper`] over one VFIO container holding one
//! IOMMU group.
//!
//! [`VfioContainerMapper::open`] opens `/dev/vfio/vfio` (through
//! `vfio-ioctls`'s [`VfioContainer`], which checks the API version and the
//! `VFIO_TYPE1v2_IOMMU` extension), opens `/dev/vfio/<group>`, checks that
//! the group is viable and not already in a container, attaches it
//! (`VFIO_GROUP_SET_CONTAINER`), selects the type1v2 IOMMU
//! (`VFIO_SET_IOMMU`) and reads `VFIO_IOMMU_GET_INFO` with its capability
//! chain: the IOMMU page sizes, the usable IOVA ranges
//! (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`) and the number of DMA mappings
//! still available (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`).
//!
//! Every mapping is one `VFIO_IOMMU_MAP_DMA` (read and write permissions
//! from [`Permissions`]) and is unmapped by one `VFIO_IOMMU_UNMAP_DMA` of exactly
//! its range, whose returned size is checked. The mapper keeps its own table
//! of live mappings, so it refuses overlaps and splits before the kernel
//! sees them, and [`DmaMapper::pinned_bytes`] and
//! [`DmaMapper::mapping_count`] are exact. The [`PinBudget`] is charged
//! before the kernel pins and released if it refuses.
//!
//! The kernel pins with the container's memory-lock accounting (`locked_vm`,
//! not `VmPin`); a VMM holding `CAP_IPC_LOCK` is bounded only by the
//! [`PinBudget`]. Dropping the mapper unmaps what is left, then closes the
//! group and the container.
//!
//! ```no_run
//! use std::sync::Arc;
//! use memvisor_dma::mapper::{Permissions, DmaMapper, PinBudget};
//! use memvisor_dma::vfio::VfioContainerMapper;
//!
//! // IOMMU group 42 holds a device bound to vfio-pci.
//! let mapper = VfioContainerMapper::open("nic0", 42, Arc::new(PinBudget::unlimited()))?;
//! let limits = mapper.limits();
//! println!("page sizes {:#x}, iova ranges {:?}", limits.page_sizes, limits.iova_ranges);
//! # let host = 0;
//! mapper.map(0x1_0000_0000, host, 2 << 20, Permissions::READ_WRITE)?;
//! assert_eq!(mapper.unmap(0, u64::MAX)?, 2 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The device itself is opened from the group with
//! `VFIO_GROUP_GET_DEVICE_FD` on [`VfioContainerMapper::group_fd`].
//!
//! [`VfioContainer`]: vfio_ioctls::VfioContainer
//! [`Permissions`]: crate::mapper::Permissions
//! [`DmaMapper`]: crate::mapper::DmaMapper
//! [`DmaMapper::pinned_bytes`]: crate::mapper::DmaMapper::pinned_bytes
//! [`DmaMapper::mapping_count`]: crate::mapper::DmaMapper::mapping_count
//! [`PinBudget`]: crate::mapper::PinBudget

// One file per concern:
// - ioctls.rs: the VFIO ioctl numbers and their wrappers (container and
//   group setup, GET_INFO, MAP_DMA, UNMAP_DMA), and VfioSetupError;
// - info.rs: parsing the VFIO_IOMMU_GET_INFO capability chain;
// - table.rs: the table of live mappings;
// - mapper.rs: VfioContainerMapper, the DmaMapper built on the three.

mod info;
mod ioctls;
mod mapper;
mod table;

pub use info::{DEFAULT_DMA_ENTRY_LIMIT, InfoError, IommuInfo, parse_iommu_info};
pub use ioctls::{VFIO_CONTAINER_PATH, VFIO_GROUP_DIR, VfioSetupError};
pub use mapper::VfioContainerMapper;
