//! memvisor's KVM virtual machine monitor, first piece: the guest's view of
//! elastic memory (rule 7 of `docs/design.md`, *unplugged memory is
//! unreachable by the guest*).
//!
//! * [`memslots`]: KVM memory slots as a discard listener of every
//!   virtio-mem region. A block gets its slot when it is plugged and loses
//!   it before its memory is discarded; boot RAM gets plain slots.
//! * [`slot_table`]: the pure bookkeeping behind it (which
//!   `KVM_SET_USER_MEMORY_REGION` calls a plug or unplug needs, slot
//!   numbers), one slot per block, bounded by `KVM_CAP_NR_MEMSLOTS`.
//! * [`unassigned`]: a guest access outside every slot (an unplugged block,
//!   or nothing at all) reads all ones, drops writes, and is counted and
//!   logged at most once per second.
//! * [`vm`] and [`probe`] (x86-64): a VM for a [`Machine`](memvisor_machine::Machine)'s
//!   memory, a minimal vCPU runner, and a tiny hand-written 64-bit guest
//!   that reads and writes memory, for tests.
//!
//! ```
//! use memvisor_machine::{Machine, MachineConfig, RamSpec, VirtioMemSpec};
//! use memvisor_virtio_mem::{BlockRange, Request, Response};
//! use memvisor_vmm::probe::ProbeGuest;
//! use memvisor_vmm::vm::Vm;
//!
//! const MIB: u64 = 1 << 20;
//! const HOT: u64 = 4 << 30;
//! let machine = Machine::new(&MachineConfig {
//!     ram: vec![RamSpec { addr: 0, size: 2 * MIB }],
//!     virtio_mem: vec![VirtioMemSpec { requested_size: 8 * MIB, ..VirtioMemSpec::new("vmem0", HOT, 8 * MIB, 2 * MIB) }],
//!     ..Default::default()
//! })
//! .unwrap();
//! let vm = Vm::new(&machine).unwrap();
//! let mut vcpu = vm.create_vcpu(0).unwrap();
//!
//! // Plugged: the guest reaches the block.
//! let region = &machine.vmems()[0].region;
//! let block = BlockRange { addr: HOT, nb_blocks: 1 };
//! assert_eq!(region.apply(Request::Plug(block)), Response::Ack(None));
//! let probe = ProbeGuest::new().write(HOT, 42).read(HOT);
//! assert_eq!(probe.run(&mut vcpu, vm.memory(), 0x1000).unwrap().reads, [42]);
//!
//! // Unplugged: the slot is gone before the memory is; the guest reads all ones.
//! assert_eq!(region.apply(Request::Unplug(block)), Response::Ack(None));
//! assert_eq!(probe.run(&mut vcpu, vm.memory(), 0x1000).unwrap().reads, [u64::MAX]);
//! assert_eq!(vm.unassigned().counts_at(HOT).reads, 1);
//! ```
#![deny(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod api;
pub mod bus;
#[cfg(target_arch = "x86_64")]
pub mod config;
#[cfg(target_arch = "x86_64")]
pub mod control;
#[cfg(target_arch = "x86_64")]
pub mod devices;
#[cfg(target_arch = "x86_64")]
mod devmem;
pub mod events;
pub mod exit;
#[cfg(target_arch = "x86_64")]
pub mod irq;
pub mod memslots;
pub mod migration;
#[cfg(target_arch = "x86_64")]
pub mod platform;
#[cfg(target_arch = "x86_64")]
pub mod probe;
#[cfg(target_arch = "x86_64")]
pub mod runner;
pub mod slot_table;
pub mod snapshot;
pub mod unassigned;
#[cfg(target_arch = "x86_64")]
pub mod vcpu;
#[cfg(target_arch = "x86_64")]
pub mod vm;
#[cfg(target_arch = "x86_64")]
pub mod x86;
