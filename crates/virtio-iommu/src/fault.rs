//! Translation and faults: an endpoint's access at an IOVA becomes a
//! guest-physical address ([`Translation`]) or a [`Fault`], which is
//! reported to the driver on the event queue — or, when the driver left no
//! buffer there, counted and logged through a rate limiter.
//!
//! Translation checks RAM targets like a MAP does (`map_target.rs`): an
//! address whose block was unplugged after the MAP faults
//! ([`FaultKind::NotPopulated`]), and a translation never reaches past the
//! populated run it starts in.

use std::fmt;
use std::time::{Duration, Instant};

use memvisor_memory::GuestRange;
use memvisor_virtio::InterruptKind;
use memvisor_virtio::device::Active;
use memvisor_virtio::queue::{DeviceRing, Malformed, RequestChain, write_response};

use crate::device::NAME;
use crate::effects::DeviceModel;
use crate::handle::Shared;
use crate::wire::{
    EVENT_QUEUE, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING, FAULT_SIZE, FaultEvent,
};

/// The kind of access an endpoint makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The endpoint reads memory (DMA to the device).
    Read,
    /// The endpoint writes memory (DMA from the device).
    Write,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Bytes from `gpa` that translate contiguously with the same result
    /// right now: up to the end of the mapping and, for RAM, of the
    /// populated run and region.
    pub len: u64,
    /// The target is MMIO (an MMIO-flagged mapping), not RAM.
    pub mmio: bool,
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The endpoint is not part of the topology (not reported to the driver).
    UnknownEndpoint,
    /// The endpoint is attached to no domain and not in bypass mode.
    NotAttached,
    /// No mapping covers the address.
    Unmapped,
    /// A mapping covers it, without the permission the access needs.
    Permission,
    /// The target is not RAM that is populated now (unplugged after the map).
    NotPopulated,
}

/// A translation fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {endpoint}: {access:?} at IOVA {iova:#x} faulted: {kind:?}")]
pub struct Fault {
    /// The endpoint.
    pub endpoint: u32,
    /// The address it accessed.
    pub iova: u64,
    /// The access.
    pub access: Access,
    /// Why it faulted.
    pub kind: FaultKind,
}

impl Fault {
    /// The `virtio_iommu_fault` report for the driver: `R_DOMAIN` for an
    /// unattached endpoint, `R_MAPPING` otherwise (no mapping, wrong
    /// permission, or a target that is no longer populated RAM — the closest
    /// reason the specification has), always with the address.
    pub fn event(&self) -> FaultEvent {
        let reason = match self.kind {
            FaultKind::NotAttached => FAULT_R_DOMAIN,
            _ => FAULT_R_MAPPING,
        };
        let access = match self.access {
            Access::Read => FAULT_F_READ,
            Access::Write => FAULT_F_WRITE,
        };
        FaultEvent {
            reason,
            flags: access | FAULT_F_ADDRESS,
            endpoint: self.endpoint,
            address: self.iova,
        }
    }
}

/// Logs at most once per interval, counting what it suppressed.
#[derive(Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    fn warn(&mut self, message: fmt::Arguments<'_>) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Self::INTERVAL) {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last = Some(now);
        log::warn!("{NAME}: {message} ({suppressed} similar messages suppressed)");
    }
}

impl DeviceModel {
    /// Translates an access of `endpoint` at `iova` (see
    /// [`IommuHandle::translate`](crate::IommuHandle::translate)).
    pub(crate) fn translate(&self, endpoint: u32, iova: u64, access: Access) -> Result<Translation, Fault> {
        let fault = |kind| Fault {
            endpoint,
            iova,
            access,
            kind,
        };
        let ep = self
            .endpoints
            .get(&endpoint)
            .ok_or_else(|| fault(FaultKind::UnknownEndpoint))?;
        let domain = ep.domain.and_then(|d| self.domains.get(&d));
        let (gpa, limit) = match domain {
            None if self.bypass => (iova, u64::MAX),
            None => return Err(fault(FaultKind::NotAttached)),
            Some(d) if d.bypass => (iova, u64::MAX),
            Some(d) => {
                let m = d.mappings.find(iova).ok_or_else(|| fault(FaultKind::Unmapped))?;
                let allowed = match access {
                    Access::Read => m.flags.read(),
                    Access::Write => m.flags.write(),
                };
                if !allowed {
                    return Err(fault(FaultKind::Permission));
                }
                let len = m.virt_end - iova + 1;
                if m.flags.mmio() {
                    return Ok(Translation {
                        gpa: m.translate(iova),
                        len,
                        mmio: true,
                    });
                }
                (m.translate(iova), len)
            }
        };
        let not_populated = || fault(FaultKind::NotPopulated);
        let mem = self.mem.as_ref().ok_or_else(not_populated)?;
        let region = mem.region_at(gpa).ok_or_else(not_populated)?;
        let len = limit.min(region.range().end() - gpa);
        let len = match region.manager() {
            None => len,
            Some(manager) => {
                let window = GuestRange::new(gpa, len).ok_or_else(not_populated)?;
                let view = manager.populated();
                match view.runs(window, true).next() {
                    Some(run) if run.start() == gpa => run.len(),
                    _ => return Err(not_populated()),
                }
            }
        };
        Ok(Translation { gpa, len, mmio: false })
    }
}

impl Shared {
    /// Reports `fault` on the event queue; without a buffer there (or an
    /// active device) it is dropped, counted and logged, rate-limited. A
    /// malformed event buffer puts the device in NEEDS_RESET. Every fault
    /// is counted and sent to the fault subscribers.
    pub(crate) fn report_fault(&mut self, fault: &Fault) {
        self.model.faults += 1;
        if let Some(ep) = self.model.endpoints.get_mut(&fault.endpoint) {
            ep.faults += 1;
        }
        self.model.fault_subscribers.retain(|tx| tx.send(*fault).is_ok());
        let bytes = fault.event().to_bytes();
        let outcome = match self.common.active_mut() {
            Some(active) => push_event(active, &bytes),
            None => Ok(false),
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.model.dropped_faults += 1;
                let dropped = self.model.dropped_faults;
                self.model.fault_log.warn(format_args!(
                    "no event buffer for a fault report, dropped ({dropped} in total): {fault}"
                ));
            }
            Err(e) => {
                self.model.dropped_faults += 1;
                self.common.set_needs_reset(&e);
            }
        }
    }
}

/// Writes one event into the next buffer of the event queue. `Ok(false)`
/// if the driver made none available.
fn push_event(active: &mut Active, bytes: &[u8; FAULT_SIZE]) -> Result<bool, Malformed> {
    let Active { mem, interrupt, queues } = active;
    let Some(queue) = queues.get_mut(usize::from(EVENT_QUEUE)) else {
        return Ok(false);
    };
    let mut ring = DeviceRing::new(queue);
    let Some(head) = ring.pop()? else {
        return Ok(false);
    };
    let mut chain = RequestChain::new();
    ring.read_chain(mem, head, 0, &mut chain)?;
    if chain.readable_len() != 0 {
        return Err(Malformed::BadChain {
            head,
            reason: "event buffer is not a device-writable buffer",
        });
    }
    if chain.writable_len() < FAULT_SIZE {
        return Err(Malformed::ResponseTooShort {
            got: chain.writable_len(),
            need: FAULT_SIZE,
        });
    }
    // Never into discarded memory, which the write would populate again.
    let len = write_response(mem, &chain, bytes)?;
    ring.push_used(head, len)?;
    if ring.finish()
        && let Err(e) = interrupt.trigger(InterruptKind::Queue(EVENT_QUEUE))
    {
        log::warn!("{NAME}: event queue interrupt failed: {e}");
    }
    Ok(true)
}
