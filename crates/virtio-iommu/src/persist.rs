//! Versioned migration state: endpoints, domains and mappings.
//!
//! The memory device restores before the IOMMU (DESIGN.md rule 4), so when
//! the state is loaded the discard managers already hold the migrated
//! populated state, and every mapping replayed to a notifier is checked
//! against it exactly like a MAP request.

use std::collections::{BTreeMap, BTreeSet};

use std::io::{Read, Write};

use memvisor_memory::GuestRange;
use memvisor_vmstate::{LoadContext, Phase, Priority, Section, SectionError, decode, encode};
use serde::{Deserialize, Serialize};

use memvisor_iommu::{MapCause, UnmapCause};

use crate::domain::Domain;
use crate::effects::DeviceModel;
use crate::handle::IommuHandle;
use crate::map_target::{self, MapRefusal};
use crate::mapping::{DomainMappings, MapFlags, Mapping, MappingId};
use crate::notify::{deliver_map, unmap_to};

/// One endpoint of the topology and the domain it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Endpoint ID.
    pub id: u32,
    /// Domain it is attached to.
    pub domain: Option<u32>,
}

/// One mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingState {
    /// First IOVA.
    pub virt_start: u64,
    /// Last IOVA (inclusive).
    pub virt_end: u64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` bits.
    pub flags: u32,
}

/// One domain and its mappings, in ascending IOVA order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// Domain ID.
    pub id: u32,
    /// A bypass domain (`ATTACH_F_BYPASS`).
    pub bypass: bool,
    /// Its mappings.
    pub mappings: Vec<MappingState>,
}

/// The device's migration state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuState {
    /// The `bypass` config field.
    pub bypass: bool,
    /// Every endpoint of the source's topology.
    pub endpoints: Vec<EndpointState>,
    /// Every domain.
    pub domains: Vec<DomainState>,
}

impl IommuState {
    /// Version of this layout; bump it on any change.
    pub const VERSION: u16 = 1;
}

/// Why a state could not be loaded. The device is left with no domain
/// attached and every notifier told to unmap what it had been given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The state names an endpoint that this device's topology lacks.
    #[error("endpoint {0} of the migration state does not exist here")]
    UnknownEndpoint(u32),
    /// An endpoint or domain is listed twice.
    #[error("{what} {id} is listed twice")]
    Duplicate {
        /// `"endpoint"` or `"domain"`.
        what: &'static str,
        /// The ID.
        id: u32,
    },
    /// A domain ID outside this device's `domain_range`.
    #[error("domain {0} is outside the domain range")]
    DomainOutOfRange(u32),
    /// An endpoint attached to a domain the state does not list.
    #[error("endpoint {endpoint} is attached to domain {domain}, which the state does not list")]
    MissingDomain {
        /// The endpoint.
        endpoint: u32,
        /// The domain.
        domain: u32,
    },
    /// A domain without endpoints (it cannot exist).
    #[error("domain {0} has no endpoint attached")]
    EmptyDomain(u32),
    /// More domains or mappings than this device's limits allow.
    #[error("{what}: {count} exceeds the limit {limit}")]
    Limit {
        /// What was counted.
        what: String,
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A mapping that no MAP request could have created here.
    #[error("domain {domain}: mapping [{virt_start:#x}, {virt_end:#x}] -> {phys_start:#x} is invalid: {reason}")]
    BadMapping {
        /// The domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA.
        virt_end: u64,
        /// Guest-physical start.
        phys_start: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Replaying a mapping to the notifiers failed.
    #[error("domain {domain}: replaying mapping [{virt_start:#x}, {virt_end:#x}] -> {phys_start:#x} failed: {refusal}")]
    Refused {
        /// The domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA.
        virt_end: u64,
        /// Guest-physical start.
        phys_start: u64,
        /// Why.
        refusal: MapRefusal,
    },
}

impl IommuHandle {
    /// The migration state.
    pub fn save_state(&self) -> IommuState {
        self.with_model(|model| IommuState {
            bypass: model.bypass,
            endpoints: model
                .endpoints
                .iter()
                .map(|(&id, ep)| EndpointState { id, domain: ep.domain })
                .collect(),
            domains: model
                .domains
                .iter()
                .map(|(&id, d)| DomainState {
                    id,
                    bypass: d.bypass,
                    mappings: d
                        .mappings
                        .iter()
                        .map(|m| MappingState {
                            virt_start: m.virt_start,
                            virt_end: m.virt_end,
                            phys_start: m.phys_start,
                            flags: m.flags.bits(),
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    /// Replaces the device's domains and mappings with `state` and replays
    /// every mapping, domain by domain in ascending IOVA order, to the
    /// notifiers registered for the endpoints attached to it (checked like
    /// a MAP: RAM, populated, under the manager's read guard).
    ///
    /// The state is validated first; on any error nothing stays attached
    /// and every notifier that was given a mapping is told to unmap it.
    pub fn load_state(&self, state: &IommuState) -> Result<(), LoadError> {
        self.with_model(|model| {
            let domains = validate(model, state)?;
            model.detach_all(UnmapCause::Reset);
            model.bypass = state.bypass;
            model.domains = domains;
            // Every mapping of the device was just removed, so the restored
            // ones take fresh ids (ids are not part of the state).
            for d in model.domains.values_mut() {
                for id in d.mappings.ids_mut() {
                    *id = model
                        .ids
                        .take()
                        .expect("`validate` refuses more mappings than there are ids");
                }
            }
            for e in &state.endpoints {
                if let Some(ep) = model.endpoints.get_mut(&e.id) {
                    ep.domain = e.domain;
                }
            }
            for d in model.domains.values_mut() {
                d.rebuild_targets(&model.endpoints);
            }
            // Endpoints that bypass translation first (their notifiers map
            // all populated RAM), then every domain's mappings.
            let endpoints: Vec<u32> = model.endpoints.keys().copied().collect();
            for &endpoint in &endpoints {
                model.sync_bypass(endpoint);
            }
            let mut done: Vec<(u32, Mapping)> = Vec::new();
            let mut failure = None;
            'domains: for (&id, d) in &model.domains {
                if d.bypass {
                    continue;
                }
                if d.targets.is_empty() {
                    continue;
                }
                for m in d.mappings.iter() {
                    if let Err(refusal) = deliver_map(model.mem.as_ref(), &d.targets, id, m, MapCause::Restore) {
                        failure = Some(LoadError::Refused {
                            domain: id,
                            virt_start: m.virt_start,
                            virt_end: m.virt_end,
                            phys_start: m.phys_start,
                            refusal,
                        });
                        break 'domains;
                    }
                    done.push((id, *m));
                }
            }
            let Some(error) = failure else {
                return Ok(());
            };
            for (id, m) in done.iter().rev() {
                let targets = model.domains.get(id).map_or(&[][..], |d| &d.targets[..]);
                unmap_to(targets, *id, m, UnmapCause::Rollback);
            }
            model.domains.clear();
            model.ids.clear();
            for ep in model.endpoints.values_mut() {
                ep.domain = None;
            }
            for &endpoint in &endpoints {
                model.sync_bypass(endpoint);
            }
            log::warn!("virtio-iommu: loading state failed: {error}");
            Err(error)
        })
    }
}

/// Checks `state` against this device and builds its domains (endpoints
/// filled in).
fn validate(model: &DeviceModel, state: &IommuState) -> Result<BTreeMap<u32, Domain>, LoadError> {
    let options = &model.options;
    let mut domains = BTreeMap::new();
    if state.domains.len() > options.limits.max_domains {
        return Err(LoadError::Limit {
            what: "domains".into(),
            count: state.domains.len(),
            limit: options.limits.max_domains,
        });
    }
    let total: usize = state.domains.iter().map(|d| d.mappings.len()).sum();
    if total > u32::MAX as usize {
        return Err(LoadError::Limit {
            what: "mappings (each needs a mapping id)".into(),
            count: total,
            limit: u32::MAX as usize,
        });
    }
    for d in &state.domains {
        if !model.domain_in_range(d.id) {
            return Err(LoadError::DomainOutOfRange(d.id));
        }
        if d.mappings.len() > options.limits.max_mappings_per_domain {
            return Err(LoadError::Limit {
                what: format!("mappings of domain {}", d.id),
                count: d.mappings.len(),
                limit: options.limits.max_mappings_per_domain,
            });
        }
        let mut mappings = DomainMappings::default();
        let granule = options.granule();
        for m in &d.mappings {
            let bad = |reason| LoadError::BadMapping {
                domain: d.id,
                virt_start: m.virt_start,
                virt_end: m.virt_end,
                phys_start: m.phys_start,
                reason,
            };
            let flags = MapFlags::from_bits(m.flags).ok_or_else(|| bad("unknown flag bits"))?;
            if d.bypass {
                return Err(bad("a bypass domain has no mappings"));
            }
            if m.virt_end < m.virt_start
                || m.virt_end - m.virt_start == u64::MAX
                || m.phys_start.checked_add(m.virt_end - m.virt_start).is_none()
            {
                return Err(bad("empty or overflowing range"));
            }
            if m.virt_start < options.input_start || m.virt_end > options.input_end {
                return Err(bad("outside the input range"));
            }
            if m.virt_start % granule != 0 || m.virt_end.wrapping_add(1) % granule != 0 || m.phys_start % granule != 0 {
                return Err(bad("not aligned to the page granularity"));
            }
            if mappings.overlaps(m.virt_start, m.virt_end) {
                return Err(bad("overlaps another mapping"));
            }
            let mut mapping = Mapping {
                virt_start: m.virt_start,
                virt_end: m.virt_end,
                phys_start: m.phys_start,
                flags,
                notified: true,
                // Given once the device's own mappings are gone (`load_state`).
                id: MappingId(0),
            };
            // A target that is no longer populated (the source ran the
            // `warn` guard, or reset its memory device before its IOMMU) is
            // restored as the guest sees it, but never notified: pinning it
            // would re-populate memory the host reclaimed (rule 1).
            if matches!(
                map_target::resolve(model.mem.as_ref(), &mapping),
                Err(MapRefusal::NotPopulated(_))
            ) {
                mapping.notified = false;
            }
            mappings.insert(mapping);
        }
        // Its targets are filled in once the endpoints are attached.
        let domain = Domain::new(d.bypass, mappings);
        if domains.insert(d.id, domain).is_some() {
            return Err(LoadError::Duplicate {
                what: "domain",
                id: d.id,
            });
        }
    }
    let mut seen = BTreeSet::new();
    for e in &state.endpoints {
        if !model.endpoints.contains_key(&e.id) {
            return Err(LoadError::UnknownEndpoint(e.id));
        }
        if !seen.insert(e.id) {
            return Err(LoadError::Duplicate {
                what: "endpoint",
                id: e.id,
            });
        }
        if let Some(domain) = e.domain {
            domains
                .get_mut(&domain)
                .ok_or(LoadError::MissingDomain { endpoint: e.id, domain })?
                .endpoints
                .insert(e.id);
        }
    }
    if let Some((&id, _)) = domains.iter().find(|(_, d)| d.endpoints.is_empty()) {
        return Err(LoadError::EmptyDomain(id));
    }
    Ok(domains)
}

/// Name of the virtio-iommu sections.
pub const VIRTIO_IOMMU_SECTION: &str = "virtio-iommu";

/// The migration section of one virtio-iommu device ([`IommuState`]).
///
/// Device phase, [`Priority::IOMMU`]. On load it first checks, for every
/// mapping onto RAM, that the discard manager of the region it targets and
/// that region's contents were restored (the memory device and RAM come
/// first, DESIGN.md rule 4): a stream in the wrong order fails naming the
/// missing section. Loading replays the mappings to the notifiers
/// registered for their endpoints.
#[derive(Debug)]
pub struct VirtioIommuSection {
    instance: u32,
    handle: IommuHandle,
}

impl VirtioIommuSection {
    /// The section of the device behind `handle`, instance `instance`. The
    /// device needs its memory map ([`IommuHandle::set_memory`]) to load.
    pub fn new(instance: u32, handle: IommuHandle) -> Self {
        Self { instance, handle }
    }
}

impl Section for VirtioIommuSection {
    fn name(&self) -> &str {
        VIRTIO_IOMMU_SECTION
    }

    fn instance(&self) -> u32 {
        self.instance
    }

    fn version(&self) -> u16 {
        IommuState::VERSION
    }

    fn priority(&self) -> Priority {
        Priority::IOMMU
    }

    fn phase(&self) -> Phase {
        Phase::Device
    }

    fn max_payload(&self) -> u64 {
        // 1024 domains of 2^18 mappings of at most 36 bytes would be 9 GiB;
        // no real guest comes close. 256 MiB is ~7.5 M mappings.
        256 << 20
    }

    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        encode(&self.handle.save_state(), out)
    }

    fn load(&mut self, ctx: &LoadContext, _version: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
        let state: IommuState = decode(payload)?;
        let id = self.id();
        for domain in state.domains.iter().filter(|d| !d.bypass) {
            for m in &domain.mappings {
                if MapFlags::from_bits(m.flags).is_none_or(|f| f.mmio()) {
                    continue; // MMIO is never pinned; bad flags are refused by the device.
                }
                let Some(range) = m
                    .virt_end
                    .checked_sub(m.virt_start)
                    .and_then(|d| d.checked_add(1))
                    .and_then(|size| GuestRange::new(m.phys_start, size))
                else {
                    continue; // refused by the device's own validation
                };
                let why = format!(
                    "domain {} maps iova [{:#x}, {:#x}] onto it",
                    domain.id, m.virt_start, m.virt_end
                );
                ctx.require_manager(&id, range, &why)?;
                ctx.require_ram(&id, range, &why)?;
            }
        }
        self.handle.load_state(&state).map_err(SectionError::device)
    }
}
