//! Notifier dispatch: who is told of a mapping, in which order, and how a
//! refusal is undone; registering and unregistering notifiers.
//!
//! * [`deliver_map`]: a mapping becomes visible to targets (a domain's,
//!   see [`crate::domain`]), in their order, all or nothing — once one
//!   refuses, the targets told before are told to unmap it again
//!   ([`UnmapCause::Rollback`]), last first. Its target is checked first,
//!   in [`crate::map_target`], and every notification happens under the
//!   discard manager's read guard that check took.
//! * [`unmap_to`]: a mapping goes away; the targets are told last first.
//! * [`replay`]: a domain's mappings, ascending, to an endpoint that joins
//!   the domain (ATTACH) or a notifier that registers; all or nothing.
//! * [`DeviceModel::register_notifier`] and
//!   [`DeviceModel::unregister_notifier`]: a notifier is replayed what its
//!   endpoint sees when it registers, and told to unmap it when it leaves.
//! * [`DeviceModel::sync_bypass`]: an endpoint's notifiers are told when
//!   its accesses start or stop bypassing translation (a bypass domain, or
//!   no domain while the `bypass` config field is on).
//!
//! # Locking
//!
//! Everything here runs with the device lock held. The lock order is
//! *IOMMU device → discard manager (read) → notifier's own locks*; see the
//! `memvisor-iommu` contract.

use std::sync::Arc;

use memvisor_iommu::{IommuNotifier, MapCause, MapEvent, NotifierId, UnmapCause, UnmapEvent};
use memvisor_memory::discard::PopulatedView;
use memvisor_memory::map::{GuestMemoryMap, HostRange};

use crate::device::NAME;
use crate::domain::Target;
use crate::effects::DeviceModel;
use crate::map_target::{self, MapRefusal, MapTarget};
use crate::mapping::{DomainMappings, Mapping};

/// Errors of [`IommuHandle::register_notifier`](crate::IommuHandle::register_notifier).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The endpoint is not part of the topology.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(u32),
    /// The endpoint bypasses translation and the notifier refused to
    /// follow it; nothing is registered.
    #[error("endpoint {endpoint} bypasses translation: {refusal}")]
    Bypass {
        /// The endpoint.
        endpoint: u32,
        /// Why.
        refusal: MapRefusal,
    },
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

fn unmap_event(endpoint: u32, domain: u32, m: &Mapping, cause: UnmapCause) -> UnmapEvent {
    UnmapEvent {
        endpoint,
        domain,
        id: m.id,
        iova: m.virt_start,
        size: m.size(),
        phys: m.phys_start,
        flags: m.flags,
        cause,
    }
}

/// Tells every target that `m` is gone, last target first (none, for a
/// mapping they were never told of: [`Mapping::notified`]).
pub(crate) fn unmap_to(targets: &[Target], domain: u32, m: &Mapping, cause: UnmapCause) {
    if !m.notified || targets.is_empty() {
        return;
    }
    // One event, its endpoint set per target.
    let mut event = unmap_event(0, domain, m, cause);
    for t in targets.iter().rev() {
        event.endpoint = t.endpoint;
        t.notifier.notify_unmap(&event);
    }
}

/// Checks that `m` may be made visible ([`map_target::resolve`]) and tells
/// every target, all or nothing (DESIGN.md rule 3: the populated check and
/// the notifications happen under one read guard of the discard manager).
/// A mapping restored unnotified ([`Mapping::notified`]) stays so: it is
/// never replayed.
pub(crate) fn deliver_map(
    mem: Option<&GuestMemoryMap>,
    targets: &[Target],
    domain: u32,
    m: &Mapping,
    cause: MapCause,
) -> Result<(), MapRefusal> {
    if !m.notified {
        return Ok(());
    }
    match map_target::resolve(mem, m)? {
        MapTarget::Mmio => notify_all(targets, domain, m, cause, None, None),
        // `populated`, the manager's read guard, lives until every target
        // was told.
        MapTarget::Ram { host, populated } => notify_all(targets, domain, m, cause, Some(host), populated.as_ref()),
    }
}

fn notify_all<'a>(
    targets: &[Target],
    domain: u32,
    m: &Mapping,
    cause: MapCause,
    host: Option<HostRange<'a>>,
    populated: Option<&'a PopulatedView<'a>>,
) -> Result<(), MapRefusal> {
    if targets.is_empty() {
        return Ok(());
    }
    // One event, its endpoint set per target.
    let mut event = MapEvent {
        endpoint: 0,
        domain,
        id: m.id,
        iova: m.virt_start,
        size: m.size(),
        phys: m.phys_start,
        flags: m.flags,
        cause,
        host,
        populated,
    };
    for (i, t) in targets.iter().enumerate() {
        event.endpoint = t.endpoint;
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
pub(crate) fn replay(
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

impl DeviceModel {
    /// Whether `endpoint`'s accesses bypass translation now: it is attached
    /// to a bypass domain, or to none while `bypass` is on.
    pub(crate) fn bypasses(&self, endpoint: u32) -> bool {
        match self.endpoints.get(&endpoint).and_then(|ep| ep.domain) {
            Some(d) => self.domains.get(&d).is_some_and(|d| d.bypass),
            None => self.bypass,
        }
    }

    /// Tells `endpoint`'s notifiers, in registration order, that it
    /// bypasses translation (`on`) or no longer does, unless they were told
    /// so last. Entering bypass is all or nothing: if a notifier refuses,
    /// the ones told before are told to leave it again and the endpoint
    /// stays as its notifiers knew it.
    pub(crate) fn tell_bypass(&mut self, endpoint: u32, on: bool) -> Result<(), MapRefusal> {
        let Some(ep) = self.endpoints.get_mut(&endpoint) else {
            return Ok(());
        };
        if ep.bypass_told == on {
            return Ok(());
        }
        for (i, (_, n)) in ep.notifiers.iter().enumerate() {
            if let Err(refusal) = n.notify_bypass(endpoint, on) {
                for (_, done) in ep.notifiers[..i].iter().rev() {
                    let _ = done.notify_bypass(endpoint, false);
                }
                return Err(MapRefusal::Notifier {
                    notifier: n.name().to_string(),
                    endpoint,
                    refusal,
                });
            }
        }
        ep.bypass_told = on;
        Ok(())
    }

    /// [`tell_bypass`](Self::tell_bypass) of what `endpoint` does now, where
    /// nothing can fail: a refusal to enter bypass is logged (the endpoint
    /// then reaches nothing until it is attached elsewhere).
    pub(crate) fn sync_bypass(&mut self, endpoint: u32) {
        let on = self.bypasses(endpoint);
        if let Err(refusal) = self.tell_bypass(endpoint, on) {
            log::warn!("{NAME}: endpoint {endpoint} bypasses translation, but {refusal}");
        }
    }

    /// Sets the `bypass` config field, telling every unattached endpoint
    /// whose state changes.
    pub(crate) fn set_bypass(&mut self, on: bool) {
        self.bypass = on;
        let unattached: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, ep)| ep.domain.is_none())
            .map(|(&id, _)| id)
            .collect();
        for endpoint in unattached {
            self.sync_bypass(endpoint);
        }
    }

    /// Registers `notifier` for `endpoint`, after replaying to it the
    /// mappings the endpoint sees now ([`MapCause::Register`]); a refused
    /// replay registers nothing.
    pub(crate) fn register_notifier(
        &mut self,
        endpoint: u32,
        notifier: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierId, NotifierError> {
        let ep = self
            .endpoints
            .get_mut(&endpoint)
            .ok_or(NotifierError::UnknownEndpoint(endpoint))?;
        if ep.bypass_told
            && let Err(refusal) = notifier.notify_bypass(endpoint, true)
        {
            return Err(NotifierError::Bypass {
                endpoint,
                refusal: MapRefusal::Notifier {
                    notifier: notifier.name().to_string(),
                    endpoint,
                    refusal,
                },
            });
        }
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

    /// Unregisters notifier `id`, telling it to unmap every mapping it sees
    /// now (last first, [`UnmapCause::Unregister`]). `false` for an
    /// unknown id.
    pub(crate) fn unregister_notifier(&mut self, id: NotifierId) -> bool {
        let Some((endpoint, pos)) = self
            .endpoints
            .iter()
            .find_map(|(&e, ep)| ep.notifiers.iter().position(|(n, _)| *n == id).map(|p| (e, p)))
        else {
            return false;
        };
        let ep = self.endpoints.get_mut(&endpoint).expect("found above");
        let (_, notifier) = ep.notifiers.remove(pos);
        if ep.bypass_told {
            let _ = notifier.notify_bypass(endpoint, false);
        }
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
