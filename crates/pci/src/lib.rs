//! memvisor's PCI: a root bus, type-0 configuration space, MSI-X and the
//! virtio-pci modern transport, so that an unmodified Linux guest
//! (`CONFIG_VIRTIO_PCI`) drives memvisor's virtio devices.
//!
//! * [`bus`] — [`PciRoot`]: bus 0 with a host bridge at 00:00.0 and up to
//!   31 devices, configuration through ECAM ([`PciRoot::ecam_read`]) and
//!   ports 0xcf8/0xcfc ([`PciRoot::pio_read`]), MMIO dispatch to BARs
//!   ([`PciRoot::mmio_read`]);
//! * [`config`] — the [`PciDevice`] trait and [`ConfigSpace`]: header,
//!   BAR sizing and relocation, capability list;
//! * [`bar`] — [`BarAllocator`]: the VMM places every BAR before boot (no
//!   firmware); Linux keeps the placement;
//! * [`msix`] — [`MsixConfig`]: table, pending bits, masking, delivered
//!   through the VMM's [`MsiSink`];
//! * [`virtio_pci`] — [`VirtioPciDevice`]: a [`VirtioDevice`] as a PCI
//!   function (BAR layout in its documentation), notifications through
//!   the VMM's [`IoEventSink`].
//!
//! Guest accesses never fail and never panic: any offset, any width,
//! unaligned, to any register; reads of nothing return all-ones (absent
//! functions) or zero (unimplemented registers), writes to nothing are
//! ignored.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use memvisor_pci::{BarAllocator, PciRoot, bus::HostBridge};
//!
//! let mut root = PciRoot::new();
//! // Any PciDevice; a VirtioPciDevice in memvisor.
//! let bdf = root.add_device(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
//! assert_eq!(bdf.to_string(), "00:01.0");
//! let mut bars = BarAllocator::new(0xc000_0000..0xfe00_0000, 1 << 40..2 << 40).unwrap();
//! root.assign_bars(&mut bars).unwrap();
//!
//! // A guest reading vendor and device ID of 00:01.0 through ECAM...
//! let mut id = [0u8; 4];
//! root.ecam_read(bdf.ecam_offset(), &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
//! // ...and through 0xcf8/0xcfc; an absent slot reads all-ones.
//! root.pio_write(0, &(0x8000_0000u32 | 2 << 11).to_le_bytes());
//! root.pio_read(4, &mut id);
//! assert_eq!(id, [0xff; 4]);
//! ```
//!
//! # Integration in the VMM
//!
//! 1. Build each device's [`VirtioPciDevice`] with its [`DeviceAccess`]
//!    (`Mutex<D>`, or the VMM's own accessor for devices it keeps in its
//!    machine), the guest memory, the [`MsiSink`] (KVM GSI routes and
//!    irqfds) and the [`IoEventSink`] (`KVM_IOEVENTFD`, MMIO, any length,
//!    no datamatch); set [`VirtioPciOptions::access_platform`] for devices
//!    behind virtio-iommu. Wrap it in `Arc<Mutex<_>>` (the transport lock).
//! 2. Take [`VirtioPciDevice::queue_events`] and
//!    [`VirtioPciDevice::notifier`] for the event loop *before* handing the
//!    device to the root: when a queue's eventfd is readable, read it, then
//!    call [`QueueNotifier::notify`] (no transport lock needed).
//! 3. [`PciRoot::add_device`] each device, then [`PciRoot::assign_bars`]
//!    from the windows the ACPI tables (host bridge `_CRS`, MCFG) describe.
//!    Programming BAR 0 with decoding on registers the eventfds; from then
//!    on the transport moves them whenever the guest moves BAR 0 or turns
//!    decoding off and on.
//! 4. Route vCPU exits: MMIO in the ECAM window to [`PciRoot::ecam_read`] /
//!    [`PciRoot::ecam_write`], ports 0xcf8..0xcff to [`PciRoot::pio_read`] /
//!    [`PciRoot::pio_write`], other MMIO to [`PciRoot::mmio_read`] /
//!    [`PciRoot::mmio_write`] (false: nothing decodes the address). The
//!    root takes the device's transport lock for each access.
//! 5. Snapshot and migration: with the vCPUs stopped and the event loop
//!    quiet, [`VirtioPciDevice::state`] on the source. On the destination,
//!    built alike (same devices, options, slots), restore guest memory and
//!    the devices' own state first, then [`VirtioPciDevice::restore`] —
//!    MSI-X routes, ioeventfds, device activation at the saved queue
//!    indices — and [`PciRoot::refresh_bars`]; kick every queue once when
//!    the guest resumes.
//!
//! Locks, outermost first: the transport lock (root accesses), the
//! device's own lock (its [`DeviceAccess`]), the MSI-X leaf lock (taken by
//! interrupts from any thread, holding nothing else). The [`MsiSink`] and
//! [`IoEventSink`] are called under the transport or leaf lock and must
//! not call back into the device or the transport.
//!
//! [`VirtioDevice`]: memvisor_virtio::VirtioDevice
#![deny(missing_docs)]

mod access;
pub mod bar;
pub mod bus;
pub mod config;
mod error;
pub mod msix;
pub mod virtio_pci;

pub use bar::BarAllocator;
pub use bus::{BarListener, PciBdf, PciRoot};
pub use config::{BarInfo, BarState, ConfigSpace, ConfigSpaceState, PciDevice, PciHeader};
pub use error::{PciError, TransportStateError};
pub use msix::{MsiMessage, MsiSink, MsixConfig, MsixDelivery, MsixEntryState, MsixState};
pub use virtio_pci::{
    DeviceAccess, IoEventSink, QueueNotifier, QueueState, VirtioPciDevice, VirtioPciOptions, VirtioPciState,
};
