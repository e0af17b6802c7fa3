//! Guest RAM for memvisor.
//!
//! PLACEHOLDER crate docs; the real ones come with the example.
#![deny(missing_docs)]

pub mod block_state;
pub mod discard;
pub mod map;
pub mod policy;
pub mod ram_block;
pub mod range;

pub use ram_block::{Backing, RamBlock, RamBlockError};
pub use range::GuestRange;
