//! The machine a trace header describes, and the guest that drives it.
//!
//! [`machine_config`] turns a [`Header`] and the [`ReplayMachineOptions`]
//! into a [`MachineConfig`]: every `ram` range as boot RAM, the virtio-mem
//! device, the virtio-iommu with the header's endpoints, and the assigned
//! devices the options ask for:
//!
//! * with a virtio-iommu, every endpoint is an assigned device
//!   (`<iommu id>:ep<endpoint>`, path 2), all charging one pin budget;
//! * without one, one assigned device (`assigned0`) sees guest-physical
//!   memory (path 1): boot RAM and every plugged block are pinned;
//! * `dma: None` assigns no device (the IOMMU device still checks every
//!   MAP against populated RAM).
//!
//! A [`ReplayMachine`] is that [`Machine`] plus the replayer's [`Guest`],
//! whose driver area is a RAM range of its own ([`DRIVER_AREA_SIZE`] bytes
//! at the first 1 GiB boundary above all trace memory), so that the rings
//! and buffers never overlap memory the trace maps or plugs.

use std::io::{Read, Write};

use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_guest::{Answer, DRIVER_AREA_SIZE, Guest, GuestError, MemAnswer};
use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, MachineError, RamSpec,
    VirtioIommuSpec, VirtioMemSpec,
};
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::{Request as IommuRequest, Status};
use memvisor_virtio_mem::wire::VirtioMemConfig;
use memvisor_virtio_mem::{BlockRange, Request as MemRequest};

use crate::trace::{Device, Header, Op};

const GIB: u64 = 1 << 30;

/// How to build a replay machine beyond what the trace header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayMachineOptions {
    /// The backend of the assigned devices; `None` assigns none.
    pub dma: Option<DmaBackend>,
    /// What the vIOMMU bridges do when the guest unplugs memory a live
    /// mapping pins.
    pub unplug_guard: UnplugGuard,
    /// The VM's pin budget in bytes; `None` is unlimited.
    pub pin_budget: Option<u64>,
}

impl Default for ReplayMachineOptions {
    /// io_uring pinning, the `reject` guard, no budget.
    fn default() -> Self {
        Self {
            dma: Some(DmaBackend::Uring),
            unplug_guard: UnplugGuard::Reject,
            pin_budget: None,
        }
    }
}

/// Why a replay machine could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum ReplayMachineError {
    /// The header asks for something the replayer cannot build.
    #[error("trace header (line 1): {0}")]
    Header(String),
    /// The VFIO container of `--dma vfio` could not be opened.
    #[error("--dma vfio: {0}")]
    Vfio(MachineError),
    /// The machine could not be built, saved or restored.
    #[error("{0}")]
    Machine(#[from] MachineError),
    /// The guest could not drive a device.
    #[error("{0}")]
    Guest(#[from] GuestError),
    /// A virtio-mem operation of the host failed (e.g. an invalid
    /// requested size).
    #[error("{0}")]
    VirtioMem(#[from] memvisor_virtio_mem::VirtioMemError),
}

/// The [`MachineConfig`] of `header` with `options`, and the start of the
/// driver area above all of the header's memory.
pub fn machine_config(
    header: &Header,
    options: &ReplayMachineOptions,
) -> Result<(MachineConfig, u64), ReplayMachineError> {
    let mut config = MachineConfig::default();
    let mut top = 0u64;
    for (i, r) in header.ram.iter().enumerate() {
        let end = r.addr.checked_add(r.size).ok_or_else(|| {
            ReplayMachineError::Header(format!("ram[{i}] at {:#x} of {:#x} bytes wraps around", r.addr, r.size))
        })?;
        top = top.max(end);
        config.ram.push(RamSpec {
            addr: r.addr,
            size: r.size,
        });
    }
    let (mut mems, mut iommus) = (0, 0);
    for device in &header.devices {
        match device {
            Device::Mem(m) => {
                mems += 1;
                top = top.max(m.addr.saturating_add(m.region_size));
                config.virtio_mem.push(VirtioMemSpec {
                    id: m.id.clone(),
                    addr: m.addr,
                    region_size: m.region_size,
                    block_size: m.block_size,
                    requested_size: m.requested_size,
                    unplugged_inaccessible: m.unplugged_inaccessible,
                    node_id: None,
                    prealloc: false,
                });
            }
            Device::Iommu(d) => {
                iommus += 1;
                config.virtio_iommu = Some(VirtioIommuSpec {
                    id: d.id.clone(),
                    endpoints: d.endpoints.clone(),
                    page_size_mask: d.page_size_mask,
                    input_start: d.input_start,
                    input_end: d.input_end,
                    domain_start: d.domain_start,
                    domain_end: d.domain_end,
                    bypass: d.bypass,
                    reserved_regions: d.reserved_regions.clone(),
                });
            }
        }
    }
    if mems > 1 || iommus > 1 {
        return Err(ReplayMachineError::Header(format!(
            "the replayer builds at most one virtio-mem and one virtio-iommu device; the header has {mems} and {iommus}"
        )));
    }
    let driver_base = top
        .checked_next_multiple_of(GIB)
        .filter(|b| b.checked_add(DRIVER_AREA_SIZE).is_some())
        .ok_or_else(|| ReplayMachineError::Header("no room above the trace's memory for the driver's rings".into()))?;
    config.ram.push(RamSpec {
        addr: driver_base,
        size: DRIVER_AREA_SIZE,
    });

    config.dma = DmaSpec {
        devices: Vec::new(),
        pin_budget: options.pin_budget,
    };
    if let Some(backend) = options.dma {
        match &config.virtio_iommu {
            None => config.dma.devices.push(AssignedDeviceSpec {
                name: "assigned0".into(),
                backend,
                path: AssignedPath::Ram,
            }),
            Some(iommu) => {
                if matches!(backend, DmaBackend::Vfio { .. }) && iommu.endpoints.len() > 1 {
                    return Err(ReplayMachineError::Header(format!(
                        "--dma vfio assigns one device (one IOMMU group), but the virtio-iommu has {} endpoints",
                        iommu.endpoints.len()
                    )));
                }
                for &endpoint in &iommu.endpoints {
                    config.dma.devices.push(AssignedDeviceSpec {
                        name: format!("{}:ep{endpoint}", iommu.id),
                        backend,
                        path: AssignedPath::Viommu {
                            endpoint,
                            guard: options.unplug_guard,
                        },
                    });
                }
            }
        }
    }
    Ok((config, driver_base))
}

/// The replay machine: a [`Machine`] and the guest that drives it.
pub struct ReplayMachine {
    machine: Machine,
    guest: Guest,
    /// Which kind each header device is: `true` for virtio-mem.
    kinds: Vec<bool>,
}

impl std::fmt::Debug for ReplayMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayMachine")
            .field("machine", &self.machine)
            .field("driver_area", &self.guest.base())
            .finish()
    }
}

impl ReplayMachine {
    /// Builds the machine `header` describes, with `options`.
    pub fn new(header: &Header, options: &ReplayMachineOptions) -> Result<Self, ReplayMachineError> {
        let (config, driver_base) = machine_config(header, options)?;
        let machine = Machine::new(&config).map_err(header_error)?;
        Ok(Self {
            machine,
            guest: Guest::new(driver_base),
            kinds: header.devices.iter().map(|d| matches!(d, Device::Mem(_))).collect(),
        })
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Guest-physical start of the driver area.
    pub fn driver_area(&self) -> u64 {
        self.guest.base()
    }

    /// True if header device `index` is the virtio-mem device.
    pub fn is_vmem(&self, index: usize) -> bool {
        self.kinds.get(index).copied().unwrap_or(false)
    }

    /// Sends a virtio-mem request through the device's queue.
    pub fn vmem_request(&mut self, request: MemRequest) -> Result<Answer<MemAnswer>, ReplayMachineError> {
        Ok(self.guest.vmem_request(&mut self.machine, 0, request)?)
    }

    /// The virtio-mem configuration space, read as a driver reads it.
    pub fn vmem_config(&self) -> Result<VirtioMemConfig, ReplayMachineError> {
        Ok(self.guest.vmem_config(&self.machine, 0)?)
    }

    /// Management changes the requested size.
    pub fn set_requested_size(&mut self, size: u64) -> Result<(), ReplayMachineError> {
        let vmem = self
            .machine
            .vmems()
            .first()
            .ok_or_else(|| GuestError::NoDevice("virtio-mem device".into()))?;
        Ok(vmem.region.set_requested_size(size)?)
    }

    /// Sends a virtio-iommu request through the request queue.
    pub fn iommu_request(&mut self, request: IommuRequest) -> Result<Answer<Status>, ReplayMachineError> {
        Ok(self.guest.iommu_request(&mut self.machine, request)?)
    }

    /// A system reset of the whole machine, in its declared order
    /// ([`Machine::system_reset`]: the IOMMU's endpoints detach, then the
    /// memory devices unplug everything). Every device gets fresh queues
    /// before its next request.
    pub fn system_reset(&mut self) -> Result<(), ReplayMachineError> {
        self.machine.system_reset()?;
        self.guest.forget();
        Ok(())
    }

    /// The number of devices in the trace header.
    pub fn device_count(&self) -> usize {
        self.kinds.len()
    }

    /// Saves the whole machine to `w` (see [`Machine::save`]); returns the
    /// bytes written. No request is in flight between events, so the
    /// queues need not travel: the restored machine's guest sets them up
    /// anew, as after a reset.
    pub fn save(&mut self, w: &mut dyn Write) -> Result<u64, ReplayMachineError> {
        Ok(self.machine.save(w)?)
    }

    /// Builds a fresh machine for `header` and `options` and loads a
    /// stream written by [`save`](Self::save) into it (see
    /// [`Machine::restore`]); the devices are activated with fresh queues
    /// before their next request. On error nothing is pinned.
    pub fn restore(
        header: &Header,
        options: &ReplayMachineOptions,
        r: &mut dyn Read,
    ) -> Result<Self, ReplayMachineError> {
        let (config, driver_base) = machine_config(header, options)?;
        let machine = Machine::restore(&config, r)?;
        Ok(Self {
            machine,
            guest: Guest::new(driver_base),
            kinds: header.devices.iter().map(|d| matches!(d, Device::Mem(_))).collect(),
        })
    }
}

/// Errors of building the machine come from the header's values.
fn header_error(e: MachineError) -> ReplayMachineError {
    match e {
        MachineError::Vfio { .. } => ReplayMachineError::Vfio(e),
        MachineError::Dma(_) => ReplayMachineError::Machine(e),
        other => ReplayMachineError::Header(other.to_string()),
    }
}

/// The virtio-mem request of a trace op.
pub fn mem_request(op: &Op) -> Option<MemRequest> {
    Some(match *op {
        Op::Plug { addr, nb_blocks, .. } => MemRequest::Plug(BlockRange { addr, nb_blocks }),
        Op::Unplug { addr, nb_blocks, .. } => MemRequest::Unplug(BlockRange { addr, nb_blocks }),
        Op::UnplugAll { .. } => MemRequest::UnplugAll,
        Op::State { addr, nb_blocks, .. } => MemRequest::State(BlockRange { addr, nb_blocks }),
        _ => return None,
    })
}

/// The virtio-iommu request of a trace op.
pub fn iommu_request(op: &Op) -> Option<IommuRequest> {
    Some(match *op {
        Op::Attach {
            domain,
            endpoint,
            flags,
            ..
        } => IommuRequest::Attach(Attach {
            domain,
            endpoint,
            flags,
            reserved: [0; 4],
        }),
        Op::Detach { domain, endpoint, .. } => IommuRequest::Detach(Detach { domain, endpoint }),
        Op::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
            ..
        } => IommuRequest::Map(Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        }),
        Op::Unmap {
            domain,
            virt_start,
            virt_end,
            ..
        } => IommuRequest::Unmap(Unmap {
            domain,
            virt_start,
            virt_end,
        }),
        Op::Probe { endpoint, .. } => IommuRequest::Probe(Probe { endpoint }),
        _ => return None,
    })
}
