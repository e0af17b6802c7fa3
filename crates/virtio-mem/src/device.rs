//! The virtio-mem device: applies the guest's requests to its region.
//!
//! [`VirtioMem`] is what a transport sees ([`VirtioDevice`]); it holds an
//! `Arc` of the [`VirtioMemRegion`], where the requests take effect
//! ([`VirtioMemRegion::apply`]), so that the DMA layer and management
//! can use the region from other threads while the device runs.
//!
//! # Effects, in order
//!
//! * PLUG: listeners are told (`notify_populate`; a refusal rolls back the
//!   ones already told and discards the memory again), the blocks are
//!   preallocated if configured, then marked plugged.
//! * UNPLUG: every listener's `may_discard` is asked (a veto changes
//!   nothing), listeners are told (`notify_discard`), the memory is
//!   discarded, then the blocks are marked unplugged.
//!
//! Both run under the block-state write lock, through
//! [`DiscardWriter`](memvisor_memory::discard::DiscardWriter) — which also
//! implements the rollbacks — after the request was validated under the
//! same lock.

use std::sync::Arc;

use memvisor_memory::discard::RamDiscardManager;
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::config::read_config;
use memvisor_virtio::queue::{self, drain_queue};
use memvisor_virtio::{ActivateError, VirtioCommon, VirtioDevice, VirtioInterrupt};
use virtio_queue::Queue;

use crate::region::{VirtioMemError, VirtioMemRegion, warn_limited};
use crate::request::{BlockRange, BlockState, Request, Response};
use crate::wire::{DEVICE_ID, F_ACPI_PXM, F_UNPLUGGED_INACCESSIBLE, QUEUE_SIZE, REQUEST_SIZE, RESPONSE_SIZE};

/// The name used in errors and logs.
const NAME: &str = "virtio-mem";

impl VirtioMemRegion {
    /// Applies one request and returns the answer, as the device does for
    /// every request popped from its queue.
    ///
    /// Checks, in the order of QEMU and the recorded traces:
    /// * PLUG: the range (aligned, non-zero, inside the usable region, no
    ///   overflow) → ERROR; plugged + request above `requested_size` →
    ///   NACK; any block already plugged → ERROR; a migration running →
    ///   BUSY; a listener refusing or preallocation failing → BUSY.
    /// * UNPLUG: the range → ERROR; any block already unplugged → ERROR;
    ///   a migration running or a listener veto → BUSY.
    /// * UNPLUG_ALL: all or nothing; with memory plugged, a migration
    ///   running or any veto → BUSY. On success the usable region is
    ///   recomputed (it may shrink).
    /// * STATE: the range → ERROR; else PLUGGED, UNPLUGGED or MIXED.
    pub fn apply(&self, request: Request) -> Response {
        match request {
            Request::Plug(blocks) => self.plug(blocks),
            Request::Unplug(blocks) => self.unplug(blocks),
            Request::UnplugAll => self.unplug_all(),
            Request::State(blocks) => self.state(blocks),
        }
    }

    fn plug(&self, blocks: BlockRange) -> Response {
        let mut writer = self.manager.write();
        let sizes = *self.lock_sizes();
        let Some(range) = blocks.resolve(self.block_size, self.addr, sizes.usable) else {
            log::debug!("virtio-mem: PLUG of {blocks}: invalid range");
            return Response::Error;
        };
        if writer.populated_bytes().saturating_add(range.len()) > sizes.requested {
            return Response::Nack;
        }
        if !writer.is_discarded(range) {
            log::debug!("virtio-mem: PLUG of {blocks}: some blocks are already plugged");
            return Response::Error;
        }
        if self.migration_running() {
            return Response::Busy;
        }
        let prepare = || {
            if self.prealloc {
                self.populate_backing(range)
            } else {
                Ok(())
            }
        };
        match writer.plug(range, prepare, |r| self.discard_backing(r)) {
            Ok(()) => {
                let plugged = writer.populated_bytes();
                drop(writer);
                self.emit(plugged);
                Response::Ack(None)
            }
            Err(e) => {
                warn_limited(&self.warnings, format_args!("PLUG of {range} answered BUSY: {e}"));
                Response::Busy
            }
        }
    }

    fn unplug(&self, blocks: BlockRange) -> Response {
        let mut writer = self.manager.write();
        let usable = self.lock_sizes().usable;
        let Some(range) = blocks.resolve(self.block_size, self.addr, usable) else {
            log::debug!("virtio-mem: UNPLUG of {blocks}: invalid range");
            return Response::Error;
        };
        if !writer.is_populated(range) {
            log::debug!("virtio-mem: UNPLUG of {blocks}: some blocks are not plugged");
            return Response::Error;
        }
        if self.migration_running() {
            return Response::Busy;
        }
        match writer.unplug(range, false, |r| self.discard_backing(r)) {
            Ok(_) => {
                let plugged = writer.populated_bytes();
                drop(writer);
                self.emit(plugged);
                Response::Ack(None)
            }
            Err(veto) => {
                warn_limited(&self.warnings, format_args!("UNPLUG of {range} answered BUSY: {veto}"));
                Response::Busy
            }
        }
    }

    fn unplug_all(&self) -> Response {
        let mut writer = self.manager.write();
        if writer.populated_bytes() > 0 {
            if self.migration_running() {
                return Response::Busy;
            }
            if let Err(veto) = writer.unplug(self.manager.region(), false, |r| self.discard_backing(r)) {
                warn_limited(&self.warnings, format_args!("UNPLUG_ALL answered BUSY: {veto}"));
                return Response::Busy;
            }
        }
        self.finish_unplug_all(writer);
        Response::Ack(None)
    }

    fn state(&self, blocks: BlockRange) -> Response {
        let view = self.manager.populated();
        let usable = self.lock_sizes().usable;
        let Some(range) = blocks.resolve(self.block_size, self.addr, usable) else {
            log::debug!("virtio-mem: STATE of {blocks}: invalid range");
            return Response::Error;
        };
        let state = if view.is_populated(range) {
            BlockState::Plugged
        } else if view.is_discarded(range) {
            BlockState::Unplugged
        } else {
            BlockState::Mixed
        };
        Response::Ack(Some(state))
    }
}

/// The virtio-mem device (virtio device ID 24), with one request queue.
///
/// Features: `VIRTIO_F_VERSION_1`, `VIRTIO_MEM_F_ACPI_PXM` when the region
/// has a node, `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` unless the region was
/// built without it. A driver that does not accept
/// `UNPLUGGED_INACCESSIBLE` when it is offered cannot activate the device.
///
/// A malformed request (a request shorter than 24 bytes, a response
/// buffer shorter than 10, a readable descriptor after a writable one, an
/// unknown type, a broken ring) puts the device into NEEDS_RESET: the
/// driver gets a configuration interrupt and nothing more is processed
/// until a device reset.
///
/// One device per region: the device attaches its interrupt to the region
/// for configuration changes made through the region.
pub struct VirtioMem {
    common: VirtioCommon,
    region: Arc<VirtioMemRegion>,
}

impl std::fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMem")
            .field("common", &self.common)
            .field("region", &self.region)
            .finish()
    }
}

impl VirtioMem {
    /// A device for `region`, not yet activated.
    pub fn new(region: Arc<VirtioMemRegion>) -> Self {
        let mut features = 0;
        if region.node_id().is_some() {
            features |= F_ACPI_PXM;
        }
        if region.unplugged_inaccessible() {
            features |= F_UNPLUGGED_INACCESSIBLE;
        }
        Self {
            common: VirtioCommon::new(NAME, features, vec![QUEUE_SIZE]),
            region,
        }
    }

    /// The region the device manages.
    pub fn region(&self) -> &Arc<VirtioMemRegion> {
        &self.region
    }

    /// True while activated (even in NEEDS_RESET).
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    /// A system (machine) reset: the device is reset like a driver reset
    /// would, then the region unplugs everything
    /// ([`VirtioMemRegion::system_reset`], whose error this returns; the
    /// device reset happens either way).
    pub fn system_reset(&mut self) -> Result<(), VirtioMemError> {
        self.reset();
        self.region.system_reset()
    }
}

impl Drop for VirtioMem {
    fn drop(&mut self) {
        self.region.set_interrupt(None);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        DEVICE_ID
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
        read_config(&self.region.config().to_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let inaccessible = F_UNPLUGGED_INACCESSIBLE;
        if self.common.avail_features() & inaccessible != 0 && !self.common.has_feature(inaccessible) {
            return Err(ActivateError::MissingFeature {
                device: NAME,
                feature: "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
                bit: inaccessible.trailing_zeros(),
            });
        }
        self.common.activate(mem, interrupt.clone(), queues)?;
        self.region.set_interrupt(Some(interrupt));
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if index != 0 {
            log::warn!("{NAME}: notify of queue {index}, which does not exist; ignored");
            return;
        }
        let region = &self.region;
        let Some(active) = self.common.active_mut() else {
            return;
        };
        let Some(queue) = active.queues.first_mut() else {
            return;
        };
        let result = drain_queue(
            queue,
            0,
            &active.mem,
            active.interrupt.as_ref(),
            REQUEST_SIZE,
            RESPONSE_SIZE,
            |chain| {
                let request = Request::parse(chain.request(), chain.writable_len())?;
                Ok(queue::Response::from_slice(&region.apply(request).to_bytes()))
            },
        );
        if let Err(malformed) = result {
            self.common.set_needs_reset(&malformed);
        }
    }

    fn queue_indices(&self) -> Vec<memvisor_virtio::QueueIndices> {
        self.common.queue_indices()
    }

    fn reset(&mut self) {
        // A device reset changes no block state (virtio specification,
        // "Device Initialization"): only the transport-facing state goes.
        self.common.reset();
        self.region.set_interrupt(None);
    }

    fn needs_reset(&self) -> bool {
        self.common.needs_reset()
    }

    fn observe_needs_reset(&mut self, observer: memvisor_virtio::NeedsResetObserver) {
        self.common.observe_needs_reset(observer);
    }
}
