//! The PCI root bus: bus 0 with a host bridge at 00:00.0 and up to 31
//! single-function devices, reached through ECAM (memory-mapped
//! configuration) and the legacy 0xcf8/0xcfc mechanism, and the dispatch
//! of MMIO accesses to the device BAR that decodes them.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use crate::PciError;
use crate::bar::BarAllocator;
use crate::config::{
    BAR0, BarInfo, COMMAND, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE, ConfigSpace, PciDevice, PciHeader,
};

/// Bytes of ECAM space bus 0 decodes (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The legacy configuration address port; the data ports follow at 0xcfc.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports of the legacy mechanism, from [`CONFIG_ADDRESS_PORT`].
pub const CONFIG_PORTS: u16 = 8;
/// Device slots on a bus.
pub const SLOTS: usize = 32;

/// Host bridge vendor ID: Intel, with QEMU's and Cloud Hypervisor's
/// virtual host bridge device ID 0x0d57 (no driver binds to it; Linux only
/// sees a host bridge class).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Host bridge device ID; see [`HOST_BRIDGE_VENDOR_ID`].
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Class code of a host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_0000;

/// The enable bit of the 0xcf8 address register.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the 0xcf8 address register that are kept: enable, bus, device,
/// function and dword-aligned register.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

/// A bus/device/function address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciBdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciBdf {
    /// `bus:device.function`, if `device` < 32 and `function` < 8.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        (usize::from(device) < SLOTS && function < 8).then_some(Self { bus, device, function })
    }

    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// Device (slot) number.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// Function number.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The offset of this function's configuration space in ECAM.
    pub fn ecam_offset(&self) -> u64 {
        u64::from(self.bus) << 20 | u64::from(self.device) << 15 | u64::from(self.function) << 12
    }

    /// The 16-bit routing ID (bus << 8 | device << 3 | function), as
    /// virtio-iommu endpoint IDs and ACPI tables use it.
    pub fn routing_id(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.device) << 3 | u16::from(self.function)
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The host bridge at 00:00.0: identification only, no BARs, no
/// capabilities.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// A host bridge (vendor [`HOST_BRIDGE_VENDOR_ID`], device
    /// [`HOST_BRIDGE_DEVICE_ID`], class 0x060000).
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision: 0,
                class_code: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// A device on the bus, as the root holds it.
pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// One live BAR in the MMIO dispatch map.
#[derive(Debug, Clone, Copy)]
struct MappedBar {
    slot: u8,
    bar: BarInfo,
}

/// Bus 0: a host bridge at 00:00.0 plus devices in slots 1..=31, each a
/// single function 0.
///
/// Configuration accesses reach a device under its lock; after every
/// configuration write the root re-reads the device's BARs and command
/// register to keep its MMIO dispatch map, so BARs must be programmed
/// through the root ([`ecam_write`](Self::ecam_write),
/// [`pio_write`](Self::pio_write), [`assign_bars`](Self::assign_bars)) or
/// followed by [`refresh_bars`](Self::refresh_bars).
///
/// Locks: the dispatch map has its own lock, never held while a device
/// lock is taken; a configuration write takes the device lock, then the
/// map's. Nothing here takes two device locks at once.
pub struct PciRoot {
    slots: Vec<Option<SharedDevice>>,
    config_address: AtomicU32,
    mapped: RwLock<Vec<MappedBar>>,
    bar_listener: Option<Arc<dyn BarListener>>,
}

/// Told when the memory BARs a device decodes change (placed, moved,
/// decoding turned on or off): the VMM maps device memory straight into the
/// guest there. Called from the configuration write that made the change,
/// with the device's lock held: it must not take that lock.
pub trait BarListener: Send + Sync {
    /// Device `bdf` now decodes exactly `live` (empty: nothing).
    fn bars_changed(&self, bdf: PciBdf, live: &[BarInfo]);
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let occupied: Vec<usize> = (0..SLOTS).filter(|&s| self.slots[s].is_some()).collect();
        f.debug_struct("PciRoot")
            .field("slots", &occupied)
            .field(
                "config_address",
                &format_args!("{:#x}", self.config_address.load(Ordering::Relaxed)),
            )
            .finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(device: &SharedDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PciRoot {
    /// Bus 0 with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedDevice>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self {
            slots,
            config_address: AtomicU32::new(0),
            mapped: RwLock::new(Vec::new()),
            bar_listener: None,
        }
    }

    /// Sets who is told of every change of a device's decoded BARs (set
    /// it before adding devices: it is not told of what is live already).
    pub fn set_bar_listener(&mut self, listener: Arc<dyn BarListener>) {
        self.bar_listener = Some(listener);
    }

    /// Adds `device` in the lowest free slot and returns its address.
    pub fn add_device(&mut self, device: SharedDevice) -> Result<PciBdf, PciError> {
        let slot = (1..SLOTS).find(|&s| self.slots[s].is_none()).ok_or(PciError::BusFull)?;
        self.add_device_at(slot as u8, device)
    }

    /// Adds `device` in `slot` (1..=31).
    pub fn add_device_at(&mut self, slot: u8, device: SharedDevice) -> Result<PciBdf, PciError> {
        let s = usize::from(slot);
        if s == 0 || s >= SLOTS {
            return Err(PciError::InvalidSlot(slot));
        }
        if self.slots[s].is_some() {
            return Err(PciError::SlotOccupied(slot));
        }
        self.slots[s] = Some(device.clone());
        self.refresh(slot, &mut *lock(&device));
        Ok(PciBdf {
            bus: 0,
            device: slot,
            function: 0,
        })
    }

    /// The device at `bdf`, if any (the host bridge at 00:00.0).
    pub fn device(&self, bdf: PciBdf) -> Option<SharedDevice> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.slots.get(usize::from(bdf.device))?.clone()
    }

    /// Every device but the host bridge, by address.
    pub fn devices(&self) -> Vec<(PciBdf, SharedDevice)> {
        (1..SLOTS)
            .filter_map(|s| {
                let device = self.slots[s].clone()?;
                Some((
                    PciBdf {
                        bus: 0,
                        device: s as u8,
                        function: 0,
                    },
                    device,
                ))
            })
            .collect()
    }

    /// A configuration read at `offset` inside the ECAM window. Absent
    /// functions, other buses and bytes past the function's 4 KiB read
    /// all-ones.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((slot, reg)) = Self::decode_ecam(offset) else {
            return;
        };
        self.config_read(slot, reg, data);
    }

    /// A configuration write at `offset` inside the ECAM window; writes to
    /// absent functions are ignored.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        let Some((slot, reg)) = Self::decode_ecam(offset) else {
            return;
        };
        self.config_write(slot, reg, data);
    }

    /// A read of port `0xcf8 + port_offset` (0..8): the address register
    /// (32-bit accesses at 0xcf8 only) or the data window 0xcfc..0xcff.
    /// Anything else reads all-ones.
    pub fn pio_read(&self, port_offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port_offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.load(Ordering::SeqCst).to_le_bytes()),
            4..=7 => {
                let Some((slot, reg, n)) = self.decode_config_address(port_offset, data.len()) else {
                    return;
                };
                self.config_read(slot, reg, &mut data[..n]);
            }
            _ => {}
        }
    }

    /// A write of port `0xcf8 + port_offset` (0..8): a 32-bit write at
    /// 0xcf8 sets the address register; 0xcfc..0xcff write configuration
    /// space at `(address & 0xfc) + (port & 3)` if the enable bit is set.
    pub fn pio_write(&self, port_offset: u16, data: &[u8]) {
        match port_offset {
            0 if data.len() == 4 => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.config_address.store(value & CONFIG_ADDRESS_MASK, Ordering::SeqCst);
            }
            4..=7 => {
                let Some((slot, reg, n)) = self.decode_config_address(port_offset, data.len()) else {
                    return;
                };
                self.config_write(slot, reg, &data[..n]);
            }
            _ => {}
        }
    }

    /// Reads from the device BAR that contains `addr`, if a device decodes
    /// it (memory space enabled, BAR assigned). False if none does.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((device, bar, offset)) = self.find_bar(addr) else {
            return false;
        };
        lock(&device).read_bar(bar, offset, data);
        true
    }

    /// Writes to the device BAR that contains `addr`; false if none does.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((device, bar, offset)) = self.find_bar(addr) else {
            return false;
        };
        lock(&device).write_bar(bar, offset, data);
        true
    }

    /// The BARs the root dispatches MMIO to now: those of devices with
    /// memory decoding enabled and a non-zero address.
    pub fn mapped_bars(&self) -> Vec<(PciBdf, BarInfo)> {
        self.mapped
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|m| {
                (
                    PciBdf {
                        bus: 0,
                        device: m.slot,
                        function: 0,
                    },
                    m.bar,
                )
            })
            .collect()
    }

    /// Re-reads every device's BARs and command register into the MMIO
    /// dispatch map, after BARs were programmed other than through the root.
    pub fn refresh_bars(&self) {
        for slot in 0..SLOTS {
            if let Some(device) = &self.slots[slot] {
                self.refresh(slot as u8, &mut *lock(device));
            }
        }
    }

    /// Assigns every BAR of every device from `allocator`, largest first,
    /// by writing the BAR registers as firmware would, and enables memory
    /// decoding of the devices that have BARs. Returns the BARs as placed.
    pub fn assign_bars(&self, allocator: &mut BarAllocator) -> Result<Vec<(PciBdf, BarInfo)>, PciError> {
        let mut wanted: Vec<(u8, BarInfo)> = Vec::new();
        for slot in 1..SLOTS {
            if let Some(device) = &self.slots[slot] {
                wanted.extend(lock(device).bars().into_iter().map(|bar| (slot as u8, bar)));
            }
        }
        wanted.sort_by(|a, b| {
            b.1.size
                .cmp(&a.1.size)
                .then(a.0.cmp(&b.0))
                .then(a.1.index.cmp(&b.1.index))
        });
        let mut placed = Vec::with_capacity(wanted.len());
        for (slot, mut bar) in wanted {
            bar.addr = allocator.allocate(bar.size, bar.is_64bit)?;
            let reg = BAR0 + 4 * u16::from(bar.index);
            self.config_write(usize::from(slot), reg, &(bar.addr as u32).to_le_bytes());
            if bar.is_64bit {
                self.config_write(usize::from(slot), reg + 4, &((bar.addr >> 32) as u32).to_le_bytes());
            }
            placed.push((
                PciBdf {
                    bus: 0,
                    device: slot,
                    function: 0,
                },
                bar,
            ));
        }
        let mut slots: Vec<u8> = placed.iter().map(|(bdf, _)| bdf.device).collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            let mut command = [0u8; 2];
            self.config_read(usize::from(slot), COMMAND, &mut command);
            let command = u16::from_le_bytes(command) | COMMAND_MEMORY_SPACE;
            self.config_write(usize::from(slot), COMMAND, &command.to_le_bytes());
        }
        Ok(placed)
    }

    /// (slot, register) of an ECAM offset on bus 0, function 0.
    fn decode_ecam(offset: u64) -> Option<(usize, u16)> {
        if offset >= ECAM_BUS_SIZE {
            return None;
        }
        let device = (offset >> 15) & 0x1f;
        let function = (offset >> 12) & 0x7;
        (function == 0).then_some((device as usize, (offset & 0xfff) as u16))
    }

    /// (slot, register, bytes inside 0xcfc..0xcff) of a data port access
    /// under the current address register; `None` if disabled or not a
    /// function 0 on bus 0.
    fn decode_config_address(&self, port_offset: u16, len: usize) -> Option<(usize, u16, usize)> {
        let address = self.config_address.load(Ordering::SeqCst);
        if address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = (address >> 16) & 0xff;
        let device = (address >> 11) & 0x1f;
        let function = (address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        let lane = port_offset & 3;
        let reg = (address & 0xfc) as u16 + lane;
        Some((device as usize, reg, len.min(usize::from(4 - lane))))
    }

    fn config_read(&self, slot: usize, reg: u16, data: &mut [u8]) {
        let Some(Some(device)) = self.slots.get(slot) else {
            return;
        };
        let n = data
            .len()
            .min(CONFIG_SPACE_SIZE - usize::from(reg).min(CONFIG_SPACE_SIZE));
        lock(device).read_config(reg, &mut data[..n]);
    }

    fn config_write(&self, slot: usize, reg: u16, data: &[u8]) {
        let Some(Some(device)) = self.slots.get(slot) else {
            return;
        };
        let n = data
            .len()
            .min(CONFIG_SPACE_SIZE - usize::from(reg).min(CONFIG_SPACE_SIZE));
        let mut device = lock(device);
        device.write_config(reg, &data[..n]);
        self.refresh(slot as u8, &mut *device);
    }

    /// Re-reads `device`'s decoding state and BARs into the dispatch map.
    fn refresh(&self, slot: u8, device: &mut dyn PciDevice) {
        let mut command = [0u8; 2];
        device.read_config(COMMAND, &mut command);
        let live: Vec<BarInfo> = if u16::from_le_bytes(command) & COMMAND_MEMORY_SPACE != 0 {
            device
                .bars()
                .into_iter()
                .filter(|b| b.addr != 0 && b.size != 0)
                .collect()
        } else {
            Vec::new()
        };
        let changed = {
            let mut mapped = self.mapped.write().unwrap_or_else(PoisonError::into_inner);
            let before: Vec<BarInfo> = mapped.iter().filter(|m| m.slot == slot).map(|m| m.bar).collect();
            mapped.retain(|m| m.slot != slot);
            mapped.extend(live.iter().map(|&bar| MappedBar { slot, bar }));
            before != live
        };
        if changed && let Some(listener) = &self.bar_listener {
            let bdf = PciBdf {
                bus: 0,
                device: slot,
                function: 0,
            };
            listener.bars_changed(bdf, &live);
        }
    }

    fn find_bar(&self, addr: u64) -> Option<(SharedDevice, u8, u64)> {
        let (slot, bar, offset) = {
            let mapped = self.mapped.read().unwrap_or_else(PoisonError::into_inner);
            let m = mapped.iter().find(|m| m.bar.contains(addr))?;
            (m.slot, m.bar.index, addr - m.bar.addr)
        };
        let device = self.slots.get(usize::from(slot))?.clone()?;
        Some((device, bar, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CAPABILITIES_POINTER, DEVICE_ID, HEADER_TYPE, VENDOR_ID};

    /// A device with one 32-bit BAR of 4 KiB backed by memory, and one
    /// 64-bit BAR of 64 KiB.
    struct Scratch {
        config: ConfigSpace,
        mem: Vec<u8>,
    }

    impl Scratch {
        fn shared() -> Arc<Mutex<Scratch>> {
            let mut config = ConfigSpace::new(&PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision: 2,
                class_code: 0x05_8000,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            config.add_bar(0, 0x1000, false, false).unwrap();
            config.add_bar(2, 0x10000, true, true).unwrap();
            Arc::new(Mutex::new(Scratch {
                config,
                mem: vec![0; 0x1000],
            }))
        }
    }

    impl PciDevice for Scratch {
        fn read_config(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn write_config(&mut self, offset: u16, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bars(&self) -> Vec<BarInfo> {
            self.config.bars()
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar);
            if bar == 0 {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.mem.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
        }
        fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
            if bar == 0 {
                for (i, b) in data.iter().enumerate() {
                    if let Some(m) = self.mem.get_mut(offset as usize + i) {
                        *m = *b;
                    }
                }
            }
        }
    }

    fn ecam_u32(root: &PciRoot, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        root.ecam_read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn cf8_u32(root: &PciRoot, address: u32) -> u32 {
        root.pio_write(0, &address.to_le_bytes());
        let mut d = [0u8; 4];
        root.pio_read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_and_absent_devices() {
        let root = PciRoot::new();
        assert_eq!(ecam_u32(&root, 0), 0x0d57_8086);
        assert_eq!(ecam_u32(&root, 8) >> 8, 0x06_0000);
        let mut b = [0xaau8; 1];
        root.ecam_read(u64::from(HEADER_TYPE), &mut b);
        assert_eq!(b, [0], "type-0 header, single function");
        assert_eq!(ecam_u32(&root, 0x10), 0, "no BARs");
        assert_eq!(ecam_u32(&root, u64::from(CAPABILITIES_POINTER)), 0);
        // Absent slot, function, bus: all-ones at every width.
        for offset in [1 << 15, 31 << 15, 1 << 12, 7 << 12 | 0x40, 1 << 20, u64::MAX - 1] {
            for width in [1, 2, 4, 8] {
                let mut d = vec![0u8; width];
                root.ecam_read(offset, &mut d);
                assert!(d.iter().all(|&b| b == 0xff), "offset {offset:#x} width {width}");
            }
        }
        // Writes there are ignored without effect.
        root.ecam_write(1 << 15, &[0; 4]);
        root.ecam_write(u64::MAX, &[0; 8]);
        assert!(root.devices().is_empty());
    }

    #[test]
    fn slots() {
        let mut root = PciRoot::new();
        assert_eq!(root.add_device(Scratch::shared()).unwrap().to_string(), "00:01.0");
        assert_eq!(root.add_device_at(5, Scratch::shared()).unwrap().device(), 5);
        assert_eq!(root.add_device(Scratch::shared()).unwrap().device(), 2);
        assert!(matches!(
            root.add_device_at(5, Scratch::shared()),
            Err(PciError::SlotOccupied(5))
        ));
        assert!(matches!(
            root.add_device_at(0, Scratch::shared()),
            Err(PciError::InvalidSlot(0))
        ));
        assert!(matches!(
            root.add_device_at(32, Scratch::shared()),
            Err(PciError::InvalidSlot(32))
        ));
        while root.add_device(Scratch::shared()).is_ok() {}
        assert!(matches!(root.add_device(Scratch::shared()), Err(PciError::BusFull)));
        assert_eq!(root.devices().len(), 31);
        let bdf = PciBdf::new(0, 3, 0).unwrap();
        assert!(root.device(bdf).is_some());
        assert!(root.device(PciBdf::new(0, 3, 1).unwrap()).is_none());
        assert!(PciBdf::new(0, 32, 0).is_none());
        assert_eq!(bdf.ecam_offset(), 3 << 15);
        assert_eq!(PciBdf::new(1, 2, 3).unwrap().routing_id(), 0x113);
    }

    #[test]
    fn ecam_decode() {
        let mut root = PciRoot::new();
        root.add_device_at(3, Scratch::shared()).unwrap();
        let base = 3 << 15;
        assert_eq!(ecam_u32(&root, base), 0x5678_1234);
        let mut w = [0u8; 2];
        root.ecam_read(base + u64::from(DEVICE_ID), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        let mut b = [0u8; 1];
        root.ecam_read(base + u64::from(VENDOR_ID) + 1, &mut b);
        assert_eq!(b, [0x12]);
        // Function 1 of the same slot is absent.
        assert_eq!(ecam_u32(&root, base | 1 << 12), 0xffff_ffff);
        // A read crossing the end of the function's space: all-ones beyond.
        let mut d = [0u8; 4];
        root.ecam_read(base + 0xffe, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        // Writes go to the right function.
        root.ecam_write(base + 0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(ecam_u32(&root, base + 0x10), 0xc000_0000);
        assert_eq!(ecam_u32(&root, 1 << 15 | 0x10), 0xffff_ffff);
    }

    #[test]
    fn legacy_cf8_decode() {
        let mut root = PciRoot::new();
        root.add_device_at(2, Scratch::shared()).unwrap();
        let enable = 1u32 << 31;
        assert_eq!(cf8_u32(&root, enable), 0x0d57_8086);
        assert_eq!(cf8_u32(&root, enable | 2 << 11), 0x5678_1234);
        assert_eq!(cf8_u32(&root, enable | 2 << 11 | 8), 0x0580_0002);
        // Enable bit clear, other bus, other function, absent slot: all-ones.
        assert_eq!(cf8_u32(&root, 2 << 11), 0xffff_ffff);
        assert_eq!(cf8_u32(&root, enable | 1 << 16 | 2 << 11), 0xffff_ffff);
        assert_eq!(cf8_u32(&root, enable | 2 << 11 | 1 << 8), 0xffff_ffff);
        assert_eq!(cf8_u32(&root, enable | 9 << 11), 0xffff_ffff);
        // The address register reads back masked (reserved bits, low bits).
        root.pio_write(0, &0xffff_ffffu32.to_le_bytes());
        let mut d = [0u8; 4];
        root.pio_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
        // Only 32-bit accesses reach the address register.
        root.pio_write(0, &[0u8; 2]);
        root.pio_read(0, &mut d[..2]);
        assert_eq!(&d[..2], [0xff, 0xff]);
        root.pio_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
        // Data port lanes: (address & 0xfc) + (port & 3).
        root.pio_write(0, &(enable | 2 << 11).to_le_bytes());
        let mut b = [0u8; 1];
        for (port, want) in [(4, 0x34), (5, 0x12), (6, 0x78), (7, 0x56)] {
            root.pio_read(port, &mut b);
            assert_eq!(b[0], want, "port 0xcf8 + {port}");
        }
        let mut w = [0u8; 2];
        root.pio_read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        // A 4-byte read at 0xcfe only covers 0xcfe..0xcff.
        root.pio_read(6, &mut d);
        assert_eq!(d, [0x78, 0x56, 0xff, 0xff]);
        // Writes through the data port.
        root.pio_write(0, &(enable | 2 << 11 | 0x10).to_le_bytes());
        root.pio_write(4, &0xd000_0000u32.to_le_bytes());
        assert_eq!(cf8_u32(&root, enable | 2 << 11 | 0x10), 0xd000_0000);
        // Ports outside 0..8.
        root.pio_read(8, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.pio_write(u16::MAX, &d);
    }

    #[test]
    fn mmio_dispatch_follows_bars_and_decoding() {
        let mut root = PciRoot::new();
        let dev = Scratch::shared();
        root.add_device_at(1, dev.clone()).unwrap();
        let base = 1 << 15;
        root.ecam_write(base + 0x10, &0xc000_0000u32.to_le_bytes());
        // Decoding off: nothing answers.
        assert!(!root.mmio_write(0xc000_0010, &[1, 2, 3, 4]));
        root.ecam_write(base + u64::from(COMMAND), &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(root.mmio_write(0xc000_0010, &[1, 2, 3, 4]));
        let mut d = [0u8; 4];
        assert!(root.mmio_read(0xc000_0010, &mut d));
        assert_eq!(d, [1, 2, 3, 4]);
        assert!(!root.mmio_read(0xc000_1000, &mut d), "past the BAR");
        assert!(!root.mmio_read(0xbfff_fffc, &mut d));
        // BAR 2 is unassigned (address 0): not mapped.
        assert_eq!(root.mapped_bars().len(), 1);
        assert!(!root.mmio_read(0, &mut d));
        // Relocate BAR 0.
        root.ecam_write(base + 0x10, &0xc010_0000u32.to_le_bytes());
        assert!(!root.mmio_read(0xc000_0010, &mut d));
        assert!(root.mmio_read(0xc010_0010, &mut d));
        assert_eq!(d, [1, 2, 3, 4]);
        // Programmed behind the root's back: refresh_bars picks it up.
        lock_scratch(&dev).config.write(0x10, &0xc020_0000u32.to_le_bytes());
        assert!(root.mmio_read(0xc010_0010, &mut d), "stale until refreshed");
        root.refresh_bars();
        assert!(root.mmio_read(0xc020_0010, &mut d));
        // Decoding off again.
        root.ecam_write(base + u64::from(COMMAND), &[0, 0]);
        assert!(!root.mmio_read(0xc020_0010, &mut d));
        assert!(root.mapped_bars().is_empty());
    }

    /// One change: the device, and its live BARs' index and address.
    type Change = (u8, Vec<(u8, u64)>);

    /// Records what it is told.
    #[derive(Default)]
    struct Told(Mutex<Vec<Change>>);

    impl BarListener for Told {
        fn bars_changed(&self, bdf: PciBdf, live: &[BarInfo]) {
            let bars = live.iter().map(|b| (b.index, b.addr)).collect();
            self.0.lock().unwrap().push((bdf.device, bars));
        }
    }

    #[test]
    fn the_bar_listener_is_told_each_change_of_what_a_device_decodes() {
        let told = Arc::new(Told::default());
        let mut root = PciRoot::new();
        root.set_bar_listener(told.clone());
        root.add_device_at(1, Scratch::shared()).unwrap();
        let base = 1 << 15;
        let take = || std::mem::take(&mut *told.0.lock().unwrap());
        assert!(take().is_empty(), "nothing decoded yet");
        root.ecam_write(base + 0x10, &0xc000_0000u32.to_le_bytes());
        assert!(take().is_empty(), "placed, but decoding is off");
        root.ecam_write(base + u64::from(COMMAND), &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert_eq!(take(), [(1, vec![(0, 0xc000_0000)])]);
        // A write that changes nothing is not news.
        root.ecam_write(base + u64::from(COMMAND), &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(take().is_empty());
        root.ecam_write(base + 0x10, &0xc010_0000u32.to_le_bytes());
        assert_eq!(take(), [(1, vec![(0, 0xc010_0000)])]);
        root.ecam_write(base + u64::from(COMMAND), &[0, 0]);
        assert_eq!(take(), [(1, vec![])]);
    }

    fn lock_scratch(dev: &Arc<Mutex<Scratch>>) -> MutexGuard<'_, Scratch> {
        dev.lock().unwrap()
    }

    #[test]
    fn assign_bars_places_and_enables() {
        let mut root = PciRoot::new();
        root.add_device(Scratch::shared()).unwrap();
        root.add_device(Scratch::shared()).unwrap();
        let mut alloc = BarAllocator::new(0xc000_0000..0xc010_0000, 0x10_0000_0000..0x10_0001_8000).unwrap();
        let placed = root.assign_bars(&mut alloc).unwrap();
        let summary: Vec<(u8, u8, u64)> = placed.iter().map(|(bdf, b)| (bdf.device(), b.index, b.addr)).collect();
        assert_eq!(
            summary,
            [
                (1, 2, 0x10_0000_0000),
                // The 64-bit window has room for one; the next goes below 4 GiB.
                (2, 2, 0xc000_0000),
                (1, 0, 0xc001_0000),
                (2, 0, 0xc001_1000),
            ]
        );
        assert_eq!(ecam_u32(&root, 1 << 15 | 0x18), 0x0000_000c);
        assert_eq!(ecam_u32(&root, 1 << 15 | 0x1c), 0x10);
        assert_eq!(ecam_u32(&root, 2 << 15 | 0x18), 0xc000_000c);
        assert_eq!(ecam_u32(&root, 2 << 15 | 0x10), 0xc001_1000);
        assert_ne!(ecam_u32(&root, 2 << 15 | 0x04) & u32::from(COMMAND_MEMORY_SPACE), 0);
        assert_eq!(root.mapped_bars().len(), 4);
        let mut d = [0u8; 1];
        assert!(root.mmio_read(0x10_0000_0000 + 0xffff, &mut d));
        assert_eq!(d, [2], "BAR 2 of device 1");
        // Out of space.
        let mut tiny = BarAllocator::new(0xc000_0000..0xc000_1000, 0..0).unwrap();
        assert!(matches!(
            root.assign_bars(&mut tiny),
            Err(PciError::OutOfBarSpace { .. })
        ));
    }
}
