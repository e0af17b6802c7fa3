//! The JSON report of a run and the check of a scenario's expectations against it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::host::Mode;
use crate::scenario::{Expectation, Scenario};
use crate::vmm::{Accel, RamBlock, VmmKind};

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
    /// The expectations and whether they held.
    pub expectations: Vec<Checked>,
    /// The Debian packages used (name to version).
    pub packages: BTreeMap<String, String>,
    /// The work folder, when kept.
    pub work_dir: Option<String>,
    /// The last console lines (L1's when nested, L2's, the VMM's stderr when direct) when
    /// something failed.
    pub console_tail: Vec<String>,
}

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

/// Checks `scenario`'s expectations (and a zero guest exit status unless stated otherwise).
pub fn evaluate(scenario: &Scenario, host_steps: &[HostStep], guest: &GuestReport) -> Vec<Checked> {
    let mut expectations = scenario.expect.clone();
    if !expectations.iter().any(|e| matches!(e, Expectation::GuestExit { .. })) {
        expectations.insert(0, Expectation::GuestExit { status: 0 });
    }
    let boot_kb = scenario.vm.memory.0 / 1024;
    let resizes: Vec<_> = host_steps
        .iter()
        .filter_map(|s| Some((s, s.resize?, s.before?, s.after?)))
        .collect();
    expectations
        .iter()
        .map(|e| match e {
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
                Checked {
                    expectation: format!("observation {key} within min {min:?} max {max:?} equals {equals:?}"),
                    passed: !values.is_empty() && values.iter().all(|v| ok(v)),
                    detail: format!("values {values:?}"),
                }
            }
            Expectation::RssDropOnUnplug { min_fraction } => {
                let shrinks: Vec<_> = resizes.iter().filter(|(_, (from, to), _, _)| to < from).collect();
                let details: Vec<_> = shrinks
                    .iter()
                    .map(|(s, (from, to), b, a)| {
                        let want = (from - to) as f64 / 1024.0 * min_fraction;
                        // Under TCG: the guest RAM's own RSS (the emulator's grows meanwhile).
                        let (what, before, after) = match (b.ram_kb, a.ram_kb) {
                            (Some(rb), Some(ra)) => ("guest RAM RSS", rb, ra),
                            _ => ("RSS", b.rss_kb, a.rss_kb),
                        };
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
                Checked {
                    expectation: format!(
                        "unplug lowers the VMM's RSS (its guest RAM's under TCG) by at least {min_fraction} of the unplugged bytes"
                    ),
                    passed: !details.is_empty() && details.iter().all(|(ok, _)| *ok),
                    detail: details.into_iter().map(|(_, d)| d).collect::<Vec<_>>().join("; "),
                }
            }
            Expectation::LockedFollowsPlugged => {
                let details: Vec<_> = resizes
                    .iter()
                    .map(|(s, (_, to), _, a)| {
                        let want = boot_kb + to / 1024;
                        (
                            a.locked_kb() >= want,
                            format!("{}: locked {} kB, need {want}", s.request, a.locked_kb()),
                        )
                    })
                    .collect();
                Checked {
                    expectation: "the VMM's locked memory follows boot plus plugged memory".into(),
                    passed: !details.is_empty() && details.iter().all(|(ok, _)| *ok),
                    detail: details.into_iter().map(|(_, d)| d).collect::<Vec<_>>().join("; "),
                }
            }
            Expectation::LockedBelow { max_kb } => {
                let details: Vec<_> = resizes
                    .iter()
                    .map(|(s, _, _, a)| {
                        (
                            a.locked_kb() <= *max_kb,
                            format!("{}: locked {} kB", s.request, a.locked_kb()),
                        )
                    })
                    .collect();
                Checked {
                    expectation: format!("the VMM's locked memory stays at most {max_kb} kB"),
                    passed: !details.is_empty() && details.iter().all(|(ok, _)| *ok),
                    detail: details.into_iter().map(|(_, d)| d).collect::<Vec<_>>().join("; "),
                }
            }
        })
        .collect()
}

/// The reports of one scenario under several VMMs side by side, as a text table: a column
/// per report (headed by its VMM), a row per figure: passed, failed stage, each stage's
/// seconds, the agent's start, and for each host step (matched by position; the guest script
/// is the same) its seconds and the VMM's RSS, guest RAM RSS (under TCG) and locked memory
/// after it, then each expectation. A figure a run does not have is `-`; no reports give
/// `(no runs)`.
pub fn side_by_side(reports: &[Report]) -> String {
    let Some(first) = reports.first() else {
        return "(no runs)\n".into();
    };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: String, cell: &dyn Fn(&Report) -> Option<String>| {
        let cells: Vec<String> = reports.iter().map(|r| cell(r).unwrap_or_else(|| "-".into())).collect();
        rows.push((label, cells));
    };
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
    row("agent ready (s)".into(), &|r| {
        r.guest.agent_ready_at.map(|t| format!("{t:.2}"))
    });
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
        row(format!("{req}: RSS after (kB)"), &|r| {
            step(r)?.after.map(|a| a.rss_kb.to_string())
        });
        if reports.iter().any(|r| step(r).and_then(|s| s.after?.ram_kb).is_some()) {
            row(format!("{req}: guest RAM RSS after (kB)"), &|r| {
                step(r)?.after?.ram_kb.map(|k| k.to_string())
            });
        }
        row(format!("{req}: locked after (kB)"), &|r| {
            step(r)?.after.map(|a| a.locked_kb().to_string())
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
                ..Default::default()
            },
            expectations: vec![Checked {
                expectation: "guest script exits with 0".into(),
                passed,
                detail: String::new(),
            }],
            packages: BTreeMap::new(),
            work_dir: None,
            console_tail: Vec::new(),
        }
    }

    #[test]
    fn both_vmms_figures_stand_side_by_side() {
        let g = 1 << 30;
        let qemu = report(
            VmmKind::Qemu,
            vec![
                step("resize vmem0 1G", 0, g, (600_000, 1_650_000), 0),
                step("resize vmem0 0", g, 0, (1_650_000, 620_000), 0),
            ],
            true,
        );
        let memvisor = report(
            VmmKind::Memvisor,
            vec![step("resize vmem0 1G", 0, g, (100_000, 1_150_000), 4)],
            false,
        );
        let t = side_by_side(&[qemu, memvisor]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "vmem-resize (nested, L2 under kvm)     qemu  memvisor",
                "passed                                  yes        NO",
                "failed stage                              -  scenario",
                "l1-boot (s)                            7.50      7.50",
                "l2-boot (s)                           15.25      4.00",
                "agent ready (s)                       14.00     14.00",
                "resize vmem0 1G (s)                    1.00      1.00",
                "resize vmem0 1G: RSS after (kB)     1650000   1150000",
                "resize vmem0 1G: locked after (kB)        0         4",
                "resize vmem0 0 (s)                     1.00         -",
                "resize vmem0 0: RSS after (kB)       620000         -",
                "resize vmem0 0: locked after (kB)         0         -",
                "guest script exits with 0              held    FAILED",
            ]
        );
        assert_eq!(side_by_side(&[]), "(no runs)\n");
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
        }
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
        assert!(!evaluate(&s, std::slice::from_ref(&st), &guest)[1].passed);
        // ...while its guest RAM gave back all of it.
        st.before.as_mut().unwrap().ram_kb = Some(1_500_000);
        st.after.as_mut().unwrap().ram_kb = Some(1_500_000 - 786_432);
        let c = evaluate(&s, std::slice::from_ref(&st), &guest);
        assert!(c[1].passed && c[1].detail.contains("guest RAM RSS"), "{c:?}");
        // And it still fails if the guest RAM kept the memory.
        st.after.as_mut().unwrap().ram_kb = Some(1_500_000 - 700_000);
        assert!(!evaluate(&s, std::slice::from_ref(&st), &guest)[1].passed);
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
        let c = evaluate(&s, &steps, &guest);
        assert_eq!(c.len(), 3);
        assert!(c[0].passed && c[1].passed && c[2].passed, "{c:?}");
        let steps = [step("resize vmem0 0", g, 0, (1_700_000, 1_000_000), 0)];
        let c = evaluate(
            &s,
            &steps,
            &GuestReport {
                exit_status: Some(1),
                ..Default::default()
            },
        );
        assert!(!c[0].passed && !c[1].passed && !c[2].passed, "{c:?}");
    }
}
