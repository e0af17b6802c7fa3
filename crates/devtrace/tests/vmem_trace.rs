//! The recorded virtio-mem traces (QEMU 7.2 + Linux 6.12), replayed event
//! by event through a [`ReplayMachine`] without assigned devices, as the
//! virtio-mem crate's own trace reader did: every recorded answer, state
//! and value asserted where it occurs, what was checked counted by kind,
//! and no memory of the region resident at the end (nothing touched it).
//!
//! `replay.rs` runs the same traces through [`replay`](memvisor_devtrace::replay)
//! and compares its totals; this file keeps the per-kind counts and the
//! residency check, which the engine's report does not carry.

use memvisor_devtrace::trace::MemResp;
use memvisor_devtrace::{Op, ReplayMachine, ReplayMachineOptions, Trace, builtin};
use memvisor_guest::{Answer, MemAnswer};

/// Counts of what a replay checked.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checked {
    /// Requests sent (each with its recorded answer asserted).
    requests: usize,
    /// STATE requests whose recorded state was asserted.
    states: usize,
    /// `expect` events.
    expects: usize,
    /// `set_requested_size` events.
    resizes: usize,
    /// `system_reset` events.
    resets: usize,
}

/// Replays built-in trace `name` with every assertion inline; returns what
/// was checked.
fn replay(name: &str) -> Checked {
    let (file, text) = builtin::get(name).unwrap_or_else(|| panic!("no built-in trace {name}"));
    let trace = Trace::parse(file, text).unwrap_or_else(|e| panic!("{e}"));
    // No assigned device: nothing pins (and so populates) plugged memory.
    let options = ReplayMachineOptions {
        dma: None,
        ..ReplayMachineOptions::default()
    };
    let mut m = ReplayMachine::new(&trace.header, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut checked = Checked::default();
    for event in &trace.events {
        let line = event.line;
        let at = |what: &str| format!("{name} line {line}: {what}");
        assert!(m.is_vmem(event.device), "{}", at("not a virtio-mem event"));
        match event.op {
            Op::SetRequestedSize { size } => {
                m.set_requested_size(size)
                    .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
                checked.resizes += 1;
            }
            Op::SystemReset => {
                m.system_reset().unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
                checked.resets += 1;
            }
            Op::Expect {
                plugged_size,
                usable_region_size,
            } => {
                // As the driver reads it from the configuration space.
                let config = m.vmem_config().unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
                if let Some(plugged) = plugged_size {
                    assert_eq!(config.plugged_size, plugged, "{}", at("plugged_size"));
                }
                if let Some(usable) = usable_region_size {
                    assert_eq!(config.usable_region_size, usable, "{}", at("usable_region_size"));
                }
                checked.expects += 1;
            }
            Op::Plug { resp, .. } | Op::Unplug { resp, .. } | Op::UnplugAll { resp } | Op::State { resp, .. } => {
                let op = event.op;
                let request = memvisor_devtrace::machine::mem_request(&op).expect("a virtio-mem request");
                // The guest's driver (re)activates the device first if a
                // reset left it inactive.
                let answer: MemAnswer = match m.vmem_request(request) {
                    Ok(Answer::Answered(a)) => a,
                    other => panic!("{}", at(&format!("{op}: no answer: {other:?}"))),
                };
                if let Some(resp) = resp {
                    assert_eq!(
                        MemResp::from_wire(answer.resp_type),
                        Some(resp),
                        "{}",
                        at(&op.to_string())
                    );
                }
                if let Op::State { state: Some(state), .. } = op {
                    assert_eq!(answer.state, Some(state), "{}", at(&format!("{op} state")));
                    checked.states += 1;
                }
                checked.requests += 1;
            }
            op => panic!("{}", at(&format!("{op} is not a virtio-mem op"))),
        }
    }
    let block = m.machine().vmems()[0].region.block().clone();
    assert_eq!(
        block.resident_bytes(0, block.size()).unwrap(),
        0,
        "{name}: nothing was touched, so nothing is resident"
    );
    checked
}

#[test]
fn vmem_resize_trace() {
    let checked = replay("vmem-resize");
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
    let checked = replay("vmem-kexec");
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
