//! The memvisor program's library half: what both the command line and
//! the criterion benchmarks use.
//!
//! ```no_run
//! use memvisor::bench::{BenchOptions, run};
//!
//! for figure in run(BenchOptions { quick: true }, |_| true, |_| {}) {
//!     println!("{}: {:.2}x its floor", figure.key, figure.ratio());
//! }
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod instructions;
