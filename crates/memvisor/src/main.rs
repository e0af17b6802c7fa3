//! The memvisor command-line program.

mod api;
mod demo;
mod lab;
mod replay;
mod run;
mod size;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use memvisor_memory::Backing;

/// memvisor: elastic guest memory that stays safe next to DMA-capable devices.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackingArg {
    /// Shared memfd (discard punches holes).
    Memfd,
    /// Private anonymous memory (discard is MADV_DONTNEED).
    Anon,
    /// memfd on hugetlbfs with 2 MiB pages.
    Hugetlb,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DmaArg {
    /// Real long-term pinning through io_uring registered buffers.
    Uring,
    /// A VFIO type1v2 container; the IOMMU group comes from MEMVISOR_VFIO_GROUP.
    Vfio,
    /// No assigned device: nothing is pinned (the vIOMMU still checks every MAP).
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GuardArg {
    /// Refuse (BUSY) the unplug of memory a live vIOMMU mapping pins.
    Reject,
    /// Allow it with a one-time warning and keep the pin until the unmap (QEMU).
    Warn,
}

/// The VMMs of `lab run --vmm`.
#[derive(Debug, Clone)]
struct Vmms(Vec<memvisor_lab::VmmKind>);

fn parse_vmms(text: &str) -> Result<Vmms, String> {
    memvisor_lab::VmmKind::parse_list(text).map(Vmms)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Direct if this host's /dev/kvm boots Linux (not PVM, kvm_intel or kvm_amd loaded),
    /// nested otherwise.
    Auto,
    /// The VMM in an L1 under TCG, whose own KVM runs the guest.
    Nested,
    /// The VMM on this host, without L1 (under TCG if /dev/kvm cannot boot Linux).
    Direct,
}

impl ModeArg {
    fn choice(self) -> memvisor_lab::ModeChoice {
        match self {
            ModeArg::Auto => memvisor_lab::ModeChoice::Auto,
            ModeArg::Nested => memvisor_lab::ModeChoice::Nested,
            ModeArg::Direct => memvisor_lab::ModeChoice::Direct,
        }
    }
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Fetch and unpack the lab's Debian packages (QEMU 10, the 6.12 cloud kernel,
    /// busybox) into ~/.cache/memvisor-lab; `run` does this too.
    Setup,
    /// Run a scenario's L2 guest under the chosen VMM (in an L1 under TCG, or directly on
    /// this host), report.
    Run {
        /// A shipped scenario (boot, vmem-resize, viommu, vfio-nvme, vfio-nvme-viommu)
        /// or a scenario file.
        scenario: String,
        /// The VMM that runs the guest: qemu (the reference), memvisor, or several
        /// (`qemu,memvisor` or `both`), one after the other, reported side by side.
        #[arg(long, default_value = "qemu", value_parser = parse_vmms)]
        vmm: Vmms,
        /// Where the VMM runs: in L1 (nested) or on this host (direct).
        #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
        mode: ModeArg,
        /// A guest script file that replaces the scenario's.
        #[arg(long)]
        guest_script: Option<PathBuf>,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Keep the work folder (images, console logs) for inspection.
        #[arg(long)]
        keep: bool,
        /// Echo the consoles to stderr while running.
        #[arg(long)]
        verbose: bool,
    },
    /// Run scenarios under QEMU and memvisor in turn (the order swapped every other
    /// round) and print, per named figure both have, the medians and the ratio
    /// memvisor / QEMU (lower is better) against its goal (agent_s <= 0.8, others <= 1.0).
    Bench {
        /// Shipped scenarios or scenario files (default: boot vmem-resize blk-zero-copy
        /// vfio-nvme live-migrate).
        scenarios: Vec<String>,
        /// How many times each scenario runs under each VMM.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Where the VMMs run: in L1 (nested) or on this host (direct).
        #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
        mode: ModeArg,
        /// Print the summary (ratios, failures, every run's figures) as one JSON object on
        /// stdout; the table goes to stderr.
        #[arg(long)]
        json: bool,
    },
    /// Relay one migration stream between two Unix sockets, breaking it on purpose (the
    /// `live-migrate-corrupt` scenario runs this in L1).
    Proxy {
        /// The socket the migration's source connects to.
        listen: PathBuf,
        /// The destination's socket.
        target: PathBuf,
        /// `none`, `flip:OFFSET` (one bit of the byte at OFFSET) or `cut:OFFSET`.
        #[arg(long, default_value = "none")]
        fault: memvisor_lab::proxy::Fault,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a Linux guest under memvisor's KVM VMM, with virtio-mem, virtio-iommu and disks.
    Run(Box<run::RunArgs>),
    /// Talk to a running VMM's management API (its `--api-socket`).
    Api(api::ApiArgs),
    /// Replay a recorded device trace through the real devices, DMA layer and memory,
    /// and compare every answer with the recording.
    Replay {
        /// A devtrace file (JSON Lines); without it, the built-in vmem-resize recording.
        trace: Option<PathBuf>,
        /// The DMA backend of the assigned devices.
        #[arg(long, value_enum, default_value_t = DmaArg::Uring)]
        dma: DmaArg,
        /// What happens to an unplug of memory that a vIOMMU mapping still pins.
        #[arg(long, value_enum, default_value_t = GuardArg::Reject)]
        viommu_guard: GuardArg,
        /// The VM's pin budget (e.g. 64M); unlimited without it.
        #[arg(long, value_parser = size::parse_size)]
        pin_budget: Option<u64>,
        /// Save, drop and restore the whole machine after every N events (N >= 1).
        #[arg(long, value_parser = size::parse_events)]
        migrate_every: Option<NonZeroUsize>,
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Plug a RAM block, unplug half of it, and show that the host got the memory back.
    Demo {
        /// Size of the RAM block (e.g. 1G, 512M).
        #[arg(long, default_value = "1G", value_parser = size::parse_size)]
        size: u64,
        /// Block size (a power of two, at least 4K).
        #[arg(long, default_value = "2M", value_parser = size::parse_block_size)]
        block_size: u64,
        /// What backs the RAM.
        #[arg(long, value_enum, default_value_t = BackingArg::Memfd)]
        backing: BackingArg,
    },
    /// Unmodified Linux guests under nested KVM, with QEMU side by side (the guest lab).
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Measure every hot path against its floor (the bare kernel work) in the same run.
    Bench {
        /// Print one JSON object (the last line of stdout) instead of a table.
        #[arg(long)]
        json: bool,
        /// Few repetitions and small sizes: checks the command, not the numbers.
        #[arg(long)]
        quick: bool,
        /// Only the figures whose key contains this (e.g. viommu, populated).
        #[arg(long)]
        only: Option<String>,
        /// Instead of times: instructions per 4 KiB MAP + UNMAP pair, counted by callgrind
        /// (valgrind must be installed), device side and DMA layer, and their scaling with
        /// 1,000 and 100,000 live mappings (100 with --quick).
        #[arg(long)]
        instructions: bool,
    },
    /// One counted run of `bench --instructions` (run under callgrind by it).
    #[command(hide = true)]
    BenchPairs {
        /// uring or none.
        dma: String,
        /// Other live mappings in the domain.
        live: u64,
        /// Pairs to run.
        pairs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics on stderr: what a running VMM does at info, other commands' warnings;
    // `RUST_LOG` (e.g. `debug`, `memvisor_vmm=trace`) overrides.
    let level = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Api(args) => api::run(&args),
        Command::Replay {
            trace,
            dma,
            viommu_guard,
            pin_budget,
            migrate_every,
            json,
        } => replay::run(&replay::ReplayArgs {
            trace,
            dma: match dma {
                DmaArg::Uring => replay::DmaArg::Uring,
                DmaArg::Vfio => replay::DmaArg::Vfio,
                DmaArg::None => replay::DmaArg::None,
            },
            guard: match viommu_guard {
                GuardArg::Reject => memvisor_devtrace::UnplugGuard::Reject,
                GuardArg::Warn => memvisor_devtrace::UnplugGuard::Warn,
            },
            pin_budget,
            migrate_every,
            json,
        }),
        Command::Demo {
            size,
            block_size,
            backing,
        } => {
            let backing = match backing {
                BackingArg::Memfd => Backing::Memfd,
                BackingArg::Anon => Backing::PrivateAnonymous,
                BackingArg::Hugetlb => Backing::Hugetlb { page_size: 2 << 20 },
            };
            match demo::run(&demo::DemoOptions {
                size,
                block_size,
                backing,
            }) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("memvisor demo: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Lab { command } => match command {
            LabCommand::Setup => lab::setup(),
            LabCommand::Run {
                scenario,
                vmm,
                mode,
                guest_script,
                json,
                keep,
                verbose,
            } => lab::run(&lab::LabArgs {
                scenario,
                vmms: vmm.0,
                mode: mode.choice(),
                guest_script,
                json,
                keep,
                verbose,
            }),
            LabCommand::Bench {
                scenarios,
                rounds,
                mode,
                json,
            } => lab::bench(&lab::BenchArgs {
                scenarios,
                rounds,
                mode: mode.choice(),
                json,
            }),
            LabCommand::Proxy { listen, target, fault } => lab::proxy(&listen, &target, fault),
        },
        Command::Bench {
            json,
            quick,
            instructions: true,
            ..
        } => bench_instructions(json, quick),
        Command::Bench { json, quick, only, .. } => bench(json, quick, only.as_deref()),
        Command::BenchPairs { dma, live, pairs } => match memvisor::instructions::pairs(&dma, live, pairs) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("memvisor {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn bench_instructions(json: bool, quick: bool) -> ExitCode {
    let counts = match memvisor::instructions::count(quick) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("memvisor bench --instructions: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", counts.to_json());
        return ExitCode::SUCCESS;
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "instructions per 4 KiB MAP + UNMAP pair ({} pairs counted by callgrind)",
        counts.pairs
    );
    println!(
        "  device side, no DMA backend:   {:>8.0}   (the whole pair with the guest's side: {:.0})",
        counts.no_dma.device, counts.no_dma.pair
    );
    println!(
        "  device side, io_uring pinning: {:>8.0}   target <= 4000 {}   (whole pair: {:.0})",
        counts.full.device,
        verdict(counts.full.device <= 4000.0),
        counts.full.pair
    );
    println!(
        "  DMA layer (bridge, pinner):    {:>8.0}   target <= 700 {}",
        counts.dma_layer(),
        verdict(counts.dma_layer() <= 700.0)
    );
    for (live, c) in &counts.scaling {
        println!("  device side, {live:>6} live mappings: {:>8.0}", c.device);
    }
    println!(
        "  scaling to the most live mappings: {:.3}x   target <= 1.2 {}",
        counts.scaling_ratio(),
        verdict(counts.scaling_ratio() <= 1.2)
    );
    ExitCode::SUCCESS
}

fn bench(json: bool, quick: bool, only: Option<&str>) -> ExitCode {
    use memvisor::bench::{BenchOptions, KEYS, run};
    if let Some(only) = only
        && !KEYS.iter().any(|k| k.contains(only))
    {
        eprintln!("memvisor bench: no figure matches '{only}' (keys: {})", KEYS.join(", "));
        return ExitCode::from(2);
    }
    if !json {
        println!(
            "{:<22} {:>12} {:>12} {:>7} {:>7}",
            "figure", "ours", "floor", "ratio", "target"
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let figures = run(
        BenchOptions { quick },
        |key| only.is_none_or(|o| key.contains(o)),
        |f| {
            if json {
                eprintln!("{}: {:.3}x its floor", f.key, f.ratio());
            } else {
                let fmt = |ns: f64| {
                    if ns >= 1e6 {
                        format!("{:.2} ms", ns / 1e6)
                    } else if ns >= 1e3 {
                        format!("{:.2} us", ns / 1e3)
                    } else {
                        format!("{ns:.0} ns")
                    }
                };
                let mut extra: Vec<String> = f.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if let (Some(b), Some(r)) = (&f.bound, f.bound_ratio()) {
                    extra.push(format!(
                        "{}_ratio={r:.3} (<={} {})",
                        b.name,
                        b.target,
                        verdict(r <= b.target)
                    ));
                }
                println!(
                    "{:<22} {:>12} {:>12} {:>7.3} {:>7} {}  {}",
                    f.key,
                    fmt(f.ours_ns),
                    fmt(f.floor_ns),
                    f.ratio(),
                    format!("<={}", f.target),
                    verdict(f.ratio() <= f.target),
                    extra.join(" ")
                );
            }
        },
    );
    if json {
        let object: serde_json::Map<String, serde_json::Value> =
            figures.iter().map(|f| (f.key.to_string(), f.to_json())).collect();
        println!("{}", serde_json::Value::Object(object));
    }
    ExitCode::SUCCESS
}
