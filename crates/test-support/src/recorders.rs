//! A discard listener and an IOMMU notifier that record what they are told.

use std::sync::{Arc, Mutex};

use memvisor_iommu::{IommuNotifier, MapCause, MapEvent, MapFlags, NotifierRefusal, UnmapCause, UnmapEvent};
use memvisor_memory::GuestRange;
use memvisor_memory::discard::{RamDiscardListener, Refusal};

/// A [`RamDiscardListener`] that records `('p', range)` for each populate
/// and `('d', range)` for each discard, refuses populates and vetoes
/// discards that overlap the ranges it is given.
#[derive(Debug, Default)]
pub struct RecordingListener {
    name: String,
    events: Mutex<Vec<(char, GuestRange)>>,
    refuse: Mutex<Option<GuestRange>>,
    veto: Mutex<Option<GuestRange>>,
}

impl RecordingListener {
    /// A listener named `name`.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            ..Default::default()
        })
    }

    /// What it was told since the last call.
    pub fn take(&self) -> Vec<(char, GuestRange)> {
        std::mem::take(&mut self.events.lock().unwrap())
    }

    /// Refuses every populate overlapping `range` (`None`: accept all).
    pub fn refuse(&self, range: Option<GuestRange>) {
        *self.refuse.lock().unwrap() = range;
    }

    /// Vetoes every discard overlapping `range` (`None`: allow all).
    pub fn veto(&self, range: Option<GuestRange>) {
        *self.veto.lock().unwrap() = range;
    }
}

impl RamDiscardListener for RecordingListener {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal> {
        if self.refuse.lock().unwrap().is_some_and(|r| r.overlaps(&range)) {
            return Err(Refusal(format!("{} refuses {range}", self.name)));
        }
        self.events.lock().unwrap().push(('p', range));
        Ok(())
    }

    fn notify_discard(&self, range: GuestRange) {
        self.events.lock().unwrap().push(('d', range));
    }

    fn may_discard(&self, range: GuestRange) -> bool {
        !self.veto.lock().unwrap().is_some_and(|r| r.overlaps(&range))
    }
}

/// One event a [`RecordingNotifier`] was told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A mapping became visible.
    Map {
        /// Its endpoint.
        endpoint: u32,
        /// Its domain.
        domain: u32,
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Guest-physical address.
        phys: u64,
        /// Flags.
        flags: MapFlags,
        /// Why.
        cause: MapCause,
        /// The event resolved a host range (RAM).
        host: bool,
        /// The manager's view, held for the call, said the range is
        /// populated.
        view: bool,
    },
    /// A mapping stopped being visible.
    Unmap {
        /// Its endpoint.
        endpoint: u32,
        /// Its domain.
        domain: u32,
        /// First IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Why.
        cause: UnmapCause,
    },
}

impl Seen {
    /// True for a map.
    pub fn is_map(&self) -> bool {
        matches!(self, Self::Map { .. })
    }

    /// The event's first IOVA.
    pub fn iova(&self) -> u64 {
        match *self {
            Self::Map { iova, .. } | Self::Unmap { iova, .. } => iova,
        }
    }
}

/// An [`IommuNotifier`] that records every event and refuses the mapping
/// at one IOVA on demand.
#[derive(Debug, Default)]
pub struct RecordingNotifier {
    name: String,
    seen: Mutex<Vec<Seen>>,
    refuse: Mutex<Option<(u64, NotifierRefusal)>>,
}

impl RecordingNotifier {
    /// A notifier named `name`.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            ..Default::default()
        })
    }

    /// What it was told since the last call.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut self.seen.lock().unwrap())
    }

    /// Refuses, with `refusal`, every mapping starting at `iova`.
    pub fn refuse_at(&self, iova: u64, refusal: NotifierRefusal) {
        *self.refuse.lock().unwrap() = Some((iova, refusal));
    }
}

impl IommuNotifier for RecordingNotifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        if let Some((iova, refusal)) = *self.refuse.lock().unwrap()
            && iova == ev.iova
        {
            return Err(refusal);
        }
        let target = GuestRange::new(ev.phys, ev.size).expect("events carry valid ranges");
        if let Some(host) = &ev.host {
            assert_eq!(host.guest, target, "the host range is the event's");
        }
        self.seen.lock().unwrap().push(Seen::Map {
            endpoint: ev.endpoint,
            domain: ev.domain,
            iova: ev.iova,
            size: ev.size,
            phys: ev.phys,
            flags: ev.flags,
            cause: ev.cause,
            host: ev.host.is_some(),
            view: ev.populated.is_some_and(|v| v.is_populated(target)),
        });
        Ok(())
    }

    fn notify_unmap(&self, ev: &UnmapEvent) {
        self.seen.lock().unwrap().push(Seen::Unmap {
            endpoint: ev.endpoint,
            domain: ev.domain,
            iova: ev.iova,
            size: ev.size,
            cause: ev.cause,
        });
    }
}
