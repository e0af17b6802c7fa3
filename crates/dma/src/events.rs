//! What the DMA layer reports as it happens, and what it counts: guest
//! IOMMU mappings it refused to pin, unplugs it vetoed or let through under
//! a live mapping, and endpoints entering or leaving bypass.
//!
//! A machine has one [`DmaEvents`] hub shared by its devices; the VMM
//! [subscribes](DmaEvents::subscribe) and publishes the events on its
//! management API. Each device keeps [`DmaCounters`] of its own, which
//! survive re-attaching.
//!
//! ```
//! use memvisor_dma::events::{DmaEvent, DmaEvents};
//!
//! let hub = DmaEvents::default();
//! let rx = hub.subscribe();
//! hub.emit(DmaEvent::UnplugVetoed { device: "nvme0".into(), gpa: 0x1_0000_0000, size: 2 << 20 });
//! assert!(matches!(rx.try_recv(), Ok(DmaEvent::UnplugVetoed { .. })));
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};

use serde::Serialize;

/// One thing the DMA layer reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum DmaEvent {
    /// A guest IOMMU mapping was refused: nothing of it is pinned, and the
    /// guest's MAP fails with the IOMMU's status for `reason`.
    MapRefused {
        /// The assigned device.
        device: String,
        /// Its endpoint.
        endpoint: u32,
        /// The mapping's IOVA, guest-physical target and length.
        iova: u64,
        /// Guest-physical address it targets.
        phys: u64,
        /// Its length in bytes.
        size: u64,
        /// Why (not populated RAM, out of pin budget, the backend failed).
        reason: String,
    },
    /// An unplug of `[gpa, gpa + size)` was vetoed (virtio-mem answers
    /// BUSY) because a live IOMMU mapping of the device pins it.
    UnplugVetoed {
        /// The assigned device.
        device: String,
        /// First guest-physical address of the unplug.
        gpa: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// An unplug of memory a live IOMMU mapping pins was let through under
    /// the `warn` unplug guard: the host keeps that memory until the guest
    /// unmaps it.
    GuardWarning {
        /// The assigned device.
        device: String,
        /// First guest-physical address of the unplug.
        gpa: u64,
        /// Its length in bytes.
        size: u64,
        /// The IOVA of a mapping that pins it.
        iova: u64,
    },
    /// The endpoint's accesses started (`bypass` true: all populated RAM is
    /// mapped for the device) or stopped bypassing the IOMMU.
    Bypass {
        /// The assigned device.
        device: String,
        /// Its endpoint.
        endpoint: u32,
        /// Whether it bypasses now.
        bypass: bool,
    },
}

/// The machine's hub of DMA events: any number of subscribers, each a
/// channel; a subscriber that went away is dropped at the next event.
#[derive(Debug, Default)]
pub struct DmaEvents {
    subscribers: Mutex<Vec<Sender<DmaEvent>>>,
}

impl DmaEvents {
    /// A receiver of every event from now on. Dropping it unsubscribes.
    pub fn subscribe(&self) -> Receiver<DmaEvent> {
        let (tx, rx) = mpsc::channel();
        self.lock().push(tx);
        rx
    }

    /// Sends `event` to every subscriber.
    pub fn emit(&self, event: DmaEvent) {
        let mut subscribers = self.lock();
        if subscribers.is_empty() {
            return;
        }
        subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<DmaEvent>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One device's counters, kept across re-attaching.
#[derive(Debug, Default)]
pub struct DmaCounters {
    refused_maps: AtomicU64,
    vetoed_unplugs: AtomicU64,
    guard_warnings: AtomicU64,
}

/// A [`DmaCounters`] reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DmaCounts {
    /// Guest IOMMU mappings refused ([`DmaEvent::MapRefused`]).
    pub refused_maps: u64,
    /// Unplugs vetoed ([`DmaEvent::UnplugVetoed`]).
    pub vetoed_unplugs: u64,
    /// Unplugs let through under a live mapping ([`DmaEvent::GuardWarning`]).
    pub guard_warnings: u64,
}

impl DmaCounters {
    /// The counts now.
    pub fn get(&self) -> DmaCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DmaCounts {
            refused_maps: get(&self.refused_maps),
            vetoed_unplugs: get(&self.vetoed_unplugs),
            guard_warnings: get(&self.guard_warnings),
        }
    }

    /// Counts `event` if it is one of the counted kinds.
    pub(crate) fn count(&self, event: &DmaEvent) {
        let counter = match event {
            DmaEvent::MapRefused { .. } => &self.refused_maps,
            DmaEvent::UnplugVetoed { .. } => &self.vetoed_unplugs,
            DmaEvent::GuardWarning { .. } => &self.guard_warnings,
            DmaEvent::Bypass { .. } => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a device reports: the machine's hub and its own counters.
#[derive(Debug, Clone, Default)]
pub struct DmaReport {
    /// The machine's hub.
    pub events: std::sync::Arc<DmaEvents>,
    /// The device's counters.
    pub counters: std::sync::Arc<DmaCounters>,
}

impl DmaReport {
    /// Counts `event` and sends it to the hub's subscribers.
    pub fn emit(&self, event: DmaEvent) {
        self.counters.count(&event);
        self.events.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_and_reach_every_live_subscriber() {
        let report = DmaReport::default();
        let (a, b) = (report.events.subscribe(), report.events.subscribe());
        drop(b);
        let vetoed = DmaEvent::UnplugVetoed {
            device: "d".into(),
            gpa: 1,
            size: 2,
        };
        report.emit(vetoed.clone());
        report.emit(DmaEvent::Bypass {
            device: "d".into(),
            endpoint: 8,
            bypass: true,
        });
        assert_eq!(a.try_recv(), Ok(vetoed));
        assert!(matches!(a.try_recv(), Ok(DmaEvent::Bypass { bypass: true, .. })));
        assert_eq!(
            report.counters.get(),
            DmaCounts {
                vetoed_unplugs: 1,
                ..DmaCounts::default()
            }
        );
        assert_eq!(report.events.lock().len(), 1, "the dropped subscriber is gone");
        let json = serde_json::to_value(DmaEvent::GuardWarning {
            device: "d".into(),
            gpa: 4,
            size: 5,
            iova: 6,
        })
        .unwrap();
        assert_eq!(json["event"], "guard-warning");
        assert_eq!(json["iova"], 6);
    }
}
