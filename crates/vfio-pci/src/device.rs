//! [`VfioPciDevice`]: a host PCI function bound to vfio-pci as a
//! [`PciDevice`] on memvisor's bus.

use std::fmt;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use memvisor_pci::config::{BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, NUM_BARS};
use memvisor_pci::msix::{MSIX_CONTROL_ENABLE, MSIX_ENTRY_SIZE};
use memvisor_pci::{BarInfo, ConfigSpace, MsiSink, MsixConfig, PciDevice, PciHeader};
use vmm_sys_util::eventfd::EventFd;

use crate::VfioPciError;
use crate::config::{CONVENTIONAL, CapabilityInfo, Layout};
use crate::io::{CONFIG_REGION_INDEX, MSIX_IRQ_INDEX, RegionInfo, RegionMapping, VfioDeviceIo};
use crate::msix::IrqRouter;
use crate::sys::VfioDeviceFd;

/// Bytes of configuration space ECAM decodes per function.
const CONFIG_SPACE_SIZE: usize = 4096;
/// The end of the type-0 header; the VMM owns most of it.
const HEADER_END: usize = 0x40;
/// Status register and capability pointer: from the device, overlaid.
const STATUS_BYTES: Range<usize> = 0x06..0x08;
const CAPABILITY_POINTER: usize = 0x34;
/// Failed device accesses logged before going quiet.
const LOGGED_ERRORS: u32 = 16;

/// One memory BAR of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBar {
    /// BAR index (a 64-bit BAR also takes `index + 1`).
    pub index: u8,
    /// Bytes (the VFIO region size).
    pub size: u64,
    /// A 64-bit BAR.
    pub is_64bit: bool,
    /// A prefetchable BAR.
    pub prefetchable: bool,
    /// VFIO allows mapping the region (see
    /// [`VfioPciDevice::mappable_ranges`]).
    pub mappable: bool,
}

/// What a passthrough device is, independent of where it sits on the host
/// or guest bus: for logging and checks. Its [`Display`](fmt::Display) is
/// one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioPciInfo {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code (class << 16 | subclass << 8 | programming interface).
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// The memory BARs the guest sees.
    pub bars: Vec<DeviceBar>,
    /// I/O BARs (index, size), presented to the guest as absent.
    pub hidden_io_bars: Vec<(u8, u64)>,
    /// MSI-X table size (0: no MSI-X, so no interrupts).
    pub msix_vectors: u16,
    /// The device's capability list, in its order, with what the guest
    /// sees of it.
    pub capabilities: Vec<CapabilityInfo>,
}

/// `bytes` as "16 KiB" when it is a whole number of KiB, MiB or GiB.
fn size_string(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes:#x} bytes")
}

impl fmt::Display for VfioPciInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} rev {:02x} class {:06x} (subsystem {:04x}:{:04x})",
            self.vendor_id, self.device_id, self.revision, self.class_code, self.subsystem_vendor_id, self.subsystem_id
        )?;
        for bar in &self.bars {
            write!(
                f,
                ", BAR{} {} {}{}",
                bar.index,
                size_string(bar.size),
                if bar.is_64bit { "mem64" } else { "mem32" },
                if bar.prefetchable { " pref" } else { "" }
            )?;
        }
        for (index, size) in &self.hidden_io_bars {
            write!(f, ", BAR{index} {} I/O (hidden)", size_string(*size))?;
        }
        if self.msix_vectors > 0 {
            write!(f, ", MSI-X {} vectors", self.msix_vectors)?;
        } else {
            write!(f, ", no MSI-X: no interrupts")?;
        }
        if !self.capabilities.is_empty() {
            let caps: Vec<String> = self.capabilities.iter().map(ToString::to_string).collect();
            write!(f, ", capabilities {}", caps.join(" "))?;
        }
        Ok(())
    }
}

/// The guest's memory BARs, by index, with their VFIO regions.
type Bars = [Option<(DeviceBar, RegionInfo)>; NUM_BARS];

/// The MSI-X table or PBA: where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    bar: u8,
    offset: u64,
    len: u64,
}

impl Area {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The MSI-X state.
struct Msix {
    config: MsixConfig,
    router: Arc<IrqRouter>,
    cap: u16,
    table: Area,
    pba: Area,
}

/// What serves a piece of a BAR access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Device,
    Table(u64),
    Pba(u64),
}

/// Part of a BAR mapped into this process ([`VfioPciDevice::map_bars`]):
/// the guest reaches it without a trap once the VMM installs
/// `mapping` as guest memory at the BAR's address + `offset`.
#[derive(Debug)]
pub struct MappedBarRange {
    /// The BAR.
    pub bar: u8,
    /// Offset of the range in the BAR (page-aligned).
    pub offset: u64,
    /// The device memory.
    pub mapping: RegionMapping,
}

/// The device's conventional configuration space (256 bytes), as VFIO
/// reads it.
fn read_conventional(io: &dyn VfioDeviceIo) -> Result<[u8; CONVENTIONAL], VfioPciError> {
    let mut cfg = [0u8; CONVENTIONAL];
    io.region_read(CONFIG_REGION_INDEX, 0, &mut cfg)
        .map_err(|source| VfioPciError::ConfigRead {
            offset: 0,
            len: CONVENTIONAL,
            source,
        })?;
    Ok(cfg)
}

/// A PCI function bound to vfio-pci on the host, presented to the guest:
/// see the [crate documentation](crate).
pub struct VfioPciDevice {
    io: Arc<dyn VfioDeviceIo>,
    info: VfioPciInfo,
    header: PciHeader,
    /// The VMM's header registers: BARs, command, cache line, latency,
    /// interrupt line; identification (read-only).
    shadow: ConfigSpace,
    layout: Layout,
    bars: Bars,
    msix: Option<Msix>,
    errors: AtomicU32,
    /// See [`gate_bus_master`](VfioPciDevice::gate_bus_master).
    bus_master_gate: Option<BusMasterGate>,
}

/// Blocks until the device's DMA mappings are in place: `Ok`, or `Err`
/// with why they never will be.
pub type BusMasterGate = Box<dyn FnMut() -> Result<(), String> + Send>;

impl fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("info", &format_args!("{}", self.info))
            .field("bars", &self.shadow.bars())
            .field("command", &format_args!("{:#06x}", self.shadow.command()))
            .field("msix_enabled", &self.msix_enabled())
            .finish()
    }
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Merges the bytes of the write `[start, start + data.len())` that fall
/// in the 16-bit register at `reg` over `old`; with a mask of the bytes
/// written. `None` if the write misses the register.
fn merge_u16(start: usize, data: &[u8], reg: usize, old: u16) -> Option<(u16, u16)> {
    let mut bytes = old.to_le_bytes();
    let mut written = 0u16;
    for (k, byte) in bytes.iter_mut().enumerate() {
        if let Some(i) = (reg + k).checked_sub(start).filter(|&i| i < data.len()) {
            *byte = data[i];
            written |= 0xff << (8 * k);
        }
    }
    (written != 0).then(|| (u16::from_le_bytes(bytes), written))
}

impl VfioPciDevice {
    /// Opens `bdf` (the host's name, e.g. `0000:00:04.0`) from the VFIO
    /// group `group` — whose container already has the IOMMU set and the
    /// guest memory mapped (`memvisor_dma::vfio::VfioContainerMapper`) —
    /// and builds the device; see [`new`](Self::new).
    pub fn open(
        group: BorrowedFd<'_>,
        bdf: &str,
        msi: Arc<dyn MsiSink>,
        irqfds: Vec<EventFd>,
    ) -> Result<Self, VfioPciError> {
        let device = VfioDeviceFd::open(group, bdf)?;
        Self::new(Box::new(device), msi, irqfds)
    }

    /// A passthrough device on `io`: reads the device's configuration
    /// space, sizes its BARs from the VFIO regions, parses its
    /// capabilities, and turns on its memory decoding (for the VMM's BAR
    /// accesses) with bus mastering off until the guest enables it.
    ///
    /// `irqfds` has one eventfd per MSI-X vector (the table size, see
    /// [`VfioPciInfo::msix_vectors`]; none for a device without MSI-X),
    /// each registered by the VMM as a KVM irqfd of the GSI that `msi`
    /// routes for that vector.
    pub fn new(io: Box<dyn VfioDeviceIo>, msi: Arc<dyn MsiSink>, irqfds: Vec<EventFd>) -> Result<Self, VfioPciError> {
        let io: Arc<dyn VfioDeviceIo> = Arc::from(io);
        let region = io
            .region_info(CONFIG_REGION_INDEX)
            .map_err(|source| VfioPciError::RegionInfo {
                index: CONFIG_REGION_INDEX,
                source,
            })?;
        if region.size < CONVENTIONAL as u64 {
            return Err(VfioPciError::ConfigRegionTooSmall { size: region.size });
        }
        let cfg = read_conventional(&*io)?;
        let vendor_id = read_u16(&cfg, 0);
        if vendor_id == 0xffff || vendor_id == 0 {
            return Err(VfioPciError::DeviceAbsent { vendor_id });
        }
        let header_type = cfg[0x0e];
        if header_type & 0x7f != 0 {
            return Err(VfioPciError::UnsupportedHeaderType { header_type });
        }
        let header = PciHeader {
            vendor_id,
            device_id: read_u16(&cfg, 0x02),
            revision: cfg[0x08],
            class_code: read_u32(&cfg, 0x08) >> 8,
            subsystem_vendor_id: read_u16(&cfg, 0x2c),
            subsystem_id: read_u16(&cfg, 0x2e),
        };
        let (bars, hidden_io_bars) = probe_bars(io.as_ref(), &cfg)?;
        let shadow = shadow_space(&header, &bars)?;
        let layout = Layout::new(&cfg);
        let msix = match layout.msix {
            Some(cap) => Some(probe_msix(&io, &cfg, cap, &bars, msi, irqfds)?),
            None if irqfds.is_empty() => None,
            None => {
                return Err(VfioPciError::VectorCountMismatch {
                    vectors: 0,
                    irqfds: irqfds.len(),
                });
            }
        };
        let info = VfioPciInfo {
            vendor_id,
            device_id: header.device_id,
            revision: header.revision,
            class_code: header.class_code,
            subsystem_vendor_id: header.subsystem_vendor_id,
            subsystem_id: header.subsystem_id,
            bars: bars.iter().flatten().map(|(bar, _)| *bar).collect(),
            hidden_io_bars,
            msix_vectors: msix.as_ref().map_or(0, |m| m.config.vectors()),
            capabilities: layout.capabilities.clone(),
        };
        let mut device = Self {
            io,
            info,
            header,
            shadow,
            layout,
            bars,
            msix,
            errors: AtomicU32::new(0),
            bus_master_gate: None,
        };
        device.init_command()?;
        if device.info.msix_vectors == 0 {
            log::warn!(
                "vfio-pci {}: the device has no MSI-X capability: the guest gets no interrupts",
                device.info
            );
        } else {
            log::info!("vfio-pci: {}", device.info);
        }
        Ok(device)
    }

    /// Holds the guest's first write that turns bus mastering on until
    /// `gate` returns: a VMM that maps guest memory for the device while the
    /// guest starts lets the guest run meanwhile, and without bus mastering
    /// the device cannot reach memory at all. If `gate` fails, bus mastering
    /// stays off (the rest of the write goes through) and is gated again at
    /// the next write that sets it.
    pub fn gate_bus_master(&mut self, gate: BusMasterGate) {
        self.bus_master_gate = Some(gate);
    }

    /// The MSI-X table size of the device behind `io` (0: no MSI-X), to
    /// create the irqfds [`new`](Self::new) takes: open the device with
    /// [`VfioDeviceFd::open`], ask, then build.
    pub fn msix_vectors_of(io: &dyn VfioDeviceIo) -> Result<u16, VfioPciError> {
        let cfg = read_conventional(io)?;
        Ok(Layout::new(&cfg)
            .msix
            .map_or(0, |cap| (read_u16(&cfg, usize::from(cap) + 2) & 0x7ff) + 1))
    }

    /// What the device is.
    pub fn info(&self) -> &VfioPciInfo {
        &self.info
    }

    /// The MSI-X table size (0: no MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.info.msix_vectors
    }

    /// True if the guest enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.config.enabled())
    }

    /// True if the physical device signals `vector`'s irqfd directly (the
    /// vector is live); false if it is parked or MSI-X is off.
    pub fn msix_vector_direct(&self, vector: u16) -> bool {
        self.msix.as_ref().is_some_and(|m| m.router.is_direct(vector))
    }

    /// The VFIO region behind memory BAR `bar`, if the guest sees one
    /// there: its file offset and flags, for mapping it.
    pub fn bar_region(&self, bar: u8) -> Option<RegionInfo> {
        self.bars.get(usize::from(bar))?.map(|(_, region)| region)
    }

    /// The parts of BAR `bar` (offsets in the BAR) that could be mapped
    /// straight into the guest instead of trapped: the whole BAR in
    /// `page_size` pages, minus the pages holding the MSI-X table or PBA;
    /// empty if VFIO does not allow mapping the region.
    ///
    /// [`map_bars`](Self::map_bars) maps them; the VMM installs each as a
    /// KVM memory slot at the BAR's guest address + `range.start`, moved
    /// when the guest moves the BAR and removed while memory decoding is
    /// off. Accesses to mapped ranges then never reach
    /// [`read_bar`](PciDevice::read_bar); the rest keeps trapping.
    pub fn mappable_ranges(&self, bar: u8, page_size: u64) -> Vec<Range<u64>> {
        let Some(Some((info, region))) = self.bars.get(usize::from(bar)) else {
            return Vec::new();
        };
        if !region.mappable() || !page_size.is_power_of_two() {
            return Vec::new();
        }
        let size = info.size.next_multiple_of(page_size);
        let mut holes: Vec<Range<u64>> = self
            .msix
            .iter()
            .flat_map(|m| [m.table, m.pba])
            .filter(|area| area.bar == bar)
            .map(|area| area.offset & !(page_size - 1)..area.end().next_multiple_of(page_size))
            .collect();
        holes.sort_by_key(|h| h.start);
        let mut ranges = Vec::new();
        let mut at = 0;
        for hole in holes {
            if hole.start > at {
                ranges.push(at..hole.start);
            }
            at = at.max(hole.end);
        }
        if at < size {
            ranges.push(at..size);
        }
        ranges
    }

    /// Maps every range of [`mappable_ranges`](Self::mappable_ranges) of
    /// every BAR into this process, for the VMM to install as guest memory
    /// at the BAR's address. A range that cannot be mapped is logged and
    /// left out: the guest's accesses there keep trapping.
    pub fn map_bars(&self, page_size: u64) -> Vec<MappedBarRange> {
        let mut mapped = Vec::new();
        for bar in 0..6u8 {
            for range in self.mappable_ranges(bar, page_size) {
                let len = range.end - range.start;
                match self.io.map_region(u32::from(bar), range.start, len) {
                    Ok(mapping) => mapped.push(MappedBarRange {
                        bar,
                        offset: range.start,
                        mapping,
                    }),
                    Err(e) => log::warn!(
                        "{}: BAR{bar} [{:#x}, {:#x}) is not mapped, its accesses trap: {e}",
                        self.info,
                        range.start,
                        range.end
                    ),
                }
            }
        }
        mapped
    }

    /// Resets the device for a system reset: disables MSI-X (tearing down
    /// its routes through the sink), resets the function
    /// (`VFIO_DEVICE_RESET`), and returns what the VMM emulates to its
    /// power-on state — command register clear (no decoding, no bus
    /// mastering), MSI-X disabled with every vector masked, header
    /// storage cleared. The BARs keep their addresses (memvisor places
    /// BARs itself; [`PciRoot::assign_bars`](memvisor_pci::PciRoot::assign_bars)
    /// places them again and turns decoding on).
    pub fn reset(&mut self) -> Result<(), VfioPciError> {
        self.disable_msix();
        if let Some(m) = &mut self.msix {
            m.config = MsixConfig::new(m.config.vectors(), m.router.clone())?;
        }
        self.io.reset().map_err(|source| VfioPciError::Reset { source })?;
        let placed = self.shadow.bars();
        self.shadow = shadow_space(&self.header, &self.bars)?;
        for bar in placed {
            let reg = BAR0 + 4 * u16::from(bar.index);
            self.shadow.write(reg, &(bar.addr as u32).to_le_bytes());
            if bar.is_64bit {
                self.shadow.write(reg + 4, &((bar.addr >> 32) as u32).to_le_bytes());
            }
        }
        // The kernel restored the configuration space saved before the
        // reset, bus mastering included.
        self.init_command()
    }

    /// The device's command register with memory decoding on (the VMM's
    /// BAR accesses need it), I/O decoding and bus mastering off.
    fn init_command(&mut self) -> Result<(), VfioPciError> {
        let current = self.device_u16(COMMAND).map_err(|source| VfioPciError::ConfigRead {
            offset: COMMAND,
            len: 2,
            source,
        })?;
        let command = (current | COMMAND_MEMORY_SPACE) & !(COMMAND_BUS_MASTER | COMMAND_IO_SPACE);
        self.io
            .region_write(CONFIG_REGION_INDEX, u64::from(COMMAND), &command.to_le_bytes())
            .map_err(|source| VfioPciError::ConfigWrite {
                offset: COMMAND,
                source,
            })
    }

    fn device_u16(&self, offset: u16) -> std::io::Result<u16> {
        let mut bytes = [0u8; 2];
        self.io
            .region_read(CONFIG_REGION_INDEX, u64::from(offset), &mut bytes)?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// Logs a failed device access, the first few times.
    fn access_failed(&self, what: &str, region: u32, offset: u64, len: usize, error: &std::io::Error) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < LOGGED_ERRORS {
            log::warn!(
                "vfio-pci {:04x}:{:04x}: {what} of {len} bytes at {offset:#x} of region {region} failed: {error}{}",
                self.info.vendor_id,
                self.info.device_id,
                if n + 1 == LOGGED_ERRORS {
                    " (further failures not logged)"
                } else {
                    ""
                }
            );
        }
    }

    /// Disables MSI-X: VFIO first (the device stops signalling), then the
    /// routes.
    fn disable_msix(&mut self) {
        let Some(m) = &mut self.msix else {
            return;
        };
        if let Err(e) = m.router.disable() {
            log::warn!("vfio-pci: disabling VFIO MSI-X failed: {e}");
        }
        m.config
            .set_message_control(m.config.message_control() & !MSIX_CONTROL_ENABLE);
    }

    /// The guest wrote MSI-X message control.
    fn write_msix_control(&mut self, control: u16) {
        let Some(m) = &mut self.msix else {
            return;
        };
        let enable = control & MSIX_CONTROL_ENABLE != 0;
        match (m.config.enabled(), enable) {
            (false, true) => {
                if let Err(e) = m.router.enable() {
                    log::error!(
                        "vfio-pci: enabling MSI-X ({} vectors) failed: {e}; the device's interrupts are lost",
                        m.config.vectors()
                    );
                }
            }
            (true, false) => {
                if let Err(e) = m.router.disable() {
                    log::warn!("vfio-pci: disabling VFIO MSI-X failed: {e}");
                }
            }
            _ => {}
        }
        m.config.set_message_control(control);
    }

    /// True if header byte `at` is the VMM's register storage.
    fn from_shadow(at: usize) -> bool {
        at < HEADER_END && !STATUS_BYTES.contains(&at) && at != CAPABILITY_POINTER
    }

    fn msix_control_byte(&self, at: usize) -> Option<u8> {
        let m = self.msix.as_ref()?;
        let rel = at.checked_sub(usize::from(m.cap) + 2).filter(|&rel| rel < 2)?;
        Some(m.config.message_control().to_le_bytes()[rel])
    }

    fn needs_device(&self, at: usize) -> bool {
        !Self::from_shadow(at) && self.msix_control_byte(at).is_none() && !self.layout.overridden(at)
    }

    /// The guest's view of conventional byte `at` when the device has `raw`.
    fn guest_byte(&self, at: usize, raw: u8) -> u8 {
        if Self::from_shadow(at) {
            self.shadow.read_u8(at as u16)
        } else if let Some(byte) = self.msix_control_byte(at) {
            byte
        } else {
            self.layout.guest_byte(at, raw)
        }
    }

    /// Forwards the registers a guest write of `data` at `start` reaches.
    fn forward_write(&self, start: usize, data: &[u8]) {
        for rule in &self.layout.forward {
            let reg = usize::from(rule.offset);
            if reg + 2 <= start || reg >= start + data.len() {
                continue;
            }
            let current = match self.device_u16(rule.offset) {
                Ok(value) => value,
                Err(e) => {
                    self.access_failed("configuration read", CONFIG_REGION_INDEX, u64::from(rule.offset), 2, &e);
                    continue;
                }
            };
            let Some((new, written)) = merge_u16(start, data, reg, current) else {
                continue;
            };
            if written & (rule.rw | rule.w1c) == 0 {
                continue;
            }
            let value = rule.apply(current, new, written);
            if let Err(e) = self
                .io
                .region_write(CONFIG_REGION_INDEX, u64::from(rule.offset), &value.to_le_bytes())
            {
                self.access_failed(
                    "configuration write",
                    CONFIG_REGION_INDEX,
                    u64::from(rule.offset),
                    2,
                    &e,
                );
            }
        }
    }

    /// What serves BAR `bar` at `at` (< `end`), and up to where.
    fn target(&self, bar: u8, at: u64, end: u64) -> (Target, u64) {
        let mut until = end;
        if let Some(m) = &self.msix {
            for (area, is_table) in [(m.table, true), (m.pba, false)] {
                if area.bar != bar {
                    continue;
                }
                if (area.offset..area.end()).contains(&at) {
                    let rel = at - area.offset;
                    let target = if is_table { Target::Table(rel) } else { Target::Pba(rel) };
                    return (target, end.min(area.end()));
                }
                if area.offset > at {
                    until = until.min(area.offset);
                }
            }
        }
        (Target::Device, until)
    }

    /// The part of an access of `len` bytes at `offset` inside BAR `bar`,
    /// as its end; `None` if the BAR is not the guest's or is missed.
    fn clip(&self, bar: u8, offset: u64, len: usize) -> Option<u64> {
        let (info, _) = self.bars.get(usize::from(bar))?.as_ref()?;
        (offset < info.size).then(|| offset + (len as u64).min(info.size - offset))
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.disable_msix();
        // Stop DMA before the VMM unmaps guest memory.
        match self.device_u16(COMMAND) {
            Ok(command) if command & COMMAND_BUS_MASTER != 0 => {
                let command = command & !COMMAND_BUS_MASTER;
                if let Err(e) = self
                    .io
                    .region_write(CONFIG_REGION_INDEX, u64::from(COMMAND), &command.to_le_bytes())
                {
                    log::warn!("vfio-pci: clearing bus mastering failed: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => log::warn!("vfio-pci: reading the command register failed: {e}"),
        }
    }
}

/// The device's memory BARs (with their VFIO regions) and its I/O BARs.
fn probe_bars(io: &dyn VfioDeviceIo, cfg: &[u8; CONVENTIONAL]) -> Result<(Bars, Vec<(u8, u64)>), VfioPciError> {
    let mut bars = [None; NUM_BARS];
    let mut hidden = Vec::new();
    let mut i = 0;
    while i < NUM_BARS {
        let index = i as u8;
        let register = read_u32(cfg, usize::from(BAR0) + 4 * i);
        let region = io
            .region_info(u32::from(index))
            .map_err(|source| VfioPciError::RegionInfo {
                index: u32::from(index),
                source,
            })?;
        if region.size == 0 {
            i += 1;
            continue;
        }
        if register & 1 != 0 {
            log::warn!(
                "vfio-pci: BAR {index} is an I/O BAR ({:#x} bytes): memvisor has no I/O BARs, the guest sees none there",
                region.size
            );
            hidden.push((index, region.size));
            i += 1;
            continue;
        }
        let is_64bit = match (register >> 1) & 3 {
            // Type 1 ("below 1 MiB") is a 32-bit BAR to a modern system.
            0 | 1 => false,
            2 if i + 1 < NUM_BARS => true,
            _ => return Err(VfioPciError::InvalidBarType { index, register }),
        };
        let bar = DeviceBar {
            index,
            size: region.size,
            is_64bit,
            prefetchable: register & 8 != 0,
            mappable: region.mappable(),
        };
        bars[i] = Some((bar, region));
        i += if is_64bit { 2 } else { 1 };
    }
    Ok((bars, hidden))
}

/// The VMM's header for `header` with `bars` defined (unassigned).
fn shadow_space(header: &PciHeader, bars: &Bars) -> Result<ConfigSpace, VfioPciError> {
    let mut shadow = ConfigSpace::new(header);
    for (bar, _) in bars.iter().flatten() {
        shadow
            .add_bar(bar.index, bar.size, bar.is_64bit, bar.prefetchable)
            .map_err(|source| VfioPciError::BarSize {
                index: bar.index,
                size: bar.size,
                source,
            })?;
    }
    Ok(shadow)
}

/// The MSI-X table or PBA of `len` bytes described by `register` (offset
/// and BAR indicator), checked against `bars`.
fn msix_area(what: &'static str, register: u32, len: u64, bars: &Bars) -> Result<Area, VfioPciError> {
    let bir = (register & 7) as u8;
    let Some(Some((bar, _))) = bars.get(usize::from(bir)) else {
        return Err(VfioPciError::MsixBar { what, bir });
    };
    let offset = u64::from(register & !7);
    if offset + len > bar.size {
        return Err(VfioPciError::MsixOutsideBar {
            what,
            bar: bir,
            offset,
            len,
            bar_size: bar.size,
        });
    }
    Ok(Area { bar: bir, offset, len })
}

fn probe_msix(
    io: &Arc<dyn VfioDeviceIo>,
    cfg: &[u8; CONVENTIONAL],
    cap: u16,
    bars: &Bars,
    msi: Arc<dyn MsiSink>,
    irqfds: Vec<EventFd>,
) -> Result<Msix, VfioPciError> {
    let at = usize::from(cap);
    let vectors = (read_u16(cfg, at + 2) & 0x7ff) + 1;
    let table = msix_area(
        "table",
        read_u32(cfg, at + 4),
        u64::from(vectors) * MSIX_ENTRY_SIZE,
        bars,
    )?;
    let pba = msix_area("PBA", read_u32(cfg, at + 8), u64::from(vectors).div_ceil(64) * 8, bars)?;
    let irqs = io.irq_info(MSIX_IRQ_INDEX).map_err(|source| VfioPciError::IrqInfo {
        index: MSIX_IRQ_INDEX,
        source,
    })?;
    if !irqs.eventfd() || irqs.count < u32::from(vectors) {
        return Err(VfioPciError::MsixIrqs {
            vectors,
            count: irqs.count,
            flags: irqs.flags,
        });
    }
    if irqfds.len() != usize::from(vectors) {
        return Err(VfioPciError::VectorCountMismatch {
            vectors,
            irqfds: irqfds.len(),
        });
    }
    let router = Arc::new(IrqRouter::new(io.clone(), msi, irqfds).map_err(VfioPciError::EventFd)?);
    let config = MsixConfig::new(vectors, router.clone())?;
    Ok(Msix {
        config,
        router,
        cap,
        table,
        pba,
    })
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        for (i, byte) in data.iter_mut().enumerate() {
            // Extended space (0x100..0x1000) reads zero: no extended
            // capabilities. Nothing decodes past 4 KiB.
            *byte = if start.saturating_add(i) < CONFIG_SPACE_SIZE {
                0
            } else {
                0xff
            };
        }
        let end = start.saturating_add(data.len()).min(CONVENTIONAL);
        if start >= end {
            return;
        }
        let mut raw = [0xffu8; CONVENTIONAL];
        let first = (start..end).find(|&at| self.needs_device(at));
        if let Some(first) = first {
            let last = (first..end).rfind(|&at| self.needs_device(at)).unwrap_or(first);
            let span = &mut raw[first..=last];
            if let Err(e) = self.io.region_read(CONFIG_REGION_INDEX, first as u64, span) {
                span.fill(0xff);
                self.access_failed("configuration read", CONFIG_REGION_INDEX, first as u64, span.len(), &e);
            }
        }
        for at in start..end {
            data[at - start] = self.guest_byte(at, raw[at]);
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        let end = start.saturating_add(data.len()).min(CONVENTIONAL);
        if start >= end {
            return;
        }
        let mut data = data[..end - start].to_vec();
        let bus_master = usize::from(COMMAND)
            .checked_sub(start)
            .filter(|&at| at < data.len() && data[at] & COMMAND_BUS_MASTER as u8 != 0);
        if let (Some(at), Some(gate)) = (bus_master, self.bus_master_gate.as_mut()) {
            match gate() {
                Ok(()) => self.bus_master_gate = None,
                Err(why) => {
                    log::error!("vfio-pci {}: bus mastering stays off: {why}", self.info);
                    data[at] &= !(COMMAND_BUS_MASTER as u8);
                }
            }
        }
        let data = &data[..];
        if start < HEADER_END {
            // BARs, command, cache line, latency, interrupt line; the rest
            // of the header is read-only there.
            let n = (HEADER_END - start).min(data.len());
            self.shadow.write(offset, &data[..n]);
        }
        if let Some(m) = &self.msix {
            let control = m.config.message_control();
            if let Some((control, _)) = merge_u16(start, data, usize::from(m.cap) + 2, control) {
                self.write_msix_control(control);
            }
        }
        self.forward_write(start, data);
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.shadow.bars()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(end) = self.clip(bar, offset, data.len()) else {
            return;
        };
        let mut at = offset;
        while at < end {
            let (target, until) = self.target(bar, at, end);
            let part = &mut data[(at - offset) as usize..(until - offset) as usize];
            match target {
                Target::Device => {
                    if let Err(e) = self.io.region_read(u32::from(bar), at, part) {
                        part.fill(0xff);
                        self.access_failed("BAR read", u32::from(bar), at, part.len(), &e);
                    }
                }
                Target::Table(rel) => {
                    if let Some(m) = &self.msix {
                        m.config.read_table(rel, part);
                    }
                }
                Target::Pba(rel) => {
                    if let Some(m) = &mut self.msix {
                        m.router.collect_pending(&mut m.config);
                        m.config.read_pba(rel, part);
                    }
                }
            }
            at = until;
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let Some(end) = self.clip(bar, offset, data.len()) else {
            return;
        };
        let mut at = offset;
        while at < end {
            let (target, until) = self.target(bar, at, end);
            let part = &data[(at - offset) as usize..(until - offset) as usize];
            match target {
                Target::Device => {
                    if let Err(e) = self.io.region_write(u32::from(bar), at, part) {
                        self.access_failed("BAR write", u32::from(bar), at, part.len(), &e);
                    }
                }
                Target::Table(rel) => {
                    if let Some(m) = &mut self.msix {
                        m.config.write_table(rel, part);
                    }
                }
                // The PBA is read-only.
                Target::Pba(_) => {}
            }
            at = until;
        }
    }
}
