//! The JSON report of a run and the check of a scenario's expectations against it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::host::Mode;
use crate::scenario::{Expect, Expectation, Scenario};
use crate::vmm::{Accel, AccessCounts, RamBlock, VmmKind};

/// A whole run's report; the same shape whichever VMM ran the guest.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The VMM that ran L2.
    pub vmm: VmmKind,
    /// Where the VMM ran: in L1 (`nested`) or on this host (`direct`).
    pub mode: Mode,
    /// Why that mode: `--mode ...`, or what detection found (`auto: ...`).
    pub mode_reason: String,
    /// How L2's vCPUs ran (`kvm`, or `tcg` in direct mode without a usable `/dev/kvm`).
    pub l2_accel: Accel,
    /// Set when direct mode ran L2 under TCG: why this host's KVM could not.
    pub tcg_fallback: Option<String>,
    /// Whether every stage finished and every expectation held.
    pub passed: bool,
    /// The stage that failed, if one did.
    pub failed_stage: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
    /// Each stage's wall time.
    pub stages: Vec<StageTime>,
    /// Host steps the guest asked for, in order.
    pub host_steps: Vec<HostStep>,
    /// What the guest reported.
    pub guest: GuestReport,
    /// How the VMM process ended by itself after the guest's `@@exit`, when a `vmm-exit`
    /// expectation had the runner wait for it.
    pub vmm_exit: Option<VmmExit>,
    /// The named figures of the side-by-side comparison.
    pub figures: Figures,
    /// The expectations that apply to this VMM and whether they held.
    pub expectations: Vec<Checked>,
    /// The observation keys the scenario's expectations check (any VMM's), shown side by
    /// side.
    pub checked_keys: Vec<String>,
    /// The Debian packages used (name to version).
    pub packages: BTreeMap<String, String>,
    /// The work folder, when kept.
    pub work_dir: Option<String>,
    /// The last console lines (L1's when nested, L2's, the VMM's stderr when direct) when
    /// something failed.
    pub console_tail: Vec<String>,
}

/// How the VMM process ended after the guest's `@@exit`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VmmExit {
    /// Its exit status (128 + the signal if a signal ended it); `None` if it still ran
    /// after `seconds`.
    pub status: Option<i32>,
    /// Seconds from the guest's `@@exit` to the VMM's exit seen (or to giving up).
    pub seconds: f64,
}

/// The figures the issue asks to compare side by side (seconds; `None` when the run has no
/// such step). See the README's "Side by side".
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Figures {
    /// From the VMM's start to the guest agent's `@@agent ready` (first boot).
    pub agent_s: Option<f64>,
    /// From the guest's host request to plug 1 GiB to the guest's MemTotal including it:
    /// the guest's observation `plug_1g_usable_s` (timed with `/proc/uptime`).
    pub plug_1g_usable_s: Option<f64>,
    /// From the host's request to unplug 1 GiB (a resize that shrinks by 1 GiB) to the
    /// VMM's RSS (its guest RAM's under TCG) having dropped by 99% of it: that step's
    /// [`HostStep::returned_s`].
    pub unplug_1g_returned_s: Option<f64>,
    /// 128 MiB (the disk's first 32 MiB four times) written sequentially to the disk under
    /// test with O_DIRECT in 1 MiB requests:
    /// the guest's observation `disk_write_s` (timed with `/proc/uptime`; `disk-resize.sh`).
    pub disk_write_s: Option<f64>,
    /// The same 128 MiB read back with O_DIRECT: the guest's observation `disk_read_s`.
    pub disk_read_s: Option<f64>,
    /// A `restore` step: from pausing the guest to its whole state being in a file.
    pub snapshot_save_s: Option<f64>,
    /// A `restore` step: from starting a VMM on the saved file to the guest running in it.
    pub snapshot_restore_s: Option<f64>,
    /// A `migrate` step: from the request to the guest running at the destination (the
    /// source VMM's own figure).
    pub migrate_total_s: Option<f64>,
    /// A `migrate` step: how long the guest was paused (the source VMM's own figure).
    pub migrate_downtime_s: Option<f64>,
}

impl Figures {
    /// The figures of a run's `host_steps` and `guest` report.
    pub fn of(host_steps: &[HostStep], guest: &GuestReport) -> Figures {
        let gib = 1u64 << 30;
        let save_restore = host_steps.iter().find_map(|s| s.save_restore_s);
        let migration = host_steps.iter().find_map(|s| s.migration);
        let observed = |key: &str| -> Option<f64> {
            guest
                .observations
                .iter()
                .find(|o| o.key == key)
                .and_then(|o| o.value.trim().parse().ok())
        };
        Figures {
            agent_s: guest.agent_ready_at,
            plug_1g_usable_s: observed("plug_1g_usable_s"),
            unplug_1g_returned_s: host_steps
                .iter()
                .find(|s| s.resize.is_some_and(|(from, to)| from >= to && from - to == gib))
                .and_then(|s| s.returned_s),
            disk_write_s: observed("disk_write_s"),
            disk_read_s: observed("disk_read_s"),
            snapshot_save_s: save_restore.map(|(save, _)| save),
            snapshot_restore_s: save_restore.map(|(_, restore)| restore),
            migrate_total_s: migration.map(|m| m.total_s),
            migrate_downtime_s: migration.map(|m| m.downtime_s),
        }
    }

    /// What the figure `name` (one of [`named`](Self::named)) times, for
    /// the side-by-side table.
    pub fn description(name: &str) -> &'static str {
        match name {
            "agent_s" => "VMM start to agent",
            "plug_1g_usable_s" => "1G usable in guest",
            "unplug_1g_returned_s" => "1G back on host",
            "disk_write_s" => "128M O_DIRECT write",
            "disk_read_s" => "128M O_DIRECT read",
            "snapshot_save_s" => "save paused VM to file",
            "snapshot_restore_s" => "new VMM to guest running",
            "migrate_total_s" => "migration, in all",
            "migrate_downtime_s" => "migration downtime",
            _ => "",
        }
    }

    /// Every figure by its name (the field's), in the order of the side-by-side table.
    pub fn named(&self) -> [(&'static str, Option<f64>); 9] {
        [
            ("agent_s", self.agent_s),
            ("plug_1g_usable_s", self.plug_1g_usable_s),
            ("unplug_1g_returned_s", self.unplug_1g_returned_s),
            ("disk_write_s", self.disk_write_s),
            ("disk_read_s", self.disk_read_s),
            ("snapshot_save_s", self.snapshot_save_s),
            ("snapshot_restore_s", self.snapshot_restore_s),
            ("migrate_total_s", self.migrate_total_s),
            ("migrate_downtime_s", self.migrate_downtime_s),
        ]
    }
}

/// The share of unplugged memory the VMM's RSS must give back for
/// [`HostStep::returned_s`].
pub const RETURNED_FRACTION: f64 = 0.99;

/// One stage's wall time.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// `setup`, `images`, `l1-boot` (nested only), `l2-boot`, `scenario`, `shutdown`.
    pub name: String,
    /// Seconds from the stage's start to its end.
    pub seconds: f64,
    /// Whether it finished.
    pub ok: bool,
}

/// The L2 VMM's memory counters read from `/proc/<pid>/status` where it runs (kB).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HostSample {
    /// Seconds since the run started.
    pub t: f64,
    /// Resident set.
    pub rss_kb: u64,
    /// Peak resident set.
    pub hwm_kb: u64,
    /// Locked memory (VFIO type1 accounts pinned pages here).
    pub lck_kb: u64,
    /// Pinned memory (iommufd accounts here).
    pub pin_kb: u64,
    /// Resident memory of the guest's RAM blocks alone (from `/proc/<pid>/smaps`), sampled
    /// when L2 runs under TCG: there the VMM's RSS also holds the emulator's TLBs and
    /// translated code, which grow while the guest runs new code.
    pub ram_kb: Option<u64>,
}

impl HostSample {
    /// Parses `VmRSS:  123 kB` lines.
    pub fn parse(t: f64, text: &str) -> HostSample {
        let mut s = HostSample {
            t,
            ..Default::default()
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            match k.trim() {
                "VmRSS" => s.rss_kb = v,
                "VmHWM" => s.hwm_kb = v,
                "VmLck" => s.lck_kb = v,
                "VmPin" => s.pin_kb = v,
                _ => {}
            }
        }
        s
    }

    /// Locked plus pinned memory.
    pub fn locked_kb(&self) -> u64 {
        self.lck_kb + self.pin_kb
    }
}

/// The resident kB (`Rss:`) of the mappings in `smaps` that start inside one of `blocks`.
pub fn resident_in(smaps: &str, blocks: &[RamBlock]) -> u64 {
    let mut inside = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        let start = range.and_then(|(a, b)| {
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            hex(b)?;
            hex(a)
        });
        if let Some(start) = start {
            inside = blocks.iter().any(|b| start >= b.hva && start < b.hva + b.size);
        } else if inside && let Some(v) = line.strip_prefix("Rss:") {
            kb += v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kb
}

/// One host step.
#[derive(Debug, Clone, Serialize)]
pub struct HostStep {
    /// Seconds since the run started.
    pub t: f64,
    /// The guest's request (`resize vmem0 1G`).
    pub request: String,
    /// How long the step took.
    pub seconds: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The answer sent to the guest (or the error).
    pub detail: String,
    /// For resizes: plugged bytes before and the requested bytes.
    pub resize: Option<(u64, u64)>,
    /// VMM counters before the step.
    pub before: Option<HostSample>,
    /// VMM counters after the step.
    pub after: Option<HostSample>,
    /// For resizes that shrink: seconds from the request until the VMM's RSS (its guest
    /// RAM's under TCG) was [`RETURNED_FRACTION`] of the unplugged bytes below `before`
    /// (polled about every 0.1–0.3 s); `None` if it never was within the step.
    pub returned_s: Option<f64>,
    /// For `unassigned ID`: the VMM's counts of the guest's accesses to unplugged memory of
    /// the device (`None` under a VMM that does not count them).
    pub unassigned: Option<AccessCounts>,
    /// For resizes followed through the VMM's own size-change reports (memvisor's event
    /// stream): how many long polls brought a change of the device (`None`: the runner
    /// polled the plugged size instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_events: Option<u64>,
    /// A `restore` step: seconds to save the paused VM to a file, and from starting the new
    /// VMM to the guest running again in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_restore_s: Option<(f64, f64)>,
    /// A `migrate` step: what the source VMM reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::vmm::MigrationFigures>,
}

/// The guest's side.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestReport {
    /// The guest script's exit status.
    pub exit_status: Option<i32>,
    /// The script's output lines.
    pub output: Vec<String>,
    /// Observations (`obs key value`) in order.
    pub observations: Vec<Observation>,
    /// Seconds from L2 VMM start to the agent.
    pub agent_ready_at: Option<f64>,
    /// Seconds from L2 VMM start to each boot's `@@agent ready` (the first is
    /// `agent_ready_at`; more than one only when the guest rebooted).
    pub boots: Vec<f64>,
}

/// One guest observation.
#[derive(Debug, Clone, Serialize)]
pub struct Observation {
    /// Seconds since the run started.
    pub t: f64,
    /// The key.
    pub key: String,
    /// The value as printed.
    pub value: String,
}

/// An expectation's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    /// The expectation, described.
    pub expectation: String,
    /// Whether it held.
    pub passed: bool,
    /// The numbers behind the verdict.
    pub detail: String,
}

/// Checks `scenario`'s expectations that apply to the report's VMM (and a zero guest exit
/// status unless stated otherwise) against `report`'s host steps, guest report and VMM exit.
pub fn evaluate(scenario: &Scenario, report: &Report) -> Vec<Checked> {
    let mut expectations: Vec<Expect> = scenario
        .expect
        .iter()
        .filter(|e| e.applies_to(report.vmm))
        .cloned()
        .collect();
    if !scenario
        .expect
        .iter()
        .any(|e| matches!(e.check, Expectation::GuestExit { .. }))
    {
        expectations.insert(0, Expectation::GuestExit { status: 0 }.into());
    }
    expectations
        .iter()
        .map(|e| {
            let mut c = check(&e.check, scenario, report);
            if let Some(vmm) = e.vmm {
                c.expectation.push_str(&format!(" ({vmm} only)"));
            }
            c
        })
        .collect()
}

/// A verdict from per-step `(held, detail)` pairs: held if there is one and all held.
fn all_of(expectation: String, details: Vec<(bool, String)>) -> Checked {
    Checked {
        expectation,
        passed: !details.is_empty() && details.iter().all(|(ok, _)| *ok),
        detail: details.into_iter().map(|(_, d)| d).collect::<Vec<_>>().join("; "),
    }
}

/// The VMM's RSS, or under TCG its guest RAM's: (what, kB).
fn resident(s: &HostSample) -> (&'static str, u64) {
    match s.ram_kb {
        Some(kb) => ("guest RAM RSS", kb),
        None => ("RSS", s.rss_kb),
    }
}

fn check(e: &Expectation, scenario: &Scenario, report: &Report) -> Checked {
    let guest = &report.guest;
    let host_steps = &report.host_steps;
    let boot_kb = scenario.vm.memory.0 / 1024;
    let resizes: Vec<_> = host_steps
        .iter()
        .filter_map(|s| Some((s, s.resize?, s.before?, s.after?)))
        .collect();
    match e {
        Expectation::GuestExit { status } => Checked {
            expectation: format!("guest script exits with {status}"),
            passed: guest.exit_status == Some(*status),
            detail: format!("exit status {:?}", guest.exit_status),
        },
        Expectation::OutputContains { text } => Checked {
            expectation: format!("guest output contains {text:?}"),
            passed: guest.output.iter().any(|l| l.contains(text.as_str())),
            detail: String::new(),
        },
        Expectation::Observation { key, min, max, equals } => {
            let values: Vec<_> = guest
                .observations
                .iter()
                .filter(|o| &o.key == key)
                .map(|o| &o.value)
                .collect();
            let ok = |v: &String| {
                let n = v.trim().parse::<f64>().ok();
                equals.as_ref().is_none_or(|x| x == v.trim())
                    && min.is_none_or(|m| n.is_some_and(|n| n >= m))
                    && max.is_none_or(|m| n.is_some_and(|n| n <= m))
            };
            let mut bounds = Vec::new();
            if let Some(m) = min {
                bounds.push(format!(">= {m}"));
            }
            if let Some(m) = max {
                bounds.push(format!("<= {m}"));
            }
            if let Some(x) = equals {
                bounds.push(format!("== {x}"));
            }
            Checked {
                expectation: format!("observation {key} {}", bounds.join(", "))
                    .trim_end()
                    .to_string(),
                passed: !values.is_empty() && values.iter().all(|v| ok(v)),
                detail: format!("values {values:?}"),
            }
        }
        Expectation::RssDropOnUnplug { min_fraction } => {
            let details = resizes
                .iter()
                .filter(|(_, (from, to), _, _)| to < from)
                .map(|(s, (from, to), b, a)| {
                    let want = (from - to) as f64 / 1024.0 * min_fraction;
                    // Under TCG: the guest RAM's own RSS (the emulator's grows meanwhile).
                    let ((what, before), (_, after)) = (resident(b), resident(a));
                    let drop = before as f64 - after as f64;
                    let mut d = format!(
                        "{}: {what} {before} -> {after} kB, dropped {drop} kB, need {want:.0}",
                        s.request
                    );
                    if what != "RSS" {
                        d.push_str(&format!(" (VMM RSS {} -> {} kB)", b.rss_kb, a.rss_kb));
                    }
                    (drop >= want, d)
                })
                .collect();
            all_of(
                format!(
                    "unplug lowers the VMM's RSS (its guest RAM's under TCG) by at least {min_fraction} of the unplugged bytes"
                ),
                details,
            )
        }
        Expectation::LockedFollowsPlugged => all_of(
            "the VMM's locked memory follows boot plus plugged memory".into(),
            resizes
                .iter()
                .map(|(s, (_, to), _, a)| {
                    let want = boot_kb + to / 1024;
                    (
                        a.locked_kb() >= want,
                        format!("{}: locked {} kB, need {want}", s.request, a.locked_kb()),
                    )
                })
                .collect(),
        ),
        Expectation::ResizesSeenInEvents => all_of(
            "every resize was followed through the VMM's size-change events".into(),
            resizes
                .iter()
                .filter(|(_, (from, to), _, _)| from != to)
                .map(|(s, ..)| {
                    let polls = s.size_events.map_or("none (polled)".to_string(), |n| n.to_string());
                    (
                        s.size_events.is_some_and(|n| n >= 1),
                        format!("{}: long polls with a size change: {polls}", s.request),
                    )
                })
                .collect(),
        ),
        Expectation::LockedBelow { max_kb } => all_of(
            format!("the VMM's locked memory stays at most {max_kb} kB"),
            resizes
                .iter()
                .map(|(s, _, _, a)| {
                    (
                        a.locked_kb() <= *max_kb,
                        format!("{}: locked {} kB", s.request, a.locked_kb()),
                    )
                })
                .collect(),
        ),
        Expectation::VmmExit { status, within_s } => {
            let (passed, detail) = match report.vmm_exit {
                Some(VmmExit {
                    status: Some(got),
                    seconds,
                }) => (
                    got == *status && seconds <= *within_s,
                    format!("exited with {got} {seconds:.2} s after @@exit"),
                ),
                Some(VmmExit { status: None, seconds }) => {
                    (false, format!("still running {seconds:.2} s after @@exit"))
                }
                None => (false, "no @@exit to wait from".into()),
            };
            Checked {
                expectation: format!("the VMM exits by itself with {status} within {within_s} s of @@exit"),
                passed,
                detail,
            }
        }
        Expectation::Boots { count } => Checked {
            expectation: format!("the guest agent starts {count} time(s)"),
            passed: guest.boots.len() == *count as usize,
            detail: format!("agent ready at {:?} s", guest.boots),
        },
        Expectation::UnassignedAccesses {
            id,
            min_reads,
            min_writes,
        } => {
            let request = format!("unassigned {id}");
            let last = host_steps.iter().rev().find(|s| s.request == request);
            let (passed, detail) = match last.map(|s| (s.ok, s.unassigned)) {
                Some((_, Some(c))) => (
                    c.reads >= *min_reads && c.writes >= *min_writes,
                    format!("reads {} writes {}", c.reads, c.writes),
                ),
                Some((true, None)) => (false, "the VMM does not count them".into()),
                Some((false, _)) => (false, format!("`{request}` failed: {}", last.map_or("", |s| &s.detail))),
                None => (false, format!("no `{request}` step")),
            };
            Checked {
                expectation: format!(
                    "the VMM counts at least {min_reads} read(s) and {min_writes} write(s) of unplugged memory of {id}"
                ),
                passed,
                detail,
            }
        }
        Expectation::RssGrowthBelow { step, max_kb } => {
            let samples: Vec<_> = host_steps
                .iter()
                .filter(|s| s.request == *step)
                .filter_map(|s| s.after)
                .collect();
            let (passed, detail) = match (samples.first(), samples.last()) {
                (Some(first), Some(last)) if samples.len() >= 2 => {
                    let ((what, a), (_, b)) = (resident(first), resident(last));
                    let growth = b as i64 - a as i64;
                    (
                        growth <= *max_kb as i64,
                        format!("{what} {a} -> {b} kB, grew {growth} kB"),
                    )
                }
                _ => (
                    false,
                    format!("{} `{step}` step(s) with a sample, 2 needed", samples.len()),
                ),
            };
            Checked {
                expectation: format!(
                    "the VMM's RSS (its guest RAM's under TCG) grows by at most {max_kb} kB between the `{step}` steps"
                ),
                passed,
                detail,
            }
        }
    }
}

/// The reports of one scenario under several VMMs side by side, as a text table: a column
/// per report (headed by its VMM), a row per figure: passed, failed stage, each stage's
/// seconds, the named [`Figures`] (`agent_s`, and `plug_1g_usable_s`,
/// `unplug_1g_returned_s`, `disk_write_s` and `disk_read_s` when a run has them), the boots and the VMM's exit when a run has
/// them, and for each host step (matched by position; the guest script is the same) its
/// seconds, for shrinks the seconds until the memory was back on the host, for other steps
/// than `resize` and `stats` the answer, and the VMM's RSS, guest RAM RSS (under TCG) and
/// locked memory (VmLck + VmPin) after it; then the last value of every observation an
/// expectation checks, then each expectation. A figure a run does not have is `-`; no
/// reports give `(no runs)`.
pub fn side_by_side(reports: &[Report]) -> String {
    let Some(first) = reports.first() else {
        return "(no runs)\n".into();
    };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: String, cell: &dyn Fn(&Report) -> Option<String>| {
        let cells: Vec<String> = reports.iter().map(|r| cell(r).unwrap_or_else(|| "-".into())).collect();
        rows.push((label, cells));
    };
    let any = |f: &dyn Fn(&Report) -> bool| reports.iter().any(f);
    let secs = |t: Option<f64>| t.map(|t| format!("{t:.2}"));
    let title = format!("{} ({}, L2 under {})", first.scenario, first.mode, first.l2_accel);
    row(title, &|r| Some(r.vmm.to_string()));
    row("passed".into(), &|r| Some(if r.passed { "yes" } else { "NO" }.into()));
    row("failed stage".into(), &|r| r.failed_stage.clone());
    let mut stages: Vec<&str> = Vec::new();
    for st in reports.iter().flat_map(|r| &r.stages) {
        if !stages.contains(&st.name.as_str()) {
            stages.push(&st.name);
        }
    }
    for name in stages {
        row(format!("{name} (s)"), &|r| {
            let st = r.stages.iter().find(|s| s.name == name)?;
            Some(format!("{:.2}{}", st.seconds, if st.ok { "" } else { " FAILED" }))
        });
    }
    // `agent_s` always has a row; another figure only where some run has it.
    for (i, (name, _)) in Figures::default().named().into_iter().enumerate() {
        if name == "agent_s" || any(&|r| r.figures.named()[i].1.is_some()) {
            row(format!("{name}: {} (s)", Figures::description(name)), &|r| {
                secs(r.figures.named()[i].1)
            });
        }
    }
    if any(&|r| r.guest.boots.len() > 1) {
        row("boots (agent ready at, s)".into(), &|r| {
            let t: Vec<String> = r.guest.boots.iter().map(|t| format!("{t:.1}")).collect();
            (!t.is_empty()).then(|| t.join(", "))
        });
    }
    if any(&|r| r.vmm_exit.is_some()) {
        row("VMM exit after @@exit (status, s)".into(), &|r| {
            r.vmm_exit.map(|x| match x.status {
                Some(s) => format!("{s}, {:.2}", x.seconds),
                None => format!("running, {:.2}", x.seconds),
            })
        });
    }
    let steps = reports.iter().map(|r| r.host_steps.len()).max().unwrap_or(0);
    for i in 0..steps {
        let req = reports
            .iter()
            .find_map(|r| r.host_steps.get(i))
            .map(|s| s.request.clone())
            .unwrap_or_default();
        let step = |r: &Report| r.host_steps.get(i).filter(|s| s.request == req).cloned();
        row(format!("{req} (s)"), &|r| {
            step(r).map(|s| format!("{:.2}{}", s.seconds, if s.ok { "" } else { " FAILED" }))
        });
        if any(&|r| step(r).is_some_and(|s| s.resize.is_some_and(|(from, to)| to < from))) {
            row(format!("{req}: back on host (s)"), &|r| secs(step(r)?.returned_s));
        }
        let word = req.split_whitespace().next().unwrap_or("");
        if !matches!(word, "resize" | "stats") {
            row(format!("{req}: answer"), &|r| step(r).map(|s| s.detail));
        }
        row(format!("{req}: RSS after (kB)"), &|r| {
            step(r)?.after.map(|a| a.rss_kb.to_string())
        });
        if any(&|r| step(r).and_then(|s| s.after?.ram_kb).is_some()) {
            row(format!("{req}: guest RAM RSS after (kB)"), &|r| {
                step(r)?.after?.ram_kb.map(|k| k.to_string())
            });
        }
        row(format!("{req}: VmLck+VmPin after (kB)"), &|r| {
            step(r)?.after.map(|a| a.locked_kb().to_string())
        });
    }
    let mut keys: Vec<&str> = Vec::new();
    for r in reports {
        for c in &r.checked_keys {
            if !keys.contains(&c.as_str()) {
                keys.push(c);
            }
        }
    }
    for key in keys {
        row(format!("obs {key}"), &|r| {
            r.guest
                .observations
                .iter()
                .rev()
                .find(|o| o.key == key)
                .map(|o| o.value.clone())
        });
    }
    let mut expectations: Vec<&str> = Vec::new();
    for c in reports.iter().flat_map(|r| &r.expectations) {
        if !expectations.contains(&c.expectation.as_str()) {
            expectations.push(&c.expectation);
        }
    }
    for e in expectations {
        row(e.to_string(), &|r| {
            let c = r.expectations.iter().find(|c| c.expectation == e)?;
            Some(if c.passed { "held" } else { "FAILED" }.into())
        });
    }
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..reports.len())
        .map(|i| rows.iter().map(|(_, c)| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (label, cells) in rows {
        let mut line = format!("{label:<label_width$}");
        for (cell, w) in cells.iter().zip(&widths) {
            line.push_str(&format!("  {cell:>w$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(vmm: VmmKind, steps: Vec<HostStep>, passed: bool) -> Report {
        Report {
            scenario: "vmem-resize".into(),
            vmm,
            mode: Mode::Nested,
            mode_reason: "--mode nested".into(),
            l2_accel: Accel::Kvm,
            tcg_fallback: None,
            passed,
            failed_stage: (!passed).then(|| "scenario".to_string()),
            error: None,
            stages: vec![
                StageTime {
                    name: "l1-boot".into(),
                    seconds: 7.5,
                    ok: true,
                },
                StageTime {
                    name: "l2-boot".into(),
                    seconds: if passed { 15.25 } else { 4.0 },
                    ok: true,
                },
            ],
            host_steps: steps,
            guest: GuestReport {
                agent_ready_at: Some(14.0),
                boots: vec![14.0],
                ..Default::default()
            },
            vmm_exit: None,
            figures: Figures {
                agent_s: Some(14.0),
                ..Default::default()
            },
            expectations: vec![Checked {
                expectation: "guest script exits with 0".into(),
                passed,
                detail: String::new(),
            }],
            checked_keys: Vec::new(),
            packages: BTreeMap::new(),
            work_dir: None,
            console_tail: Vec::new(),
        }
    }

    #[test]
    fn both_vmms_figures_stand_side_by_side() {
        let g = 1 << 30;
        let mut shrink = step("resize vmem0 0", g, 0, (1_650_000, 620_000), 0);
        shrink.returned_s = Some(2.5);
        let mut qemu = report(
            VmmKind::Qemu,
            vec![step("resize vmem0 1G", 0, g, (600_000, 1_650_000), 0), shrink],
            true,
        );
        qemu.guest.observations.push(Observation {
            t: 30.0,
            key: "plug_1g_usable_s".into(),
            value: "3.25".into(),
        });
        qemu.guest.observations.push(Observation {
            t: 31.0,
            key: "disk_write_s".into(),
            value: "0.42".into(),
        });
        qemu.figures = Figures::of(&qemu.host_steps, &qemu.guest);
        qemu.vmm_exit = Some(VmmExit {
            status: Some(0),
            seconds: 1.25,
        });
        let mut memvisor = report(
            VmmKind::Memvisor,
            vec![step("resize vmem0 1G", 0, g, (100_000, 1_150_000), 4)],
            false,
        );
        memvisor.guest.boots.push(40.0);
        let t = side_by_side(&[qemu, memvisor]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "vmem-resize (nested, L2 under kvm)            qemu    memvisor",
                "passed                                         yes          NO",
                "failed stage                                     -    scenario",
                "l1-boot (s)                                   7.50        7.50",
                "l2-boot (s)                                  15.25        4.00",
                "agent_s: VMM start to agent (s)              14.00       14.00",
                "plug_1g_usable_s: 1G usable in guest (s)      3.25           -",
                "unplug_1g_returned_s: 1G back on host (s)     2.50           -",
                "disk_write_s: 128M O_DIRECT write (s)         0.42           -",
                "boots (agent ready at, s)                     14.0  14.0, 40.0",
                "VMM exit after @@exit (status, s)          0, 1.25           -",
                "resize vmem0 1G (s)                           1.00        1.00",
                "resize vmem0 1G: RSS after (kB)            1650000     1150000",
                "resize vmem0 1G: VmLck+VmPin after (kB)          0           4",
                "resize vmem0 0 (s)                            1.00           -",
                "resize vmem0 0: back on host (s)              2.50           -",
                "resize vmem0 0: RSS after (kB)              620000           -",
                "resize vmem0 0: VmLck+VmPin after (kB)           0           -",
                "guest script exits with 0                     held      FAILED",
            ]
        );
        assert_eq!(side_by_side(&[]), "(no runs)\n");
    }

    #[test]
    fn other_steps_show_their_answer_and_checked_observations_their_last_value() {
        let mut qemu = report(VmmKind::Qemu, Vec::new(), true);
        let mut memvisor = report(VmmKind::Memvisor, Vec::new(), true);
        for (r, answer, read) in [
            (&mut qemu, "n/a", "0x00000000"),
            (&mut memvisor, "reads=2 writes=1", "0xFFFFFFFF"),
        ] {
            let mut s = step("unassigned vmem0", 0, 0, (0, 700_000), 0);
            s.resize = None;
            s.detail = answer.into();
            r.host_steps.push(s);
            r.checked_keys = vec!["unplugged_read".into()];
            for value in ["first", read] {
                r.guest.observations.push(Observation {
                    t: 1.0,
                    key: "unplugged_read".into(),
                    value: value.into(),
                });
            }
        }
        let t = side_by_side(&[qemu, memvisor]);
        assert!(
            t.contains("\nunassigned vmem0: answer                         n/a  reads=2 writes=1\n"),
            "{t}"
        );
        assert!(
            t.contains("\nobs unplugged_read                        0x00000000        0xFFFFFFFF\n"),
            "{t}"
        );
        assert!(!t.contains("back on host"), "{t}");
    }

    fn step(req: &str, from: u64, to: u64, rss: (u64, u64), lck: u64) -> HostStep {
        HostStep {
            t: 0.0,
            request: req.into(),
            seconds: 1.0,
            ok: true,
            detail: String::new(),
            resize: Some((from, to)),
            before: Some(HostSample {
                rss_kb: rss.0,
                ..Default::default()
            }),
            after: Some(HostSample {
                rss_kb: rss.1,
                lck_kb: lck,
                ..Default::default()
            }),
            returned_s: None,
            unassigned: None,
            size_events: None,
            save_restore_s: None,
            migration: None,
        }
    }

    /// `scenario`'s expectations checked against a QEMU run with `steps` and `guest`.
    fn eval(s: &Scenario, steps: &[HostStep], guest: &GuestReport) -> Vec<Checked> {
        let mut r = report(VmmKind::Qemu, steps.to_vec(), true);
        r.guest = guest.clone();
        evaluate(s, &r)
    }

    #[test]
    fn status_lines_parse() {
        let s = HostSample::parse(
            1.5,
            "VmHWM:\t 900 kB\nVmRSS:\t  800 kB\nVmLck:\t 12 kB\nVmPin:\t 0 kB\n",
        );
        assert_eq!((s.rss_kb, s.hwm_kb, s.lck_kb, s.pin_kb), (800, 900, 12, 0));
    }

    #[test]
    fn smaps_resident_memory_is_summed_inside_ram_blocks() {
        let smaps = "7f0000000000-7f0040000000 rw-p 00000000 00:00 0\nSize: 1048576 kB\nRss: 262144 kB\n\
                     7f0040000000-7f0040001000 ---p 00000000 00:00 0\nRss: 0 kB\n\
                     7f0050000000-7f0051000000 rw-p 00000000 00:00 0\nRss: 9000 kB\n\
                     7f1000000000-7f1020000000 rw-p 00000000 00:00 0\nRss: 4096 kB\n";
        let blocks = [
            RamBlock {
                name: "vmem".into(),
                hva: 0x7f0000000000,
                size: 1 << 30,
            },
            RamBlock {
                name: "pc.ram".into(),
                hva: 0x7f1000000000,
                size: 512 << 20,
            },
        ];
        // The emulator's heap at 7f0050000000 is outside every block.
        assert_eq!(resident_in(smaps, &blocks), 262_144 + 4096);
        assert_eq!(resident_in(smaps, &blocks[1..]), 4096);
        assert_eq!(resident_in(smaps, &[]), 0);
    }

    #[test]
    fn under_tcg_the_unplug_check_uses_the_guest_ram_rss() {
        let text = "name = \"t\"\n[vm]\nmemory = \"512M\"\n[guest]\nscript = \"true\"\n\
                    [[expect]]\nkind = \"rss-drop-on-unplug\"\nmin_fraction = 0.99\n";
        let s = Scenario::parse(text, "t").unwrap();
        let guest = GuestReport {
            exit_status: Some(0),
            ..Default::default()
        };
        // The VMM's RSS dropped by less than the unplugged 768 MiB (the emulator grew)...
        let mut st = step("resize vmem0 256M", 1 << 30, 256 << 20, (1_657_892, 880_376), 0);
        assert!(!eval(&s, std::slice::from_ref(&st), &guest)[1].passed);
        // ...while its guest RAM gave back all of it.
        st.before.as_mut().unwrap().ram_kb = Some(1_500_000);
        st.after.as_mut().unwrap().ram_kb = Some(1_500_000 - 786_432);
        let c = eval(&s, std::slice::from_ref(&st), &guest);
        assert!(c[1].passed && c[1].detail.contains("guest RAM RSS"), "{c:?}");
        // And it still fails if the guest RAM kept the memory.
        st.after.as_mut().unwrap().ram_kb = Some(1_500_000 - 700_000);
        assert!(!eval(&s, std::slice::from_ref(&st), &guest)[1].passed);
    }

    #[test]
    fn expectations_are_checked() {
        let text = "name = \"t\"\n[vm]\nmemory = \"512M\"\n[guest]\nscript = \"true\"\n\
                    [[expect]]\nkind = \"rss-drop-on-unplug\"\nmin_fraction = 0.99\n\
                    [[expect]]\nkind = \"locked-follows-plugged\"\n";
        let s = Scenario::parse(text, "t").unwrap();
        let guest = GuestReport {
            exit_status: Some(0),
            ..Default::default()
        };
        let g = 1 << 30;
        let steps = [
            step("resize vmem0 1G", 0, g, (600_000, 600_000), 1_572_864),
            step("resize vmem0 0", g, 0, (1_700_000, 650_000), 524_288),
        ];
        let c = eval(&s, &steps, &guest);
        assert_eq!(c.len(), 3);
        assert!(c[0].passed && c[1].passed && c[2].passed, "{c:?}");
        let steps = [step("resize vmem0 0", g, 0, (1_700_000, 1_000_000), 0)];
        let c = eval(
            &s,
            &steps,
            &GuestReport {
                exit_status: Some(1),
                ..Default::default()
            },
        );
        assert!(!c[0].passed && !c[1].passed && !c[2].passed, "{c:?}");
    }

    const NEW_KINDS: &str = "name = \"t\"\nhost_steps = [\"unassigned\", \"resize\"]\n\
                             [vm]\nmemory = \"512M\"\nreboot = true\n\
                             [[vm.vmem]]\nid = \"vmem0\"\nsize = \"1G\"\n[guest]\nscript = \"true\"\n\
                             [[expect]]\nkind = \"vmm-exit\"\nstatus = 0\nwithin_s = 60\n\
                             [[expect]]\nkind = \"boots\"\ncount = 2\n\
                             [[expect]]\nkind = \"unassigned-accesses\"\nvmm = \"memvisor\"\nid = \"vmem0\"\n\
                             min_reads = 1\nmin_writes = 1\n\
                             [[expect]]\nkind = \"rss-growth-below\"\nvmm = \"memvisor\"\n\
                             step = \"unassigned vmem0\"\nmax_kb = 1024\n";

    #[test]
    fn resizes_must_be_seen_in_events() {
        let s = Scenario::parse(
            "name = \"t\"\nhost_steps = [\"resize\"]\n[vm]\nmemory = \"512M\"\n[guest]\nscript = \"true\"\n\
             [[expect]]\nkind = \"resizes-seen-in-events\"\n",
            "t",
        )
        .unwrap();
        let e = &s.expect[0].check;
        let mut seen = step("resize vmem0 1G", 0, 1 << 30, (0, 0), 0);
        seen.size_events = Some(2);
        let mut polled = step("resize vmem0 0", 1 << 30, 0, (0, 0), 0);
        let same = step("resize vmem0 0", 0, 0, (0, 0), 0);
        let r = report(VmmKind::Memvisor, vec![seen.clone(), same.clone()], true);
        assert!(check(e, &s, &r).passed, "{:?}", check(e, &s, &r));
        let r = report(VmmKind::Memvisor, vec![seen.clone(), polled.clone()], true);
        let c = check(e, &s, &r);
        assert!(!c.passed && c.detail.contains("none (polled)"), "{c:?}");
        polled.size_events = Some(0);
        let r = report(VmmKind::Memvisor, vec![seen, polled], true);
        assert!(!check(e, &s, &r).passed, "a watch that never saw the change");
        let r = report(VmmKind::Memvisor, vec![same], true);
        assert!(!check(e, &s, &r).passed, "no resize at all proves nothing");
    }

    fn unassigned_step(counts: Option<AccessCounts>, rss_kb: u64) -> HostStep {
        let mut s = step("unassigned vmem0", 0, 0, (0, rss_kb), 0);
        s.resize = None;
        s.before = None;
        s.unassigned = counts;
        s
    }

    #[test]
    fn expectations_for_one_vmm_are_checked_only_under_it() {
        let s = Scenario::parse(NEW_KINDS, "t").unwrap();
        let mut r = report(VmmKind::Qemu, Vec::new(), true);
        r.guest.exit_status = Some(0);
        let names = |c: &[Checked]| c.iter().map(|c| c.expectation.clone()).collect::<Vec<_>>();
        let q = evaluate(&s, &r);
        assert_eq!(
            names(&q),
            [
                "guest script exits with 0",
                "the VMM exits by itself with 0 within 60 s of @@exit",
                "the guest agent starts 2 time(s)",
            ]
        );
        r.vmm = VmmKind::Memvisor;
        let m = evaluate(&s, &r);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[3].expectation,
            "the VMM counts at least 1 read(s) and 1 write(s) of unplugged memory of vmem0 (memvisor only)"
        );
        assert!(
            m[4].expectation
                .ends_with("between the `unassigned vmem0` steps (memvisor only)")
        );
    }

    #[test]
    fn the_vmm_exit_is_checked_for_status_and_time() {
        let s = Scenario::parse(NEW_KINDS, "t").unwrap();
        let mut r = report(VmmKind::Qemu, Vec::new(), true);
        let mut verdict = |x: Option<VmmExit>| {
            r.vmm_exit = x;
            let c = evaluate(&s, &r).remove(1);
            (c.passed, c.detail)
        };
        let exit = |status, seconds| Some(VmmExit { status, seconds });
        assert_eq!(
            verdict(exit(Some(0), 1.5)),
            (true, "exited with 0 1.50 s after @@exit".into())
        );
        assert_eq!(
            verdict(exit(Some(1), 1.5)),
            (false, "exited with 1 1.50 s after @@exit".into())
        );
        assert_eq!(
            verdict(exit(Some(0), 61.0)),
            (false, "exited with 0 61.00 s after @@exit".into())
        );
        assert_eq!(
            verdict(exit(None, 65.0)),
            (false, "still running 65.00 s after @@exit".into())
        );
        assert_eq!(verdict(None), (false, "no @@exit to wait from".into()));
    }

    #[test]
    fn boots_are_counted() {
        let s = Scenario::parse(NEW_KINDS, "t").unwrap();
        let mut r = report(VmmKind::Qemu, Vec::new(), true);
        assert!(!evaluate(&s, &r)[2].passed, "one boot of two");
        r.guest.boots.push(31.5);
        let c = evaluate(&s, &r).remove(2);
        assert!(c.passed, "{c:?}");
        assert_eq!(c.detail, "agent ready at [14.0, 31.5] s");
    }

    #[test]
    fn unplugged_accesses_and_rss_growth_are_checked_under_memvisor() {
        let s = Scenario::parse(NEW_KINDS, "t").unwrap();
        let mut r = report(VmmKind::Memvisor, Vec::new(), true);
        let mut checks = |steps: Vec<HostStep>| {
            r.host_steps = steps;
            let c = evaluate(&s, &r);
            ((c[3].passed, c[3].detail.clone()), (c[4].passed, c[4].detail.clone()))
        };
        let counts = |reads, writes| Some(AccessCounts { reads, writes });
        let (unassigned, growth) = checks(vec![
            unassigned_step(counts(0, 0), 700_000),
            unassigned_step(counts(2, 1), 700_100),
        ]);
        assert_eq!(unassigned, (true, "reads 2 writes 1".into()));
        assert_eq!(growth, (true, "RSS 700000 -> 700100 kB, grew 100 kB".into()));
        // The accessed 2 MiB block became resident: the RSS check fails; no write counted.
        let (unassigned, growth) = checks(vec![
            unassigned_step(counts(0, 0), 700_000),
            unassigned_step(counts(3, 0), 702_048),
        ]);
        assert_eq!(unassigned, (false, "reads 3 writes 0".into()));
        assert_eq!(growth, (false, "RSS 700000 -> 702048 kB, grew 2048 kB".into()));
        // A VMM without counts, a single step, no step.
        let (unassigned, growth) = checks(vec![unassigned_step(None, 700_000)]);
        assert_eq!(unassigned, (false, "the VMM does not count them".into()));
        assert_eq!(
            growth,
            (false, "1 `unassigned vmem0` step(s) with a sample, 2 needed".into())
        );
        let (unassigned, _) = checks(Vec::new());
        assert_eq!(unassigned, (false, "no `unassigned vmem0` step".into()));
    }

    #[test]
    fn figures_come_from_the_agent_the_guest_and_the_1g_unplug() {
        let g = 1 << 30;
        let mut guest = GuestReport {
            agent_ready_at: Some(9.5),
            ..Default::default()
        };
        for (key, value) in [
            ("plug_1g_usable_s", "4.20"),
            ("disk_write_s", "0.37"),
            ("disk_read_s", " 0.21"),
            ("disk_read_s", "9.99"),
        ] {
            guest.observations.push(Observation {
                t: 1.0,
                key: key.into(),
                value: value.into(),
            });
        }
        let mut partial = step("resize vmem0 256M", g, 256 << 20, (0, 0), 0);
        partial.returned_s = Some(1.0);
        let mut whole = step("resize vmem0 0", g, 0, (0, 0), 0);
        whole.returned_s = Some(3.5);
        let mut restore = step("restore", 0, 0, (0, 0), 0);
        restore.resize = None;
        restore.save_restore_s = Some((3.8, 0.9));
        let mut migrate = step("migrate", 0, 0, (0, 0), 0);
        migrate.resize = None;
        migrate.migration = Some(crate::vmm::MigrationFigures {
            total_s: 4.5,
            downtime_s: 4.25,
            bytes: 1 << 28,
            passes: 3,
        });
        let steps = [
            step("resize vmem0 1G", 0, g, (0, 0), 0),
            partial,
            whole,
            restore,
            migrate,
        ];
        let f = Figures::of(&steps, &guest);
        assert_eq!(
            f,
            Figures {
                agent_s: Some(9.5),
                plug_1g_usable_s: Some(4.2),
                unplug_1g_returned_s: Some(3.5),
                disk_write_s: Some(0.37),
                disk_read_s: Some(0.21),
                snapshot_save_s: Some(3.8),
                snapshot_restore_s: Some(0.9),
                migrate_total_s: Some(4.5),
                migrate_downtime_s: Some(4.25),
            }
        );
        assert_eq!(
            f.named().map(|(name, _)| name),
            [
                "agent_s",
                "plug_1g_usable_s",
                "unplug_1g_returned_s",
                "disk_write_s",
                "disk_read_s",
                "snapshot_save_s",
                "snapshot_restore_s",
                "migrate_total_s",
                "migrate_downtime_s"
            ]
        );
        assert_eq!(f.named()[3], ("disk_write_s", Some(0.37)));
        assert_eq!(Figures::of(&[], &GuestReport::default()), Figures::default());
    }

    #[test]
    fn observations_are_checked_and_described_by_their_bounds() {
        let text = "name = \"t\"\n[vm]\nmemory = \"512M\"\n[guest]\nscript = \"true\"\n\
                    [[expect]]\nkind = \"observation\"\nkey = \"n\"\nmin = 1\nmax = 4\n\
                    [[expect]]\nkind = \"observation\"\nkey = \"read\"\nequals = \"0xFFFFFFFF\"\nvmm = \"memvisor\"\n";
        let s = Scenario::parse(text, "t").unwrap();
        let mut r = report(VmmKind::Memvisor, Vec::new(), true);
        r.guest.exit_status = Some(0);
        for (key, value) in [("n", "2"), ("n", "4"), ("read", "0xFFFFFFFF")] {
            r.guest.observations.push(Observation {
                t: 0.0,
                key: key.into(),
                value: value.into(),
            });
        }
        let c = evaluate(&s, &r);
        assert_eq!(c[1].expectation, "observation n >= 1, <= 4");
        assert_eq!(c[2].expectation, "observation read == 0xFFFFFFFF (memvisor only)");
        assert!(c[1].passed && c[2].passed, "{c:?}");
        r.guest.observations[1].value = "5".into();
        r.guest.observations[2].value = "0x00000000".into();
        let c = evaluate(&s, &r);
        assert!(!c[1].passed && !c[2].passed, "{c:?}");
        assert_eq!(c[2].detail, "values [\"0x00000000\"]");
    }
}
