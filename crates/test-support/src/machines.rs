//! The standard machines of the machine-level tests, as configurations and
//! as [`Rig`](crate::Rig)s set up the way the tests start from.
//!
//! * [`dma`]: boot RAM, one virtio-mem region, a virtio-iommu with one
//!   endpoint and one assigned device pinning through io_uring, on path 1
//!   or behind the endpoint (path 2);
//! * [`migration`]: the migration source — three assigned devices (two
//!   behind the vIOMMU, one on path 1), memory plugged, written and
//!   mapped.

/// The DMA-test machine: 4 MiB of boot RAM (the guest's driver area at
/// its start), a virtio-mem region at [`HOT`](dma::HOT) with all of it
/// requested, a virtio-iommu with endpoint [`ENDPOINT`](dma::ENDPOINT) and
/// bypass off, and the assigned device [`DEVICE`](dma::DEVICE) on the
/// io_uring pinning backend.
pub mod dma {
    use memvisor_machine::{
        AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, MachineConfig, RamSpec, UnplugGuard, VirtioIommuSpec,
        VirtioMemSpec,
    };
    use memvisor_virtio_iommu::Status;

    use crate::{MIB, Rig};

    /// Bytes of boot RAM, at guest-physical 0.
    pub const BOOT: u64 = 4 * MIB;
    /// Guest-physical start of the virtio-mem region.
    pub const HOT: u64 = 4 << 30;
    /// The virtio-mem block size.
    pub const BLOCK: u64 = 2 * MIB;
    /// The assigned device's endpoint behind the virtio-iommu.
    pub const ENDPOINT: u32 = 8;
    /// The domain a path-2 rig attaches [`ENDPOINT`] to.
    pub const DOMAIN: u32 = 1;
    /// The assigned device's name.
    pub const DEVICE: &str = "dev0";
    /// Where the rig's guest lays its queues out (in boot RAM).
    pub const DRIVER_AREA: u64 = 0;

    /// Path 2: behind [`ENDPOINT`], with `guard`.
    pub fn behind_viommu(guard: UnplugGuard) -> AssignedPath {
        AssignedPath::Viommu {
            endpoint: ENDPOINT,
            guard,
        }
    }

    /// The machine with `hot_size` bytes of virtio-mem RAM (all of it
    /// requested) and the device on `path`, pinning within `budget` bytes
    /// (`None`: unlimited).
    pub fn config(path: AssignedPath, hot_size: u64, budget: Option<u64>) -> MachineConfig {
        MachineConfig {
            ram: vec![RamSpec { addr: 0, size: BOOT }],
            virtio_mem: vec![VirtioMemSpec {
                requested_size: hot_size,
                ..VirtioMemSpec::new("vmem0", HOT, hot_size, BLOCK)
            }],
            virtio_iommu: Some(VirtioIommuSpec {
                endpoints: vec![ENDPOINT],
                bypass: false,
                ..VirtioIommuSpec::default()
            }),
            dma: DmaSpec {
                devices: vec![AssignedDeviceSpec {
                    name: DEVICE.into(),
                    backend: DmaBackend::Uring,
                    path,
                }],
                pin_budget: budget,
            },
        }
    }

    /// The [`config`] machine with its guest; on path 2, [`ENDPOINT`] is
    /// attached to [`DOMAIN`].
    pub fn rig(path: AssignedPath, hot_size: u64, budget: Option<u64>) -> Rig {
        let mut rig = Rig::new(&config(path, hot_size, budget), DRIVER_AREA);
        if let AssignedPath::Viommu { .. } = path {
            assert_eq!(rig.attach(DOMAIN, ENDPOINT), Status::Ok);
        }
        rig
    }
}

/// The migration source: 4 MiB of boot RAM, a 64 MiB virtio-mem region
/// with 16 MiB requested, a virtio-iommu with endpoints [`EP_A`](migration::EP_A)
/// and [`EP_B`](migration::EP_B) and domains 1 to 1000, and three
/// assigned devices on the io_uring pinning backend: `vfio-a` behind
/// `EP_A` (guard reject), `vfio-b` behind `EP_B` (guard warn), `vfio-c` on
/// path 1.
pub mod migration {
    use memvisor_machine::{
        AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, RamSpec, UnplugGuard,
        VirtioIommuSpec, VirtioMemSpec,
    };
    use memvisor_virtio_iommu::Status;
    use memvisor_virtio_iommu::wire::{MAP_F_READ, MAP_F_WRITE};
    use memvisor_virtio_mem::wire::VIRTIO_MEM_RESP_ACK;

    use crate::{KIB, MIB, Rig, range};

    /// Bytes of boot RAM, at guest-physical 0.
    pub const BOOT_SIZE: u64 = 4 * MIB;
    /// Guest-physical start of the virtio-mem region.
    pub const VMEM_BASE: u64 = 4 << 30;
    /// Bytes of the virtio-mem region.
    pub const VMEM_SIZE: u64 = 64 * MIB;
    /// The virtio-mem block size.
    pub const BLOCK: u64 = 2 * MIB;
    /// Bytes requested at start.
    pub const REQUESTED: u64 = 16 * MIB;
    /// Endpoint of `vfio-a`.
    pub const EP_A: u32 = 8;
    /// Endpoint of `vfio-b`.
    pub const EP_B: u32 = 9;
    /// Where the rig's guest lays its queues out (in boot RAM).
    pub const DRIVER_AREA: u64 = 0;
    /// Boot RAM the guest fills with a pattern (and maps for DMA).
    pub const BOOT_DATA: u64 = 3 * MIB;
    /// Bytes of it.
    pub const BOOT_DATA_LEN: u64 = 512 * KIB;

    /// The machine; the devices are in the order of their `dma` sections.
    pub fn config() -> MachineConfig {
        let device = |name: &str, path| AssignedDeviceSpec {
            name: name.into(),
            backend: DmaBackend::Uring,
            path,
        };
        MachineConfig {
            ram: vec![RamSpec {
                addr: 0,
                size: BOOT_SIZE,
            }],
            virtio_mem: vec![VirtioMemSpec {
                requested_size: REQUESTED,
                ..VirtioMemSpec::new("vmem0", VMEM_BASE, VMEM_SIZE, BLOCK)
            }],
            virtio_iommu: Some(VirtioIommuSpec {
                endpoints: vec![EP_A, EP_B],
                domain_start: 1,
                domain_end: 1000,
                ..VirtioIommuSpec::default()
            }),
            dma: DmaSpec {
                devices: vec![
                    device(
                        "vfio-a",
                        AssignedPath::Viommu {
                            endpoint: EP_A,
                            guard: UnplugGuard::Reject,
                        },
                    ),
                    device(
                        "vfio-b",
                        AssignedPath::Viommu {
                            endpoint: EP_B,
                            guard: UnplugGuard::Warn,
                        },
                    ),
                    device("vfio-c", AssignedPath::Ram),
                ],
                pin_budget: None,
            },
        }
    }

    /// Guest-physical address of virtio-mem block `i`.
    pub fn block_addr(i: u64) -> u64 {
        VMEM_BASE + i * BLOCK
    }

    /// The byte the guest writes at `gpa`: never zero.
    pub fn pattern(gpa: u64) -> u8 {
        ((gpa / 4096).wrapping_mul(31) ^ (gpa % 4096).wrapping_mul(7)) as u8 | 1
    }

    /// Writes the pattern over `[gpa, gpa + len)` (the guest touching it).
    pub fn fill(machine: &Machine, gpa: u64, len: u64) {
        let data: Vec<u8> = (gpa..gpa + len).map(pattern).collect();
        let host = machine.memory().lookup(range(gpa, len)).unwrap();
        host.region.block().write(host.block_offset, &data).unwrap();
    }

    /// The [`config`] machine, running:
    /// * every assigned device attached (as [`Machine::new`] does);
    /// * virtio-mem blocks 0, 1, 5, 9 plugged (8 MiB), block 3 plugged,
    ///   written and unplugged again; block 0 filled, block 1 half filled,
    ///   block 5 every other page, block 9 untouched;
    /// * boot RAM filled at [`BOOT_DATA`];
    /// * IOMMU: domain 1 (`EP_A`) maps block 0 and the first MiB of block
    ///   5, domain 2 (`EP_B`) maps block 1 and 64 KiB of boot RAM.
    pub fn source() -> Rig {
        let mut rig = Rig::new(&config(), DRIVER_AREA);
        assert_eq!(rig.plug(0, 2), VIRTIO_MEM_RESP_ACK);
        assert_eq!(rig.plug(5, 1), VIRTIO_MEM_RESP_ACK);
        assert_eq!(rig.plug(9, 1), VIRTIO_MEM_RESP_ACK);
        assert_eq!(rig.plug(3, 1), VIRTIO_MEM_RESP_ACK);
        fill(&rig.machine, block_addr(3), BLOCK);
        assert_eq!(rig.unplug(3, 1), VIRTIO_MEM_RESP_ACK);
        fill(&rig.machine, block_addr(0), BLOCK);
        fill(&rig.machine, block_addr(1), BLOCK / 2);
        for page in (0..BLOCK / 4096).step_by(2) {
            fill(&rig.machine, block_addr(5) + page * 4096, 4096);
        }
        fill(&rig.machine, BOOT_DATA, BOOT_DATA_LEN);
        for (domain, endpoint) in [(1, EP_A), (2, EP_B)] {
            assert_eq!(
                rig.attach(domain, endpoint),
                Status::Ok,
                "attach {endpoint} to {domain}"
            );
        }
        for (domain, iova, size, gpa) in [
            (1, 0x10_0000, BLOCK, block_addr(0)),
            (1, 0x40_0000, MIB, block_addr(5)),
            (2, 0, BLOCK, block_addr(1)),
            (2, 0x80_0000, 64 * KIB, BOOT_DATA),
        ] {
            assert_eq!(
                rig.map(domain, iova, gpa, size, MAP_F_READ | MAP_F_WRITE),
                Status::Ok,
                "map {iova:#x} -> {gpa:#x}"
            );
        }
        rig
    }
}
