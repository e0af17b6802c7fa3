//! Type-0 configuration space: the [`PciDevice`] trait every function on
//! the bus implements, and [`ConfigSpace`], the header, BARs and
//! capability list a device builds its configuration space from.
//!
//! Register semantics, as a guest sees them:
//! * identification, class, header type, status, capability pointer and
//!   capability bodies are read-only;
//! * the command register keeps only I/O space, memory space, bus master,
//!   parity error response, SERR# and INTx disable (mask `0x0547`);
//!   cache line size, latency timer and interrupt line are plain storage;
//! * a BAR stores only the address bits above its size, so writing all
//!   ones and reading back yields the size mask (BAR sizing), and a 64-bit
//!   BAR's upper dword holds the address bits 63:32;
//! * bytes 0x100..0x1000 (the extended space ECAM reaches) read as zero,
//!   so Linux finds no extended capability; writes to them are ignored.
//!
//! Any access width at any offset is accepted: a read is assembled byte by
//! byte from the dwords it touches, a write is applied per dword with byte
//! enables, exactly what a partial write does on hardware.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::PciError;
use crate::error::TransportStateError;

/// Offset of the vendor ID (16 bits).
pub const VENDOR_ID: u16 = 0x00;
/// Offset of the device ID (16 bits).
pub const DEVICE_ID: u16 = 0x02;
/// Offset of the command register (16 bits).
pub const COMMAND: u16 = 0x04;
/// Offset of the status register (16 bits).
pub const STATUS: u16 = 0x06;
/// Offset of the revision ID (8 bits).
pub const REVISION_ID: u16 = 0x08;
/// Offset of the class code (24 bits: programming interface, subclass, class).
pub const CLASS_CODE: u16 = 0x09;
/// Offset of the cache line size (8 bits).
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Offset of the latency timer (8 bits).
pub const LATENCY_TIMER: u16 = 0x0d;
/// Offset of the header type (8 bits).
pub const HEADER_TYPE: u16 = 0x0e;
/// Offset of BAR 0; BAR `i` is at `BAR0 + 4 * i`.
pub const BAR0: u16 = 0x10;
/// Offset of the subsystem vendor ID (16 bits).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Offset of the subsystem ID (16 bits).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Offset of the expansion ROM BAR (none here: reads zero).
pub const EXPANSION_ROM: u16 = 0x30;
/// Offset of the capabilities pointer (8 bits).
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Offset of the interrupt line (8 bits).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Offset of the interrupt pin (8 bits; 0: no INTx).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Command register: I/O space decoding.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding; BARs are reachable only with it.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: bus mastering (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command register bits a guest may change.
const COMMAND_WRITABLE: u16 =
    COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | 1 << 6 | 1 << 8 | COMMAND_INTX_DISABLE;

/// Status register: the function has a capability list.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// Bytes of a function's configuration space as ECAM decodes it.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes of the conventional configuration space (header and capabilities).
pub const CONVENTIONAL_SPACE_SIZE: usize = 256;
/// BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Where the first capability goes, after the 64-byte header.
const FIRST_CAPABILITY: usize = 0x40;

/// BAR low-dword flag: 64-bit memory BAR (type `10b` in bits 2:1).
const BAR_MEM_TYPE_64: u32 = 0b100;
/// BAR low-dword flag: prefetchable.
const BAR_MEM_PREFETCHABLE: u32 = 0b1000;
/// The largest 32-bit memory BAR.
const MAX_BAR32_SIZE: u64 = 1 << 31;
/// The largest 64-bit memory BAR.
const MAX_BAR64_SIZE: u64 = 1 << 63;

/// One memory BAR as programmed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index (0..=5; a 64-bit BAR also occupies `index + 1`).
    pub index: u8,
    /// Base address the guest (or the VMM) programmed; 0 while unassigned.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// A 64-bit BAR.
    pub is_64bit: bool,
    /// A prefetchable BAR.
    pub prefetchable: bool,
}

impl BarInfo {
    /// True if `addr` lies inside the BAR.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.size
    }
}

/// One memory BAR of a [`ConfigSpaceState`]: its definition (checked
/// against the destination's) and the address programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarState {
    /// BAR index.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit BAR.
    pub is_64bit: bool,
    /// A prefetchable BAR.
    pub prefetchable: bool,
    /// The address programmed (0 while unassigned).
    pub addr: u64,
}

/// The saved state of a [`ConfigSpace`]: what a guest reads, and where
/// the BARs are. Taken by [`ConfigSpace::state`], restored by
/// [`ConfigSpace::restore`] into a configuration space built the same
/// way (same header, BARs and capabilities).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    /// The conventional space (256 bytes) as a guest reads it: command
    /// register, cache line size, latency timer, interrupt line, the
    /// device-writable capability bytes, and every read-only byte (checked
    /// against the destination's on restore). The BAR registers in it are
    /// informative: [`bars`](Self::bars) is what is restored.
    pub regs: Vec<u8>,
    /// The defined memory BARs, in index order.
    pub bars: Vec<BarState>,
}

/// A PCI function as the root bus sees it. Every method must absorb any
/// guest access — any offset, any width, unaligned — without panicking.
pub trait PciDevice: Send {
    /// Reads configuration space at `offset` (< 4096) into `data` (any
    /// width; 1, 2 or 4 bytes from a sane guest).
    fn read_config(&mut self, offset: u16, data: &mut [u8]);

    /// Writes configuration space at `offset` (< 4096).
    fn write_config(&mut self, offset: u16, data: &[u8]);

    /// The function's memory BARs as programmed now (unassigned ones with
    /// address 0).
    fn bars(&self) -> Vec<BarInfo>;

    /// Reads `data.len()` bytes at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// The identification fields of a type-0 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, 24 bits: class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// What one BAR register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    /// A memory BAR; `addr` keeps only the bits above the size.
    Memory {
        size: u64,
        is_64bit: bool,
        prefetchable: bool,
        addr: u64,
    },
    /// The upper dword of the 64-bit BAR in the slot below.
    Upper,
}

/// A type-0 configuration space: header registers, up to six memory BARs
/// and a capability list. See the [module documentation](self) for what a
/// guest may change.
///
/// Registers owned by a device (an MSI-X message control, a virtio
/// `VIRTIO_PCI_CAP_PCI_CFG` window) are made guest-writable with
/// [`set_write_mask`](Self::set_write_mask); the device applies their
/// side effects after [`write`](Self::write).
#[derive(Clone)]
pub struct ConfigSpace {
    regs: [u8; CONVENTIONAL_SPACE_SIZE],
    wmask: [u8; CONVENTIONAL_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device_id", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars())
            .finish()
    }
}

impl ConfigSpace {
    /// A configuration space with `header`'s identification, no BARs, no
    /// capabilities, no interrupt pin, everything disabled.
    pub fn new(header: &PciHeader) -> Self {
        let mut space = Self {
            regs: [0; CONVENTIONAL_SPACE_SIZE],
            wmask: [0; CONVENTIONAL_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        space.set_bytes(VENDOR_ID, &header.vendor_id.to_le_bytes());
        space.set_bytes(DEVICE_ID, &header.device_id.to_le_bytes());
        space.set_bytes(REVISION_ID, &[header.revision]);
        space.set_bytes(CLASS_CODE, &header.class_code.to_le_bytes()[..3]);
        space.set_bytes(SUBSYSTEM_VENDOR_ID, &header.subsystem_vendor_id.to_le_bytes());
        space.set_bytes(SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        space.set_write_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.set_write_mask(CACHE_LINE_SIZE, &[0xff, 0xff]);
        space.set_write_mask(INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Defines memory BAR `index` of `size` bytes (a power of two, at least
    /// 16; at most 2 GiB for a 32-bit BAR). A 64-bit BAR also takes
    /// `index + 1`. The BAR starts unassigned (address 0).
    pub fn add_bar(&mut self, index: u8, size: u64, is_64bit: bool, prefetchable: bool) -> Result<(), PciError> {
        let i = usize::from(index);
        let last = if is_64bit { i + 1 } else { i };
        if last >= NUM_BARS {
            return Err(PciError::InvalidBarIndex(index));
        }
        let max = if is_64bit { MAX_BAR64_SIZE } else { MAX_BAR32_SIZE };
        if size < 16 || size > max || !size.is_power_of_two() {
            return Err(PciError::InvalidBarSize { size, max });
        }
        for j in i..=last {
            if self.bars[j] != BarSlot::Unused {
                return Err(PciError::BarInUse(j as u8));
            }
        }
        self.bars[i] = BarSlot::Memory {
            size,
            is_64bit,
            prefetchable,
            addr: 0,
        };
        if is_64bit {
            self.bars[i + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Appends a capability with ID `id` and `body` (the bytes after the
    /// ID and next pointer) to the list, dword-aligned from 0x40, and
    /// returns its offset. The body is read-only unless
    /// [`set_write_mask`](Self::set_write_mask) says otherwise.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, PciError> {
        let offset = self.next_capability;
        let len = 2 + body.len();
        if offset + len > CONVENTIONAL_SPACE_SIZE {
            return Err(PciError::CapabilitySpace { len, offset });
        }
        self.regs[offset] = id;
        self.regs[offset + 1] = 0;
        self.regs[offset + 2..offset + len].copy_from_slice(body);
        match self.last_capability {
            None => {
                self.regs[usize::from(CAPABILITIES_POINTER)] = offset as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_bytes(STATUS, &status.to_le_bytes());
            }
            Some(previous) => self.regs[previous + 1] = offset as u8,
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len + 3) & !3;
        Ok(offset as u16)
    }

    /// Makes the bits set in `mask` guest-writable, for the bytes from
    /// `offset` (bytes past the conventional space are ignored). Not for
    /// BARs, whose writable bits follow from their size.
    pub fn set_write_mask(&mut self, offset: u16, mask: &[u8]) {
        let start = usize::from(offset).min(CONVENTIONAL_SPACE_SIZE);
        let end = (start + mask.len()).min(CONVENTIONAL_SPACE_SIZE);
        self.wmask[start..end].copy_from_slice(&mask[..end - start]);
    }

    /// Sets register bytes from `offset` as the device (bypassing the
    /// write mask), e.g. to present data the device produced. Bytes past
    /// the conventional space are ignored; BAR registers are computed from
    /// the BARs and are not changed this way.
    pub fn set_bytes(&mut self, offset: u16, bytes: &[u8]) {
        let start = usize::from(offset).min(CONVENTIONAL_SPACE_SIZE);
        let end = (start + bytes.len()).min(CONVENTIONAL_SPACE_SIZE);
        self.regs[start..end].copy_from_slice(&bytes[..end - start]);
    }

    /// A guest read of `data.len()` bytes at `offset`: bytes 0x100..0x1000
    /// read as zero, bytes past 4096 as 0xff (nothing decodes them).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            *byte = if at < CONVENTIONAL_SPACE_SIZE {
                (self.dword(at / 4) >> (8 * (at % 4))) as u8
            } else if at < CONFIG_SPACE_SIZE {
                0
            } else {
                0xff
            };
        }
    }

    /// A guest write of `data` at `offset`, applied dword by dword with
    /// byte enables; read-only bits and bytes past the conventional space
    /// are left alone.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        let mut i = 0;
        while i < data.len() && start + i < CONVENTIONAL_SPACE_SIZE {
            let index = (start + i) / 4;
            let (mut value, mut enables) = (0u32, 0u32);
            while i < data.len() && (start + i) / 4 == index {
                let shift = 8 * ((start + i) % 4);
                value |= u32::from(data[i]) << shift;
                enables |= 0xff << shift;
                i += 1;
            }
            self.write_dword(index, value, enables);
        }
    }

    /// The 8-bit register at `offset` (0 past the conventional space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// The 16-bit register at `offset`.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The 32-bit register at `offset`.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// True if memory space decoding is enabled: the BARs are live.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// The BARs as programmed now.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match *slot {
                BarSlot::Memory {
                    size,
                    is_64bit,
                    prefetchable,
                    addr,
                } => Some(BarInfo {
                    index: index as u8,
                    addr,
                    size,
                    is_64bit,
                    prefetchable,
                }),
                _ => None,
            })
            .collect()
    }

    /// BAR `index` as programmed now, if it is defined.
    pub fn bar(&self, index: u8) -> Option<BarInfo> {
        self.bars().into_iter().find(|b| b.index == index)
    }

    /// The state to save: see [`ConfigSpaceState`].
    pub fn state(&self) -> ConfigSpaceState {
        let mut regs = vec![0u8; CONVENTIONAL_SPACE_SIZE];
        self.read(0, &mut regs);
        let bars = self
            .bars()
            .into_iter()
            .map(|b| BarState {
                index: b.index,
                size: b.size,
                is_64bit: b.is_64bit,
                prefetchable: b.prefetchable,
                addr: b.addr,
            })
            .collect();
        ConfigSpaceState { regs, bars }
    }

    /// Restores `state` (from a configuration space built the same way):
    /// the guest-writable bits of every register and every BAR address. A
    /// restore has no side effects; the owner applies those of the
    /// registers it owns (memory decoding, MSI-X control) afterwards.
    ///
    /// # Errors
    ///
    /// Refuses, changing nothing, a state of another length, a read-only
    /// bit that differs from this space's (another device, header or
    /// capability list), BARs defined differently, or a BAR address that
    /// is not aligned to its size or does not fit a 32-bit BAR.
    pub fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), TransportStateError> {
        self.check_state(state)?;
        let bar_bytes = Self::bar_bytes();
        for (at, &saved) in state.regs.iter().enumerate() {
            if !bar_bytes.contains(&at) {
                let mask = self.wmask[at];
                self.regs[at] = (self.regs[at] & !mask) | (saved & mask);
            }
        }
        for bar in &state.bars {
            if let BarSlot::Memory { addr, .. } = &mut self.bars[usize::from(bar.index)] {
                *addr = bar.addr;
            }
        }
        Ok(())
    }

    /// The checks of [`restore`](Self::restore), without restoring.
    pub(crate) fn check_state(&self, state: &ConfigSpaceState) -> Result<(), TransportStateError> {
        if state.regs.len() != CONVENTIONAL_SPACE_SIZE {
            return Err(TransportStateError::Mismatch {
                field: "configuration space length".into(),
                saved: state.regs.len() as u64,
                local: CONVENTIONAL_SPACE_SIZE as u64,
            });
        }
        let bar_bytes = Self::bar_bytes();
        for (at, &saved) in state.regs.iter().enumerate() {
            if bar_bytes.contains(&at) {
                continue;
            }
            let read_only = !self.wmask[at];
            let local = (self.dword(at / 4) >> (8 * (at % 4))) as u8;
            if saved & read_only != local & read_only {
                return Err(TransportStateError::Mismatch {
                    field: format!("read-only configuration byte {at:#x}"),
                    saved: u64::from(saved),
                    local: u64::from(local),
                });
            }
        }
        let local = self.bars();
        if state.bars.len() != local.len() {
            return Err(TransportStateError::Mismatch {
                field: "number of BARs".into(),
                saved: state.bars.len() as u64,
                local: local.len() as u64,
            });
        }
        for (saved, here) in state.bars.iter().zip(&local) {
            let name = |what: &str| format!("BAR {} {what}", here.index);
            for (what, s, l) in [
                ("index", u64::from(saved.index), u64::from(here.index)),
                ("size", saved.size, here.size),
                ("64-bit flag", u64::from(saved.is_64bit), u64::from(here.is_64bit)),
                (
                    "prefetchable flag",
                    u64::from(saved.prefetchable),
                    u64::from(here.prefetchable),
                ),
            ] {
                if s != l {
                    return Err(TransportStateError::Mismatch {
                        field: name(what),
                        saved: s,
                        local: l,
                    });
                }
            }
            if saved.addr & (saved.size - 1) != 0 {
                return Err(TransportStateError::Invalid {
                    field: name("address"),
                    value: saved.addr,
                    reason: format!("not aligned to the BAR size {:#x}", saved.size),
                });
            }
            if !saved.is_64bit && saved.addr > u64::from(u32::MAX) {
                return Err(TransportStateError::Invalid {
                    field: name("address"),
                    value: saved.addr,
                    reason: "above 4 GiB for a 32-bit BAR".into(),
                });
            }
        }
        Ok(())
    }

    /// The byte offsets of the BAR registers.
    fn bar_bytes() -> std::ops::Range<usize> {
        usize::from(BAR0)..usize::from(BAR0) + 4 * NUM_BARS
    }

    fn dword(&self, index: usize) -> u32 {
        let bar_dwords = usize::from(BAR0) / 4..usize::from(BAR0) / 4 + NUM_BARS;
        if bar_dwords.contains(&index) {
            return self.bar_dword(index - bar_dwords.start);
        }
        let at = 4 * index;
        u32::from_le_bytes([self.regs[at], self.regs[at + 1], self.regs[at + 2], self.regs[at + 3]])
    }

    fn write_dword(&mut self, index: usize, value: u32, enables: u32) {
        let bar_dwords = usize::from(BAR0) / 4..usize::from(BAR0) / 4 + NUM_BARS;
        if bar_dwords.contains(&index) {
            self.write_bar_dword(index - bar_dwords.start, value, enables);
            return;
        }
        for k in 0..4 {
            if enables >> (8 * k) & 0xff != 0 {
                let at = 4 * index + k;
                let mask = self.wmask[at];
                self.regs[at] = (self.regs[at] & !mask) | ((value >> (8 * k)) as u8 & mask);
            }
        }
    }

    fn bar_dword(&self, bar: usize) -> u32 {
        match self.bars[bar] {
            BarSlot::Unused => 0,
            BarSlot::Memory {
                is_64bit,
                prefetchable,
                addr,
                ..
            } => {
                let mut value = addr as u32 & 0xffff_fff0;
                if is_64bit {
                    value |= BAR_MEM_TYPE_64;
                }
                if prefetchable {
                    value |= BAR_MEM_PREFETCHABLE;
                }
                value
            }
            BarSlot::Upper => match bar.checked_sub(1).map(|lower| self.bars[lower]) {
                Some(BarSlot::Memory { addr, .. }) => (addr >> 32) as u32,
                _ => 0,
            },
        }
    }

    fn write_bar_dword(&mut self, bar: usize, value: u32, enables: u32) {
        let new = (self.bar_dword(bar) & !enables) | (value & enables);
        match self.bars[bar] {
            BarSlot::Unused => {}
            BarSlot::Memory { size, is_64bit, .. } => {
                if let BarSlot::Memory { addr, .. } = &mut self.bars[bar] {
                    let high = if is_64bit { *addr & 0xffff_ffff_0000_0000 } else { 0 };
                    *addr = (high | u64::from(new & 0xffff_fff0)) & !(size - 1);
                }
            }
            BarSlot::Upper => {
                if let Some(BarSlot::Memory { size, addr, .. }) = bar.checked_sub(1).map(|lower| &mut self.bars[lower])
                {
                    *addr = ((u64::from(new) << 32) | (*addr & 0xffff_ffff)) & !(*size - 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1058,
            revision: 1,
            class_code: 0xff_0000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x18,
        })
    }

    #[test]
    fn header_fields_and_read_only() {
        let mut s = space();
        assert_eq!(s.read_u32(0), 0x1058_1af4);
        assert_eq!(s.read_u32(8), 0xff00_0001);
        assert_eq!(s.read_u32(0x2c), 0x0018_1af4);
        s.write(0, &[0xff; 4]);
        s.write(8, &0xffff_ffffu32.to_le_bytes());
        s.write(0x2c, &0u32.to_le_bytes());
        s.write(STATUS, &0xffffu16.to_le_bytes());
        s.write(EXPANSION_ROM, &[0xff; 4]);
        s.write(INTERRUPT_PIN, &[1]);
        assert_eq!(s.read_u32(0), 0x1058_1af4);
        assert_eq!(s.read_u32(8), 0xff00_0001);
        assert_eq!(s.read_u32(0x2c), 0x0018_1af4);
        assert_eq!(s.read_u16(STATUS), 0);
        assert_eq!(s.read_u32(EXPANSION_ROM), 0);
        assert_eq!(s.read_u8(INTERRUPT_PIN), 0);
        // Writable: command (masked), cache line, latency, interrupt line.
        s.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(s.command(), 0x0547);
        assert!(s.memory_enabled());
        s.write(CACHE_LINE_SIZE, &[0x10, 0x40]);
        s.write(INTERRUPT_LINE, &[11]);
        assert_eq!(s.read_u16(CACHE_LINE_SIZE), 0x4010);
        assert_eq!(s.read_u8(INTERRUPT_LINE), 11);
    }

    #[test]
    fn any_width_any_offset() {
        let s = space();
        let mut d = [0u8; 3];
        s.read(1, &mut d);
        assert_eq!(d, [0x1a, 0x58, 0x10]);
        let mut d = [0u8; 8];
        s.read(0xfc, &mut d);
        assert_eq!(d, [0; 8], "0x100.. reads zero");
        s.read(4094, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut s = s;
        s.write(0xfe, &[0xff; 8]);
        s.write(u16::MAX, &[0xff; 8]);
        assert_eq!(s.read_u32(0), 0x1058_1af4);
    }

    #[test]
    fn bar_sizing_and_relocation_32() {
        let mut s = space();
        s.add_bar(1, 0x1000, false, true).unwrap();
        assert_eq!(s.read_u32(0x14), 0b1000, "prefetchable 32-bit memory BAR");
        s.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(s.read_u32(0x14), 0xffff_f008);
        s.write(0x14, &0xc000_1234u32.to_le_bytes());
        assert_eq!(s.read_u32(0x14), 0xc000_1008);
        assert_eq!(s.bar(1).unwrap().addr, 0xc000_1000);
        // A byte write moves only that byte's bits.
        s.write(0x17, &[0xd0]);
        assert_eq!(s.bar(1).unwrap().addr, 0xd000_1000);
        // Unused BARs stay zero.
        s.write(0x10, &[0xff; 4]);
        s.write(0x18, &[0xff; 4]);
        assert_eq!(s.read_u32(0x10), 0);
        assert_eq!(s.read_u32(0x18), 0);
    }

    #[test]
    fn bar_sizing_and_relocation_64() {
        let mut s = space();
        s.add_bar(0, 0x8000, true, false).unwrap();
        assert_eq!(s.read_u32(0x10), 0b100);
        assert_eq!(s.read_u32(0x14), 0);
        s.write(0x10, &[0xff; 4]);
        s.write(0x14, &[0xff; 4]);
        assert_eq!(s.read_u32(0x10), 0xffff_8004);
        assert_eq!(s.read_u32(0x14), 0xffff_ffff);
        s.write(0x10, &0xe000_0000u32.to_le_bytes());
        s.write(0x14, &0x0000_0001u32.to_le_bytes());
        let bar = s.bar(0).unwrap();
        assert_eq!(bar.addr, 0x1_e000_0000);
        assert!(bar.is_64bit && !bar.prefetchable);
        assert_eq!(bar.size, 0x8000);
        // An 8-byte write across both halves.
        s.write(0x10, &0x2_0000_8000u64.to_le_bytes());
        assert_eq!(s.bar(0).unwrap().addr, 0x2_0000_8000);
        // A BAR larger than 4 GiB masks the upper dword too.
        let mut s = space();
        s.add_bar(2, 1 << 33, true, true).unwrap();
        s.write(0x18, &[0xff; 8]);
        assert_eq!(s.read_u32(0x18), 0x0000_000c);
        assert_eq!(s.read_u32(0x1c), 0xffff_fffe);
    }

    #[test]
    fn bar_definition_errors() {
        let mut s = space();
        assert!(matches!(
            s.add_bar(5, 0x1000, true, false),
            Err(PciError::InvalidBarIndex(5))
        ));
        assert!(matches!(
            s.add_bar(6, 0x1000, false, false),
            Err(PciError::InvalidBarIndex(6))
        ));
        assert!(matches!(
            s.add_bar(0, 0x1800, false, false),
            Err(PciError::InvalidBarSize { size: 0x1800, .. })
        ));
        assert!(matches!(
            s.add_bar(0, 8, false, false),
            Err(PciError::InvalidBarSize { size: 8, .. })
        ));
        assert!(matches!(
            s.add_bar(0, 1 << 32, false, false),
            Err(PciError::InvalidBarSize { .. })
        ));
        s.add_bar(0, 0x1000, true, false).unwrap();
        assert!(matches!(s.add_bar(1, 0x1000, false, false), Err(PciError::BarInUse(1))));
    }

    #[test]
    fn capability_chain() {
        let mut s = space();
        assert_eq!(s.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = s.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
        let b = s.add_capability(0x09, &[3, 1]).unwrap();
        let c = s.add_capability(0x09, &[0; 14]).unwrap();
        assert_eq!((a, b, c), (0x40, 0x4c, 0x50));
        assert_ne!(s.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let mut walk = vec![];
        let mut at = s.read_u8(CAPABILITIES_POINTER);
        while at != 0 {
            walk.push((at, s.read_u8(u16::from(at))));
            at = s.read_u8(u16::from(at) + 1);
        }
        assert_eq!(walk, [(0x40, 0x11), (0x4c, 0x09), (0x50, 0x09)]);
        // Read-only unless a mask says otherwise.
        s.write(0x40, &[0xff; 12]);
        assert_eq!(s.read_u32(0x40), 0x0201_0011 | 0x4c00);
        s.set_write_mask(0x43, &[0xc0]);
        s.write(0x42, &0xffffu16.to_le_bytes());
        assert_eq!(s.read_u16(0x42), 0xc201);
        // A capability that does not fit.
        assert!(matches!(
            s.add_capability(0x09, &[0; 250]),
            Err(PciError::CapabilitySpace { .. })
        ));
    }

    #[test]
    fn state_round_trip_and_refusals() {
        let build = || {
            let mut s = space();
            s.add_bar(0, 0x8000, true, false).unwrap();
            s.add_bar(2, 0x1000, false, false).unwrap();
            s.add_capability(0x09, &[0; 6]).unwrap();
            s.set_write_mask(0x44, &[0xff]);
            s
        };
        let mut src = build();
        src.write(0x10, &0x2_0000_8000u64.to_le_bytes());
        src.write(0x18, &0xc000_1000u32.to_le_bytes());
        src.write(COMMAND, &0x0006u16.to_le_bytes());
        src.write(INTERRUPT_LINE, &[11]);
        src.write(0x44, &[0x5a]);
        let state = src.state();
        assert_eq!(state.regs.len(), CONVENTIONAL_SPACE_SIZE);
        assert_eq!(state.bars.len(), 2);

        let mut dst = build();
        dst.restore(&state).unwrap();
        assert_eq!(dst.state(), state);
        assert_eq!(dst.bars(), src.bars());
        let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
        src.read(0, &mut a);
        dst.read(0, &mut b);
        assert_eq!(a, b);
        assert!(dst.memory_enabled());

        // Refusals change nothing.
        let fresh = build();
        let refuse = |state: &ConfigSpaceState| {
            let mut dst = build();
            let err = dst.restore(state).unwrap_err();
            assert_eq!(dst.state(), fresh.state(), "{err}");
            err
        };
        let mut bad = state.clone();
        bad.regs[DEVICE_ID as usize] ^= 1;
        assert!(
            matches!(refuse(&bad), TransportStateError::Mismatch { field, saved: 0x59, local: 0x58 }
            if field == "read-only configuration byte 0x2")
        );
        let mut bad = state.clone();
        bad.bars[1].addr = 0xc000_1800;
        assert!(matches!(refuse(&bad), TransportStateError::Invalid { field, .. } if field == "BAR 2 address"));
        let mut bad = state.clone();
        bad.bars[1].addr = 0x1_0000_0000;
        assert!(matches!(refuse(&bad), TransportStateError::Invalid { field, .. } if field == "BAR 2 address"));
        let mut bad = state.clone();
        bad.bars[0].is_64bit = false;
        assert!(matches!(refuse(&bad), TransportStateError::Mismatch { field, .. } if field == "BAR 0 64-bit flag"));
        let mut bad = state.clone();
        bad.bars.pop();
        assert!(
            matches!(refuse(&bad), TransportStateError::Mismatch { field, saved: 1, local: 2 }
            if field == "number of BARs")
        );
        let mut bad = state;
        bad.regs.push(0);
        assert!(matches!(
            refuse(&bad),
            TransportStateError::Mismatch {
                saved: 257,
                local: 256,
                ..
            }
        ));
    }
}
