//! The VMM that runs L2 (inside L1, or on the host itself in direct mode), behind one
//! trait: QEMU ([`crate::qemu`], QMP) or memvisor's own ([`crate::memvisor`], its HTTP API).

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::scenario::VmSpec;

/// Which VMM runs the L2 guest (`qemu`, `memvisor` in scenarios and reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmKind {
    /// QEMU 10 from Debian's backports, driven over QMP.
    Qemu,
    /// memvisor's own VMM (`memvisor run`), driven over its management API.
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

impl VmmKind {
    /// Parses a comma-separated list (`qemu,memvisor`; `both` is both), each VMM once, in
    /// the order given.
    pub fn parse_list(s: &str) -> std::result::Result<Vec<VmmKind>, String> {
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim) {
            let kinds = match word {
                "both" => vec![VmmKind::Qemu, VmmKind::Memvisor],
                w => vec![w.parse()?],
            };
            for k in kinds {
                if out.contains(&k) {
                    return Err(format!("VMM `{k}` named twice in `{s}`"));
                }
                out.push(k);
            }
        }
        Ok(out)
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
    /// QEMU's program.
    pub const QEMU: &str = "/lab/qemu/qemu-system-x86_64";
    /// memvisor's program (the binary that runs the lab, copied into the image).
    pub const MEMVISOR: &str = "/lab/memvisor/memvisor";
    /// memvisor's management API socket (`--api-socket`), relayed to the host by
    /// `memvisor api --socket ... pipe`.
    pub const API_SOCKET: &str = "/run/memvisor.sock";
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
    /// A TCP port on loopback (QEMU's QMP in L1, relayed to the host over a virtio port by
    /// busybox `nc`).
    Tcp(u16),
    /// A Unix socket: on the host, in the run's work folder (direct); in L1, memvisor's API
    /// socket, relayed to the host over the same virtio port by `memvisor api ... pipe`.
    Unix(PathBuf),
}

/// Where the VMM and what it boots are on the machine that runs it, how it runs vCPUs and
/// where its control interface listens: the part of the command line that depends on the
/// topology (nested or direct), not on the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The VMM's program.
    pub program: String,
    /// Firmware folders (QEMU's `-L`, searched in order; memvisor needs none).
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

    /// This placement for memvisor: its `program`, no firmware, its API socket at `socket`.
    pub fn with_memvisor(self, program: String, socket: PathBuf) -> Placement {
        Placement {
            program,
            firmware: Vec::new(),
            control: Control::Unix(socket),
            ..self
        }
    }

    /// Everything where the L1 image puts it, for the VMM `kind`.
    pub fn in_l1_for(kind: VmmKind) -> Placement {
        match kind {
            VmmKind::Qemu => Placement::in_l1(),
            VmmKind::Memvisor => Placement::in_l1().with_memvisor(l1::MEMVISOR.into(), l1::API_SOCKET.into()),
        }
    }

    /// Where a second VMM (a migration's destination, beside this one) has its control
    /// interface: the next TCP port, or the socket path with `-dst`.
    pub fn second_control(&self) -> Control {
        match &self.control {
            Control::Tcp(port) => Control::Tcp(port + 1),
            Control::Unix(path) => {
                let mut name = path.file_stem().unwrap_or_default().to_os_string();
                name.push("-dst");
                if let Some(ext) = path.extension() {
                    name.push(".");
                    name.push(ext);
                }
                Control::Unix(path.with_file_name(name))
            }
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

/// The guest's accesses to unassigned memory (unplugged blocks) of one virtio-mem region, as
/// the VMM counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct AccessCounts {
    /// Reads (answered with all ones).
    pub reads: u64,
    /// Writes (dropped).
    pub writes: u64,
}

/// What [`Vmm::watch_size`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeWatch {
    /// The VMM does not report size changes.
    Unsupported,
    /// No change of the device within the wait.
    Quiet,
    /// The device's plugged size after the last change reported within the wait.
    Plugged(u64),
}

/// A VMM driver: builds the command line to start (in L1 or on the host) and controls the
/// running VMM.
pub trait Vmm {
    /// The VMM's name in reports.
    fn kind(&self) -> VmmKind;
    /// Refuses, before anything boots, a VM this VMM cannot run with `accel` (the error
    /// names what is missing).
    fn supports(&self, _vm: &VmSpec, _accel: Accel) -> std::result::Result<(), String> {
        Ok(())
    }
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
    /// Waits up to `wait` for the VMM to report size changes of the virtio-mem device `id`
    /// by itself (memvisor: its `size-changed` events, long-polled over the control
    /// connection). The default cannot: the runner polls [`Vmm::plugged_size`] instead.
    fn watch_size(&mut self, _id: &str, _wait: Duration) -> Result<SizeWatch> {
        Ok(SizeWatch::Unsupported)
    }
    /// The guest's writable RAM blocks and where they are mapped in the VMM process.
    fn ram_blocks(&mut self) -> Result<Vec<RamBlock>>;
    /// The guest's accesses to unplugged memory of the virtio-mem device `id` so far, if the
    /// VMM counts them (memvisor does; QEMU maps the whole region, so it has nothing to count:
    /// `None`).
    fn unassigned_accesses(&mut self, _id: &str) -> Result<Option<AccessCounts>> {
        Ok(None)
    }
    /// Pauses the guest and saves the whole VM to `path` on the VMM's host (memvisor: `PUT
    /// /api/v1/vm/pause`, then `PUT /api/v1/vm/snapshot`; QEMU: `stop`, then a migration to
    /// `exec:cat > PATH`). Returns a summary for the report; the VMM stays up, paused.
    fn save_snapshot(&mut self, path: &str) -> Result<String>;
    /// What to add to [`Vmm::command_line`] so that the VMM continues the VM saved at `path`
    /// instead of booting it (memvisor: `--restore PATH`; QEMU: `-incoming exec:cat PATH`).
    fn restore_args(&self, path: &str) -> Vec<String>;
    /// Once a VMM started with [`Vmm::restore_args`] is attached: lets the guest run (QEMU
    /// waits for the incoming migration and continues the VM, paused as it was saved;
    /// memvisor runs it by itself). Returns what the VMM reports.
    fn resume_restored(&mut self) -> Result<String> {
        Ok(String::new())
    }
    /// What to add to [`Vmm::command_line`] so that the VMM waits for a migration on the Unix
    /// socket `path` (memvisor: `--incoming unix:PATH`; QEMU: `-incoming unix:PATH`).
    fn incoming_args(&self, path: &str) -> Vec<String>;
    /// Migrates the running guest to the VMM listening on the Unix socket `path` and waits
    /// until it runs there; the source VMM is then asked to quit (memvisor exits by itself).
    fn migrate(&mut self, path: &str) -> Result<MigrationFigures>;
    /// The VM's run state as the VMM names it (`running` in both when the guest runs).
    fn vm_state(&mut self) -> Result<String>;
    /// Asks the VMM to stop (it is killed by the runner anyway).
    fn shutdown(&mut self) -> Result<()>;
}

/// What a VMM reports about a completed migration.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct MigrationFigures {
    /// From the request to the guest running at the destination, as the VMM counts it.
    pub total_s: f64,
    /// How long the guest was paused.
    pub downtime_s: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Passes over guest memory (memvisor's `passes`, QEMU's `dirty-sync-count`).
    pub passes: u64,
}

/// The driver for `kind`.
pub fn driver(kind: VmmKind) -> Result<Box<dyn Vmm>> {
    match kind {
        VmmKind::Qemu => Ok(Box::new(crate::qemu::Qemu::default())),
        VmmKind::Memvisor => Ok(Box::new(crate::memvisor::Memvisor::default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_drivers_exist_and_names_parse() {
        for kind in [VmmKind::Qemu, VmmKind::Memvisor] {
            assert_eq!(driver(kind).ok().unwrap().kind(), kind);
            assert_eq!(kind.to_string().parse::<VmmKind>().unwrap(), kind);
        }
        assert_eq!(
            "xen".parse::<VmmKind>().unwrap_err(),
            "unknown VMM `xen` (qemu, memvisor)"
        );
        assert_eq!(VmmKind::parse_list("memvisor").unwrap(), [VmmKind::Memvisor]);
        assert_eq!(
            VmmKind::parse_list("qemu, memvisor").unwrap(),
            [VmmKind::Qemu, VmmKind::Memvisor]
        );
        assert_eq!(VmmKind::parse_list("both").unwrap(), [VmmKind::Qemu, VmmKind::Memvisor]);
        assert_eq!(
            VmmKind::parse_list("qemu,both").unwrap_err(),
            "VMM `qemu` named twice in `qemu,both`"
        );
        assert!(VmmKind::parse_list("qemu,xen").unwrap_err().contains("`xen`"));
    }

    #[test]
    fn l1_placements_differ_in_program_firmware_and_control_only() {
        let q = Placement::in_l1_for(VmmKind::Qemu);
        assert_eq!(q, Placement::in_l1());
        assert_eq!(q.control, Control::Tcp(4444));
        let m = Placement::in_l1_for(VmmKind::Memvisor);
        assert_eq!(m.program, "/lab/memvisor/memvisor");
        assert!(m.firmware.is_empty());
        assert_eq!(m.control, Control::Unix("/run/memvisor.sock".into()));
        assert_eq!(
            (m.kernel, m.initrd, m.disk_dir, m.accel),
            (q.kernel, q.initrd, q.disk_dir, q.accel)
        );
    }

    #[test]
    fn a_second_vmm_controls_on_the_next_port_or_a_socket_of_its_own() {
        assert_eq!(Placement::in_l1_for(VmmKind::Qemu).second_control(), Control::Tcp(4445));
        assert_eq!(
            Placement::in_l1_for(VmmKind::Memvisor).second_control(),
            Control::Unix("/run/memvisor-dst.sock".into())
        );
    }
}
