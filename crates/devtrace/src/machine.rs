//! The machine a trace header describes, built from the real components,
//! and the guest driver that talks to its devices.
//!
//! [`Machine::new`] backs every `ram` range with a memfd [`RamBlock`],
//! builds the virtio-mem region (its own memfd, managed RAM in the memory
//! map) and device, the virtio-iommu device with the header's endpoints,
//! and the DMA layer the [`MachineOptions`] ask for:
//!
//! * with a virtio-iommu, every endpoint is an assigned device: one
//!   [`DmaMapper`] and one [`ViommuDmaBridge`] per endpoint (the bridge is
//!   the endpoint's IOMMU notifier and a discard listener of the virtio-mem
//!   region), all charging one [`PinBudget`];
//! * without one, one assigned device sees guest-physical memory: a
//!   [`RamDmaListener`] maps boot RAM and every plugged block;
//! * [`DmaBackend::None`] attaches no mapper (the IOMMU device still checks
//!   every MAP against populated RAM).
//!
//! Each assigned device is a vmstate [`DmaDevice`], whose section carries
//! its path through a migration and attaches it again on load.
//!
//! [`ViommuDmaBridge`]: memvisor_dma::viommu_bridge::ViommuDmaBridge
//! [`RamDmaListener`]: memvisor_dma::ram_listener::RamDmaListener
//!
//! The driver side lives in a small RAM region of its own (the *driver
//! RAM*, [`DRIVER_RAM_SIZE`] bytes at the first 1 GiB boundary above all
//! trace memory), so that the rings and buffers never overlap memory the
//! trace maps or plugs. A device is activated — features accepted, fresh
//! queues laid out there — before the first request after construction,
//! a reset or a restore, as a (re)booting guest's driver does.

use std::io::{Read, Write};
use std::sync::Arc;

use memvisor_dma::mapper::{DmaMapper, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_dma::vfio::{VfioContainerMapper, VfioSetupError};
use memvisor_dma::viommu_bridge::UnplugGuard;
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::{GuestMemoryMap, MapError};
use memvisor_memory::policy::DiscardPolicy;
use memvisor_memory::{Backing, RamBlock, RamBlockError};
use memvisor_virtio::driver::{Buf, DriverError, DriverQueue};
use memvisor_virtio::{ActivateError, EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::config::ConfigError;
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::{IommuConfig, IommuHandle, Limits, Request as IommuRequest, Status, VirtioIommu, wire};
use memvisor_virtio_mem::defs::{CONFIG_SIZE, RESPONSE_SIZE, VirtioMemConfig, VirtioMemResp};
use memvisor_virtio_mem::{
    BlockRange, BlockState, Request as MemRequest, VirtioMem, VirtioMemError, VirtioMemOptions, VirtioMemRegion,
};
use memvisor_vmstate::devices::dma::{DmaAttachError, DmaDevice, DmaPath, DmaTarget};
use memvisor_vmstate::devices::virtio_iommu::VirtioIommuSection;
use memvisor_vmstate::devices::virtio_mem::VirtioMemSection;
use memvisor_vmstate::{Registry, VmStateError, ram};
use vm_memory::GuestAddress;

use crate::trace::{Device, Header, IommuDevice, MemDevice, MemResp};

/// Bytes of the driver RAM that holds the rings and request buffers.
pub const DRIVER_RAM_SIZE: u64 = 1 << 20;

const GIB: u64 = 1 << 30;
/// Offsets of the queues inside the driver RAM.
const VMEM_QUEUE_AT: u64 = 0;
const IOMMU_REQUESTS_AT: u64 = 256 << 10;
const IOMMU_EVENTS_AT: u64 = 512 << 10;
/// Buffer space of each queue (one request is in flight at a time).
const QUEUE_DATA: u64 = 16 << 10;
/// Event buffers a driver gives the virtio-iommu (Linux fills the queue).
const IOMMU_EVENT_BUFFERS: usize = 64;

/// Which [`DmaMapper`] backs the assigned devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaBackend {
    /// Real long-term pinning through io_uring registered buffers.
    #[default]
    Uring,
    /// A VFIO type1v2 container holding IOMMU group `group` (one assigned
    /// device, so at most one endpoint).
    Vfio {
        /// The IOMMU group number.
        group: u32,
    },
    /// No assigned device: nothing is pinned.
    None,
}

/// How to build a [`Machine`] beyond what the trace header says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineOptions {
    /// The DMA backend of the assigned devices.
    pub dma: DmaBackend,
    /// What the vIOMMU bridges do when the guest unplugs memory a live
    /// mapping pins.
    pub unplug_guard: UnplugGuard,
    /// The VM's pin budget in bytes; `None` is unlimited.
    pub pin_budget: Option<u64>,
}

/// Why a machine could not be built, driven, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The header asks for something this machine cannot be.
    #[error("trace header (line 1): {0}")]
    Header(String),
    /// A RAM block could not be created.
    #[error("trace header (line 1): RAM block `{name}`: {source}")]
    Ram {
        /// The block's name.
        name: String,
        /// The error.
        source: RamBlockError,
    },
    /// The guest memory map could not be built.
    #[error("trace header (line 1): guest memory map: {0}")]
    Map(#[from] MapError),
    /// The virtio-mem device could not be built or managed.
    #[error("{0}")]
    VirtioMem(#[from] VirtioMemError),
    /// The virtio-iommu configuration is invalid.
    #[error("trace header (line 1): virtio-iommu: {0}")]
    IommuConfig(#[from] ConfigError),
    /// The DMA layer could not be attached.
    #[error("DMA setup: {0}")]
    Dma(#[from] DmaAttachError),
    /// The VFIO container could not be opened.
    #[error("--dma vfio: {0}")]
    Vfio(#[from] VfioSetupError),
    /// The driver could not lay out its queues.
    #[error("driver queue: {0}")]
    Driver(#[from] DriverError),
    /// A device refused activation.
    #[error("activation: {0}")]
    Activate(#[from] ActivateError),
    /// An eventfd could not be created.
    #[error("interrupt eventfd: {0}")]
    Interrupt(std::io::Error),
    /// The migration stream could not be written or loaded.
    #[error("migration stream: {0}")]
    VmState(#[from] VmStateError),
}

/// What a device answered a request with, as the driver read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<T> {
    /// The device used the buffers and wrote this.
    Answered(T),
    /// The device did not answer (it entered NEEDS_RESET, or wrote a
    /// response the driver cannot read); the driver resets it.
    NoAnswer,
}

/// A virtio-mem answer: response type (`None` for a value outside the
/// specification) and, for an ACKed STATE, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAnswer {
    /// The response type.
    pub resp: Option<MemResp>,
    /// The raw response type.
    pub resp_wire: u16,
    /// The state of a STATE request (meaningful only with ACK).
    pub state: Option<BlockState>,
}

struct MemPart {
    region: Arc<VirtioMemRegion>,
    dev: VirtioMem,
    queue: Option<DriverQueue>,
}

struct IommuPart {
    id: String,
    endpoints: Vec<u32>,
    dev: VirtioIommu,
    handle: IommuHandle,
    probe_size: u32,
    requests: Option<DriverQueue>,
    events: Option<DriverQueue>,
}

/// The replay machine; see the [module documentation](self).
pub struct Machine {
    // Drop order matters: the DMA layer goes first (unpinning everything,
    // see `Drop`), then devices, then memory.
    /// The assigned devices with the path each attaches through (one per
    /// vIOMMU endpoint, or one on plain RAM); empty without a backend.
    dma: Vec<(DmaDevice, DmaPath)>,
    budget: Arc<PinBudget>,
    mem: Option<MemPart>,
    iommu: Option<IommuPart>,
    /// Which part each header device is: `true` for virtio-mem.
    kinds: Vec<bool>,
    map: GuestMemoryMap,
    driver_base: u64,
    policy: DiscardPolicy,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("regions", &self.map.regions().len())
            .field("virtio_mem", &self.mem.as_ref().map(|m| m.region.clone()))
            .field("virtio_iommu", &self.iommu.as_ref().map(|i| i.handle.clone()))
            .field("dma", &self.dma.len())
            .field("pinned_bytes", &self.pinned_bytes())
            .finish()
    }
}

fn ram_block(name: &str, size: u64) -> Result<Arc<RamBlock>, MachineError> {
    RamBlock::new(name, size, Backing::Memfd)
        .map(Arc::new)
        .map_err(|source| MachineError::Ram {
            name: name.to_string(),
            source,
        })
}

fn iommu_config(d: &IommuDevice) -> IommuConfig {
    IommuConfig {
        page_size_mask: d.page_size_mask,
        input_start: d.input_start,
        input_end: d.input_end,
        domain_start: d.domain_start,
        domain_end: d.domain_end,
        bypass: d.bypass,
        reserved_regions: d.reserved_regions.clone(),
        endpoints: d.endpoints.clone(),
        limits: Limits::default(),
        ..IommuConfig::default()
    }
}

impl Machine {
    /// Builds the machine `header` describes; see the [module documentation](self).
    ///
    /// # Errors
    ///
    /// More than one virtio-mem or virtio-iommu device, overlapping memory,
    /// invalid device geometry or IOMMU configuration, a VFIO container
    /// that cannot be opened, `--dma vfio` with more than one endpoint.
    pub fn new(header: &Header, options: &MachineOptions) -> Result<Self, MachineError> {
        let this = Self::build(header, options)?;
        // Each registration or listener pins what its path reaches: a
        // bridge gets the endpoint's mappings replayed, the plain-RAM
        // listener maps all populated RAM.
        for (device, path) in &this.dma {
            device.attach(*path)?;
        }
        Ok(this)
    }

    /// The machine with its DMA devices created but not attached.
    fn build(header: &Header, options: &MachineOptions) -> Result<Self, MachineError> {
        let mems: Vec<&MemDevice> = header
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Mem(m) => Some(m),
                Device::Iommu(_) => None,
            })
            .collect();
        let iommus: Vec<&IommuDevice> = header
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Iommu(i) => Some(i),
                Device::Mem(_) => None,
            })
            .collect();
        if mems.len() > 1 || iommus.len() > 1 {
            return Err(MachineError::Header(format!(
                "the replayer builds at most one virtio-mem and one virtio-iommu device; the header has {} and {}",
                mems.len(),
                iommus.len()
            )));
        }
        let kinds = header.devices.iter().map(|d| matches!(d, Device::Mem(_))).collect();

        // Memory: boot RAM, the virtio-mem region, the driver's RAM above both.
        let mut builder = GuestMemoryMap::builder();
        let mut top = 0u64;
        for (i, r) in header.ram.iter().enumerate() {
            let end = r.addr.checked_add(r.size).ok_or_else(|| {
                MachineError::Header(format!("ram[{i}] at {:#x} of {:#x} bytes wraps around", r.addr, r.size))
            })?;
            top = top.max(end);
            builder = builder.ram(r.addr, ram_block(&format!("ram{i}"), r.size)?)?;
        }
        let mut mem = None;
        if let Some(m) = mems.first() {
            let block = ram_block(&m.id, m.region_size)?;
            let region = VirtioMemRegion::new(
                block.clone(),
                VirtioMemOptions {
                    block_size: Some(m.block_size),
                    requested_size: m.requested_size,
                    unplugged_inaccessible: m.unplugged_inaccessible,
                    prealloc: false,
                    ..VirtioMemOptions::new(m.addr)
                },
            )?;
            top = top.max(m.addr + m.region_size);
            builder = builder.managed_ram(m.addr, block, region.clone() as Arc<dyn RamDiscardManager>)?;
            mem = Some(MemPart {
                dev: VirtioMem::new(region.clone()),
                region,
                queue: None,
            });
        }
        let driver_base = top
            .checked_next_multiple_of(GIB)
            .filter(|b| b.checked_add(DRIVER_RAM_SIZE).is_some())
            .ok_or_else(|| MachineError::Header("no room above the trace's memory for the driver's rings".into()))?;
        builder = builder.ram(driver_base, ram_block("driver", DRIVER_RAM_SIZE)?)?;
        let map = builder.build()?;

        let policy = DiscardPolicy::new();
        let budget = Arc::new(match options.pin_budget {
            Some(limit) => PinBudget::limited(limit),
            None => PinBudget::unlimited(),
        });
        let mut this = Self {
            dma: Vec::new(),
            budget,
            mem,
            iommu: None,
            kinds,
            map,
            driver_base,
            policy,
        };

        if let Some(d) = iommus.first() {
            let config = iommu_config(d);
            let dev = VirtioIommu::new(config.clone(), Some(this.map.clone()))?;
            let handle = dev.handle();
            this.iommu = Some(IommuPart {
                id: d.id.clone(),
                endpoints: d.endpoints.clone(),
                dev,
                handle: handle.clone(),
                probe_size: config.probe_size,
                requests: None,
                events: None,
            });
        }
        this.dma = this.dma_devices(options)?;
        Ok(this)
    }

    /// The assigned devices, detached: one per vIOMMU endpoint (path 2),
    /// or one on plain RAM (path 1); none with [`DmaBackend::None`].
    fn dma_devices(&self, options: &MachineOptions) -> Result<Vec<(DmaDevice, DmaPath)>, MachineError> {
        let mut devices = Vec::new();
        let Some(iommu) = &self.iommu else {
            if let Some(device) = self.dma_device("assigned0", options.dma)? {
                devices.push((device, DmaPath::Ram));
            }
            return Ok(devices);
        };
        if matches!(options.dma, DmaBackend::Vfio { .. }) && iommu.endpoints.len() > 1 {
            return Err(MachineError::Header(format!(
                "--dma vfio assigns one device (one IOMMU group), but the virtio-iommu has {} endpoints",
                iommu.endpoints.len()
            )));
        }
        for &endpoint in &iommu.endpoints {
            let name = format!("{}:ep{endpoint}", iommu.id);
            if let Some(device) = self.dma_device(&name, options.dma)? {
                let path = DmaPath::Viommu {
                    iommu_instance: 0,
                    endpoint,
                    guard: options.unplug_guard,
                };
                devices.push((device, path));
            }
        }
        Ok(devices)
    }

    fn dma_device(&self, name: &str, backend: DmaBackend) -> Result<Option<DmaDevice>, MachineError> {
        let mapper: Arc<dyn DmaMapper> = match backend {
            DmaBackend::None => return Ok(None),
            DmaBackend::Uring => Arc::new(UringPinner::new(name, self.budget.clone())),
            DmaBackend::Vfio { group } => Arc::new(VfioContainerMapper::open(name, group, self.budget.clone())?),
        };
        let target = DmaTarget {
            memory: self.map.clone(),
            mapper,
            policy: self.policy.clone(),
            iommu: self.iommu.as_ref().map(|i| i.handle.clone()),
        };
        Ok(Some(DmaDevice::new(name, target)))
    }

    /// The vmstate registry of this machine's state: RAM (populated only),
    /// the virtio-mem region, the virtio-iommu domains and mappings.
    fn registry(&self) -> Result<Registry, MachineError> {
        let mut registry = Registry::with_memory(self.map.clone());
        ram::register_ram(&mut registry, &self.map)?;
        if let Some(m) = &self.mem {
            registry.register(VirtioMemSection::new(0, m.region.clone()))?;
        }
        if let Some(i) = &self.iommu {
            registry.register(VirtioIommuSection::new(0, i.handle.clone()))?;
        }
        for (instance, (device, _)) in (0..).zip(&self.dma) {
            registry.register(device.section(instance))?;
        }
        Ok(registry)
    }

    /// The guest memory map (boot RAM, the virtio-mem region, driver RAM).
    pub fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    /// Guest-physical start of the driver RAM.
    pub fn driver_ram(&self) -> u64 {
        self.driver_base
    }

    /// The virtio-mem region, if the machine has one.
    pub fn vmem_region(&self) -> Option<&Arc<VirtioMemRegion>> {
        self.mem.as_ref().map(|m| &m.region)
    }

    /// The virtio-iommu handle, if the machine has one.
    pub fn iommu_handle(&self) -> Option<&IommuHandle> {
        self.iommu.as_ref().map(|i| &i.handle)
    }

    /// Bytes plugged in the virtio-mem region (0 without one).
    pub fn plugged_size(&self) -> u64 {
        self.mem.as_ref().map_or(0, |m| m.region.plugged_size())
    }

    /// Bytes the DMA backends have pinned now, by their own count.
    pub fn pinned_bytes(&self) -> u64 {
        self.dma.iter().map(|(d, _)| d.pinned_bytes()).sum()
    }

    /// The guest-physical ranges the vIOMMU bridges hold pinned now, by
    /// their own record (empty without a vIOMMU or a DMA backend).
    pub fn pinned_ranges(&self) -> Vec<memvisor_memory::GuestRange> {
        self.dma
            .iter()
            .flat_map(|(d, _)| d.pinned_ranges().unwrap_or_default())
            .collect()
    }

    /// The VM's pin budget.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.budget
    }

    /// True if header device `index` is the virtio-mem device.
    pub fn is_vmem(&self, index: usize) -> bool {
        self.kinds.get(index).copied().unwrap_or(false)
    }

    fn mem_part(&mut self) -> &mut MemPart {
        self.mem
            .as_mut()
            .expect("the parser routes virtio-mem ops to a virtio-mem device")
    }

    fn iommu_part(&mut self) -> &mut IommuPart {
        self.iommu
            .as_mut()
            .expect("the parser routes virtio-iommu ops to a virtio-iommu device")
    }

    fn activate_vmem(&mut self) -> Result<(), MachineError> {
        let base = self.driver_base;
        let map = self.map.clone();
        let part = self.mem_part();
        if part.dev.is_active() && part.queue.is_some() {
            return Ok(());
        }
        let queue = DriverQueue::new(
            &map,
            GuestAddress(base + VMEM_QUEUE_AT),
            part.dev.queue_max_sizes()[0],
            QUEUE_DATA,
        )?;
        let irq = Arc::new(EventFdInterrupt::new(1).map_err(MachineError::Interrupt)?);
        part.dev.ack_features(part.dev.avail_features());
        part.dev.activate(map, irq, vec![queue.device_queue()])?;
        part.queue = Some(queue);
        Ok(())
    }

    fn activate_iommu(&mut self) -> Result<(), MachineError> {
        let base = self.driver_base;
        let map = self.map.clone();
        let part = self.iommu_part();
        if part.requests.is_some() {
            return Ok(());
        }
        let sizes = part.dev.queue_max_sizes().to_vec();
        let requests = DriverQueue::new(&map, GuestAddress(base + IOMMU_REQUESTS_AT), sizes[0], QUEUE_DATA)?;
        // Linux's virtio-iommu driver polls its request queue (it has no
        // callback), so it asks for no interrupts there.
        requests.suppress_interrupts(true);
        let mut events = DriverQueue::new(&map, GuestAddress(base + IOMMU_EVENTS_AT), sizes[1], QUEUE_DATA)?;
        let irq = Arc::new(EventFdInterrupt::new(2).map_err(MachineError::Interrupt)?);
        part.dev.ack_features(part.dev.avail_features());
        part.dev
            .activate(map, irq, vec![requests.device_queue(), events.device_queue()])?;
        for _ in 0..IOMMU_EVENT_BUFFERS.min(usize::from(sizes[1])) {
            events.add(&[Buf::Out(wire::FAULT_SIZE as u32)])?;
        }
        part.dev.queue_notify(wire::EVENT_QUEUE);
        part.requests = Some(requests);
        part.events = Some(events);
        Ok(())
    }

    /// Sends a virtio-mem request through the device's queue, activating
    /// the device first if needed, and reads the answer back.
    pub fn vmem_request(&mut self, request: MemRequest) -> Result<Answer<MemAnswer>, MachineError> {
        self.activate_vmem()?;
        let part = self.mem_part();
        let queue = part.queue.as_mut().expect("activated");
        queue.add(&[Buf::In(&request.to_bytes()), Buf::Out(RESPONSE_SIZE as u32)])?;
        part.dev.queue_notify(0);
        let used = part.queue.as_mut().expect("activated").pop_used();
        let answer = used
            .filter(|u| u.len as usize == RESPONSE_SIZE)
            .and_then(|u| VirtioMemResp::from_bytes(&u.data));
        match answer {
            Some(r) => Ok(Answer::Answered(MemAnswer {
                resp: MemResp::from_wire(r.resp_type),
                resp_wire: r.resp_type,
                state: BlockState::from_wire(r.state),
            })),
            None => {
                // As a driver does with a device in NEEDS_RESET: reset it
                // and set it up again before the next request.
                part.dev.reset();
                part.queue = None;
                Ok(Answer::NoAnswer)
            }
        }
    }

    /// The virtio-mem configuration space, read as a driver reads it.
    pub fn vmem_config(&mut self) -> VirtioMemConfig {
        let part = self.mem_part();
        let mut bytes = [0u8; CONFIG_SIZE];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            part.dev.read_config(i as u64 * 4, chunk);
        }
        VirtioMemConfig::from_bytes(&bytes).expect("CONFIG_SIZE bytes")
    }

    /// Management changes the requested size.
    pub fn set_requested_size(&mut self, size: u64) -> Result<(), MachineError> {
        Ok(self.mem_part().region.set_requested_size(size)?)
    }

    /// Sends a virtio-iommu request through the request queue, activating
    /// the device first if needed, and reads the status back.
    pub fn iommu_request(&mut self, request: IommuRequest) -> Result<Answer<Status>, MachineError> {
        self.activate_iommu()?;
        let part = self.iommu_part();
        let out = match request {
            IommuRequest::Probe(_) => part.probe_size + wire::TAIL_SIZE as u32,
            _ => wire::TAIL_SIZE as u32,
        };
        let queue = part.requests.as_mut().expect("activated");
        queue.add(&[Buf::In(&request.encode()), Buf::Out(out)])?;
        part.dev.queue_notify(wire::REQUEST_QUEUE);
        let used = part.requests.as_mut().expect("activated").pop_used();
        let status = used
            .filter(|u| u.len as usize >= wire::TAIL_SIZE && u.data.len() == u.len as usize)
            .and_then(|u| Status::from_u8(u.data[u.data.len() - wire::TAIL_SIZE]));
        match status {
            Some(status) => Ok(Answer::Answered(status)),
            None => {
                part.dev.reset();
                part.requests = None;
                part.events = None;
                Ok(Answer::NoAnswer)
            }
        }
    }

    /// A machine reset as seen by header device `index`: virtio-mem unplugs
    /// everything and recomputes its usable region; virtio-iommu forgets
    /// its domains and mappings. Either device is reset and gets fresh
    /// queues before its next request.
    pub fn system_reset(&mut self, index: usize) -> Result<(), MachineError> {
        if self.is_vmem(index) {
            let part = self.mem_part();
            part.dev.system_reset()?;
            part.queue = None;
        } else {
            let part = self.iommu_part();
            part.dev.reset();
            part.handle.system_reset();
            part.requests = None;
            part.events = None;
        }
        Ok(())
    }

    /// Saves the whole machine to `w` as a vmstate stream — RAM
    /// (populated memory only), the virtio-mem region, the virtio-iommu
    /// domains and mappings, and each assigned device's DMA path
    /// (configuration only: pins are re-derived on load), in the order
    /// vmstate declares — and returns the bytes written. The machine is
    /// meant to be dropped afterwards (which releases every pin).
    ///
    /// Not in the stream: the DMA backends (given again to
    /// [`restore`](Self::restore) in its options), and the virtqueues
    /// (each request completes before the next event, so no request is in
    /// flight; the restored machine's driver sets its queues up anew, as it
    /// does after a reset).
    pub fn save(&mut self, w: &mut dyn Write) -> Result<u64, MachineError> {
        let summary = self.registry()?.save(w)?;
        Ok(summary.total_bytes)
    }

    /// Builds a fresh machine for `header` and `options` and loads a
    /// stream written by [`save`](Self::save) into it. The DMA sections
    /// attach their devices once the whole stream is loaded and checked
    /// (loading RAM discards what the source did not send): the bridges'
    /// registration replays every restored mapping (checked against the
    /// restored blocks, and pinned), or the plain-RAM listener maps all
    /// populated RAM. The devices are activated with fresh queues before
    /// their next request.
    pub fn restore(header: &Header, options: &MachineOptions, r: &mut dyn Read) -> Result<Self, MachineError> {
        let machine = Self::build(header, options)?;
        machine.registry()?.load(std::io::BufReader::new(r))?;
        Ok(machine)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Detaching unregisters each bridge from the IOMMU (which unmaps
        // through it) and unpins whatever is left, before the devices and
        // memory go.
        for (device, _) in self.dma.drain(..) {
            device.detach();
        }
    }
}

/// Builds a virtio-mem request.
pub fn mem_request(op: &crate::trace::Op) -> Option<MemRequest> {
    use crate::trace::Op;
    Some(match *op {
        Op::Plug { addr, nb_blocks, .. } => MemRequest::Plug(BlockRange { addr, nb_blocks }),
        Op::Unplug { addr, nb_blocks, .. } => MemRequest::Unplug(BlockRange { addr, nb_blocks }),
        Op::UnplugAll { .. } => MemRequest::UnplugAll,
        Op::State { addr, nb_blocks, .. } => MemRequest::State(BlockRange { addr, nb_blocks }),
        _ => return None,
    })
}

/// Builds a virtio-iommu request.
pub fn iommu_request(op: &crate::trace::Op) -> Option<IommuRequest> {
    use crate::trace::Op;
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
