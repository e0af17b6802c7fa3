//! Fixtures shared by memvisor's tests and fuzzers; never published, and a
//! dev-dependency only (no library depends on it).
//!
//! * [`Rig`]: a [`Machine`] built from a [`MachineConfig`] and a
//!   [`Guest`] driving its devices through real split virtqueues, with
//!   one-line requests that answer the raw wire values;
//! * [`RecordingListener`] and [`RecordingNotifier`]: a discard listener
//!   and an IOMMU notifier that record what they are told and refuse or
//!   veto on demand;
//! * [`serial`], [`range`], size constants.
//!
//! The guest's side itself is `memvisor-guest`, re-exported as [`guest`].
#![deny(missing_docs)]

pub mod machines;
mod recorders;
mod rig;

use std::sync::{Mutex, MutexGuard};

pub use memvisor_guest as guest;
pub use memvisor_guest::{Buf, DriverQueue, Guest, Used};
pub use memvisor_machine::{Machine, MachineConfig};
pub use memvisor_memory::GuestRange;
pub use recorders::{RecordingListener, RecordingNotifier, Seen};
pub use rig::Rig;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// `VmPin` is counted per process and tests run on parallel threads: every
/// test of one binary that pins, or asserts on `VmPin`, holds this.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `GuestRange::new(start, len)`, which must be valid.
pub fn range(start: u64, len: u64) -> GuestRange {
    GuestRange::new(start, len).unwrap_or_else(|| panic!("[{start:#x}, +{len:#x}) is not a range"))
}
