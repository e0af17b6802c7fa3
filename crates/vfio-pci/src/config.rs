//! The guest's view of the device's configuration space above the
//! header: which capabilities it sees, which bytes the VMM overrides, and
//! which registers a guest write reaches the device through.
//!
//! Built once from a snapshot of the device's 256-byte conventional
//! configuration space. The capability list is walked (at most 48 entries,
//! stopping at a loop or a pointer into the header) and each capability is
//! either *exposed*, relinked into the guest's list, or *hidden*: unlinked,
//! its bytes reading zero. Exposed are power management, PCI Express
//! (adapted to the root bus), MSI-X (emulated) and vendor-specific
//! capabilities (read-only); everything else is hidden, MSI first of all,
//! so that the guest's driver uses MSI-X.

use std::fmt;

/// Bytes of the conventional configuration space.
pub(crate) const CONVENTIONAL: usize = 256;
/// Where capabilities may start.
const FIRST_CAPABILITY: usize = 0x40;
/// The longest list walked (48 dword-aligned slots above the header).
const MAX_CAPABILITIES: usize = 48;

/// Capability ID: power management.
pub const CAP_ID_PM: u8 = 0x01;
/// Capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor-specific.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// Status register: the capability list bit.
const STATUS_CAP_LIST: u8 = 1 << 4;

/// PCI Express capability registers (offsets in the capability).
const PCIE_FLAGS: usize = 0x02;
const PCIE_DEVCAP: usize = 0x04;
const PCIE_DEVCTL: usize = 0x08;
const PCIE_DEVSTA: usize = 0x0a;
const PCIE_LNKCAP: usize = 0x0c;
const PCIE_LNKSTA_END: usize = 0x14;
const PCIE_DEVCTL2: usize = 0x28;
const PCIE_LNKCAP2: usize = 0x2c;
const PCIE_LNKSTA2_END: usize = 0x34;
/// Bytes of a version 1 and a version 2 PCI Express capability.
const PCIE_V1_SIZE: usize = 0x24;
const PCIE_V2_SIZE: usize = 0x3c;
/// Device/port types.
const PCIE_TYPE_ENDPOINT: u8 = 0x0;
const PCIE_TYPE_RC_INTEGRATED: u8 = 0x9;
/// Device capabilities: function-level reset supported (bit 28).
const PCIE_DEVCAP_FLR_BYTE: usize = 3;
const PCIE_DEVCAP_FLR_BIT: u8 = 1 << 4;

/// Power management: the control/status register.
const PM_CTRL: usize = 0x04;
/// Bytes of a power management capability.
const PM_SIZE: usize = 8;
/// Bytes of an MSI-X capability.
const MSIX_SIZE: usize = 12;

/// One capability of the device's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityInfo {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u8,
    /// Bytes it covers (from its layout, or up to the next capability).
    pub len: u8,
    /// True if the guest sees it; false if it is unlinked and reads zero.
    pub exposed: bool,
}

impl CapabilityInfo {
    /// A short name of the capability ID.
    pub fn name(&self) -> &'static str {
        match self.id {
            CAP_ID_PM => "PM",
            0x03 => "VPD",
            CAP_ID_MSI => "MSI",
            0x07 => "PCI-X",
            0x08 => "HyperTransport",
            CAP_ID_VENDOR => "vendor",
            0x0a => "debug port",
            0x0d => "subsystem ID",
            CAP_ID_PCIE => "PCIe",
            CAP_ID_MSIX => "MSI-X",
            0x12 => "SATA",
            0x13 => "AF",
            0x14 => "EA",
            _ => "unknown",
        }
    }
}

impl fmt::Display for CapabilityInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:#04x}", self.name(), self.offset)?;
        if !self.exposed {
            write!(f, " (hidden)")?;
        }
        Ok(())
    }
}

/// A 16-bit register whose guest writes reach the device: `rw` bits are
/// the guest's, `w1c` bits are write-one-to-clear and pass only as
/// written, `keep` bits are written back as the device has them; any other
/// bit is written as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwardRule {
    pub(crate) offset: u16,
    pub(crate) rw: u16,
    pub(crate) w1c: u16,
    pub(crate) keep: u16,
}

impl ForwardRule {
    /// The value to write to the device when the guest writes `new` (its
    /// bytes merged over the device's `current` value), of which the bytes
    /// in `written` (a byte mask) are the guest's.
    pub(crate) fn apply(&self, current: u16, new: u16, written: u16) -> u16 {
        (current & self.keep) | (new & self.rw) | (new & written & self.w1c)
    }
}

/// Command register: bus mastering, parity error response and SERR#
/// enable reach the device; memory and I/O decoding and INTx disable are
/// the VMM's (the device keeps memory decoding on for the VMM's BAR
/// accesses, the kernel owns INTx).
const COMMAND_RULE: ForwardRule = ForwardRule {
    offset: 0x04,
    rw: 1 << 2 | 1 << 6 | 1 << 8,
    w1c: 0,
    keep: !(1 << 2 | 1 << 6 | 1 << 8),
};
/// Status register: the error bits are write-one-to-clear.
const STATUS_RULE: ForwardRule = ForwardRule {
    offset: 0x06,
    rw: 0,
    w1c: 0xf900,
    keep: 0,
};

/// The guest's view of the device's configuration space; see the
/// [module documentation](self).
#[derive(Clone)]
pub(crate) struct Layout {
    /// Guest byte = (device byte & !mask) | (value & mask).
    mask: [u8; CONVENTIONAL],
    value: [u8; CONVENTIONAL],
    pub(crate) capabilities: Vec<CapabilityInfo>,
    /// Offset of the MSI-X capability (exposed, emulated).
    pub(crate) msix: Option<u16>,
    /// Registers guest writes are forwarded to.
    pub(crate) forward: Vec<ForwardRule>,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layout")
            .field("capabilities", &self.capabilities)
            .field("msix", &self.msix)
            .field("forward", &self.forward)
            .finish()
    }
}

/// The capabilities of `cfg`'s list, in list order, as (offset, ID).
fn walk(cfg: &[u8; CONVENTIONAL]) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    if cfg[0x06] & STATUS_CAP_LIST == 0 {
        return found;
    }
    let mut seen = [false; CONVENTIONAL / 4];
    let mut at = usize::from(cfg[0x34] & 0xfc);
    while at >= FIRST_CAPABILITY && found.len() < MAX_CAPABILITIES && !seen[at / 4] {
        seen[at / 4] = true;
        found.push((at, cfg[at]));
        at = usize::from(cfg[at + 1] & 0xfc);
    }
    found
}

fn read_u16(cfg: &[u8; CONVENTIONAL], at: usize) -> u16 {
    u16::from_le_bytes([cfg[at], cfg.get(at + 1).copied().unwrap_or(0)])
}

/// Bytes of the capability `id` at `at`, whose room (up to the next
/// capability above it or the end of the space) is `room`.
fn capability_len(cfg: &[u8; CONVENTIONAL], at: usize, id: u8, room: usize) -> usize {
    let len = match id {
        CAP_ID_PM => PM_SIZE,
        CAP_ID_MSIX => MSIX_SIZE,
        CAP_ID_PCIE if cfg[at + PCIE_FLAGS] & 0xf >= 2 => PCIE_V2_SIZE,
        CAP_ID_PCIE => PCIE_V1_SIZE,
        CAP_ID_MSI => {
            let control = read_u16(cfg, at + 2);
            let is_64bit = control & 1 << 7 != 0;
            let maskable = control & 1 << 8 != 0;
            match (is_64bit, maskable) {
                (false, false) => 0x0a,
                (true, false) => 0x0e,
                (false, true) => 0x14,
                (true, true) => 0x18,
            }
        }
        CAP_ID_VENDOR => usize::from(cfg[at + 2]).max(3),
        _ => room,
    };
    len.min(CONVENTIONAL - at)
}

/// What becomes of a capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treatment {
    Hide,
    Expose,
    /// A PCI Express endpoint presented as a root complex integrated
    /// endpoint: memvisor's bus 0 is a root bus without root ports.
    PcieAsIntegrated,
}

fn treatment(cfg: &[u8; CONVENTIONAL], at: usize, id: u8) -> Treatment {
    match id {
        CAP_ID_PM | CAP_ID_MSIX | CAP_ID_VENDOR => Treatment::Expose,
        CAP_ID_PCIE => match cfg[at + PCIE_FLAGS] >> 4 {
            PCIE_TYPE_ENDPOINT | PCIE_TYPE_RC_INTEGRATED => Treatment::PcieAsIntegrated,
            // Legacy endpoints, ports, bridges: not on a root bus (QEMU
            // hides them too).
            _ => Treatment::Hide,
        },
        _ => Treatment::Hide,
    }
}

impl Layout {
    /// The layout for a device whose configuration space reads `cfg`.
    pub(crate) fn new(cfg: &[u8; CONVENTIONAL]) -> Self {
        let list = walk(cfg);
        let mut starts: Vec<usize> = list.iter().map(|&(at, _)| at).collect();
        starts.sort_unstable();
        let mut layout = Self {
            mask: [0; CONVENTIONAL],
            value: [0; CONVENTIONAL],
            capabilities: Vec::with_capacity(list.len()),
            msix: None,
            forward: vec![COMMAND_RULE, STATUS_RULE],
        };
        let mut exposed = Vec::new();
        for &(at, id) in &list {
            let room = starts.iter().find(|&&s| s > at).copied().unwrap_or(CONVENTIONAL) - at;
            let len = capability_len(cfg, at, id, room);
            let treatment = treatment(cfg, at, id);
            layout.capabilities.push(CapabilityInfo {
                id,
                offset: at as u8,
                len: len.min(255) as u8,
                exposed: treatment != Treatment::Hide,
            });
            if treatment == Treatment::Hide {
                layout.set(at, &vec![0; len]);
            } else {
                exposed.push((at, id, len, treatment));
            }
        }
        // Exposed capabilities last: their bytes win over a hidden
        // neighbour's that claimed to overlap them.
        let first = exposed.first().map_or(0, |&(at, ..)| at as u8);
        layout.set_bits(
            0x06,
            STATUS_CAP_LIST,
            if exposed.is_empty() { 0 } else { STATUS_CAP_LIST },
        );
        layout.set(0x34, &[first]);
        for (i, &(at, id, len, treatment)) in exposed.iter().enumerate() {
            let next = exposed.get(i + 1).map_or(0, |&(next, ..)| next as u8);
            layout.set(at, &[id, next]);
            match id {
                CAP_ID_MSIX if layout.msix.is_none() => {
                    layout.msix = Some(at as u16);
                    // Message control is emulated; table and PBA locations
                    // are fixed.
                    layout.set(at + 2, &[0, 0]);
                    layout.set(at + 4, &cfg[at + 4..at + MSIX_SIZE]);
                }
                CAP_ID_PM if len >= PM_SIZE => layout.forward.push(ForwardRule {
                    offset: (at + PM_CTRL) as u16,
                    // Power state, PME enable, data select.
                    rw: 0x1f03,
                    // PME status.
                    w1c: 0x8000,
                    keep: 0,
                }),
                CAP_ID_PCIE => layout.pcie(at, len, treatment),
                _ => {}
            }
        }
        layout
    }

    fn pcie(&mut self, at: usize, len: usize, treatment: Treatment) {
        if treatment == Treatment::PcieAsIntegrated {
            self.set_bits(at + PCIE_FLAGS, 0xf0, PCIE_TYPE_RC_INTEGRATED << 4);
            // An integrated endpoint has no link.
            self.set(at + PCIE_LNKCAP, &[0; PCIE_LNKSTA_END - PCIE_LNKCAP]);
            if len >= PCIE_V2_SIZE {
                self.set(at + PCIE_LNKCAP2, &[0; PCIE_LNKSTA2_END - PCIE_LNKCAP2]);
            }
        }
        // A guest-initiated FLR would reset the device behind the VMM's
        // back (MSI-X, BARs): not offered; the VMM resets with reset().
        self.set_bits(at + PCIE_DEVCAP + PCIE_DEVCAP_FLR_BYTE, PCIE_DEVCAP_FLR_BIT, 0);
        if len > PCIE_DEVSTA + 1 {
            self.forward.push(ForwardRule {
                offset: (at + PCIE_DEVCTL) as u16,
                // Error reporting, relaxed ordering, payload, extended
                // tags, aux power, no snoop, read request size; not
                // phantom functions (bit 9), not FLR (bit 15). The kernel
                // virtualizes payload and read request sizes.
                rw: 0x7dff,
                w1c: 0,
                keep: 1 << 9,
            });
            self.forward.push(ForwardRule {
                offset: (at + PCIE_DEVSTA) as u16,
                rw: 0,
                w1c: 0x000f,
                keep: 0,
            });
        }
        if len >= PCIE_V2_SIZE {
            self.forward.push(ForwardRule {
                offset: (at + PCIE_DEVCTL2) as u16,
                // Completion timeout value and disable, AtomicOp requester,
                // ID-based ordering; not ARI, LTR, OBFF or 10-bit tags.
                rw: 0x035f,
                w1c: 0,
                keep: !0x035f,
            });
        }
    }

    /// Overrides the bytes from `at` with `bytes` (clipped to the space).
    fn set(&mut self, at: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(m) = self.mask.get_mut(at + i) {
                *m = 0xff;
                self.value[at + i] = b;
            }
        }
    }

    /// Overrides the bits `mask` of the byte at `at` with `value`'s.
    fn set_bits(&mut self, at: usize, mask: u8, value: u8) {
        if at < CONVENTIONAL {
            self.mask[at] |= mask;
            self.value[at] = (self.value[at] & !mask) | (value & mask);
        }
    }

    /// True if byte `at` (< 256) is wholly the VMM's.
    pub(crate) fn overridden(&self, at: usize) -> bool {
        self.mask[at] == 0xff
    }

    /// The guest's view of byte `at` (< 256) when the device has `device`.
    pub(crate) fn guest_byte(&self, at: usize, device: u8) -> u8 {
        (device & !self.mask[at]) | (self.value[at] & self.mask[at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> [u8; CONVENTIONAL] {
        let mut cfg = [0u8; CONVENTIONAL];
        cfg[0x06] = STATUS_CAP_LIST;
        cfg
    }

    #[test]
    fn loops_and_bad_pointers_end_the_walk() {
        let mut cfg = space();
        cfg[0x34] = 0x40;
        cfg[0x40] = CAP_ID_PM;
        cfg[0x41] = 0x50;
        cfg[0x50] = CAP_ID_MSI;
        cfg[0x51] = 0x40; // loop
        assert_eq!(walk(&cfg), [(0x40, CAP_ID_PM), (0x50, CAP_ID_MSI)]);
        cfg[0x51] = 0x13; // into the header
        assert_eq!(walk(&cfg).len(), 2);
        cfg[0x34] = 0x43; // low bits are ignored
        assert_eq!(walk(&cfg)[0].0, 0x40);
        cfg[0x06] = 0;
        assert!(walk(&cfg).is_empty(), "no capability list bit, no list");
        // A capability in the last dword.
        let mut cfg = space();
        cfg[0x34] = 0xfc;
        cfg[0xfc] = 0x42;
        cfg[0xfd] = 0xfc;
        let layout = Layout::new(&cfg);
        assert_eq!(layout.capabilities.len(), 1);
        assert_eq!(layout.capabilities[0].len, 4);
        assert!(!layout.capabilities[0].exposed);
        assert_eq!(layout.guest_byte(0x34, 0xfc), 0);
        assert_eq!(layout.guest_byte(0x06, 0xff), !STATUS_CAP_LIST);
    }

    #[test]
    fn forward_rule_bits() {
        assert_eq!(COMMAND_RULE.apply(0x0002, 0x0007, 0xffff), 0x0006);
        assert_eq!(COMMAND_RULE.apply(0x0006, 0x0002, 0xffff), 0x0002);
        // Write-one-to-clear bits pass only as written, never read back.
        assert_eq!(STATUS_RULE.apply(0xf910, 0xf910, 0x00ff), 0);
        assert_eq!(STATUS_RULE.apply(0xf910, 0x2010, 0xff00), 0x2000);
    }
}
