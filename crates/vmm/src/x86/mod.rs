//! x86-64 specifics: the guest-physical [`layout`], loading a kernel
//! ([`boot`]) and a vCPU's initial state ([`cpu`]).

pub mod boot;
pub mod cpu;
pub mod layout;
