//! `memvisor demo`: the memory crate on real memory.
//!
//! Creates a RAM block managed in blocks by a `BlockDiscardManager`, plugs
//! (populates) all of it, unplugs (discards) every second block, and reports
//! what `mincore` says is resident at each step — proof that discarded guest
//! memory really goes back to the host.

use std::sync::Arc;

use memvisor_memory::discard::{BlockDiscardManager, RamDiscardManager};
use memvisor_memory::{Backing, GuestRange, RamBlock};

use crate::size::human;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the RAM block.
    pub size: u64,
    /// Block (granule) size.
    pub block_size: u64,
    /// Backing of the RAM block.
    pub backing: Backing,
}

/// Resident bytes observed at each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    /// Right after creation.
    pub created: u64,
    /// After plugging everything.
    pub plugged: u64,
    /// After unplugging every second block.
    pub half_unplugged: u64,
    /// Bytes the manager reports populated at the end.
    pub populated: u64,
}

/// Bytes the kernel says it can give without swapping (`MemAvailable`).
fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses what the demo cannot do, before it allocates anything, in the
/// options' own terms.
fn check(opts: &DemoOptions, available: Option<u64>) -> Result<(), String> {
    if opts.size == 0 || opts.size % opts.block_size != 0 {
        return Err(format!(
            "--size {} is not a positive multiple of --block-size {}",
            human(opts.size),
            human(opts.block_size)
        ));
    }
    if let Some(available) = available
        && opts.size > available
    {
        return Err(format!(
            "--size {} is more than this host can hold: it has {} available (MemAvailable), \
             and the demo populates all of it",
            human(opts.size),
            human(available)
        ));
    }
    Ok(())
}

/// Runs the demo, printing each step to stdout.
pub fn run(opts: &DemoOptions) -> Result<DemoReport, String> {
    check(opts, available_bytes())?;
    let block = Arc::new(RamBlock::new("demo", opts.size, opts.backing).map_err(|e| e.to_string())?);
    let base = 4u64 << 30;
    let region = GuestRange::new(base, opts.size).ok_or("region overflows")?;
    let manager = BlockDiscardManager::new(region, opts.block_size).map_err(|e| e.to_string())?;
    let resident = || block.resident_bytes(0, block.size()).map_err(|e| e.to_string());
    let blocks = opts.size / opts.block_size;
    println!(
        "RAM block: {} ({:?}), {blocks} blocks of {}",
        human(opts.size),
        opts.backing,
        human(opts.block_size)
    );
    let created = resident()?;
    println!("  created:             resident {:>10}", human(created));

    for i in 0..blocks {
        let range = GuestRange::new(base + i * opts.block_size, opts.block_size).expect("inside region");
        manager
            .write()
            .plug(range, || block.populate(i * opts.block_size, opts.block_size), |_| {})
            .map_err(|e| e.to_string())?;
    }
    let plugged = resident()?;
    println!("  plugged all:         resident {:>10}", human(plugged));

    let mut discard_error = None;
    for i in (0..blocks).step_by(2) {
        let range = GuestRange::new(base + i * opts.block_size, opts.block_size).expect("inside region");
        manager
            .write()
            .unplug(range, false, |r| {
                if let Err(e) = block.discard(r.start() - base, r.len()) {
                    discard_error.get_or_insert(e.to_string());
                }
            })
            .map_err(|e| e.to_string())?;
    }
    if let Some(e) = discard_error {
        return Err(e);
    }
    let half_unplugged = resident()?;
    let populated = manager.populated().populated_bytes();
    println!("  unplugged every 2nd: resident {:>10}", human(half_unplugged));
    println!(
        "populated per the manager: {}; given back to the host: {}",
        human(populated),
        human(plugged.saturating_sub(half_unplugged))
    );
    Ok(DemoReport {
        created,
        plugged,
        half_unplugged,
        populated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_options_are_refused_in_their_own_terms() {
        let opts = |size, block_size| DemoOptions {
            size,
            block_size,
            backing: Backing::Memfd,
        };
        assert_eq!(
            check(&opts(3 << 20, 2 << 20), None).unwrap_err(),
            "--size 3.0 MiB is not a positive multiple of --block-size 2.0 MiB"
        );
        let err = check(&opts(64 << 30, 2 << 20), Some(8 << 30)).unwrap_err();
        assert!(err.contains("64.0 GiB") && err.contains("8.0 GiB available"), "{err}");
        assert!(check(&opts(1 << 30, 2 << 20), Some(8 << 30)).is_ok());
    }

    #[test]
    fn half_is_given_back() {
        for backing in [Backing::Memfd, Backing::PrivateAnonymous] {
            let r = run(&DemoOptions {
                size: 32 << 20,
                block_size: 2 << 20,
                backing,
            })
            .unwrap();
            assert_eq!(r.created, 0);
            assert_eq!(r.plugged, 32 << 20);
            assert_eq!(r.half_unplugged, 16 << 20);
            assert_eq!(r.populated, 16 << 20);
        }
    }
}
