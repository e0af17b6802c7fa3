//! The memvisor command-line program.

mod demo;
mod size;

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Plug a RAM block, unplug half of it, and show that the host got the memory back.
    Demo {
        /// Size of the RAM block (e.g. 1G, 512M).
        #[arg(long, default_value = "1G", value_parser = size::parse_size)]
        size: u64,
        /// Block size (a power of two).
        #[arg(long, default_value = "2M", value_parser = size::parse_size)]
        block_size: u64,
        /// What backs the RAM.
        #[arg(long, value_enum, default_value_t = BackingArg::Memfd)]
        backing: BackingArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
    }
}
