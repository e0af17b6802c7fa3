//! The guest lab: boots unmodified Linux (L2) under a VMM (QEMU, [`qemu`], or memvisor's
//! own, [`memvisor`]) and runs scenarios described as data. Nested ([`nested`]): the VMM
//! runs in L1, a Linux under TCG whose own KVM runs L2. Direct ([`direct`]): the VMM runs on
//! this host, under its KVM when `/dev/kvm` boots Linux ([`host`] detects it), under TCG
//! when asked for directly (QEMU only).
//!
//! Everything comes from Debian's packages, fetched with a private APT configuration into
//! `~/.cache/memvisor-lab` (see [`apt`]); images are built per run ([`image`], [`cpio`]);
//! [`run`] starts the VMM on its [`host::Host`], lets the guest agent run the scenario's
//! script, carries out the host steps it asks for and returns a [`Report`]. [`bench`]
//! compares the named figures of runs under QEMU and memvisor.
#![deny(missing_docs)]

pub mod apt;
pub mod bench;
pub mod console;
pub mod cpio;
pub mod direct;
pub mod error;
pub mod host;
pub mod http;
pub mod image;
pub mod memvisor;
pub mod nested;
pub mod proxy;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod vmm;

pub use error::{Error, Result};
pub use host::{Mode, ModeChoice};
pub use report::Report;
pub use runner::{RunOptions, run, run_each, setup};
pub use scenario::Scenario;
pub use vmm::{Accel, VmmKind};
