//! Shared fixtures of the memvisor fuzz targets: one small machine per
//! process (boot RAM, a virtio-mem region, a virtio-iommu, an assigned
//! device pinning through io_uring), described by a [`MachineConfig`] and
//! built by [`Machine`], a hostile guest driver that decodes the fuzz input
//! into actions, and the invariants checked after each one.
//!
//! The invariants (docs/design.md, rules 1, 2 and 5):
//! * no panic (libFuzzer reports one as a crash);
//! * no pinned byte lies in a discarded block, and no discarded block has a
//!   resident page (nothing re-populated memory the host reclaimed);
//! * the backend's pinned bytes equal the live mappings (path 1: boot RAM
//!   plus every plugged block; path 2: the endpoint's non-MMIO mappings),
//!   and the kernel's `VmPin` equals the backend's count.

pub mod devtrace;
pub mod vmstate;

use std::sync::Arc;

use arbitrary::Arbitrary;
use memvisor_dma::attach::DmaPath;
use memvisor_dma::mapper::vm_pin_kib;
use memvisor_guest::{Buf, DriverQueue};
use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, IommuDevice, Machine, MachineConfig, RamSpec, UnplugGuard,
    VirtioIommuSpec, VirtioMemSpec,
};
use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
pub use memvisor_test_support::{KIB, MIB, range};
use memvisor_virtio::{EventFdInterrupt, VirtioDevice};
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::{IommuHandle, Request as IommuRequest, wire};
use memvisor_virtio_mem::request::{BlockRange, Request as MemRequest};
use memvisor_virtio_mem::{VirtioMem, VirtioMemRegion};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

/// Boot RAM at 0: the rings and the driver's buffers live here.
pub const BOOT: u64 = 2 * MIB;
/// The virtio-mem region.
pub const HOT: u64 = 4 << 30;
pub const HOT_SIZE: u64 = 32 * MIB;
pub const BLOCK: u64 = 2 * MIB;
pub const NB_BLOCKS: u64 = HOT_SIZE / BLOCK;
/// The assigned endpoint (with a bridge) and a second one without.
pub const ENDPOINT: u32 = 8;
pub const OTHER_ENDPOINT: u32 = 9;
/// Pin budgets: small, so that a bug cannot pin gigabytes. Path 1's
/// covers boot RAM and 6 of the 16 blocks, so that plugs beyond are
/// refused by the listener (BUSY, rolled back).
pub const PLAIN_BUDGET: u64 = BOOT + 6 * BLOCK;
pub const VIOMMU_BUDGET: u64 = 4 * MIB;

const VMEM_Q: u64 = 0;
const IOMMU_Q: u64 = 256 * KIB;
const EVENT_Q: u64 = 512 * KIB;
const QUEUE_DATA: u64 = 16 * KIB;
/// Most actions an input is decoded into.
pub const MAX_ACTIONS: usize = 64;

/// Which DMA path the assigned device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// No vIOMMU: `RamDmaListener` pins boot RAM and every plugged block.
    Plain,
    /// Behind the vIOMMU: `ViommuDmaBridge` pins what the guest maps.
    Viommu,
}

/// A guest-physical address as the fuzzer names it: mostly near
/// interesting places (the driver's buffer area, boot RAM, the blocks of
/// the virtio-mem region and their edges), sometimes anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Data(u16),
    Boot(u32),
    Hot { block: u8, offset: u32 },
    Raw(u64),
}

impl Addr {
    pub fn resolve(self, data: u64) -> u64 {
        match self {
            Self::Data(o) => data + u64::from(o) % QUEUE_DATA,
            Self::Boot(o) => u64::from(o) % (BOOT + 8 * KIB),
            Self::Hot { block, offset } => {
                HOT + (u64::from(block) % (NB_BLOCKS + 2)) * BLOCK + u64::from(offset) % (BLOCK + 64)
            }
            Self::Raw(a) => a,
        }
    }
}

/// One descriptor of a hostile chain.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: u32,
    /// `VIRTQ_DESC_F_WRITE` (2) and `INDIRECT` (4) are honoured; `NEXT` is
    /// set by the driver.
    pub flags: u8,
}

/// Structural mischief a driver can do to its rings.
#[derive(Arbitrary, Debug, Clone)]
pub enum RingAction {
    /// A chain of raw descriptors over `payload`, written at the start of
    /// the buffer area.
    Chain { descs: Vec<Desc>, payload: Vec<u8> },
    /// Overwrite one descriptor of the table (loops, links past the end).
    WriteDesc {
        index: u16,
        addr: Addr,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// Lie about the avail index.
    SetAvailIdx(u16),
    /// Kick without adding anything.
    Kick,
    /// The driver resets the device (status 0) and sets it up again.
    DeviceReset,
    /// A machine reset of both devices.
    SystemReset,
}

/// The queue targets' machine: boot RAM, the virtio-mem region (all of it
/// requested), a virtio-iommu with endpoints [`ENDPOINT`] and
/// [`OTHER_ENDPOINT`] (no bypass, domains 0 to 64), and one assigned device
/// pinning through io_uring on `path`, within that path's pin budget.
pub fn config(path: Path) -> MachineConfig {
    let (path, budget) = match path {
        Path::Plain => (AssignedPath::Ram, PLAIN_BUDGET),
        Path::Viommu => (
            AssignedPath::Viommu {
                endpoint: ENDPOINT,
                guard: UnplugGuard::Reject,
            },
            VIOMMU_BUDGET,
        ),
    };
    MachineConfig {
        ram: vec![RamSpec { addr: 0, size: BOOT }],
        virtio_mem: vec![VirtioMemSpec {
            requested_size: HOT_SIZE,
            ..VirtioMemSpec::new("vmem0", HOT, HOT_SIZE, BLOCK)
        }],
        virtio_iommu: Some(VirtioIommuSpec {
            endpoints: vec![ENDPOINT, OTHER_ENDPOINT],
            bypass: false,
            domain_start: 0,
            domain_end: 64,
            ..VirtioIommuSpec::default()
        }),
        dma: DmaSpec {
            devices: vec![AssignedDeviceSpec {
                name: "dev0".into(),
                backend: DmaBackend::Uring,
                path,
            }],
            pin_budget: Some(budget),
        },
    }
}

/// The invariants of a machine of the fuzzers (boot RAM and one virtio-mem
/// region); panics (a fuzzer crash) on a violation: no resident page in a
/// discarded block; each assigned device pins nothing if detached, boot
/// RAM and the plugged blocks on path 1 (and on path 2 while its endpoint
/// bypasses translation), and otherwise on path 2 exactly its endpoint's
/// live non-MMIO mappings, all in populated memory; `VmPin` equals the
/// backends' count.
pub fn check_machine(machine: &Machine) {
    let boot: u64 = machine.config().ram.iter().map(|r| r.size).sum();
    let region = &machine.vmems()[0].region;
    let (view, hot) = (region.populated(), region.region());
    // Nothing discarded is resident: no access re-populated it.
    for run in view.runs(hot, false) {
        let resident = (region.block())
            .resident_bytes(run.start() - hot.start(), run.len())
            .expect("mincore");
        assert_eq!(resident, 0, "{resident:#x} bytes resident in discarded {run}");
    }
    for dev in machine.dma_devices() {
        let (name, pinned) = (dev.name(), dev.pinned_bytes());
        match dev.path() {
            None => assert_eq!(pinned, 0, "{name}: detached but pins {pinned:#x}"),
            // On path 1, or on path 2 with the endpoint in bypass (an
            // identity domain, or unattached with `bypass` on).
            Some(DmaPath::Ram) => assert_eq!(
                pinned,
                boot + view.populated_bytes(),
                "{name}: backend vs boot RAM + plugged"
            ),
            Some(DmaPath::Viommu { .. }) if dev.in_bypass() => assert_eq!(
                pinned,
                boot + view.populated_bytes(),
                "{name}: in bypass, backend vs boot RAM + plugged"
            ),
            Some(DmaPath::Viommu { endpoint, .. }) => {
                let ranges = dev.pinned_ranges().expect("a bridge");
                for r in ranges.iter().filter(|r| r.overlaps(&hot)) {
                    assert!(view.is_populated(*r), "{name}: pinned {r} is not populated");
                }
                let recorded: u64 = ranges.iter().map(|r| r.len()).sum();
                assert_eq!(pinned, recorded, "{name}: backend vs bridge");
                let handle = &machine.iommu().expect("path 2 has an IOMMU").handle;
                let mapped = mapped_bytes(handle, endpoint);
                assert_eq!(
                    pinned, mapped,
                    "{name}: backend vs live mappings of endpoint {endpoint}"
                );
            }
        }
    }
    drop(view);
    assert_eq!(vm_pin_kib() * 1024, machine.pinned_bytes(), "VmPin vs backends");
}

/// Bytes of the live non-MMIO mappings of `endpoint`.
pub fn mapped_bytes(handle: &IommuHandle, endpoint: u32) -> u64 {
    handle
        .endpoint_domain(endpoint)
        .and_then(|d| handle.mappings(d))
        .unwrap_or_default()
        .iter()
        .filter(|m| !m.flags.mmio())
        .map(|m| m.size())
        .sum()
}

fn activate(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMap, queues: Vec<virtio_queue::Queue>) {
    dev.ack_features(dev.avail_features());
    let irq = Arc::new(EventFdInterrupt::new(queues.len() as u16).expect("eventfd"));
    dev.activate(mem.clone(), irq, queues).expect("activation");
}

fn queue(mem: &GuestMemoryMap, at: u64, size: u16, data: u64) -> DriverQueue {
    DriverQueue::new(mem, GuestAddress(at), size, data).expect("queue layout")
}

fn vmem(machine: &mut Machine) -> &mut VirtioMem {
    &mut machine.vmems_mut()[0].device
}

fn iommu(machine: &mut Machine) -> &mut IommuDevice {
    machine.iommu_mut().expect("the rig has a virtio-iommu")
}

/// The fuzzers' machine and the hostile driver's queues. Built once per
/// process; [`Rig::restart`] brings it back to its initial state between
/// inputs.
pub struct Rig {
    pub path: Path,
    pub machine: Machine,
    /// The virtio-mem region and the IOMMU handle, the machine's.
    pub region: Arc<VirtioMemRegion>,
    pub handle: IommuHandle,
    pub vmem_q: DriverQueue,
    pub iommu_q: DriverQueue,
    pub event_q: DriverQueue,
    /// What the devices answered: virtio-mem response types, virtio-iommu
    /// statuses (capped at 15), and NEEDS_RESETs of each (for checking that
    /// the fuzzer reaches deep states; see the corpus test).
    pub stats: Stats,
}

/// Answer counts; see [`Rig::stats`].
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub vmem_resp: [u64; 5],
    pub iommu_status: [u64; 16],
    pub vmem_resets: u64,
    pub iommu_resets: u64,
}

impl Rig {
    pub fn new(path: Path) -> Self {
        let machine = Machine::new(&config(path)).expect("the fuzzers' machine");
        let mem = machine.memory().clone();
        let mut rig = Self {
            path,
            region: machine.vmems()[0].region.clone(),
            handle: machine.iommu().expect("a virtio-iommu").handle.clone(),
            machine,
            vmem_q: queue(&mem, VMEM_Q, 16, QUEUE_DATA),
            iommu_q: queue(&mem, IOMMU_Q, 16, QUEUE_DATA),
            event_q: queue(&mem, EVENT_Q, 4, 4 * KIB),
            stats: Stats::default(),
        };
        activate(vmem(&mut rig.machine), &mem, vec![rig.vmem_q.device_queue()]);
        rig.activate_iommu();
        rig.check();
        rig
    }

    /// Activates the virtio-iommu on the current queues and fills the
    /// event queue.
    fn activate_iommu(&mut self) {
        let mem = self.machine.memory().clone();
        let queues = vec![self.iommu_q.device_queue(), self.event_q.device_queue()];
        activate(&mut iommu(&mut self.machine).device, &mem, queues);
        while self.event_q.add(&[Buf::Out(wire::FAULT_SIZE as u32)]).is_ok() {}
    }

    /// Back to the initial state: a machine reset of both devices, the
    /// requested size restored, both drivers set up afresh.
    pub fn restart(&mut self) {
        self.system_reset();
        self.region.set_requested_size(HOT_SIZE).expect("requested size");
        self.check();
        let expect = match self.path {
            Path::Plain => BOOT,
            Path::Viommu => 0,
        };
        assert_eq!(self.machine.pinned_bytes(), expect, "pins left after a machine reset");
        assert_eq!(self.region.plugged_size(), 0);
    }

    pub fn system_reset(&mut self) {
        vmem(&mut self.machine).system_reset().expect("no migration runs");
        let iommu = iommu(&mut self.machine);
        iommu.handle.system_reset();
        iommu.device.reset();
        self.reactivate_vmem();
        self.reactivate_iommu();
    }

    pub fn reactivate_vmem(&mut self) {
        let mem = self.machine.memory().clone();
        let dev = vmem(&mut self.machine);
        dev.reset();
        self.vmem_q = queue(&mem, VMEM_Q, 16, QUEUE_DATA);
        activate(dev, &mem, vec![self.vmem_q.device_queue()]);
    }

    pub fn reactivate_iommu(&mut self) {
        iommu(&mut self.machine).device.reset();
        let mem = self.machine.memory();
        self.iommu_q = queue(mem, IOMMU_Q, 16, QUEUE_DATA);
        self.event_q = queue(mem, EVENT_Q, 4, 4 * KIB);
        self.activate_iommu();
    }

    /// Kicks the virtio-mem device and reads its answers. A device in
    /// NEEDS_RESET is reset and set up again (block states stay).
    pub fn kick_vmem(&mut self) -> Vec<u16> {
        vmem(&mut self.machine).queue_notify(0);
        let mut answers = Vec::new();
        for _ in 0..32 {
            let Some(used) = self.vmem_q.pop_used() else { break };
            if used.len as usize >= 2 && used.data.len() >= 2 {
                let t = u16::from_le_bytes([used.data[0], used.data[1]]);
                self.stats.vmem_resp[usize::from(t.min(4))] += 1;
                answers.push(t);
            }
        }
        let dev = vmem(&mut self.machine);
        if dev.needs_reset() {
            self.stats.vmem_resets += 1;
            assert_eq!(dev.device_status() & 0x40, 0x40);
            // A device in NEEDS_RESET processes nothing.
            dev.queue_notify(0);
            self.reactivate_vmem();
        }
        answers
    }

    /// Kicks the virtio-iommu request queue and reads its answers.
    pub fn kick_iommu(&mut self) -> Vec<u8> {
        iommu(&mut self.machine).device.queue_notify(wire::REQUEST_QUEUE);
        let mut answers = Vec::new();
        for _ in 0..32 {
            let Some(used) = self.iommu_q.pop_used() else { break };
            if let Some(&s) = used.data.get(used.data.len().wrapping_sub(4)) {
                self.stats.iommu_status[usize::from(s.min(15))] += 1;
                answers.push(s);
            }
        }
        let dev = &mut iommu(&mut self.machine).device;
        if dev.needs_reset() {
            self.stats.iommu_resets += 1;
            dev.queue_notify(wire::REQUEST_QUEUE);
            // The driver resets the device: endpoints are detached.
            self.reactivate_iommu();
        }
        answers
    }

    /// A well-formed virtio-mem request; returns the response type.
    pub fn vmem_request(&mut self, request: MemRequest) -> Option<u16> {
        self.vmem_q.add(&[Buf::In(&request.to_bytes()), Buf::Out(10)]).ok()?;
        self.kick_vmem().first().copied()
    }

    /// A well-formed virtio-iommu request; returns the status byte.
    pub fn iommu_request(&mut self, request: IommuRequest, out: u32) -> Option<u8> {
        self.iommu_q.add(&[Buf::In(&request.to_bytes()), Buf::Out(out)]).ok()?;
        self.kick_iommu().first().copied()
    }

    /// Applies a ring action to the virtio-mem queue (`iommu` false) or the
    /// virtio-iommu request queue.
    pub fn ring_action(&mut self, action: &RingAction, iommu: bool) {
        let q = if iommu { &mut self.iommu_q } else { &mut self.vmem_q };
        let (data, _) = q.data_area();
        match action {
            RingAction::Chain { descs, payload } => {
                let n = payload.len().min(QUEUE_DATA as usize);
                self.machine
                    .memory()
                    .memory()
                    .write_slice(&payload[..n], data)
                    .expect("data area");
                let descs: Vec<(u64, u32, u16)> = descs
                    .iter()
                    .take(20)
                    .map(|d| (d.addr.resolve(data.0), d.len, u16::from(d.flags) & 0x6))
                    .collect();
                if q.add_raw(&descs).is_err() {
                    return;
                }
            }
            RingAction::WriteDesc {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                q.write_descriptor(*index, Descriptor::new(addr.resolve(data.0), *len, *flags, *next));
            }
            RingAction::SetAvailIdx(idx) => q.set_avail_idx(*idx),
            RingAction::Kick => {}
            RingAction::DeviceReset => {
                if iommu {
                    self.reactivate_iommu();
                } else {
                    self.reactivate_vmem();
                }
                return;
            }
            RingAction::SystemReset => {
                self.system_reset();
                return;
            }
        }
        if iommu {
            self.kick_iommu();
        } else {
            self.kick_vmem();
        }
    }

    /// Bytes of the live non-MMIO mappings of the assigned endpoint.
    pub fn mapped_bytes(&self) -> u64 {
        mapped_bytes(&self.handle, ENDPOINT)
    }

    /// The invariants ([`check_machine`]), the device still on the rig's
    /// path; panics (a fuzzer crash) on a violation.
    pub fn check(&self) {
        let path = self.machine.dma_devices().next().and_then(|d| d.path());
        let expected = match self.path {
            Path::Plain => matches!(path, Some(DmaPath::Ram)),
            Path::Viommu => matches!(path, Some(DmaPath::Viommu { endpoint: ENDPOINT, .. })),
        };
        assert!(expected, "the assigned device left {:?}: {path:?}", self.path);
        check_machine(&self.machine);
    }
}

/// A virtio-mem request with fields biased towards the region.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct MemReq {
    /// 0 PLUG, 1 UNPLUG, 2 UNPLUG_ALL, 3 STATE, anything else as given.
    pub req_type: u16,
    pub addr: Addr,
    pub nb_blocks: u16,
}

impl MemReq {
    pub fn bytes(&self, data: u64) -> [u8; 24] {
        let req_type = if self.req_type < 8 {
            self.req_type % 4
        } else {
            self.req_type
        };
        let nb_blocks = if self.nb_blocks > 0x8000 {
            self.nb_blocks
        } else {
            self.nb_blocks % 20
        };
        let addr = match self.addr {
            Addr::Hot { block, .. } => HOT + (u64::from(block) % (NB_BLOCKS + 2)) * BLOCK,
            a => a.resolve(data),
        };
        memvisor_virtio_mem::wire::VirtioMemReq {
            req_type,
            addr,
            nb_blocks,
        }
        .to_bytes()
    }
}

/// An action of the virtio-mem fuzzer.
#[derive(Arbitrary, Debug, Clone)]
pub enum MemAction {
    Ring(RingAction),
    /// A well-shaped request, with a response buffer of `out` bytes split
    /// over one or two descriptors.
    Request {
        req: MemReq,
        out: u8,
        split: bool,
    },
    Plug {
        block: u8,
        nb: u8,
    },
    Unplug {
        block: u8,
        nb: u8,
    },
    UnplugAll,
    /// Management resizes the request (in blocks).
    SetRequested(u8),
}

pub fn block_range(block: u8, nb: u8) -> BlockRange {
    BlockRange {
        addr: HOT + (u64::from(block) % NB_BLOCKS) * BLOCK,
        nb_blocks: u16::from(nb % 4) + 1,
    }
}

impl Rig {
    pub fn mem_action(&mut self, action: &MemAction) {
        match action {
            MemAction::Ring(r) => self.ring_action(r, false),
            MemAction::Request { req, out, split } => {
                let (data, _) = self.vmem_q.data_area();
                let bytes = req.bytes(data.0);
                let out = u32::from(*out % 24);
                let ok = if *split {
                    let (a, b) = bytes.split_at(usize::from(req.nb_blocks % 24));
                    self.vmem_q
                        .add(&[Buf::In(a), Buf::In(b), Buf::Out(out / 2), Buf::Out(out - out / 2)])
                } else {
                    self.vmem_q.add(&[Buf::In(&bytes), Buf::Out(out)])
                };
                if ok.is_ok() {
                    self.kick_vmem();
                }
            }
            MemAction::Plug { block, nb } => {
                self.vmem_request(MemRequest::Plug(block_range(*block, *nb)));
            }
            MemAction::Unplug { block, nb } => {
                self.vmem_request(MemRequest::Unplug(block_range(*block, *nb)));
            }
            MemAction::UnplugAll => {
                self.vmem_request(MemRequest::UnplugAll);
            }
            MemAction::SetRequested(n) => {
                let _ = self
                    .region
                    .set_requested_size((u64::from(*n) % (NB_BLOCKS + 1)) * BLOCK);
            }
        }
    }
}

/// A virtio-iommu request with fields biased towards interesting values.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IommuReq {
    Attach {
        domain: u8,
        other: bool,
        flags: u8,
        reserved: u8,
    },
    Detach {
        domain: u8,
        other: bool,
    },
    Map {
        domain: u8,
        iova: u8,
        pages: u16,
        phys: Addr,
        flags: u8,
    },
    Unmap {
        domain: u8,
        iova: u8,
        pages: u16,
    },
    /// Raw IOVA ranges (overflow, inverted, unaligned).
    MapRaw {
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    },
    UnmapRaw {
        domain: u32,
        start: u64,
        end: u64,
    },
    Probe {
        other: bool,
        raw: Option<u32>,
    },
}

impl IommuReq {
    pub fn request(&self, data: u64) -> IommuRequest {
        let ep = |other: bool| if other { OTHER_ENDPOINT } else { ENDPOINT };
        let d = |domain: u8| u32::from(domain % 5);
        let iova = |i: u8| u64::from(i % 32) * 64 * KIB;
        let len = |pages: u16| {
            if pages > 0xf000 {
                u64::from(pages) << 20
            } else {
                (u64::from(pages % 600) + 1) * 4096
            }
        };
        match *self {
            Self::Attach {
                domain,
                other,
                flags,
                reserved,
            } => IommuRequest::Attach(Attach {
                domain: d(domain),
                endpoint: ep(other),
                flags: u32::from(flags % 4 / 3),
                reserved: [0, 0, 0, if reserved > 250 { reserved } else { 0 }],
            }),
            Self::Detach { domain, other } => IommuRequest::Detach(Detach {
                domain: d(domain),
                endpoint: ep(other),
            }),
            Self::Map {
                domain,
                iova: i,
                pages,
                phys,
                flags,
            } => {
                let phys = match phys {
                    Addr::Hot { block, offset } => {
                        HOT + (u64::from(block) % (NB_BLOCKS + 2)) * BLOCK + (u64::from(offset) % 512) * 4096
                    }
                    Addr::Boot(o) => (u64::from(o) % (BOOT / 4096 + 2)) * 4096,
                    a => a.resolve(data),
                };
                let start = iova(i);
                IommuRequest::Map(Map {
                    domain: d(domain),
                    virt_start: start,
                    virt_end: start + len(pages) - 1,
                    phys_start: phys,
                    flags: u32::from(flags % 8),
                })
            }
            Self::Unmap { domain, iova: i, pages } => {
                let start = iova(i);
                IommuRequest::Unmap(Unmap {
                    domain: d(domain),
                    virt_start: start,
                    virt_end: start + len(pages) - 1,
                })
            }
            Self::MapRaw {
                domain,
                start,
                end,
                phys,
                flags,
            } => IommuRequest::Map(Map {
                domain,
                virt_start: start,
                virt_end: end,
                phys_start: phys,
                flags,
            }),
            Self::UnmapRaw { domain, start, end } => IommuRequest::Unmap(Unmap {
                domain,
                virt_start: start,
                virt_end: end,
            }),
            Self::Probe { other, raw } => IommuRequest::Probe(Probe {
                endpoint: raw.unwrap_or(ep(other)),
            }),
        }
    }
}

/// An action of the virtio-iommu fuzzer.
#[derive(Arbitrary, Debug, Clone)]
pub enum IommuAction {
    Ring(RingAction),
    /// A well-shaped request with a response buffer of `out` bytes.
    Request {
        req: IommuReq,
        out: u16,
    },
    /// A valid request with a normal response buffer.
    Valid(IommuReq),
    /// The request bytes of a well-shaped request, then mutated.
    Mutated {
        req: IommuReq,
        at: u8,
        value: u8,
        truncate: u8,
    },
    /// The guest's virtio-mem driver plugs or unplugs blocks.
    Plug {
        block: u8,
        nb: u8,
    },
    Unplug {
        block: u8,
        nb: u8,
    },
    UnplugAll,
    /// The driver writes `bypass` in the config space.
    SetBypass(bool),
    /// A deep state in one step: plug a block, map part of it for the
    /// assigned endpoint (attaching it to a domain first if needed), then
    /// ask to unplug the block (the guard answers BUSY).
    PinAndUnplug {
        block: u8,
        iova: u8,
        pages: u16,
        offset: u16,
    },
}

impl Rig {
    pub fn iommu_action(&mut self, action: &IommuAction) {
        let (data, _) = self.iommu_q.data_area();
        match action {
            IommuAction::Ring(r) => self.ring_action(r, true),
            IommuAction::Request { req, out } => {
                let out = u32::from(*out % 700);
                self.iommu_request(req.request(data.0), out);
            }
            IommuAction::Valid(req) => {
                let out = match req {
                    IommuReq::Probe { .. } => 512 + 4,
                    _ => 4,
                };
                self.iommu_request(req.request(data.0), out);
            }
            IommuAction::Mutated {
                req,
                at,
                value,
                truncate,
            } => {
                let mut bytes = req.request(data.0).to_bytes();
                if !bytes.is_empty() {
                    let i = usize::from(*at) % bytes.len();
                    bytes[i] = *value;
                }
                if *truncate > 200 {
                    bytes.truncate(usize::from(*truncate - 200));
                }
                if self.iommu_q.add(&[Buf::In(&bytes), Buf::Out(4)]).is_ok() {
                    self.kick_iommu();
                }
            }
            IommuAction::Plug { block, nb } => {
                self.vmem_request(MemRequest::Plug(block_range(*block, *nb)));
            }
            IommuAction::Unplug { block, nb } => {
                self.vmem_request(MemRequest::Unplug(block_range(*block, *nb)));
            }
            IommuAction::UnplugAll => {
                self.vmem_request(MemRequest::UnplugAll);
            }
            IommuAction::SetBypass(b) => {
                iommu(&mut self.machine)
                    .device
                    .write_config(wire::CONFIG_BYPASS_OFFSET, &[u8::from(*b)]);
            }
            IommuAction::PinAndUnplug {
                block,
                iova,
                pages,
                offset,
            } => {
                let blocks = block_range(*block, 0);
                self.vmem_request(MemRequest::Plug(blocks));
                let domain = match self.handle.endpoint_domain(ENDPOINT) {
                    Some(d) => d,
                    None => {
                        let attach = IommuRequest::Attach(Attach {
                            domain: 1,
                            endpoint: ENDPOINT,
                            flags: 0,
                            reserved: [0; 4],
                        });
                        self.iommu_request(attach, 4);
                        1
                    }
                };
                let offset = u64::from(*offset) % (BLOCK / 4096) * 4096;
                let len = (u64::from(*pages) % (BLOCK / 4096) + 1) * 4096;
                let start = u64::from(*iova) * BLOCK;
                let map = IommuRequest::Map(Map {
                    domain,
                    virt_start: start,
                    virt_end: start + len - 1,
                    phys_start: blocks.addr + offset,
                    flags: wire::MAP_F_READ | wire::MAP_F_WRITE,
                });
                self.iommu_request(map, 4);
                self.vmem_request(MemRequest::Unplug(blocks));
            }
        }
    }
}

/// The seed inputs of the targets that take bytes (the structured targets
/// start from libFuzzer's own inputs): `cargo test --lib -- --ignored
/// write_seeds` writes them into `corpus/<target>/seed-*`.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "vmstate_load" => {
            let stream = vmstate::source_stream();
            let mut raw = vec![0u8];
            raw.extend_from_slice(&stream);
            let mut structured = vec![1u8];
            let sections = memvisor_vmstate::format::read_raw(&stream[..], 1 << 30).expect("a valid stream");
            for s in &sections.sections {
                let which = vmstate::SECTIONS
                    .iter()
                    .position(|&(n, i)| n == s.header.id.name && i == s.header.id.instance)
                    .expect("a known section") as u8;
                structured.push(which);
                structured.extend_from_slice(&s.header.version.to_le_bytes());
                structured.extend_from_slice(&(s.payload.len() as u16).to_le_bytes());
                structured.extend_from_slice(&s.payload);
            }
            vec![raw, structured]
        }
        "devtrace_parse" => {
            let header_mem = r#"{"format":"devtrace","version":1,"source":"fuzz seed","ram":[{"addr":0,"size":4194304}],"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":33554432,"block_size":2097152,"requested_size":8388608,"unplugged_inaccessible":true}]}"#;
            let mem_events = [
                r#"{"t":1.0,"dev":"vmem0","op":"plug","addr":4294967296,"nb_blocks":2,"resp":"ack"}"#,
                r#"{"t":1.1,"dev":"vmem0","op":"state","addr":4294967296,"nb_blocks":1,"resp":"ack","state":"plugged"}"#,
                r#"{"t":1.2,"dev":"vmem0","op":"expect","plugged_size":4194304,"usable_region_size":33554432}"#,
                r#"{"t":1.3,"dev":"vmem0","op":"set_requested_size","size":2097152}"#,
                r#"{"t":1.4,"dev":"vmem0","op":"unplug","addr":4297064448,"nb_blocks":1,"resp":"ack"}"#,
                r#"{"t":1.5,"dev":"vmem0","op":"unplug_all","resp":"ack"}"#,
                r#"{"t":1.6,"dev":"vmem0","op":"system_reset"}"#,
            ];
            let header_iommu = r#"{"format":"devtrace","version":1,"source":"fuzz seed","ram":[{"addr":0,"size":8388608}],"devices":[{"device":"virtio-iommu","id":"viommu0","page_size_mask":18446744073709547520,"input_start":0,"input_end":18446744073709551615,"domain_start":0,"domain_end":4294967295,"bypass":true,"endpoints":[16]}]}"#;
            let iommu_events = [
                r#"{"t":4.8,"dev":"viommu0","op":"probe","endpoint":16}"#,
                r#"{"t":4.81,"dev":"viommu0","op":"attach","domain":0,"endpoint":16}"#,
                r#"{"t":4.82,"dev":"viommu0","op":"map","domain":0,"virt_start":4294959104,"virt_end":4294967295,"phys_start":3162112,"flags":3,"resp":"ok"}"#,
                r#"{"t":4.83,"dev":"viommu0","op":"unmap","domain":0,"virt_start":4294959104,"virt_end":4294967295}"#,
            ];
            let join = |h: &str, e: &[&str]| {
                let mut s = h.to_string();
                for l in e {
                    s.push('\n');
                    s.push_str(l);
                }
                s.push('\n');
                s.into_bytes()
            };
            let builtin: String = memvisor_devtrace::builtin::VMEM_RESIZE
                .lines()
                .take(12)
                .collect::<Vec<_>>()
                .join("\n");
            vec![
                join(header_mem, &mem_events),
                join(header_iommu, &iommu_events),
                builtin.into_bytes(),
            ]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[ignore = "writes the seed corpus"]
    fn write_seeds() {
        for target in ["vmstate_load", "devtrace_parse"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in super::seeds(target).iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
    }

    /// Replays the committed corpus of the queue targets and prints what
    /// the devices answered: the corpus must reach ACKed plugs, unplugs
    /// and OK maps, not only malformed chains.
    #[test]
    fn corpus_reaches_deep_states() {
        use arbitrary::{Arbitrary, Unstructured};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let read = |t: &str| -> Vec<Vec<u8>> {
            std::fs::read_dir(dir.join(t))
                .map(|d| d.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect())
                .unwrap_or_default()
        };
        let mut rig = super::Rig::new(super::Path::Plain);
        for input in read("virtio_mem_queue") {
            let actions = Vec::<super::MemAction>::arbitrary_take_rest(Unstructured::new(&input)).unwrap_or_default();
            for a in actions.iter().take(super::MAX_ACTIONS) {
                rig.mem_action(a);
                rig.check();
            }
            rig.restart();
        }
        println!("virtio_mem_queue: {:?}", rig.stats);
        drop(rig);
        let mut rig = super::Rig::new(super::Path::Viommu);
        let mut max_pinned = 0;
        for input in read("virtio_iommu_queue") {
            let actions = Vec::<super::IommuAction>::arbitrary_take_rest(Unstructured::new(&input)).unwrap_or_default();
            for a in actions.iter().take(super::MAX_ACTIONS) {
                rig.iommu_action(a);
                rig.check();
                max_pinned = max_pinned.max(rig.machine.pinned_bytes());
            }
            rig.restart();
        }
        println!("virtio_iommu_queue: {:?}, most pinned {max_pinned:#x}", rig.stats);
    }

    #[test]
    fn seeds_load_and_replay() {
        for seed in super::seeds("vmstate_load") {
            let stream = super::vmstate::stream(&seed);
            let m = memvisor_machine::Machine::incoming(&super::vmstate::config()).unwrap();
            m.registry().unwrap().load(&stream[..]).expect("the seed loads");
            super::vmstate::check(&m, true);
        }
        for seed in super::seeds("devtrace_parse") {
            super::devtrace::run(&seed);
        }
    }
}
