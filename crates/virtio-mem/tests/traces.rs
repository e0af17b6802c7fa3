//! Replays the recorded virtio-mem traces (QEMU 7.2 + Linux 6.12, see
//! `../shared/traces/FORMAT.md`) against the device through its queue and
//! asserts every recorded answer and value.
//!
//! The reader here is deliberately small; the shared replay engine of the
//! devtrace crate will replace it.

mod common;

use std::path::Path;

use common::*;
use memvisor_virtio_mem::VirtioMemOptions;
use memvisor_virtio_mem::wire::{VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG};
use serde_json::Value;

/// The virtio-mem device of a trace header.
#[derive(Debug)]
struct DeviceHeader {
    id: String,
    addr: u64,
    region_size: u64,
    block_size: u64,
    requested_size: u64,
    unplugged_inaccessible: bool,
}

/// One event, with the line it came from.
#[derive(Debug)]
enum Event {
    SetRequestedSize(u64),
    Plug {
        addr: u64,
        nb_blocks: u16,
        resp: Option<u16>,
    },
    Unplug {
        addr: u64,
        nb_blocks: u16,
        resp: Option<u16>,
    },
    UnplugAll {
        resp: Option<u16>,
    },
    State {
        addr: u64,
        nb_blocks: u16,
        resp: Option<u16>,
        state: Option<u16>,
    },
    SystemReset,
    Expect {
        plugged_size: Option<u64>,
        usable_region_size: Option<u64>,
    },
}

fn u64_field(obj: &Value, name: &str, line: usize) -> u64 {
    obj.get(name)
        .unwrap_or_else(|| panic!("line {line}: missing field `{name}`"))
        .as_u64()
        .unwrap_or_else(|| panic!("line {line}: field `{name}` is not an unsigned integer"))
}

fn nb_blocks_field(obj: &Value, line: usize) -> u16 {
    u16::try_from(u64_field(obj, "nb_blocks", line)).unwrap_or_else(|_| panic!("line {line}: nb_blocks above 65535"))
}

fn resp_field(obj: &Value, line: usize) -> Option<u16> {
    let resp = obj.get("resp")?;
    Some(match resp.as_str() {
        Some("ack") => ACK,
        Some("nack") => NACK,
        Some("busy") => BUSY,
        Some("error") => ERROR,
        _ => panic!("line {line}: unknown virtio-mem resp {resp}"),
    })
}

fn state_field(obj: &Value, line: usize) -> Option<u16> {
    let state = obj.get("state")?;
    Some(match state.as_str() {
        Some("plugged") => PLUGGED,
        Some("unplugged") => UNPLUGGED,
        Some("mixed") => MIXED,
        _ => panic!("line {line}: unknown state {state}"),
    })
}

fn read_trace(path: &Path) -> (DeviceHeader, Vec<(usize, Event)>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let (_, first) = lines.next().expect("empty trace");
    let header: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("line 1: bad JSON: {e}"));
    assert_eq!(header["format"], "devtrace", "line 1: not a devtrace");
    assert_eq!(header["version"], 1, "line 1: unknown version");
    let devices = header["devices"].as_array().expect("line 1: missing field `devices`");
    let dev = devices
        .iter()
        .find(|d| d["device"] == "virtio-mem")
        .expect("line 1: no virtio-mem device");
    let device = DeviceHeader {
        id: dev["id"].as_str().expect("line 1: missing field `id`").to_string(),
        addr: u64_field(dev, "addr", 1),
        region_size: u64_field(dev, "region_size", 1),
        block_size: u64_field(dev, "block_size", 1),
        requested_size: u64_field(dev, "requested_size", 1),
        unplugged_inaccessible: dev["unplugged_inaccessible"].as_bool().unwrap_or(true),
    };
    let mut events = Vec::new();
    for (line, text) in lines {
        if text.trim().is_empty() {
            continue;
        }
        let obj: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("line {line}: bad JSON: {e}"));
        let dev = obj["dev"]
            .as_str()
            .unwrap_or_else(|| panic!("line {line}: missing field `dev`"));
        assert_eq!(dev, device.id, "line {line}: unknown device id");
        let op = obj["op"]
            .as_str()
            .unwrap_or_else(|| panic!("line {line}: missing field `op`"));
        let event = match op {
            "set_requested_size" => Event::SetRequestedSize(u64_field(&obj, "size", line)),
            "plug" => Event::Plug {
                addr: u64_field(&obj, "addr", line),
                nb_blocks: nb_blocks_field(&obj, line),
                resp: resp_field(&obj, line),
            },
            "unplug" => Event::Unplug {
                addr: u64_field(&obj, "addr", line),
                nb_blocks: nb_blocks_field(&obj, line),
                resp: resp_field(&obj, line),
            },
            "unplug_all" => Event::UnplugAll {
                resp: resp_field(&obj, line),
            },
            "state" => Event::State {
                addr: u64_field(&obj, "addr", line),
                nb_blocks: nb_blocks_field(&obj, line),
                resp: resp_field(&obj, line),
                state: state_field(&obj, line),
            },
            "system_reset" => Event::SystemReset,
            "expect" => Event::Expect {
                plugged_size: obj.get("plugged_size").map(|_| u64_field(&obj, "plugged_size", line)),
                usable_region_size: obj
                    .get("usable_region_size")
                    .map(|_| u64_field(&obj, "usable_region_size", line)),
            },
            other => panic!("line {line}: unknown virtio-mem op `{other}`"),
        };
        events.push((line, event));
    }
    (device, events)
}

/// Counts of what a replay checked.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checked {
    requests: usize,
    states: usize,
    expects: usize,
    resizes: usize,
    resets: usize,
}

fn replay(name: &str) -> Checked {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    let (header, events) = read_trace(&path);
    // A NORESERVE memfd of the region's size: only plugged blocks that get
    // touched would cost memory, and with prealloc off none is touched.
    let mut g = Guest::new(
        header.region_size,
        VirtioMemOptions {
            block_size: Some(header.block_size),
            requested_size: header.requested_size,
            unplugged_inaccessible: header.unplugged_inaccessible,
            prealloc: false,
            ..VirtioMemOptions::new(header.addr)
        },
    );
    let mut checked = Checked::default();
    for (line, event) in events {
        let is_request = matches!(
            event,
            Event::Plug { .. } | Event::Unplug { .. } | Event::UnplugAll { .. } | Event::State { .. }
        );
        if is_request && !g.dev.is_active() {
            // The guest (re)booted and its driver set the device up.
            g.activate().unwrap_or_else(|e| panic!("{name} line {line}: {e}"));
        }
        let at = |what: &str| format!("{name} line {line}: {what}");
        match event {
            Event::SetRequestedSize(size) => {
                g.region
                    .set_requested_size(size)
                    .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
                checked.resizes += 1;
            }
            Event::Plug { addr, nb_blocks, resp } => {
                let got = g.request(VIRTIO_MEM_REQ_PLUG, addr, nb_blocks).resp_type;
                if let Some(resp) = resp {
                    assert_eq!(got, resp, "{}", at(&format!("PLUG {addr:#x} x{nb_blocks}")));
                }
                checked.requests += 1;
            }
            Event::Unplug { addr, nb_blocks, resp } => {
                let got = g.request(VIRTIO_MEM_REQ_UNPLUG, addr, nb_blocks).resp_type;
                if let Some(resp) = resp {
                    assert_eq!(got, resp, "{}", at(&format!("UNPLUG {addr:#x} x{nb_blocks}")));
                }
                checked.requests += 1;
            }
            Event::UnplugAll { resp } => {
                let got = g.unplug_all();
                if let Some(resp) = resp {
                    assert_eq!(got, resp, "{}", at("UNPLUG_ALL"));
                }
                checked.requests += 1;
            }
            Event::State {
                addr,
                nb_blocks,
                resp,
                state,
            } => {
                let (got, got_state) = g.state(addr, nb_blocks);
                if let Some(resp) = resp {
                    assert_eq!(got, resp, "{}", at(&format!("STATE {addr:#x} x{nb_blocks}")));
                }
                if let Some(state) = state {
                    assert_eq!(
                        got_state,
                        state,
                        "{}",
                        at(&format!("STATE {addr:#x} x{nb_blocks} state"))
                    );
                    checked.states += 1;
                }
                checked.requests += 1;
            }
            Event::SystemReset => {
                g.dev
                    .system_reset()
                    .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
                checked.resets += 1;
            }
            Event::Expect {
                plugged_size,
                usable_region_size,
            } => {
                // As the driver reads it from the configuration space.
                let config = g.config();
                if let Some(plugged) = plugged_size {
                    assert_eq!(config.plugged_size, plugged, "{}", at("plugged_size"));
                }
                if let Some(usable) = usable_region_size {
                    assert_eq!(config.usable_region_size, usable, "{}", at("usable_region_size"));
                }
                checked.expects += 1;
            }
        }
    }
    assert_eq!(g.resident(), 0, "{name}: nothing was touched, so nothing is resident");
    checked
}

#[test]
fn vmem_resize_trace() {
    let checked = replay("vmem-resize.jsonl");
    assert_eq!(
        checked,
        Checked {
            requests: 22,
            states: 0,
            expects: 7,
            resizes: 4,
            resets: 2
        }
    );
}

#[test]
fn vmem_kexec_trace() {
    let checked = replay("vmem-kexec.jsonl");
    assert_eq!(
        checked,
        Checked {
            requests: 403,
            states: 384,
            expects: 6,
            resizes: 0,
            resets: 2
        }
    );
}

#[test]
#[should_panic(expected = "line 2: missing field `addr`")]
fn reader_names_the_line_of_a_bad_event() {
    let dir = std::env::temp_dir().join(format!("vmem-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"format":"devtrace","version":1,"devices":[{"device":"virtio-mem","id":"vmem0","addr":4294967296,"region_size":67108864,"block_size":2097152,"requested_size":0}]}"#,
            "\n",
            r#"{"dev":"vmem0","op":"plug","nb_blocks":1,"resp":"ack"}"#,
            "\n"
        ),
    )
    .unwrap();
    read_trace(&path);
}
