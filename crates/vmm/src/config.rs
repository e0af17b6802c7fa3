//! What `memvisor run` boots: [`VmmConfig`], the command line's flags as
//! one serde structure (the `--config` file form), and how it becomes a
//! [`MachineConfig`] on the x86-64 [`layout`](crate::x86::layout).

use std::path::PathBuf;

use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, MachineConfig, RamSpec, VirtioIommuSpec, VirtioMemSpec,
};
use serde::{Deserialize, Serialize};

use crate::x86::layout;

/// The smallest alignment of a virtio-mem region: Linux adds hot-plugged
/// memory in memory blocks of 128 MiB on x86-64.
pub const VMEM_REGION_ALIGN: u64 = 128 << 20;

/// Largest number of vCPUs (APIC ids are 8 bits; 255 is broadcast).
pub const MAX_CPUS: u8 = 254;

/// A virtio-mem device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmemConfig {
    /// The device's name (`vmem0`).
    pub id: String,
    /// Region size in bytes (the most it can plug).
    pub size: u64,
    /// Block size in bytes (a power of two, at least 4 KiB).
    pub block_size: u64,
    /// Bytes requested at start.
    #[serde(default)]
    pub requested: u64,
    /// Back blocks when they are plugged rather than when first touched.
    #[serde(default)]
    pub prealloc: bool,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The disk's name, also its serial (`GET_ID`).
    pub id: String,
    /// The raw image.
    pub path: PathBuf,
    /// Refuse the guest's writes.
    #[serde(default)]
    pub read_only: bool,
    /// Behind the virtio-iommu (when there is one); default true.
    #[serde(default = "yes")]
    pub iommu: bool,
    /// Zero-copy I/O: the disk pins guest memory through the DMA layer as
    /// an assigned device does (all populated RAM without a vIOMMU, what
    /// the guest maps behind one) and reads and writes the image straight
    /// from and into that pinned memory. Default
    /// false: `preadv`/`pwritev`, nothing pinned.
    #[serde(default)]
    pub zero_copy: bool,
}

fn yes() -> bool {
    true
}

/// A host PCI function assigned to the guest through VFIO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioConfig {
    /// The function's address on the host (`0000:00:04.0`); it must be
    /// bound to `vfio-pci`.
    pub host: String,
    /// Behind the virtio-iommu (when there is one); default true.
    #[serde(default = "yes")]
    pub iommu: bool,
}

impl VfioConfig {
    /// The function's IOMMU group, from `/sys/bus/pci/devices/<host>/iommu_group`.
    pub fn iommu_group(&self) -> Result<u32, ConfigError> {
        let link = std::path::Path::new("/sys/bus/pci/devices")
            .join(&self.host)
            .join("iommu_group");
        let target = std::fs::read_link(&link).map_err(|e| {
            ConfigError(format!(
                "--device vfio={}: {}: {e} (is it bound to vfio-pci?)",
                self.host,
                link.display()
            ))
        })?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                ConfigError(format!(
                    "--device vfio={}: IOMMU group link {} is not a group",
                    self.host,
                    target.display()
                ))
            })
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialConfig {
    /// The VMM's stdin and stdout.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No serial port.
    Off,
}

/// Everything `memvisor run` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// The kernel: an ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// vCPUs.
    #[serde(default = "one")]
    pub cpus: u8,
    /// Boot RAM in bytes.
    pub memory: u64,
    /// virtio-mem devices.
    #[serde(default)]
    pub vmem: Vec<VmemConfig>,
    /// A virtio-iommu in front of the disks.
    #[serde(default)]
    pub viommu: bool,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Host PCI functions assigned through VFIO.
    #[serde(default)]
    pub vfio: Vec<VfioConfig>,
    /// The serial console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// The management API's Unix socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The most guest memory DMA may pin, each page counted once however
    /// many devices pin it (`None`: no limit). A pin past it is refused: an
    /// assigned device cannot attach, a zero-copy disk's or a vIOMMU
    /// mapping fails, a plug is answered BUSY.
    #[serde(default)]
    pub pin_budget: Option<u64>,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=acpi panic=-1".into()
}

fn one() -> u8 {
    1
}

/// Why a configuration cannot be booted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where each PCI device sits: slot numbers on bus 0, in this order:
/// the virtio-iommu, the virtio-mem devices, the disks, the VFIO devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSlots {
    /// The virtio-iommu's slot.
    pub iommu: Option<u8>,
    /// Each virtio-mem device's slot.
    pub vmem: Vec<u8>,
    /// Each disk's slot.
    pub disks: Vec<u8>,
    /// Each VFIO device's slot.
    pub vfio: Vec<u8>,
}

impl PciSlots {
    /// The PCI requester ID (bus 0, function 0) of `slot`.
    pub fn bdf(slot: u8) -> u16 {
        u16::from(slot) << 3
    }
}

impl VmmConfig {
    /// Checks what the machine cannot check itself.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError(format!("--cpus {}: between 1 and {MAX_CPUS}", self.cpus)));
        }
        if self.memory < (64 << 20) || self.memory % 4096 != 0 {
            return Err(ConfigError(format!(
                "--memory {} bytes: at least 64M and a multiple of 4K",
                self.memory
            )));
        }
        let mut ids: Vec<&str> = self.vmem.iter().map(|v| v.id.as_str()).collect();
        ids.extend(self.disks.iter().map(|d| d.id.as_str()));
        for (i, id) in ids.iter().enumerate() {
            if id.is_empty() || ids[..i].contains(id) {
                return Err(ConfigError(format!("device id `{id}` is empty or used twice")));
            }
        }
        let devices = self.vmem.len() + self.disks.len() + self.vfio.len() + usize::from(self.viommu);
        if devices > 31 {
            return Err(ConfigError(format!("{devices} PCI devices: bus 0 has 31 slots")));
        }
        Ok(())
    }

    /// The PCI slot of every device.
    pub fn slots(&self) -> PciSlots {
        let mut next = 1u8..;
        PciSlots {
            iommu: self.viommu.then(|| next.next().unwrap_or(0)),
            vmem: self.vmem.iter().map(|_| next.next().unwrap_or(0)).collect(),
            disks: self.disks.iter().map(|_| next.next().unwrap_or(0)).collect(),
            vfio: self.vfio.iter().map(|_| next.next().unwrap_or(0)).collect(),
        }
    }

    /// Disk `i`'s endpoint id (its BDF) if it is behind the virtio-iommu.
    pub fn disk_endpoint(&self, i: usize) -> Option<u32> {
        let behind = self.viommu && self.disks.get(i)?.iommu;
        behind.then(|| u32::from(PciSlots::bdf(self.slots().disks[i])))
    }

    /// VFIO device `i`'s endpoint id (its BDF) if it is behind the virtio-iommu.
    pub fn vfio_endpoint(&self, i: usize) -> Option<u32> {
        let behind = self.viommu && self.vfio.get(i)?.iommu;
        behind.then(|| u32::from(PciSlots::bdf(self.slots().vfio[i])))
    }

    /// Every endpoint id behind the virtio-iommu: disks, then VFIO devices.
    pub fn iommu_endpoints(&self) -> Vec<u32> {
        let disks = (0..self.disks.len()).filter_map(|i| self.disk_endpoint(i));
        disks
            .chain((0..self.vfio.len()).filter_map(|i| self.vfio_endpoint(i)))
            .collect()
    }

    /// The DMA attachment of each zero-copy disk (io_uring registered
    /// buffers, named by the disk's id) and of each VFIO device (a VFIO
    /// container for its IOMMU group), reaching guest memory through the
    /// virtio-iommu or, without one, all populated RAM.
    pub fn assigned_devices(&self) -> Result<Vec<AssignedDeviceSpec>, ConfigError> {
        let path = |endpoint: Option<u32>| match endpoint {
            Some(endpoint) => AssignedPath::Viommu {
                endpoint,
                guard: Default::default(),
            },
            None => AssignedPath::Ram,
        };
        let disks = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.zero_copy)
            .map(|(i, d)| {
                Ok(AssignedDeviceSpec {
                    name: d.id.clone(),
                    backend: DmaBackend::UringIo,
                    path: path(self.disk_endpoint(i)),
                })
            });
        let vfio = self.vfio.iter().enumerate().map(|(i, v)| {
            Ok(AssignedDeviceSpec {
                name: v.host.clone(),
                backend: DmaBackend::Vfio {
                    group: v.iommu_group()?,
                },
                path: path(self.vfio_endpoint(i)),
            })
        });
        disks.chain(vfio).collect()
    }

    /// The machine: boot RAM split around the 32-bit gap, virtio-mem
    /// regions from the device-memory start, each aligned to
    /// max(block size, [`VMEM_REGION_ALIGN`]), and the virtio-iommu.
    pub fn machine_config(&self) -> Result<MachineConfig, ConfigError> {
        let ram = layout::boot_ram(self.memory)
            .into_iter()
            .map(|(addr, size)| RamSpec { addr, size })
            .collect();
        // Unattached endpoints start blocked (`bypass` 0), where QEMU lets
        // them bypass for its firmware: memvisor boots the kernel directly,
        // nothing DMAs before the guest's driver attaches the endpoints, and
        // a device in bypass makes its DMA backend pin all guest RAM. The
        // guest may still turn bypass on (`VIRTIO_IOMMU_F_BYPASS_CONFIG`) or
        // attach to an identity domain.
        let virtio_iommu = self.viommu.then(|| VirtioIommuSpec {
            endpoints: self.iommu_endpoints(),
            bypass: false,
            ..VirtioIommuSpec::default()
        });
        Ok(MachineConfig {
            ram,
            virtio_mem: self.vmem_specs()?,
            virtio_iommu,
            dma: DmaSpec {
                devices: self.assigned_devices()?,
                pin_budget: self.pin_budget,
            },
        })
    }

    /// The virtio-mem regions, placed from the device-memory start, each
    /// aligned to max(block size, [`VMEM_REGION_ALIGN`]).
    fn vmem_specs(&self) -> Result<Vec<VirtioMemSpec>, ConfigError> {
        let mut next = layout::device_memory_start(self.memory);
        let mut virtio_mem = Vec::new();
        for v in &self.vmem {
            let align = v.block_size.max(VMEM_REGION_ALIGN);
            if !v.block_size.is_power_of_two() || v.size == 0 || v.size % align != 0 {
                return Err(ConfigError(format!(
                    "--vmem id={}: size {} must be a non-zero multiple of {} (the block size, at least 128M)",
                    v.id, v.size, align
                )));
            }
            let addr = next.next_multiple_of(align);
            next = addr
                .checked_add(v.size)
                .ok_or_else(|| ConfigError(format!("--vmem id={}: size {} is too large", v.id, v.size)))?;
            virtio_mem.push(VirtioMemSpec {
                requested_size: v.requested,
                prealloc: v.prealloc,
                ..VirtioMemSpec::new(v.id.clone(), addr, v.size, v.block_size)
            });
        }
        Ok(virtio_mem)
    }

    /// The PCI 64-bit MMIO window: after the device memory, 1 GiB aligned.
    pub fn mmio64_window(&self) -> Result<(u64, u64), ConfigError> {
        // Only the virtio-mem placement: not the whole machine, whose VFIO
        // devices would be looked up in sysfs again at every boot.
        let end = self
            .vmem_specs()?
            .iter()
            .map(|v| v.addr + v.region_size)
            .max()
            .unwrap_or(layout::device_memory_start(self.memory));
        Ok((
            end.next_multiple_of(layout::DEVICE_MEMORY_ALIGN),
            layout::PCI_MMIO64_SIZE,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmmConfig {
        VmmConfig {
            kernel: "vmlinuz".into(),
            initrd: None,
            cmdline: default_cmdline(),
            cpus: 2,
            memory: 512 << 20,
            vmem: vec![VmemConfig {
                id: "vmem0".into(),
                size: 1 << 30,
                block_size: 2 << 20,
                requested: 0,
                prealloc: false,
            }],
            viommu: true,
            disks: vec![
                DiskConfig {
                    id: "disk0".into(),
                    path: "a.img".into(),
                    read_only: false,
                    iommu: true,
                    zero_copy: true,
                },
                DiskConfig {
                    id: "disk1".into(),
                    path: "b.img".into(),
                    read_only: false,
                    iommu: false,
                    zero_copy: false,
                },
            ],
            vfio: vec![],
            serial: SerialConfig::Stdio,
            api_socket: None,
            pin_budget: None,
        }
    }

    #[test]
    fn layout_slots_and_endpoints() {
        let c = config();
        c.validate().unwrap();
        let m = c.machine_config().unwrap();
        assert_eq!(
            m.ram,
            [RamSpec {
                addr: 0,
                size: 512 << 20
            }]
        );
        assert_eq!(m.virtio_mem[0].addr, 4 << 30);
        assert!(m.virtio_mem[0].unplugged_inaccessible);
        assert_eq!(
            c.slots(),
            PciSlots {
                iommu: Some(1),
                vmem: vec![2],
                disks: vec![3, 4],
                vfio: vec![],
            }
        );
        assert_eq!(c.iommu_endpoints(), [3 << 3], "only the disk with iommu on");
        assert_eq!((c.disk_endpoint(0), c.disk_endpoint(1)), (Some(24), None));
        let mut v = c.clone();
        v.vfio.push(VfioConfig {
            host: "0000:00:99.0".into(),
            iommu: true,
        });
        assert_eq!(v.slots().vfio, [5]);
        assert_eq!(v.iommu_endpoints(), [24, 40]);
        let e = v.machine_config().unwrap_err().0;
        assert!(e.contains("0000:00:99.0") && e.contains("iommu_group"), "{e}");
        assert_eq!(m.virtio_iommu.unwrap().endpoints, [24]);
        // The zero-copy disk is an assigned device behind its endpoint;
        // the other disk pins nothing.
        assert_eq!(
            m.dma.devices,
            [AssignedDeviceSpec {
                name: "disk0".into(),
                backend: DmaBackend::UringIo,
                path: AssignedPath::Viommu {
                    endpoint: 24,
                    guard: Default::default()
                },
            }]
        );
        let mut no_iommu = c.clone();
        no_iommu.viommu = false;
        assert_eq!(
            no_iommu.machine_config().unwrap().dma.devices[0].path,
            AssignedPath::Ram
        );
        assert_eq!(c.mmio64_window().unwrap(), (5 << 30, layout::PCI_MMIO64_SIZE));
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = config();
        c.cpus = 0;
        assert!(c.validate().unwrap_err().0.contains("--cpus 0"));
        let mut c = config();
        c.vmem[0].size = 100 << 20;
        assert!(c.machine_config().unwrap_err().0.contains("104857600"));
        let mut c = config();
        c.disks[1].id = "vmem0".into();
        assert!(c.validate().unwrap_err().0.contains("vmem0"));
        let json = serde_json::to_string(&config()).unwrap();
        assert_eq!(serde_json::from_str::<VmmConfig>(&json).unwrap(), config());
    }
}
