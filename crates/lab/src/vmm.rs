//! The VMM that runs L2 (inside L1, or on the host itself in direct mode), behind one
//! trait: QEMU now, memvisor later.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

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
    /// The folder of disk image files in L1.
    pub const DISK_DIR: &str = "/tmp";
}

/// How the VMM runs L2's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (L1's own KVM when nested).
    Kvm,
    /// QEMU's emulator: direct mode on a host whose `/dev/kvm` cannot boot Linux.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Where the VMM's control interface listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A TCP port on loopback (in L1, relayed to the host over a virtio port).
    Tcp(u16),
    /// A Unix socket (on the host, in the run's work folder).
    Unix(PathBuf),
}

/// Where the VMM and what it boots are on the machine that runs it, how it runs vCPUs and
/// where its control interface listens: the part of the command line that depends on the
/// topology (nested or direct), not on the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The VMM's program.
    pub program: String,
    /// Firmware folders (QEMU's `-L`, searched in order).
    pub firmware: Vec<String>,
    /// The L2 kernel.
    pub kernel: String,
    /// The L2 initramfs.
    pub initrd: String,
    /// The folder that holds disk image files.
    pub disk_dir: String,
    /// How L2's vCPUs run.
    pub accel: Accel,
    /// The control interface.
    pub control: Control,
}

impl Placement {
    /// Everything where the L1 image puts it; KVM is L1's own.
    pub fn in_l1() -> Placement {
        Placement {
            program: l1::QEMU.into(),
            firmware: vec![l1::FIRMWARE.into()],
            kernel: l1::KERNEL.into(),
            initrd: l1::INITRD.into(),
            disk_dir: l1::DISK_DIR.into(),
            accel: Accel::Kvm,
            control: Control::Tcp(l1::CONTROL_PORT),
        }
    }

    /// The image file of the disk `id`.
    pub fn disk(&self, id: &str) -> String {
        format!("{}/disk-{id}.img", self.disk_dir)
    }
}

/// What a launch needs besides the VM's description.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The L2 kernel command line.
    pub cmdline: String,
    /// Assigned devices: disk id to PCI address on the machine that runs the VMM.
    pub vfio: BTreeMap<String, String>,
    /// Where the VMM's files are, its accelerator and control interface.
    pub placement: Placement,
}

impl Launch {
    /// A launch with `cmdline` and no assigned devices.
    pub fn new(cmdline: String, placement: Placement) -> Launch {
        Launch {
            cmdline,
            vfio: BTreeMap::new(),
            placement,
        }
    }
}

/// A block of guest RAM (boot memory, a virtio-mem region) in the VMM's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// The VMM's name for it (`pc.ram`, `0000:00:01.0/mem-vmem0`).
    pub name: String,
    /// Its host virtual address in the VMM process.
    pub hva: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// A VMM driver: builds the command line to start (in L1 or on the host) and controls the
/// running VMM.
pub trait Vmm {
    /// The VMM's name in reports.
    fn kind(&self) -> VmmKind;
    /// The command line (program first) that the host of the VMM runs; the guest's serial
    /// console is the process's stdin/stdout, the control interface listens at
    /// [`Placement::control`].
    fn command_line(&self, vm: &VmSpec, launch: &Launch) -> Result<Vec<String>>;
    /// Attaches to the control interface (the host's end of the relay when nested).
    fn attach(&mut self, control: UnixStream) -> Result<()>;
    /// Asks the guest to plug or unplug memory of the virtio-mem device `id` to `bytes`.
    fn request_size(&mut self, id: &str, bytes: u64) -> Result<()>;
    /// The memory the virtio-mem device `id` has plugged now.
    fn plugged_size(&mut self, id: &str) -> Result<u64>;
    /// The guest's writable RAM blocks and where they are mapped in the VMM process.
    fn ram_blocks(&mut self) -> Result<Vec<RamBlock>>;
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
