//! `memvisor lab bench`: scenarios run under QEMU and memvisor in turn, in the same setup;
//! for each named figure ([`Figures`]) both VMMs have, the median of each VMM's runs and the
//! ratio memvisor ÷ QEMU against its goal. Every figure is seconds, so lower is better and a
//! ratio below 1 means memvisor was faster.
//!
//! [`summarize`] is the computation, apart from running anything; the command line runs
//! the scenarios (with [`crate::run_each`], in the [`order`] of each round) and passes it
//! one [`BenchRun`] per run.

use serde::Serialize;

use crate::report::{Figures, Report};
use crate::vmm::VmmKind;

/// The scenarios `lab bench` runs when none is named.
pub const DEFAULT_SCENARIOS: [&str; 5] = ["boot", "vmem-resize", "blk-zero-copy", "vfio-nvme", "live-migrate"];

/// The goal of `agent_s`'s ratio (memvisor at most 80% of QEMU's time to the agent).
pub const AGENT_GOAL: f64 = 0.8;

/// The goal of every other figure's ratio (memvisor no slower than QEMU).
pub const DEFAULT_GOAL: f64 = 1.0;

/// The VMMs of round `round` (0-based) in the order they run: QEMU first in even rounds,
/// memvisor first in odd ones, so neither always runs on a freshly warmed host.
pub fn order(round: usize) -> [VmmKind; 2] {
    if round % 2 == 0 {
        [VmmKind::Qemu, VmmKind::Memvisor]
    } else {
        [VmmKind::Memvisor, VmmKind::Qemu]
    }
}

/// The highest ratio memvisor ÷ QEMU that meets the goal of `figure`.
pub fn goal(figure: &str) -> f64 {
    if figure == "agent_s" { AGENT_GOAL } else { DEFAULT_GOAL }
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One run of one scenario under one VMM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchRun {
    /// The scenario as named on the command line.
    pub scenario: String,
    /// The round, from 1.
    pub round: usize,
    /// The VMM that ran the guest.
    pub vmm: VmmKind,
    /// Why the run failed (a stage, an expectation, or nothing could start); `None` if
    /// every stage ran and every expectation held.
    pub failure: Option<String>,
    /// The run's named figures (only a run without a failure counts).
    pub figures: Figures,
}

impl BenchRun {
    /// The run of `report` (round `round`, from 1, of `scenario`).
    pub fn of_report(scenario: &str, round: usize, report: &Report) -> BenchRun {
        let failure = (!report.passed).then(|| match &report.failed_stage {
            Some(stage) => format!(
                "stage `{stage}` failed: {}",
                first_line(report.error.as_deref().unwrap_or(""))
            ),
            None => {
                let failed: Vec<&str> = report
                    .expectations
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| c.expectation.as_str())
                    .collect();
                format!("expectation failed: {}", failed.join("; "))
            }
        });
        BenchRun {
            scenario: scenario.to_string(),
            round,
            vmm: report.vmm,
            failure,
            figures: report.figures,
        }
    }

    /// A run that gave no report (nothing could start), with why.
    pub fn not_started(scenario: &str, round: usize, vmm: VmmKind, error: &str) -> BenchRun {
        BenchRun {
            scenario: scenario.to_string(),
            round,
            vmm,
            failure: Some(format!("did not start: {}", first_line(error))),
            figures: Figures::default(),
        }
    }
}

/// The first line of `text`, at most 200 characters.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

/// One figure of one scenario under both VMMs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// The scenario.
    pub scenario: String,
    /// The figure's name (a field of [`Figures`]).
    pub figure: &'static str,
    /// QEMU's values (seconds), one per run that passed, in run order.
    pub qemu: Vec<f64>,
    /// memvisor's values (seconds), likewise.
    pub memvisor: Vec<f64>,
    /// The median of `qemu`.
    pub qemu_median: f64,
    /// The median of `memvisor`.
    pub memvisor_median: f64,
    /// `memvisor_median / qemu_median`; `None` when QEMU's median is not above 0.
    pub ratio: Option<f64>,
    /// The highest ratio that meets the goal ([`goal`]).
    pub goal: f64,
    /// Whether the ratio is at most the goal.
    pub met: bool,
}

/// A run that failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// The scenario.
    pub scenario: String,
    /// The round, from 1.
    pub round: usize,
    /// The VMM.
    pub vmm: VmmKind,
    /// What failed.
    pub reason: String,
}

/// What a bench found: the ratios, the failed runs, and every run's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The scenarios in the order they ran.
    pub scenarios: Vec<String>,
    /// Per scenario, per figure both VMMs have (from the runs that passed), in the order
    /// of [`Figures::named`].
    pub ratios: Vec<Ratio>,
    /// The runs that failed.
    pub failures: Vec<Failure>,
    /// Every run, in the order they ran.
    pub runs: Vec<BenchRun>,
}

/// The medians and ratios of `runs`: per scenario (in the order first seen) and figure, the
/// values of the runs without a failure under each VMM; a figure gets a [`Ratio`] when both
/// VMMs have at least one value. Failed runs count for nothing but a [`Failure`].
pub fn summarize(runs: &[BenchRun]) -> Summary {
    let mut scenarios: Vec<String> = Vec::new();
    for r in runs {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario.clone());
        }
    }
    let mut ratios = Vec::new();
    for scenario in &scenarios {
        let values = |vmm: VmmKind, i: usize| -> Vec<f64> {
            runs.iter()
                .filter(|r| r.scenario == *scenario && r.vmm == vmm && r.failure.is_none())
                .filter_map(|r| r.figures.named()[i].1)
                .collect()
        };
        for (i, (figure, _)) in Figures::default().named().into_iter().enumerate() {
            let (qemu, memvisor) = (values(VmmKind::Qemu, i), values(VmmKind::Memvisor, i));
            let (Some(q), Some(m)) = (median(&qemu), median(&memvisor)) else {
                continue;
            };
            let ratio = (q > 0.0).then(|| m / q);
            let goal = goal(figure);
            ratios.push(Ratio {
                scenario: scenario.clone(),
                figure,
                qemu,
                memvisor,
                qemu_median: q,
                memvisor_median: m,
                ratio,
                goal,
                met: ratio.is_some_and(|r| r <= goal),
            });
        }
    }
    let failures = runs
        .iter()
        .filter_map(|r| {
            Some(Failure {
                scenario: r.scenario.clone(),
                round: r.round,
                vmm: r.vmm,
                reason: r.failure.clone()?,
            })
        })
        .collect();
    Summary {
        scenarios,
        ratios,
        failures,
        runs: runs.to_vec(),
    }
}

impl Summary {
    /// Whether no run failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The table: a row per scenario and figure (QEMU's and memvisor's median seconds, the
    /// number of values of each, the ratio memvisor ÷ QEMU, the goal, `met`/`not met`),
    /// then a `FAILED` row per failed run of the scenario (its VMM, round and what failed
    /// after the figure column).
    pub fn table(&self) -> String {
        let header = [
            "scenario",
            "figure",
            "qemu (s)",
            "memvisor (s)",
            "n",
            "memvisor/qemu",
            "goal",
            "",
        ];
        // Each row's cells, and for a failed run the text after its `FAILED`.
        let mut rows: Vec<(Vec<String>, Option<String>)> = vec![(header.iter().map(|h| h.to_string()).collect(), None)];
        for scenario in &self.scenarios {
            for r in self.ratios.iter().filter(|r| r.scenario == *scenario) {
                let cells = vec![
                    r.scenario.clone(),
                    r.figure.to_string(),
                    format!("{:.2}", r.qemu_median),
                    format!("{:.2}", r.memvisor_median),
                    format!("{}/{}", r.qemu.len(), r.memvisor.len()),
                    r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.3}")),
                    format!("<= {:.1}", r.goal),
                    if r.met { "met" } else { "not met" }.into(),
                ];
                rows.push((cells, None));
            }
            for f in self.failures.iter().filter(|f| f.scenario == *scenario) {
                let text = format!("{} round {}: {}", f.vmm, f.round, f.reason);
                rows.push((vec![f.scenario.clone(), "FAILED".into()], Some(text)));
            }
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .filter_map(|(r, _)| r.get(c))
                    .map(String::len)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (cells, text) in &rows {
            let mut line = String::new();
            for (c, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if c < 2 {
                    line.push_str(&format!("{cell:<w$}  "));
                } else {
                    line.push_str(&format!("{cell:>w$}  "));
                }
            }
            line.push_str(text.as_deref().unwrap_or(""));
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if self.scenarios.is_empty() {
            out.push_str("(no runs)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, round: usize, vmm: VmmKind, agent_s: f64, disk_write_s: Option<f64>) -> BenchRun {
        BenchRun {
            scenario: scenario.into(),
            round,
            vmm,
            failure: None,
            figures: Figures {
                agent_s: Some(agent_s),
                disk_write_s,
                ..Default::default()
            },
        }
    }

    #[test]
    fn rounds_alternate_which_vmm_runs_first() {
        use VmmKind::{Memvisor, Qemu};
        assert_eq!(order(0), [Qemu, Memvisor]);
        assert_eq!(order(1), [Memvisor, Qemu]);
        assert_eq!(order(2), [Qemu, Memvisor]);
        assert_eq!(order(7), [Memvisor, Qemu]);
    }

    #[test]
    fn medians_and_goals() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 10.0]), Some(3.5));
        assert_eq!(goal("agent_s"), 0.8);
        assert_eq!(goal("plug_1g_usable_s"), 1.0);
        assert_eq!(goal("disk_read_s"), 1.0);
    }

    #[test]
    fn ratios_are_memvisor_over_qemu_of_the_medians_and_checked_against_the_goal() {
        use VmmKind::{Memvisor, Qemu};
        let runs = [
            run("boot", 1, Qemu, 10.0, None),
            run("boot", 1, Memvisor, 9.0, None),
            run("boot", 2, Memvisor, 7.0, None),
            run("boot", 2, Qemu, 12.0, None),
            run("boot", 3, Qemu, 11.0, None),
            run("boot", 3, Memvisor, 30.0, None),
            run("vfio-nvme", 1, Qemu, 10.0, Some(0.5)),
            run("vfio-nvme", 1, Memvisor, 7.5, Some(0.4)),
        ];
        let s = summarize(&runs);
        assert!(s.passed());
        assert_eq!(s.scenarios, ["boot", "vfio-nvme"]);
        let got: Vec<_> = s
            .ratios
            .iter()
            .map(|r| (r.scenario.as_str(), r.figure, r.qemu_median, r.memvisor_median, r.met))
            .collect();
        assert_eq!(
            got,
            [
                // Medians 11 and 9: 0.818 > 0.8.
                ("boot", "agent_s", 11.0, 9.0, false),
                // 7.5 / 10 = 0.75 <= 0.8.
                ("vfio-nvme", "agent_s", 10.0, 7.5, true),
                // 0.4 / 0.5 = 0.8 <= 1.0.
                ("vfio-nvme", "disk_write_s", 0.5, 0.4, true),
            ]
        );
        assert!((s.ratios[0].ratio.unwrap() - 9.0 / 11.0).abs() < 1e-12);
        assert_eq!(s.ratios[0].qemu, [10.0, 12.0, 11.0]);
        assert_eq!(s.ratios[0].memvisor, [9.0, 7.0, 30.0]);
        assert_eq!(s.ratios[0].goal, 0.8);
        assert_eq!(s.ratios[2].goal, 1.0);
        assert!((s.ratios[2].ratio.unwrap() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn a_figure_needs_both_vmms_and_a_zero_qemu_median_has_no_ratio() {
        use VmmKind::{Memvisor, Qemu};
        let runs = [
            run("blk-zero-copy", 1, Qemu, 10.0, Some(0.0)),
            run("blk-zero-copy", 1, Memvisor, 12.0, Some(0.01)),
            run("vmem-resize", 1, Qemu, 10.0, Some(1.0)),
            run("vmem-resize", 1, Memvisor, 9.0, None),
        ];
        let s = summarize(&runs);
        let names: Vec<_> = s.ratios.iter().map(|r| (r.scenario.as_str(), r.figure)).collect();
        assert_eq!(
            names,
            [
                ("blk-zero-copy", "agent_s"),
                ("blk-zero-copy", "disk_write_s"),
                ("vmem-resize", "agent_s"),
            ]
        );
        assert_eq!(s.ratios[0].ratio, Some(1.2));
        assert!(!s.ratios[0].met);
        assert_eq!(s.ratios[1].ratio, None);
        assert!(!s.ratios[1].met);
    }

    #[test]
    fn failed_runs_count_for_nothing_but_a_failure_row() {
        use VmmKind::{Memvisor, Qemu};
        let mut bad = run("boot", 2, Memvisor, 1.0, None);
        bad.failure = Some("stage `scenario` failed: timed out".into());
        let runs = [
            run("boot", 1, Qemu, 10.0, None),
            run("boot", 1, Memvisor, 7.0, None),
            bad,
            run("boot", 2, Qemu, 12.0, None),
            BenchRun::not_started("nope", 1, Qemu, "no such scenario\nsecond line"),
            BenchRun::not_started("nope", 1, Memvisor, "no such scenario"),
        ];
        let s = summarize(&runs);
        assert!(!s.passed());
        assert_eq!(s.ratios.len(), 1);
        // Memvisor's failed 1.0 s is not in the median.
        assert_eq!(s.ratios[0].memvisor, [7.0]);
        assert_eq!(s.ratios[0].qemu_median, 11.0);
        assert_eq!(s.failures.len(), 3);
        assert_eq!(s.failures[1].reason, "did not start: no such scenario");
        let table = s.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "scenario  figure   qemu (s)  memvisor (s)    n  memvisor/qemu    goal",
                "boot      agent_s     11.00          7.00  2/1          0.636  <= 0.8  met",
                "boot      FAILED   memvisor round 2: stage `scenario` failed: timed out",
                "nope      FAILED   qemu round 1: did not start: no such scenario",
                "nope      FAILED   memvisor round 1: did not start: no such scenario",
            ]
        );
    }

    fn report(vmm: VmmKind) -> Report {
        Report {
            scenario: "vfio-nvme".into(),
            vmm,
            mode: crate::host::Mode::Nested,
            mode_reason: "auto".into(),
            l2_accel: crate::vmm::Accel::Kvm,
            tcg_fallback: None,
            passed: true,
            failed_stage: None,
            error: None,
            stages: Vec::new(),
            host_steps: Vec::new(),
            guest: Default::default(),
            vmm_exit: None,
            figures: Figures {
                agent_s: Some(9.0),
                disk_read_s: Some(0.25),
                ..Default::default()
            },
            expectations: vec![
                crate::report::Checked {
                    expectation: "guest script exits with 0".into(),
                    passed: true,
                    detail: String::new(),
                },
                crate::report::Checked {
                    expectation: "after every resize VmLck+VmPin >= boot + plugged".into(),
                    passed: true,
                    detail: String::new(),
                },
            ],
            checked_keys: Vec::new(),
            packages: Default::default(),
            work_dir: None,
            console_tail: Vec::new(),
        }
    }

    #[test]
    fn a_report_gives_its_figures_and_why_it_failed() {
        let mut r = report(VmmKind::Memvisor);
        let run = BenchRun::of_report("vfio-nvme", 2, &r);
        assert_eq!(
            (run.round, run.vmm, run.failure, run.figures.disk_read_s),
            (2, VmmKind::Memvisor, None, Some(0.25))
        );
        r.passed = false;
        r.expectations[1].passed = false;
        assert_eq!(
            BenchRun::of_report("vfio-nvme", 1, &r).failure.as_deref(),
            Some("expectation failed: after every resize VmLck+VmPin >= boot + plugged")
        );
        r.failed_stage = Some("l2-boot".into());
        r.error = Some("no agent within 120 s\nlast lines...".into());
        assert_eq!(
            BenchRun::of_report("vfio-nvme", 1, &r).failure.as_deref(),
            Some("stage `l2-boot` failed: no agent within 120 s")
        );
        let s = summarize(&[]);
        assert!(s.passed());
        assert_eq!(
            s.table(),
            "scenario  figure  qemu (s)  memvisor (s)  n  memvisor/qemu  goal\n(no runs)\n"
        );
    }
}
