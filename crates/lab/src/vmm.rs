//! The VMM that runs L2 inside L1, behind one trait: QEMU now, memvisor later.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};
use crate::scenario::VmSpec;

/// Which VMM runs the L2 guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmKind {
    /// QEMU 10 from Debian's backports, driven over QMP.
    Qemu,
    /// memvisor's own VMM (not available yet).
    Memvisor,
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "memvisor" => Ok(VmmKind::Memvisor),
            _ => Err(format!("unknown VMM `{s}` (qemu, memvisor)")),
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Memvisor => "memvisor",
        })
    }
}

/// Where things are inside L1 (the L1 image puts them there).
pub mod l1 {
    /// The VMM binaries' folder.
    pub const QEMU: &str = "/lab/qemu/qemu-system-x86_64";
    /// Firmware for QEMU's `-L`.
    pub const FIRMWARE: &str = "/lab/fw";
    /// The L2 kernel.
    pub const KERNEL: &str = "/lab/l2/vmlinuz";
    /// The L2 initramfs.
    pub const INITRD: &str = "/lab/l2/initrd.cpio";
    /// The TCP port (on L1's loopback) of the VMM's control socket, relayed to the host.
    pub const CONTROL_PORT: u16 = 4444;
    /// A disk image file in L1 for the disk `id`.
    pub fn disk(id: &str) -> String {
        format!("/tmp/disk-{id}.img")
    }
}

/// What a launch needs besides the VM's description.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The L2 kernel command line.
    pub cmdline: String,
    /// Assigned devices: disk id to PCI address in L1.
    pub vfio: BTreeMap<String, String>,
}

/// A VMM driver: builds the command line to start in L1 and controls the running VMM.
pub trait Vmm {
    /// The VMM's name in reports.
    fn kind(&self) -> VmmKind;
    /// The command line (program first) that L1 runs; the guest's serial console is the
    /// process's stdin/stdout, the control interface listens on [`l1::CONTROL_PORT`].
    fn command_line(&self, vm: &VmSpec, launch: &Launch) -> Result<Vec<String>>;
    /// Attaches to the control interface through the host's end of the relay.
    fn attach(&mut self, control: UnixStream) -> Result<()>;
    /// Asks the guest to plug or unplug memory of the virtio-mem device `id` to `bytes`.
    fn request_size(&mut self, id: &str, bytes: u64) -> Result<()>;
    /// The memory the virtio-mem device `id` has plugged now.
    fn plugged_size(&mut self, id: &str) -> Result<u64>;
    /// Asks the VMM to stop (it is killed by the runner anyway).
    fn shutdown(&mut self) -> Result<()>;
}

/// The driver for `kind`.
pub fn driver(kind: VmmKind) -> Result<Box<dyn Vmm>> {
    match kind {
        VmmKind::Qemu => Ok(Box::new(crate::qemu::Qemu::default())),
        VmmKind::Memvisor => Err(Error::VmmUnavailable("memvisor".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memvisor_is_not_available_yet() {
        let e = driver(VmmKind::Memvisor).err().unwrap().to_string();
        assert!(e.contains("memvisor") && e.contains("not available yet"), "{e}");
        assert_eq!("qemu".parse::<VmmKind>().unwrap(), VmmKind::Qemu);
        assert!("xen".parse::<VmmKind>().is_err());
    }
}
