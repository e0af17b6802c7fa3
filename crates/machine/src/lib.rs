//! One machine, assembled once: a [`MachineConfig`] becomes a [`Machine`]
//! — boot RAM and virtio-mem regions as memfd RAM blocks in one guest
//! memory map, the virtio-mem and virtio-iommu devices, the assigned
//! devices' DMA attachments, the discard-policy guards and the migration
//! registry. It knows no trace, no KVM and no command line: the replay
//! engine, the tests, the benchmarks, the fuzzers and the VMM all build
//! their machines here.
//!
//! ```
//! use memvisor_machine::{AssignedDeviceSpec, AssignedPath, DmaBackend, Machine, MachineConfig};
//! use memvisor_machine::{RamSpec, VirtioMemSpec};
//!
//! const MIB: u64 = 1 << 20;
//! let config = MachineConfig {
//!     ram: vec![RamSpec { addr: 0, size: 4 * MIB }],
//!     virtio_mem: vec![VirtioMemSpec {
//!         requested_size: 16 * MIB,
//!         ..VirtioMemSpec::new("vmem0", 1 << 32, 64 * MIB, 2 * MIB)
//!     }],
//!     virtio_iommu: None,
//!     dma: memvisor_machine::DmaSpec {
//!         devices: vec![AssignedDeviceSpec {
//!             name: "nic0".into(),
//!             backend: DmaBackend::Uring,
//!             path: AssignedPath::Ram,
//!         }],
//!         ..Default::default()
//!     },
//! };
//! let machine = Machine::new(&config).unwrap();
//! // Without a vIOMMU the device sees boot RAM; nothing is plugged yet.
//! assert_eq!(machine.pinned_bytes(), 4 * MIB);
//! // The machine's state saves to a stream and loads into a fresh machine.
//! let mut stream = Vec::new();
//! let mut machine = machine;
//! machine.save(&mut stream).unwrap();
//! drop(machine);
//! let restored = Machine::restore(&config, &mut &stream[..]).unwrap();
//! assert_eq!(restored.pinned_bytes(), 4 * MIB);
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod size;

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;

use memvisor_dma::attach::{AttachLatch, DmaAttachError, DmaDevice, DmaIommu, DmaPath, DmaTarget};
use memvisor_dma::events::DmaEvents;
use memvisor_dma::mapper::{DmaMapper, PinBudget};
use memvisor_dma::uring::UringPinner;
use memvisor_dma::vfio::{VfioContainerMapper, VfioSetupError};
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::{GuestMemoryMap, MapError};
use memvisor_memory::policy::{DiscardGuard, DiscardPolicy, PolicyError};
use memvisor_memory::{Backing, GuestRange, RamBlock, RamBlockError};
use memvisor_virtio_iommu::options::OptionsError;
use memvisor_virtio_iommu::persist::VirtioIommuSection;
use memvisor_virtio_iommu::{IommuHandle, VirtioIommu};
use memvisor_virtio_mem::persist::VirtioMemSection;
use memvisor_virtio_mem::{VirtioMem, VirtioMemError, VirtioMemOptions, VirtioMemRegion};
use memvisor_vmstate::{Registry, SectionId, VmStateError, ram};

pub use config::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, MachineConfig, RamSpec, VirtioIommuSpec, VirtioMemSpec,
};
/// The unplug guard of [`AssignedPath::Viommu`], so that a configuration
/// can be written without naming the DMA crate.
pub use memvisor_dma::viommu_bridge::UnplugGuard;

/// Why a machine could not be built, saved or restored. Nothing stays
/// pinned after an error.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The configuration describes something no machine can be.
    #[error("machine configuration: {0}")]
    Config(String),
    /// A RAM block could not be created.
    #[error("RAM block `{name}`: {source}")]
    Ram {
        /// The block's name.
        name: String,
        /// Why.
        source: RamBlockError,
    },
    /// The guest memory map could not be built (overlapping ranges).
    #[error("guest memory map: {0}")]
    Map(#[from] MapError),
    /// A virtio-mem device could not be built.
    #[error("virtio-mem `{id}`: {source}")]
    VirtioMem {
        /// The device.
        id: String,
        /// Why.
        source: VirtioMemError,
    },
    /// The virtio-iommu options are invalid.
    #[error("virtio-iommu `{id}`: {source}")]
    Iommu {
        /// The device.
        id: String,
        /// Why.
        source: OptionsError,
    },
    /// The discard policy refused a holder.
    #[error("discard policy: {0}")]
    Policy(#[from] PolicyError),
    /// A VFIO container could not be opened.
    #[error("assigned device `{device}`: {source}")]
    Vfio {
        /// The device.
        device: String,
        /// Why.
        source: VfioSetupError,
    },
    /// An assigned device could not attach.
    #[error("{0}")]
    Dma(#[from] DmaAttachError),
    /// An assigned device attaching on its own thread
    /// ([`Machine::new_attaching`]) could not attach.
    #[error("{0}")]
    Attaching(String),
    /// The migration stream could not be written or loaded.
    #[error("migration stream: {0}")]
    VmState(#[from] VmStateError),
}

/// A virtio-mem device of the machine.
pub struct VmemDevice {
    /// Its name.
    pub id: String,
    /// Its region (the discard manager of its memory).
    pub region: Arc<VirtioMemRegion>,
    /// The device, as a transport drives it.
    pub device: VirtioMem,
    /// The device requires coordinated discard while it exists.
    _coordinated: DiscardGuard,
}

/// The virtio-iommu of the machine.
pub struct IommuDevice {
    /// Its name.
    pub id: String,
    /// The device, as a transport drives it.
    pub device: VirtioIommu,
    /// The VMM's handle (topology, notifiers, translation, state).
    pub handle: IommuHandle,
    /// Bytes of properties a PROBE may return.
    pub probe_size: u32,
}

/// Bytes covered by the union of `ranges`.
fn union_bytes(mut ranges: Vec<GuestRange>) -> u64 {
    ranges.sort_unstable_by_key(|r| r.start());
    let (mut total, mut end) = (0, 0);
    for r in ranges {
        let start = r.start().max(end);
        if r.end() > start {
            total += r.end() - start;
        }
        end = end.max(r.end());
    }
    total
}

/// The DMA backends the VMM's own devices use, by device name.
#[derive(Default)]
struct Backends {
    /// The VFIO containers (the VMM opens the assigned device through its
    /// group).
    vfio: Vec<(String, Arc<VfioContainerMapper>)>,
    /// The zero-copy devices' pinners (`DmaBackend::UringIo`).
    uring_io: Vec<(String, Arc<UringPinner>)>,
}

/// The machine a [`MachineConfig`] describes; see the [crate documentation](crate).
pub struct Machine {
    // Drop order matters: the DMA layer goes first (unpinning everything,
    // see `Drop`), then the devices, then memory.
    dma: Vec<(DmaDevice, DmaPath)>,
    /// The devices [`new_attaching`](Self::new_attaching) attaches on a
    /// thread: their outcome, and the thread (joined on drop).
    attaching: Option<(AttachLatch, JoinHandle<()>)>,
    /// The DMA backends the VMM's devices use themselves.
    backends: Backends,
    budget: Arc<PinBudget>,
    /// Refused maps, vetoed unplugs and bypass changes of every device.
    dma_events: Arc<DmaEvents>,
    vmems: Vec<VmemDevice>,
    iommu: Option<IommuDevice>,
    map: GuestMemoryMap,
    policy: DiscardPolicy,
    config: MachineConfig,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("regions", &self.map.regions().len())
            .field("virtio_mem", &self.vmems.iter().map(|v| &v.id).collect::<Vec<_>>())
            .field("virtio_iommu", &self.iommu.as_ref().map(|i| &i.id))
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

/// The order in which [`Machine::system_reset`] resets the kinds of
/// device: the IOMMU's endpoints detach (unmapping and unpinning what the
/// guest mapped) before memory devices unplug (discarding), as restore
/// order puts memory devices before the IOMMU.
pub const RESET_ORDER: [&str; 2] = ["virtio-iommu", "virtio-mem"];

/// The migration section instance of the (only) virtio-iommu.
const IOMMU_INSTANCE: u32 = 0;

impl Machine {
    /// Builds the machine `config` describes and attaches every assigned
    /// device, which pins what its path reaches: a bridge gets its
    /// endpoint's mappings replayed, a path-1 listener maps all populated
    /// RAM.
    ///
    /// # Errors
    ///
    /// Overlapping memory, invalid device geometry or IOMMU options, a
    /// path-2 device without a virtio-iommu or on an unknown endpoint, two
    /// devices with one name, a VFIO container that cannot be opened, a
    /// pin budget too small for what path 1 must pin.
    pub fn new(config: &MachineConfig) -> Result<Self, MachineError> {
        let this = Self::build(config)?;
        for (device, path) in &this.dma {
            attach_logged(device, *path)?;
        }
        Ok(this)
    }

    /// [`new`](Self::new), but the devices a VMM can hold back until their
    /// memory is mapped — zero-copy disks (backend [`DmaBackend::UringIo`])
    /// before their first transfer, VFIO functions before bus mastering —
    /// attach on a thread of their own while the guest starts: path 1 pins
    /// all populated RAM, which faults every page in. Their device models
    /// wait for [`dma_latch`](Self::dma_latch). The other assigned devices
    /// attach before this returns, as in `new`. If the thread fails,
    /// `on_failure` gets the error (the VMM stops the guest); nothing stays
    /// pinned for the device that failed.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), but for the attachment errors of the devices
    /// attached on the thread, which go to `on_failure`.
    pub fn new_attaching(
        config: &MachineConfig,
        on_failure: impl FnOnce(String) + Send + 'static,
    ) -> Result<Self, MachineError> {
        let mut this = Self::build(config)?;
        let mut later = Vec::new();
        for ((device, path), spec) in this.dma.iter().zip(&config.dma.devices) {
            if matches!(spec.backend, DmaBackend::UringIo | DmaBackend::Vfio { .. }) {
                later.push((device.clone(), *path));
            } else {
                attach_logged(device, *path)?;
            }
        }
        if later.is_empty() {
            return Ok(this);
        }
        let latch = AttachLatch::pending();
        let outcome = latch.clone();
        let thread = std::thread::Builder::new()
            .name("dma-attach".into())
            .spawn(move || {
                let result = later
                    .iter()
                    .try_for_each(|(device, path)| attach_logged(device, *path))
                    .map_err(|e| e.to_string());
                outcome.finish(result.clone());
                if let Err(e) = result {
                    on_failure(e);
                }
            })
            .map_err(|e| MachineError::Attaching(format!("starting the DMA attach thread: {e}")))?;
        this.attaching = Some((latch, thread));
        Ok(this)
    }

    /// Opens once the devices [`new_attaching`](Self::new_attaching)
    /// attaches on its thread are attached (or one failed); already open
    /// for a machine built otherwise.
    pub fn dma_latch(&self) -> AttachLatch {
        self.attaching
            .as_ref()
            .map_or_else(AttachLatch::open, |(latch, _)| latch.clone())
    }

    /// Waits for [`dma_latch`](Self::dma_latch): whatever reads or resets
    /// the DMA attachments needs them settled.
    fn attached(&self) -> Result<(), MachineError> {
        self.dma_latch().wait().map_err(MachineError::Attaching)
    }

    /// The machine `config` describes as the destination of an incoming
    /// migration: built like [`new`](Self::new), but with its assigned
    /// devices created and not attached, so that nothing is pinned until a
    /// stream loads into its [`registry`](Self::registry) (the DMA sections
    /// attach once the whole stream is loaded and checked). A failed load
    /// leaves it as it was; [`restore`](Self::restore) is this and one
    /// load.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), but for attachment errors (which come with
    /// the load).
    pub fn incoming(config: &MachineConfig) -> Result<Self, MachineError> {
        Self::build(config)
    }

    /// The machine with its DMA devices created but not attached.
    fn build(config: &MachineConfig) -> Result<Self, MachineError> {
        let policy = DiscardPolicy::new();
        let mut builder = GuestMemoryMap::builder();
        for (i, r) in config.ram.iter().enumerate() {
            if r.addr.checked_add(r.size).is_none() {
                return Err(MachineError::Config(format!(
                    "ram[{i}] at {:#x} of {:#x} bytes wraps around",
                    r.addr, r.size
                )));
            }
            builder = builder.ram(r.addr, ram_block(&format!("ram{i}"), r.size)?)?;
        }
        let mut vmems = Vec::new();
        for m in &config.virtio_mem {
            let block = ram_block(&m.id, m.region_size)?;
            let region = VirtioMemRegion::new(
                block.clone(),
                VirtioMemOptions {
                    block_size: Some(m.block_size),
                    requested_size: m.requested_size,
                    unplugged_inaccessible: m.unplugged_inaccessible,
                    node_id: m.node_id,
                    prealloc: m.prealloc,
                    ..VirtioMemOptions::new(m.addr)
                },
            )
            .map_err(|source| MachineError::VirtioMem {
                id: m.id.clone(),
                source,
            })?;
            builder = builder.managed_ram(m.addr, block, region.clone() as Arc<dyn RamDiscardManager>)?;
            vmems.push(VmemDevice {
                id: m.id.clone(),
                device: VirtioMem::new(region.clone()),
                region,
                _coordinated: policy.require_coordinated(&m.id)?,
            });
        }
        let map = builder.build()?;

        let iommu = match &config.virtio_iommu {
            None => None,
            Some(spec) => {
                let options = spec.options();
                let probe_size = options.probe_size;
                let device = VirtioIommu::new(options, Some(map.clone())).map_err(|source| MachineError::Iommu {
                    id: spec.id.clone(),
                    source,
                })?;
                Some(IommuDevice {
                    id: spec.id.clone(),
                    handle: device.handle(),
                    device,
                    probe_size,
                })
            }
        };
        let budget = Arc::new(
            config
                .dma
                .pin_budget
                .map_or_else(PinBudget::unlimited, PinBudget::limited),
        );
        let mut this = Self {
            dma: Vec::new(),
            attaching: None,
            backends: Backends::default(),
            budget,
            dma_events: Arc::default(),
            vmems,
            iommu,
            map,
            policy,
            config: config.clone(),
        };
        (this.dma, this.backends) = this.assigned_devices()?;
        Ok(this)
    }

    /// The assigned devices of the configuration, detached, and the
    /// backends among theirs that the VMM's devices use themselves.
    fn assigned_devices(&self) -> Result<(Vec<(DmaDevice, DmaPath)>, Backends), MachineError> {
        let mut devices = Vec::new();
        let mut backends = Backends::default();
        for (i, spec) in self.config.dma.devices.iter().enumerate() {
            if self.config.dma.devices[..i].iter().any(|d| d.name == spec.name) {
                return Err(MachineError::Config(format!(
                    "two assigned devices are named `{}`",
                    spec.name
                )));
            }
            let path = match spec.path {
                AssignedPath::Ram => DmaPath::Ram,
                AssignedPath::Viommu { endpoint, guard } => {
                    let Some(iommu) = &self.config.virtio_iommu else {
                        return Err(MachineError::Config(format!(
                            "assigned device `{}` is behind endpoint {endpoint}, but the machine has no virtio-iommu",
                            spec.name
                        )));
                    };
                    if !iommu.endpoints.contains(&endpoint) {
                        return Err(MachineError::Config(format!(
                            "assigned device `{}` is behind endpoint {endpoint}, which virtio-iommu `{}` does not have (it has {:?})",
                            spec.name, iommu.id, iommu.endpoints
                        )));
                    }
                    DmaPath::Viommu { endpoint, guard }
                }
            };
            let mapper: Arc<dyn DmaMapper> = match spec.backend {
                DmaBackend::Uring => Arc::new(UringPinner::new(&spec.name, self.budget.clone())),
                DmaBackend::UringIo => {
                    let pinner = Arc::new(UringPinner::for_io(&spec.name, self.budget.clone()));
                    backends.uring_io.push((spec.name.clone(), pinner.clone()));
                    pinner
                }
                DmaBackend::Vfio { group } => {
                    let container = Arc::new(
                        VfioContainerMapper::open(&spec.name, group, self.budget.clone()).map_err(|source| {
                            MachineError::Vfio {
                                device: spec.name.clone(),
                                source,
                            }
                        })?,
                    );
                    backends.vfio.push((spec.name.clone(), container.clone()));
                    container
                }
            };
            let target = DmaTarget {
                memory: self.map.clone(),
                mapper,
                policy: self.policy.clone(),
                iommu: self.iommu.as_ref().map(|i| DmaIommu {
                    registry: Arc::new(i.handle.clone()),
                    section: SectionId::new(memvisor_virtio_iommu::persist::VIRTIO_IOMMU_SECTION, IOMMU_INSTANCE),
                }),
                events: self.dma_events.clone(),
            };
            devices.push((DmaDevice::new(&spec.name, target), path));
        }
        Ok((devices, backends))
    }

    /// The VFIO container of the assigned device `name`, if its backend is
    /// VFIO: the VMM opens the device itself through the container's group.
    pub fn vfio_container(&self, name: &str) -> Option<&Arc<VfioContainerMapper>> {
        self.backends.vfio.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The pinner of the zero-copy device `name` (backend `UringIo`): the
    /// device submits its I/O on the buffers it registers.
    pub fn uring_io_pinner(&self, name: &str) -> Option<&Arc<UringPinner>> {
        self.backends.uring_io.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }

    /// The migration registry of this machine's state, in the declared
    /// order: each virtio-mem region (configuration and bitmap, before
    /// RAM), RAM (populated memory only), the virtio-iommu's domains and
    /// mappings, and each assigned device's path (configuration only: pins
    /// are re-derived on load).
    pub fn registry(&self) -> Result<Registry, MachineError> {
        self.registry_with(|_| ram::RamMode::Full)
    }

    /// [`registry`](Self::registry) with the RAM section of region `i` in
    /// `ram(i)`: a live migration's last RAM is a delta
    /// ([`ram::RamMode`]).
    pub fn registry_with(&self, ram: impl Fn(usize) -> ram::RamMode) -> Result<Registry, MachineError> {
        self.attached()?;
        let mut registry = Registry::with_memory(self.map.clone());
        ram::register_ram_with(&mut registry, &self.map, ram)?;
        for (instance, v) in (0..).zip(&self.vmems) {
            registry.register(VirtioMemSection::new(instance, v.region.clone()))?;
        }
        if let Some(i) = &self.iommu {
            registry.register(VirtioIommuSection::new(IOMMU_INSTANCE, i.handle.clone()))?;
        }
        for (instance, (device, _)) in (0..).zip(&self.dma) {
            registry.register(device.section(instance))?;
        }
        Ok(registry)
    }

    /// Saves the whole machine to `w` as a vmstate stream and returns the
    /// bytes written. Not in the stream: the DMA backends (the
    /// configuration names them again on restore) and the virtqueues (the
    /// transport's state).
    pub fn save(&mut self, w: &mut dyn Write) -> Result<u64, MachineError> {
        Ok(self.registry()?.save(w)?.total_bytes)
    }

    /// Builds a fresh machine for `config` and loads a stream written by
    /// [`save`](Self::save) into it. The DMA sections attach their devices
    /// once the whole stream is loaded and checked: the bridges'
    /// registration replays every restored mapping (checked against the
    /// restored blocks, and pinned), or the path-1 listener maps all
    /// populated RAM. On error nothing is pinned.
    pub fn restore(config: &MachineConfig, r: &mut dyn Read) -> Result<Self, MachineError> {
        let machine = Self::incoming(config)?;
        machine.registry()?.load(std::io::BufReader::new(r))?;
        Ok(machine)
    }

    /// The configuration the machine was built from.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The guest memory map.
    pub fn memory(&self) -> &GuestMemoryMap {
        &self.map
    }

    /// The VM's discard policy (who disables or requires discard).
    pub fn policy(&self) -> &DiscardPolicy {
        &self.policy
    }

    /// The hub of the DMA layer's events (refused maps, vetoed unplugs,
    /// guard warnings, bypass changes): [subscribe](DmaEvents::subscribe)
    /// to receive them.
    pub fn dma_events(&self) -> &Arc<DmaEvents> {
        &self.dma_events
    }

    /// The VM's pin budget.
    pub fn budget(&self) -> &Arc<PinBudget> {
        &self.budget
    }

    /// The virtio-mem devices, in configuration order.
    pub fn vmems(&self) -> &[VmemDevice] {
        &self.vmems
    }

    /// The virtio-mem devices, to drive them.
    pub fn vmems_mut(&mut self) -> &mut [VmemDevice] {
        &mut self.vmems
    }

    /// The virtio-iommu, if the machine has one.
    pub fn iommu(&self) -> Option<&IommuDevice> {
        self.iommu.as_ref()
    }

    /// The virtio-iommu, to drive it.
    pub fn iommu_mut(&mut self) -> Option<&mut IommuDevice> {
        self.iommu.as_mut()
    }

    /// Both kinds of device at once, for drivers on separate threads.
    pub fn devices_mut(&mut self) -> (&mut [VmemDevice], Option<&mut IommuDevice>) {
        (&mut self.vmems, self.iommu.as_mut())
    }

    /// The assigned devices, in configuration order.
    pub fn dma_devices(&self) -> impl Iterator<Item = &DmaDevice> + '_ {
        self.dma.iter().map(|(d, _)| d)
    }

    /// Bytes plugged in all virtio-mem regions.
    pub fn plugged_size(&self) -> u64 {
        self.vmems.iter().map(|v| v.region.plugged_size()).sum()
    }

    /// Bytes the DMA backends have pinned now, by their own count.
    pub fn pinned_bytes(&self) -> u64 {
        self.dma.iter().map(|(d, _)| d.pinned_bytes()).sum()
    }

    /// Bytes of guest memory pinned for DMA at least once, however many
    /// devices (or mappings) pin them: [`pinned_bytes`](Self::pinned_bytes)
    /// counts a page once per pin, as the kernel accounts it. The budget's
    /// own count when it has a limit; otherwise the union of what each
    /// device reaches (all populated RAM on path 1 or in bypass, the pinned
    /// ranges of a vIOMMU bridge).
    pub fn distinct_pinned_bytes(&self) -> u64 {
        if let Some(distinct) = self.budget.distinct() {
            return distinct;
        }
        let mut ranges: Vec<GuestRange> = Vec::new();
        let mut all_ram = false;
        for (device, _) in &self.dma {
            match device.path() {
                None => {}
                Some(DmaPath::Viommu { .. }) if !device.in_bypass() => {
                    ranges.extend(device.pinned_ranges().unwrap_or_default());
                }
                Some(_) => all_ram = true,
            }
        }
        if all_ram {
            for region in self.map.regions() {
                match region.manager() {
                    None => ranges.push(region.range()),
                    Some(manager) => ranges.extend(manager.populated().runs(region.range(), true)),
                }
            }
        }
        union_bytes(ranges)
    }

    /// The guest-physical ranges the vIOMMU bridges hold pinned now, by
    /// their own record (empty without path-2 devices).
    pub fn pinned_ranges(&self) -> Vec<GuestRange> {
        self.dma
            .iter()
            .flat_map(|(d, _)| d.pinned_ranges().unwrap_or_default())
            .collect()
    }

    /// A system reset, in the declared order ([`RESET_ORDER`], rule 6 of
    /// `docs/design.md`): first the IOMMU — its device resets and every
    /// endpoint detaches, so each notifier unmaps, and the DMA layer unpins,
    /// every guest mapping — then each memory device unplugs everything.
    /// No live mapping ever points at memory the reset discards, so the
    /// unplug guard has nothing to veto and no pin outlives its memory.
    pub fn system_reset(&mut self) -> Result<(), MachineError> {
        self.attached()?;
        if let Some(iommu) = &mut self.iommu {
            memvisor_virtio::VirtioDevice::reset(&mut iommu.device);
            iommu.handle.system_reset();
        }
        for v in &mut self.vmems {
            v.device.system_reset().map_err(|source| MachineError::VirtioMem {
                id: v.id.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// vIOMMU mappings that no notifier holds because a restore found
    /// their target unplugged (see
    /// [`IommuHandle::unnotified_mappings`]); 0 without a virtio-iommu.
    pub fn unnotified_mappings(&self) -> usize {
        self.iommu.as_ref().map_or(0, |i| i.handle.unnotified_mappings())
    }

    /// Asks for uncoordinated discard (a balloon that frees guest pages
    /// without telling anyone) on behalf of `holder`. Refused while any
    /// assigned device is attached, and the error names both parties:
    /// pinned pages would survive such a discard.
    pub fn require_uncoordinated_discard(&self, holder: &str) -> Result<DiscardGuard, MachineError> {
        Ok(self.policy.require_uncoordinated(holder)?)
    }
}

/// Attaches `device` through `path`, logging what it pinned and how long
/// that took (path 1 faults in all populated RAM).
fn attach_logged(device: &DmaDevice, path: DmaPath) -> Result<(), DmaAttachError> {
    let start = std::time::Instant::now();
    device.attach(path)?;
    log::info!(
        "DMA device {}: attached ({path:?}), {} MiB pinned in {} ms",
        device.name(),
        device.pinned_bytes() >> 20,
        start.elapsed().as_millis()
    );
    Ok(())
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A device still attaching finishes first; then it detaches below.
        if let Some((_, thread)) = self.attaching.take() {
            let _ = thread.join();
        }
        // Detaching unregisters each bridge from the IOMMU (which unmaps
        // through it) and unpins whatever is left, before the devices and
        // memory go.
        for (device, _) in self.dma.drain(..) {
            device.detach();
        }
    }
}
