//! The devtrace parser, and the replay engine behind it for traces whose
//! machine is small.
//!
//! Input: the trace text (lossy UTF-8). A trace that parses and describes
//! a machine of at most [`MAX_RAM`] bytes is replayed on the io_uring DMA
//! backend with a pin budget; the replay may refuse it (an error, never a
//! panic). Afterwards nothing may stay pinned.

use memvisor_devtrace::{Device, DmaBackend, ReplayMachineOptions, ReplayOptions, Trace, replay};
use memvisor_dma::mapper::vm_pin_kib;

use crate::MIB;

/// Largest guest (boot RAM plus memory-device regions) replayed.
pub const MAX_RAM: u64 = 64 * MIB;
/// The replay's pin budget.
pub const BUDGET: u64 = 32 * MIB;

/// One input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(trace) = Trace::parse("fuzz.jsonl", &text) else {
        return;
    };
    // Re-parsing is deterministic.
    let again = Trace::parse("fuzz.jsonl", &text).expect("parsed once");
    assert_eq!(again.events.len(), trace.events.len());
    let mut ram: u64 = 0;
    for r in &trace.header.ram {
        ram = ram.saturating_add(r.size);
    }
    for d in &trace.header.devices {
        if let Device::Mem(m) = d {
            ram = ram.saturating_add(m.region_size);
        }
    }
    if ram > MAX_RAM || trace.events.len() > 256 {
        return;
    }
    let options = ReplayOptions {
        machine: ReplayMachineOptions {
            dma: Some(DmaBackend::Uring),
            pin_budget: Some(BUDGET),
            ..ReplayMachineOptions::default()
        },
        migrate_every: data
            .len()
            .is_multiple_of(3)
            .then(|| std::num::NonZeroUsize::new(3).expect("3")),
    };
    let _ = replay(&trace, &options, &mut |_| {});
    assert_eq!(vm_pin_kib(), 0, "pins left after a replay");
}
