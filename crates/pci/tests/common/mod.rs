//! A small virtio device, recording sinks and a rig that puts a
//! `VirtioPciDevice` on a `PciRoot` with BARs assigned, for the transport
//! tests.
#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_guest::DriverQueue;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, RamBlock};
use memvisor_pci::bar::BarAllocator;
use memvisor_pci::virtio_pci::{BAR0_SIZE, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use memvisor_pci::virtio_pci::{MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET};
use memvisor_pci::{
    DeviceAccess, IoEventSink, MsiMessage, MsiSink, PciBdf, PciDevice, PciRoot, VirtioPciDevice, VirtioPciOptions,
};
use memvisor_virtio::queue::{Malformed, drain_queue};
use memvisor_virtio::{ActivateError, VirtioCommon, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The test device's virtio type (device ID 0x1040 + 42 = 0x106a).
pub const ECHO_TYPE: u32 = 42;
/// A device feature (bit 0) the echo device offers.
pub const F_ECHO: u64 = 1 << 0;
/// The echo device's configuration space.
pub const ECHO_CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// A device with two queues (max 16 and 8) answering every request with
/// its bytes reversed.
pub struct Echo {
    pub kind: u32,
    pub common: VirtioCommon,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    /// The interrupt handle of the last activation.
    pub irq: Option<Arc<dyn VirtioInterrupt>>,
    pub notifies: Vec<u16>,
}

impl Echo {
    pub fn new() -> Self {
        Self::custom(ECHO_TYPE, vec![16, 8])
    }

    /// An echo device of another type or with other queues.
    pub fn custom(kind: u32, queue_max_sizes: Vec<u16>) -> Self {
        Self {
            kind,
            common: VirtioCommon::new("echo", F_ECHO, queue_max_sizes),
            config_writes: Vec::new(),
            irq: None,
            notifies: Vec::new(),
        }
    }
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        self.kind
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }
    fn avail_features(&self) -> u64 {
        self.common.avail_features()
    }
    fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }
    fn ack_features(&mut self, features: u64) {
        self.common.ack_features(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        memvisor_virtio::config::read_config(&ECHO_CONFIG, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.irq = Some(interrupt.clone());
        self.common.activate(mem, interrupt, queues)
    }
    fn queue_notify(&mut self, index: u16) {
        self.notifies.push(index);
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(usize::from(index)) else {
            return;
        };
        let result = drain_queue(queue, index, &active.mem, active.interrupt.as_ref(), 64, 1, |req| {
            if req.request().is_empty() {
                return Err(Malformed::RequestTooShort { got: 0, need: 1 });
            }
            Ok(req.request().iter().rev().copied().collect())
        });
        if let Err(e) = result {
            self.common.set_needs_reset(&e);
        }
    }
    fn queue_indices(&self) -> Vec<memvisor_virtio::QueueIndices> {
        self.common.queue_indices()
    }
    fn reset(&mut self) {
        self.common.reset();
    }
    fn needs_reset(&self) -> bool {
        self.common.needs_reset()
    }
}

/// What a [`RecordingMsi`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msi {
    Configure(u16, MsiMessage, bool),
    Trigger(u16),
}

/// An [`MsiSink`] recording every call.
#[derive(Default)]
pub struct RecordingMsi(Mutex<Vec<Msi>>);

impl RecordingMsi {
    pub fn take(&self) -> Vec<Msi> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
    pub fn triggers(&self) -> Vec<u16> {
        self.take()
            .into_iter()
            .filter_map(|e| match e {
                Msi::Trigger(v) => Some(v),
                Msi::Configure(..) => None,
            })
            .collect()
    }
}

impl MsiSink for RecordingMsi {
    fn configure(&self, vector: u16, msg: MsiMessage, enabled: bool) -> io::Result<()> {
        self.0.lock().unwrap().push(Msi::Configure(vector, msg, enabled));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.0.lock().unwrap().push(Msi::Trigger(vector));
        Ok(())
    }
}

/// What a [`RecordingIo`] saw: (registered?, address).
pub type IoEvent = (bool, u64);

/// An [`IoEventSink`] recording every call and keeping a clone of every
/// registered eventfd, to signal it as KVM would.
#[derive(Default)]
pub struct RecordingIo {
    pub events: Mutex<Vec<IoEvent>>,
    pub live: Mutex<Vec<(u64, EventFd)>>,
    pub fail: std::sync::atomic::AtomicBool,
}

impl RecordingIo {
    pub fn take(&self) -> Vec<IoEvent> {
        std::mem::take(&mut self.events.lock().unwrap())
    }
    /// A guest write to `addr` as KVM would handle it: signals the
    /// eventfd registered there. False if none is.
    pub fn kvm_write(&self, addr: u64) -> bool {
        let live = self.live.lock().unwrap();
        match live.iter().find(|(a, _)| *a == addr) {
            Some((_, fd)) => {
                fd.write(1).unwrap();
                true
            }
            None => false,
        }
    }
}

impl IoEventSink for RecordingIo {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("ioeventfd registration refused"));
        }
        self.events.lock().unwrap().push((true, addr));
        self.live.lock().unwrap().push((addr, fd.try_clone()?));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.events.lock().unwrap().push((false, addr));
        self.live.lock().unwrap().retain(|(a, _)| *a != addr);
        Ok(())
    }
}

/// Guest RAM: 4 MiB of memfd at address 0.
pub fn guest_memory() -> GuestMemoryMap {
    let block = Arc::new(RamBlock::new("ram", 4 << 20, Backing::Memfd).unwrap());
    GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap()
}

/// A copy of the RAM regions of `map`, in new memfds at the same guest
/// addresses: the guest memory a migration destination restores.
pub fn copy_memory(map: &GuestMemoryMap) -> GuestMemoryMap {
    let mut builder = GuestMemoryMap::builder();
    for region in map.regions() {
        let range = region.range();
        let mut bytes = vec![0u8; range.len() as usize];
        region.slice(0, range.len()).unwrap().copy_to(&mut bytes[..]);
        let block = Arc::new(RamBlock::new("copy", range.len(), Backing::Memfd).unwrap());
        block.write(0, &bytes).unwrap();
        builder = builder.ram(range.start(), block).unwrap();
    }
    builder.build().unwrap()
}

/// A split virtqueue already laid out in guest memory, driven by hand:
/// the driver of a migrated guest going on with the ring it set up on the
/// source, in the destination's copy of memory.
pub struct RawRing {
    pub map: GuestMemoryMap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RawRing {
    /// Queue `index` where the transport's registers say it is (read
    /// through BAR 0, as the driver would).
    pub fn from_registers(rig: &Rig, index: u16) -> Self {
        rig.w16(Q_SELECT, index);
        Self {
            map: rig.map.clone(),
            size: rig.r16(Q_SIZE),
            desc: rig.r64(Q_DESCLO),
            avail: rig.r64(Q_AVAILLO),
            used: rig.r64(Q_USEDLO),
        }
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.map.memory().read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.map.memory().write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn u16_at(&self, addr: u64) -> u16 {
        let b = self.read(addr, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The avail ring's `idx`.
    pub fn avail_idx(&self) -> u16 {
        self.u16_at(self.avail + 2)
    }

    /// The used ring's `idx`.
    pub fn used_idx(&self) -> u16 {
        self.u16_at(self.used + 2)
    }

    /// Used element number `n` (taken modulo the size): (id, len).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let b = self.read(self.used + 4 + 8 * u64::from(n % self.size), 8);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }

    /// Makes a request available: descriptors `head` (device-readable,
    /// `request` at `buf`) and `head + 1` (device-writable, `out_len`
    /// bytes right after it). Returns the address of the writable buffer.
    pub fn add(&self, head: u16, buf: u64, request: &[u8], out_len: u32) -> u64 {
        let out = buf + request.len() as u64;
        self.write(buf, request);
        let descriptor = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            d
        };
        let d = self.desc + 16 * u64::from(head);
        self.write(d, &descriptor(buf, request.len() as u32, 1, head + 1));
        self.write(d + 16, &descriptor(out, out_len, 2, 0));
        let idx = self.avail_idx();
        self.write(self.avail + 4 + 2 * u64::from(idx % self.size), &head.to_le_bytes());
        self.write(self.avail + 2, &idx.wrapping_add(1).to_le_bytes());
        out
    }
}

/// The 32-bit and 64-bit BAR windows of the rig.
pub const MMIO32: std::ops::Range<u64> = 0xc000_0000..0xd000_0000;
pub const MMIO64: std::ops::Range<u64> = 0x40_0000_0000..0x40_1000_0000;

/// A root bus with the echo device behind virtio-pci in slot 1, BARs
/// assigned as the VMM does before boot.
pub struct Rig {
    pub root: PciRoot,
    /// The echo device, unless the rig was built for another device.
    pub echo: Option<Arc<Mutex<Echo>>>,
    pub pci: Arc<Mutex<VirtioPciDevice>>,
    pub msi: Arc<RecordingMsi>,
    pub io: Arc<RecordingIo>,
    pub map: GuestMemoryMap,
    pub bdf: PciBdf,
    pub bar: u64,
}

impl Rig {
    pub fn new() -> Self {
        Self::with_options(VirtioPciOptions::default())
    }

    pub fn with_options(options: VirtioPciOptions) -> Self {
        let echo = Arc::new(Mutex::new(Echo::new()));
        let mut rig = Self::for_device(echo.clone(), options);
        rig.echo = Some(echo);
        rig
    }

    /// A rig for any device.
    pub fn for_device(device: Arc<dyn DeviceAccess>, options: VirtioPciOptions) -> Self {
        Self::for_device_on(device, options, guest_memory())
    }

    /// A rig for any device on the guest memory `map` (e.g. a copy of
    /// another rig's, as a migration destination has).
    pub fn for_device_on(device: Arc<dyn DeviceAccess>, options: VirtioPciOptions, map: GuestMemoryMap) -> Self {
        let msi = Arc::new(RecordingMsi::default());
        let io = Arc::new(RecordingIo::default());
        let pci = Arc::new(Mutex::new(
            VirtioPciDevice::new(device, map.clone(), msi.clone(), io.clone(), options).unwrap(),
        ));
        let mut root = PciRoot::new();
        let bdf = root.add_device(pci.clone()).unwrap();
        let mut alloc = BarAllocator::new(MMIO32, MMIO64).unwrap();
        let placed = root.assign_bars(&mut alloc).unwrap();
        assert_eq!(placed.len(), 1);
        let bar = placed[0].1.addr;
        Self {
            root,
            echo: None,
            pci,
            msi,
            io,
            map,
            bdf,
            bar,
        }
    }

    pub fn echo(&self) -> MutexGuard<'_, Echo> {
        self.echo.as_ref().expect("an echo rig").lock().unwrap()
    }

    pub fn echo_handle(&self) -> Arc<Mutex<Echo>> {
        self.echo.clone().expect("an echo rig")
    }

    pub fn pci(&self) -> MutexGuard<'_, VirtioPciDevice> {
        self.pci.lock().unwrap()
    }

    // BAR 0 accesses through the root's MMIO dispatch.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        assert!(
            self.root.mmio_read(self.bar + offset, data),
            "BAR 0 + {offset:#x} not decoded"
        );
    }
    pub fn write(&self, offset: u64, data: &[u8]) {
        assert!(
            self.root.mmio_write(self.bar + offset, data),
            "BAR 0 + {offset:#x} not decoded"
        );
    }
    pub fn r8(&self, offset: u64) -> u8 {
        let mut d = [0u8; 1];
        self.read(offset, &mut d);
        d[0]
    }
    pub fn r16(&self, offset: u64) -> u16 {
        let mut d = [0u8; 2];
        self.read(offset, &mut d);
        u16::from_le_bytes(d)
    }
    pub fn r32(&self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.read(offset, &mut d);
        u32::from_le_bytes(d)
    }
    pub fn r64(&self, offset: u64) -> u64 {
        let mut d = [0u8; 8];
        self.read(offset, &mut d);
        u64::from_le_bytes(d)
    }
    pub fn w8(&self, offset: u64, v: u8) {
        self.write(offset, &[v]);
    }
    pub fn w16(&self, offset: u64, v: u16) {
        self.write(offset, &v.to_le_bytes());
    }
    pub fn w32(&self, offset: u64, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }
    pub fn w64(&self, offset: u64, v: u64) {
        self.write(offset, &v.to_le_bytes());
    }

    // Configuration space through ECAM.
    pub fn cfg_read(&self, reg: u16, data: &mut [u8]) {
        self.root.ecam_read(self.bdf.ecam_offset() + u64::from(reg), data);
    }
    pub fn cfg_write(&self, reg: u16, data: &[u8]) {
        self.root.ecam_write(self.bdf.ecam_offset() + u64::from(reg), data);
    }
    pub fn cfg8(&self, reg: u16) -> u8 {
        let mut d = [0u8; 1];
        self.cfg_read(reg, &mut d);
        d[0]
    }
    pub fn cfg16(&self, reg: u16) -> u16 {
        let mut d = [0u8; 2];
        self.cfg_read(reg, &mut d);
        u16::from_le_bytes(d)
    }
    pub fn cfg32(&self, reg: u16) -> u32 {
        let mut d = [0u8; 4];
        self.cfg_read(reg, &mut d);
        u32::from_le_bytes(d)
    }

    /// The capability list as (offset, ID, virtio cfg_type or 0).
    pub fn capabilities(&self) -> Vec<(u16, u8, u8)> {
        let mut caps = Vec::new();
        let mut at = u16::from(self.cfg8(0x34));
        while at != 0 && caps.len() < 48 {
            let id = self.cfg8(at);
            let cfg_type = if id == 0x09 { self.cfg8(at + 3) } else { 0 };
            caps.push((at, id, cfg_type));
            at = u16::from(self.cfg8(at + 1));
        }
        caps
    }

    /// The virtio capability of `cfg_type`: its configuration offset.
    pub fn virtio_cap(&self, cfg_type: u8) -> u16 {
        self.capabilities()
            .into_iter()
            .find(|&(_, id, t)| id == 0x09 && t == cfg_type)
            .map(|(at, ..)| at)
            .unwrap()
    }

    /// The MSI-X capability's offset.
    pub fn msix_cap(&self) -> u16 {
        self.capabilities()
            .into_iter()
            .find(|&(_, id, _)| id == 0x11)
            .unwrap()
            .0
    }

    /// Enables MSI-X as Linux does: enable with the function masked,
    /// program and unmask `vectors` entries (vector v: data 0x40 + v),
    /// then clear the function mask.
    pub fn enable_msix(&self, vectors: u16) {
        let control = self.msix_cap() + 2;
        let table_size = (self.cfg16(control) & 0x7ff) + 1;
        assert!(vectors <= table_size);
        self.cfg_write(control, &(0x8000u16 | 0x4000).to_le_bytes());
        for v in 0..vectors {
            let entry = MSIX_TABLE_OFFSET + 16 * u64::from(v);
            self.w32(entry, 0xfee0_0000);
            self.w32(entry + 4, 0);
            self.w32(entry + 8, 0x40 + u32::from(v));
            self.w32(entry + 12, 0);
        }
        self.cfg_write(control, &0x8000u16.to_le_bytes());
    }

    /// The notification address of `queue` as the driver computes it.
    pub fn notify_offset(&self, notify_off: u16) -> u64 {
        NOTIFY_CFG_OFFSET + 4 * u64::from(notify_off)
    }

    pub fn device(&self) -> Arc<Mutex<dyn PciDevice>> {
        self.pci.clone()
    }
}

// Common configuration offsets (Linux's VIRTIO_PCI_COMMON_*).
pub const DFSELECT: u64 = 0x00;
pub const DF: u64 = 0x04;
pub const GFSELECT: u64 = 0x08;
pub const GF: u64 = 0x0c;
pub const MSIX: u64 = 0x10;
pub const NUMQ: u64 = 0x12;
pub const STATUS: u64 = 0x14;
pub const CFGGENERATION: u64 = 0x15;
pub const Q_SELECT: u64 = 0x16;
pub const Q_SIZE: u64 = 0x18;
pub const Q_MSIX: u64 = 0x1a;
pub const Q_ENABLE: u64 = 0x1c;
pub const Q_NOFF: u64 = 0x1e;
pub const Q_DESCLO: u64 = 0x20;
pub const Q_DESCHI: u64 = 0x24;
pub const Q_AVAILLO: u64 = 0x28;
pub const Q_AVAILHI: u64 = 0x2c;
pub const Q_USEDLO: u64 = 0x30;
pub const Q_USEDHI: u64 = 0x34;

pub const ACK_DRIVER: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
pub const FEATURES_DONE: u8 = ACK_DRIVER | STATUS_FEATURES_OK;
pub const LIVE: u8 = FEATURES_DONE | STATUS_DRIVER_OK;

/// What vp_modern_probe finds: the structures' BAR offsets.
pub struct Driver<'a> {
    pub rig: &'a Rig,
    pub common: u64,
    pub isr: u64,
    pub device: u64,
    pub notify: u64,
    pub multiplier: u32,
}

impl<'a> Driver<'a> {
    /// Walks the capability list for the virtio structures, checking them
    /// as vp_modern_map_capability does.
    pub fn probe(rig: &'a Rig) -> Self {
        assert_eq!(rig.cfg16(0), 0x1af4);
        assert!((0x1040..=0x107f).contains(&rig.cfg16(2)));
        let structure = |cfg_type: u8, minlen: u32| {
            let cap = rig.virtio_cap(cfg_type);
            let bar = rig.cfg8(cap + 4);
            let offset = rig.cfg32(cap + 8);
            let length = rig.cfg32(cap + 12);
            assert_eq!(bar, 0);
            assert!(length >= minlen, "cfg_type {cfg_type}: length {length}");
            assert!(u64::from(offset) + u64::from(minlen) <= BAR0_SIZE);
            (cap, u64::from(offset))
        };
        let (_, common) = structure(1, 0x38);
        let (notify_cap, notify) = structure(2, 2);
        let (_, isr) = structure(3, 1);
        let (_, device) = structure(4, 0);
        Self {
            rig,
            common,
            isr,
            device,
            notify,
            multiplier: rig.cfg32(notify_cap + 16),
        }
    }

    pub fn status(&self) -> u8 {
        self.rig.r8(self.common + STATUS)
    }

    pub fn set_status(&self, status: u8) {
        self.rig.w8(self.common + STATUS, status);
    }

    pub fn features(&self) -> u64 {
        self.rig.w32(self.common + DFSELECT, 0);
        let lo = self.rig.r32(self.common + DF);
        self.rig.w32(self.common + DFSELECT, 1);
        let hi = self.rig.r32(self.common + DF);
        u64::from(hi) << 32 | u64::from(lo)
    }

    pub fn set_features(&self, features: u64) {
        self.rig.w32(self.common + GFSELECT, 0);
        self.rig.w32(self.common + GF, features as u32);
        self.rig.w32(self.common + GFSELECT, 1);
        self.rig.w32(self.common + GF, (features >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the
    /// status read back.
    pub fn negotiate(&self, features: u64) -> u8 {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(ACK_DRIVER);
        self.set_features(features);
        self.set_status(FEATURES_DONE);
        self.status()
    }

    /// setup_vq + the final enable, as vp_modern_find_vqs does: returns
    /// the driver's queue and its notification offset in BAR 0.
    pub fn setup_queue(&self, index: u16, size: u16, base: u64, vector: u16) -> (DriverQueue, u64) {
        let rig = self.rig;
        rig.w16(self.common + Q_SELECT, index);
        let max = rig.r16(self.common + Q_SIZE);
        assert!(max >= size && max.is_power_of_two());
        rig.w16(self.common + Q_SIZE, size);
        let queue = DriverQueue::new(&rig.map, GuestAddress(base), size, 4096).unwrap();
        let q = queue.device_queue();
        for (lo, addr) in [
            (Q_DESCLO, q.desc_table()),
            (Q_AVAILLO, q.avail_ring()),
            (Q_USEDLO, q.used_ring()),
        ] {
            rig.w32(self.common + lo, addr as u32);
            rig.w32(self.common + lo + 4, (addr >> 32) as u32);
        }
        rig.w16(self.common + Q_MSIX, vector);
        assert_eq!(rig.r16(self.common + Q_MSIX), vector, "vector mapping refused");
        let notify_off = rig.r16(self.common + Q_NOFF);
        rig.w16(self.common + Q_ENABLE, 1);
        (queue, self.notify + u64::from(notify_off) * u64::from(self.multiplier))
    }

    /// A whole initialisation: features as offered, MSI-X vector 0 for
    /// configuration and i + 1 for queue i, queue i of `size` at `base`,
    /// DRIVER_OK.
    pub fn init_queues(&self, queues: &[(u16, u64)]) -> Vec<(DriverQueue, u64)> {
        let features = self.features();
        assert_eq!(self.negotiate(features), FEATURES_DONE);
        self.rig.enable_msix(queues.len() as u16 + 1);
        self.rig.w16(self.common + MSIX, 0);
        assert_eq!(self.rig.r16(self.common + MSIX), 0);
        assert_eq!(usize::from(self.rig.r16(self.common + NUMQ)), queues.len());
        let set_up = queues
            .iter()
            .enumerate()
            .map(|(i, &(size, base))| self.setup_queue(i as u16, size, base, i as u16 + 1))
            .collect();
        self.set_status(LIVE);
        assert_eq!(self.status(), LIVE);
        set_up
    }

    /// [`init_queues`](Self::init_queues) for the echo device: queues of 8
    /// at 64 KiB and 128 KiB.
    pub fn init(&self) -> [(DriverQueue, u64); 2] {
        let queues = self.init_queues(&[(8, 0x10000), (8, 0x20000)]);
        queues.try_into().unwrap_or_else(|_| panic!("two queues"))
    }
}
