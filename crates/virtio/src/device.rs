//! The `VirtioDevice` trait and the state every device shares.

use std::sync::Arc;

use memvisor_memory::map::GuestMemoryMap;
use virtio_queue::Queue;

use crate::interrupt::{InterruptKind, VirtioInterrupt};
use crate::queue::{DeviceQueue, QueueIndices};

/// `VIRTIO_F_VERSION_1`: the device follows virtio 1.x; every memvisor
/// device offers it and refuses a driver that does not accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The device status bit a device sets when it needs a reset.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;

/// Why a device refused activation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// The driver gave the wrong number of queues.
    #[error("{device}: expected {expected} queues, got {got}")]
    QueueCount {
        /// Device name.
        device: &'static str,
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// A queue is not ready or its rings are not in guest memory.
    #[error("{device}: queue {index} is not valid: {reason}")]
    InvalidQueue {
        /// Device name.
        device: &'static str,
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The driver did not accept a feature the device requires.
    #[error("{device}: the driver did not accept required feature {feature} (bit {bit})")]
    MissingFeature {
        /// Device name.
        device: &'static str,
        /// Feature name.
        feature: &'static str,
        /// Feature bit.
        bit: u32,
    },
    /// The device is already active.
    #[error("{device}: already activated")]
    AlreadyActive {
        /// Device name.
        device: &'static str,
    },
}

/// A virtio device as a transport (virtio-mmio, virtio-pci) sees it.
///
/// Life cycle: the transport reads features and configuration, the driver
/// acknowledges features, the transport calls [`activate`](Self::activate)
/// with the queues the driver set up, then [`queue_notify`](Self::queue_notify)
/// on every kick. [`reset`](Self::reset) (the driver writing status 0)
/// returns the device to its pre-activation state.
pub trait VirtioDevice: Send {
    /// The virtio device ID (24 for virtio-mem, 23 for virtio-iommu).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features the device offers.
    fn avail_features(&self) -> u64;

    /// Features the driver accepted so far.
    fn acked_features(&self) -> u64;

    /// The driver accepts `features`; bits the device did not offer are
    /// ignored (and logged), as the specification requires of a device.
    fn ack_features(&mut self, features: u64);

    /// Reads the configuration space at any offset and width; bytes past
    /// its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the configuration space. The devices here have read-only
    /// configuration; writes are logged and ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "device {}: ignoring a {}-byte write to read-only config offset {offset:#x}",
            self.device_type(),
            data.len()
        );
    }

    /// Starts the device with the driver's queues. Fails, leaving the
    /// device inactive, if the queues or accepted features are unusable.
    ///
    /// The queues' indices ([`QueueIndices`]) are taken as given: a
    /// transport restoring a migrated device passes queues whose indices
    /// are the source's, so activation must not reset them, must not
    /// process a queue (requests are processed on
    /// [`queue_notify`](Self::queue_notify) only), must not interrupt the
    /// driver, and must not reset the device's own model state (which
    /// may have been restored before).
    fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// The driver kicked queue `index`: process what it made available.
    fn queue_notify(&mut self, index: u16);

    /// Where the device is in each of its queues, in queue order, while it
    /// is active (also in NEEDS_RESET); empty while inactive. A transport
    /// saves them for migration, and the destination's transport sets them
    /// on the queues it passes to [`activate`](Self::activate). A device
    /// embedding [`VirtioCommon`] returns [`VirtioCommon::queue_indices`].
    fn queue_indices(&self) -> Vec<QueueIndices>;

    /// Device reset (status 0): forget the queues, features and NEEDS_RESET.
    fn reset(&mut self);

    /// True once the device met a fault that needs a driver reset.
    fn needs_reset(&self) -> bool;

    /// Calls `observer` with the reason each time the device enters
    /// NEEDS_RESET, so that the VMM can report it. The default ignores it
    /// (a device that never needs a reset).
    fn observe_needs_reset(&mut self, observer: NeedsResetObserver) {
        let _ = observer;
    }

    /// The device-status bits the device itself contributes (the
    /// transport ORs them into the status register): [`DEVICE_NEEDS_RESET`]
    /// or 0.
    fn device_status(&self) -> u8 {
        if self.needs_reset() { DEVICE_NEEDS_RESET } else { 0 }
    }
}

/// Called with the reason when a device enters NEEDS_RESET
/// ([`VirtioDevice::observe_needs_reset`]).
pub type NeedsResetObserver = Arc<dyn Fn(&str) + Send + Sync>;

/// What every device keeps about its transport-facing state: features,
/// queues, memory, interrupt and the NEEDS_RESET flag. Devices embed it so
/// that the [`VirtioDevice`] bookkeeping is written once.
pub struct VirtioCommon {
    name: &'static str,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    active: Option<Active>,
    needs_reset: bool,
    needs_reset_observer: Option<NeedsResetObserver>,
}

/// State that exists only while the device is active.
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemoryMap,
    /// The interrupt towards the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver's queues.
    pub queues: Vec<DeviceQueue>,
}

impl std::fmt::Debug for VirtioCommon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCommon")
            .field("name", &self.name)
            .field("avail_features", &format_args!("{:#x}", self.avail_features))
            .field("acked_features", &format_args!("{:#x}", self.acked_features))
            .field("active", &self.active.is_some())
            .field("needs_reset", &self.needs_reset)
            .finish()
    }
}

impl VirtioCommon {
    /// State for a device called `name` offering `avail_features` (plus
    /// [`VIRTIO_F_VERSION_1`], always) with queues of these maximum sizes.
    pub fn new(name: &'static str, avail_features: u64, queue_max_sizes: Vec<u16>) -> Self {
        Self {
            name,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            queue_max_sizes,
            active: None,
            needs_reset: false,
            needs_reset_observer: None,
        }
    }

    /// The device's name, used in errors and logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// See [`VirtioDevice::queue_max_sizes`].
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// See [`VirtioDevice::avail_features`].
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// See [`VirtioDevice::acked_features`].
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// True if the driver accepted every bit of `feature`.
    pub fn has_feature(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// See [`VirtioDevice::ack_features`].
    pub fn ack_features(&mut self, features: u64) {
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            log::warn!(
                "{}: driver accepted features {unknown:#x} that were not offered; ignoring them",
                self.name
            );
        }
        self.acked_features |= features & self.avail_features;
    }

    /// Checks what every device requires at activation — not yet active,
    /// `VIRTIO_F_VERSION_1` accepted, the right number of valid queues —
    /// and becomes active. Device-specific checks come first, in the device.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let device = self.name;
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive { device });
        }
        if !self.has_feature(VIRTIO_F_VERSION_1) {
            return Err(ActivateError::MissingFeature {
                device,
                feature: "VIRTIO_F_VERSION_1",
                bit: 32,
            });
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                device,
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        let queues = queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| {
                DeviceQueue::new(queue, &mem).map_err(|reason| ActivateError::InvalidQueue { device, index, reason })
            })
            .collect::<Result<_, _>>()?;
        self.active = Some(Active { mem, interrupt, queues });
        self.needs_reset = false;
        Ok(())
    }

    /// The active state, if the device is active and not waiting for a
    /// reset (a device in NEEDS_RESET processes nothing).
    pub fn active_mut(&mut self) -> Option<&mut Active> {
        if self.needs_reset { None } else { self.active.as_mut() }
    }

    /// The active state, if any, even in NEEDS_RESET.
    pub fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// See [`VirtioDevice::queue_indices`]: the indices of the active
    /// queues (also in NEEDS_RESET), none while inactive.
    pub fn queue_indices(&self) -> Vec<QueueIndices> {
        self.active.as_ref().map_or_else(Vec::new, |active| {
            active.queues.iter().map(DeviceQueue::indices).collect()
        })
    }

    /// True while active.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Enters NEEDS_RESET because of `reason`, and tells the driver with a
    /// configuration interrupt. Rate-limited by nature: a device in
    /// NEEDS_RESET processes nothing until reset, so this logs once.
    pub fn set_needs_reset(&mut self, reason: &dyn std::fmt::Display) {
        if self.needs_reset {
            return;
        }
        log::warn!("{}: entering NEEDS_RESET: {reason}", self.name);
        self.needs_reset = true;
        if let Some(observer) = &self.needs_reset_observer {
            observer(&reason.to_string());
        }
        self.signal_config();
    }

    /// See [`VirtioDevice::needs_reset`].
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// See [`VirtioDevice::observe_needs_reset`].
    pub fn observe_needs_reset(&mut self, observer: NeedsResetObserver) {
        self.needs_reset_observer = Some(observer);
    }

    /// Sends a configuration-change interrupt, if active.
    pub fn signal_config(&self) {
        if let Some(active) = &self.active
            && let Err(e) = active.interrupt.trigger(InterruptKind::Config)
        {
            log::warn!("{}: config interrupt failed: {e}", self.name);
        }
    }

    /// Device reset: inactive, no features, no NEEDS_RESET.
    pub fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.needs_reset = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::EventFdInterrupt;
    use memvisor_guest::DriverQueue;
    use memvisor_memory::{Backing, RamBlock};
    use vm_memory::GuestAddress;

    #[test]
    fn queue_indices_are_the_active_queues() {
        let block = Arc::new(RamBlock::new("ram", 1 << 20, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder().ram(0, block).unwrap().build().unwrap();
        let a = DriverQueue::new(&map, GuestAddress(0), 8, 4096).unwrap();
        let b = DriverQueue::new(&map, GuestAddress(0x10000), 4, 4096).unwrap();
        let mut common = VirtioCommon::new("test", 0, vec![8, 4]);
        assert!(common.queue_indices().is_empty(), "none while inactive");
        common.ack_features(VIRTIO_F_VERSION_1);
        // A restored device: queues handed over at the source's indices.
        let (mut qa, mut qb) = (a.device_queue(), b.device_queue());
        let at = [
            QueueIndices {
                next_avail: 7,
                next_used: 5,
                event_idx: true,
            },
            QueueIndices {
                next_avail: 0xffff,
                next_used: 0xfffe,
                event_idx: false,
            },
        ];
        at[0].apply(&mut qa);
        at[1].apply(&mut qb);
        let irq = Arc::new(EventFdInterrupt::new(2).unwrap());
        common.activate(map, irq.clone(), vec![qa, qb]).unwrap();
        assert_eq!(common.queue_indices(), at, "activation keeps them");
        assert_eq!(irq.take(InterruptKind::Config), 0);
        assert_eq!(irq.take(InterruptKind::Queue(0)), 0);
        // Still reported in NEEDS_RESET, gone after a reset.
        common.set_needs_reset(&"test");
        assert_eq!(common.queue_indices(), at);
        common.reset();
        assert!(common.queue_indices().is_empty());
    }
}
