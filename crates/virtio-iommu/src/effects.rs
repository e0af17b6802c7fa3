//! Effects: ATTACH, DETACH, MAP, UNMAP and PROBE applied to the
//! [`DeviceModel`] — the endpoints, domains and mappings — answered with a
//! virtio status, and the resets that detach everything.
//!
//! Each request is validated in the order the specification lists its
//! conditions; what it changes is then told to the notifiers
//! (`notify.rs`), and a MAP's target is checked first (`map_target.rs`).
//!
//! # Locking
//!
//! The model lives behind the device lock (`handle.rs`). The lock order is
//! *IOMMU device → discard manager (read) → notifier's own locks*; see the
//! `memvisor-iommu` contract.

use std::collections::BTreeMap;

use memvisor_iommu::{MapCause, UnmapCause};
use memvisor_memory::map::GuestMemoryMap;
use memvisor_virtio::queue::{Malformed, RequestChain, Response};

use crate::device::NAME;
use crate::domain::{Domain, Endpoint};
use crate::fault::RateLimit;
use crate::mapping::{DomainMappings, MapFlags, Mapping, MappingIds};
use crate::notify::{deliver_map, replay, unmap_to};
use crate::options::IommuOptions;
use crate::request::{self, Request};
use crate::wire::{
    self, ATTACH_F_BYPASS, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, RESV_MEM_PROPERTY_SIZE, Status, TAIL_SIZE,
};

/// The device model without its transport side: the topology (endpoints
/// and domains), every domain's mappings and notifier targets, the
/// `bypass` config field, the guest memory map that MAP targets and
/// translations are checked against, and the fault counters.
pub(crate) struct DeviceModel {
    pub(crate) options: IommuOptions,
    pub(crate) bypass: bool,
    pub(crate) endpoints: BTreeMap<u32, Endpoint>,
    pub(crate) domains: BTreeMap<u32, Domain>,
    /// The ids of the live mappings of every domain ([`Mapping::id`]).
    pub(crate) ids: MappingIds,
    pub(crate) mem: Option<GuestMemoryMap>,
    /// The id the next registered notifier gets.
    pub(crate) next_notifier: u64,
    /// Fault reports dropped for want of an event buffer.
    pub(crate) dropped_faults: u64,
    /// Faults met, reported or dropped.
    pub(crate) faults: u64,
    /// Who is sent every fault ([`IommuHandle::subscribe_faults`](crate::IommuHandle::subscribe_faults)).
    pub(crate) fault_subscribers: Vec<std::sync::mpsc::Sender<crate::fault::Fault>>,
    /// Rate limit of the warnings about dropped fault reports.
    pub(crate) fault_log: RateLimit,
}

impl DeviceModel {
    /// The model of a device with `options`, before any request.
    pub(crate) fn new(options: IommuOptions, mem: Option<GuestMemoryMap>) -> Self {
        let endpoints = options.endpoints.iter().map(|&id| (id, Endpoint::new())).collect();
        Self {
            bypass: options.bypass,
            options,
            endpoints,
            domains: BTreeMap::new(),
            ids: MappingIds::default(),
            mem,
            next_notifier: 1,
            dropped_faults: 0,
            faults: 0,
            fault_subscribers: Vec::new(),
            fault_log: RateLimit::default(),
        }
    }

    pub(crate) fn domain_in_range(&self, domain: u32) -> bool {
        (self.options.domain_start..=self.options.domain_end).contains(&domain)
    }

    /// Detaches `endpoint` from `domain` (it is attached there), unmapping
    /// the domain's mappings from its notifiers, who then learn whether it
    /// bypasses translation unattached; the domain ceases to exist with its
    /// last endpoint.
    fn detach_endpoint(&mut self, endpoint: u32, domain: u32, cause: UnmapCause) {
        self.leave_domain(endpoint, domain, cause);
        self.sync_bypass(endpoint);
    }

    /// [`detach_endpoint`](Self::detach_endpoint) without telling the
    /// notifiers about bypass: a re-attach tells them about the new domain
    /// instead, so that they do not enter bypass in between.
    fn leave_domain(&mut self, endpoint: u32, domain: u32, cause: UnmapCause) {
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
            self.remove_domain(domain);
        }
        if let Some(ep) = self.endpoints.get_mut(&endpoint) {
            ep.domain = None;
        }
    }

    /// Removes `domain` (its last endpoint has left), freeing the ids of
    /// its mappings.
    fn remove_domain(&mut self, domain: u32) {
        if let Some(d) = self.domains.remove(&domain) {
            for m in d.mappings.iter() {
                self.ids.give(m.id);
            }
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
        self.ids.clear();
    }

    /// Parses and applies one request of the request queue; `acked` are
    /// the features the driver accepted.
    pub(crate) fn handle(&mut self, chain: &RequestChain, acked: u64) -> Result<Response, Malformed> {
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

    /// ATTACH: the endpoint leaves its domain (if any) and joins
    /// `a.domain`, created if needed; the domain's mappings are replayed
    /// to the endpoint's notifiers, all or nothing.
    pub(crate) fn attach(&mut self, a: request::Attach, acked: u64) -> Status {
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
            self.leave_domain(a.endpoint, old, UnmapCause::Detach);
        }
        // The notifiers learn whether the new domain bypasses translation
        // before its mappings are replayed to them.
        if let Err(refusal) = self.tell_bypass(a.endpoint, bypass) {
            log::warn!(
                "{NAME}: attach of endpoint {} to bypass domain {} refused: {refusal}",
                a.endpoint,
                a.domain
            );
            // Left unattached.
            self.sync_bypass(a.endpoint);
            return refusal.status();
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
                self.remove_domain(a.domain);
            }
            // Left unattached.
            self.sync_bypass(a.endpoint);
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

    /// DETACH: the endpoint leaves `d.domain`, its notifiers told to unmap
    /// the domain's mappings.
    pub(crate) fn detach(&mut self, d: request::Detach) -> Status {
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

    /// MAP: validated, its target checked and every notifier of the domain
    /// told (all or nothing), then recorded.
    pub(crate) fn map(&mut self, m: request::Map, acked: u64) -> Status {
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
        let Some(id) = self.ids.take() else {
            return Status::NoMem;
        };
        let mapping = Mapping {
            virt_start: m.virt_start,
            virt_end: m.virt_end,
            phys_start: m.phys_start,
            flags,
            notified: true,
            id,
        };
        debug_assert!(domain.targets_fresh(&self.endpoints));
        if let Err(refusal) = deliver_map(self.mem.as_ref(), &domain.targets, m.domain, &mapping, MapCause::Map) {
            self.ids.give(id);
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

    /// UNMAP: every mapping inside the range is removed and its removal
    /// told; a mapping the range would split fails it.
    pub(crate) fn unmap(&mut self, u: request::Unmap, acked: u64) -> Status {
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
            self.ids.give(m.id);
            return Status::Ok;
        }
        if domain.mappings.check_unmap(u.virt_start, u.virt_end).is_err() {
            return Status::Range;
        }
        // Each covered mapping in ascending order: removed, then notified.
        while let Some(m) = domain.mappings.remove_first_in(u.virt_start, u.virt_end) {
            unmap_to(&domain.targets, u.domain, &m, UnmapCause::Unmap);
            self.ids.give(m.id);
        }
        Status::Ok
    }

    /// PROBE: the reserved regions as RESV_MEM properties, zero-filled to
    /// `probe_size`, then the tail; `writable` is the response's size.
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

    /// Adds `endpoint` to the topology (hotplug); `false` if it exists.
    pub(crate) fn add_endpoint(&mut self, endpoint: u32) -> bool {
        if self.endpoints.contains_key(&endpoint) {
            return false;
        }
        // Attached to no domain and without notifiers: no domain's targets
        // change.
        self.endpoints.insert(endpoint, Endpoint::new());
        true
    }
}
