//! The recorded virtio-iommu trace (`viommu-dma-strict`) seen from the
//! device's consumers: a live notifier on every endpoint must hold exactly
//! what the device holds, every request of the recording must succeed, and
//! the reader must name the line of a bad virtio-iommu event. (What
//! `tests/replay.rs` checks — the recorded answers, the request counts,
//! pinning, migration — is not repeated here.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use memvisor_devtrace::machine::iommu_request;
use memvisor_devtrace::{Device, Op, ReplayMachine, ReplayMachineOptions, Trace, builtin};
use memvisor_guest::Answer;
use memvisor_virtio::VirtioDevice;
use memvisor_virtio_iommu::{IommuNotifier, MapEvent, NotifierRefusal, Request, Status, UnmapEvent};

fn strict_trace() -> Trace {
    Trace::parse("viommu-dma-strict.jsonl", builtin::VIOMMU_DMA_STRICT).unwrap()
}

/// Tracks what a DMA consumer of the endpoint would hold.
#[derive(Default)]
struct Live {
    /// Live mappings: IOVA → bytes.
    maps: Mutex<BTreeMap<u64, u64>>,
    /// Maps and unmaps told, in total.
    total: Mutex<(usize, usize)>,
}

impl IommuNotifier for Live {
    fn name(&self) -> &str {
        "live"
    }

    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        assert!(ev.host.is_some(), "the trace maps only RAM");
        assert!(
            self.maps.lock().unwrap().insert(ev.iova, ev.size).is_none(),
            "IOVA {:#x} mapped twice",
            ev.iova
        );
        self.total.lock().unwrap().0 += 1;
        Ok(())
    }

    fn notify_unmap(&self, ev: &UnmapEvent) {
        assert_eq!(
            self.maps.lock().unwrap().remove(&ev.iova),
            Some(ev.size),
            "unmap of IOVA {:#x} that is not mapped with that size",
            ev.iova
        );
        self.total.lock().unwrap().1 += 1;
    }
}

/// The recorded answer of a virtio-iommu op.
fn recorded(op: &Op) -> Option<Status> {
    match *op {
        Op::Attach { resp, .. }
        | Op::Detach { resp, .. }
        | Op::Map { resp, .. }
        | Op::Unmap { resp, .. }
        | Op::Probe { resp, .. } => resp,
        _ => None,
    }
}

#[test]
fn viommu_dma_strict_trace_keeps_a_live_notifier_in_step_with_the_device() {
    let trace = strict_trace();
    assert!(!trace.header.ram.is_empty(), "the trace gives boot RAM");
    let endpoints = match trace.header.devices.as_slice() {
        [Device::Iommu(d)] => d.endpoints.clone(),
        other => panic!("expected one virtio-iommu device, got {other:?}"),
    };
    assert!(!endpoints.is_empty());

    // No assigned device: the live notifiers are the only consumers.
    let options = ReplayMachineOptions {
        dma: None,
        ..ReplayMachineOptions::default()
    };
    let mut machine = ReplayMachine::new(&trace.header, &options).unwrap();
    let handle = machine.machine().iommu().expect("a virtio-iommu").handle.clone();
    let live: Vec<Arc<Live>> = endpoints
        .iter()
        .map(|&e| {
            let l = Arc::new(Live::default());
            handle.register_notifier(e, l.clone()).unwrap();
            l
        })
        .collect();

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &trace.events {
        if event.op == Op::SystemReset {
            machine.system_reset().unwrap();
            continue;
        }
        let request = iommu_request(&event.op)
            .unwrap_or_else(|| panic!("trace line {}: {} is not a virtio-iommu request", event.line, event.op));
        let status = match machine.iommu_request(request).unwrap() {
            Answer::Answered(status) => status,
            Answer::NoAnswer => panic!("trace line {}: {request:?} was not answered", event.line),
        };
        if let Some(resp) = recorded(&event.op) {
            assert_eq!(status, resp, "trace line {}: {request:?}", event.line);
        }
        assert_eq!(status, Status::Ok, "trace line {}: {request:?}", event.line);
        *counts
            .entry(match request {
                Request::Attach(_) => "attach",
                Request::Detach(_) => "detach",
                Request::Map(_) => "map",
                Request::Unmap(_) => "unmap",
                Request::Probe(_) => "probe",
            })
            .or_default() += 1;
    }
    let iommu = machine.machine().iommu().expect("a virtio-iommu");
    assert!(!iommu.device.needs_reset());
    assert_eq!(counts.get("map"), Some(&3886));
    assert_eq!(counts.get("unmap"), Some(&3884));

    // What the notifier holds is exactly what the device holds.
    for (&endpoint, live) in endpoints.iter().zip(&live) {
        let held: Vec<(u64, u64)> = live.maps.lock().unwrap().iter().map(|(&s, &n)| (s, n)).collect();
        let device: Vec<(u64, u64)> = handle
            .endpoint_domain(endpoint)
            .and_then(|d| handle.mappings(d))
            .unwrap_or_default()
            .iter()
            .map(|m| (m.virt_start, m.size()))
            .collect();
        assert_eq!(held, device, "endpoint {endpoint}");
        let (maps, unmaps) = *live.total.lock().unwrap();
        assert_eq!((maps, unmaps), (3886, 3884), "endpoint {endpoint}");
    }
}

#[test]
fn the_reader_names_the_line_of_a_bad_virtio_iommu_event() {
    let header = builtin::VIOMMU_DMA_STRICT.lines().next().unwrap();
    let bad = format!("{header}\n{{\"dev\":\"viommu0\",\"op\":\"map\",\"domain\":0}}\n");
    let err = Trace::parse("bad.jsonl", &bad).expect_err("a map without virt_start was accepted");
    assert_eq!(err.line(), Some(2), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("line 2") && message.contains("virt_start"),
        "{message}"
    );
    let unknown = format!("{header}\n{{\"dev\":\"nope\",\"op\":\"probe\",\"endpoint\":16}}\n");
    let err = Trace::parse("unknown.jsonl", &unknown).expect_err("an event of an unknown device was accepted");
    assert_eq!(err.line(), Some(2), "{err}");
}
