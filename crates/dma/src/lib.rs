//! DMA mapping that never pins discarded memory.
//!
//! * [`mapper::DmaMapper`] — a DMA address space that pins what it maps,
//!   with a per-VM [`mapper::PinBudget`] that memvisor enforces itself;
//! * [`uring::UringPinner`] — real long-term pinning through io_uring
//!   registered buffers (the page pinning VFIO type1 does, visible in
//!   `VmPin`); [`vfio::VfioContainerMapper`] — VFIO type1v2;
//! * path 1, no vIOMMU: [`ram_listener::RamDmaListener`] maps exactly the
//!   populated guest RAM, following each region's discard manager;
//! * path 2, with a vIOMMU: [`viommu_bridge::ViommuDmaBridge`] pins each
//!   guest IOMMU mapping only if its target is populated, under the
//!   manager's read guard, and vetoes unplugs of what it pins;
//! * [`attach::DmaDevice`] — one device's attachment through either path,
//!   and its migration section ([`persist::DmaSection`]).
//!
//! ```
//! use std::sync::Arc;
//! use memvisor_dma::mapper::{DmaMapper, PinBudget};
//! use memvisor_dma::ram_listener::RamDmaListener;
//! use memvisor_dma::uring::UringPinner;
//! use memvisor_memory::discard::{BlockDiscardManager, RamDiscardManager};
//! use memvisor_memory::map::GuestMemoryMap;
//! use memvisor_memory::policy::DiscardPolicy;
//! use memvisor_memory::{Backing, GuestRange, RamBlock};
//!
//! const MIB: u64 = 1 << 20;
//! let boot = Arc::new(RamBlock::new("boot", 2 * MIB, Backing::Memfd).unwrap());
//! let hot = Arc::new(RamBlock::new("hot", 8 * MIB, Backing::Memfd).unwrap());
//! let region = GuestRange::new(1 << 32, 8 * MIB).unwrap();
//! let manager = Arc::new(BlockDiscardManager::new(region, 2 * MIB).unwrap());
//! let mem = GuestMemoryMap::builder()
//!     .ram(0, boot)
//!     .unwrap()
//!     .managed_ram(region.start(), hot, manager.clone())
//!     .unwrap()
//!     .build()
//!     .unwrap();
//!
//! // An assigned device without a vIOMMU: boot RAM is mapped whole...
//! let pinner = Arc::new(UringPinner::new("dev0", Arc::new(PinBudget::limited(64 * MIB))));
//! let _dma = RamDmaListener::attach("dev0", &mem, pinner.clone(), &DiscardPolicy::new()).unwrap();
//! assert_eq!(pinner.pinned_bytes(), 2 * MIB);
//! // ...and a plugged block is mapped before it becomes visible.
//! let block = GuestRange::new(region.start(), 2 * MIB).unwrap();
//! manager.write().plug(block, || Ok::<_, ()>(()), |_| {}).unwrap();
//! assert_eq!(pinner.pinned_bytes(), 4 * MIB);
//! ```
#![deny(missing_docs)]

pub mod attach;
pub mod distinct;
pub mod events;
pub mod mapper;
pub mod persist;
pub mod ram_listener;
pub mod uring;
pub mod vfio;
pub mod viommu_bridge;

#[cfg(test)]
mod test_util {
    use std::sync::{Mutex, MutexGuard};

    static SERIAL: Mutex<()> = Mutex::new(());

    /// `VmPin` is per process and unit tests run on parallel threads: every
    /// test that pins holds this, so those that assert on `VmPin` see only
    /// their own pins.
    pub fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }
}
