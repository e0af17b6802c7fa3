//! The replay engine: drives every event of a [`Trace`] through a
//! [`ReplayMachine`] as a guest driver would, compares each answer with the
//! recording, and reports.

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Instant;

use memvisor_guest::Answer;
use memvisor_virtio_iommu::Status;
use serde::Serialize;

use crate::machine::{ReplayMachine, ReplayMachineError, ReplayMachineOptions, iommu_request, mem_request};
use crate::trace::{Event, MemResp, Op, Trace, state_name};

/// How to replay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplayOptions {
    /// How to build the machine.
    pub machine: ReplayMachineOptions,
    /// After every this many events, save the machine, drop it (releasing
    /// every pin) and restore it into fresh objects.
    pub migrate_every: Option<NonZeroUsize>,
}

/// An answer that differs from the recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The event's line.
    pub line: usize,
    /// The request or check, e.g. `PLUG 0x100000000 x64`.
    pub event: String,
    /// What was compared: `resp`, `state`, `plugged_size`, `usable_region_size`.
    pub field: &'static str,
    /// The recorded value.
    pub expected: String,
    /// The value the replay got.
    pub actual: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}: expected {} {}, got {}",
            self.line, self.event, self.field, self.expected, self.actual
        )
    }
}

/// What a replay did and found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The trace's name.
    pub trace: String,
    /// Events replayed.
    pub events: usize,
    /// Requests sent through a device queue.
    pub requests: usize,
    /// Answers and values that differ from the recording.
    pub mismatches: Vec<Mismatch>,
    /// Answers and values compared (a request without a recorded answer
    /// is not compared).
    pub checked: usize,
    /// MAP requests answered with any status but OK.
    pub refused_maps: usize,
    /// UNPLUG and UNPLUG_ALL requests answered BUSY.
    pub busy_unplugs: usize,
    /// System reset events.
    pub resets: usize,
    /// Bytes plugged in the virtio-mem region at the end.
    pub plugged_size: u64,
    /// Bytes the DMA backends have pinned at the end (their own count).
    pub pinned_bytes: u64,
    /// This process's `VmPin` at the end, in KiB.
    pub vm_pin_kib: u64,
    /// Save/drop/restore cycles done.
    pub migrations: usize,
    /// Bytes of machine state streamed in total.
    pub migration_bytes: u64,
    /// vIOMMU mappings a restore found over memory that was no longer
    /// plugged (the source ran the `warn` guard, or reset its memory device
    /// before its IOMMU), summed over the restores: each was restored in
    /// its domain, as the guest sees it, and pinned by no one.
    pub restored_unpinned_maps: usize,
    /// Wall-clock seconds of the replay, machine construction included.
    pub elapsed_s: f64,
}

impl Report {
    /// True if every compared answer matched.
    pub fn is_ok(&self) -> bool {
        self.mismatches.is_empty()
    }

    /// The report as one JSON object (what `memvisor replay --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a report serializes")
    }
}

/// Why a replay stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The machine could not be built.
    #[error("{trace}: {source}")]
    Setup {
        /// The trace's name.
        trace: String,
        /// Why.
        source: Box<ReplayMachineError>,
    },
    /// An event could not be applied (not a differing answer: an event the
    /// machine cannot carry out, such as an invalid requested size).
    #[error("{trace}: line {line}: {op}: {source}")]
    Event {
        /// The trace's name.
        trace: String,
        /// The event's line.
        line: usize,
        /// The event.
        op: String,
        /// Why.
        source: Box<ReplayMachineError>,
    },
    /// Saving or restoring the machine failed.
    #[error("{trace}: migration after line {line}: {source}")]
    Migration {
        /// The trace's name.
        trace: String,
        /// The last event replayed before it.
        line: usize,
        /// Why.
        source: Box<ReplayMachineError>,
    },
}

/// Progress of a replay: `done` of `total` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events replayed so far.
    pub done: usize,
    /// Events in the trace.
    pub total: usize,
}

/// Replays `trace` with `options`; see the [module documentation](self).
/// `progress` is called after every event.
///
/// # Errors
///
/// A machine that cannot be built, an event that cannot be applied, a
/// failed migration. Differing answers are not errors: they are in the
/// report's [`mismatches`](Report::mismatches).
pub fn replay(
    trace: &Trace,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, ReplayError> {
    let start = Instant::now();
    let mut machine = ReplayMachine::new(&trace.header, &options.machine).map_err(|source| ReplayError::Setup {
        trace: trace.name.clone(),
        source: Box::new(source),
    })?;
    let mut report = Report {
        trace: trace.name.clone(),
        events: 0,
        requests: 0,
        mismatches: Vec::new(),
        checked: 0,
        refused_maps: 0,
        busy_unplugs: 0,
        resets: 0,
        plugged_size: 0,
        pinned_bytes: 0,
        vm_pin_kib: 0,
        migrations: 0,
        migration_bytes: 0,
        restored_unpinned_maps: 0,
        elapsed_s: 0.0,
    };
    let total = trace.events.len();
    let mut resets = Resets::default();
    for (i, event) in trace.events.iter().enumerate() {
        apply(&mut machine, &mut resets, event, &mut report).map_err(|source| ReplayError::Event {
            trace: trace.name.clone(),
            line: event.line,
            op: event.op.to_string(),
            source: Box::new(source),
        })?;
        report.events += 1;
        if let Some(n) = options.migrate_every
            && (i + 1) % n.get() == 0
            && i + 1 < total
        {
            let migration_error = |source| ReplayError::Migration {
                trace: trace.name.clone(),
                line: event.line,
                source: Box::new(source),
            };
            let mut stream = Vec::new();
            report.migration_bytes += machine.save(&mut stream).map_err(migration_error)?;
            drop(machine);
            machine = ReplayMachine::restore(&trace.header, &options.machine, &mut stream.as_slice())
                .map_err(migration_error)?;
            report.migrations += 1;
            report.restored_unpinned_maps += machine.machine().unnotified_mappings();
        }
        if i + 1 < total {
            progress(Progress { done: i + 1, total });
        }
    }
    progress(Progress { done: total, total });
    report.plugged_size = machine.machine().plugged_size();
    report.pinned_bytes = machine.machine().pinned_bytes();
    report.vm_pin_kib = memvisor_dma::mapper::vm_pin_kib();
    drop(machine);
    report.elapsed_s = start.elapsed().as_secs_f64();
    Ok(report)
}

fn check(report: &mut Report, event: &Event, field: &'static str, expected: Option<String>, actual: String) {
    let Some(expected) = expected else {
        return;
    };
    report.checked += 1;
    if expected != actual {
        report.mismatches.push(Mismatch {
            line: event.line,
            event: event.op.to_string(),
            field,
            expected,
            actual,
        });
    }
}

const NO_ANSWER: &str = "no answer (the device needs a reset)";

/// A trace records one machine reset as one `system_reset` line per
/// device, in whatever order the recording VMM reset them. The first line
/// resets the whole machine, in its declared order; the lines that follow
/// for devices that got no request since are that same reset.
#[derive(Debug, Default)]
struct Resets {
    /// Devices reset by the last machine reset whose own line is still to
    /// come.
    pending: Vec<bool>,
}

impl Resets {
    /// Device `device` reports a reset: true if the machine must reset.
    fn reset_line(&mut self, device: usize, devices: usize) -> bool {
        if self.pending.get(device).copied().unwrap_or(false) {
            self.pending[device] = false;
            return false;
        }
        self.pending = (0..devices).map(|d| d != device).collect();
        true
    }

    /// Device `device` got a request: a later reset line of it is a new reset.
    fn request(&mut self, device: usize) {
        if let Some(p) = self.pending.get_mut(device) {
            *p = false;
        }
    }
}

fn apply(
    machine: &mut ReplayMachine,
    resets: &mut Resets,
    event: &Event,
    report: &mut Report,
) -> Result<(), ReplayMachineError> {
    let op = event.op;
    if op.is_request() {
        resets.request(event.device);
    }
    match op {
        Op::SetRequestedSize { size } => machine.set_requested_size(size)?,
        Op::SystemReset => {
            if resets.reset_line(event.device, machine.device_count()) {
                machine.system_reset()?;
            }
            report.resets += 1;
        }
        Op::Expect {
            plugged_size,
            usable_region_size,
        } => {
            let config = machine.vmem_config()?;
            let hex = |v: u64| format!("{v:#x}");
            check(
                report,
                event,
                "plugged_size",
                plugged_size.map(hex),
                hex(config.plugged_size),
            );
            check(
                report,
                event,
                "usable_region_size",
                usable_region_size.map(hex),
                hex(config.usable_region_size),
            );
        }
        Op::Plug { resp, .. } | Op::Unplug { resp, .. } | Op::UnplugAll { resp } | Op::State { resp, .. } => {
            let request = mem_request(&op).expect("a virtio-mem request");
            report.requests += 1;
            let answer = machine.vmem_request(request)?;
            let answer = match answer {
                Answer::Answered(a) => Some((MemResp::from_wire(a.resp_type), a)),
                Answer::NoAnswer => None,
            };
            let actual = match answer {
                Some((Some(resp), _)) => resp.name().to_string(),
                Some((None, a)) => format!("invalid resp {}", a.resp_type),
                None => NO_ANSWER.to_string(),
            };
            if matches!(op, Op::Unplug { .. } | Op::UnplugAll { .. })
                && answer.is_some_and(|(resp, _)| resp == Some(MemResp::Busy))
            {
                report.busy_unplugs += 1;
            }
            check(report, event, "resp", resp.map(|r| r.name().to_string()), actual);
            if let Op::State {
                state: Some(expected), ..
            } = op
            {
                let actual = match answer {
                    Some((Some(MemResp::Ack), a)) => a
                        .state
                        .map_or_else(|| "an invalid state".to_string(), |s| state_name(s).to_string()),
                    Some((resp, _)) => format!("no state (resp {})", resp.map_or("invalid", MemResp::name)),
                    None => NO_ANSWER.to_string(),
                };
                check(report, event, "state", Some(state_name(expected).to_string()), actual);
            }
        }
        Op::Attach { resp, .. }
        | Op::Detach { resp, .. }
        | Op::Map { resp, .. }
        | Op::Unmap { resp, .. }
        | Op::Probe { resp, .. } => {
            let request = iommu_request(&op).expect("a virtio-iommu request");
            report.requests += 1;
            let answer = machine.iommu_request(request)?;
            if matches!(op, Op::Map { .. }) && answer != Answer::Answered(Status::Ok) {
                report.refused_maps += 1;
            }
            let actual = match answer {
                Answer::Answered(s) => s.name().to_string(),
                Answer::NoAnswer => NO_ANSWER.to_string(),
            };
            check(report, event, "resp", resp.map(|s| s.name().to_string()), actual);
        }
    }
    Ok(())
}
