//! VFIO-PCI passthrough for memvisor: a PCI function bound to `vfio-pci`
//! on the host becomes a [`PciDevice`](memvisor_pci::PciDevice) on
//! memvisor's bus 0, driven by the guest's own driver (an NVMe controller
//! by Linux's `nvme`).
//!
//! Every kernel interaction goes through [`VfioDeviceIo`] —
//! [`VfioDeviceFd`] on a VFIO device file in production, a test double in
//! the unit tests.
//!
//! # What the guest sees
//!
//! Configuration space comes from the device's VFIO configuration region,
//! except what the VMM owns:
//!
//! | register | treatment |
//! |---|---|
//! | vendor, device, revision, class, subsystem | the device's, read-only (snapshot) |
//! | command | emulated; bus master, parity error response and SERR# enable are also written to the device; memory and I/O decoding and INTx disable stay the VMM's (the device keeps memory decoding on, I/O off) |
//! | status | the device's; its error bits (write-one-to-clear) are forwarded; the capability list bit follows the guest's list |
//! | cache line size, latency timer, interrupt line | emulated storage; BIST, min grant, max latency read zero; interrupt pin reads 0 (memvisor has no INTx) |
//! | header type | 0: a single-function type-0 header (bridges are refused) |
//! | BARs | emulated: sizes from the VFIO regions, the guest (or [`PciRoot::assign_bars`](memvisor_pci::PciRoot::assign_bars)) places them; 64-bit pairs; I/O BARs read as absent |
//! | expansion ROM BAR, CardBus CIS | read 0 (no ROM) |
//! | capability list | relinked: power management (control/status forwarded), PCI Express (an endpoint becomes a root complex integrated endpoint without a link, as QEMU presents it on a root bus; device control/status/control 2 forwarded bit by bit, no FLR), MSI-X (emulated), vendor-specific (read-only); everything else, MSI first, is unlinked and reads zero |
//! | other bytes of 0x40..0x100 | the device's, read-only |
//! | extended space 0x100..0x1000 | reads zero: no extended capabilities (AER, SR-IOV, ATS, resizable BAR… are not offered) |
//!
//! BAR accesses are trapped: each guest access becomes one `pread` or
//! `pwrite` of the BAR's VFIO region at the same offset and width, except
//! the MSI-X table and PBA ranges, which [`MsixConfig`](memvisor_pci::MsixConfig)
//! serves (the host kernel owns the real table). Mapping the BARs into the
//! guest is left for later; [`VfioPciDevice::mappable_ranges`] is the hook.
//!
//! # MSI-X
//!
//! The guest programs the emulated table; [`MsixConfig`](memvisor_pci::MsixConfig)
//! tells an internal router which vectors are live, and the router
//! points VFIO (`VFIO_DEVICE_SET_IRQS`) at the VMM's irqfd of each live
//! vector, so the device's interrupts reach KVM without a VMM thread. A
//! masked vector is *parked*: VFIO signals an eventfd of the router
//! instead; parked interrupts show in the PBA and are delivered when the
//! vector is unmasked. Details in the router's documentation (`msix.rs`).
//! MSI-X is disabled on the device when the guest disables it, on
//! [`VfioPciDevice::reset`] and on drop.
//!
//! # Integration in the VMM
//!
//! 1. Open a container for the device's IOMMU group and map guest memory
//!    into it: `memvisor_dma::vfio::VfioContainerMapper` with the DMA
//!    layer's listeners (`RamDmaListener`, or `ViommuDmaBridge` behind
//!    virtio-iommu). This crate does no DMA mapping; the mappings must be
//!    in place before the guest turns bus mastering on.
//! 2. For each MSI-X vector, allocate a GSI, create an eventfd and
//!    register it with `KVM_IRQFD` for that GSI; implement
//!    [`MsiSink`](memvisor_pci::MsiSink) so that `configure(v, msg, true)`
//!    sets the MSI route of vector `v`'s GSI (`KVM_SET_GSI_ROUTING`),
//!    `configure(v, msg, false)` may drop it, and `trigger(v)` injects the
//!    vector (write its irqfd, or `KVM_SIGNAL_MSI`): the device calls it
//!    for interrupts that arrived while the vector was masked. The sink is
//!    called from vCPU threads under the device's lock and must not call
//!    back into the device. The vector count is the device's: open it with
//!    [`VfioDeviceFd::open`] (group fd from
//!    `VfioContainerMapper::group_fd`, the host BDF) and ask
//!    [`VfioPciDevice::msix_vectors_of`].
//! 3. [`VfioPciDevice::new`] on the [`VfioDeviceFd`] (or
//!    [`VfioPciDevice::open`] when the count is known) with the sink and
//!    the irqfds; wrap it in `Arc<Mutex<_>>`, keep a typed handle for
//!    [`reset`](VfioPciDevice::reset), and hand a clone to
//!    [`PciRoot::add_device`](memvisor_pci::PciRoot::add_device) before
//!    [`PciRoot::assign_bars`](memvisor_pci::PciRoot::assign_bars).
//! 4. On system reset call [`VfioPciDevice::reset`]; on shutdown drop the
//!    device before unmapping guest memory (drop disables MSI-X and bus
//!    mastering).
#![deny(missing_docs)]

mod config;
mod device;
mod error;
mod io;
mod msix;
mod sys;

#[cfg(test)]
mod tests;

pub use config::{CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCIE, CAP_ID_PM, CAP_ID_VENDOR, CapabilityInfo};
pub use device::{BusMasterGate, DeviceBar, MappedBarRange, VfioPciDevice, VfioPciInfo};
pub use error::VfioPciError;
pub use io::{CONFIG_REGION_INDEX, IrqInfo, MSIX_IRQ_INDEX, RegionInfo, RegionMapping, VfioDeviceIo};
pub use sys::{MigrationSupport, VfioDeviceFd};
