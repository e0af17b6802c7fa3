//! Snapshot and migration of the transport: [`VirtioPciState`], taken by
//! [`VirtioPciDevice::state`] on the source and restored by
//! [`VirtioPciDevice::restore`] into a destination transport built with
//! the same device, options and slot, so that the guest's driver goes on
//! where it stopped without initialising the device again.
//!
//! # What travels
//!
//! Everything the driver can observe: the configuration space (command
//! register, BAR addresses, the PCI_CFG window, MSI-X control), the
//! common configuration (feature selects, accepted features, device
//! status, queue select and every queue's registers and vector), the
//! configuration vector and generation, the ISR, the MSI-X table and
//! pending bits — and, for an active device, each queue's
//! [`QueueIndices`], the only queue state that lives in the device (the
//! rings are guest memory, restored before).
//!
//! # Restore order
//!
//! Guest memory, and the state of the device's own model (the virtio-mem
//! block bitmap, the virtio-iommu domains), are restored before the
//! transport: [`restore`](VirtioPciDevice::restore) activates the device
//! with queues at the restored indices, which must find the rings in
//! memory and, behind an IOMMU, their mappings.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use memvisor_virtio::device::VIRTIO_F_VERSION_1;
use memvisor_virtio::{QueueIndices, VirtioInterrupt};
use serde::{Deserialize, Serialize};

use super::VirtioPciDevice;
use super::common::VIRTIO_RING_F_EVENT_IDX;
use super::interrupt::{ISR_CONFIG, ISR_QUEUE, PciInterrupt, VIRTIO_MSI_NO_VECTOR};
use crate::config::ConfigSpaceState;
pub use crate::error::TransportStateError;
use crate::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MsixState};

/// One queue's saved state: its registers, its vector and where the device
/// is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The queue's maximum size (checked against the destination's).
    pub max_size: u16,
    /// `queue_size`: a power of two up to `max_size`.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// `queue_desc`: the descriptor area.
    pub desc: u64,
    /// `queue_driver`: the driver (avail) area.
    pub driver: u64,
    /// `queue_device`: the device (used) area.
    pub device: u64,
    /// `queue_msix_vector`: a table index or `VIRTIO_MSI_NO_VECTOR`.
    pub msix_vector: u16,
    /// The next avail-ring entry the device takes (0 unless the device
    /// was active).
    pub next_avail: u16,
    /// The next used-ring entry the device fills (0 unless active).
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in force (false unless active).
    pub event_idx: bool,
}

/// The saved state of a [`VirtioPciDevice`]; see the
/// [module documentation](self). Plain data, serialised as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// The virtio device type (checked).
    pub device_type: u32,
    /// The number of queues (checked; `queues` has one entry per queue).
    pub num_queues: u16,
    /// The MSI-X table size (checked).
    pub msix_vectors: u16,
    /// The configuration space, BAR addresses included.
    pub config: ConfigSpaceState,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// `driver_feature`: the features the driver accepted (negotiated if
    /// `features_ok`).
    pub driver_features: u64,
    /// `device_status` as the driver wrote it (FEATURES_OK only if
    /// negotiation succeeded), without the bits the device and the
    /// transport add on reads (DEVICE_NEEDS_RESET).
    pub status: u8,
    /// Feature negotiation succeeded: the device accepted
    /// `driver_features` (less the transport's own bits).
    pub features_ok: bool,
    /// The driver set DRIVER_OK.
    pub driver_ok: bool,
    /// Activation failed on DRIVER_OK: the status reads DEVICE_NEEDS_RESET.
    pub failed: bool,
    /// The device was active (activated at DRIVER_OK, not reset since).
    pub device_active: bool,
    /// The active device was in NEEDS_RESET (a broken queue).
    pub device_needs_reset: bool,
    /// `queue_select`.
    pub queue_select: u16,
    /// Every queue, in order.
    pub queues: Vec<QueueState>,
    /// `config_msix_vector`: a table index or `VIRTIO_MSI_NO_VECTOR`.
    pub config_msix_vector: u16,
    /// `config_generation`.
    pub config_generation: u8,
    /// The ISR status, as the next read of it would return it.
    pub isr: u8,
    /// The MSI-X table, pending bits, enable and function mask.
    pub msix: MsixState,
}

impl VirtioPciState {
    /// Version of this layout, for a migration stream.
    pub const VERSION: u16 = 1;
}

/// Shorthand for an [`TransportStateError::Invalid`].
fn invalid(field: impl Into<String>, value: u64, reason: impl Into<String>) -> TransportStateError {
    TransportStateError::Invalid {
        field: field.into(),
        value,
        reason: reason.into(),
    }
}

/// Shorthand for a [`TransportStateError::Mismatch`].
fn mismatch(field: impl Into<String>, saved: u64, local: u64) -> Result<(), TransportStateError> {
    if saved == local {
        return Ok(());
    }
    Err(TransportStateError::Mismatch {
        field: field.into(),
        saved,
        local,
    })
}

impl VirtioPciDevice {
    /// The transport's state, to restore on a destination with
    /// [`restore`](Self::restore). Take it with the vCPUs stopped and the
    /// device quiet (no queue being processed), so that the queue indices
    /// agree with the rings in the guest memory saved alongside. Reading
    /// it changes nothing (the ISR is not cleared).
    pub fn state(&self) -> VirtioPciState {
        let device_active = self.shared.active.load(Ordering::SeqCst);
        let (indices, device_needs_reset) = self
            .with_device(|d| (d.queue_indices(), d.needs_reset()))
            .unwrap_or_else(|| {
                log::error!("{}: device not reachable; its queue indices are not saved", self.name());
                (Vec::new(), false)
            });
        if device_active && indices.len() != self.common.queues.len() {
            log::error!(
                "{}: the active device reports indices of {} queues, not {}; the missing ones are saved as 0",
                self.name(),
                indices.len(),
                self.common.queues.len()
            );
        }
        let c = &self.common;
        let queues = c
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let at = if device_active {
                    indices.get(i).copied().unwrap_or_default()
                } else {
                    QueueIndices::default()
                };
                QueueState {
                    max_size: q.max_size,
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    msix_vector: self.shared.queue_vectors[i].load(Ordering::SeqCst),
                    next_avail: at.next_avail,
                    next_used: at.next_used,
                    event_idx: at.event_idx,
                }
            })
            .collect();
        VirtioPciState {
            device_type: self.device_type,
            num_queues: self.num_queues(),
            msix_vectors: self.msix_vectors,
            config: self.config.state(),
            device_feature_select: c.device_feature_select,
            driver_feature_select: c.driver_feature_select,
            driver_features: c.driver_features,
            status: c.status,
            features_ok: c.features_ok,
            driver_ok: c.driver_ok,
            failed: c.failed,
            device_active,
            device_needs_reset: device_active && device_needs_reset,
            queue_select: c.queue_select,
            queues,
            config_msix_vector: self.shared.config_vector.load(Ordering::SeqCst),
            config_generation: self.shared.config_generation.load(Ordering::SeqCst),
            isr: self.shared.isr.load(Ordering::SeqCst),
            msix: self.shared.msix().state(),
        }
    }

    /// Restores `state`, taken by [`state`](Self::state) on a source
    /// transport with the same device, options and slot, into this freshly
    /// built one, after guest memory and the device's own model state were
    /// restored:
    ///
    /// 1. checks the whole state (nothing changes if a check fails);
    /// 2. after FEATURES_OK, gives the device the accepted features (less
    ///    the transport's own, as negotiation did);
    /// 3. sets the configuration space (BARs included), the MSI-X state —
    ///    every live vector is routed through the [`MsiSink`](crate::MsiSink)
    ///    as a guest write to its table entry would — the common
    ///    configuration registers, vectors, generation and ISR;
    /// 4. moves the queue notification eventfds to the restored BAR 0 (if
    ///    it decodes);
    /// 5. if the device was active, activates it with queues built from the
    ///    registers at the saved [`QueueIndices`]. Activation processes no
    ///    queue and interrupts no one: the VMM kicks every queue once when
    ///    the guest resumes, for requests made available meanwhile.
    ///
    /// A device that had failed activation, or was in NEEDS_RESET, is not
    /// activated: its status reads DEVICE_NEEDS_RESET as on the source, it
    /// processes nothing, and the driver's reset (status 0) brings it back.
    ///
    /// The BARs change behind the root bus's back: call
    /// [`PciRoot::refresh_bars`](crate::PciRoot::refresh_bars) afterwards
    /// so that MMIO dispatch (and the BAR listener) follow.
    ///
    /// # Errors
    ///
    /// A state of another device type, queue count, MSI-X table size,
    /// queue maximum size, configuration space or BAR layout, or features
    /// this transport does not offer ([`TransportStateError::Mismatch`]);
    /// an invalid value or combination — a queue size that is 0, not a
    /// power of two or above the maximum, a vector outside the table, a
    /// pending bit past the table, ISR bits that do not exist, flags that
    /// contradict each other, more buffers in flight than a queue holds
    /// ([`TransportStateError::Invalid`]); a transport already used by a
    /// driver ([`TransportStateError::InUse`]). These change nothing. The
    /// device refusing the features ([`TransportStateError::Features`])
    /// changes nothing in the transport. Activation failing
    /// ([`TransportStateError::Activation`]) comes last, with everything
    /// else restored and the status reading DEVICE_NEEDS_RESET.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), TransportStateError> {
        self.check_state(state)?;

        if state.features_ok {
            let wanted = state.driver_features & !self.transport_features;
            let kept = self
                .with_device(|d| {
                    d.ack_features(wanted);
                    d.acked_features()
                })
                .ok_or(TransportStateError::DeviceUnavailable)?;
            if kept != wanted {
                return Err(TransportStateError::Features { wanted, kept });
            }
        }

        self.config.restore(&state.config)?;
        self.shared.msix().restore(&state.msix)?;
        let c = &mut self.common;
        c.device_feature_select = state.device_feature_select;
        c.driver_feature_select = state.driver_feature_select;
        c.driver_features = state.driver_features;
        c.status = state.status;
        c.features_ok = state.features_ok;
        c.driver_ok = state.driver_ok;
        c.failed = state.failed || state.device_needs_reset;
        c.queue_select = state.queue_select;
        for ((regs, saved), vector) in c
            .queues
            .iter_mut()
            .zip(&state.queues)
            .zip(self.shared.queue_vectors.iter())
        {
            regs.size = saved.size;
            regs.enabled = saved.enabled;
            regs.desc = saved.desc;
            regs.driver = saved.driver;
            regs.device = saved.device;
            vector.store(saved.msix_vector, Ordering::SeqCst);
        }
        self.shared
            .config_vector
            .store(state.config_msix_vector, Ordering::SeqCst);
        self.shared
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        self.shared.isr.store(state.isr, Ordering::SeqCst);
        self.sync_ioevents();

        if state.device_active && !state.device_needs_reset {
            let indices: Vec<QueueIndices> = state
                .queues
                .iter()
                .map(|q| QueueIndices {
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx: q.event_idx,
                })
                .collect();
            let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PciInterrupt::new(self.shared.clone()));
            if let Err(reason) = self.activate_device(interrupt, Some(&indices)) {
                log::warn!("{}: restored device not activated, needs reset: {reason}", self.name());
                return Err(TransportStateError::Activation(reason));
            }
        }
        Ok(())
    }

    /// Every check of [`restore`](Self::restore) that comes before a change.
    fn check_state(&self, state: &VirtioPciState) -> Result<(), TransportStateError> {
        mismatch("device type", state.device_type.into(), self.device_type.into())?;
        mismatch("number of queues", state.num_queues.into(), self.num_queues().into())?;
        mismatch(
            "number of saved queues",
            state.queues.len() as u64,
            self.common.queues.len() as u64,
        )?;
        mismatch(
            "MSI-X vector count",
            state.msix_vectors.into(),
            self.msix_vectors.into(),
        )?;

        let in_use = self.common.status != 0 || self.common.driver_ok || self.shared.active.load(Ordering::SeqCst);
        let device_active = self
            .with_device(|d| !d.queue_indices().is_empty())
            .ok_or(TransportStateError::DeviceUnavailable)?;
        if in_use || device_active {
            return Err(TransportStateError::InUse {
                status: self.common.status,
            });
        }

        let vector = |field: String, vector: u16| {
            if vector != VIRTIO_MSI_NO_VECTOR && vector >= self.msix_vectors {
                return Err(invalid(
                    field,
                    vector.into(),
                    format!("outside the MSI-X table of {} vectors", self.msix_vectors),
                ));
            }
            Ok(())
        };
        vector("config MSI-X vector".into(), state.config_msix_vector)?;
        if state.isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(invalid("ISR", state.isr.into(), "bits other than queue and config"));
        }

        // The flags, as the transport's transitions can leave them.
        let flags = u64::from(state.features_ok)
            | u64::from(state.driver_ok) << 1
            | u64::from(state.failed) << 2
            | u64::from(state.device_active) << 3
            | u64::from(state.device_needs_reset) << 4;
        let contradiction = if state.device_active && !(state.driver_ok && state.features_ok && !state.failed) {
            Some("an active device without DRIVER_OK and FEATURES_OK, or with a failed activation")
        } else if state.driver_ok && !state.device_active && !state.failed {
            Some("DRIVER_OK with the device neither active nor failed")
        } else if state.failed && !state.driver_ok {
            Some("a failed activation without DRIVER_OK")
        } else if state.device_needs_reset && !state.device_active {
            Some("NEEDS_RESET of a device that is not active")
        } else {
            None
        };
        if let Some(reason) = contradiction {
            return Err(invalid(
                "status flags (features_ok, driver_ok, failed, device_active, device_needs_reset as bits 0-4)",
                flags,
                reason,
            ));
        }

        if state.features_ok {
            let offered = self.offered_features();
            if state.driver_features & !offered != 0 {
                return Err(TransportStateError::Mismatch {
                    field: "accepted features (offered features here)".into(),
                    saved: state.driver_features,
                    local: offered,
                });
            }
            if state.driver_features & VIRTIO_F_VERSION_1 == 0 {
                return Err(invalid(
                    "accepted features",
                    state.driver_features,
                    "FEATURES_OK without VIRTIO_F_VERSION_1",
                ));
            }
        }
        let event_idx = state.device_active && state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;

        for (i, (saved, regs)) in state.queues.iter().zip(&self.common.queues).enumerate() {
            mismatch(
                format!("queue {i} maximum size"),
                saved.max_size.into(),
                regs.max_size.into(),
            )?;
            if !saved.size.is_power_of_two() {
                return Err(invalid(
                    format!("queue {i} size"),
                    saved.size.into(),
                    "not a power of two",
                ));
            }
            if saved.size > regs.max_size {
                return Err(invalid(
                    format!("queue {i} size"),
                    saved.size.into(),
                    format!("above the maximum {}", regs.max_size),
                ));
            }
            vector(format!("queue {i} MSI-X vector"), saved.msix_vector)?;
            if state.device_active {
                let in_flight = saved.next_avail.wrapping_sub(saved.next_used);
                if in_flight > saved.size {
                    return Err(invalid(
                        format!("queue {i} next_avail - next_used"),
                        in_flight.into(),
                        format!(
                            "more buffers in flight (next_avail {}, next_used {}) than the queue size {}",
                            saved.next_avail, saved.next_used, saved.size
                        ),
                    ));
                }
            } else if (saved.next_avail, saved.next_used) != (0, 0) {
                return Err(invalid(
                    format!("queue {i} next_avail"),
                    saved.next_avail.into(),
                    format!(
                        "indices ({}, {}) of a device that is not active",
                        saved.next_avail, saved.next_used
                    ),
                ));
            }
            if saved.event_idx != event_idx {
                return Err(invalid(
                    format!("queue {i} event_idx"),
                    saved.event_idx.into(),
                    "differs from VIRTIO_RING_F_EVENT_IDX in the accepted features of an active device",
                ));
            }
        }

        self.config.check_state(&state.config)?;
        self.shared.msix().check_state(&state.msix)?;
        // The MSI-X control bits live in both; they agree on a source.
        let at = usize::from(self.msix_cap) + 2;
        let control = state
            .config
            .regs
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let from_msix = if state.msix.enabled { MSIX_CONTROL_ENABLE } else { 0 }
            | if state.msix.function_masked {
                MSIX_CONTROL_FUNCTION_MASK
            } else {
                0
            };
        let from_config = control & (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        if from_config != from_msix {
            return Err(invalid(
                "MSI-X message control in the configuration space",
                from_config.into(),
                format!("differs from the MSI-X state's enable and function mask ({from_msix:#x})"),
            ));
        }
        Ok(())
    }
}
