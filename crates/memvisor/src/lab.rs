//! `memvisor lab`: real Linux guests (the `memvisor-lab` crate), nested
//! under an L1 or directly on this host's KVM, scenario by scenario, with
//! QEMU as the reference VMM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use memvisor_lab::{ModeChoice, Report, RunOptions, VmmKind};

/// Where the shipped scenarios are.
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/scenarios")
}

/// A scenario file: `name` as a path if it is one, else the shipped
/// scenario of that name.
fn scenario_path(name: &str) -> PathBuf {
    let path = PathBuf::from(name);
    if path.exists() {
        path
    } else {
        scenarios_dir().join(format!("{name}.toml"))
    }
}

/// `memvisor lab setup`: fetches and unpacks the lab's Debian packages.
pub fn setup() -> ExitCode {
    match memvisor_lab::setup(None) {
        Ok(packages) => {
            println!("{}", packages.root.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("memvisor lab setup: {e}");
            ExitCode::from(2)
        }
    }
}

/// What `memvisor lab run` was asked to do.
#[derive(Debug, Clone)]
pub struct LabArgs {
    /// The scenario: a shipped name or a file.
    pub scenario: String,
    /// The VMM that runs the guest.
    pub vmm: VmmKind,
    /// Nested, direct, or whichever this host's KVM allows.
    pub mode: ModeChoice,
    /// A guest script that replaces the scenario's.
    pub guest_script: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    pub json: bool,
    /// Keep the work folder.
    pub keep: bool,
    /// Echo the consoles to stderr.
    pub verbose: bool,
}

/// `memvisor lab run`: exit 0 if every stage ran and every expectation
/// held, 1 if not, 2 if nothing could start (a bad scenario, a scenario this
/// host cannot run in the chosen mode, setup).
pub fn run(args: &LabArgs) -> ExitCode {
    let options = RunOptions {
        scenario: scenario_path(&args.scenario),
        vmm: args.vmm,
        mode: args.mode,
        guest_script: args.guest_script.clone(),
        keep: args.keep,
        cache_dir: None,
        verbose: args.verbose,
    };
    let report = match memvisor_lab::run(&options) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("memvisor lab: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("a report serializes"));
    }
    print_summary(&report);
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_summary(report: &Report) {
    for s in &report.stages {
        eprintln!(
            "stage {:<9} {:>8.2} s {}",
            s.name,
            s.seconds,
            if s.ok { "ok" } else { "FAILED" }
        );
    }
    if !report.passed {
        if let Some(stage) = &report.failed_stage {
            eprintln!("stage `{stage}` failed: {}", report.error.as_deref().unwrap_or(""));
        }
        for c in report.expectations.iter().filter(|c| !c.passed) {
            eprintln!("expectation failed: {} ({})", c.expectation, c.detail);
        }
        if report.guest.exit_status.is_some_and(|s| s != 0) {
            eprintln!("guest script output:");
            for l in &report.guest.output {
                eprintln!("  {l}");
            }
        }
        eprintln!("last console lines:");
        for l in &report.console_tail {
            eprintln!("  {l}");
        }
    }
    eprintln!(
        "{} ({}, {}, L2 under {}): {}",
        report.scenario,
        report.vmm,
        report.mode,
        report.l2_accel,
        if report.passed { "PASSED" } else { "FAILED" }
    );
}
