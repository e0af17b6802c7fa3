//! `memvisor run`: one process, one guest. The [`Machine`] (memory,
//! virtio-mem, virtio-iommu) and the disks live for the whole process; a
//! *boot* — the KVM VM, its memory slots, irqchip, PCI root, transports,
//! ACPI tables, kernel and vCPU threads — is built on them and thrown away
//! when the guest resets, after the machine's reset in the declared order.
//!
//! Threads: one per vCPU (port and MMIO exits), the API's, and this one:
//! the event loop, which waits on the queue notifications (ioeventfds),
//! the console input and the stop signal, and runs the devices' request
//! handling so a long plug never stalls a vCPU.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use memvisor_machine::Machine;
use memvisor_pci::bus::SharedDevice;
use memvisor_pci::{BarAllocator, DeviceAccess, PciRoot, QueueNotifier, VirtioPciDevice, VirtioPciOptions};
use memvisor_vfio_pci::{MigrationSupport, VfioDeviceFd, VfioPciDevice};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio_blk::{BlockConfig, VirtioBlk};
use serde_json::{Value, json};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::api::{ApiContext, ApiServer, RamBlockInfo};
use crate::bus::{Bus, BusDevice, lock};
use crate::config::{ConfigError, SerialConfig, VmmConfig};
use crate::control::{LoopRequest, LoopRequests, VmControl};
use crate::devices::legacy::{I8042, PmBlock};
use crate::devices::serial::Serial;
use crate::devmem::DeviceMemory;
use crate::events::EventBus;
use crate::exit::{ExitReason, ExitSignal};
use crate::irq::{GsiRouter, KvmIoEvents, KvmMsiVectors};
use crate::snapshot::BootParts;
use crate::unassigned::UnassignedMemory;
use crate::vcpu::{VcpuIo, VcpuThreads};
use crate::vm::{Vm, VmError};
use crate::x86::{cpu, layout};

/// Why `memvisor run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The machine could not be built.
    #[error(transparent)]
    Machine(#[from] memvisor_machine::MachineError),
    /// KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Building a boot failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The guest or a vCPU failed while running.
    #[error("the guest stopped: {0}")]
    Guest(String),
}

fn setup<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> RunError {
    let what = what.into();
    move |e| RunError::Setup {
        what,
        source: Box::new(e),
    }
}

/// How a successful run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest powered off.
    PowerOff,
    /// The VMM was asked to stop.
    Shutdown,
    /// The guest migrated to another VMM.
    Migrated,
}

/// How the first boot starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Boot the kernel.
    Boot,
    /// Continue the VM saved in this snapshot file.
    Restore(PathBuf),
    /// Listen here and continue the VM a source VMM migrates in.
    Incoming(crate::migration::Endpoint),
}

/// Where the first boot's state comes from.
enum Source<'a> {
    Snapshot(&'a Path),
    Migration(&'a crate::migration::Listener),
}

/// A device owned by the [`Machine`], reached under its lock.
struct MachineDevice {
    machine: Arc<Mutex<Machine>>,
    which: Which,
}

#[derive(Clone, Copy)]
enum Which {
    Vmem(usize),
    Iommu,
}

impl DeviceAccess for MachineDevice {
    fn with_device(&self, f: &mut dyn FnMut(&mut dyn VirtioDevice)) {
        let mut machine = lock(&self.machine);
        match self.which {
            Which::Vmem(i) => {
                if let Some(v) = machine.vmems_mut().get_mut(i) {
                    f(&mut v.device);
                }
            }
            Which::Iommu => {
                if let Some(iommu) = machine.iommu_mut() {
                    f(&mut iommu.device);
                }
            }
        }
    }
}

/// The platform behind the vCPUs' exits.
struct Platform {
    pio: Bus,
    mmio: Bus,
    pci: Arc<PciRoot>,
    unassigned: Arc<UnassignedMemory>,
}

impl VcpuIo for Platform {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) && !self.pci.mmio_read(addr, data) {
            self.unassigned.read(addr, data);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) && !self.pci.mmio_write(addr, data) {
            self.unassigned.write(addr, data);
        }
    }
}

/// `0xcf8..0xd00` on the port bus.
struct PciPorts(Arc<PciRoot>);

impl BusDevice for PciPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.pio_read(offset as u16, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.pio_write(offset as u16, data);
    }
}

/// The ECAM window on the MMIO bus.
struct Ecam(Arc<PciRoot>);

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.ecam_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.ecam_write(offset, data);
    }
}

/// What lives for the whole process.
struct Process {
    config: VmmConfig,
    machine: Arc<Mutex<Machine>>,
    disks: Vec<Arc<Mutex<VirtioBlk>>>,
    serial: Option<Arc<Mutex<Serial>>>,
    serial_irq: EventFd,
    exit: Arc<ExitSignal>,
    control: Arc<VmControl>,
    unassigned: Arc<UnassignedMemory>,
}

/// Boots `config` and runs the guest until it powers off or the VMM is
/// asked to stop; a guest reboot resets the machine and boots again.
///
/// With [`Start::Restore`] or [`Start::Incoming`] the first boot is not
/// a boot: the VM continues from a snapshot (written by `PUT
/// /api/v1/vm/snapshot` of a VMM with the same machine shape) or from the
/// stream a source VMM migrates in, instead of starting the kernel.
pub fn run(config: VmmConfig, start: Start) -> Result<RunEnd, RunError> {
    config.validate()?;
    check_host_memory(config.memory)?;
    let machine_config = config.machine_config()?;
    // Listen first, so that a source may connect as soon as this process runs.
    let listener = match &start {
        Start::Incoming(endpoint) => {
            Some(crate::migration::Listener::bind(endpoint).map_err(setup(format!("listening on {endpoint}")))?)
        }
        _ => None,
    };
    // A restored machine starts with nothing attached or pinned: the
    // stream's DMA sections attach once the state they depend on is back.
    let exit = Arc::new(ExitSignal::new().map_err(setup("the stop eventfd"))?);
    let machine = if start == Start::Boot {
        // Zero-copy disks and VFIO functions pin all populated RAM while
        // the guest starts; a disk's transfers and a function's bus
        // mastering wait for it (`Machine::dma_latch`).
        let exit = exit.clone();
        Machine::new_attaching(&machine_config, move |why| exit.raise(ExitReason::Error(why)))?
    } else {
        Machine::incoming(&machine_config)?
    };
    let iommu = machine.iommu().map(|i| i.handle.clone());
    let disks = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let iommu = config.disk_endpoint(i).and_then(|ep| iommu.clone().map(|h| (h, ep)));
            let config = BlockConfig {
                id: d.id.clone(),
                path: d.path.clone(),
                read_only: d.read_only,
                queue_size: 256,
                iommu,
                zero_copy: machine.uring_io_pinner(&d.id).cloned(),
                zero_copy_ready: machine.dma_latch(),
            };
            // A migration's source holds the image until it hands the guest over.
            if listener.is_some() {
                VirtioBlk::new_unlocked(config)
            } else {
                VirtioBlk::new(config)
            }
            .map(|b| Arc::new(Mutex::new(b)))
            .map_err(setup(format!("disk `{}`", d.id)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(setup("the serial irqfd"))?;
    let serial = serial_output(&config.serial)?.map(|out| {
        Arc::new(Mutex::new(Serial::new(
            serial_irq.try_clone().expect("eventfd dup"),
            out,
        )))
    });

    let unassigned = Arc::new(UnassignedMemory::for_map(machine.memory()));
    let events = EventBus::new();
    let control = VmControl::new(exit.clone(), events.clone());
    let mut machine = machine;
    forward_device_events(&mut machine, &config, &disks, &events);
    let machine = Arc::new(Mutex::new(machine));
    let api = match &config.api_socket {
        Some(path) => {
            let ctx = api_context(&machine, &control, &unassigned, &config);
            Some(ApiServer::start(path, ctx).map_err(setup(format!("the API socket {}", path.display())))?)
        }
        None => None,
    };
    let process = Process {
        config,
        machine,
        disks,
        serial,
        serial_irq,
        exit,
        control,
        unassigned,
    };
    let _raw = RawTerminal::new(&process.config.serial);
    let started = Instant::now();
    let mut first = match (&start, &listener) {
        (Start::Restore(path), _) => Some(Source::Snapshot(path)),
        (_, Some(listener)) => Some(Source::Migration(listener)),
        _ => None,
    };
    let end = loop {
        let reason = run_boot(&process, first.take())?;
        process.control.ended(&reason);
        match reason {
            ExitReason::Reset => {
                log::info!(
                    "guest reset after {:?}: resetting the machine and booting again",
                    started.elapsed()
                );
                lock(&process.machine).system_reset()?;
                for d in &process.disks {
                    lock(d).reset();
                }
            }
            ExitReason::PowerOff => break RunEnd::PowerOff,
            ExitReason::Shutdown => break RunEnd::Shutdown,
            ExitReason::Migrated => {
                // The client that asked reads its answer before the socket goes.
                std::thread::sleep(MIGRATED_LINGER);
                break RunEnd::Migrated;
            }
            ExitReason::Error(why) => {
                process.control.events().close();
                return Err(RunError::Guest(why));
            }
        }
    };
    process.control.events().close();
    drop(api);
    Ok(end)
}

/// Publishes what the devices report by themselves: every virtio-mem size
/// change (plugged, requested, usable) as `size-changed`, the DMA layer's
/// `map-refused`, `unplug-vetoed`, `guard-warning` and `bypass`, every
/// virtio-iommu translation fault as `iommu-fault`, and a device entering
/// NEEDS_RESET as `needs-reset`. The channels are drained by a thread each,
/// which ends with the process.
fn forward_device_events(
    machine: &mut Machine,
    config: &VmmConfig,
    disks: &[Arc<Mutex<VirtioBlk>>],
    events: &Arc<EventBus>,
) {
    fn forward<T: Send + 'static>(
        name: String,
        rx: std::sync::mpsc::Receiver<T>,
        events: &Arc<EventBus>,
        publish: impl Fn(&EventBus, T) + Send + 'static,
    ) {
        let events = events.clone();
        let spawned = std::thread::Builder::new().name(name.clone()).spawn(move || {
            while let Ok(e) = rx.recv() {
                publish(&events, e);
            }
        });
        if let Err(e) = spawned {
            log::warn!("no {name}: {e}");
        }
    }
    for vmem in machine.vmems() {
        let id = vmem.id.clone();
        forward(
            format!("events-{id}"),
            vmem.region.subscribe(),
            events,
            move |bus, e| {
                bus.publish(
                    "size-changed",
                    json!({
                        "id": id,
                        "plugged_size": e.plugged_size,
                        "requested_size": e.requested_size,
                        "usable_region_size": e.usable_region_size,
                    }),
                );
            },
        );
    }
    forward(
        "events-dma".into(),
        machine.dma_events().subscribe(),
        events,
        |bus, e| {
            // `DmaEvent` serializes as `{"event": KIND, ...fields}`.
            if let Value::Object(mut fields) = json!(e)
                && let Some(Value::String(kind)) = fields.remove("event")
            {
                bus.publish(&kind, Value::Object(fields));
            }
        },
    );
    if let Some(iommu) = machine.iommu() {
        forward(
            "events-iommu".into(),
            iommu.handle.subscribe_faults(),
            events,
            |bus, f| {
                bus.publish(
                    "iommu-fault",
                    json!({
                        "endpoint": f.endpoint,
                        "iova": f.iova,
                        "access": format!("{:?}", f.access).to_lowercase(),
                        "kind": format!("{:?}", f.kind),
                    }),
                );
            },
        );
    }
    let needs_reset = |device: String| -> memvisor_virtio::NeedsResetObserver {
        let events = events.clone();
        Arc::new(move |reason: &str| events.publish("needs-reset", json!({ "device": device, "reason": reason })))
    };
    for vmem in machine.vmems_mut() {
        vmem.device.observe_needs_reset(needs_reset(vmem.id.clone()));
    }
    if let Some(iommu) = machine.iommu_mut() {
        iommu.device.observe_needs_reset(needs_reset(iommu.id.clone()));
    }
    for (spec, disk) in config.disks.iter().zip(disks) {
        lock(disk).observe_needs_reset(needs_reset(spec.id.clone()));
    }
}

fn api_context(
    machine: &Arc<Mutex<Machine>>,
    control: &Arc<VmControl>,
    unassigned: &Arc<UnassignedMemory>,
    config: &VmmConfig,
) -> ApiContext {
    let shared = machine;
    let machine = lock(shared);
    let vmems = machine
        .vmems()
        .iter()
        .map(|v| (v.id.clone(), v.region.clone()))
        .collect();
    let mut ram_blocks: Vec<RamBlockInfo> = Vec::new();
    for region in machine.memory().regions() {
        let name = match machine
            .vmems()
            .iter()
            .find(|v| v.region.addr() == region.range().start())
        {
            Some(v) => v.id.clone(),
            None => "boot-ram".to_string(),
        };
        ram_blocks.push(RamBlockInfo {
            name,
            hva: region.host_address(),
            size: region.range().len(),
        });
    }
    ApiContext {
        control: control.clone(),
        machine: shared.clone(),
        config: serde_json::to_value(config).unwrap_or_default(),
        started: Instant::now(),
        boot_ram: config.memory,
        vmems,
        ram_blocks,
        unassigned: unassigned.clone(),
    }
}

/// Refuses boot RAM larger than the host's memory (memfd RAM is backed
/// lazily, so this is the only early check there is).
fn check_host_memory(memory: u64) -> Result<(), ConfigError> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| memvisor_dma::mapper::proc_kib(&m, "MemTotal"))
        .map(|kb| kb * 1024);
    match total {
        Some(total) if memory > total => Err(ConfigError(format!(
            "--memory {memory} bytes is more than the host has ({total} bytes)"
        ))),
        _ => Ok(()),
    }
}

fn serial_output(config: &SerialConfig) -> Result<Option<Box<dyn Write + Send>>, RunError> {
    Ok(match config {
        SerialConfig::Stdio => Some(Box::new(io::stdout())),
        SerialConfig::File(path) => Some(Box::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(setup(format!("serial file {}", path.display())))?,
        )),
        SerialConfig::Off => None,
    })
}

/// How long a VMM whose guest migrated away keeps serving its API.
const MIGRATED_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Event-loop tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_STDIN: u64 = 1;
const TOKEN_REQUEST: u64 = 2;
const TOKEN_QUEUE: u64 = 3;

/// One boot: builds the VM on the process's machine — loading the kernel,
/// or the state from `source` — runs it until a stop is raised, and
/// returns why.
fn run_boot(p: &Process, source: Option<Source<'_>>) -> Result<ExitReason, RunError> {
    let config = &p.config;
    let machine = lock(&p.machine);
    let vm = Vm::with_unassigned(machine.memory(), p.unassigned.clone())?;
    let memory = machine.memory().clone();
    let iommu_present = machine.iommu().is_some();
    let vfio_containers: Vec<_> = config
        .vfio
        .iter()
        .map(|v| machine.vfio_container(&v.host).cloned())
        .collect();
    let dma_latch = machine.dma_latch();
    drop(machine);
    log::info!(
        "KVM memory slots: {} in use, up to {} needed (one per virtio-mem block), {} available (KVM_CAP_NR_MEMSLOTS)",
        vm.memslots().in_use(),
        vm.memslots().worst_case(),
        vm.memslots().limit()
    );
    vm.create_platform()?;
    let router = GsiRouter::new(vm.handle().clone()).map_err(setup("KVM_SET_GSI_ROUTING"))?;
    router
        .register_irqfd(&p.serial_irq, layout::COM1_IRQ)
        .map_err(setup("the serial irqfd"))?;
    let power_button = EventFd::new(EFD_NONBLOCK).map_err(setup("the power button irqfd"))?;
    router
        .register_irqfd(&power_button, layout::POWER_BUTTON_GSI)
        .map_err(setup("the power button irqfd"))?;
    let ioevents = Arc::new(KvmIoEvents::new(vm.handle().clone()));

    // PCI: every virtio device behind the modern transport.
    let slots = config.slots();
    let mut root = PciRoot::new();
    // Assigned devices' BARs, mapped into the guest where VFIO allows it.
    let device_memory = Arc::new(DeviceMemory::new(
        vm.handle().clone(),
        vm.memslots().allocator().clone(),
    ));
    root.set_bar_listener(device_memory.clone());
    // Each queue's notification eventfd and who to tell.
    let mut queue_events: Vec<(QueueNotifier, u16, EventFd)> = Vec::new();
    let mut transports: Vec<(u8, Arc<Mutex<VirtioPciDevice>>)> = Vec::new();
    let mut add =
        |device: Arc<dyn DeviceAccess>, slot: u8, queues: u16, access_platform: bool| -> Result<(), RunError> {
            let vectors = queues + 1;
            let msi = Arc::new(KvmMsiVectors::new(router.clone(), vectors).map_err(setup("MSI-X vectors"))?);
            let options = VirtioPciOptions {
                msix_vectors: Some(vectors),
                access_platform,
                ..VirtioPciOptions::default()
            };
            let transport = VirtioPciDevice::new(device, memory.clone(), msi, ioevents.clone(), options)
                .map_err(setup(format!("virtio-pci device in slot {slot}")))?;
            let notifier = transport.notifier();
            for (queue, fd) in transport.queue_events().map_err(setup("queue eventfds"))? {
                queue_events.push((notifier.clone(), queue, fd));
            }
            let transport = Arc::new(Mutex::new(transport));
            let shared: SharedDevice = transport.clone();
            root.add_device_at(slot, shared)
                .map_err(setup(format!("PCI slot {slot}")))?;
            transports.push((slot, transport));
            Ok(())
        };
    if let Some(slot) = slots.iommu {
        let device = Arc::new(MachineDevice {
            machine: p.machine.clone(),
            which: Which::Iommu,
        });
        add(device, slot, 2, false)?;
    }
    for (i, &slot) in slots.vmem.iter().enumerate() {
        let device = Arc::new(MachineDevice {
            machine: p.machine.clone(),
            which: Which::Vmem(i),
        });
        add(device, slot, 1, false)?;
    }
    for (i, &slot) in slots.disks.iter().enumerate() {
        let behind = iommu_present && config.disk_endpoint(i).is_some();
        add(p.disks[i].clone(), slot, 1, behind)?;
    }
    // What keeps this VM from being saved or migrated, each naming its device.
    let mut blockers = Vec::new();
    for ((v, &slot), container) in config.vfio.iter().zip(&slots.vfio).zip(&vfio_containers) {
        let (mut device, migration) = open_vfio(&v.host, container.as_deref(), &router)?;
        // Guest RAM may still be mapping for it (`Machine::new_attaching`).
        let latch = dma_latch.clone();
        device.gate_bus_master(Box::new(move || latch.wait()));
        blockers.push(crate::snapshot::vfio_blocker(&v.host, migration));
        log::info!("VFIO {} in slot {slot}: {}", v.host, device.info());
        device_memory.add_device(slot, &v.host, device.map_bars(crate::memslots::PAGE_SIZE));
        root.add_device_at(slot, Arc::new(Mutex::new(device)))
            .map_err(setup(format!("PCI slot {slot}")))?;
    }
    let (mmio64_start, mmio64_size) = config.mmio64_window()?;
    let mut bars = BarAllocator::new(
        layout::PCI_MMIO32_START..layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE,
        mmio64_start..mmio64_start + mmio64_size,
    )
    .map_err(setup("PCI windows"))?;
    for (bdf, bar) in root.assign_bars(&mut bars).map_err(setup("PCI BAR allocation"))? {
        log::debug!("PCI {bdf} BAR{} at {:#x} ({:#x} bytes)", bar.index, bar.addr, bar.size);
    }
    let pci = Arc::new(root);

    // Port and MMIO buses.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let bus_err = |what: &'static str| setup::<crate::bus::BusError>(what);
    if let Some(serial) = &p.serial {
        pio.insert(u64::from(layout::COM1_PORT), 8, serial.clone())
            .map_err(bus_err("COM1"))?;
    }
    pio.insert(
        u64::from(layout::I8042_DATA_PORT),
        5,
        Arc::new(Mutex::new(I8042::new(p.exit.clone()))),
    )
    .map_err(bus_err("i8042"))?;
    pio.insert(
        u64::from(layout::PM_PORT),
        u64::from(layout::PM_PORT_LEN),
        Arc::new(Mutex::new(PmBlock::new(p.exit.clone()))),
    )
    .map_err(bus_err("ACPI PM block"))?;
    pio.insert(0xcf8, 8, Arc::new(Mutex::new(PciPorts(pci.clone()))))
        .map_err(bus_err("PCI ports"))?;
    mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(Ecam(pci.clone()))),
    )
    .map_err(bus_err("PCI ECAM"))?;

    let parts = BootParts {
        config,
        machine: &p.machine,
        transports: &transports,
        serial: p.serial.as_ref(),
        blockers: &blockers,
    };
    let disks: Vec<(String, Arc<Mutex<VirtioBlk>>)> = config
        .disks
        .iter()
        .map(|d| d.id.clone())
        .zip(p.disks.iter().cloned())
        .collect();
    let restored = source.is_some();
    let vcpus = match source {
        None => boot_kernel(config, &vm, &memory, &slots, (mmio64_start, mmio64_size))?,
        Some(Source::Snapshot(path)) => {
            let file = File::open(path).map_err(setup(format!("opening {}", path.display())))?;
            restore_state(
                &parts,
                &vm,
                &pci,
                &path.display().to_string(),
                false,
                io::BufReader::with_capacity(1 << 20, file),
                |_| Ok(()),
            )?
        }
        Some(Source::Migration(listener)) => {
            log::info!("waiting for the migration's source");
            let mut conn = listener.accept().map_err(setup("accepting the migration's source"))?;
            let input = conn.try_clone().map_err(setup("the migration connection"))?;
            // One buffered reader for the whole stream: the first stream, the
            // precopy's frames and the last stream follow each other.
            let mut input = io::BufReader::with_capacity(1 << 20, input);
            let started = Instant::now();
            let precopied = crate::migration::receive_precopy(config, &p.machine, &mut input)
                .map_err(setup("receiving the precopy"))
                .inspect_err(|e| crate::migration::refuse(&mut conn, &e.to_string()))?;
            log::info!(
                "precopy received: {precopied} bytes of guest memory in {:?}",
                started.elapsed()
            );
            let vcpus = restore_state(
                &parts,
                &vm,
                &pci,
                "the incoming migration",
                true,
                &mut input,
                |loaded| crate::migration::switch_over(&mut conn, &disks, loaded).map_err(setup("switching over")),
            )
            .inspect_err(|e| crate::migration::refuse(&mut conn, &e.to_string()))?;
            crate::migration::running(&mut conn);
            vcpus
        }
    };

    // The event loop's sources.
    let epoll = Epoll::new().map_err(setup("epoll"))?;
    let watch = |fd: i32, token: u64| {
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
            .map_err(setup("epoll_ctl"))
    };
    watch(p.exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
    // A stdin epoll cannot watch (a regular file, /dev/null) gives no input.
    let stdin_input = p.serial.is_some()
        && matches!(config.serial, SerialConfig::Stdio)
        && watch(io::stdin().as_raw_fd(), TOKEN_STDIN).is_ok();
    let (requests_tx, requests) = mpsc::channel();
    let loop_tx = requests_tx.clone();
    let wake = EventFd::new(EFD_NONBLOCK).map_err(setup("the request eventfd"))?;
    watch(wake.as_raw_fd(), TOKEN_REQUEST)?;
    for (i, (_, _, fd)) in queue_events.iter().enumerate() {
        watch(fd.as_raw_fd(), TOKEN_QUEUE + i as u64)?;
    }
    if restored {
        // Requests the guest made available before the snapshot and that
        // were not yet served: serve them now (an inactive queue ignores it).
        for (notifier, queue, _) in &queue_events {
            notifier.notify(*queue);
        }
    }

    let platform = Arc::new(Platform {
        pio,
        mmio,
        pci,
        unassigned: vm.unassigned().clone(),
    });
    let mut threads = VcpuThreads::start(vcpus, platform, p.exit.clone()).map_err(setup("starting vCPU threads"))?;
    p.control.booted(
        threads.control().clone(),
        blockers.clone(),
        power_button,
        LoopRequests {
            tx: requests_tx,
            wake: wake.try_clone().map_err(setup("the request eventfd"))?,
        },
    );
    let mut events = vec![EpollEvent::default(); 16];
    let mut stdin_open = stdin_input;
    let mut console_buf = [0u8; 4096];
    let reason = loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break ExitReason::Error(format!("epoll_wait: {e}")),
        };
        let mut stop = None;
        for event in &events[..n] {
            match event.data() {
                TOKEN_EXIT => stop = p.exit.take(),
                TOKEN_REQUEST => {
                    let _ = wake.read();
                    while let Ok(request) = requests.try_recv() {
                        match request {
                            LoopRequest::Migrate {
                                destination,
                                limits,
                                connection,
                                reply,
                            } => {
                                // The precopy runs on a thread of its own while this loop
                                // serves the devices; it hands the rest back as StopAndCopy.
                                let live = crate::migration::Live {
                                    config: config.clone(),
                                    machine: p.machine.clone(),
                                    memory: memory.clone(),
                                    memslots: vm.memslots_shared(),
                                    events: p.control.events().clone(),
                                };
                                let back = (loop_tx.clone(), wake.try_clone());
                                let spawned = std::thread::Builder::new().name("migrate".into()).spawn(move || {
                                    crate::migration::precopy_then_return(
                                        live,
                                        destination,
                                        limits,
                                        connection,
                                        reply,
                                        back,
                                    )
                                });
                                if let Err(e) = spawned {
                                    log::error!("no migration thread: {e}");
                                }
                            }
                            LoopRequest::StopAndCopy {
                                destination,
                                connection,
                                live,
                                precopy,
                                reply,
                            } => {
                                let result = crate::migration::send(
                                    &parts,
                                    &vm,
                                    threads.control(),
                                    &disks,
                                    &destination,
                                    connection,
                                    &live,
                                    *precopy,
                                );
                                if result.is_ok() {
                                    stop = Some(ExitReason::Migrated);
                                }
                                let _ = reply.send(result.map_err(|e| e.to_string()));
                            }
                            LoopRequest::Snapshot { path, reply } => {
                                let result = crate::snapshot::save(&parts, &vm, threads.control(), &path);
                                if let Err(e) = &result {
                                    log::warn!("snapshot to {}: {e}", path.display());
                                }
                                let _ = reply.send(result.map_err(|e| e.to_string()));
                            }
                        }
                    }
                }
                TOKEN_STDIN => match read_stdin(&mut console_buf) {
                    Ok(n) if n > 0 => {
                        log::debug!("console input: {n} bytes");
                        if let Some(s) = &p.serial {
                            lock(s).input(&console_buf[..n]);
                        }
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                    end if stdin_open => {
                        // End of input: the guest keeps running without a keyboard.
                        log::info!("console input ended ({end:?}): the guest gets no more input");
                        let _ = epoll.ctl(ControlOperation::Delete, io::stdin().as_raw_fd(), EpollEvent::default());
                        stdin_open = false;
                    }
                    _ => {}
                },
                token => {
                    if let Some((notifier, queue, fd)) = queue_events.get((token - TOKEN_QUEUE) as usize) {
                        let _ = fd.read();
                        notifier.notify(*queue);
                    }
                }
            }
        }
        if let Some(reason) = stop {
            break reason;
        }
    };
    threads.stop();
    Ok(reason)
}

/// Writes the ACPI tables, the kernel and the reset stub into guest memory
/// and creates the vCPUs, vCPU 0 at the kernel's entry.
fn boot_kernel(
    config: &VmmConfig,
    vm: &Vm,
    memory: &memvisor_memory::map::GuestMemoryMap,
    slots: &crate::config::PciSlots,
    mmio64: (u64, u64),
) -> Result<Vec<crate::vm::Vcpu>, RunError> {
    let acpi = crate::platform::acpi_config(config, slots, mmio64);
    let tables = memvisor_acpi::build(&acpi, layout::ACPI_START, layout::ACPI_SIZE)
        .map_err(setup("building the ACPI tables"))?;
    for (addr, blob) in &tables.blobs {
        crate::platform::write_guest(memory, *addr, blob).map_err(setup("writing the ACPI tables"))?;
    }
    let entry = crate::platform::load_kernel(config, memory, tables.rsdp_addr)?;
    crate::platform::write_reset_stub(memory).map_err(setup("writing the reset vector"))?;
    let cpuid = cpu::supported_cpuid(vm.kvm()).map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let vcpu = vm.create_bare_vcpu(u64::from(id))?;
        let boot_entry = (id == 0).then_some(&entry);
        cpu::configure_vcpu(vcpu.fd(), &cpuid, id, config.cpus, boot_entry)
            .map_err(setup(format!("configuring vCPU {id}")))?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Loads a saved or migrated VM from `input` into this boot (see
/// [`crate::snapshot`]), then applies what must come last, in this order:
/// the PCI root's view of the restored BARs, the platform's interrupt
/// controllers and timers, and each vCPU. Then `before_run` (a
/// migration's switch-over, given the bytes loaded), and the clock.
fn restore_state(
    parts: &BootParts<'_>,
    vm: &Vm,
    pci: &PciRoot,
    what: &str,
    live: bool,
    input: impl Read,
    before_run: impl FnOnce(u64) -> Result<(), RunError>,
) -> Result<Vec<crate::vm::Vcpu>, RunError> {
    let started = Instant::now();
    let restored = crate::snapshot::load_stream(parts, live, input).map_err(setup(format!("restoring {what}")))?;
    let loaded = started.elapsed();
    // The transports' BARs and command registers changed behind the root.
    pci.refresh_bars();
    vm.restore_platform(&restored.platform)
        .map_err(setup(format!("restoring {what}")))?;
    let mut vcpus = Vec::new();
    for (id, state) in (0..).zip(&restored.vcpus) {
        let vcpu = vm.create_bare_vcpu(id)?;
        vcpu.restore_state(state)
            .map_err(setup(format!("restoring vCPU {id}")))?;
        vcpus.push(vcpu);
    }
    let applied = started.elapsed();
    before_run(restored.bytes)?;
    vm.set_clock(&restored.platform)
        .map_err(setup(format!("restoring {what}")))?;
    log::info!(
        "restored {what} ({} bytes) in {:?}: loaded after {loaded:?}, platform and vCPUs set after {applied:?}",
        restored.bytes,
        started.elapsed()
    );
    Ok(vcpus)
}

/// One `read(2)` of the VMM's stdin (fd 0), straight into `buf`: `std`'s
/// `Stdin` buffers, and what it keeps would wait for the next epoll event,
/// which never comes for input that already arrived.
fn read_stdin(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes; fd 0 stays open.
    let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Opens the assigned function `host` through its VFIO container's group,
/// with an MSI-X vector (GSI and irqfd) per vector the function has; and
/// what its driver says of migration.
fn open_vfio(
    host: &str,
    container: Option<&memvisor_dma::vfio::VfioContainerMapper>,
    router: &Arc<GsiRouter>,
) -> Result<(VfioPciDevice, MigrationSupport), RunError> {
    let what = || format!("VFIO device {host}");
    let container = container.ok_or_else(|| RunError::Setup {
        what: what(),
        source: "the machine has no VFIO container for it".into(),
    })?;
    let group = container.group_fd().ok_or_else(|| RunError::Setup {
        what: what(),
        source: "its VFIO group is not open".into(),
    })?;
    let io = VfioDeviceFd::open(group, host).map_err(setup(what()))?;
    let migration = io.migration_support();
    log::info!("VFIO device {host}: {migration}");
    let vectors = VfioPciDevice::msix_vectors_of(&io).map_err(setup(what()))?;
    let msi = KvmMsiVectors::new(router.clone(), vectors).map_err(setup(format!("MSI-X vectors of {host}")))?;
    let irqfds = msi.irqfds().map_err(setup(format!("irqfds of {host}")))?;
    let device = VfioPciDevice::new(Box::new(io), Arc::new(msi), irqfds).map_err(setup(what()))?;
    Ok((device, migration))
}

/// Puts an interactive stdin in raw mode for the guest's console and
/// restores it on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new(serial: &SerialConfig) -> Self {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only reads the fd's state.
        if !matches!(serial, SerialConfig::Stdio) || unsafe { libc::isatty(fd) } != 1 {
            return Self(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Self(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the host terminal's newlines stay sane.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `new` on the same fd.
            unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, saved) };
        }
    }
}
