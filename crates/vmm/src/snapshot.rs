//! Snapshot and restore of a whole paused VM, in the vmstate stream
//! (`crates/vmstate`, FORMAT.md) that the machine's own migration uses.
//!
//! The stream holds, in the declared restore order:
//!
//! | section | phase, priority | what |
//! |---|---|---|
//! | `vmm/0` | Setup, `MACHINE` | [`Fingerprint`]: the machine's shape; a restore into another shape stops here |
//! | `virtio-mem/k` | Setup, `MEMORY_DEVICE` | block bitmaps: plugged blocks get their KVM slots |
//! | `ram/i` | Ram | boot RAM and plugged blocks (never unplugged memory) |
//! | `virtio-iommu/0` | Device, `IOMMU` | domains and mappings |
//! | `dma/k` | Device, `DMA` | DMA mappers re-pin what the restored state allows |
//! | `serial/0` | Device, `DEVICE` | the UART and its pending input |
//! | `virtio-pci/<slot>` | Device, `TRANSPORT` | each transport; its device is activated with the restored queues |
//! | `vm-platform/0` | Device, `PLATFORM` | PIT, PICs, IOAPIC, kvmclock |
//! | `vcpu/i` | Device, `VCPU` | registers, MSRs, LAPIC, pending events |
//!
//! The platform and vCPU sections only decode; the runner applies them
//! after the whole stream is loaded and every `post_load` ran (so after the
//! transports), then sets the clock and starts the vCPUs. Disk images are
//! not part of a snapshot: a restore uses the images as they are.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memvisor_machine::Machine;
use memvisor_pci::VirtioPciDevice;
use memvisor_vmstate::ram::RamMode;
use memvisor_vmstate::{LoadContext, Phase, Priority, Section, SectionError, decode, encode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bus::lock;
use crate::config::VmmConfig;
use crate::devices::serial::{Serial, SerialSnapshot};
use crate::vcpu::{Posted, VcpuControl};
use crate::vm::Vm;
use crate::x86::state::{PlatformState, VcpuState};

/// Why a snapshot or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The machine cannot be snapshotted as configured.
    #[error("{0}")]
    Unsupported(String),
    /// Capturing the KVM state failed.
    #[error("capturing {what}: {why}")]
    Capture {
        /// What was being captured.
        what: String,
        /// Why it failed.
        why: String,
    },
    /// The machine's sections could not be listed.
    #[error(transparent)]
    Machine(#[from] memvisor_machine::MachineError),
    /// Writing or reading the stream failed.
    #[error(transparent)]
    Stream(#[from] memvisor_vmstate::VmStateError),
    /// The snapshot file could not be created or synced.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The shape of the machine a snapshot was taken of: what a restore must
/// match. Kernel, command line, requested sizes, image paths and the
/// serial's destination may differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// vCPUs.
    pub cpus: u8,
    /// Boot RAM bytes.
    pub memory: u64,
    /// Each virtio-mem device: id, region size, block size.
    pub vmems: Vec<(String, u64, u64)>,
    /// A virtio-iommu is present.
    pub viommu: bool,
    /// Each disk: id, read-only, behind the IOMMU, zero-copy.
    pub disks: Vec<(String, bool, bool, bool)>,
    /// A serial port exists.
    pub serial: bool,
}

impl Fingerprint {
    /// The fingerprint of `config`.
    pub fn of(config: &VmmConfig) -> Self {
        Self {
            cpus: config.cpus,
            memory: config.memory,
            vmems: config
                .vmem
                .iter()
                .map(|v| (v.id.clone(), v.size, v.block_size))
                .collect(),
            viommu: config.viommu,
            disks: config
                .disks
                .iter()
                .map(|d| (d.id.clone(), d.read_only, d.iommu, d.zero_copy))
                .collect(),
            serial: !matches!(config.serial, crate::config::SerialConfig::Off),
        }
    }

    /// The first difference between the snapshot's machine (`self`) and
    /// this one, named with both values.
    pub fn mismatch(&self, here: &Self) -> Option<String> {
        let field = |name: &str, saved: &dyn std::fmt::Debug, local: &dyn std::fmt::Debug| {
            Some(format!("the snapshot's {name} is {saved:?} but this VM's is {local:?}"))
        };
        if self.cpus != here.cpus {
            return field("vCPU count", &self.cpus, &here.cpus);
        }
        if self.memory != here.memory {
            return field("boot RAM (--memory)", &self.memory, &here.memory);
        }
        if self.vmems != here.vmems {
            return field("virtio-mem devices (id, size, block)", &self.vmems, &here.vmems);
        }
        if self.viommu != here.viommu {
            return field("--viommu", &self.viommu, &here.viommu);
        }
        if self.disks != here.disks {
            return field("disks (id, read-only, iommu, zero-copy)", &self.disks, &here.disks);
        }
        if self.serial != here.serial {
            return field("serial port", &self.serial, &here.serial);
        }
        None
    }
}

type Capture<T> = Box<dyn FnMut() -> Result<T, String> + Send>;
type Apply<T> = Box<dyn FnMut(T) -> Result<(), String> + Send>;

/// A section whose payload is one serde value: `capture` gives it on
/// save; on load it is decoded (refused if malformed) and handed to
/// `apply` in `post_load`, in the declared order — or, for a check that
/// must refuse the stream before anything else is read, in `load`.
struct StateSection<T> {
    name: String,
    instance: u32,
    phase: Phase,
    priority: Priority,
    capture: Capture<T>,
    apply: Apply<T>,
    apply_on_load: bool,
    loaded: Option<T>,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> StateSection<T> {
    fn new(
        name: &str,
        instance: u32,
        (phase, priority): (Phase, Priority),
        capture: impl FnMut() -> Result<T, String> + Send + 'static,
        apply: impl FnMut(T) -> Result<(), String> + Send + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            instance,
            phase,
            priority,
            capture: Box::new(capture),
            apply: Box::new(apply),
            apply_on_load: false,
            loaded: None,
        }
    }

    /// Applies the value as soon as it is read.
    fn applied_on_load(self) -> Self {
        Self {
            apply_on_load: true,
            ..self
        }
    }
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Section for StateSection<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        1
    }

    fn priority(&self) -> Priority {
        self.priority
    }

    fn phase(&self) -> Phase {
        self.phase
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        let value = (self.capture)().map_err(SectionError::Invalid)?;
        encode(&value, out)
    }

    fn load(&mut self, _: &LoadContext, _: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let value = decode(payload)?;
        if self.apply_on_load {
            return (self.apply)(value).map_err(SectionError::Invalid);
        }
        self.loaded = Some(value);
        Ok(())
    }

    fn post_load(&mut self, _: &LoadContext) -> Result<(), SectionError> {
        match self.loaded.take() {
            Some(value) => (self.apply)(value).map_err(SectionError::Invalid),
            None => Ok(()),
        }
    }
}

/// The parts of a boot a snapshot reads and a restore writes.
pub(crate) struct BootParts<'a> {
    /// The configuration the VMM runs.
    pub config: &'a VmmConfig,
    /// The machine (memory, virtio-mem, virtio-iommu, DMA).
    pub machine: &'a Arc<Mutex<Machine>>,
    /// Each virtio-pci transport by slot.
    pub transports: &'a [(u8, Arc<Mutex<VirtioPciDevice>>)],
    /// The serial port, if any.
    pub serial: Option<&'a Arc<Mutex<Serial>>>,
    /// Why the VM cannot be saved or migrated ([`vfio_blocker`]); empty if it can.
    pub blockers: &'a [String],
}

/// What a restore leaves for the runner to apply last, in this order.
#[derive(Debug)]
pub(crate) struct Restored {
    /// PIT, PICs, IOAPIC and the clock.
    pub platform: PlatformState,
    /// Each vCPU's state, by id.
    pub vcpus: Vec<VcpuState>,
    /// The load's summary (bytes, sections).
    pub bytes: u64,
}

fn never<T>() -> Result<T, String> {
    Err("this section is only loaded here".into())
}

/// The `vmm/0` section: the machine's [`Fingerprint`], checked as soon as
/// it is read.
fn fingerprint_section(config: &VmmConfig) -> StateSection<Fingerprint> {
    let here = Fingerprint::of(config);
    let saved = here.clone();
    StateSection::new(
        "vmm",
        0,
        (Phase::Setup, Priority::MACHINE),
        move || Ok(saved.clone()),
        move |snap: Fingerprint| snap.mismatch(&here).map_or(Ok(()), Err),
    )
    .applied_on_load()
}

/// The registry of a live migration's first stream: the fingerprint and
/// every virtio-mem device, so that the destination knows the plugged
/// blocks (and has their slots) before any RAM comes. The last stream
/// carries them again, and restoring the same blocks keeps their contents.
pub(crate) fn setup_registry(
    config: &VmmConfig,
    machine: &Machine,
) -> Result<memvisor_vmstate::Registry, SnapshotError> {
    let mut registry = memvisor_vmstate::Registry::with_memory(machine.memory().clone());
    registry.register(fingerprint_section(config))?;
    for (instance, v) in (0..).zip(machine.vmems()) {
        registry.register(memvisor_virtio_mem::persist::VirtioMemSection::new(
            instance,
            v.region.clone(),
        ))?;
    }
    Ok(registry)
}

/// The registry of a snapshot of `parts`: the machine's sections plus the
/// boot's. `vcpus` and `platform` are what save writes (empty on load);
/// on load the decoded platform and vCPU states land in `restored_*`.
fn registry(
    parts: &BootParts<'_>,
    ram: &dyn Fn(usize) -> RamMode,
    platform: Option<PlatformState>,
    vcpus: Vec<VcpuState>,
    restored_platform: &Arc<Mutex<Option<PlatformState>>>,
    restored_vcpus: &Arc<Mutex<Vec<Option<VcpuState>>>>,
) -> Result<memvisor_vmstate::Registry, SnapshotError> {
    let mut registry = lock(parts.machine).registry_with(ram)?;
    registry.register(fingerprint_section(parts.config))?;
    if let Some(serial) = parts.serial {
        let (s, r) = (serial.clone(), serial.clone());
        registry.register(StateSection::new(
            "serial",
            0,
            (Phase::Device, Priority::DEVICE),
            move || Ok(lock(&s).state()),
            move |state: SerialSnapshot| lock(&r).restore(&state),
        ))?;
    }
    for (slot, transport) in parts.transports {
        let (t, r) = (transport.clone(), transport.clone());
        registry.register(StateSection::new(
            "virtio-pci",
            u32::from(*slot),
            (Phase::Device, Priority::TRANSPORT),
            move || Ok(lock(&t).state()),
            move |state| lock(&r).restore(&state).map_err(|e| e.to_string()),
        ))?;
    }
    let into = restored_platform.clone();
    let mut platform = platform;
    registry.register(StateSection::new(
        "vm-platform",
        0,
        (Phase::Device, Priority::PLATFORM),
        move || platform.take().map_or_else(never, Ok),
        move |state| {
            *lock(&into) = Some(state);
            Ok(())
        },
    ))?;
    let mut vcpus: Vec<Option<VcpuState>> = vcpus.into_iter().map(Some).collect();
    vcpus.resize_with(usize::from(parts.config.cpus), || None);
    for (id, vcpu) in (0..).zip(vcpus) {
        let into = restored_vcpus.clone();
        let mut vcpu = vcpu;
        registry.register(StateSection::new(
            "vcpu",
            id,
            (Phase::Device, Priority::VCPU),
            move || vcpu.take().map_or_else(never, Ok),
            move |state| {
                let mut slots = lock(&into);
                match slots.get_mut(id as usize) {
                    Some(slot) => {
                        *slot = Some(state);
                        Ok(())
                    }
                    None => Err(format!("vCPU {id} does not exist here")),
                }
            },
        ))?;
    }
    Ok(registry)
}

/// Why an assigned (VFIO) device keeps the VM from being saved or migrated:
/// what its driver said of migration, and, if it can migrate, that memvisor
/// does not carry an assigned device's state.
pub(crate) fn vfio_blocker(host: &str, migration: memvisor_vfio_pci::MigrationSupport) -> String {
    match migration {
        memvisor_vfio_pci::MigrationSupport::Unsupported(_) => {
            format!("VFIO device {host} cannot be saved or migrated: {migration}")
        }
        memvisor_vfio_pci::MigrationSupport::Supported(_) => format!(
            "VFIO device {host} cannot be saved or migrated: {migration}, but memvisor does not carry an assigned device's state"
        ),
    }
}

/// Refuses a machine whose state cannot all be saved ([`BootParts::blockers`]).
pub(crate) fn check_saveable(parts: &BootParts<'_>) -> Result<(), SnapshotError> {
    match parts.blockers.first() {
        Some(why) => Err(SnapshotError::Unsupported(why.clone())),
        None => Ok(()),
    }
}

/// The paused VM's vCPU and platform state, being captured: each parked
/// vCPU thread saves its own vCPU while the caller goes on (a migration
/// sends the last dirty pages meanwhile), and [`save_captured`] waits for
/// them. Dropped unused, the vCPUs' job is withdrawn.
pub(crate) struct Captured<'a> {
    /// Each vCPU's state and when (after `started`) its thread had saved it.
    vcpus: Posted<'a, (Result<VcpuState, String>, Duration)>,
    platform: PlatformState,
    started: Instant,
}

/// Starts capturing the paused VM: refuses a VM that cannot be saved
/// ([`check_saveable`]), posts each vCPU's save to its parked thread, and
/// captures the platform (irqchips, PIT, clock) meanwhile. Nothing moves
/// them while the VM is paused: the vCPUs are parked and the devices are
/// served only by the event loop, which is the caller.
pub(crate) fn start_capture<'a>(
    parts: &BootParts<'_>,
    vm: &Vm,
    vcpus: &'a VcpuControl,
) -> Result<Captured<'a>, SnapshotError> {
    check_saveable(parts)?;
    let started = Instant::now();
    let capture_error = |what: &str, why: String| SnapshotError::Capture { what: what.into(), why };
    let posted = vcpus
        .post_parked(move |vcpu| {
            let state = vcpu
                .migratable_msrs()
                .map(<[u32]>::to_vec)
                .and_then(|msrs| vcpu.save_state(&msrs).map_err(|e| format!("vCPU {}: {e}", vcpu.id())));
            (state, started.elapsed())
        })
        .map_err(|e| capture_error("the vCPUs", e.to_string()))?;
    let platform = vm
        .save_platform()
        .map_err(|e| capture_error("the platform", e.to_string()))?;
    Ok(Captured {
        vcpus: posted,
        platform,
        started,
    })
}

/// Writes the VM `capture` holds to `out` as one vmstate stream: waits for
/// the vCPUs' state, then writes every section.
pub(crate) fn save_captured(
    parts: &BootParts<'_>,
    capture: Captured<'_>,
    ram: &dyn Fn(usize) -> RamMode,
    out: &mut dyn Write,
) -> Result<memvisor_vmstate::Summary, SnapshotError> {
    let capture_error = |why: String| SnapshotError::Capture {
        what: "the vCPUs".into(),
        why,
    };
    let results = capture.vcpus.collect().map_err(|e| capture_error(e.to_string()))?;
    let saved_by = results.iter().map(|(_, at)| *at).max().unwrap_or_default();
    let captured = results
        .into_iter()
        .map(|(state, _)| state)
        .collect::<Result<Vec<_>, _>>()
        .map_err(capture_error)?;
    log::debug!(
        "state captured: the vCPUs' saved after {saved_by:?}, collected after {:?}",
        capture.started.elapsed()
    );
    let unused = (Arc::default(), Arc::default());
    let mut registry = registry(parts, ram, Some(capture.platform), captured, &unused.0, &unused.1)?;
    Ok(registry.save(out)?)
}

/// Writes the paused VM to `out` as one vmstate stream: [`start_capture`]
/// and [`save_captured`] at once.
pub(crate) fn save_stream(
    parts: &BootParts<'_>,
    vm: &Vm,
    vcpus: &VcpuControl,
    ram: &dyn Fn(usize) -> RamMode,
    out: &mut dyn Write,
) -> Result<memvisor_vmstate::Summary, SnapshotError> {
    save_captured(parts, start_capture(parts, vm, vcpus)?, ram, out)
}

/// Writes a snapshot of the paused VM to the new file `path` (an existing
/// file is refused; a failed save removes what it wrote). Returns the
/// summary the API answers with. The VM stays paused.
pub(crate) fn save(parts: &BootParts<'_>, vm: &Vm, vcpus: &VcpuControl, path: &Path) -> Result<Value, SnapshotError> {
    check_saveable(parts)?;
    let started = Instant::now();
    let file_error = |source| SnapshotError::File {
        path: path.to_path_buf(),
        source,
    };
    // Never overwrite: a file that exists is refused by the kernel, not by a check that
    // could race.
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(file_error)?;
    let written = save_stream(parts, vm, vcpus, &|_| RamMode::Full, &mut file)
        .and_then(|summary| file.sync_all().map(|()| summary).map_err(file_error));
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    Ok(json!({
        "path": path,
        "bytes": summary.total_bytes,
        "sections": summary.sections.len(),
        "ms": started.elapsed().as_millis() as u64,
    }))
}

/// Loads a stream from `input` into a boot built as for a fresh start but
/// without kernel, ACPI tables or vCPU setup: the machine's sections
/// restore memory, virtio-mem, virtio-iommu and the DMA pins, the
/// transports reactivate their devices. Returns the platform and vCPU
/// states for the runner to apply last. On error the machine's sections
/// undo their pins; the process should exit. `input` should be buffered.
/// A live migration's destination also takes RAM deltas (`live`): its
/// memory already holds what the precopy sent.
pub(crate) fn load_stream(parts: &BootParts<'_>, live: bool, input: impl Read) -> Result<Restored, SnapshotError> {
    let platform = Arc::new(Mutex::new(None));
    let vcpus = Arc::new(Mutex::new(vec![None; usize::from(parts.config.cpus)]));
    let ram = move |_: usize| if live { RamMode::AcceptDelta } else { RamMode::Full };
    let mut registry = registry(parts, &ram, None, Vec::new(), &platform, &vcpus)?;
    let summary = registry.load(input)?;
    let platform = lock(&platform).take();
    let vcpus: Option<Vec<VcpuState>> = std::mem::take(&mut *lock(&vcpus)).into_iter().collect();
    match (platform, vcpus) {
        (Some(platform), Some(vcpus)) => Ok(Restored {
            platform,
            vcpus,
            bytes: summary.total_bytes,
        }),
        // The registry refuses a stream without a required section.
        _ => Err(SnapshotError::Unsupported(
            "the stream has no platform or vCPU section".into(),
        )),
    }
}
