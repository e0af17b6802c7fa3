//! `memvisor replay`: a recorded device trace through the real devices,
//! the real DMA layer and real memory.

use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use memvisor_devtrace::{
    Device, DmaBackend, ReplayMachineOptions, ReplayOptions, Report, Trace, UnplugGuard, builtin, replay,
};

use crate::size::human;

/// The environment variable naming the VFIO group for `--dma vfio`.
pub const VFIO_GROUP_VAR: &str = "MEMVISOR_VFIO_GROUP";

/// A replay still running after this long shows a progress bar (on a
/// terminal), whatever its number of events.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// The DMA backend as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaArg {
    /// io_uring pinning.
    Uring,
    /// VFIO type1v2, group from `MEMVISOR_VFIO_GROUP`.
    Vfio,
    /// No DMA mapper.
    None,
}

/// What `memvisor replay` was asked to do.
#[derive(Debug, Clone)]
pub struct ReplayArgs {
    /// The trace file; the built-in trace if `None`.
    pub trace: Option<PathBuf>,
    /// DMA backend.
    pub dma: DmaArg,
    /// The vIOMMU bridges' unplug guard.
    pub guard: UnplugGuard,
    /// Pin budget in bytes; unlimited if `None`.
    pub pin_budget: Option<u64>,
    /// Save, drop and restore the machine after every N events.
    pub migrate_every: Option<NonZeroUsize>,
    /// Print a JSON object as the last line.
    pub json: bool,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("memvisor replay: {message}");
    ExitCode::from(2)
}

fn load(args: &ReplayArgs) -> Result<(Trace, bool), String> {
    match &args.trace {
        Some(path) => Trace::read(path).map(|t| (t, false)).map_err(|e| e.to_string()),
        None => {
            let (name, text) = builtin::DEFAULT;
            Trace::parse(name, text).map(|t| (t, true)).map_err(|e| e.to_string())
        }
    }
}

fn dma_backend(arg: DmaArg) -> Result<Option<DmaBackend>, String> {
    Ok(Some(match arg {
        DmaArg::Uring => DmaBackend::Uring,
        DmaArg::None => return Ok(None),
        DmaArg::Vfio => {
            let value = std::env::var(VFIO_GROUP_VAR).map_err(|_| {
                format!(
                    "--dma vfio needs the IOMMU group of a device bound to vfio-pci in {VFIO_GROUP_VAR} \
                     (e.g. {VFIO_GROUP_VAR}=42); it is not set"
                )
            })?;
            let group = value
                .trim()
                .parse()
                .map_err(|_| format!("{VFIO_GROUP_VAR}={value:?} is not an IOMMU group number"))?;
            DmaBackend::Vfio { group }
        }
    }))
}

fn describe(trace: &Trace) -> String {
    let devices: Vec<String> = trace
        .header
        .devices
        .iter()
        .map(|d| match d {
            Device::Mem(m) => format!(
                "virtio-mem {} ({} region, {} blocks)",
                m.id,
                human(m.region_size),
                human(m.block_size)
            ),
            Device::Iommu(i) => format!(
                "virtio-iommu {} (endpoints {})",
                i.id,
                i.endpoints.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            ),
        })
        .collect();
    let ram: u64 = trace.header.ram.iter().map(|r| r.size).sum();
    let mut parts = vec![format!("{} of boot RAM", human(ram))];
    parts.extend(devices);
    parts.join(", ")
}

fn dma_name(arg: DmaArg) -> &'static str {
    match arg {
        DmaArg::Uring => "uring",
        DmaArg::Vfio => "vfio",
        DmaArg::None => "none",
    }
}

fn print_summary(args: &ReplayArgs, trace: &Trace, builtin: bool, report: &Report) {
    let origin = if builtin { " (built in)" } else { "" };
    println!("trace:        {}{origin}: {}", trace.name, describe(trace));
    println!(
        "replayed:     {} events, {} requests, {} answers and values compared, in {:.2} s",
        report.events, report.requests, report.checked, report.elapsed_s
    );
    println!(
        "guest:        {} plugged at the end, {} system resets, {} refused maps, {} busy unplugs",
        human(report.plugged_size),
        report.resets,
        report.refused_maps,
        report.busy_unplugs
    );
    let guard = match args.guard {
        UnplugGuard::Reject => "reject",
        UnplugGuard::Warn => "warn",
    };
    let budget = args.pin_budget.map_or_else(|| "unlimited".to_string(), human);
    println!(
        "DMA:          {} (guard {guard}, budget {budget}): {} pinned at the end, VmPin {}",
        dma_name(args.dma),
        human(report.pinned_bytes),
        human(report.vm_pin_kib * 1024)
    );
    if args.migrate_every.is_some() {
        println!(
            "migration:    {} save/drop/restore cycles, {} of vmstate streams",
            report.migrations,
            human(report.migration_bytes)
        );
    }
    if report.is_ok() {
        println!("result:       OK, every answer matched the recording");
    } else {
        println!(
            "result:       {} MISMATCHES (listed on stderr)",
            report.mismatches.len()
        );
    }
}

/// Runs `memvisor replay`: exit 0 if every answer matched, 1 if any
/// differed, 2 if the trace could not be read or the machine not built.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let (trace, builtin) = match load(args) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let dma = match dma_backend(args.dma) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let options = ReplayOptions {
        machine: ReplayMachineOptions {
            dma,
            unplug_guard: args.guard,
            pin_budget: args.pin_budget,
        },
        migrate_every: args.migrate_every,
    };
    let terminal = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let result = replay(&trace, &options, &mut |p| {
        if bar.is_none() && terminal && p.done < p.total && start.elapsed() >= PROGRESS_AFTER {
            let b = ProgressBar::new(p.total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} events ({elapsed}, eta {eta})")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(trace.name.clone());
            bar = Some(b);
        }
        if let Some(bar) = &bar {
            bar.set_position(p.done as u64);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for m in &report.mismatches {
        eprintln!("memvisor replay: {}: mismatch at {m}", trace.name);
    }
    print_summary(args, &trace, builtin, &report);
    if args.json {
        let mut json = report.to_json();
        json["dma"] = dma_name(args.dma).into();
        json["mismatches"] = report.mismatches.len().into();
        json["mismatch_list"] = serde_json::to_value(&report.mismatches).expect("mismatches serialize");
        println!("{json}");
    }
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
