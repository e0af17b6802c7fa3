//! x86-64 specifics: the guest-physical [`layout`], loading a kernel
//! ([`boot`]), a vCPU's initial state ([`cpu`]) and the KVM state saved
//! and restored for snapshots and migration ([`state`]).

pub mod boot;
pub mod cpu;
pub mod layout;
pub mod state;
