//! The transport's side of the device: [`VirtioIommu`] — features, the
//! configuration space, activation, the request queue and reset.
//!
//! The rest of the device, by concern:
//!
//! * `effects.rs` — ATTACH, DETACH, MAP, UNMAP and PROBE applied to the
//!   device model (endpoints, domains, mappings);
//! * `map_target.rs` — where a MAP (or a replayed or restored mapping)
//!   onto anything but populated RAM is refused: [`MapRefusal`];
//! * `notify.rs` — which notifiers are told of a mapping, in which order,
//!   how a refusal is rolled back, registration: [`NotifierError`];
//! * `domain.rs` — domains, their endpoints and their cached notifier
//!   targets;
//! * `fault.rs` — translation ([`Access`], [`Translation`]), [`Fault`]s
//!   and their reports on the event queue;
//! * `handle.rs` — [`IommuHandle`], the VMM's and emulated devices' side.
//!
//! # Locking
//!
//! All state lives behind one mutex shared by the [`VirtioIommu`] (what
//! the transport drives) and every [`IommuHandle`] (what the VMM, the DMA
//! layer and emulated devices use). The lock order is *IOMMU device →
//! discard manager (read) → notifier's own locks*; see the
//! `memvisor-iommu` contract.

use std::fmt;
use std::sync::Arc;

use memvisor_iommu::UnmapCause;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::device::Active;
use memvisor_virtio::queue::drain_queue;
use memvisor_virtio::{ActivateError, VirtioCommon, VirtioDevice, VirtioInterrupt};
use virtio_queue::Queue;

use crate::effects::DeviceModel;
use crate::handle::Shared;
use crate::options::{IommuOptions, OptionsError};
use crate::request;
use crate::wire::{
    self, CONFIG_BYPASS_OFFSET, ConfigSpace, EVENT_QUEUE, F_BYPASS_CONFIG, F_DOMAIN_RANGE, F_INPUT_RANGE, F_MAP_UNMAP,
    F_MMIO, F_PROBE, REQUEST_QUEUE, TAIL_SIZE,
};

// What this module defined before the device was split by concern.
pub use crate::fault::{Access, Fault, FaultKind, Translation};
pub use crate::handle::IommuHandle;
pub use crate::map_target::MapRefusal;
pub use crate::notify::NotifierError;

/// Features the device offers (besides `VIRTIO_F_VERSION_1`).
pub const AVAIL_FEATURES: u64 = F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_BYPASS_CONFIG | F_MMIO | F_PROBE;

/// Maximum sizes of the request and event queues.
pub const QUEUE_SIZES: [u16; 2] = [256, 64];

/// The device's name in logs.
pub(crate) const NAME: &str = "virtio-iommu";

impl Shared {
    /// Applies every request the driver made available, answering each.
    fn process_requests(&mut self) {
        let Shared { common, model } = self;
        let acked = common.acked_features();
        let Some(Active { mem, interrupt, queues }) = common.active_mut() else {
            return;
        };
        let Some(queue) = queues.get_mut(usize::from(REQUEST_QUEUE)) else {
            return;
        };
        let result = drain_queue(
            queue,
            REQUEST_QUEUE,
            mem,
            interrupt.as_ref(),
            request::MAX_REQUEST,
            TAIL_SIZE,
            |chain| model.handle(chain, acked),
        );
        if let Err(e) = result {
            common.set_needs_reset(&e);
        }
    }
}

impl DeviceModel {
    /// The configuration space the driver reads.
    fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            page_size_mask: self.options.page_size_mask,
            input_start: self.options.input_start,
            input_end: self.options.input_end,
            domain_start: self.options.domain_start,
            domain_end: self.options.domain_end,
            probe_size: self.options.probe_size,
            bypass: self.bypass,
        }
    }
}

/// The virtio-iommu device, as a transport drives it.
pub struct VirtioIommu {
    handle: IommuHandle,
}

impl fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("VirtioIommu").field(&self.handle).finish()
    }
}

impl VirtioIommu {
    /// A device with `options`; `mem`, if given now, lets translation and
    /// state loading work before activation.
    pub fn new(options: IommuOptions, mem: Option<GuestMemoryMap>) -> Result<Self, OptionsError> {
        options.validate()?;
        let shared = Shared {
            common: VirtioCommon::new(NAME, AVAIL_FEATURES, QUEUE_SIZES.to_vec()),
            model: DeviceModel::new(options, mem),
        };
        Ok(Self {
            handle: IommuHandle::new(shared),
        })
    }

    /// A shared handle for the VMM and emulated devices.
    pub fn handle(&self) -> IommuHandle {
        self.handle.clone()
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        wire::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.handle.lock().common.avail_features()
    }

    fn acked_features(&self) -> u64 {
        self.handle.lock().common.acked_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.handle.lock().common.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.handle.lock().model.config_space().to_bytes();
        memvisor_virtio::config::read_config(&bytes, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut shared = self.handle.lock();
        if offset == CONFIG_BYPASS_OFFSET && (1..=4).contains(&data.len()) && shared.common.has_feature(F_BYPASS_CONFIG)
        {
            // The driver writes 0 or 1; bits 1-7 (and `reserved`, for a
            // wider write) are ignored.
            shared.model.set_bypass(data[0] & 1 != 0);
            return;
        }
        log::warn!(
            "{NAME}: ignoring a {}-byte write to config offset {offset:#x} (only `bypass` is writable, with BYPASS_CONFIG)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let mut shared = self.handle.lock();
        shared.common.activate(mem.clone(), interrupt, queues)?;
        shared.model.mem = Some(mem);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match index {
            REQUEST_QUEUE => self.handle.lock().process_requests(),
            // New event buffers: faults are reported as they happen, never queued.
            EVENT_QUEUE => {}
            other => log::warn!("{NAME}: notify of nonexistent queue {other}"),
        }
    }

    fn queue_indices(&self) -> Vec<memvisor_virtio::QueueIndices> {
        self.handle.lock().common.queue_indices()
    }

    fn reset(&mut self) {
        let mut shared = self.handle.lock();
        // "When the device is reset, endpoints are not attached to any
        // domain"; `bypass` keeps its value.
        shared.model.detach_all(UnmapCause::Reset);
        shared.common.reset();
    }

    fn needs_reset(&self) -> bool {
        self.handle.lock().common.needs_reset()
    }

    fn observe_needs_reset(&mut self, observer: memvisor_virtio::NeedsResetObserver) {
        self.handle.lock().common.observe_needs_reset(observer);
    }
}
