//! The virtio-pci modern transport (virtio 1.2 §4.1) for memvisor's
//! [`VirtioDevice`]s: a non-transitional PCI function (vendor 0x1af4,
//! device 0x1040 + virtio device type, revision 1) with one 64-bit memory
//! BAR holding every virtio structure and the MSI-X table.
//!
//! # BAR 0 layout
//!
//! BAR 0 is 32 KiB, 64-bit, not prefetchable:
//!
//! | offset   | structure                 | capability length |
//! |----------|---------------------------|-------------------|
//! | `0x0000` | common configuration      | `0x40`            |
//! | `0x1000` | ISR status (1 byte)       | 1                 |
//! | `0x2000` | device configuration      | `0x1000`          |
//! | `0x3000` | notifications, queue `i` at `0x3000 + 4 * i` (`notify_off_multiplier` 4) | `4 * queues` |
//! | `0x4000` | MSI-X table (≤ 256 vectors) |                 |
//! | `0x5000` | MSI-X pending bit array   |                   |
//!
//! Each region is 4 KiB; the rest of the BAR reads zero and ignores
//! writes. The capability list holds COMMON_CFG, ISR_CFG, DEVICE_CFG,
//! NOTIFY_CFG, PCI_CFG (the configuration-space window onto BAR 0) and
//! MSI-X. There is no INTx (interrupt pin 0) and no I/O BAR.
//!
//! # Snapshot and migration
//!
//! [`VirtioPciDevice::state`] and [`VirtioPciDevice::restore`] carry the
//! transport's state, with the device's queue indices, to a destination
//! built alike; see [`persist`].
//!
//! # Threads and locks
//!
//! The VMM holds a [`VirtioPciDevice`] as `Arc<Mutex<dyn PciDevice>>` (the
//! *transport lock*) for configuration and BAR accesses from vCPU threads.
//! Queue notifications reach the device either through a BAR write (under
//! the transport lock) or — once the VMM registered the eventfds of
//! [`queue_events`](VirtioPciDevice::queue_events) through its
//! [`IoEventSink`] — through the event loop calling
//! [`QueueNotifier::notify`] (no transport lock). The device's own lock is
//! its [`DeviceAccess`]'s, taken after the transport lock when both are
//! held. Interrupts never take the transport lock: the handle a device gets
//! at activation touches only atomics and the MSI-X leaf lock, and calls
//! the [`MsiSink`] under that leaf lock.

mod common;
mod interrupt;
pub mod persist;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use common::{
    COMMON_CFG_LEN, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, VIRTIO_F_ACCESS_PLATFORM,
};
pub use interrupt::{ISR_CONFIG, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR};
pub use persist::{QueueState, TransportStateError, VirtioPciState};

use self::common::CommonConfig;
use self::interrupt::Shared;
use crate::PciError;
use crate::access::{overlap, touches};
use crate::config::{BarInfo, ConfigSpace, PciDevice, PciHeader};
use crate::msix::{MSIX_CAP_ID, MsiSink, MsixConfig};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a non-transitional virtio device of type 0.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The highest virtio device type a non-transitional PCI ID can carry.
pub const MAX_DEVICE_TYPE: u32 = 0x3f;

/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status in BAR 0.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification region in BAR 0.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Bytes of each region of BAR 0.
pub const REGION_SIZE: u64 = 0x1000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// The most queues: their notification addresses fill the region.
pub const MAX_QUEUES: usize = (REGION_SIZE / NOTIFY_OFF_MULTIPLIER as u64) as usize;
/// The most MSI-X vectors: their table entries fill the region.
pub const MAX_MSIX_VECTORS: u16 = (REGION_SIZE / crate::msix::MSIX_ENTRY_SIZE) as u16;

/// Vendor-specific capability ID, carrying the virtio structures.
const CAP_ID_VENDOR: u8 = 0x09;
/// `cfg_type` values of the virtio capabilities.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Offsets inside a virtio capability.
const CAP_BAR: u16 = 4;
const CAP_OFFSET: u16 = 8;
const CAP_LENGTH: u16 = 12;
const CAP_PCI_CFG_DATA: u16 = 16;

/// The event loop's side of queue notifications: KVM ioeventfds, one per
/// queue, on the queue's notification address. Implemented by the VMM
/// with `KVM_IOEVENTFD` (MMIO, any access length, no datamatch). Called
/// under the transport lock, so it must not take it.
pub trait IoEventSink: Send + Sync {
    /// Starts signalling `fd` on guest writes to `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    /// Stops signalling `fd` for `addr`.
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}

/// How the transport reaches its device: the owner keeps the device
/// (behind its own lock) and lends it for the duration of `f`.
pub trait DeviceAccess: Send + Sync {
    /// Runs `f` on the device, under the owner's lock.
    fn with_device(&self, f: &mut dyn FnMut(&mut dyn VirtioDevice));
}

impl<D: VirtioDevice> DeviceAccess for std::sync::Mutex<D> {
    fn with_device(&self, f: &mut dyn FnMut(&mut dyn VirtioDevice)) {
        let mut device = self.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut *device);
    }
}

/// Runs `f` on the device behind `access`; `None` if the owner did not
/// lend it.
fn with_device<R>(access: &dyn DeviceAccess, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> Option<R> {
    let mut f = Some(f);
    let mut out = None;
    access.with_device(&mut |device| {
        if let Some(f) = f.take() {
            out = Some(f(device));
        }
    });
    out
}

/// Transport options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioPciOptions {
    /// MSI-X table size, 1..=256; by default one vector per queue plus one
    /// for configuration changes (at most 256). Linux needs at least 2
    /// (configuration + shared queue vector), and queues + 1 for a vector
    /// per queue.
    pub msix_vectors: Option<u16>,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` (bit 33) on the device's behalf: the
    /// device sits behind virtio-iommu, so the driver uses IOVAs. The bit
    /// is the transport's: it is not passed to the device's `ack_features`.
    pub access_platform: bool,
    /// Subsystem vendor ID; by default 0x1af4.
    pub subsystem_vendor_id: Option<u16>,
    /// Subsystem ID; by default the virtio device type.
    pub subsystem_id: Option<u16>,
    /// Class code (24 bits); by default by device type, as QEMU does:
    /// virtio-blk 0x010000, virtio-net 0x020000, console 0x078000,
    /// everything else 0xff0000.
    pub class_code: Option<u32>,
}

/// The class code QEMU gives a virtio device of `device_type`.
fn default_class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_0000, // network controller
        2 => 0x01_0000, // mass storage, SCSI (QEMU's choice for virtio-blk)
        3 => 0x07_8000, // simple communication, other
        _ => 0xff_0000, // unassigned class
    }
}

/// Signals the device that a queue has work, from the event loop, without
/// the transport lock. Cloned from
/// [`VirtioPciDevice::notifier`].
#[derive(Clone)]
pub struct QueueNotifier {
    device: Arc<dyn DeviceAccess>,
    shared: Arc<Shared>,
    queues: u16,
}

impl fmt::Debug for QueueNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueNotifier").field("queues", &self.queues).finish()
    }
}

impl QueueNotifier {
    /// Queue `queue` was kicked: calls the device's `queue_notify` if the
    /// queue exists and the device is activated. Returns whether it did.
    pub fn notify(&self, queue: u16) -> bool {
        notify_queue(self.device.as_ref(), &self.shared, self.queues, queue)
    }
}

/// Forwards a kick of `queue` (of `queues`) to an activated device.
fn notify_queue(device: &dyn DeviceAccess, shared: &Shared, queues: u16, queue: u16) -> bool {
    if queue >= queues || !shared.active.load(Ordering::SeqCst) {
        return false;
    }
    with_device(device, |d| d.queue_notify(queue)).is_some()
}

/// A virtio device on PCI; see the [module documentation](self).
pub struct VirtioPciDevice {
    device: Arc<dyn DeviceAccess>,
    mem: GuestMemoryMap,
    ioevents: Arc<dyn IoEventSink>,
    shared: Arc<Shared>,
    config: ConfigSpace,
    msix_cap: u16,
    pci_cfg_cap: u16,
    device_type: u32,
    msix_vectors: u16,
    /// Feature bits the transport offers on the device's behalf.
    transport_features: u64,
    common: CommonConfig,
    queue_events: Vec<EventFd>,
    /// The notification base the eventfds are registered at, and which
    /// registrations succeeded (queue, address).
    ioevent_base: Option<u64>,
    registered: Vec<(u16, u64)>,
}

impl fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device_type)
            .field("config", &self.config)
            .field("common", &self.common)
            .field("ioevent_base", &self.ioevent_base)
            .finish()
    }
}

impl VirtioPciDevice {
    /// A PCI function for the device behind `device`, with guest memory
    /// `mem` (handed to the device at activation), interrupts through
    /// `msi` and queue notification eventfds registered with `ioevents`
    /// whenever BAR 0 is assigned and memory decoding is on.
    pub fn new(
        device: Arc<dyn DeviceAccess>,
        mem: GuestMemoryMap,
        msi: Arc<dyn MsiSink>,
        ioevents: Arc<dyn IoEventSink>,
        options: VirtioPciOptions,
    ) -> Result<Self, PciError> {
        let (device_type, max_sizes, avail_features) = with_device(device.as_ref(), |d| {
            (d.device_type(), d.queue_max_sizes().to_vec(), d.avail_features())
        })
        .ok_or(PciError::DeviceUnavailable)?;
        if device_type > MAX_DEVICE_TYPE {
            return Err(PciError::DeviceType(device_type));
        }
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(PciError::QueueCount {
                got: max_sizes.len(),
                max: MAX_QUEUES,
            });
        }
        if let Some((index, &size)) = max_sizes
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_power_of_two() || **s > 32768)
        {
            return Err(PciError::QueueMaxSize { index, size });
        }
        let queues = max_sizes.len();
        let msix_vectors = options
            .msix_vectors
            .unwrap_or_else(|| (queues as u16 + 1).min(MAX_MSIX_VECTORS));
        if msix_vectors == 0 || msix_vectors > MAX_MSIX_VECTORS {
            return Err(PciError::InvalidVectorCount {
                got: msix_vectors,
                max: MAX_MSIX_VECTORS,
            });
        }
        let msix = MsixConfig::new(msix_vectors, msi)?;

        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code: options.class_code.unwrap_or_else(|| default_class_code(device_type)) & 0xff_ffff,
            subsystem_vendor_id: options.subsystem_vendor_id.unwrap_or(VIRTIO_PCI_VENDOR_ID),
            subsystem_id: options.subsystem_id.unwrap_or(device_type as u16),
        });
        config.add_bar(0, BAR0_SIZE, true, false)?;
        let vendor_cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut body = vec![(2 + 14 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, &[]),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1, &[]),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, REGION_SIZE, &[]),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        let pci_cfg_cap = config.add_capability(CAP_ID_VENDOR, &vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]))?;
        // The window's bar, offset, length and data are the driver's.
        config.set_write_mask(pci_cfg_cap + CAP_BAR, &[0xff]);
        config.set_write_mask(pci_cfg_cap + CAP_OFFSET, &[0xff; 12]);
        let msix_cap = config.add_capability(
            MSIX_CAP_ID,
            &msix.capability_body(0, MSIX_TABLE_OFFSET as u32, 0, MSIX_PBA_OFFSET as u32),
        )?;
        // Message control: enable and function mask are writable.
        config.set_write_mask(msix_cap + 3, &[0xc0]);

        let queue_events = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(PciError::EventFd)?;
        let transport_features = if options.access_platform && avail_features & VIRTIO_F_ACCESS_PLATFORM == 0 {
            VIRTIO_F_ACCESS_PLATFORM
        } else {
            0
        };
        Ok(Self {
            device,
            mem,
            ioevents,
            shared: Arc::new(Shared::new(queues, msix)),
            config,
            msix_cap,
            pci_cfg_cap,
            device_type,
            msix_vectors,
            transport_features,
            common: CommonConfig::new(&max_sizes),
            queue_events,
            ioevent_base: None,
            registered: Vec::new(),
        })
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The number of queues.
    pub fn num_queues(&self) -> u16 {
        self.common.queues.len() as u16
    }

    /// The MSI-X table size.
    pub fn msix_vectors(&self) -> u16 {
        self.msix_vectors
    }

    /// Features offered to the driver: the device's, plus the transport's
    /// (`VIRTIO_F_ACCESS_PLATFORM` with [`VirtioPciOptions::access_platform`]).
    pub fn offered_features(&self) -> u64 {
        self.with_device(|d| d.avail_features()).unwrap_or(0) | self.transport_features
    }

    /// One eventfd per queue (clones), `(queue index, eventfd)`, for the
    /// VMM's event loop: when one is readable, read it and call
    /// [`notify`](Self::notify) (or a [`QueueNotifier`]'s) for the queue.
    pub fn queue_events(&self) -> io::Result<Vec<(u16, EventFd)>> {
        self.queue_events
            .iter()
            .enumerate()
            .map(|(i, fd)| Ok((i as u16, fd.try_clone()?)))
            .collect()
    }

    /// A handle that notifies queues without the transport lock.
    pub fn notifier(&self) -> QueueNotifier {
        QueueNotifier {
            device: self.device.clone(),
            shared: self.shared.clone(),
            queues: self.num_queues(),
        }
    }

    /// Queue `queue` was kicked: calls the device's `queue_notify` if the
    /// queue exists and the device is activated. Returns whether it did.
    pub fn notify(&self, queue: u16) -> bool {
        notify_queue(self.device.as_ref(), &self.shared, self.num_queues(), queue)
    }

    /// Where the queue notification eventfds are registered now (the
    /// notification region's guest address), if they are.
    pub fn notify_address(&self) -> Option<u64> {
        self.ioevent_base.filter(|_| !self.registered.is_empty())
    }

    /// The configuration space.
    pub fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    fn name(&self) -> String {
        format!("virtio-pci (type {})", self.device_type)
    }

    fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> Option<R> {
        with_device(self.device.as_ref(), f)
    }

    /// The notification region's address while BAR 0 decodes.
    fn decoded_notify_base(&self) -> Option<u64> {
        if !self.config.memory_enabled() {
            return None;
        }
        let bar = self.config.bar(0)?;
        (bar.addr != 0).then(|| bar.addr + NOTIFY_CFG_OFFSET)
    }

    /// Moves the notification eventfds to where BAR 0 decodes now: the VMM
    /// only sees the writes it registered, so a moved or disabled BAR must
    /// take its eventfds along.
    fn sync_ioevents(&mut self) {
        let base = self.decoded_notify_base();
        if base == self.ioevent_base {
            return;
        }
        self.unregister_ioevents();
        self.ioevent_base = base;
        let Some(base) = base else {
            return;
        };
        for (queue, fd) in self.queue_events.iter().enumerate() {
            let addr = base + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            match self.ioevents.register(addr, fd) {
                Ok(()) => self.registered.push((queue as u16, addr)),
                Err(e) => log::warn!(
                    "{}: queue {queue}: ioeventfd at {addr:#x} not registered ({e}); notifications take the MMIO path",
                    self.name()
                ),
            }
        }
    }

    fn unregister_ioevents(&mut self) {
        for (queue, addr) in std::mem::take(&mut self.registered) {
            if let Some(fd) = self.queue_events.get(usize::from(queue))
                && let Err(e) = self.ioevents.unregister(addr, fd)
            {
                log::warn!(
                    "{}: queue {queue}: ioeventfd at {addr:#x} not unregistered: {e}",
                    self.name()
                );
            }
        }
    }

    /// The PCI_CFG window (bar, offset, length) if it addresses 1, 2 or 4
    /// aligned bytes inside BAR 0.
    fn pci_cfg_window(&self) -> Option<(u8, u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + CAP_BAR);
        let offset = u64::from(self.config.read_u32(cap + CAP_OFFSET));
        let length = u64::from(self.config.read_u32(cap + CAP_LENGTH));
        let valid = bar == 0 && matches!(length, 1 | 2 | 4) && offset % length == 0 && offset + length <= BAR0_SIZE;
        valid.then_some((bar, offset, length as usize))
    }

    /// A write at `offset` of the notification region: the queue whose
    /// notification address it is gets notified (the value written, the
    /// queue index, is not needed: the address says it, as with the
    /// ioeventfds).
    fn write_notify(&mut self, offset: u64) {
        if offset % u64::from(NOTIFY_OFF_MULTIPLIER) != 0 {
            return;
        }
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Ok(queue) = u16::try_from(queue) {
            self.notify(queue);
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.unregister_ioevents();
    }
}

/// The regions of BAR 0.
#[derive(Debug, Clone, Copy)]
enum Region {
    Common,
    Isr,
    Device,
    Notify,
    MsixTable,
    MsixPba,
}

const REGIONS: [(u64, Region); 6] = [
    (COMMON_CFG_OFFSET, Region::Common),
    (ISR_CFG_OFFSET, Region::Isr),
    (DEVICE_CFG_OFFSET, Region::Device),
    (NOTIFY_CFG_OFFSET, Region::Notify),
    (MSIX_TABLE_OFFSET, Region::MsixTable),
    (MSIX_PBA_OFFSET, Region::MsixPba),
];

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let data_field = self.pci_cfg_cap + CAP_PCI_CFG_DATA;
        if touches(u64::from(offset), data.len(), u64::from(data_field), 4) {
            // A read of pci_cfg_data reads the window from the BAR first.
            let mut window = [0u8; 4];
            if let Some((bar, at, len)) = self.pci_cfg_window() {
                self.read_bar(bar, at, &mut window[..len]);
            }
            self.config.set_bytes(data_field, &window);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let start = u64::from(offset);
        if touches(start, data.len(), u64::from(self.msix_cap) + 2, 2) {
            let control = self.config.read_u16(self.msix_cap + 2);
            self.shared.msix().set_message_control(control);
        }
        let data_field = self.pci_cfg_cap + CAP_PCI_CFG_DATA;
        if touches(start, data.len(), u64::from(data_field), 4)
            && let Some((bar, at, len)) = self.pci_cfg_window()
        {
            let mut window = [0u8; 4];
            self.config.read(data_field, &mut window);
            self.write_bar(bar, at, &window[..len]);
        }
        self.sync_ioevents();
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        for (start, region) in REGIONS {
            let Some((at, rel, n)) = overlap(offset, data.len(), start, REGION_SIZE) else {
                continue;
            };
            let part = &mut data[at..at + n];
            match region {
                Region::Common => self.read_common(rel, part),
                Region::Isr => {
                    if rel == 0 {
                        part[0] = self.shared.isr.swap(0, Ordering::SeqCst);
                    }
                }
                Region::Device => {
                    self.with_device(|d| d.read_config(rel, part));
                }
                Region::Notify => {}
                Region::MsixTable => self.shared.msix().read_table(rel, part),
                Region::MsixPba => self.shared.msix().read_pba(rel, part),
            }
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        for (start, region) in REGIONS {
            let Some((at, rel, n)) = overlap(offset, data.len(), start, REGION_SIZE) else {
                continue;
            };
            let part = &data[at..at + n];
            match region {
                Region::Common => self.write_common(rel, part),
                Region::Isr | Region::MsixPba => {}
                Region::Device => {
                    self.with_device(|d| d.write_config(rel, part));
                }
                Region::Notify => self.write_notify(rel),
                Region::MsixTable => self.shared.msix().write_table(rel, part),
            }
        }
    }
}
