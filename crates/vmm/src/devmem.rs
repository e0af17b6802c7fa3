//! Device memory in the guest: the BARs of assigned (VFIO) devices mapped
//! straight into guest-physical space as KVM memory slots where VFIO allows
//! `mmap`, so that the guest's accesses there (an NVMe doorbell) reach the
//! device without an exit to the VMM. The MSI-X table and PBA pages are
//! left out and keep trapping
//! ([`VfioPciDevice::mappable_ranges`](memvisor_vfio_pci::VfioPciDevice::mappable_ranges)),
//! as does any range VFIO refuses to map.
//!
//! The slots follow the BARs: [`DeviceMemory`] is the PCI root's
//! [`BarListener`], and installs a device's slots again whenever what it
//! decodes changes (placed, moved, decoding turned on or off). The slot
//! numbers come from the VM's pool; when it is empty a range keeps
//! trapping.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use memvisor_pci::{BarInfo, BarListener, PciBdf};
use memvisor_vfio_pci::MappedBarRange;

use crate::bus::lock;
use crate::slot_table::SlotAllocator;
use crate::vm::VmHandle;

/// The mapped BARs of every assigned device, installed as KVM slots while
/// the device decodes them; see the [module documentation](self).
pub(crate) struct DeviceMemory {
    vm: Arc<VmHandle>,
    allocator: Arc<Mutex<SlotAllocator>>,
    /// By PCI slot (device number on bus 0).
    devices: Mutex<BTreeMap<u8, DeviceSlots>>,
}

/// One device's mapped ranges and the KVM slots installed for them.
struct DeviceSlots {
    name: String,
    ranges: Vec<MappedBarRange>,
    /// (KVM slot, guest-physical address, bytes).
    installed: Vec<(u32, u64, u64)>,
}

impl DeviceMemory {
    pub(crate) fn new(vm: Arc<VmHandle>, allocator: Arc<Mutex<SlotAllocator>>) -> Self {
        Self {
            vm,
            allocator,
            devices: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds the mapped ranges of the device `name` in PCI slot `slot`,
    /// before it decodes anything.
    pub(crate) fn add_device(&self, slot: u8, name: &str, ranges: Vec<MappedBarRange>) {
        let bytes: u64 = ranges.iter().map(|r| r.mapping.len()).sum();
        log::info!(
            "{name}: {} BAR range(s), {bytes:#x} bytes, mapped for the guest to reach directly",
            ranges.len()
        );
        lock(&self.devices).insert(
            slot,
            DeviceSlots {
                name: name.to_string(),
                ranges,
                installed: Vec::new(),
            },
        );
    }

    /// Removes every slot of `d`; a slot KVM fails to remove keeps its
    /// number out of the pool (and its mapping alive, in `d.ranges`).
    fn uninstall(&self, d: &mut DeviceSlots) {
        for (slot, gpa, len) in d.installed.drain(..) {
            // SAFETY: removing a slot (size 0) makes no memory reachable.
            match unsafe { self.vm.set_foreign_slot(slot, gpa, 0, 0) } {
                Ok(()) => {
                    lock(&self.allocator).free(slot);
                }
                Err(e) => log::error!(
                    "{}: removing KVM slot {slot} of [{gpa:#x}, +{len:#x}) failed, the slot stays taken: {e}",
                    d.name
                ),
            }
        }
    }
}

impl BarListener for DeviceMemory {
    fn bars_changed(&self, bdf: PciBdf, live: &[BarInfo]) {
        let mut devices = lock(&self.devices);
        let Some(d) = devices.get_mut(&bdf.device()) else {
            return;
        };
        self.uninstall(d);
        for range in &d.ranges {
            let Some(bar) = live.iter().find(|b| b.index == range.bar) else {
                continue;
            };
            let len = range.mapping.len();
            if range.offset.checked_add(len).is_none_or(|end| end > bar.size) {
                continue;
            }
            let gpa = bar.addr + range.offset;
            let Some(slot) = lock(&self.allocator).alloc() else {
                log::warn!(
                    "{}: no KVM memory slot left for BAR{} at {gpa:#x}; its accesses trap",
                    d.name,
                    range.bar
                );
                continue;
            };
            // SAFETY: `range.mapping` is a live mapping of `len` bytes owned
            // by `d`, which removes the slot before dropping it (here, in
            // `uninstall`, and in `Drop`).
            match unsafe { self.vm.set_foreign_slot(slot, gpa, len, range.mapping.host_address()) } {
                Ok(()) => {
                    log::info!(
                        "{}: BAR{} [{:#x}, +{len:#x}) in KVM slot {slot} at {gpa:#x}",
                        d.name,
                        range.bar,
                        range.offset
                    );
                    d.installed.push((slot, gpa, len));
                }
                Err(e) => {
                    lock(&self.allocator).free(slot);
                    log::warn!(
                        "{}: mapping BAR{} at {gpa:#x} into the guest failed, its accesses trap: {e}",
                        d.name,
                        range.bar
                    );
                }
            }
        }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let mut devices = std::mem::take(&mut *lock(&self.devices));
        for d in devices.values_mut() {
            self.uninstall(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd};

    use memvisor_memory::map::GuestMemoryMap;
    use memvisor_memory::{Backing, RamBlock};
    use memvisor_vfio_pci::RegionMapping;

    use super::*;
    use crate::vm::Vm;

    /// 16 KiB of "device memory" (a memfd) mapped at `offset` of BAR 0.
    fn range(offset: u64) -> MappedBarRange {
        // SAFETY: memfd_create with a valid name; checked below.
        let fd = unsafe { libc::memfd_create(c"bar".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(0x4000).unwrap();
        MappedBarRange {
            bar: 0,
            offset,
            mapping: RegionMapping::map(file.as_fd(), 0, 0x4000).unwrap(),
        }
    }

    fn bar(addr: u64, size: u64) -> BarInfo {
        BarInfo {
            index: 0,
            addr,
            size,
            is_64bit: false,
            prefetchable: false,
        }
    }

    /// Needs `/dev/kvm` (a PVM one does).
    #[test]
    fn slots_follow_the_bars_and_go_with_the_device_memory() {
        let ram = Arc::new(RamBlock::new("ram", 2 << 20, Backing::Memfd).unwrap());
        let map = GuestMemoryMap::builder().ram(0, ram).unwrap().build().unwrap();
        let vm = Vm::with_memory(&map).unwrap();
        let base = vm.memslots().in_use();
        let dm = DeviceMemory::new(vm.handle().clone(), vm.memslots().allocator().clone());
        dm.add_device(3, "nvme", vec![range(0)]);
        let bdf = |device| PciBdf::new(0, device, 0).unwrap();
        let installed = |dm: &DeviceMemory| lock(&dm.devices)[&3].installed.clone();
        dm.bars_changed(bdf(3), &[bar(0xc000_0000, 0x8000)]);
        assert_eq!(vm.memslots().in_use(), base + 1);
        assert_eq!(
            installed(&dm)[0].1..installed(&dm)[0].1 + 0x4000,
            0xc000_0000..0xc000_4000
        );
        // Moved: the slot moves (KVM would refuse an overlap of a stale one).
        dm.bars_changed(bdf(3), &[bar(0xd000_0000, 0x8000)]);
        assert_eq!((vm.memslots().in_use(), installed(&dm)[0].1), (base + 1, 0xd000_0000));
        // Another device's change, or a BAR too small for the range: nothing.
        dm.bars_changed(bdf(4), &[]);
        assert_eq!(vm.memslots().in_use(), base + 1);
        dm.bars_changed(bdf(3), &[bar(0xd000_0000, 0x2000)]);
        assert_eq!(vm.memslots().in_use(), base);
        // Decoding on again, then the device memory goes: so do its slots.
        dm.bars_changed(bdf(3), &[bar(0xd000_0000, 0x8000)]);
        assert_eq!(vm.memslots().in_use(), base + 1);
        drop(dm);
        assert_eq!(vm.memslots().in_use(), base);
    }
}
