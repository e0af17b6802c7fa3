//! The domain model: domains, the endpoints attached to them, and the
//! notifiers each domain tells of its mappings.
//!
//! An [`Endpoint`] is a device behind the IOMMU, attached to at most one
//! [`Domain`]; a domain exists while at least one endpoint is attached to
//! it and holds the mappings its endpoints share. Each domain keeps the
//! notifiers of its endpoints as [`Target`]s — endpoints ascending, each
//! endpoint's notifiers in registration order — so that MAP and UNMAP
//! borrow them instead of collecting them (and cloning every `Arc`) per
//! request. Every change of the topology or of an endpoint's notifiers
//! keeps them in step; [`Domain::targets_fresh`] says whether they are, and
//! the device debug-asserts it before each use.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use memvisor_iommu::{IommuNotifier, NotifierId};

use crate::mapping::DomainMappings;

/// One notifier of one endpoint, as the device calls it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) endpoint: u32,
    pub(crate) notifier: Arc<dyn IommuNotifier>,
}

/// An endpoint of the topology.
pub(crate) struct Endpoint {
    /// The domain it is attached to.
    pub(crate) domain: Option<u32>,
    /// Its notifiers, in registration order.
    pub(crate) notifiers: Vec<(NotifierId, Arc<dyn IommuNotifier>)>,
    /// Whether its notifiers were last told that it bypasses translation
    /// (`IommuNotifier::notify_bypass`; false until told otherwise).
    pub(crate) bypass_told: bool,
    /// Translation faults it met.
    pub(crate) faults: u64,
}

impl Endpoint {
    /// An endpoint attached to no domain, without notifiers.
    pub(crate) fn new() -> Self {
        Self {
            domain: None,
            notifiers: Vec::new(),
            bypass_told: false,
            faults: 0,
        }
    }
}

/// A domain: its endpoints, its mappings and the notifiers to tell.
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
    pub(crate) fn span(&self, endpoint: u32) -> Range<usize> {
        let start = self.targets.partition_point(|t| t.endpoint < endpoint);
        let len = self.targets[start..].partition_point(|t| t.endpoint == endpoint);
        start..start + len
    }

    /// Adds `endpoint` (not attached here) with its `notifiers`; returns
    /// where its targets are.
    pub(crate) fn insert_endpoint(
        &mut self,
        endpoint: u32,
        notifiers: &[(NotifierId, Arc<dyn IommuNotifier>)],
    ) -> Range<usize> {
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
    pub(crate) fn remove_endpoint(&mut self, endpoint: u32) {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use memvisor_iommu::{MapEvent, MappingId, NotifierRefusal, UnmapCause, UnmapEvent};
    use memvisor_memory::map::GuestMemoryMap;
    use memvisor_memory::{Backing, RamBlock};
    use proptest::prelude::*;

    use super::*;
    use crate::device::VirtioIommu;
    use crate::effects::DeviceModel;
    use crate::mapping::MapFlags;
    use crate::options::IommuOptions;
    use crate::persist::{DomainState, EndpointState, IommuState, MappingState};
    use crate::request;
    use crate::wire::{F_MAP_UNMAP, Status};

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

    fn attach(model: &mut DeviceModel, endpoint: u32, domain: u32) -> Status {
        let a = request::Attach {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        };
        model.attach(a, ACKED)
    }

    fn map(model: &mut DeviceModel, domain: u32, iova: u64) -> Status {
        let m = request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: iova,
            flags: MapFlags::READ.bits(),
        };
        model.map(m, ACKED)
    }

    fn unmap(model: &mut DeviceModel, domain: u32, virt_start: u64, virt_end: u64) -> Status {
        let u = request::Unmap {
            domain,
            virt_start,
            virt_end,
        };
        model.unmap(u, ACKED)
    }

    /// No two live mappings of the device share a [`MappingId`].
    fn assert_ids_unique(model: &DeviceModel) {
        let mut ids: Vec<_> = model
            .domains
            .values()
            .flat_map(|d| d.mappings.iter().map(|m| m.id))
            .collect();
        let live = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), live, "duplicate mapping ids");
    }

    /// Records the IOVA and id of every event.
    #[derive(Default)]
    struct Ids(Mutex<Vec<(&'static str, u64, MappingId)>>);

    impl IommuNotifier for Ids {
        fn name(&self) -> &str {
            "ids"
        }

        fn notify_map(&self, e: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
            self.0.lock().unwrap().push(("map", e.iova, e.id));
            Ok(())
        }

        fn notify_unmap(&self, e: &UnmapEvent) {
            self.0.lock().unwrap().push(("unmap", e.iova, e.id));
        }
    }

    impl Ids {
        fn take(&self) -> Vec<(&'static str, u64, MappingId)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// Records map, unmap and bypass events in order; refuses to enter
    /// bypass while `refuse_bypass` is set.
    #[derive(Default)]
    struct Told {
        log: Mutex<Vec<String>>,
        refuse_bypass: std::sync::atomic::AtomicBool,
    }

    impl IommuNotifier for Told {
        fn name(&self) -> &str {
            "told"
        }

        fn notify_map(&self, e: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
            self.log.lock().unwrap().push(format!("map {:#x}", e.iova));
            Ok(())
        }

        fn notify_unmap(&self, e: &UnmapEvent) {
            self.log.lock().unwrap().push(format!("unmap {:#x}", e.iova));
        }

        fn notify_bypass(&self, endpoint: u32, on: bool) -> Result<(), NotifierRefusal> {
            if on && self.refuse_bypass.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(NotifierRefusal::NoResources);
            }
            self.log.lock().unwrap().push(format!("bypass e{endpoint} {on}"));
            Ok(())
        }
    }

    impl Told {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    #[test]
    fn notifiers_follow_bypass_between_the_mappings_of_domains() {
        use crate::wire::{ATTACH_F_BYPASS, F_BYPASS_CONFIG};
        let options = IommuOptions {
            bypass: false,
            ..config(vec![1, 2])
        };
        let mut model = DeviceModel::new(options, Some(memory()));
        let told = Arc::new(Told::default());
        model.register_notifier(1, told.clone()).unwrap();
        assert!(told.take().is_empty(), "unattached with bypass off: translated");
        let attach = |model: &mut DeviceModel, endpoint, domain, flags| {
            let a = request::Attach {
                domain,
                endpoint,
                flags,
                reserved: [0; 4],
            };
            model.attach(a, ACKED | F_BYPASS_CONFIG)
        };
        // Endpoint 2 keeps domain 5 alive with one mapping.
        assert_eq!(attach(&mut model, 2, 5, 0), Status::Ok);
        assert_eq!(map(&mut model, 5, 0x1000), Status::Ok);
        // An identity domain (Linux's `iommu.passthrough=1`).
        assert_eq!(attach(&mut model, 1, 0, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(told.take(), ["bypass e1 true"]);
        // To a translated domain: bypass ends before its mappings come.
        assert_eq!(attach(&mut model, 1, 5, 0), Status::Ok);
        assert_eq!(told.take(), ["bypass e1 false", "map 0x1000"]);
        // And back: the mappings go before bypass starts, with no step
        // through "unattached" in between.
        assert_eq!(attach(&mut model, 1, 0, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(told.take(), ["unmap 0x1000", "bypass e1 true"]);
        assert_eq!(model.detach(request::Detach { domain: 0, endpoint: 1 }), Status::Ok);
        assert_eq!(told.take(), ["bypass e1 false"], "unattached, bypass off");
        // The config field turns bypass on for unattached endpoints.
        model.set_bypass(true);
        assert_eq!(told.take(), ["bypass e1 true"]);
        assert_eq!(attach(&mut model, 1, 5, 0), Status::Ok);
        assert_eq!(told.take(), ["bypass e1 false", "map 0x1000"]);
        // A second notifier registered in bypass is told so, and told to
        // leave it when it goes.
        assert_eq!(attach(&mut model, 1, 0, ATTACH_F_BYPASS), Status::Ok);
        told.take();
        let second = Arc::new(Told::default());
        let id = model.register_notifier(1, second.clone()).unwrap();
        assert_eq!(second.take(), ["bypass e1 true"]);
        assert!(model.unregister_notifier(id));
        assert_eq!(second.take(), ["bypass e1 false"]);
        // A notifier that cannot follow: the ATTACH to a bypass domain is
        // refused (the endpoint stays unattached), a DETACH is logged.
        assert_eq!(attach(&mut model, 1, 5, 0), Status::Ok);
        told.take();
        told.refuse_bypass.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(attach(&mut model, 1, 0, ATTACH_F_BYPASS), Status::NoMem);
        assert_eq!(told.take(), ["unmap 0x1000"]);
        assert_eq!(model.endpoints[&1].domain, None);
        assert!(!model.endpoints[&1].bypass_told);
        told.refuse_bypass.store(false, std::sync::atomic::Ordering::Relaxed);
        model.set_bypass(true);
        assert_eq!(told.take(), ["bypass e1 true"], "told once it can follow");
    }

    #[test]
    fn mappings_are_named_by_unique_ids_that_are_reused() {
        let mut model = DeviceModel::new(config(vec![1, 2]), Some(memory()));
        let ids = Arc::new(Ids::default());
        model.register_notifier(1, ids.clone()).unwrap();
        model.register_notifier(2, ids.clone()).unwrap();
        assert_eq!(attach(&mut model, 1, 1), Status::Ok);
        assert_eq!(attach(&mut model, 2, 2), Status::Ok);
        for (domain, iova) in [(1, 0x1000), (1, 0x2000), (2, 0x1000)] {
            assert_eq!(map(&mut model, domain, iova), Status::Ok);
        }
        let (a, b, c) = (MappingId(0), MappingId(1), MappingId(2));
        assert_eq!(ids.take(), [("map", 0x1000, a), ("map", 0x2000, b), ("map", 0x1000, c)]);
        // The unmap names the mapping as its map did; the id is then free.
        assert_eq!(unmap(&mut model, 1, 0x1000, 0x1fff), Status::Ok);
        assert_eq!(map(&mut model, 2, 0x5000), Status::Ok);
        assert_eq!(ids.take(), [("unmap", 0x1000, a), ("map", 0x5000, a)]);
        // A refused MAP takes no id.
        assert_eq!(map(&mut model, 2, 0x5000), Status::Inval);
        // A domain that goes with its last endpoint frees its mappings' ids.
        let detach = request::Detach { domain: 2, endpoint: 2 };
        assert_eq!(model.detach(detach), Status::Ok);
        assert_eq!(ids.take(), [("unmap", 0x5000, a), ("unmap", 0x1000, c)]);
        assert_eq!(attach(&mut model, 2, 1), Status::Ok);
        assert_eq!(map(&mut model, 1, 0x7000), Status::Ok);
        assert_eq!(map(&mut model, 1, 0x8000), Status::Ok);
        // The replay to endpoint 2 names `b` again; the new mappings take
        // the freed ids (last freed first), each told to both endpoints.
        assert_eq!(
            ids.take(),
            [
                ("map", 0x2000, b),
                ("map", 0x7000, a),
                ("map", 0x7000, a),
                ("map", 0x8000, c),
                ("map", 0x8000, c)
            ]
        );
        assert_ids_unique(&model);
        // A reset frees every id.
        model.detach_all(UnmapCause::Reset);
        ids.take();
        assert_eq!(attach(&mut model, 1, 3), Status::Ok);
        assert_eq!(map(&mut model, 3, 0x1000), Status::Ok);
        assert_eq!(ids.take(), [("map", 0x1000, MappingId(0))]);
    }

    /// Every domain's cached targets are what collecting them afresh gives
    /// (endpoints ascending, each one's notifiers in registration order),
    /// computed here independently of [`Domain::targets_fresh`].
    fn assert_targets_fresh(model: &DeviceModel) {
        let key = |endpoint: u32, n: &Arc<dyn IommuNotifier>| (endpoint, Arc::as_ptr(n).cast::<()>());
        for (id, d) in &model.domains {
            let expected: Vec<_> = d
                .endpoints
                .iter()
                .flat_map(|&e| model.endpoints[&e].notifiers.iter().map(move |(_, n)| key(e, n)))
                .collect();
            let cached: Vec<_> = d.targets.iter().map(|t| key(t.endpoint, &t.notifier)).collect();
            assert_eq!(cached, expected, "targets of domain {id}");
        }
    }

    #[test]
    fn map_and_unmap_tell_exactly_the_notifiers_attached_now() {
        let log = Log::default();
        let mut model = DeviceModel::new(config(vec![1, 2, 3]), Some(memory()));
        model.register_notifier(1, recorder("a", false, &log)).unwrap();
        let b1 = model.register_notifier(2, recorder("b1", false, &log)).unwrap();
        model.register_notifier(3, recorder("c", false, &log)).unwrap();
        // Endpoint 2 first: endpoint 1's targets must go before its.
        assert_eq!(attach(&mut model, 2, 1), Status::Ok);
        assert_eq!(attach(&mut model, 1, 1), Status::Ok);
        model.register_notifier(2, recorder("b2", false, &log)).unwrap();
        assert_eq!(map(&mut model, 1, 0x1000), Status::Ok);
        assert_eq!(
            take(&log),
            [
                "a map e1 d1 0x1000 Map",
                "b1 map e2 d1 0x1000 Map",
                "b2 map e2 d1 0x1000 Map"
            ]
        );
        assert_eq!(attach(&mut model, 3, 2), Status::Ok);
        assert_eq!(map(&mut model, 2, 0x2000), Status::Ok);
        assert_eq!(take(&log), ["c map e3 d2 0x2000 Map"]);

        // Endpoint 2 moves to domain 2, then loses a notifier.
        assert_eq!(attach(&mut model, 2, 2), Status::Ok);
        assert_eq!(
            take(&log),
            [
                "b2 unmap e2 d1 0x1000 Detach",
                "b1 unmap e2 d1 0x1000 Detach",
                "b1 map e2 d2 0x2000 Attach",
                "b2 map e2 d2 0x2000 Attach",
            ]
        );
        assert!(model.unregister_notifier(b1));
        assert_eq!(take(&log), ["b1 unmap e2 d2 0x2000 Unregister"]);
        assert_targets_fresh(&model);

        assert_eq!(map(&mut model, 1, 0x3000), Status::Ok);
        assert_eq!(take(&log), ["a map e1 d1 0x3000 Map"]);
        assert_eq!(map(&mut model, 2, 0x4000), Status::Ok);
        assert_eq!(take(&log), ["b2 map e2 d2 0x4000 Map", "c map e3 d2 0x4000 Map"]);
        assert_eq!(unmap(&mut model, 2, 0x4000, 0x4fff), Status::Ok);
        assert_eq!(
            take(&log),
            ["c unmap e3 d2 0x4000 Unmap", "b2 unmap e2 d2 0x4000 Unmap"]
        );
        // Several mappings in one UNMAP: ascending, each to every target.
        assert_eq!(unmap(&mut model, 1, 0, 0xffff), Status::Ok);
        assert_eq!(take(&log), ["a unmap e1 d1 0x1000 Unmap", "a unmap e1 d1 0x3000 Unmap"]);
        assert_eq!(unmap(&mut model, 2, 0x2000, 0x2fff), Status::Ok);
        assert_eq!(
            take(&log),
            ["c unmap e3 d2 0x2000 Unmap", "b2 unmap e2 d2 0x2000 Unmap"]
        );

        // A hotplugged endpoint joins domain 2 between nothing and endpoint 2.
        assert!(model.add_endpoint(0));
        model.register_notifier(0, recorder("z", false, &log)).unwrap();
        assert_eq!(attach(&mut model, 0, 2), Status::Ok);
        assert_eq!(map(&mut model, 2, 0x5000), Status::Ok);
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
        assert_eq!(model.detach(detach), Status::Ok);
        assert!(!model.domains.contains_key(&1));
        assert_eq!(attach(&mut model, 3, 1), Status::Ok);
        assert_eq!(take(&log), ["c unmap e3 d2 0x5000 Detach"]);
        assert_eq!(map(&mut model, 1, 0x6000), Status::Ok);
        assert_eq!(take(&log), ["c map e3 d1 0x6000 Map"]);
        assert_targets_fresh(&model);

        // Reset: no domain, and so no target, survives.
        model.detach_all(UnmapCause::Reset);
        assert!(model.domains.is_empty());
        take(&log);
        assert_eq!(attach(&mut model, 2, 7), Status::Ok);
        assert_eq!(map(&mut model, 7, 0x7000), Status::Ok);
        assert_eq!(take(&log), ["b2 map e2 d7 0x7000 Map"]);
        assert_targets_fresh(&model);
    }

    #[test]
    fn a_refused_attach_leaves_no_target_behind() {
        let log = Log::default();
        let mut model = DeviceModel::new(config(vec![1, 2]), Some(memory()));
        model.register_notifier(1, recorder("a", false, &log)).unwrap();
        model.register_notifier(2, recorder("ok", false, &log)).unwrap();
        model.register_notifier(2, recorder("no", true, &log)).unwrap();
        assert_eq!(attach(&mut model, 1, 1), Status::Ok);
        assert_eq!(map(&mut model, 1, 0x1000), Status::Ok);
        take(&log);
        assert_eq!(attach(&mut model, 2, 1), Status::DevErr);
        assert_eq!(
            take(&log),
            ["ok map e2 d1 0x1000 Attach", "ok unmap e2 d1 0x1000 Rollback"]
        );
        assert_targets_fresh(&model);
        assert_eq!(map(&mut model, 1, 0x2000), Status::Ok);
        assert_eq!(take(&log), ["a map e1 d1 0x2000 Map"]);
        // On a domain without mappings the attach succeeds; a MAP there is
        // refused by the second target and rolled back from the first.
        assert_eq!(attach(&mut model, 2, 3), Status::Ok);
        assert_eq!(map(&mut model, 3, 0x1000), Status::DevErr);
        assert_eq!(
            take(&log),
            ["ok map e2 d3 0x1000 Map", "ok unmap e2 d3 0x1000 Rollback"]
        );
        assert!(model.domains[&3].mappings.is_empty());
        assert_targets_fresh(&model);
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
        handle.with_model(|model| {
            assert_targets_fresh(model);
            assert_ids_unique(model);
            assert_eq!(map(model, 5, 0x3000), Status::Ok);
            assert_eq!(unmap(model, 6, 0x2000, 0x2fff), Status::Ok);
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
            let mut model = DeviceModel::new(config(vec![1, 2, 3]), Some(memory()));
            let mut ids = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Attach(e, d) => { attach(&mut model, e, d); }
                    Op::Detach(e) => {
                        if let Some(d) = model.endpoints.get(&e).and_then(|ep| ep.domain) {
                            prop_assert_eq!(model.detach(request::Detach { domain: d, endpoint: e }), Status::Ok);
                        }
                    }
                    Op::Register(e, refuse) => {
                        if let Ok(id) = model.register_notifier(e, recorder(&format!("n{i}"), refuse, &log)) {
                            ids.push(id);
                        }
                    }
                    Op::Unregister(k) => {
                        if !ids.is_empty() {
                            let id = ids.remove(k % ids.len());
                            prop_assert!(model.unregister_notifier(id));
                        }
                    }
                    Op::AddEndpoint(e) => { model.add_endpoint(e); }
                    Op::Map(d, iova) => {
                        take(&log);
                        if map(&mut model, d, iova) == Status::Ok {
                            let told: Vec<String> = model.domains[&d]
                                .endpoints
                                .iter()
                                .flat_map(|&e| model.endpoints[&e].notifiers.iter().map(move |(_, n)| (e, n.name().to_string())))
                                .map(|(e, n)| format!("{n} map e{e} d{d} {iova:#x} Map"))
                                .collect();
                            prop_assert_eq!(take(&log), told);
                        }
                    }
                    Op::Unmap(d, iova) => { unmap(&mut model, d, iova, iova + 0x1fff); }
                    Op::Reset => model.detach_all(UnmapCause::Reset),
                }
                assert_targets_fresh(&model);
                assert_ids_unique(&model);
            }
        }
    }
}
