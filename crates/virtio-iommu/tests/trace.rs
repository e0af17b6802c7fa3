//! Replays a recorded virtio-iommu trace (devtrace v1, see
//! `/work/shared/traces/FORMAT.md`) through the request queue and compares
//! every answer with the recording. A small reader lives here until the
//! shared replay engine (crates/devtrace) takes over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use memvisor_memory::map::GuestMemoryMap;
use memvisor_memory::{Backing, RamBlock};
use memvisor_virtio::VirtioDevice;
use memvisor_virtio::driver::{Buf, DriverQueue};
use memvisor_virtio::interrupt::EventFdInterrupt;
use memvisor_virtio_iommu::options::X86_MSI_WINDOW;
use memvisor_virtio_iommu::request::{Attach, Detach, Map, Probe, Unmap};
use memvisor_virtio_iommu::{
    IommuOptions, IommuNotifier, MapEvent, NotifierRefusal, Request, ReservedKind, ReservedRegion, Status, UnmapEvent, VirtioIommu, wire,
};
use serde_json::Value;
use vm_memory::GuestAddress;

const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/viommu-dma-strict.jsonl");

fn field(line: usize, v: &Value, name: &str) -> u64 {
    v.get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("trace line {line}: missing or non-integer field `{name}`"))
}

fn field32(line: usize, v: &Value, name: &str) -> u32 {
    u32::try_from(field(line, v, name)).unwrap_or_else(|_| panic!("trace line {line}: `{name}` exceeds 32 bits"))
}

/// One parsed trace event.
struct Event {
    line: usize,
    request: Option<Request>,
    system_reset: bool,
    resp: Option<String>,
}

/// The header's virtio-iommu device and RAM, and the events.
struct Trace {
    ram: Vec<(u64, u64)>,
    config: IommuOptions,
    events: Vec<Event>,
}

fn read_trace(text: &str) -> Trace {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let (_, header) = lines.next().expect("trace line 1: missing header");
    let header: Value = serde_json::from_str(header).unwrap_or_else(|e| panic!("trace line 1: {e}"));
    assert_eq!(header["format"], "devtrace", "trace line 1: not a devtrace");
    assert_eq!(header["version"], 1, "trace line 1: unknown version");
    let ram = header["ram"]
        .as_array()
        .map(|a| a.iter().map(|r| (field(1, r, "addr"), field(1, r, "size"))).collect())
        .unwrap_or_default();
    let devices = header["devices"].as_array().expect("trace line 1: no devices");
    let dev = devices
        .iter()
        .find(|d| d["device"] == "virtio-iommu")
        .expect("trace line 1: no virtio-iommu device");
    let id = dev["id"].as_str().expect("trace line 1: device without id").to_string();
    let mut config = IommuOptions {
        page_size_mask: field(1, dev, "page_size_mask"),
        input_start: field(1, dev, "input_start"),
        input_end: field(1, dev, "input_end"),
        domain_start: field32(1, dev, "domain_start"),
        domain_end: field32(1, dev, "domain_end"),
        bypass: dev["bypass"].as_bool().expect("trace line 1: `bypass`"),
        ..IommuOptions::default()
    };
    if let Some(regions) = dev.get("reserved_regions").and_then(Value::as_array) {
        config.reserved_regions = regions
            .iter()
            .map(|r| ReservedRegion {
                start: field(1, r, "start"),
                end: field(1, r, "end"),
                kind: match field(1, r, "subtype") {
                    1 => ReservedKind::Msi,
                    _ => ReservedKind::Reserved,
                },
            })
            .collect();
    } else {
        // Not recorded: QEMU's x86 default, the MSI doorbell window.
        config.reserved_regions = vec![X86_MSI_WINDOW];
    }
    let listed: Option<Vec<u32>> = dev.get("endpoints").and_then(Value::as_array).map(|a| {
        a.iter()
            .map(|e| u32::try_from(e.as_u64().expect("trace line 1: endpoint id")).unwrap())
            .collect()
    });

    let mut events = Vec::new();
    let mut named = BTreeSet::new();
    for (line, text) in lines {
        if text.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("trace line {line}: {e}"));
        let dev_id = v["dev"]
            .as_str()
            .unwrap_or_else(|| panic!("trace line {line}: missing `dev`"));
        if !devices.iter().any(|d| d["id"] == dev_id) {
            panic!("trace line {line}: unknown device id `{dev_id}`");
        }
        if dev_id != id {
            continue;
        }
        let op = v["op"]
            .as_str()
            .unwrap_or_else(|| panic!("trace line {line}: missing `op`"));
        let request = match op {
            "attach" => Some(Request::Attach(Attach {
                domain: field32(line, &v, "domain"),
                endpoint: field32(line, &v, "endpoint"),
                flags: v.get("flags").map_or(0, |_| field32(line, &v, "flags")),
                reserved: [0; 4],
            })),
            "detach" => Some(Request::Detach(Detach {
                domain: field32(line, &v, "domain"),
                endpoint: field32(line, &v, "endpoint"),
            })),
            "map" => Some(Request::Map(Map {
                domain: field32(line, &v, "domain"),
                virt_start: field(line, &v, "virt_start"),
                virt_end: field(line, &v, "virt_end"),
                phys_start: field(line, &v, "phys_start"),
                flags: field32(line, &v, "flags"),
            })),
            "unmap" => Some(Request::Unmap(Unmap {
                domain: field32(line, &v, "domain"),
                virt_start: field(line, &v, "virt_start"),
                virt_end: field(line, &v, "virt_end"),
            })),
            "probe" => Some(Request::Probe(Probe {
                endpoint: field32(line, &v, "endpoint"),
            })),
            "system_reset" => None,
            other => panic!("trace line {line}: unknown virtio-iommu op `{other}`"),
        };
        if let Some(Request::Attach(Attach { endpoint, .. }) | Request::Detach(Detach { endpoint, .. })) = request {
            named.insert(endpoint);
        }
        if let Some(Request::Probe(Probe { endpoint })) = request {
            named.insert(endpoint);
        }
        events.push(Event {
            line,
            request,
            system_reset: op == "system_reset",
            resp: v.get("resp").map(|r| {
                r.as_str()
                    .unwrap_or_else(|| panic!("trace line {line}: `resp` is not a string"))
                    .to_string()
            }),
        });
    }
    config.endpoints = listed.unwrap_or_else(|| named.into_iter().collect());
    Trace { ram, config, events }
}

/// Tracks what a DMA consumer of the endpoint would hold.
#[derive(Default)]
struct Live {
    maps: Mutex<BTreeMap<u64, u64>>,
    total: Mutex<(usize, usize)>,
}

impl IommuNotifier for Live {
    fn name(&self) -> &str {
        "live"
    }
    fn notify_map(&self, ev: &MapEvent<'_>) -> Result<(), NotifierRefusal> {
        assert!(ev.host.is_some(), "the trace maps only RAM");
        assert!(self.maps.lock().unwrap().insert(ev.iova, ev.size).is_none());
        self.total.lock().unwrap().0 += 1;
        Ok(())
    }
    fn notify_unmap(&self, ev: &UnmapEvent) {
        assert_eq!(self.maps.lock().unwrap().remove(&ev.iova), Some(ev.size));
        self.total.lock().unwrap().1 += 1;
    }
}

#[test]
fn viommu_dma_strict_trace_replays_with_the_recorded_answers() {
    let trace = read_trace(&std::fs::read_to_string(TRACE).unwrap());
    assert!(!trace.ram.is_empty(), "the trace gives boot RAM");

    // Boot RAM from the header, backed by NORESERVE memfds: untouched pages cost nothing.
    let mut builder = GuestMemoryMap::builder();
    for (i, &(addr, size)) in trace.ram.iter().enumerate() {
        let block = Arc::new(RamBlock::new(&format!("ram{i}"), size, Backing::Memfd).unwrap());
        builder = builder.ram(addr, block).unwrap();
    }
    let mem = builder.build().unwrap();
    let base = trace.ram[0].0;

    let endpoints = trace.config.endpoints.clone();
    let probe_size = trace.config.probe_size;
    let mut dev = VirtioIommu::new(trace.config, None).unwrap();
    dev.ack_features(dev.avail_features());
    let mut requests = DriverQueue::new(&mem, GuestAddress(base), 64, 64 * 1024).unwrap();
    let events = DriverQueue::new(&mem, GuestAddress(base + 0x10_0000), 16, 4096).unwrap();
    dev.activate(
        mem.clone(),
        Arc::new(EventFdInterrupt::new(2).unwrap()),
        vec![requests.device_queue(), events.device_queue()],
    )
    .unwrap();
    let handle = dev.handle();
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
        if event.system_reset {
            handle.system_reset();
            continue;
        }
        let request = event.request.expect("a request");
        let out = match request {
            Request::Probe(_) => probe_size + 4,
            _ => 4,
        };
        requests.add(&[Buf::In(&request.to_bytes()), Buf::Out(out)]).unwrap();
        dev.queue_notify(wire::REQUEST_QUEUE);
        let used = requests
            .pop_used()
            .unwrap_or_else(|| panic!("trace line {}: {request:?} was not answered", event.line));
        assert_eq!(used.len, out, "trace line {}: used length", event.line);
        let status = Status::from_u8(used.data[used.data.len() - 4]).unwrap();
        if let Some(resp) = &event.resp {
            assert_eq!(status.name(), resp, "trace line {}: {request:?}", event.line);
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
    assert!(!dev.needs_reset());
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
fn the_reader_names_the_line_of_a_bad_event() {
    let header = std::fs::read_to_string(TRACE)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let bad = format!("{header}\n{{\"dev\":\"viommu0\",\"op\":\"map\",\"domain\":0}}\n");
    let Err(err) = std::panic::catch_unwind(|| read_trace(&bad)) else {
        panic!("a map without virt_start was accepted");
    };
    let message = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("trace line 2") && message.contains("virt_start"),
        "{message}"
    );
    let unknown = format!("{header}\n{{\"dev\":\"nope\",\"op\":\"probe\",\"endpoint\":16}}\n");
    assert!(std::panic::catch_unwind(|| read_trace(&unknown)).is_err());
}
