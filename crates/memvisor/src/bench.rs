//! `memvisor bench`: every hot path against its floor, in the same run.
//!
//! Each figure times memvisor's path and the bare kernel work it cannot
//! avoid (its *floor*) in alternating batches within one process, and
//! reports the medians and their ratio. Alternating batches let both sides
//! see the same machine noise, so the ratio is steadier than either time.

use std::cell::RefCell;
use std::fs::File;
use std::hint::black_box;
use std::io::{BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memvisor_guest::{Answer, DRIVER_AREA_SIZE, Guest};
use memvisor_machine::{
    AssignedDeviceSpec, AssignedPath, DmaBackend, DmaSpec, Machine, MachineConfig, RamSpec, VirtioIommuSpec,
    VirtioMemSpec,
};
use memvisor_memory::discard::{BlockDiscardManager, RamDiscardManager};
use memvisor_memory::{Backing, GuestRange, RamBlock};
use memvisor_virtio_iommu::Request as IommuRequest;
use memvisor_virtio_iommu::Status;
use memvisor_virtio_iommu::request::{Attach, Map, Unmap};
use memvisor_virtio_mem::VirtioMemRegion;
use memvisor_virtio_mem::request::{BlockRange, Request as MemRequest};
use memvisor_vmstate::Registry;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where benchmark machines put their virtio-mem region.
const HOT: u64 = 4 * GIB;
/// The IOVA benchmark mappings use.
const IOVA: u64 = 0x1000_0000;
/// Where the live mappings of a scaling run start (above any pair's).
const LIVE_IOVA: u64 = 0x10_0000_0000;

/// How long to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchOptions {
    /// Few repetitions and small sizes: checks the command works, not the
    /// numbers.
    pub quick: bool,
}

/// One figure: memvisor's time beside its floor's.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The JSON key, such as `viommu_map_unmap_4k`.
    pub key: &'static str,
    /// What is timed, in words.
    pub what: &'static str,
    /// Median nanoseconds of memvisor's path, per operation.
    pub ours_ns: f64,
    /// Median nanoseconds of the floor, per operation.
    pub floor_ns: f64,
    /// The target for `ours_ns / floor_ns`.
    pub target: f64,
    /// Extra counts reported with the figure (`runs`, `stream_bytes`, ...).
    pub extra: Vec<(&'static str, u64)>,
    /// A second target, against a bound other than the floor.
    pub bound: Option<Bound>,
}

/// A second ratio a figure is judged by: `ours_ns / bound_ns`, where the
/// bound is a path measured in the same rounds (for the vIOMMU figures, the
/// same requests with the floor's system calls and no DMA layer: what the
/// DMA layer itself adds).
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// The name of the ratio: reported as `<name>_ratio`, with
    /// `<name>_target` and `<name>_met`.
    pub name: &'static str,
    /// Median nanoseconds of the bound, per operation.
    pub bound_ns: f64,
    /// The target for `ours_ns / bound_ns`.
    pub target: f64,
}

impl Figure {
    /// `ours_ns / floor_ns`.
    pub fn ratio(&self) -> f64 {
        self.ours_ns / self.floor_ns
    }

    /// `ours_ns / bound_ns` of the [`Bound`], if the figure has one.
    pub fn bound_ratio(&self) -> Option<f64> {
        self.bound.as_ref().map(|b| self.ours_ns / b.bound_ns)
    }

    /// The figure as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "ours_ns": round(self.ours_ns),
            "floor_ns": round(self.floor_ns),
            "ratio": (self.ratio() * 1000.0).round() / 1000.0,
            "target": self.target,
            "met": self.ratio() <= self.target,
        });
        for (k, x) in &self.extra {
            v[*k] = serde_json::json!(x);
        }
        if let (Some(b), Some(r)) = (&self.bound, self.bound_ratio()) {
            v[format!("{}_ratio", b.name)] = serde_json::json!((r * 1000.0).round() / 1000.0);
            v[format!("{}_target", b.name)] = serde_json::json!(b.target);
            v[format!("{}_met", b.name)] = serde_json::json!(r <= b.target);
        }
        v
    }
}

fn round(ns: f64) -> f64 {
    (ns * 10.0).round() / 10.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `samples` rounds of one batch of `iters` runs of each of `paths`
/// (after one warm-up batch of each), rotating which goes first in every
/// round so that none always follows another; returns each path's median
/// time per run, in the order given.
fn compare(samples: usize, iters: u32, paths: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let batch = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed().as_nanos() as f64 / f64::from(iters)
    };
    for f in paths.iter_mut() {
        batch(f);
    }
    let n = paths.len();
    let mut times = vec![Vec::with_capacity(samples); n];
    for round in 0..samples {
        for k in 0..n {
            let i = (round + k) % n;
            times[i].push(batch(paths[i]));
        }
    }
    times.into_iter().map(median).collect()
}

/// Times `scenario`'s path and floor against each other ([`compare`]).
fn compare_pair(samples: usize, iters: u32, scenario: &mut dyn Scenario) -> (f64, f64) {
    let scenario = RefCell::new(scenario);
    let t = compare(
        samples,
        iters,
        &mut [&mut || scenario.borrow_mut().ours(), &mut || {
            scenario.borrow_mut().floor()
        }],
    );
    (t[0], t[1])
}

/// A hot path and its floor, set up and ready to time. `memvisor bench`
/// and the criterion benchmarks (`crates/memvisor/benches`) time the same
/// two calls.
pub trait Scenario {
    /// memvisor's path, once.
    fn ours(&mut self);
    /// The floor: the bare kernel (or memory) work the path cannot avoid.
    fn floor(&mut self);
}

/// The io_uring buffer-table updates that pin and unpin one host range:
/// the floor of every path that pins.
struct PinFloor {
    ring: io_uring::IoUring,
}

impl PinFloor {
    fn new() -> Self {
        let ring = io_uring::IoUring::new(1).expect("io_uring");
        ring.submitter()
            .register_buffers_sparse(1)
            .expect("sparse buffer table");
        Self { ring }
    }

    /// Pins `[host, +len)` into the table's one slot.
    fn pin(&self, host: u64, len: u64) {
        let buf = [libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: len as usize,
        }];
        // SAFETY: `host` is mapped guest RAM that outlives the registration
        // (`unpin` follows in the same benchmark step); the slot is never
        // named by any I/O.
        unsafe { self.ring.submitter().register_buffers_update(0, &buf, None) }.expect("pin");
    }

    /// Clears the slot, unpinning what it held.
    fn unpin(&self) {
        let empty = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        // SAFETY: an empty iovec registers nothing; it only clears the slot.
        unsafe { self.ring.submitter().register_buffers_update(0, &empty, None) }.expect("unpin");
    }

    fn pin_unpin(&self, host: u64, len: u64) {
        self.pin(host, len);
        self.unpin();
    }
}

/// Where benchmark machines put the guest's driver area: RAM of its own,
/// above the virtio-mem region.
const DRIVER_AREA: u64 = 5 * GIB;
/// The vIOMMU endpoint of the assigned device.
const ENDPOINT: u32 = 8;

/// A benchmark machine and the guest that drives it.
struct BenchMachine {
    machine: Machine,
    guest: Guest,
}

/// 2 MiB of boot RAM, a virtio-mem region of `region` bytes (all of it
/// requested) at [`HOT`], optionally a virtio-iommu with one endpoint, and,
/// with `dma`, one assigned device: behind the endpoint, or on plain RAM
/// without a vIOMMU.
fn machine_config(region: u64, with_iommu: bool, dma: Option<DmaBackend>) -> MachineConfig {
    let virtio_iommu = with_iommu.then(|| VirtioIommuSpec {
        endpoints: vec![ENDPOINT],
        domain_start: 1,
        domain_end: 100,
        bypass: false,
        reserved_regions: Vec::new(),
        ..VirtioIommuSpec::default()
    });
    let path = if with_iommu {
        AssignedPath::Viommu {
            endpoint: ENDPOINT,
            guard: Default::default(),
        }
    } else {
        AssignedPath::Ram
    };
    MachineConfig {
        ram: vec![
            RamSpec { addr: 0, size: 2 * MIB },
            RamSpec {
                addr: DRIVER_AREA,
                size: DRIVER_AREA_SIZE,
            },
        ],
        virtio_mem: vec![vmem_spec(region)],
        virtio_iommu,
        dma: DmaSpec {
            devices: dma
                .map(|backend| AssignedDeviceSpec {
                    name: "assigned0".into(),
                    backend,
                    path,
                })
                .into_iter()
                .collect(),
            pin_budget: None,
        },
    }
}

fn vmem_spec(region: u64) -> VirtioMemSpec {
    VirtioMemSpec {
        requested_size: region,
        ..VirtioMemSpec::new("vmem0", HOT, region, 2 * MIB)
    }
}

fn machine(config: &MachineConfig) -> BenchMachine {
    BenchMachine {
        machine: Machine::new(config).expect("benchmark machine"),
        guest: Guest::new(DRIVER_AREA),
    }
}

fn vmem(m: &mut BenchMachine, request: MemRequest) -> u16 {
    match m
        .guest
        .vmem_request(&mut m.machine, 0, request)
        .expect("virtio-mem request")
    {
        Answer::Answered(a) => a.resp_type,
        Answer::NoAnswer => panic!("virtio-mem did not answer {request:?}"),
    }
}

fn iommu(m: &mut BenchMachine, request: IommuRequest) -> Status {
    match m
        .guest
        .iommu_request(&mut m.machine, request)
        .expect("virtio-iommu request")
    {
        Answer::Answered(s) => s,
        Answer::NoAnswer => panic!("virtio-iommu did not answer {request:?}"),
    }
}

fn host_of(m: &BenchMachine, gpa: u64, len: u64) -> u64 {
    m.machine
        .memory()
        .lookup(GuestRange::new(gpa, len).expect("range"))
        .expect("guest RAM")
        .host_address
}

/// One MAP and one UNMAP through the request virtqueue.
fn requests(m: &mut BenchMachine, map: IommuRequest, unmap: IommuRequest) {
    assert_eq!(iommu(m, map), Status::Ok);
    assert_eq!(iommu(m, unmap), Status::Ok);
}

/// [`requests`] on a pinning machine. Not inlined, so that a profiler can
/// single it out (`valgrind --tool=callgrind
/// --toggle-collect='*bench::map_unmap*'` counts its instructions alone).
#[inline(never)]
fn map_unmap(m: &mut BenchMachine, map: IommuRequest, unmap: IommuRequest) {
    requests(m, map, unmap);
}

/// One MAP and one UNMAP of `len` bytes at IOVA `0x1000_0000` through the request
/// virtqueue, the device, the bridge's populated check and the DMA
/// backend; the floor pins and unpins the same host range.
pub struct ViommuMapUnmap {
    machine: BenchMachine,
    map: IommuRequest,
    unmap: IommuRequest,
    host: u64,
    len: u64,
    pin: PinFloor,
    /// Whether `ours` goes through [`map_unmap`], the function a profiler
    /// singles out: on the pinning machine only.
    profiled: bool,
}

impl ViommuMapUnmap {
    /// A machine whose vIOMMU endpoint is assigned to `dma`, mapping `len`
    /// bytes (at most 4 MiB) onto the start of plugged virtio-mem memory.
    /// Without a backend (`None`) the same requests pin nothing: the
    /// virtqueue and device alone.
    pub fn new(len: u64, dma: Option<DmaBackend>) -> Self {
        Self::with_live_mappings(len, dma, 0)
    }

    /// [`new`](Self::new), with `live` more 4 KiB mappings in the domain
    /// (pinned by the backend, if there is one) before the measured pair,
    /// at IOVAs above the pair's, onto the plugged memory.
    pub fn with_live_mappings(len: u64, dma: Option<DmaBackend>, live: u64) -> Self {
        let mut machine = machine(&machine_config(64 * MIB, true, dma));
        let plug = MemRequest::Plug(BlockRange {
            addr: HOT,
            nb_blocks: 2,
        });
        assert_eq!(vmem(&mut machine, plug), 0, "plug for the benchmark");
        let attach = IommuRequest::Attach(Attach {
            domain: 1,
            endpoint: ENDPOINT,
            flags: 0,
            reserved: [0; 4],
        });
        assert_eq!(iommu(&mut machine, attach), Status::Ok);
        for i in 0..live {
            let iova = LIVE_IOVA + i * 4096;
            let live_map = IommuRequest::Map(Map {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 4095,
                phys_start: HOT + (i * 4096) % (4 * MIB),
                flags: 3,
            });
            assert_eq!(iommu(&mut machine, live_map), Status::Ok, "live mapping {i}");
        }
        let map = IommuRequest::Map(Map {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + len - 1,
            phys_start: HOT,
            flags: 3,
        });
        let unmap = IommuRequest::Unmap(Unmap {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + len - 1,
        });
        let host = host_of(&machine, HOT, len);
        Self {
            machine,
            map,
            unmap,
            host,
            len,
            pin: PinFloor::new(),
            profiled: dma.is_some(),
        }
    }

    /// The lower bound of any pinning backend on this path: the floor's two
    /// system calls made between the same requests — the pin before the
    /// MAP, the unpin before the UNMAP — on this machine, which should have
    /// no DMA backend so that nothing else pins.
    pub fn requests_with_floor(&mut self) {
        self.pin.pin(self.host, self.len);
        assert_eq!(iommu(&mut self.machine, self.map), Status::Ok);
        self.pin.unpin();
        assert_eq!(iommu(&mut self.machine, self.unmap), Status::Ok);
    }

    /// `pairs` MAP + UNMAP pairs through [`map_unmap`], the function
    /// `memvisor bench --instructions` counts under callgrind.
    pub fn counted_pairs(&mut self, pairs: u64) {
        for _ in 0..pairs {
            map_unmap(&mut self.machine, self.map, self.unmap);
        }
    }

    /// Bytes the machine has pinned (none between two runs of `ours`).
    pub fn pinned_bytes(&self) -> u64 {
        self.machine.machine.pinned_bytes()
    }
}

impl Scenario for ViommuMapUnmap {
    fn ours(&mut self) {
        if self.profiled {
            map_unmap(&mut self.machine, self.map, self.unmap);
        } else {
            requests(&mut self.machine, self.map, self.unmap);
        }
    }

    fn floor(&mut self) {
        self.pin.pin_unpin(self.host, self.len);
    }
}

/// The `viommu_map_unmap_*` figure, with two more times from the same
/// rounds, both on a machine with no DMA backend: `no_dma_ns`, the same
/// requests alone, and `no_dma_with_floor_ns`, the same requests with the
/// floor's system calls between them
/// ([`ViommuMapUnmap::requests_with_floor`]).
fn viommu_map_unmap(key: &'static str, len: u64, opts: BenchOptions) -> Figure {
    // Two closures each use each machine, hence the cells.
    let pinning = RefCell::new(ViommuMapUnmap::new(len, Some(DmaBackend::Uring)));
    let bare = RefCell::new(ViommuMapUnmap::new(len, None));
    let (samples, iters) = match (opts.quick, len > 64 * 1024) {
        (true, _) => (3, 20),
        (false, false) => (31, 4000),
        (false, true) => (31, 100),
    };
    let t = compare(
        samples,
        iters,
        &mut [
            &mut || pinning.borrow_mut().ours(),
            &mut || pinning.borrow_mut().floor(),
            &mut || bare.borrow_mut().ours(),
            &mut || bare.borrow_mut().requests_with_floor(),
        ],
    );
    assert_eq!(pinning.borrow().pinned_bytes(), 0);
    Figure {
        key,
        what: "MAP + UNMAP through the virtqueue, device, bridge and io_uring pinning",
        ours_ns: t[0],
        floor_ns: t[1],
        target: 1.10,
        extra: vec![
            ("bytes", len),
            ("no_dma_ns", t[2].round() as u64),
            ("no_dma_with_floor_ns", t[3].round() as u64),
        ],
        bound: Some(Bound {
            name: "dma_layer",
            bound_ns: t[3],
            target: 1.10,
        }),
    }
}

/// PLUG then UNPLUG of one 2 MiB block through the request queue with a
/// `RamDmaListener` on the io_uring backend; the floor punches the same
/// hole and pins and unpins the same range.
pub struct VmemPlugUnplug {
    machine: BenchMachine,
    region: Arc<VirtioMemRegion>,
    host: u64,
    pin: PinFloor,
}

impl VmemPlugUnplug {
    /// A machine with a 64 MiB virtio-mem region and an assigned device on
    /// the io_uring backend, no vIOMMU.
    pub fn new() -> Self {
        let machine = machine(&machine_config(64 * MIB, false, Some(DmaBackend::Uring)));
        let host = host_of(&machine, HOT, 2 * MIB);
        let region = machine.machine.vmems()[0].region.clone();
        Self {
            machine,
            region,
            host,
            pin: PinFloor::new(),
        }
    }
}

impl Default for VmemPlugUnplug {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario for VmemPlugUnplug {
    fn ours(&mut self) {
        let block = BlockRange {
            addr: HOT,
            nb_blocks: 1,
        };
        assert_eq!(vmem(&mut self.machine, MemRequest::Plug(block)), 0);
        assert_eq!(vmem(&mut self.machine, MemRequest::Unplug(block)), 0);
    }

    fn floor(&mut self) {
        self.region.block().discard(0, 2 * MIB).expect("hole punch");
        self.pin.pin_unpin(self.host, 2 * MIB);
    }
}

fn vmem_plug_unplug(opts: BenchOptions) -> Figure {
    let (samples, iters) = if opts.quick { (3, 2) } else { (21, 20) };
    let (ours, floor_ns) = compare_pair(samples, iters, &mut VmemPlugUnplug::new());
    Figure {
        key: "vmem_plug_unplug",
        what: "PLUG + UNPLUG of a 2 MiB block through the virtqueue with RamDmaListener on io_uring",
        ours_ns: ours,
        floor_ns,
        target: 1.15,
        extra: vec![],
        bound: None,
    }
}

/// A 1 TiB region of 2 MiB blocks (524,288 of them).
fn tib_manager() -> (BlockDiscardManager, GuestRange) {
    const TIB: u64 = 1 << 40;
    let region = GuestRange::new(TIB, TIB).expect("range");
    (BlockDiscardManager::new(region, 2 * MIB).expect("geometry"), region)
}

/// `is_populated` over a fully plugged 1 TiB region of 2 MiB blocks,
/// through the [`RamDiscardManager`] trait; the floor tests the same
/// bitmap's words in a plain loop.
pub struct PopulatedCheck {
    manager: BlockDiscardManager,
    region: GuestRange,
    words: Vec<u64>,
}

impl PopulatedCheck {
    /// The region, all plugged.
    pub fn new() -> Self {
        let (manager, region) = tib_manager();
        manager.write().plug(region, || Ok::<_, ()>(()), |_| {}).expect("plug");
        let words = manager.populated().bitmap().words().to_vec();
        Self { manager, region, words }
    }

    /// Blocks in the region.
    pub fn blocks(&self) -> u64 {
        self.words.len() as u64 * 64
    }
}

impl Default for PopulatedCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario for PopulatedCheck {
    fn ours(&mut self) {
        let dynamic: &dyn RamDiscardManager = &self.manager;
        assert!(dynamic.is_populated(black_box(self.region)));
    }

    fn floor(&mut self) {
        let mut all = true;
        for &w in black_box(&self.words).iter() {
            if w != u64::MAX {
                all = false;
                break;
            }
        }
        assert!(all);
    }
}

fn populated_check(opts: BenchOptions) -> Figure {
    let (samples, iters) = if opts.quick { (3, 10) } else { (31, 300) };
    let mut scenario = PopulatedCheck::new();
    let (ours, floor_ns) = compare_pair(samples, iters, &mut scenario);
    Figure {
        key: "populated_check",
        what: "is_populated over 1 TiB of 2 MiB blocks, all plugged, through the RamDiscardManager trait",
        ours_ns: ours,
        floor_ns,
        target: 1.2,
        extra: vec![("blocks", scenario.blocks())],
        bound: None,
    }
}

/// The reference run finder: maximal runs of set bits by trailing-zeros
/// scanning, no trait, no locks. Returns (sum of run lengths in bits, runs).
fn reference_runs(words: &[u64]) -> (u64, u64) {
    let nbits = words.len() * 64;
    let (mut sum, mut runs) = (0u64, 0u64);
    let mut bit = 0usize;
    let find = |from: usize, set: bool| -> usize {
        let mut i = from;
        while i < nbits {
            let w = words[i / 64] ^ if set { 0 } else { u64::MAX };
            let w = w & (u64::MAX << (i % 64));
            if w != 0 {
                return (i / 64 * 64 + w.trailing_zeros() as usize).min(nbits);
            }
            i = (i / 64 + 1) * 64;
        }
        nbits
    };
    while bit < nbits {
        let start = find(bit, true);
        if start >= nbits {
            break;
        }
        let end = find(start, false);
        sum += (end - start) as u64;
        runs += 1;
        bit = end;
    }
    (sum, runs)
}

/// `replay_populated` over the 1 TiB region with half the blocks plugged
/// at random, summing run lengths, through the trait; the floor is a
/// trailing-zeros run finder (`reference_runs`) over the same words.
pub struct PopulatedReplay {
    manager: BlockDiscardManager,
    region: GuestRange,
    words: Vec<u64>,
    /// The sum of run lengths `ours` found last, in bytes.
    last_sum: u64,
}

impl PopulatedReplay {
    /// The region, half plugged by a fixed pseudo-random layout.
    pub fn new() -> Self {
        let (manager, region) = tib_manager();
        {
            // A fixed seed (splitmix64): the same layout in every run.
            let mut state = 0x5eed_u64;
            let mut writer = manager.write();
            for block in 0..(region.len() / (2 * MIB)) {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                if (z ^ (z >> 31)) & 1 == 1 {
                    let r = GuestRange::new(region.start() + block * 2 * MIB, 2 * MIB).expect("range");
                    writer.plug(r, || Ok::<_, ()>(()), |_| {}).expect("plug");
                }
            }
        }
        let words = manager.populated().bitmap().words().to_vec();
        Self {
            manager,
            region,
            words,
            last_sum: 0,
        }
    }
}

impl Default for PopulatedReplay {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario for PopulatedReplay {
    fn ours(&mut self) {
        let dynamic: &dyn RamDiscardManager = &self.manager;
        let mut sum = 0u64;
        dynamic
            .replay_populated(self.region, &mut |r| {
                sum += r.len();
                Ok(())
            })
            .expect("replay");
        self.last_sum = black_box(sum);
    }

    fn floor(&mut self) {
        black_box(reference_runs(black_box(&self.words)));
    }
}

fn populated_replay(opts: BenchOptions) -> Figure {
    let (samples, iters) = if opts.quick { (3, 2) } else { (31, 20) };
    let mut scenario = PopulatedReplay::new();
    let (ours, floor_ns) = compare_pair(samples, iters, &mut scenario);
    let (ref_bits, runs) = reference_runs(&scenario.words);
    assert_eq!(scenario.last_sum, ref_bits * 2 * MIB, "both walks find the same memory");
    Figure {
        key: "populated_replay",
        what: "replay_populated over 1 TiB, half the blocks plugged at random, through the trait",
        ours_ns: ours,
        floor_ns,
        target: 1.5,
        extra: vec![("runs", runs), ("populated_bytes", scenario.last_sum)],
        bound: None,
    }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", std::io::Error::last_os_error());
    for fd in fds {
        // SAFETY: fcntl on a descriptor we own; failure keeps the default size.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, MIB as libc::c_int) };
    }
    // SAFETY: fresh descriptors that nothing else owns.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// A virtio-mem region of `size` bytes at [`HOT`] and a memory map holding it.
/// A machine of one `size`-byte virtio-mem region, all of it requested,
/// and nothing else.
fn vmem_machine(size: u64) -> Machine {
    Machine::new(&MachineConfig {
        virtio_mem: vec![vmem_spec(size)],
        ..MachineConfig::default()
    })
    .expect("virtio-mem machine")
}

fn registry(machine: &Machine) -> Registry {
    machine.registry().expect("registry")
}

/// Save and load of a virtio-mem region with part of it plugged and filled
/// with non-zero data, through a pipe to a second thread loading into a
/// fresh region; the floor copies the same bytes through the same kind of
/// pipe into a fresh mapping of the same size. Each run needs a fresh
/// destination, made (untimed) by [`destination`](Self::destination) and
/// [`floor_destination`](Self::floor_destination).
pub struct Migration {
    src: Machine,
    size: u64,
    plugged: u64,
}

impl Migration {
    /// A `size`-byte source region with its first `plugged` bytes (a
    /// multiple of 2 MiB) plugged and filled.
    pub fn new(size: u64, plugged: u64) -> Self {
        let src = vmem_machine(size);
        let plug = MemRequest::Plug(BlockRange {
            addr: HOT,
            nb_blocks: (plugged / (2 * MIB)) as u16,
        });
        let region = &src.vmems()[0].region;
        assert_eq!(
            region.apply(plug),
            memvisor_virtio_mem::Response::Ack(None),
            "plug for the benchmark"
        );
        let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        for off in (0..plugged).step_by(MIB as usize) {
            region.block().write(off, &pattern).expect("fill");
        }
        Self { src, size, plugged }
    }

    /// A fresh destination region, and the two ends' section registries,
    /// for one [`save_load`](Self::save_load).
    pub fn destination(&self) -> Destination {
        let machine = vmem_machine(self.size);
        Destination {
            sender: registry(&self.src),
            receiver: registry(&machine),
            region: machine.vmems()[0].region.clone(),
            _machine: machine,
        }
    }

    /// Saves the source and loads it into `dst` through a pipe, on two
    /// threads; returns the bytes that crossed the pipe. `dst` is borrowed
    /// so that freeing it is not timed with the transfer.
    pub fn save_load(&self, dst: &mut Destination) -> u64 {
        let (rx, tx) = pipe();
        let sender = &mut dst.sender;
        let loaded = std::thread::scope(|s| {
            s.spawn(move || sender.save(tx).expect("save"));
            dst.receiver.load(BufReader::with_capacity(64 << 10, rx)).expect("load")
        });
        assert_eq!(dst.region.plugged_size(), self.plugged);
        loaded.total_bytes
    }

    fn source_region(&self) -> &Arc<VirtioMemRegion> {
        &self.src.vmems()[0].region
    }

    /// A fresh mapping for [`copy`](Self::copy).
    pub fn floor_destination(&self) -> RamBlock {
        RamBlock::new("dst", self.size, Backing::Memfd).expect("RAM block")
    }

    /// The floor: the plugged bytes through a pipe into `dst`.
    pub fn copy(&self, dst: &RamBlock) {
        let (mut rx, mut tx) = pipe();
        let plugged = self.plugged as usize;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the plugged part of the source mapping, alive for the scope.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.source_region().block().host_address() as *const u8, plugged)
                };
                tx.write_all(bytes).expect("pipe write");
                drop(tx);
            });
            // Faulted in all at once first, as a load into virtio-mem does
            // when it plugs: cheaper than a fault per page during the copy.
            dst.populate(0, self.plugged).expect("populate the destination");
            // SAFETY: the first `plugged` bytes of the fresh destination mapping.
            let bytes = unsafe { std::slice::from_raw_parts_mut(dst.host_address() as *mut u8, plugged) };
            rx.read_exact(bytes).expect("pipe read");
        });
    }
}

/// One migration's destination, made before the timed
/// [`Migration::save_load`].
pub struct Destination {
    region: Arc<VirtioMemRegion>,
    sender: Registry,
    receiver: Registry,
    _machine: Machine,
}

fn migration(opts: BenchOptions) -> Figure {
    let (size, plugged, samples) = if opts.quick {
        (256 * MIB, 32 * MIB, 1)
    } else {
        (4 * GIB, 512 * MIB, 15)
    };
    let scenario = Migration::new(size, plugged);
    let (mut ours, mut floor, mut stream_bytes) = (Vec::new(), Vec::new(), 0);
    for i in 0..samples {
        // Faulting in fresh memory is sometimes much slower on this kind of
        // host (free-page reporting), so the order alternates too.
        for ours_now in [i % 2 == 1, i % 2 == 0] {
            if ours_now {
                let mut dst = scenario.destination();
                let start = Instant::now();
                stream_bytes = scenario.save_load(&mut dst);
                ours.push(start.elapsed());
            } else {
                let dst = scenario.floor_destination();
                let start = Instant::now();
                scenario.copy(&dst);
                floor.push(start.elapsed());
            }
        }
    }
    let ns = |v: Vec<Duration>| median(v.into_iter().map(|d| d.as_nanos() as f64).collect());
    Figure {
        key: "migration",
        what: "save + load of a virtio-mem region with plugged non-zero memory, through a pipe to a second thread",
        ours_ns: ns(ours),
        floor_ns: ns(floor),
        target: 1.25,
        extra: vec![
            ("region_bytes", size),
            ("populated_bytes", plugged),
            ("stream_bytes", stream_bytes),
        ],
        bound: None,
    }
}

/// The keys `run` knows, in order.
pub const KEYS: [&str; 6] = [
    "viommu_map_unmap_4k",
    "viommu_map_unmap_2m",
    "vmem_plug_unplug",
    "populated_check",
    "populated_replay",
    "migration",
];

/// Runs the figures whose key `filter` accepts, calling `done` after each.
pub fn run(opts: BenchOptions, filter: impl Fn(&str) -> bool, mut done: impl FnMut(&Figure)) -> Vec<Figure> {
    let mut figures = Vec::new();
    for key in KEYS {
        if !filter(key) {
            continue;
        }
        let figure = match key {
            "viommu_map_unmap_4k" => viommu_map_unmap(key, 4096, opts),
            "viommu_map_unmap_2m" => viommu_map_unmap(key, 2 * MIB, opts),
            "vmem_plug_unplug" => vmem_plug_unplug(opts),
            "populated_check" => populated_check(opts),
            "populated_replay" => populated_replay(opts),
            "migration" => migration(opts),
            _ => unreachable!("KEYS and this match agree"),
        };
        done(&figure);
        figures.push(figure);
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_runs_counts_maximal_runs() {
        assert_eq!(reference_runs(&[0b0110_1101]), (5, 3));
        assert_eq!(reference_runs(&[u64::MAX, 1]), (65, 1));
        assert_eq!(reference_runs(&[0, 0]), (0, 0));
        assert_eq!(reference_runs(&[1 << 63, 1]), (2, 1));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
