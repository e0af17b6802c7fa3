//! `memvisor lab`: real Linux guests (the `memvisor-lab` crate), nested
//! under an L1 or directly on this host's KVM, scenario by scenario, with
//! QEMU as the reference VMM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use memvisor_lab::bench::{self, BenchRun};
use memvisor_lab::{ModeChoice, Report, RunOptions, Scenario, VmmKind};

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

/// `memvisor lab proxy`: relays one migration stream from `listen` to `target` (Unix
/// sockets), breaking it as `fault` says; prints the bytes that went through.
pub fn proxy(listen: &Path, target: &Path, fault: memvisor_lab::proxy::Fault) -> ExitCode {
    let relayed = memvisor_lab::proxy::Proxy::bind(listen, target, fault)
        .map_err(|e| format!("binding {}: {e}", listen.display()))
        .and_then(|p| {
            p.relay_one()
                .map_err(|e| format!("relaying to {}: {e}", target.display()))
        });
    match relayed {
        Ok(bytes) => {
            println!("relayed {bytes} bytes");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("memvisor lab proxy: {e}");
            ExitCode::from(2)
        }
    }
}

/// What `memvisor lab run` was asked to do.
#[derive(Debug, Clone)]
pub struct LabArgs {
    /// The scenario: a shipped name or a file.
    pub scenario: String,
    /// The VMMs that run the guest, one after the other.
    pub vmms: Vec<VmmKind>,
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
/// With several VMMs, each runs in turn; the reports are printed side by side (and as a
/// JSON array with `--json`) and the exit status is the worst of them.
pub fn run(args: &LabArgs) -> ExitCode {
    let Some(&first) = args.vmms.first() else {
        eprintln!("memvisor lab: no VMM given");
        return ExitCode::from(2);
    };
    let options = RunOptions {
        scenario: scenario_path(&args.scenario),
        vmm: first,
        mode: args.mode,
        guest_script: args.guest_script.clone(),
        keep: args.keep,
        cache_dir: None,
        verbose: args.verbose,
    };
    let mut reports = Vec::new();
    let mut status = 0u8;
    for (vmm, result) in memvisor_lab::run_each(&options, &args.vmms) {
        match result {
            Ok(report) => {
                print_summary(&report);
                if !report.passed {
                    status = status.max(1);
                }
                reports.push(report);
            }
            Err(e) => {
                eprintln!("memvisor lab ({vmm}): {e}");
                status = 2;
            }
        }
    }
    if args.json {
        let json = match reports.as_slice() {
            [one] if args.vmms.len() == 1 => serde_json::to_string(one),
            all => serde_json::to_string(all),
        };
        println!("{}", json.expect("a report serializes"));
    }
    if args.vmms.len() > 1 {
        eprint!("{}", memvisor_lab::report::side_by_side(&reports));
    }
    ExitCode::from(status)
}

/// What `memvisor lab bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// The scenarios (shipped names or files); [`bench::DEFAULT_SCENARIOS`] if empty.
    pub scenarios: Vec<String>,
    /// How many times each scenario runs under each VMM.
    pub rounds: usize,
    /// Nested, direct, or whichever this host's KVM allows.
    pub mode: ModeChoice,
    /// Print the summary as JSON on stdout instead of the table.
    pub json: bool,
}

/// `memvisor lab bench`: each scenario, round after round, under QEMU and memvisor (the
/// same runs as `lab run --vmm qemu,memvisor`, the order swapped every other round), then
/// per named figure both VMMs have the medians and the ratio memvisor ÷ QEMU against its
/// goal (`memvisor_lab::bench`). Exit 0 if every run passed, 1 if one failed (after
/// printing everything), 2 if a scenario does not load (before anything runs).
pub fn bench(args: &BenchArgs) -> ExitCode {
    let names: Vec<String> = if args.scenarios.is_empty() {
        bench::DEFAULT_SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    if args.rounds == 0 {
        eprintln!("memvisor lab bench: --rounds must be at least 1");
        return ExitCode::from(2);
    }
    for name in &names {
        if let Err(e) = Scenario::load(&scenario_path(name)) {
            eprintln!("memvisor lab bench: {e}");
            return ExitCode::from(2);
        }
    }
    let mut runs = Vec::new();
    for name in &names {
        for round in 0..args.rounds {
            let order = bench::order(round);
            eprintln!(
                "memvisor lab bench: {name}, round {} of {}: {}, then {}",
                round + 1,
                args.rounds,
                order[0],
                order[1]
            );
            let options = RunOptions {
                scenario: scenario_path(name),
                vmm: order[0],
                mode: args.mode,
                guest_script: None,
                keep: false,
                cache_dir: None,
                verbose: false,
            };
            let mut reports = Vec::new();
            for (vmm, result) in memvisor_lab::run_each(&options, &order) {
                match result {
                    Ok(report) => {
                        print_summary(&report);
                        runs.push(BenchRun::of_report(name, round + 1, &report));
                        reports.push(report);
                    }
                    Err(e) => {
                        eprintln!("memvisor lab ({vmm}): {e}");
                        runs.push(BenchRun::not_started(name, round + 1, vmm, &e.to_string()));
                    }
                }
            }
            eprint!("{}", memvisor_lab::report::side_by_side(&reports));
        }
    }
    let summary = bench::summarize(&runs);
    if args.json {
        eprint!("{}", summary.table());
        println!(
            "{}",
            serde_json::to_string(&summary).expect("a bench summary serializes")
        );
    } else {
        print!("{}", summary.table());
    }
    if summary.passed() {
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
