//! Direct: the L2 VMM runs on this host, without L1: the unpacked QEMU with its libraries
//! and firmware (or the memvisor binary itself), the L2 kernel and initramfs from the work
//! folder, its serial console on the process's stdin/stdout, QMP (or memvisor's API) on a
//! Unix socket in the work folder, its counters from this host's `/proc/<pid>/status`. KVM
//! when this host's `/dev/kvm` boots Linux, TCG otherwise (QEMU only).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::apt::Packages;
use crate::console::Lines;
use crate::error::{Error, IoContext, Result};
use crate::host::Host;
use crate::runner::ChildGuard;
use crate::scenario::Scenario;
use crate::vmm::{Accel, Control, Placement};

/// The PCI class of an NVMe controller.
const NVME_CLASS: &str = "0x010802";

/// What a scenario needs from this host to run directly: for each assigned NVMe, a
/// controller already bound to vfio-pci (the lab never rebinds a host's devices). Looks
/// under `root` (`/` but in tests); returns the controllers' PCI addresses, or an error
/// that names the scenario and what is missing.
pub fn preflight(scenario: &Scenario, root: &Path) -> Result<Vec<String>> {
    let wanted = scenario
        .vm
        .disks
        .iter()
        .filter(|d| d.kind == crate::scenario::DiskKind::VfioNvme)
        .count();
    if wanted == 0 {
        return Ok(Vec::new());
    }
    let refuse = |missing: String| Error::NotHere {
        scenario: scenario.name.clone(),
        mode: "direct".into(),
        missing,
    };
    if !root.join("dev/vfio/vfio").exists() {
        return Err(refuse(format!(
            "it assigns {wanted} NVMe controller(s) through VFIO and this host has no /dev/vfio \
             (load vfio-pci and bind a controller you can spare to it, or use --mode nested)"
        )));
    }
    let bound = root.join("sys/bus/pci/drivers/vfio-pci");
    let mut bdfs: Vec<String> = fs::read_dir(&bound)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let class = fs::read_to_string(e.path().join("class")).unwrap_or_default();
                    class.trim() == NVME_CLASS
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    bdfs.sort();
    if bdfs.len() < wanted {
        return Err(refuse(format!(
            "it assigns {wanted} NVMe controller(s) through VFIO and {} on this host is bound to vfio-pci \
             (the lab does not rebind host devices: bind one you can spare, its data is overwritten; \
             or use --mode nested)",
            bdfs.len()
        )));
    }
    bdfs.truncate(wanted);
    Ok(bdfs)
}

/// The running VMM.
struct Running {
    /// Declared first so it is killed and reaped before the streams close.
    child: ChildGuard,
    console: Lines,
    input: ChildStdin,
    stderr: PathBuf,
}

/// This host as the machine that runs the L2 VMM.
pub struct Direct {
    /// Declared first: dropping it kills and reaps the VMM.
    vmm: Option<Running>,
    placement: Placement,
    /// `LD_LIBRARY_PATH` for the unpacked QEMU (none for memvisor).
    library_path: Option<String>,
    work: PathBuf,
    echo: bool,
    vfio: Vec<String>,
}

/// The VMM's placement on this host: the unpacked packages' QEMU and firmware, the L2
/// kernel, `l2_initrd`, disks and the QMP socket in `work`.
pub fn placement(pkgs: &Packages, accel: Accel, l2_initrd: &Path, work: &Path) -> Placement {
    let s = |p: &Path| p.display().to_string();
    Placement {
        program: s(&pkgs.qemu()),
        firmware: pkgs.firmware_dirs().iter().map(|d| s(d)).collect(),
        kernel: s(&pkgs.vmlinuz()),
        initrd: s(l2_initrd),
        disk_dir: s(work),
        accel,
        control: Control::Unix(work.join("qmp.sock")),
    }
}

/// memvisor's placement on this host: the memvisor `binary`, the L2 kernel, `l2_initrd`,
/// disks and the API socket `memvisor.sock` in `work`.
pub fn memvisor_placement(pkgs: &Packages, binary: &Path, accel: Accel, l2_initrd: &Path, work: &Path) -> Placement {
    placement(pkgs, accel, l2_initrd, work).with_memvisor(binary.display().to_string(), work.join("memvisor.sock"))
}

impl Direct {
    /// This host, running the VMM at `placement` ([`placement`], [`memvisor_placement`]);
    /// `vfio` are the controllers [`preflight`] found.
    pub fn new(pkgs: &Packages, placement: Placement, work: &Path, echo: bool, vfio: Vec<String>) -> Direct {
        // The unpacked libraries are the unpacked QEMU's.
        let library_path = (placement.program == pkgs.qemu().display().to_string()).then(|| pkgs.library_path());
        Direct {
            vmm: None,
            placement,
            library_path,
            work: work.to_path_buf(),
            echo,
            vfio,
        }
    }

    fn running(&mut self) -> Result<&mut Running> {
        self.vmm
            .as_mut()
            .ok_or_else(|| Error::Vmm("the VMM has not started".into()))
    }
}

impl Host for Direct {
    fn placement(&self) -> Placement {
        self.placement.clone()
    }

    fn create_disk(&mut self, path: &str, bytes: u64) -> Result<()> {
        File::create(path)
            .and_then(|f| f.set_len(bytes))
            .ctx(|| format!("creating {path}"))
    }

    fn bind_vfio(&mut self, count: usize) -> Result<Vec<String>> {
        if self.vfio.len() < count {
            return Err(Error::Vmm(format!(
                "{} NVMe controllers bound to vfio-pci on this host, {count} wanted",
                self.vfio.len()
            )));
        }
        Ok(self.vfio[..count].to_vec())
    }

    fn start_vmm(&mut self, argv: &[String]) -> Result<UnixStream> {
        // A VMM that has exited (saved and stopped before a restore) makes room.
        if let Some(running) = &mut self.vmm {
            match running.child.0.try_wait() {
                Ok(Some(_)) => self.vmm = None,
                _ => return Err(Error::Vmm("the VMM runs already".into())),
            }
        }
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::Vmm("an empty command line".into()))?;
        let stderr = self.work.join("vmm-stderr.log");
        let err_file = File::create(&stderr).ctx(|| format!("creating {}", stderr.display()))?;
        fs::write(self.work.join("vmm-command.txt"), format!("{argv:?}\n")).ctx(|| "writing vmm-command.txt".into())?;
        let mut cmd = Command::new(program);
        if let Some(path) = &self.library_path {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .ctx(|| format!("starting {program}"))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let child = ChildGuard(child);
        let (Some(input), Some(stdout)) = (stdin, stdout) else {
            return Err(Error::Vmm("the VMM's stdin or stdout is missing".into()));
        };
        let log = File::create(self.work.join("l2-console.log")).ctx(|| "creating l2-console.log".into())?;
        let console = Lines::spawn("l2", stdout, log, self.echo);
        self.vmm = Some(Running {
            child,
            console,
            input,
            stderr,
        });
        let Control::Unix(sock) = self.placement.control.clone() else {
            return Err(Error::Vmm("direct mode's control interface is a Unix socket".into()));
        };
        // QEMU and memvisor listen before the guest runs; wait for the socket while the
        // process lives.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&sock) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Vmm(format!("connecting {}: {e}", sock.display())));
                }
                Err(_) if !self.vmm_running()? => {
                    return Err(Error::Vmm("the VMM exited at start".into()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn start_second_vmm(&mut self, _argv: &[String], _listens: &str) -> Result<()> {
        Err(Error::Vmm(
            "two VMMs at once (a migration) run in nested mode only: the console is one process's stdio here".into(),
        ))
    }

    fn adopt_second_vmm(&mut self, _control: &Control) -> Result<UnixStream> {
        Err(Error::Vmm(
            "two VMMs at once (a migration) run in nested mode only".into(),
        ))
    }

    fn break_migration(&mut self, _fault: &crate::host::StreamFault) -> Result<()> {
        Err(Error::Vmm("migrations run in nested mode only".into()))
    }

    fn second_vmm_exit(&mut self) -> Result<Option<(i32, String)>> {
        Err(Error::Vmm("migrations run in nested mode only".into()))
    }

    fn console(&mut self) -> Result<&Lines> {
        Ok(&self.running()?.console)
    }

    fn answer(&mut self, text: &str) -> Result<()> {
        self.running()?
            .input
            .write_all(text.as_bytes())
            .ctx(|| "answering the guest".into())
    }

    fn vmm_running(&mut self) -> Result<bool> {
        let r = self.running()?;
        Ok(r.child.0.try_wait().ctx(|| "waiting for the VMM".into())?.is_none())
    }

    fn vmm_exit_status(&mut self) -> Result<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        let r = self.running()?;
        let status = r.child.0.try_wait().ctx(|| "waiting for the VMM".into())?;
        Ok(status.map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))))
    }

    fn vmm_status(&mut self) -> Result<String> {
        let pid = self.running()?.child.0.id();
        fs::read_to_string(format!("/proc/{pid}/status")).ctx(|| format!("reading /proc/{pid}/status"))
    }

    fn vmm_smaps(&mut self) -> Result<String> {
        let pid = self.running()?.child.0.id();
        fs::read_to_string(format!("/proc/{pid}/smaps")).ctx(|| format!("reading /proc/{pid}/smaps"))
    }

    fn vmm_log(&mut self) -> String {
        let running = self.vmm_running().unwrap_or(false);
        let Some(r) = &self.vmm else {
            return "(not started)".into();
        };
        let text = fs::read_to_string(&r.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(20)..].join("\n");
        tail.push_str(if running { "\n(running)" } else { "\n(exited)" });
        tail
    }

    fn tails(&self) -> Vec<String> {
        let Some(r) = &self.vmm else { return Vec::new() };
        let text = fs::read_to_string(&r.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut t: Vec<String> = lines[lines.len().saturating_sub(20)..]
            .iter()
            .map(|l| format!("[vmm-stderr] {l}"))
            .collect();
        t.extend(r.console.tail());
        t
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(r) = self.vmm.as_mut() else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if r.child.0.try_wait().ok().flatten().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(crate::runner::stage_err(
            "shutdown",
            "the VMM did not quit in 30 s; killed",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::tests::TempTree;
    use crate::vmm::Launch;
    use std::collections::BTreeMap;

    fn pkgs() -> Packages {
        Packages {
            root: PathBuf::from("/cache/pkgs/1/root"),
            kernel_release: "6.12.9+deb12-cloud-amd64".into(),
            versions: BTreeMap::new(),
        }
    }

    fn scenario(name: &str) -> Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml"));
        Scenario::load(&path).unwrap()
    }

    #[test]
    fn the_direct_command_line_uses_host_paths_and_the_chosen_accelerator() {
        let s = scenario("viommu");
        let work = Path::new("/tmp/memvisor-lab-1-2");
        for (accel, want, not) in [
            (Accel::Kvm, "-accel kvm -cpu host", "tcg"),
            (Accel::Tcg, "-accel tcg,thread=multi -cpu max,la57=off", "kvm"),
        ] {
            let p = placement(&pkgs(), accel, &work.join("l2.cpio"), work);
            let a = crate::qemu::command_line(&s.vm, &Launch::new("console=ttyS0".into(), p))
                .unwrap()
                .join(" ");
            assert!(a.starts_with("/cache/pkgs/1/root/usr/bin/qemu-system-x86_64 -L /cache/pkgs/1/root/usr/share/seabios -L /cache/pkgs/1/root/usr/share/qemu "), "{a}");
            assert!(a.contains(want), "{a}");
            assert!(!a.contains(not), "{a}");
            assert!(!a.contains("/lab/") && !a.contains("4444"), "an L1 path in {a}");
            assert!(a.contains("-kernel /cache/pkgs/1/root/boot/vmlinuz-6.12.9+deb12-cloud-amd64 -initrd /tmp/memvisor-lab-1-2/l2.cpio"), "{a}");
            assert!(
                a.contains("-qmp unix:/tmp/memvisor-lab-1-2/qmp.sock,server=on,wait=off"),
                "{a}"
            );
            assert!(a.contains("file=/tmp/memvisor-lab-1-2/disk-disk0.img,if=none"), "{a}");
        }
    }

    #[test]
    fn the_direct_memvisor_command_line_is_this_binary_with_a_socket_in_the_work_folder() {
        let work = Path::new("/tmp/memvisor-lab-1-2");
        let p = memvisor_placement(
            &pkgs(),
            Path::new("/w/target/release/memvisor"),
            Accel::Kvm,
            &work.join("l2.cpio"),
            work,
        );
        let launch = Launch::new("console=ttyS0".into(), p.clone());
        let a = crate::memvisor::command_line(&scenario("viommu").vm, &launch)
            .unwrap()
            .join(" ");
        assert_eq!(
            a,
            "/w/target/release/memvisor run --kernel /cache/pkgs/1/root/boot/vmlinuz-6.12.9+deb12-cloud-amd64 \
             --initrd /tmp/memvisor-lab-1-2/l2.cpio --cmdline console=ttyS0 --cpus 1 --memory 512M --viommu \
             --disk id=disk0,path=/tmp/memvisor-lab-1-2/disk-disk0.img --serial stdio \
             --api-socket /tmp/memvisor-lab-1-2/memvisor.sock"
        );
        // memvisor runs without the unpacked QEMU's libraries; QEMU with them.
        assert_eq!(Direct::new(&pkgs(), p, work, false, Vec::new()).library_path, None);
        let q = placement(&pkgs(), Accel::Kvm, &work.join("l2.cpio"), work);
        assert_eq!(
            Direct::new(&pkgs(), q, work, false, Vec::new()).library_path,
            Some(pkgs().library_path())
        );
        // Under TCG memvisor cannot run: it has no emulator.
        let p = memvisor_placement(&pkgs(), Path::new("/m"), Accel::Tcg, &work.join("l2.cpio"), work);
        let e = crate::memvisor::command_line(&scenario("boot").vm, &Launch::new(String::new(), p)).unwrap_err();
        assert!(e.to_string().contains("KVM only"), "{e}");
    }

    #[test]
    fn vfio_scenarios_are_refused_without_dev_vfio_naming_the_scenario() {
        let t = TempTree::new("novfio");
        t.file("dev/kvm");
        for name in ["vfio-nvme", "vfio-nvme-viommu"] {
            let e = preflight(&scenario(name), &t.0).unwrap_err().to_string();
            assert!(e.contains(&format!("scenario `{name}`")), "{e}");
            assert!(e.contains("direct mode") && e.contains("no /dev/vfio"), "{e}");
        }
        // Scenarios without an assigned device need nothing.
        assert_eq!(preflight(&scenario("vmem-resize"), &t.0).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn vfio_scenarios_need_an_nvme_already_bound_to_vfio_pci() {
        let t = TempTree::new("vfio");
        t.file("dev/vfio/vfio").dir("sys/bus/pci/drivers/vfio-pci");
        let e = preflight(&scenario("vfio-nvme"), &t.0).unwrap_err().to_string();
        assert!(
            e.contains("scenario `vfio-nvme`") && e.contains("0 on this host is bound"),
            "{e}"
        );
        // A network card bound to vfio-pci is not an NVMe.
        t.dir("sys/bus/pci/drivers/vfio-pci/0000:03:00.0");
        fs::write(
            t.0.join("sys/bus/pci/drivers/vfio-pci/0000:03:00.0/class"),
            "0x020000\n",
        )
        .unwrap();
        assert!(preflight(&scenario("vfio-nvme"), &t.0).is_err());
        t.dir("sys/bus/pci/drivers/vfio-pci/0000:01:00.0");
        fs::write(
            t.0.join("sys/bus/pci/drivers/vfio-pci/0000:01:00.0/class"),
            "0x010802\n",
        )
        .unwrap();
        assert_eq!(preflight(&scenario("vfio-nvme"), &t.0).unwrap(), ["0000:01:00.0"]);
    }
}
