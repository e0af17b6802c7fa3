//! The common configuration structure (`struct virtio_pci_common_cfg`):
//! feature negotiation, device status and reset, queue setup, activation.
//!
//! Every field is reachable at any width: a read assembles the bytes of
//! the fields it covers, a write merges its bytes into each field it
//! touches and applies the field's write as a whole (so a 4-byte write to
//! the low half of `queue_desc` changes that half, and an 8-byte write
//! changes both). Read-only fields ignore writes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{QueueIndices, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::VirtioPciDevice;
use super::interrupt::{PciInterrupt, VIRTIO_MSI_NO_VECTOR};
use crate::access::{merge_register, read_register, touches};

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready; the device is activated.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete (cleared on read-back
/// when the device refuses the features).
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// `VIRTIO_F_ACCESS_PLATFORM`: the device's addresses go through the
/// platform's IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_RING_F_EVENT_IDX`: the used/avail event index fields.
pub(super) const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Bytes of the common configuration structure (virtio 1.2, up to
/// `admin_queue_num`).
pub const COMMON_CFG_LEN: u64 = 0x40;

/// The fields of the structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
    /// Only with `VIRTIO_F_NOTIF_CONFIG_DATA` (not offered): reads 0.
    QueueNotifyData,
    /// Only with `VIRTIO_F_RING_RESET` (not offered): reads 0.
    QueueReset,
    /// Only with `VIRTIO_F_ADMIN_VQ` (not offered): reads 0.
    AdminQueueIndex,
    /// Likewise.
    AdminQueueNum,
}

/// (offset, length, field), in offset order.
const FIELDS: [(u64, u64, Field); 20] = [
    (0x00, 4, Field::DeviceFeatureSelect),
    (0x04, 4, Field::DeviceFeature),
    (0x08, 4, Field::DriverFeatureSelect),
    (0x0c, 4, Field::DriverFeature),
    (0x10, 2, Field::ConfigMsixVector),
    (0x12, 2, Field::NumQueues),
    (0x14, 1, Field::DeviceStatus),
    (0x15, 1, Field::ConfigGeneration),
    (0x16, 2, Field::QueueSelect),
    (0x18, 2, Field::QueueSize),
    (0x1a, 2, Field::QueueMsixVector),
    (0x1c, 2, Field::QueueEnable),
    (0x1e, 2, Field::QueueNotifyOff),
    (0x20, 8, Field::QueueDesc),
    (0x28, 8, Field::QueueDriver),
    (0x30, 8, Field::QueueDevice),
    (0x38, 2, Field::QueueNotifyData),
    (0x3a, 2, Field::QueueReset),
    (0x3c, 2, Field::AdminQueueIndex),
    (0x3e, 2, Field::AdminQueueNum),
];

impl Field {
    fn writable(self) -> bool {
        matches!(
            self,
            Field::DeviceFeatureSelect
                | Field::DriverFeatureSelect
                | Field::DriverFeature
                | Field::ConfigMsixVector
                | Field::DeviceStatus
                | Field::QueueSelect
                | Field::QueueSize
                | Field::QueueMsixVector
                | Field::QueueEnable
                | Field::QueueDesc
                | Field::QueueDriver
                | Field::QueueDevice
        )
    }
}

/// One queue's registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QueueRegs {
    pub(super) max_size: u16,
    pub(super) size: u16,
    pub(super) enabled: bool,
    pub(super) desc: u64,
    pub(super) driver: u64,
    pub(super) device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The driver-visible registers (the vectors, ISR and generation live in
/// the shared interrupt state).
#[derive(Debug, Clone)]
pub(super) struct CommonConfig {
    pub(super) device_feature_select: u32,
    pub(super) driver_feature_select: u32,
    pub(super) driver_features: u64,
    /// What the driver wrote (FEATURES_OK only if negotiation succeeded).
    pub(super) status: u8,
    pub(super) features_ok: bool,
    pub(super) driver_ok: bool,
    /// Activation failed: the status reads DEVICE_NEEDS_RESET.
    pub(super) failed: bool,
    pub(super) queue_select: u16,
    pub(super) queues: Vec<QueueRegs>,
}

impl CommonConfig {
    /// The registers after reset, for queues of these maximum sizes.
    pub(super) fn new(max_sizes: &[u16]) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            features_ok: false,
            driver_ok: false,
            failed: false,
            queue_select: 0,
            queues: max_sizes.iter().copied().map(QueueRegs::new).collect(),
        }
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, if its registers may still change: it exists,
    /// the device is not live (DRIVER_OK) and the queue is not enabled.
    fn selected_for_setup(&mut self) -> Option<&mut QueueRegs> {
        if self.driver_ok {
            return None;
        }
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled)
    }
}

impl VirtioPciDevice {
    /// Reads the common configuration at `offset` (any width).
    pub(super) fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (reg, len, field) in FIELDS {
            if touches(offset, data.len(), reg, len) {
                read_register(offset, data, reg, len, self.common_field(field, true));
            }
        }
    }

    /// Writes the common configuration at `offset` (any width).
    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        for (reg, len, field) in FIELDS {
            if !field.writable() {
                continue;
            }
            if let Some(value) = merge_register(offset, data, reg, len, self.common_field(field, false)) {
                self.set_common_field(field, value);
            }
        }
    }

    /// A field's value; `with_device` ORs the device's own status bits
    /// into the status (a read does, a read-modify-write does not).
    fn common_field(&self, field: Field, with_device: bool) -> u64 {
        let c = &self.common;
        let half = |value: u64, select: u32| match select {
            0 => value & 0xffff_ffff,
            1 => value >> 32,
            _ => 0,
        };
        match field {
            Field::DeviceFeatureSelect => u64::from(c.device_feature_select),
            Field::DeviceFeature => half(self.offered_features(), c.device_feature_select),
            Field::DriverFeatureSelect => u64::from(c.driver_feature_select),
            Field::DriverFeature => half(c.driver_features, c.driver_feature_select),
            Field::ConfigMsixVector => u64::from(self.shared.config_vector.load(Ordering::SeqCst)),
            Field::NumQueues => c.queues.len() as u64,
            Field::DeviceStatus => {
                let mut status = c.status;
                if with_device {
                    if c.failed {
                        status |= STATUS_DEVICE_NEEDS_RESET;
                    }
                    status |= self.with_device(|d| d.device_status()).unwrap_or(0);
                }
                u64::from(status)
            }
            Field::ConfigGeneration => u64::from(self.shared.config_generation.load(Ordering::SeqCst)),
            Field::QueueSelect => u64::from(c.queue_select),
            Field::QueueSize => c.selected().map_or(0, |q| u64::from(q.size)),
            Field::QueueMsixVector => u64::from(
                self.shared
                    .queue_vectors
                    .get(usize::from(c.queue_select))
                    .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            ),
            Field::QueueEnable => c.selected().map_or(0, |q| u64::from(q.enabled)),
            // queue_notify_off = the queue index: queue i notifies at
            // notify base + i * notify_off_multiplier.
            Field::QueueNotifyOff => c.selected().map_or(0, |_| u64::from(c.queue_select)),
            Field::QueueDesc => c.selected().map_or(0, |q| q.desc),
            Field::QueueDriver => c.selected().map_or(0, |q| q.driver),
            Field::QueueDevice => c.selected().map_or(0, |q| q.device),
            Field::QueueNotifyData | Field::QueueReset | Field::AdminQueueIndex | Field::AdminQueueNum => 0,
        }
    }

    fn set_common_field(&mut self, field: Field, value: u64) {
        let name = self.name();
        let c = &mut self.common;
        match field {
            Field::DeviceFeatureSelect => c.device_feature_select = value as u32,
            Field::DriverFeatureSelect => c.driver_feature_select = value as u32,
            Field::DriverFeature => {
                if c.features_ok {
                    log::warn!("{name}: driver_feature written after FEATURES_OK; ignored");
                    return;
                }
                match c.driver_feature_select {
                    0 => c.driver_features = (c.driver_features & !0xffff_ffff) | (value & 0xffff_ffff),
                    1 => c.driver_features = (c.driver_features & 0xffff_ffff) | (value & 0xffff_ffff) << 32,
                    select => log::debug!("{name}: driver_feature_select {select} has no features; write ignored"),
                }
            }
            Field::ConfigMsixVector => {
                let vector = self.checked_vector(value as u16);
                self.shared.config_vector.store(vector, Ordering::SeqCst);
            }
            Field::DeviceStatus => self.set_status(value as u8),
            Field::QueueSelect => c.queue_select = value as u16,
            Field::QueueSize => {
                let Some(q) = c.selected_for_setup() else {
                    return;
                };
                let size = value as u16;
                if size.is_power_of_two() && size <= q.max_size {
                    q.size = size;
                } else {
                    log::warn!(
                        "{name}: queue size {size} is not a power of two up to {}; keeping {}",
                        q.max_size,
                        q.size
                    );
                }
            }
            Field::QueueMsixVector => {
                if c.driver_ok {
                    return;
                }
                let vector = self.checked_vector(value as u16);
                if let Some(slot) = self.shared.queue_vectors.get(usize::from(self.common.queue_select)) {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            Field::QueueEnable => {
                // Writing 0 is forbidden to drivers (without queue reset).
                if value as u16 == 1
                    && let Some(q) = c.selected_for_setup()
                {
                    q.enabled = true;
                }
            }
            Field::QueueDesc => {
                if let Some(q) = c.selected_for_setup() {
                    q.desc = value;
                }
            }
            Field::QueueDriver => {
                if let Some(q) = c.selected_for_setup() {
                    q.driver = value;
                }
            }
            Field::QueueDevice => {
                if let Some(q) = c.selected_for_setup() {
                    q.device = value;
                }
            }
            _ => {}
        }
    }

    /// `vector` if it is in the MSI-X table, else NO_VECTOR (the driver
    /// reads back NO_VECTOR and knows the mapping failed).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            if vector != VIRTIO_MSI_NO_VECTOR {
                log::warn!(
                    "{}: MSI-X vector {vector} is outside the table of {}; mapped to NO_VECTOR",
                    self.name(),
                    self.msix_vectors
                );
            }
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The driver wrote `value` to `device_status`.
    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & STATUS_FEATURES_OK != 0 && !self.common.features_ok {
            self.common.features_ok = self.negotiate_features();
        }
        if !self.common.features_ok {
            value &= !STATUS_FEATURES_OK;
        }
        self.common.status = value;
        if value & STATUS_DRIVER_OK != 0 && !self.common.driver_ok {
            self.common.driver_ok = true;
            self.activate();
        }
    }

    /// FEATURES_OK: the device accepts the driver's features if they were
    /// all offered, include `VIRTIO_F_VERSION_1`, and the device kept them.
    fn negotiate_features(&mut self) -> bool {
        let name = self.name();
        let offered = self.offered_features();
        let wanted = self.common.driver_features;
        let unoffered = wanted & !offered;
        if unoffered != 0 {
            log::warn!(
                "{name}: driver accepted features {unoffered:#x} that were not offered ({offered:#x}); FEATURES_OK refused"
            );
            return false;
        }
        if wanted & VIRTIO_F_VERSION_1 == 0 {
            log::warn!("{name}: driver did not accept VIRTIO_F_VERSION_1 (features {wanted:#x}); FEATURES_OK refused");
            return false;
        }
        let for_device = wanted & !self.transport_features;
        let kept = self.with_device(|d| {
            d.ack_features(for_device);
            d.acked_features()
        });
        if kept != Some(for_device) {
            log::warn!("{name}: device kept features {kept:#x?} of {for_device:#x}; FEATURES_OK refused");
            return false;
        }
        true
    }

    /// DRIVER_OK: builds the queues from the registers and activates the
    /// device; on failure the status shows DEVICE_NEEDS_RESET and the
    /// driver gets a configuration interrupt.
    fn activate(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PciInterrupt::new(self.shared.clone()));
        let result = if self.common.features_ok {
            self.activate_device(interrupt.clone(), None)
        } else {
            Err("DRIVER_OK without FEATURES_OK".to_string())
        };
        if let Err(reason) = result {
            log::warn!("{}: activation failed, device needs reset: {reason}", self.name());
            self.common.failed = true;
            if let Err(e) = interrupt.trigger(memvisor_virtio::InterruptKind::Config) {
                log::warn!("{}: NEEDS_RESET interrupt failed: {e}", self.name());
            }
        }
    }

    /// Builds the queues from the registers — with `indices`, each queue
    /// at the given indices (a restored device), else at 0 with the
    /// negotiated event-index setting — and activates the device with
    /// `interrupt`. On success the transport is active; on failure its
    /// status reads DEVICE_NEEDS_RESET (the caller tells the driver, or
    /// not). Neither processes a queue nor interrupts the driver.
    pub(super) fn activate_device(
        &mut self,
        interrupt: Arc<dyn VirtioInterrupt>,
        indices: Option<&[QueueIndices]>,
    ) -> Result<(), String> {
        let result = self.build_queues(indices).and_then(|queues| {
            let mem = self.mem.clone();
            match self.with_device(move |d| d.activate(mem, interrupt, queues)) {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("the device is not reachable".to_string()),
            }
        });
        match &result {
            Ok(()) => self.shared.active.store(true, Ordering::SeqCst),
            Err(_) => self.common.failed = true,
        }
        result
    }

    /// One [`Queue`] per queue, as the driver set it up; at `indices` if
    /// given (one per queue).
    fn build_queues(&self, indices: Option<&[QueueIndices]>) -> Result<Vec<Queue>, String> {
        let event_idx = self.with_device(|d| d.acked_features()).unwrap_or(0) & VIRTIO_RING_F_EVENT_IDX != 0;
        if let Some(indices) = indices
            && indices.len() != self.common.queues.len()
        {
            return Err(format!(
                "{} queue indices for {} queues",
                indices.len(),
                self.common.queues.len()
            ));
        }
        self.common
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| {
                let fail = |what: &str, e: virtio_queue::Error| format!("queue {index}: {what}: {e}");
                let mut queue = Queue::new(regs.max_size).map_err(|e| fail("maximum size", e))?;
                queue.try_set_size(regs.size).map_err(|e| fail("size", e))?;
                if regs.enabled {
                    queue
                        .try_set_desc_table_address(GuestAddress(regs.desc))
                        .map_err(|e| fail("descriptor area", e))?;
                    queue
                        .try_set_avail_ring_address(GuestAddress(regs.driver))
                        .map_err(|e| fail("driver area", e))?;
                    queue
                        .try_set_used_ring_address(GuestAddress(regs.device))
                        .map_err(|e| fail("device area", e))?;
                    queue.set_ready(true);
                }
                queue.set_event_idx(event_idx);
                if let Some(at) = indices.and_then(|indices| indices.get(index)) {
                    at.apply(&mut queue);
                }
                Ok(queue)
            })
            .collect()
    }

    /// Device reset (status 0): the device resets, queues return to their
    /// defaults, every event to NO_VECTOR; interrupt handles given out
    /// before go stale. The MSI-X table (PCI function state) is kept.
    pub(super) fn reset(&mut self) {
        self.shared.active.store(false, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.with_device(|d| d.reset());
        self.shared.reset_vectors();
        let max_sizes: Vec<u16> = self.common.queues.iter().map(|q| q.max_size).collect();
        self.common = CommonConfig::new(&max_sizes);
    }
}
