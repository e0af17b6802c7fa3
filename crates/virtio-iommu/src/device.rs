//! Effects: the device applies validated requests to its domains and
//! mappings, tells the notifiers, translates for emulated devices and
//! reports faults on the event queue.
//!
//! # Locking
//!
//! All state lives behind one mutex shared by the [`VirtioIommu`] (what
//! the transport drives) and every [`IommuHandle`] (what the VMM, the DMA
//! layer and emulated devices use). The lock order is *IOMMU device →
//! discard manager (read) → notifier's own locks*; see the `memvisor-iommu` contract.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memvisor_memory::GuestRange;
use memvisor_memory::map::{GuestMemoryMap, MapError};
use memvisor_virtio::device::Active;
use memvisor_virtio::queue::{DeviceRing, Malformed, RequestChain, Response, drain_queue, write_response};
use memvisor_virtio::{ActivateError, InterruptKind, VirtioCommon, VirtioDevice, VirtioInterrupt};
use virtio_queue::Queue;

use crate::options::{OptionsError, IommuOptions};
use crate::mapping::{DomainMappings, MapFlags, Mapping};
use memvisor_iommu::{
    IommuNotifier, MapCause, MapEvent, NotifierId, NotifierRefusal, NotifierRegistry, RegisterError, UnmapCause, UnmapEvent,
};
use crate::request::{self, Request};
use crate::wire::{
    self, ATTACH_F_BYPASS, CONFIG_BYPASS_OFFSET, ConfigSpace, EVENT_QUEUE, F_BYPASS_CONFIG, F_DOMAIN_RANGE,
    F_INPUT_RANGE, F_MAP_UNMAP, F_MMIO, F_PROBE, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN,
    FAULT_R_MAPPING, FAULT_SIZE, FaultEvent, REQUEST_QUEUE, RESV_MEM_PROPERTY_SIZE, Status, TAIL_SIZE,
};

/// Features the device offers (besides `VIRTIO_F_VERSION_1`).
pub const AVAIL_FEATURES: u64 = F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_BYPASS_CONFIG | F_MMIO | F_PROBE;

/// Maximum sizes of the request and event queues.
pub const QUEUE_SIZES: [u16; 2] = [256, 64];

const NAME: &str = "virtio-iommu";

/// Why a mapping was not made visible (a MAP answered with an error, an
/// ATTACH, registration or state load that failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapRefusal {
    /// The guest-physical range is not inside one RAM region.
    #[error("guest-physical range [{phys:#x}, +{size:#x}) is not RAM: {reason}")]
    NotRam {
        /// First guest-physical address.
        phys: u64,
        /// Bytes.
        size: u64,
        /// What the memory map said.
        reason: String,
    },
    /// Part of the range is discarded (an unplugged memory-device block).
    #[error("guest-physical range {0} is not entirely populated")]
    NotPopulated(GuestRange),
    /// An MMIO-flagged mapping onto RAM: RAM must be mapped as RAM, so that
    /// it is checked and pinned.
    #[error("MMIO mapping [{phys:#x}, +{size:#x}) overlaps guest RAM")]
    MmioOverRam {
        /// First guest-physical address.
        phys: u64,
        /// Bytes.
        size: u64,
    },
    /// The device has no guest memory map yet (not activated, none given).
    #[error("no guest memory map to check the mapping against")]
    NoMemoryMap,
    /// A notifier refused the mapping.
    #[error("notifier '{notifier}' of endpoint {endpoint} refused the mapping: {refusal}")]
    Notifier {
        /// The notifier's name.
        notifier: String,
        /// Its endpoint.
        endpoint: u32,
        /// Why it refused.
        refusal: NotifierRefusal,
    },
}

impl MapRefusal {
    /// The status a request refused for this reason is answered with.
    pub fn status(&self) -> Status {
        match self {
            Self::Notifier { refusal, .. } => match refusal {
                NotifierRefusal::NoResources => Status::NoMem,
                NotifierRefusal::Invalid => Status::Inval,
                NotifierRefusal::OutOfRange => Status::Range,
                NotifierRefusal::Failed => Status::DevErr,
            },
            Self::NoMemoryMap => Status::DevErr,
            _ => Status::Inval,
        }
    }
}

/// Errors of [`IommuHandle::register_notifier`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The endpoint is not part of the topology.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(u32),
    /// Replaying a mapping of the endpoint's domain failed; nothing stays
    /// registered and the mappings replayed before were unmapped again.
    #[error("replaying mapping [{virt_start:#x}, {virt_end:#x}] of domain {domain} failed: {refusal}")]
    Refused {
        /// The domain.
        domain: u32,
        /// First IOVA of the mapping.
        virt_start: u64,
        /// Last IOVA of the mapping.
        virt_end: u64,
        /// Why.
        refusal: MapRefusal,
    },
}

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

/// One notifier of one endpoint, as the device calls it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) endpoint: u32,
    pub(crate) notifier: Arc<dyn IommuNotifier>,
}

pub(crate) struct Endpoint {
    pub(crate) domain: Option<u32>,
    pub(crate) notifiers: Vec<(NotifierId, Arc<dyn IommuNotifier>)>,
}

pub(crate) struct Domain {
    pub(crate) bypass: bool,
    pub(crate) endpoints: BTreeSet<u32>,
    pub(crate) mappings: DomainMappings,
    /// The notifiers of every endpoint in `endpoints`: endpoints ascending,
    /// each endpoint's notifiers in registration order. Kept in step with
    /// `endpoints` and the endpoints' notifier lists, so that MAP and UNMAP
    /// borrow it instead of collecting it (and cloning every `Arc`) per
    /// request.
    pub(crate) targets: Vec<Target>,
}

impl Domain {
    /// A domain without endpoints (and so without targets).
    pub(crate) fn new(bypass: bool, mappings: DomainMappings) -> Self {
        Self {
            bypass,
            endpoints: BTreeSet::new(),
            mappings,
            targets: Vec::new(),
        }
    }

    /// Where the targets of `endpoint` are in `targets`, or where they
    /// would go (`targets` is sorted by endpoint).
    fn span(&self, endpoint: u32) -> std::ops::Range<usize> {
        let start = self.targets.partition_point(|t| t.endpoint < endpoint);
        let len = self.targets[start..].partition_point(|t| t.endpoint == endpoint);
        start..start + len
    }

    /// Adds `endpoint` (not attached here) with its `notifiers`; returns
    /// where its targets are.
    fn insert_endpoint(
        &mut self,
        endpoint: u32,
        notifiers: &[(NotifierId, Arc<dyn IommuNotifier>)],
    ) -> std::ops::Range<usize> {
        let inserted = self.endpoints.insert(endpoint);
        debug_assert!(inserted, "endpoint {endpoint} was attached already");
        let at = self.span(endpoint).start;
        self.targets.splice(
            at..at,
            notifiers.iter().map(|(_, n)| Target {
                endpoint,
                notifier: n.clone(),
            }),
        );
        at..at + notifiers.len()
    }

    /// Removes `endpoint` and its targets.
    fn remove_endpoint(&mut self, endpoint: u32) {
        self.endpoints.remove(&endpoint);
        let span = self.span(endpoint);
        self.targets.drain(span);
    }

    /// Recomputes `targets` from `endpoints` and their notifiers in `all`.
    pub(crate) fn rebuild_targets(&mut self, all: &BTreeMap<u32, Endpoint>) {
        self.targets.clear();
        for &endpoint in &self.endpoints {
            if let Some(ep) = all.get(&endpoint) {
                self.targets.extend(ep.notifiers.iter().map(|(_, n)| Target {
                    endpoint,
                    notifier: n.clone(),
                }));
            }
        }
    }

    /// True if `targets` is what [`rebuild_targets`](Self::rebuild_targets)
    /// would make of `all` (for debug assertions; allocation-free).
    pub(crate) fn targets_fresh(&self, all: &BTreeMap<u32, Endpoint>) -> bool {
        let mut cached = self.targets.iter();
        for &endpoint in &self.endpoints {
            for (_, n) in all.get(&endpoint).map_or(&[][..], |ep| &ep.notifiers[..]) {
                match cached.next() {
                    Some(t) if t.endpoint == endpoint && Arc::ptr_eq(&t.notifier, n) => {}
                    _ => return false,
                }
            }
        }
        cached.next().is_none()
    }
}

/// Logs at most once per interval, counting what it suppressed.
struct RateLimit {
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

fn unmap_event(endpoint: u32, domain: u32, m: &Mapping, cause: UnmapCause) -> UnmapEvent {
    UnmapEvent {
        endpoint,
        domain,
        iova: m.virt_start,
        size: m.size(),
        phys: m.phys_start,
        flags: m.flags,
        cause,
    }
}

/// Tells every target that `m` is gone, last target first.
pub(crate) fn unmap_to(targets: &[Target], domain: u32, m: &Mapping, cause: UnmapCause) {
    for t in targets.iter().rev() {
        t.notifier.notify_unmap(&unmap_event(t.endpoint, domain, m, cause));
    }
}

/// Checks that `m` may be made visible and tells every target, all or
/// nothing (DESIGN.md rule 3: the populated check and the notifications
/// happen under one read guard of the discard manager).
pub(crate) fn deliver_map(
    mem: Option<&GuestMemoryMap>,
    targets: &[Target],
    domain: u32,
    m: &Mapping,
    cause: MapCause,
) -> Result<(), MapRefusal> {
    let size = m.size();
    if m.flags.mmio() {
        if let Some(mem) = mem {
            let end = m.phys_start + (size - 1);
            if mem
                .regions()
                .iter()
                .any(|r| r.range().start() <= end && m.phys_start < r.range().end())
            {
                return Err(MapRefusal::MmioOverRam {
                    phys: m.phys_start,
                    size,
                });
            }
        }
        return notify_all(targets, domain, m, cause, None, None);
    }
    let mem = mem.ok_or(MapRefusal::NoMemoryMap)?;
    let not_ram = |reason: String| MapRefusal::NotRam {
        phys: m.phys_start,
        size,
        reason,
    };
    let range = GuestRange::new(m.phys_start, size).ok_or_else(|| not_ram("the range wraps".into()))?;
    let host = mem.lookup(range).map_err(|e: MapError| not_ram(e.to_string()))?;
    match host.region.manager() {
        None => notify_all(targets, domain, m, cause, Some(host.clone()), None),
        Some(manager) => {
            let view = manager.populated();
            if !view.is_populated(range) {
                return Err(MapRefusal::NotPopulated(range));
            }
            notify_all(targets, domain, m, cause, Some(host.clone()), Some(&view))
        }
    }
}

fn notify_all<'a>(
    targets: &[Target],
    domain: u32,
    m: &Mapping,
    cause: MapCause,
    host: Option<memvisor_memory::map::HostRange<'a>>,
    populated: Option<&'a memvisor_memory::discard::PopulatedView<'a>>,
) -> Result<(), MapRefusal> {
    for (i, t) in targets.iter().enumerate() {
        let event = MapEvent {
            endpoint: t.endpoint,
            domain,
            iova: m.virt_start,
            size: m.size(),
            phys: m.phys_start,
            flags: m.flags,
            cause,
            host: host.clone(),
            populated,
        };
        if let Err(refusal) = t.notifier.notify_map(&event) {
            unmap_to(&targets[..i], domain, m, UnmapCause::Rollback);
            return Err(MapRefusal::Notifier {
                notifier: t.notifier.name().to_string(),
                endpoint: t.endpoint,
                refusal,
            });
        }
    }
    Ok(())
}

/// Delivers every mapping of `mappings` to `targets` in ascending IOVA
/// order, all or nothing: if one is refused, the ones delivered before are
/// unmapped again (last first) and the refused mapping is returned with why.
fn replay(
    mem: Option<&GuestMemoryMap>,
    targets: &[Target],
    domain: u32,
    mappings: &DomainMappings,
    cause: MapCause,
) -> Result<(), (Mapping, MapRefusal)> {
    for (i, m) in mappings.iter().enumerate() {
        if let Err(refusal) = deliver_map(mem, targets, domain, m, cause) {
            for done in mappings.iter().take(i).rev() {
                unmap_to(targets, domain, done, UnmapCause::Rollback);
            }
            return Err((*m, refusal));
        }
    }
    Ok(())
}

/// The device model without its transport side.
pub(crate) struct Core {
    pub(crate) options: IommuOptions,
    pub(crate) bypass: bool,
    pub(crate) endpoints: BTreeMap<u32, Endpoint>,
    pub(crate) domains: BTreeMap<u32, Domain>,
    pub(crate) mem: Option<GuestMemoryMap>,
    next_notifier: u64,
    dropped_faults: u64,
    fault_log: RateLimit,
}

impl Core {
    fn new(options: IommuOptions, mem: Option<GuestMemoryMap>) -> Self {
        let endpoints = options
            .endpoints
            .iter()
            .map(|&id| {
                (
                    id,
                    Endpoint {
                        domain: None,
                        notifiers: Vec::new(),
                    },
                )
            })
            .collect();
        Self {
            bypass: options.bypass,
            options,
            endpoints,
            domains: BTreeMap::new(),
            mem,
            next_notifier: 1,
            dropped_faults: 0,
            fault_log: RateLimit {
                last: None,
                suppressed: 0,
            },
        }
    }

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

    pub(crate) fn domain_in_range(&self, domain: u32) -> bool {
        (self.options.domain_start..=self.options.domain_end).contains(&domain)
    }

    /// Detaches `endpoint` from `domain` (it is attached there), unmapping
    /// the domain's mappings from its notifiers; the domain ceases to
    /// exist with its last endpoint.
    fn detach_endpoint(&mut self, endpoint: u32, domain: u32, cause: UnmapCause) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        debug_assert!(d.targets_fresh(&self.endpoints));
        let targets = &d.targets[d.span(endpoint)];
        if !targets.is_empty() {
            for m in d.mappings.iter().rev() {
                unmap_to(targets, domain, m, cause);
            }
        }
        d.remove_endpoint(endpoint);
        if d.endpoints.is_empty() {
            self.domains.remove(&domain);
        }
        if let Some(ep) = self.endpoints.get_mut(&endpoint) {
            ep.domain = None;
        }
    }

    /// Detaches every endpoint: device reset, system reset, state load.
    pub(crate) fn detach_all(&mut self, cause: UnmapCause) {
        let attached: Vec<(u32, u32)> = self
            .endpoints
            .iter()
            .filter_map(|(&id, ep)| ep.domain.map(|d| (id, d)))
            .collect();
        for (endpoint, domain) in attached {
            self.detach_endpoint(endpoint, domain, cause);
        }
        self.domains.clear();
    }

    fn handle(&mut self, chain: &RequestChain, acked: u64) -> Result<Response, Malformed> {
        let request = Request::parse(chain.request())?;
        let writable = chain.writable_len();
        if writable < TAIL_SIZE {
            return Err(Malformed::ResponseTooShort {
                got: writable,
                need: TAIL_SIZE,
            });
        }
        let status = match request {
            Request::Attach(a) => self.attach(a, acked),
            Request::Detach(d) => self.detach(d),
            Request::Map(m) => self.map(m, acked),
            Request::Unmap(u) => self.unmap(u, acked),
            Request::Probe(p) => return Ok(Response::from_vec(self.probe(p, writable))),
        };
        Ok(Response::from_slice(&status.tail()))
    }

    fn attach(&mut self, a: request::Attach, acked: u64) -> Status {
        if a.reserved != [0; 4] {
            return Status::Inval;
        }
        let known = if acked & F_BYPASS_CONFIG != 0 {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if a.flags & !known != 0 {
            return Status::Inval;
        }
        if !self.domain_in_range(a.domain) {
            return Status::Range;
        }
        let Some(ep) = self.endpoints.get(&a.endpoint) else {
            return Status::NoEnt;
        };
        let bypass = a.flags & ATTACH_F_BYPASS != 0;
        let existing = self.domains.get(&a.domain);
        if existing.is_some_and(|d| d.bypass != bypass) {
            return Status::Inval;
        }
        let old = ep.domain;
        if old == Some(a.domain) {
            return Status::Ok;
        }
        let frees_old = old.is_some_and(|o| self.domains.get(&o).is_some_and(|d| d.endpoints.len() == 1));
        let creates = existing.is_none();
        if creates && !frees_old && self.domains.len() >= self.options.limits.max_domains {
            return Status::NoMem;
        }
        // A re-attach behaves as a DETACH followed by the ATTACH (spec
        // 5.13.6.3): if the ATTACH then fails, the endpoint stays detached.
        if let Some(old) = old {
            self.detach_endpoint(a.endpoint, old, UnmapCause::Detach);
        }
        let notifiers = self.endpoints.get(&a.endpoint).map_or(&[][..], |ep| &ep.notifiers[..]);
        let domain = self
            .domains
            .entry(a.domain)
            .or_insert_with(|| Domain::new(bypass, DomainMappings::default()));
        // The endpoint joins the domain's targets now, so that the replay
        // borrows its slice of them; a failed replay takes it out again.
        let span = domain.insert_endpoint(a.endpoint, notifiers);
        let targets = &domain.targets[span];
        if !targets.is_empty()
            && let Err((m, refusal)) = replay(self.mem.as_ref(), targets, a.domain, &domain.mappings, MapCause::Attach)
        {
            domain.remove_endpoint(a.endpoint);
            if domain.endpoints.is_empty() {
                self.domains.remove(&a.domain);
            }
            log::warn!(
                "{NAME}: attach of endpoint {} to domain {} failed replaying [{:#x}, {:#x}]: {refusal}",
                a.endpoint,
                a.domain,
                m.virt_start,
                m.virt_end
            );
            return refusal.status();
        }
        if let Some(ep) = self.endpoints.get_mut(&a.endpoint) {
            ep.domain = Some(a.domain);
        }
        Status::Ok
    }

    fn detach(&mut self, d: request::Detach) -> Status {
        if !self.domain_in_range(d.domain) {
            return Status::Range;
        }
        let Some(ep) = self.endpoints.get(&d.endpoint) else {
            return Status::NoEnt;
        };
        if !self.domains.contains_key(&d.domain) {
            return Status::NoEnt;
        }
        if ep.domain != Some(d.domain) {
            return Status::Inval;
        }
        self.detach_endpoint(d.endpoint, d.domain, UnmapCause::Detach);
        Status::Ok
    }

    fn map(&mut self, m: request::Map, acked: u64) -> Status {
        if acked & F_MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        if !self.domain_in_range(m.domain) {
            return Status::Range;
        }
        let mut known = MapFlags::READ | MapFlags::WRITE;
        if acked & F_MMIO != 0 {
            known = known | MapFlags::MMIO;
        }
        let Some(flags) = MapFlags::from_bits(m.flags).filter(|f| known.contains(*f)) else {
            return Status::Inval;
        };
        if m.virt_end < m.virt_start {
            return Status::Inval;
        }
        if m.virt_start < self.options.input_start || m.virt_end > self.options.input_end {
            return Status::Range;
        }
        let granule = self.options.granule();
        if m.virt_start % granule != 0 || m.virt_end.wrapping_add(1) % granule != 0 || m.phys_start % granule != 0 {
            return Status::Range;
        }
        let span = m.virt_end - m.virt_start;
        if span == u64::MAX || m.phys_start.checked_add(span).is_none() {
            return Status::Range;
        }
        // One lookup: the checks, the notification (borrowing the cached
        // targets) and the insertion all use this entry.
        let Some(domain) = self.domains.get_mut(&m.domain) else {
            return Status::NoEnt;
        };
        if domain.bypass {
            return Status::Inval;
        }
        if self
            .options
            .reserved_regions
            .iter()
            .any(|r| r.start <= m.virt_end && m.virt_start <= r.end)
        {
            return Status::Inval;
        }
        if domain.mappings.overlaps(m.virt_start, m.virt_end) {
            return Status::Inval;
        }
        if domain.mappings.len() >= self.options.limits.max_mappings_per_domain {
            return Status::NoMem;
        }
        let mapping = Mapping {
            virt_start: m.virt_start,
            virt_end: m.virt_end,
            phys_start: m.phys_start,
            flags,
        };
        debug_assert!(domain.targets_fresh(&self.endpoints));
        if let Err(refusal) = deliver_map(self.mem.as_ref(), &domain.targets, m.domain, &mapping, MapCause::Map) {
            log::debug!(
                "{NAME}: MAP [{:#x}, {:#x}] -> {:#x} in domain {} refused: {refusal}",
                m.virt_start,
                m.virt_end,
                m.phys_start,
                m.domain
            );
            return refusal.status();
        }
        domain.mappings.insert(mapping);
        Status::Ok
    }

    fn unmap(&mut self, u: request::Unmap, acked: u64) -> Status {
        if acked & F_MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        if !self.domain_in_range(u.domain) {
            return Status::Range;
        }
        if u.virt_end < u.virt_start {
            return Status::Inval;
        }
        if u.virt_start < self.options.input_start || u.virt_end > self.options.input_end {
            return Status::Range;
        }
        let Some(domain) = self.domains.get_mut(&u.domain) else {
            return Status::NoEnt;
        };
        if domain.bypass {
            return Status::Inval;
        }
        debug_assert!(domain.targets_fresh(&self.endpoints));
        if let Some(m) = domain.mappings.remove_exact(u.virt_start, u.virt_end) {
            unmap_to(&domain.targets, u.domain, &m, UnmapCause::Unmap);
            return Status::Ok;
        }
        if domain.mappings.check_unmap(u.virt_start, u.virt_end).is_err() {
            return Status::Range;
        }
        // Each covered mapping in ascending order: removed, then notified.
        while let Some(m) = domain.mappings.remove_first_in(u.virt_start, u.virt_end) {
            unmap_to(&domain.targets, u.domain, &m, UnmapCause::Unmap);
        }
        Status::Ok
    }

    fn probe(&self, p: request::Probe, writable: usize) -> Vec<u8> {
        let probe_size = self.options.probe_size as usize;
        if writable - TAIL_SIZE < probe_size {
            // Too small for the properties: write no property (spec 5.13.6.8.2).
            let mut response = vec![0u8; writable];
            response[writable - TAIL_SIZE] = Status::Inval as u8;
            return response;
        }
        let mut response = vec![0u8; probe_size + TAIL_SIZE];
        if !self.endpoints.contains_key(&p.endpoint) {
            response[probe_size] = Status::NoEnt as u8;
            return response;
        }
        for (i, r) in self.options.reserved_regions.iter().enumerate() {
            let at = i * RESV_MEM_PROPERTY_SIZE;
            response[at..at + RESV_MEM_PROPERTY_SIZE].copy_from_slice(&wire::resv_mem_property(
                r.kind.subtype(),
                r.start,
                r.end,
            ));
        }
        response[probe_size] = Status::Ok as u8;
        response
    }

    fn translate(&self, endpoint: u32, iova: u64, access: Access) -> Result<Translation, Fault> {
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

    fn register_notifier(
        &mut self,
        endpoint: u32,
        notifier: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierId, NotifierError> {
        let ep = self
            .endpoints
            .get_mut(&endpoint)
            .ok_or(NotifierError::UnknownEndpoint(endpoint))?;
        let target = Target { endpoint, notifier };
        let domain = ep
            .domain
            .and_then(|d| self.domains.get_mut(&d).map(|domain| (d, domain)));
        if let Some((domain_id, domain)) = &domain
            && let Err((m, refusal)) = replay(
                self.mem.as_ref(),
                std::slice::from_ref(&target),
                *domain_id,
                &domain.mappings,
                MapCause::Register,
            )
        {
            return Err(NotifierError::Refused {
                domain: *domain_id,
                virt_start: m.virt_start,
                virt_end: m.virt_end,
                refusal,
            });
        }
        let id = NotifierId(self.next_notifier);
        self.next_notifier += 1;
        ep.notifiers.push((id, target.notifier.clone()));
        if let Some((_, domain)) = domain {
            // Registration order: after the endpoint's other notifiers.
            let at = domain.span(endpoint).end;
            domain.targets.insert(at, target);
        }
        Ok(id)
    }

    fn add_endpoint(&mut self, endpoint: u32) -> bool {
        if self.endpoints.contains_key(&endpoint) {
            return false;
        }
        // Attached to no domain and without notifiers: no domain's targets
        // change.
        self.endpoints.insert(
            endpoint,
            Endpoint {
                domain: None,
                notifiers: Vec::new(),
            },
        );
        true
    }

    fn unregister_notifier(&mut self, id: NotifierId) -> bool {
        let Some((endpoint, pos)) = self
            .endpoints
            .iter()
            .find_map(|(&e, ep)| ep.notifiers.iter().position(|(n, _)| *n == id).map(|p| (e, p)))
        else {
            return false;
        };
        let ep = self.endpoints.get_mut(&endpoint).expect("found above");
        let (_, notifier) = ep.notifiers.remove(pos);
        if let Some(domain_id) = ep.domain
            && let Some(domain) = self.domains.get_mut(&domain_id)
        {
            let cached = domain.targets.remove(domain.span(endpoint).start + pos);
            debug_assert!(Arc::ptr_eq(&cached.notifier, &notifier));
            let targets = [Target { endpoint, notifier }];
            for m in domain.mappings.iter().rev() {
                unmap_to(&targets, domain_id, m, UnmapCause::Unregister);
            }
        }
        true
    }
}

struct Inner {
    common: VirtioCommon,
    core: Core,
}

impl Inner {
    fn process_requests(&mut self) {
        let Inner { common, core } = self;
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
            |chain| core.handle(chain, acked),
        );
        if let Err(e) = result {
            common.set_needs_reset(&e);
        }
    }

    fn report_fault(&mut self, fault: &Fault) {
        let bytes = fault.event().to_bytes();
        let outcome = match self.common.active_mut() {
            Some(active) => push_event(active, &bytes),
            None => Ok(false),
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.core.dropped_faults += 1;
                let dropped = self.core.dropped_faults;
                self.core.fault_log.warn(format_args!(
                    "no event buffer for a fault report, dropped ({dropped} in total): {fault}"
                ));
            }
            Err(e) => {
                self.core.dropped_faults += 1;
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

/// A shared handle on a virtio-iommu device, for the VMM (topology,
/// notifiers, migration) and for emulated devices (translation). Cheap to
/// clone; every method takes the device lock.
#[derive(Clone)]
pub struct IommuHandle {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for IommuHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("IommuHandle")
            .field("common", &inner.common)
            .field("endpoints", &inner.core.endpoints.len())
            .field("domains", &inner.core.domains.len())
            .finish()
    }
}

impl IommuHandle {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Registers `notifier` for `endpoint` and replays the mappings the
    /// endpoint sees now (as [`MapCause::Register`]); if one is refused the
    /// replayed ones are unmapped again and nothing is registered.
    pub fn register_notifier(
        &self,
        endpoint: u32,
        notifier: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierId, NotifierError> {
        self.lock().core.register_notifier(endpoint, notifier)
    }

    /// Unregisters a notifier, sending it `notify_unmap` for every mapping
    /// it sees now. Returns `false` for an unknown id.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        self.lock().core.unregister_notifier(id)
    }

    /// Adds an endpoint to the topology (hotplug). Returns `false` if it exists.
    pub fn add_endpoint(&self, endpoint: u32) -> bool {
        self.lock().core.add_endpoint(endpoint)
    }

    /// Gives the device the guest memory map (activation does too), so that
    /// translation and state loading work before activation.
    pub fn set_memory(&self, mem: GuestMemoryMap) {
        self.lock().core.mem = Some(mem);
    }

    /// Translates an access of `endpoint` at `iova` for an emulated device.
    ///
    /// A fault (except for an unknown endpoint) is reported to the driver on
    /// the event queue; if the driver has no buffer there, it is counted
    /// ([`dropped_faults`](Self::dropped_faults)) and logged, rate-limited.
    /// The answer is valid at the time of the call: a caller that must
    /// exclude a concurrent unplug holds the region manager's view itself.
    pub fn translate(&self, endpoint: u32, iova: u64, access: Access) -> Result<Translation, Fault> {
        let mut inner = self.lock();
        let result = inner.core.translate(endpoint, iova, access);
        if let Err(fault) = &result
            && fault.kind != FaultKind::UnknownEndpoint
        {
            inner.report_fault(fault);
        }
        result
    }

    /// Fault reports dropped because the driver had no event buffer.
    pub fn dropped_faults(&self) -> u64 {
        self.lock().core.dropped_faults
    }

    /// The domain `endpoint` is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.lock().core.endpoints.get(&endpoint).and_then(|ep| ep.domain)
    }

    /// The IDs of the domains that exist.
    pub fn domains(&self) -> Vec<u32> {
        self.lock().core.domains.keys().copied().collect()
    }

    /// The mappings of `domain` in ascending IOVA order, `None` if it does
    /// not exist.
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        self.lock()
            .core
            .domains
            .get(&domain)
            .map(|d| d.mappings.iter().copied().collect())
    }

    /// The current `bypass` config value.
    pub fn bypass(&self) -> bool {
        self.lock().core.bypass
    }

    /// System reset: every endpoint is detached (notifiers get
    /// `notify_unmap`) and `bypass` returns to its configured value.
    pub fn system_reset(&self) {
        let mut inner = self.lock();
        inner.core.detach_all(UnmapCause::Reset);
        inner.core.bypass = inner.core.options.bypass;
    }

    /// Runs `f` on the device model (for [`crate::persist`]).
    pub(crate) fn with_core<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        f(&mut self.lock().core)
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
        let inner = Inner {
            common: VirtioCommon::new(NAME, AVAIL_FEATURES, QUEUE_SIZES.to_vec()),
            core: Core::new(options, mem),
        };
        Ok(Self {
            handle: IommuHandle {
                inner: Arc::new(Mutex::new(inner)),
            },
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
        let bytes = self.handle.lock().core.config_space().to_bytes();
        memvisor_virtio::config::read_config(&bytes, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut inner = self.handle.lock();
        if offset == CONFIG_BYPASS_OFFSET && (1..=4).contains(&data.len()) && inner.common.has_feature(F_BYPASS_CONFIG)
        {
            // The driver writes 0 or 1; bits 1-7 (and `reserved`, for a
            // wider write) are ignored.
            inner.core.bypass = data[0] & 1 != 0;
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
        let mut inner = self.handle.lock();
        inner.common.activate(mem.clone(), interrupt, queues)?;
        inner.core.mem = Some(mem);
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

    fn reset(&mut self) {
        let mut inner = self.handle.lock();
        // "When the device is reset, endpoints are not attached to any
        // domain"; `bypass` keeps its value.
        inner.core.detach_all(UnmapCause::Reset);
        inner.common.reset();
    }

    fn needs_reset(&self) -> bool {
        self.handle.lock().common.needs_reset()
    }
}

impl NotifierRegistry for IommuHandle {
    fn register_notifier(
        &self,
        endpoint: u32,
        notifier: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierId, RegisterError> {
        IommuHandle::register_notifier(self, endpoint, notifier).map_err(|e| match e {
            NotifierError::UnknownEndpoint(endpoint) => RegisterError::UnknownEndpoint(endpoint),
            NotifierError::Refused {
                domain,
                virt_start,
                virt_end,
                refusal,
            } => RegisterError::Replay {
                domain,
                virt_start,
                virt_end,
                reason: refusal.to_string(),
            },
        })
    }

    fn unregister_notifier(&self, id: NotifierId) -> bool {
        IommuHandle::unregister_notifier(self, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_memory::{Backing, RamBlock};
    use proptest::prelude::*;

    use crate::persist::{DomainState, EndpointState, IommuState, MappingState};

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records what it is told in a log shared by every recorder;
    /// `refuse`s every mapping if asked to.
    struct Recorder {
        name: String,
        refuse: bool,
        log: Log,
    }

    impl IommuNotifier for Recorder {
        fn name(&self) -> &str {
            &self.name
        }

        fn notify_map(&self, e: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
            if self.refuse {
                return Err(NotifierRefusal::Failed);
            }
            let line = format!(
                "{} map e{} d{} {:#x} {:?}",
                self.name, e.endpoint, e.domain, e.iova, e.cause
            );
            self.log.lock().unwrap().push(line);
            Ok(())
        }

        fn notify_unmap(&self, e: &UnmapEvent) {
            let line = format!(
                "{} unmap e{} d{} {:#x} {:?}",
                self.name, e.endpoint, e.domain, e.iova, e.cause
            );
            self.log.lock().unwrap().push(line);
        }
    }

    fn recorder(name: &str, refuse: bool, log: &Log) -> Arc<dyn IommuNotifier> {
        Arc::new(Recorder {
            name: name.into(),
            refuse,
            log: log.clone(),
        })
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    fn memory() -> GuestMemoryMap {
        let ram = Arc::new(RamBlock::new("ram", 16 << 20, Backing::Memfd).unwrap());
        GuestMemoryMap::builder().ram(0, ram).unwrap().build().unwrap()
    }

    fn config(endpoints: Vec<u32>) -> IommuOptions {
        IommuOptions {
            endpoints,
            ..IommuOptions::default()
        }
    }

    const ACKED: u64 = F_MAP_UNMAP;

    fn attach(core: &mut Core, endpoint: u32, domain: u32) -> Status {
        let a = request::Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        };
        core.attach(a, ACKED)
    }

    fn map(core: &mut Core, domain: u32, iova: u64) -> Status {
        let m = request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: iova,
            flags: MapFlags::READ.bits(),
        };
        core.map(m, ACKED)
    }

    fn unmap(core: &mut Core, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        let u = request::Unmap {
            domain,
            virt_start,
            virt_end,
        };
        core.unmap(u, ACKED)
    }

    /// Every domain's cached targets are what collecting them afresh gives
    /// (endpoints ascending, each one's notifiers in registration order),
    /// computed here independently of [`Domain::targets_fresh`].
    fn assert_targets_fresh(core: &Core) {
        let key = |endpoint: u32, n: &Arc<dyn IommuNotifier>| (endpoint, Arc::as_ptr(n).cast::<()>());
        for (id, d) in &core.domains {
            let expected: Vec<_> = d
                .endpoints
                .iter()
                .flat_map(|&e| core.endpoints[&e].notifiers.iter().map(move |(_, n)| key(e, n)))
                .collect();
            let cached: Vec<_> = d.targets.iter().map(|t| key(t.endpoint, &t.notifier)).collect();
            assert_eq!(cached, expected, "targets of domain {id}");
        }
    }

    #[test]
    fn map_and_unmap_tell_exactly_the_notifiers_attached_now() {
        let log = Log::default();
        let mut core = Core::new(config(vec![1, 2, 3]), Some(memory()));
        core.register_notifier(1, recorder("a", false, &log)).unwrap();
        let b1 = core.register_notifier(2, recorder("b1", false, &log)).unwrap();
        core.register_notifier(3, recorder("c", false, &log)).unwrap();
        // Endpoint 2 first: endpoint 1's targets must go before its.
        assert_eq!(attach(&mut core, 2, 1), Status::Ok);
        assert_eq!(attach(&mut core, 1, 1), Status::Ok);
        core.register_notifier(2, recorder("b2", false, &log)).unwrap();
        assert_eq!(map(&mut core, 1, 0x1000), Status::Ok);
        assert_eq!(
            take(&log),
            [
                "a map e1 d1 0x1000 Map",
                "b1 map e2 d1 0x1000 Map",
                "b2 map e2 d1 0x1000 Map"
            ]
        );
        assert_eq!(attach(&mut core, 3, 2), Status::Ok);
        assert_eq!(map(&mut core, 2, 0x2000), Status::Ok);
        assert_eq!(take(&log), ["c map e3 d2 0x2000 Map"]);

        // Endpoint 2 moves to domain 2, then loses a notifier.
        assert_eq!(attach(&mut core, 2, 2), Status::Ok);
        assert_eq!(
            take(&log),
            [
                "b2 unmap e2 d1 0x1000 Detach",
                "b1 unmap e2 d1 0x1000 Detach",
                "b1 map e2 d2 0x2000 Attach",
                "b2 map e2 d2 0x2000 Attach",
            ]
        );
        assert!(core.unregister_notifier(b1));
        assert_eq!(take(&log), ["b1 unmap e2 d2 0x2000 Unregister"]);
        assert_targets_fresh(&core);

        assert_eq!(map(&mut core, 1, 0x3000), Status::Ok);
        assert_eq!(take(&log), ["a map e1 d1 0x3000 Map"]);
        assert_eq!(map(&mut core, 2, 0x4000), Status::Ok);
        assert_eq!(take(&log), ["b2 map e2 d2 0x4000 Map", "c map e3 d2 0x4000 Map"]);
        assert_eq!(unmap(&mut core, 2, 0x4000, 0x4fff), Status::Ok);
        assert_eq!(
            take(&log),
            ["c unmap e3 d2 0x4000 Unmap", "b2 unmap e2 d2 0x4000 Unmap"]
        );
        // Several mappings in one UNMAP: ascending, each to every target.
        assert_eq!(unmap(&mut core, 1, 0, 0xffff), Status::Ok);
        assert_eq!(take(&log), ["a unmap e1 d1 0x1000 Unmap", "a unmap e1 d1 0x3000 Unmap"]);
        assert_eq!(unmap(&mut core, 2, 0x2000, 0x2fff), Status::Ok);
        assert_eq!(
            take(&log),
            ["c unmap e3 d2 0x2000 Unmap", "b2 unmap e2 d2 0x2000 Unmap"]
        );

        // A hotplugged endpoint joins domain 2 between nothing and endpoint 2.
        assert!(core.add_endpoint(0));
        core.register_notifier(0, recorder("z", false, &log)).unwrap();
        assert_eq!(attach(&mut core, 0, 2), Status::Ok);
        assert_eq!(map(&mut core, 2, 0x5000), Status::Ok);
        assert_eq!(
            take(&log),
            [
                "z map e0 d2 0x5000 Map",
                "b2 map e2 d2 0x5000 Map",
                "c map e3 d2 0x5000 Map"
            ]
        );

        // The last endpoint leaves domain 1, which ceases to exist; a new
        // domain 1 starts without targets of the old one.
        let detach = request::Detach { domain: 1, endpoint: 1 };
        assert_eq!(core.detach(detach), Status::Ok);
        assert!(!core.domains.contains_key(&1));
        assert_eq!(attach(&mut core, 3, 1), Status::Ok);
        assert_eq!(take(&log), ["c unmap e3 d2 0x5000 Detach"]);
        assert_eq!(map(&mut core, 1, 0x6000), Status::Ok);
        assert_eq!(take(&log), ["c map e3 d1 0x6000 Map"]);
        assert_targets_fresh(&core);

        // Reset: no domain, and so no target, survives.
        core.detach_all(UnmapCause::Reset);
        assert!(core.domains.is_empty());
        take(&log);
        assert_eq!(attach(&mut core, 2, 7), Status::Ok);
        assert_eq!(map(&mut core, 7, 0x7000), Status::Ok);
        assert_eq!(take(&log), ["b2 map e2 d7 0x7000 Map"]);
        assert_targets_fresh(&core);
    }

    #[test]
    fn a_refused_attach_leaves_no_target_behind() {
        let log = Log::default();
        let mut core = Core::new(config(vec![1, 2]), Some(memory()));
        core.register_notifier(1, recorder("a", false, &log)).unwrap();
        core.register_notifier(2, recorder("ok", false, &log)).unwrap();
        core.register_notifier(2, recorder("no", true, &log)).unwrap();
        assert_eq!(attach(&mut core, 1, 1), Status::Ok);
        assert_eq!(map(&mut core, 1, 0x1000), Status::Ok);
        take(&log);
        assert_eq!(attach(&mut core, 2, 1), Status::DevErr);
        assert_eq!(
            take(&log),
            ["ok map e2 d1 0x1000 Attach", "ok unmap e2 d1 0x1000 Rollback"]
        );
        assert_targets_fresh(&core);
        assert_eq!(map(&mut core, 1, 0x2000), Status::Ok);
        assert_eq!(take(&log), ["a map e1 d1 0x2000 Map"]);
        // On a domain without mappings the attach succeeds; a MAP there is
        // refused by the second target and rolled back from the first.
        assert_eq!(attach(&mut core, 2, 3), Status::Ok);
        assert_eq!(map(&mut core, 3, 0x1000), Status::DevErr);
        assert_eq!(
            take(&log),
            ["ok map e2 d3 0x1000 Map", "ok unmap e2 d3 0x1000 Rollback"]
        );
        assert!(core.domains[&3].mappings.is_empty());
        assert_targets_fresh(&core);
    }

    #[test]
    fn loaded_state_fills_the_targets() {
        let log = Log::default();
        let dev = VirtioIommu::new(config(vec![1, 2, 3]), Some(memory())).unwrap();
        let handle = dev.handle();
        handle.register_notifier(2, recorder("b", false, &log)).unwrap();
        handle.register_notifier(1, recorder("a", false, &log)).unwrap();
        handle.register_notifier(3, recorder("c", false, &log)).unwrap();
        let mapping = |iova: u64| MappingState {
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: iova,
            flags: MapFlags::READ.bits(),
        };
        let state = IommuState {
            bypass: false,
            endpoints: vec![
                EndpointState { id: 2, domain: Some(5) },
                EndpointState { id: 3, domain: Some(6) },
                EndpointState { id: 1, domain: Some(5) },
            ],
            domains: vec![
                DomainState {
                    id: 5,
                    bypass: false,
                    mappings: vec![mapping(0x1000)],
                },
                DomainState {
                    id: 6,
                    bypass: false,
                    mappings: vec![mapping(0x2000)],
                },
            ],
        };
        handle.load_state(&state).unwrap();
        assert_eq!(
            take(&log),
            [
                "a map e1 d5 0x1000 Restore",
                "b map e2 d5 0x1000 Restore",
                "c map e3 d6 0x2000 Restore",
            ]
        );
        handle.with_core(|core| {
            assert_targets_fresh(core);
            assert_eq!(map(core, 5, 0x3000), Status::Ok);
            assert_eq!(unmap(core, 6, 0x2000, 0x2fff), Status::Ok);
        });
        assert_eq!(
            take(&log),
            [
                "a map e1 d5 0x3000 Map",
                "b map e2 d5 0x3000 Map",
                "c unmap e3 d6 0x2000 Unmap",
            ]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Attach(u32, u32),
        Detach(u32),
        Register(u32, bool),
        Unregister(usize),
        AddEndpoint(u32),
        Map(u32, u64),
        Unmap(u32, u64),
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..5, 0u32..3).prop_map(|(e, d)| Op::Attach(e, d)),
            1 => (0u32..5).prop_map(Op::Detach),
            3 => (0u32..5, prop::bool::weighted(0.2)).prop_map(|(e, r)| Op::Register(e, r)),
            2 => (0usize..8).prop_map(Op::Unregister),
            1 => (0u32..5).prop_map(Op::AddEndpoint),
            3 => (0u32..3, 1u64..5).prop_map(|(d, p)| Op::Map(d, p << 12)),
            2 => (0u32..3, 0u64..6).prop_map(|(d, p)| Op::Unmap(d, p << 12)),
            1 => Just(Op::Reset),
        ]
    }

    proptest! {
        /// After any sequence of topology and notifier changes, every
        /// domain's cached targets are what collecting them afresh gives,
        /// and MAP tells exactly those.
        #[test]
        fn targets_never_go_stale(ops in prop::collection::vec(op(), 1..40)) {
            let log = Log::default();
            let mut core = Core::new(config(vec![1, 2, 3]), Some(memory()));
            let mut ids = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Attach(e, d) => { attach(&mut core, e, d); }
                    Op::Detach(e) => {
                        if let Some(d) = core.endpoints.get(&e).and_then(|ep| ep.domain) {
                            prop_assert_eq!(core.detach(request::Detach { domain: d, endpoint: e }), Status::Ok);
                        }
                    }
                    Op::Register(e, refuse) => {
                        if let Ok(id) = core.register_notifier(e, recorder(&format!("n{i}"), refuse, &log)) {
                            ids.push(id);
                        }
                    }
                    Op::Unregister(k) => {
                        if !ids.is_empty() {
                            let id = ids.remove(k % ids.len());
                            prop_assert!(core.unregister_notifier(id));
                        }
                    }
                    Op::AddEndpoint(e) => { core.add_endpoint(e); }
                    Op::Map(d, iova) => {
                        take(&log);
                        if map(&mut core, d, iova) == Status::Ok {
                            let told: Vec<String> = core.domains[&d]
                                .endpoints
                                .iter()
                                .flat_map(|&e| core.endpoints[&e].notifiers.iter().map(move |(_, n)| (e, n.name().to_string())))
                                .map(|(e, n)| format!("{n} map e{e} d{d} {iova:#x} Map"))
                                .collect();
                            prop_assert_eq!(take(&log), told);
                        }
                    }
                    Op::Unmap(d, iova) => { unmap(&mut core, d, iova, iova + 0x1fff); }
                    Op::Reset => core.detach_all(UnmapCause::Reset),
                }
                assert_targets_fresh(&core);
            }
        }
    }
}
