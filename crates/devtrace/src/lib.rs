//! Recorded device traces (devtrace v1, `docs/devtrace.md`) and the
//! engine that replays them through memvisor's real devices, real DMA
//! layer and real memory.
//!
//! ```
//! use memvisor_devtrace::{ReplayMachineOptions, ReplayOptions, Trace, builtin, replay};
//!
//! let trace = Trace::parse("vmem-resize.jsonl", builtin::VMEM_RESIZE).unwrap();
//! let options = ReplayOptions {
//!     machine: ReplayMachineOptions { dma: None, ..ReplayMachineOptions::default() },
//!     ..ReplayOptions::default()
//! };
//! let report = replay(&trace, &options, &mut |_progress| {}).unwrap();
//! assert!(report.is_ok(), "{:?}", report.mismatches);
//! assert_eq!(report.requests, 22);
//! ```
//!
//! * [`trace`] — the format: [`Trace::parse`] reads a devtrace strictly
//!   (every error names its line) into a [`Header`] and [`Event`]s.
//! * [`machine`] — [`machine_config`]: the [`MachineConfig`] a header
//!   describes (boot RAM, a virtio-mem device, a virtio-iommu device with
//!   its endpoints, the assigned devices); [`ReplayMachine`]: that machine
//!   and the guest that talks to its devices through real split virtqueues
//!   in guest memory, saved and restored (a vmstate stream) to tear it down
//!   and rebuild it mid-trace.
//!
//! [`MachineConfig`]: memvisor_machine::MachineConfig
//! * [`replay`](mod@replay) — [`replay()`]: every event applied and every
//!   recorded answer compared; the [`Report`].
//! * [`builtin`] — the recorded Linux traces, embedded.
#![deny(missing_docs)]

pub mod machine;
pub mod replay;
pub mod trace;

pub use machine::{ReplayMachine, ReplayMachineError, ReplayMachineOptions, machine_config};
pub use memvisor_dma::viommu_bridge::UnplugGuard;
pub use memvisor_machine::DmaBackend;
pub use replay::{Mismatch, Progress, ReplayError, ReplayOptions, Report, replay};
pub use trace::{Device, Event, Header, Op, Trace, TraceError};

/// The traces recorded from unmodified Linux 6.12 drivers against QEMU 7.2
/// (copies of `shared/traces`, embedded in the binary).
pub mod builtin {
    /// virtio-mem resized 512 MiB → 1 GiB → 256 MiB → 0 → 384 MiB, a reset
    /// and a fresh boot.
    pub const VMEM_RESIZE: &str = include_str!("../traces/vmem-resize.jsonl");
    /// virtio-mem across kexec, a kdump kernel's STATE requests and a reset.
    pub const VMEM_KEXEC: &str = include_str!("../traces/vmem-kexec.jsonl");
    /// virtio-iommu in strict mode behind a virtio-blk disk: 200 MiB of DMA.
    pub const VIOMMU_DMA_STRICT: &str = include_str!("../traces/viommu-dma-strict.jsonl");

    /// Every built-in trace as (file name, text).
    pub const ALL: [(&str, &str); 3] = [
        ("vmem-resize.jsonl", VMEM_RESIZE),
        ("vmem-kexec.jsonl", VMEM_KEXEC),
        ("viommu-dma-strict.jsonl", VIOMMU_DMA_STRICT),
    ];

    /// The trace `memvisor replay` runs without a file. No recording has
    /// both devices, so it is the virtio-mem resize.
    pub const DEFAULT: (&str, &str) = ALL[0];

    /// The built-in trace called `name` (with or without `.jsonl`).
    pub fn get(name: &str) -> Option<(&'static str, &'static str)> {
        ALL.iter()
            .find(|(file, _)| *file == name || file.strip_suffix(".jsonl") == Some(name))
            .copied()
    }
}
