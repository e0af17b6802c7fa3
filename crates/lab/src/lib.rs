//! The guest lab: boots unmodified Linux (L2) under nested KVM inside a TCG-emulated L1,
//! with a VMM in L1 (QEMU now, memvisor later), and runs scenarios described as data.
//!
//! Everything comes from Debian's packages, fetched with a private APT configuration into
//! `~/.cache/memvisor-lab` (see [`apt`]); images are built per run ([`image`], [`cpio`]);
//! [`run`] boots L1, starts the VMM, lets the guest agent run the scenario's script, carries
//! out the host steps it asks for and returns a [`Report`].
#![deny(missing_docs)]

pub mod apt;
pub mod console;
pub mod cpio;
pub mod error;
pub mod image;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod vmm;

pub use error::{Error, Result};
pub use report::Report;
pub use runner::{RunOptions, run, setup};
pub use scenario::Scenario;
pub use vmm::VmmKind;
