//! [`VfioContainerMapper`]: the [`DmaMapper`] over one type1v2 container,
//! checking each request against the IOMMU's limits and the table of live
//! mappings before the kernel sees it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};

use super::info::{IommuInfo, parse_iommu_info};
use super::ioctls::{
    Type1Container, Type1Iommu, VFIO_GROUP_DIR, VfioSetupError, check_group_status, open_container, open_group,
    read_iommu_info, set_container, set_type1v2_iommu,
};
use super::table::MappingTable;
use crate::mapper::{DmaError, DmaLimits, DmaMapper, IovaRange, Permissions, PinBudget};

/// A [`DmaMapper`] over a VFIO type1v2 container holding one IOMMU group;
/// see the [module documentation](super).
pub struct VfioContainerMapper {
    name: String,
    group: u32,
    budget: Arc<PinBudget>,
    info: IommuInfo,
    ranges: Vec<IovaRange>,
    max_mappings: u64,
    table: Mutex<MappingTable>,
    iommu: Box<dyn Type1Iommu>,
}

impl fmt::Debug for VfioContainerMapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.lock();
        f.debug_struct("VfioContainerMapper")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("info", &self.info)
            .field("mappings", &table.len())
            .field("pinned", &table.bytes())
            .finish()
    }
}

impl VfioContainerMapper {
    /// Opens a new container for IOMMU group `group`, attaches the group
    /// and selects the type1v2 IOMMU; mappings charge `budget`.
    ///
    /// Every device of the group must be bound to `vfio-pci` (or unbound),
    /// and the group must not be in use. Errors name the step, the path or
    /// group and the errno.
    pub fn open(name: &str, group: u32, budget: Arc<PinBudget>) -> Result<Self, VfioSetupError> {
        let container = open_container()?;
        let group_file = open_group(Path::new(VFIO_GROUP_DIR), group)?;
        check_group_status(&group_file, group)?;
        let container_fd = container.as_raw_fd();
        set_container(&group_file, container_fd).map_err(|source| VfioSetupError::SetContainer { group, source })?;
        set_type1v2_iommu(container_fd).map_err(|source| VfioSetupError::SetIommu { group, source })?;
        // Closing the group file on any later error detaches it again.
        let bytes = read_iommu_info(container_fd).map_err(|source| VfioSetupError::IommuInfo { group, source })?;
        let info = parse_iommu_info(&bytes).map_err(|source| VfioSetupError::MalformedInfo { group, source })?;
        log::info!("vfio mapper {name}: group {group}, {info:?}");
        let iommu = Type1Container {
            group: group_file,
            container,
        };
        Ok(Self::with_iommu(name, group, budget, info, Box::new(iommu)))
    }

    fn with_iommu(name: &str, group: u32, budget: Arc<PinBudget>, info: IommuInfo, iommu: Box<dyn Type1Iommu>) -> Self {
        Self {
            name: name.to_string(),
            group,
            budget,
            ranges: info.usable_ranges(),
            max_mappings: info.max_mappings(0),
            info,
            table: Mutex::new(MappingTable::default()),
            iommu,
        }
    }

    /// The IOMMU group number.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// What the container reported when it was opened.
    pub fn iommu_info(&self) -> &IommuInfo {
        &self.info
    }

    /// The budget this mapper charges.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.budget
    }

    /// The group's file, for `VFIO_GROUP_GET_DEVICE_FD`.
    pub fn group_fd(&self) -> Option<BorrowedFd<'_>> {
        self.iommu.group_fd()
    }

    fn lock(&self) -> MutexGuard<'_, MappingTable> {
        self.table.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Validates a mapping request against alignment and the IOVA ranges;
    /// returns its inclusive last IOVA.
    fn check_request(&self, iova: u64, host: u64, len: u64, access: Permissions) -> Result<u64, DmaError> {
        let page_size = self.info.min_page_size();
        if len == 0 || (iova | host | len) & (page_size - 1) != 0 {
            return Err(DmaError::Unaligned {
                iova,
                host,
                len,
                page_size,
            });
        }
        let last = iova
            .checked_add(len - 1)
            .filter(|_| host.checked_add(len - 1).is_some())
            .ok_or(DmaError::IovaOutOfRange { iova, len })?;
        if !self.ranges.iter().any(|r| r.start <= iova && last <= r.end) {
            return Err(DmaError::IovaOutOfRange { iova, len });
        }
        if !access.read && !access.write {
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                iova,
                len,
                source: io::Error::new(io::ErrorKind::InvalidInput, "access grants neither read nor write"),
            });
        }
        Ok(last)
    }

    /// Unmaps one mapping of the table; on success it leaves the table and
    /// the budget. Under type1v2 a successful unmap of exactly its range
    /// leaves nothing mapped there, so the entry goes even if the kernel
    /// reports another size (which is then an error: the kernel's view and
    /// the table disagreed).
    fn unmap_one(&self, table: &mut MappingTable, iova: u64, len: u64) -> Result<(), DmaError> {
        let unmapped = self.iommu.unmap_dma(iova, len).map_err(|source| DmaError::Os {
            op: "VFIO_IOMMU_UNMAP_DMA",
            iova,
            len,
            source,
        })?;
        if let Some((removed, host)) = table.remove(iova) {
            self.budget.release(host, removed);
        }
        if unmapped != len {
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_UNMAP_DMA",
                iova,
                len,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("kernel unmapped {unmapped:#x} bytes, expected {len:#x}"),
                ),
            });
        }
        Ok(())
    }
}

impl DmaMapper for VfioContainerMapper {
    fn name(&self) -> &str {
        &self.name
    }

    /// Maps with one `VFIO_IOMMU_MAP_DMA`. Beyond the trait's errors:
    /// [`DmaError::Unaligned`] uses the IOMMU's smallest page size, an IOVA
    /// range not inside one usable range is [`DmaError::IovaOutOfRange`],
    /// and the kernel's `ENOSPC` (no DMA entries left) is
    /// [`DmaError::TooManyMappings`].
    fn map(&self, iova: u64, host: u64, len: u64, access: Permissions) -> Result<(), DmaError> {
        let last = self.check_request(iova, host, len, access)?;
        let mut table = self.lock();
        table.check_free(iova, last, len)?;
        if table.len() >= self.max_mappings {
            return Err(DmaError::TooManyMappings {
                limit: self.max_mappings,
            });
        }
        self.budget.charge(iova, host, len)?;
        let mut flags = 0;
        if access.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if access.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        if let Err(source) = self.iommu.map_dma(iova, host, len, flags) {
            self.budget.release(host, len);
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(DmaError::TooManyMappings { limit: table.len() });
            }
            return Err(DmaError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                iova,
                len,
                source,
            });
        }
        table.insert(iova, len, host);
        Ok(())
    }

    /// Unmaps with one `VFIO_IOMMU_UNMAP_DMA` per mapping, in IOVA order,
    /// checking the size the kernel reports. A split is refused before any
    /// system call. If the kernel fails one, the walk stops there: the
    /// mappings before it are gone (and released), it and the rest stay,
    /// and `pinned_bytes` remains exact.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let mut table = self.lock();
        let plan = table.plan_unmap(iova, len)?;
        let mut bytes = 0;
        for (start, mlen) in plan {
            self.unmap_one(&mut table, start, mlen)?;
            bytes += mlen;
        }
        Ok(bytes)
    }

    fn limits(&self) -> DmaLimits {
        DmaLimits {
            max_mappings: self.max_mappings,
            page_sizes: self.info.page_sizes,
            iova_ranges: self.ranges.clone(),
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.lock().bytes()
    }

    fn mapping_count(&self) -> u64 {
        self.lock().len()
    }
}

impl Drop for VfioContainerMapper {
    fn drop(&mut self) {
        let table = self.table.get_mut().unwrap_or_else(|poison| poison.into_inner());
        let mut table = std::mem::take(table);
        let live: Vec<(u64, u64, u64)> = table.iter().collect();
        for (iova, len, _) in live {
            if let Err(e) = self.unmap_one(&mut table, iova, len) {
                log::error!("vfio mapper {}: {e}", self.name);
            }
        }
        // What the kernel refused to unmap goes when the container closes.
        for (_, len, host) in table.iter() {
            self.budget.release(host, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::VFIO_CONTAINER_PATH;
    use memvisor_memory::{Backing, RamBlock};
    use std::collections::BTreeMap;

    const MIB: u64 = 1 << 20;
    const PGSIZES_4K: u64 = 0x4020_1000; // 4K | 2M | 1G, as on x86 VT-d

    /// A type1v2 IOMMU in memory: refuses overlaps and splits like the
    /// kernel, and fails on request.
    #[derive(Default)]
    struct FakeIommu {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        /// iova → (len, vaddr, flags)
        mappings: BTreeMap<u64, (u64, u64, u32)>,
        fail_map: Option<i32>,
        fail_unmap_at: Option<u64>,
        unmap_reports: Option<u64>,
        unmap_calls: u32,
    }

    impl Type1Iommu for Arc<FakeIommu> {
        fn map_dma(&self, iova: u64, vaddr: u64, size: u64, flags: u32) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if let Some(errno) = s.fail_map {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let end = iova + size;
            if s.mappings
                .range(..end)
                .next_back()
                .is_some_and(|(&a, &(l, _, _))| a + l > iova)
            {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            s.mappings.insert(iova, (size, vaddr, flags));
            Ok(())
        }

        fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<u64> {
            let mut s = self.state.lock().unwrap();
            s.unmap_calls += 1;
            if s.fail_unmap_at == Some(iova) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            let end = iova + size;
            let inside: Vec<u64> = s.mappings.range(iova..end).map(|(&a, _)| a).collect();
            let mut bytes = 0;
            for a in inside {
                let (l, _, _) = s.mappings[&a];
                if a + l > end {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                s.mappings.remove(&a);
                bytes += l;
            }
            Ok(s.unmap_reports.unwrap_or(bytes))
        }

        fn group_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    fn info(page_sizes: u64, iova_ranges: Option<Vec<IovaRange>>, dma_avail: Option<u32>) -> IommuInfo {
        IommuInfo {
            page_sizes,
            iova_ranges,
            dma_avail,
        }
    }

    fn fake_mapper(budget: Option<u64>, info: IommuInfo) -> (VfioContainerMapper, Arc<FakeIommu>) {
        let fake = Arc::new(FakeIommu::default());
        let budget = Arc::new(budget.map_or_else(PinBudget::unlimited, PinBudget::limited));
        let m = VfioContainerMapper::with_iommu("fake", 7, budget, info, Box::new(fake.clone()));
        (m, fake)
    }

    fn default_info() -> IommuInfo {
        info(PGSIZES_4K, None, None)
    }

    const HOST: u64 = 0x7f00_0000_0000;

    #[test]
    fn vfio_map_unmap_counts_and_access_flags() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(0x10_0000, HOST, 2 * MIB, Permissions::READ_WRITE).unwrap();
        m.map(0x40_0000, HOST + 2 * MIB, 4096, Permissions::READ).unwrap();
        let write_only = Permissions {
            read: false,
            write: true,
        };
        m.map(0x50_0000, HOST, 4096, write_only).unwrap();
        {
            let s = fake.state.lock().unwrap();
            assert_eq!(
                s.mappings[&0x10_0000],
                (2 * MIB, HOST, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)
            );
            assert_eq!(s.mappings[&0x40_0000], (4096, HOST + 2 * MIB, VFIO_DMA_MAP_FLAG_READ));
            assert_eq!(s.mappings[&0x50_0000].2, VFIO_DMA_MAP_FLAG_WRITE);
        }
        assert_eq!((m.pinned_bytes(), m.mapping_count()), (2 * MIB + 8192, 3));
        assert_eq!(m.budget().used(), 2 * MIB + 8192);
        assert_eq!(m.unmap(0, u64::MAX).unwrap(), 2 * MIB + 8192);
        assert_eq!(fake.state.lock().unwrap().unmap_calls, 3, "one UNMAP_DMA per mapping");
        assert!(fake.state.lock().unwrap().mappings.is_empty());
        assert_eq!((m.pinned_bytes(), m.mapping_count(), m.budget().used()), (0, 0, 0));
        let none = Permissions {
            read: false,
            write: false,
        };
        let e = m.map(0, HOST, 4096, none).unwrap_err();
        assert!(e.to_string().contains("neither read nor write"), "{e}");
        assert_eq!(m.budget().used(), 0);
    }

    #[test]
    fn vfio_alignment_follows_the_iommu_page_size() {
        // 64 KiB IOMMU pages (arm64 SMMU with a 64K granule).
        let (m, _) = fake_mapper(None, info(0x2001_0000, None, None));
        let e = m.map(0x1000, HOST, 0x1_0000, Permissions::READ).unwrap_err();
        assert!(
            matches!(
                e,
                DmaError::Unaligned {
                    page_size: 0x1_0000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            m.map(0x1_0000, HOST + 0x1000, 0x1_0000, Permissions::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            m.map(0x1_0000, HOST, 0x1000, Permissions::READ),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            m.map(0x1_0000, HOST, 0, Permissions::READ),
            Err(DmaError::Unaligned { .. })
        ));
        m.map(0x1_0000, HOST, 0x2_0000, Permissions::READ).unwrap();
        assert_eq!(m.limits().min_page_size(), 0x1_0000);
    }

    #[test]
    fn vfio_mappings_stay_inside_one_usable_iova_range() {
        let ranges = vec![
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: (1 << 39) - 1,
            },
        ];
        let (m, fake) = fake_mapper(None, info(PGSIZES_4K, Some(ranges.clone()), Some(100)));
        assert_eq!(
            m.limits(),
            DmaLimits {
                max_mappings: 100,
                page_sizes: PGSIZES_4K,
                iova_ranges: ranges
            }
        );
        // Straddles the hole at the interrupt window.
        let e = m.map(0xfed0_0000, HOST, 0x20_0000, Permissions::READ).unwrap_err();
        assert_eq!(
            e.to_string(),
            "iova range [0xfed00000, +0x200000) is outside the usable IOVA ranges"
        );
        // Inside the hole, and past the address width.
        assert!(matches!(
            m.map(0xfee0_0000, HOST, 4096, Permissions::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(matches!(
            m.map(1 << 39, HOST, 4096, Permissions::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(matches!(
            m.map(u64::MAX - 4095, HOST, 8192, Permissions::READ),
            Err(DmaError::IovaOutOfRange { .. })
        ));
        assert!(fake.state.lock().unwrap().mappings.is_empty());
        m.map(0xfedf_f000, HOST, 4096, Permissions::READ).unwrap();
        m.map(0xfef0_0000, HOST, 4096, Permissions::READ).unwrap();
        m.map((1 << 39) - 4096, HOST, 4096, Permissions::READ).unwrap();
    }

    #[test]
    fn vfio_overlap_and_split_change_nothing() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(2 * MIB, HOST, 2 * MIB, Permissions::READ).unwrap();
        assert!(matches!(
            m.map(3 * MIB, HOST, 2 * MIB, Permissions::READ),
            Err(DmaError::Overlap { existing, .. }) if existing == 2 * MIB
        ));
        assert!(matches!(
            m.map(MIB, HOST, 2 * MIB, Permissions::READ),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(m.unmap(3 * MIB, 4 * MIB), Err(DmaError::Split { start, .. }) if start == 2 * MIB));
        assert!(matches!(m.unmap(MIB, 2 * MIB), Err(DmaError::Split { .. })));
        assert_eq!(
            fake.state.lock().unwrap().unmap_calls,
            0,
            "refused before any system call"
        );
        assert_eq!((m.pinned_bytes(), m.budget().used()), (2 * MIB, 2 * MIB));
        assert_eq!(m.unmap(0, 2 * MIB).unwrap(), 0, "holes are fine");
        assert_eq!(m.unmap(0, 8 * MIB).unwrap(), 2 * MIB);
    }

    #[test]
    fn vfio_budget_is_charged_first_and_released_on_failure() {
        let (m, fake) = fake_mapper(Some(4 * MIB), default_info());
        m.map(0, HOST, 3 * MIB, Permissions::READ_WRITE).unwrap();
        // New memory over the limit is refused (the same memory again
        // would cost nothing: the budget counts distinct bytes).
        let e = m
            .map(3 * MIB, HOST + 3 * MIB, 2 * MIB, Permissions::READ_WRITE)
            .unwrap_err();
        assert!(
            matches!(e, DmaError::BudgetExceeded { budget, .. } if budget == 4 * MIB),
            "{e}"
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 1, "the kernel never saw it");
        fake.state.lock().unwrap().fail_map = Some(libc::EFAULT);
        let e = m
            .map(3 * MIB, HOST + 3 * MIB, MIB, Permissions::READ_WRITE)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "VFIO_IOMMU_MAP_DMA of iova 0x300000 len 0x100000 failed: {}",
                io::Error::from_raw_os_error(libc::EFAULT)
            )
        );
        assert_eq!(
            (m.budget().used(), m.pinned_bytes(), m.mapping_count()),
            (3 * MIB, 3 * MIB, 1)
        );
        fake.state.lock().unwrap().fail_map = None;
        m.map(3 * MIB, HOST, MIB, Permissions::READ_WRITE).unwrap();
        assert_eq!(m.budget().used(), 4 * MIB);
    }

    #[test]
    fn vfio_mapping_limit_from_dma_avail_and_enospc() {
        let (m, fake) = fake_mapper(None, info(PGSIZES_4K, None, Some(2)));
        m.map(0, HOST, 4096, Permissions::READ).unwrap();
        m.map(4096, HOST, 4096, Permissions::READ).unwrap();
        assert!(matches!(
            m.map(8192, HOST, 4096, Permissions::READ),
            Err(DmaError::TooManyMappings { limit: 2 })
        ));
        // The kernel running out first (another container sharing the
        // user's dma_entry_limit would not, but a lowered limit would).
        let (m2, fake2) = fake_mapper(None, default_info());
        m2.map(0, HOST, 4096, Permissions::READ).unwrap();
        fake2.state.lock().unwrap().fail_map = Some(libc::ENOSPC);
        assert!(matches!(
            m2.map(4096, HOST, 4096, Permissions::READ),
            Err(DmaError::TooManyMappings { limit: 1 })
        ));
        assert_eq!((m2.budget().used(), m2.mapping_count()), (4096, 1));
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 2);
    }

    #[test]
    fn vfio_unmap_failure_stops_the_walk_and_stays_exact() {
        let (m, fake) = fake_mapper(None, default_info());
        for i in 0..3 {
            m.map(i * MIB, HOST, 4096, Permissions::READ).unwrap();
        }
        fake.state.lock().unwrap().fail_unmap_at = Some(MIB);
        let e = m.unmap(0, 4 * MIB).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("VFIO_IOMMU_UNMAP_DMA of iova 0x100000 len 0x1000 failed"),
            "{e}"
        );
        assert_eq!(
            (m.mapping_count(), m.pinned_bytes(), m.budget().used()),
            (2, 8192, 8192)
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 2);
        fake.state.lock().unwrap().fail_unmap_at = None;
        assert_eq!(m.unmap(0, 4 * MIB).unwrap(), 8192);
    }

    #[test]
    fn vfio_unmap_checks_the_size_the_kernel_reports() {
        let (m, fake) = fake_mapper(None, default_info());
        m.map(0, HOST, 8192, Permissions::READ).unwrap();
        fake.state.lock().unwrap().unmap_reports = Some(4096);
        let e = m.unmap(0, 8192).unwrap_err();
        assert!(
            e.to_string().contains("kernel unmapped 0x1000 bytes, expected 0x2000"),
            "{e}"
        );
        // The range is empty in the kernel now: the table agrees.
        assert_eq!((m.mapping_count(), m.pinned_bytes(), m.budget().used()), (0, 0, 0));
    }

    #[test]
    fn vfio_drop_unmaps_and_releases_the_budget() {
        let budget = Arc::new(PinBudget::limited(8 * MIB));
        let fake = Arc::new(FakeIommu::default());
        let m = VfioContainerMapper::with_iommu("fake", 7, budget.clone(), default_info(), Box::new(fake.clone()));
        m.map(0, HOST, MIB, Permissions::READ).unwrap();
        m.map(MIB, HOST, MIB, Permissions::READ).unwrap();
        fake.state.lock().unwrap().fail_unmap_at = Some(MIB);
        assert!(format!("{m:?}").contains("mappings: 2"));
        drop(m);
        assert_eq!(
            budget.used(),
            0,
            "even what the kernel refused: closing the container unpins it"
        );
        assert_eq!(fake.state.lock().unwrap().mappings.len(), 1);
    }

    #[test]
    fn vfio_open_without_dev_vfio_names_the_path() {
        let budget = Arc::new(PinBudget::unlimited());
        if Path::new(VFIO_CONTAINER_PATH).exists() {
            // A real VFIO host: an absent group is named instead.
            let e = VfioContainerMapper::open("t", u32::MAX, budget).unwrap_err();
            assert!(e.to_string().contains("/dev/vfio/4294967295"), "{e}");
            return;
        }
        let e = VfioContainerMapper::open("t", 3, budget).unwrap_err();
        assert!(matches!(e, VfioSetupError::OpenContainer { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot open the VFIO container /dev/vfio/vfio: "),
            "{msg}"
        );
        assert!(msg.contains("No such file or directory"), "{msg}");
    }

    // ---- on a real device ---------------------------------------------

    /// The group to test with. The test is ignored by default (this kind of
    /// machine has no `/dev/vfio`), so a skip reads as a skip; run with
    /// `--ignored` where a device is bound, and it fails if none is.
    fn device_group() -> u32 {
        let group = std::env::var("MEMVISOR_VFIO_GROUP").ok().and_then(|g| g.parse().ok());
        match group {
            Some(g) if Path::new(VFIO_CONTAINER_PATH).exists() => g,
            _ => panic!("needs {VFIO_CONTAINER_PATH} and MEMVISOR_VFIO_GROUP=<n> with a device bound to vfio-pci"),
        }
    }

    #[test]
    #[ignore = "needs a VFIO group: set MEMVISOR_VFIO_GROUP=<n> (a device bound to vfio-pci) and run with --ignored"]
    fn vfio_device_map_unmap_roundtrip() {
        let group = device_group();
        let budget = Arc::new(PinBudget::limited(64 * MIB));
        let m = VfioContainerMapper::open("dev", group, budget.clone()).unwrap();
        assert!(m.group_fd().is_some());
        let limits = m.limits();
        assert_ne!(limits.page_sizes, 0);
        assert!(limits.max_mappings > 0);
        let page = limits.min_page_size();
        let range = *limits
            .iova_ranges
            .iter()
            .find(|r| r.end - r.start >= 16 * MIB)
            .expect("usable range");
        let base = range.start.next_multiple_of(2 * MIB);
        let ram = RamBlock::new("ram", 8 * MIB, Backing::Memfd).unwrap();
        let h = ram.host_address();
        m.map(base, h, 4 * MIB, Permissions::READ_WRITE).unwrap();
        m.map(base + 4 * MIB, h + 4 * MIB, page, Permissions::READ).unwrap();
        assert_eq!((m.pinned_bytes(), m.mapping_count()), (4 * MIB + page, 2));
        assert!(matches!(m.unmap(base + MIB, MIB), Err(DmaError::Split { .. })));
        assert_eq!(m.unmap(base, 16 * MIB).unwrap(), 4 * MIB + page);
        assert_eq!((m.pinned_bytes(), budget.used()), (0, 0));
        // A second container cannot take the same group.
        let e = VfioContainerMapper::open("again", group, budget.clone());
        m.map(base, h, 4 * MIB, Permissions::READ_WRITE).unwrap();
        drop(m);
        assert_eq!(budget.used(), 0);
        assert!(e.is_err(), "the group was in use");
    }
}
