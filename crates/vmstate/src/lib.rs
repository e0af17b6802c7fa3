//! Migration for memvisor: a machine's memory devices, IOMMU, DMA state and
//! RAM in one checksummed stream, restored into fresh objects in an order
//! that is declared and checked (DESIGN.md rule 4).
//!
//! ```
//! use std::io::{Read, Write};
//! use std::sync::{Arc, Mutex};
//! use memvisor_memory::{Backing, RamBlock, map::GuestMemoryMap};
//! use memvisor_vmstate::{LoadContext, Phase, Priority, Registry, Section, SectionError, ram};
//!
//! /// A device whose whole state is one string.
//! struct Uart(Arc<Mutex<String>>);
//!
//! impl Section for Uart {
//!     fn name(&self) -> &str { "uart" }
//!     fn version(&self) -> u16 { 1 }
//!     fn priority(&self) -> Priority { Priority::DEVICE }
//!     fn phase(&self) -> Phase { Phase::Device }
//!     fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
//!         Ok(out.write_all(self.0.lock().unwrap().as_bytes())?)
//!     }
//!     fn load(&mut self, _: &LoadContext, _: u16, payload: &mut dyn Read) -> Result<(), SectionError> {
//!         payload.read_to_string(&mut self.0.lock().unwrap())?;
//!         Ok(())
//!     }
//! }
//!
//! // A machine: 2 MiB of RAM and a UART.
//! let machine = |text: &str| {
//!     let ram = Arc::new(RamBlock::new("ram", 2 << 20, Backing::Memfd).unwrap());
//!     let map = GuestMemoryMap::builder().ram(0, ram.clone()).unwrap().build().unwrap();
//!     let uart = Arc::new(Mutex::new(text.to_string()));
//!     let mut registry = Registry::with_memory(map.clone());
//!     ram::register_ram(&mut registry, &map).unwrap();
//!     registry.register(Uart(uart.clone())).unwrap();
//!     (registry, ram, uart)
//! };
//!
//! let (mut source, src_ram, _) = machine("hello");
//! src_ram.write(0x1000, b"guest data").unwrap();
//! let mut stream = Vec::new();
//! source.save(&mut stream).unwrap();
//!
//! let (mut dest, dst_ram, uart) = machine("");
//! dest.load(&stream[..]).unwrap();
//! let mut buf = [0u8; 10];
//! dst_ram.read(0x1000, &mut buf).unwrap();
//! assert_eq!(&buf, b"guest data");
//! assert_eq!(*uart.lock().unwrap(), "hello");
//! // Only the one non-zero page travelled.
//! assert!(stream.len() < 4096 + 256);
//!
//! // Any corruption is an error, never a panic.
//! stream[40] ^= 1;
//! assert!(machine("").0.load(&stream[..]).is_err());
//! ```
//!
//! # Pieces
//!
//! * [`Section`]: one piece of state with a name, instance, version,
//!   [`Priority`] and [`Phase`]; [`Registry`] saves them in declared order
//!   (setup phase, RAM, device phase; higher priority first; ties in
//!   registration order) and loads them, checking the stream
//!   ([`format`](mod@format), `FORMAT.md`).
//! * [`LoadContext`]: what has been restored so far; each section asks it
//!   whether its predecessors were (the IOMMU: "was the discard manager of
//!   the region this mapping targets restored?") and fails naming the one
//!   missing.
//! * [`ram`]: populated memory only, zero pages as flags.
//! * [`codec`]: how sections encode their state (postcard), so that a
//!   device's `persist.rs` needs no encoder of its own.
//! * [`transport`]: files and Unix sockets.
//!
//! Priorities, highest first: memory devices
//! ([`Priority::MEMORY_DEVICE`]), IOMMUs ([`Priority::IOMMU`]), DMA mappers
//! and other devices ([`Priority::DMA`], [`Priority::DEVICE`]). Unlike
//! QEMU, where this order is a priority that is easy to get wrong and is
//! tested nowhere, here each load checks its predecessors, so an order
//! mistake is an error naming the missing section.
#![deny(missing_docs)]

pub mod codec;
pub mod context;
pub mod error;
pub mod format;
pub mod ram;
pub mod registry;
pub mod section;
pub mod transport;

pub use codec::{decode, encode};
pub use context::{LoadContext, Restores};
pub use error::{SectionError, SectionId, VmStateError};
pub use registry::{Registry, SectionSummary, Summary};
pub use section::{Phase, Priority, Section};
