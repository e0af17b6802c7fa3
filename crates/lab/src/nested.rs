//! Nested: the L2 VMM runs in L1, a Linux booted by host QEMU under TCG (AMD SVM exposed)
//! whose own KVM runs L2. L1's init serves a shell control loop on a virtio port; L2's
//! console and the VMM's control socket reach the host on two more ports.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::apt::Packages;
use crate::console::{Lines, NoLine};
use crate::error::{Error, IoContext, Result};
use crate::host::{Host, StreamFault};
use crate::runner::{ChildGuard, shell_quote, stage_err};
use crate::scenario::{DiskKind, Scenario};
use crate::vmm::{Control, Placement};

/// A booted L1 with its control loop running.
pub struct Nested {
    /// Declared first so it is dropped (killed) before the streams close.
    qemu: ChildGuard,
    console: Lines,
    ctl: Lines,
    ctl_tx: UnixStream,
    l2con: Lines,
    l2con_tx: UnixStream,
    relay: UnixStream,
    placement: Placement,
    /// The run's work folder (the VMM's stderr is copied there at shutdown).
    work: std::path::PathBuf,
}

impl Nested {
    /// Boots L1 from `initrd` (the `l1-boot` stage) with the scenario's emulated NVMe
    /// controllers, for a VMM at `placement` in L1 ([`Placement::in_l1_for`]); the virtio
    /// ports' sockets go in `work`. On failure `tails` gets L1's last console lines.
    pub fn boot(
        pkgs: &Packages,
        s: &Scenario,
        initrd: &Path,
        placement: Placement,
        work: &Path,
        echo: bool,
        tails: &mut Vec<String>,
    ) -> Result<Nested> {
        let vfio = s.needs_vfio();
        let mut cmd = Command::new(pkgs.qemu());
        cmd.env("LD_LIBRARY_PATH", pkgs.library_path());
        for d in pkgs.firmware_dirs() {
            cmd.arg("-L").arg(d);
        }
        cmd.args([
            "-accel",
            "tcg,thread=multi,tb-size=1024",
            "-cpu",
            "max,la57=off",
            "-smp",
            "2",
            "-m",
            "3G",
        ]);
        cmd.args(["-machine", if vfio { "q35" } else { "pc" }]);
        cmd.args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ]);
        let mut append = "console=ttyS0 panic=-1 loglevel=4 mitigations=off".to_string();
        if vfio {
            cmd.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
            append.push_str(" intel_iommu=on");
            for d in s.vm.disks.iter().filter(|d| d.kind == DiskKind::VfioNvme) {
                let img = work.join(format!("nvme-{}.img", d.id));
                File::create(&img)
                    .and_then(|f| f.set_len(d.size.0))
                    .ctx(|| format!("creating {}", img.display()))?;
                let drive = format!(
                    "file={},if=none,id=nvme-{},format=raw,cache=writeback",
                    img.display(),
                    d.id
                );
                cmd.args([
                    "-drive",
                    &drive,
                    "-device",
                    &format!("nvme,serial={0},drive=nvme-{0}", d.id),
                ]);
            }
        }
        cmd.arg("-device").arg("virtio-serial-pci");
        for name in ["ctl", "l2con", "relay"] {
            let sock = work.join(format!("{name}.sock"));
            cmd.arg("-chardev")
                .arg(format!("socket,id={name},path={},server=on,wait=off", sock.display()));
            cmd.args(["-device", &format!("virtserialport,chardev={name},name=lab.{name}")]);
        }
        cmd.arg("-kernel")
            .arg(pkgs.vmlinuz())
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append]);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        fs::write(work.join("l1-command.txt"), format!("{cmd:?}\n")).ctx(|| "writing l1-command.txt".into())?;
        let mut child = cmd.spawn().ctx(|| format!("starting {}", pkgs.qemu().display()))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let qemu = ChildGuard(child);
        let log = |n: &str| File::create(work.join(format!("{n}.log"))).ctx(|| format!("creating {n}.log"));
        let console = Lines::spawn(
            "l1",
            stdout.ok_or_else(|| stage_err("l1-boot", "no stdout"))?,
            log("l1-console")?,
            echo,
        );
        if let Some(e) = stderr {
            // QEMU's own messages go to the same tail as L1's console.
            let _ = Lines::spawn("l1-qemu", e, log("l1-qemu-stderr")?, true);
        }
        let connect = |name: &str| -> Result<UnixStream> {
            let sock = work.join(format!("{name}.sock"));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match UnixStream::connect(&sock) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > deadline => {
                        return Err(stage_err("l1-boot", format!("connecting {}: {e}", sock.display())));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        };
        let (ctl_tx, l2con_tx, relay) = (connect("ctl")?, connect("l2con")?, connect("relay")?);
        let clone = |s: &UnixStream| s.try_clone().ctx(|| "cloning a socket".into());
        let ctl = Lines::spawn("l1-ctl", clone(&ctl_tx)?, log("l1-ctl")?, echo);
        let l2con = Lines::spawn("l2", clone(&l2con_tx)?, log("l2-console")?, echo);
        let mut l1 = Nested {
            qemu,
            console,
            ctl,
            ctl_tx,
            l2con,
            l2con_tx,
            relay,
            placement,
            work: work.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(s.timeouts.l1_boot);
        loop {
            match l1.ctl.next_before(deadline) {
                Ok(line) if line.starts_with("@@ready") => return Ok(l1),
                Ok(_) => {}
                Err(e) => {
                    *tails = l1.console.tail();
                    let what = if e == NoLine::Timeout {
                        "timed out"
                    } else {
                        "control port closed"
                    };
                    return Err(stage_err("l1-boot", format!("L1 {what} before its control loop ran")));
                }
            }
            if let Ok(Some(status)) = l1.qemu.0.try_wait() {
                return Err(stage_err("l1-boot", format!("L1's QEMU exited: {status}")));
            }
        }
    }

    /// Runs a shell command in L1; returns its status and output.
    fn exec(&mut self, command: &str, timeout: Duration) -> Result<(i32, Vec<String>)> {
        writeln!(self.ctl_tx, "{command}").ctx(|| "writing to L1's control port".into())?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match self.ctl.next_before(deadline) {
                Ok(line) => match line.strip_prefix("@@rc ") {
                    Some(rc) => return Ok((rc.trim().parse().unwrap_or(-1), out)),
                    None => out.push(line),
                },
                Err(_) => return Err(Error::Vmm(format!("L1 command timed out or L1 closed: {command:.80}"))),
            }
        }
    }

    /// Runs `command` in L1 and fails with `what` and its output unless it exits with 0.
    fn exec_ok(&mut self, command: &str, timeout: Duration, what: &str) -> Result<Vec<String>> {
        match self.exec(command, timeout)? {
            (0, out) => Ok(out),
            (_, out) => Err(Error::Vmm(format!("{what}: {}", out.join(" | ")))),
        }
    }
}

/// The control loop's command that starts the VMM `argv` and relays `control` to the host:
/// `start_vmm ARGV...` for QEMU's TCP port, `start_vmm --control unix:PATH ARGV...` for a
/// Unix socket (memvisor's API, relayed by `memvisor api --socket PATH pipe`).
pub fn start_vmm_line(control: &Control, argv: &[String]) -> String {
    let mut words = vec!["start_vmm".to_string()];
    if let Control::Unix(_) = control {
        words.push("--control".into());
        words.push(shell_quote(&control_arg(control)));
    }
    words.extend(argv.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

/// `control` as L1's `relay` takes it: `unix:PATH` or `tcp:PORT`.
pub fn control_arg(control: &Control) -> String {
    match control {
        Control::Unix(path) => format!("unix:{}", path.display()),
        Control::Tcp(port) => format!("tcp:{port}"),
    }
}

impl Host for Nested {
    fn placement(&self) -> Placement {
        self.placement.clone()
    }

    fn create_disk(&mut self, path: &str, bytes: u64) -> Result<()> {
        let cmd = format!("truncate -s {bytes} {}", shell_quote(path));
        self.exec_ok(&cmd, Duration::from_secs(30), &format!("creating {path} in L1"))
            .map(drop)
    }

    fn bind_vfio(&mut self, count: usize) -> Result<Vec<String>> {
        let out = self.exec_ok(
            "bind_vfio",
            Duration::from_secs(60),
            "binding the NVMe to vfio-pci in L1",
        )?;
        let bdfs: Vec<String> = out
            .iter()
            .filter_map(|l| Some(l.strip_prefix("bdf ")?.split_whitespace().next()?.to_string()))
            .collect();
        if bdfs.len() < count {
            return Err(Error::Vmm(format!(
                "L1 has {} NVMe controllers for vfio-pci, {count} wanted",
                bdfs.len()
            )));
        }
        Ok(bdfs)
    }

    fn start_vmm(&mut self, argv: &[String]) -> Result<UnixStream> {
        let line = start_vmm_line(&self.placement.control, argv);
        let out = self.exec_ok(&line, Duration::from_secs(30), "starting the VMM in L1")?;
        if !out.iter().any(|l| l.starts_with("pid ")) {
            return Err(Error::Vmm(format!("starting the VMM in L1: {}", out.join(" | "))));
        }
        self.relay.try_clone().ctx(|| "cloning the relay".into())
    }

    fn start_second_vmm(&mut self, argv: &[String], listens: &str) -> Result<()> {
        // A socket file left by an earlier destination would pass the wait below at once.
        self.exec_ok(
            &format!("rm -f {}", shell_quote(listens)),
            Duration::from_secs(20),
            "removing an old migration socket in L1",
        )?;
        let mut words = vec!["start_vmm".to_string(), "--second".into()];
        words.extend(argv.iter().map(|a| shell_quote(a)));
        let out = self.exec_ok(&words.join(" "), Duration::from_secs(30), "starting a second VMM in L1")?;
        if !out.iter().any(|l| l.starts_with("pid ")) {
            return Err(Error::Vmm(format!("starting a second VMM in L1: {}", out.join(" | "))));
        }
        let wait = format!(
            "i=0; while [ ! -S {0} ] && [ $i -lt 300 ] && kill -0 \"$(cat /run/$(other).pid)\"; do sleep 0.1; i=$((i + 1)); done; [ -S {0} ]",
            shell_quote(listens)
        );
        if self.exec(&wait, Duration::from_secs(40))?.0 != 0 {
            let log = self
                .exec("tail -n 20 /tmp/$(other).log", Duration::from_secs(20))
                .map(|(_, o)| o.join(" | "));
            return Err(Error::Vmm(format!(
                "the second VMM does not listen on {listens}: {}",
                log.unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn adopt_second_vmm(&mut self, control: &Control) -> Result<UnixStream> {
        let line = format!("adopt_vmm {}", shell_quote(&control_arg(control)));
        self.exec_ok(
            &line,
            Duration::from_secs(30),
            "handing the control relay to the second VMM",
        )?;
        self.relay.try_clone().ctx(|| "cloning the relay".into())
    }

    fn break_migration(&mut self, fault: &StreamFault) -> Result<()> {
        let line = match fault {
            StreamFault::KillDestinationAfterKb(kb) => format!("kill_when_grown {kb}"),
            StreamFault::FlipByte { listen, target, offset } => format!(
                "start_proxy {} {} flip:{offset}",
                shell_quote(listen),
                shell_quote(target)
            ),
        };
        self.exec_ok(&line, Duration::from_secs(30), "arming a fault on the migration in L1")
            .map(drop)
    }

    fn second_vmm_exit(&mut self) -> Result<Option<(i32, String)>> {
        let (rc, out) = self.exec("second_vmm_exit", Duration::from_secs(20))?;
        if rc != 0 {
            return Ok(None);
        }
        let status = out
            .first()
            .and_then(|l| l.strip_prefix("rc "))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Vmm(format!("L1's second VMM exit: {}", out.join(" | "))))?;
        Ok(Some((status, out[1..].join(" | "))))
    }

    fn console(&mut self) -> Result<&Lines> {
        Ok(&self.l2con)
    }

    fn answer(&mut self, text: &str) -> Result<()> {
        self.l2con_tx
            .write_all(text.as_bytes())
            .ctx(|| "answering the guest".into())
    }

    fn vmm_running(&mut self) -> Result<bool> {
        Ok(self
            .exec("kill -0 \"$(cat /run/$(cur).pid)\"", Duration::from_secs(20))?
            .0
            == 0)
    }

    fn vmm_exit_status(&mut self) -> Result<Option<i32>> {
        // start_vmm's watcher writes the status once the VMM has exited.
        let (rc, out) = self.exec("cat /run/$(cur).rc 2>/dev/null", Duration::from_secs(20))?;
        if rc != 0 {
            return Ok(None);
        }
        let text = out.join(" ");
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Vmm(format!("L1's VMM exit status file holds {text:?}, not an exit status")))
    }

    fn vmm_status(&mut self) -> Result<String> {
        let out = self.exec_ok("vmm_status", Duration::from_secs(30), "reading the VMM's status")?;
        Ok(out.join("\n"))
    }

    fn vmm_smaps(&mut self) -> Result<String> {
        let cmd = "cat \"/proc/$(cat /run/$(cur).pid)/smaps\"";
        let out = self.exec_ok(cmd, Duration::from_secs(30), "reading the VMM's smaps")?;
        Ok(out.join("\n"))
    }

    fn vmm_log(&mut self) -> String {
        if let Ok(Some(status)) = self.qemu.0.try_wait() {
            return format!("(L1's QEMU exited: {status})");
        }
        self.exec("vmm_log", Duration::from_secs(20))
            .map(|(_, o)| o.join("\n"))
            .unwrap_or_default()
    }

    fn tails(&self) -> Vec<String> {
        let mut t = self.console.tail();
        t.extend(self.ctl.tail());
        t.extend(self.l2con.tail());
        t
    }

    fn shutdown(&mut self) -> Result<()> {
        // The VMM's stderr (its last 2000 lines) beside the consoles in the work folder.
        if let Ok((_, lines)) = self.exec("tail -n 2000 /tmp/$(cur).log 2>/dev/null", Duration::from_secs(60)) {
            let mut text = lines.join("\n");
            text.push('\n');
            let _ = fs::write(self.work.join("vmm-stderr.log"), text);
        }
        // After a migration, the other VMM's (the last source's) as well.
        let other = "[ -f /tmp/$(other).log ] && tail -n 2000 /tmp/$(other).log; true";
        if let Ok((_, lines)) = self.exec(other, Duration::from_secs(60))
            && !lines.is_empty()
        {
            let mut text = lines.join("\n");
            text.push('\n');
            let _ = fs::write(self.work.join("vmm-source-stderr.log"), text);
        }
        let _ = writeln!(self.ctl_tx, "poweroff -f");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.qemu.0.try_wait().ok().flatten().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(stage_err("shutdown", "L1 did not power off in 30 s; killed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{VmmKind, l1};

    #[test]
    fn the_start_line_relays_qemu_over_tcp_and_memvisor_over_its_socket() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let q = Placement::in_l1_for(VmmKind::Qemu);
        assert_eq!(
            start_vmm_line(&q.control, &argv(&[l1::QEMU, "-append", "console=ttyS0 quiet"])),
            "start_vmm /lab/qemu/qemu-system-x86_64 -append 'console=ttyS0 quiet'"
        );
        let m = Placement::in_l1_for(VmmKind::Memvisor);
        assert_eq!(
            start_vmm_line(&m.control, &argv(&[l1::MEMVISOR, "run", "--cmdline", "a b"])),
            "start_vmm --control unix:/run/memvisor.sock /lab/memvisor/memvisor run --cmdline 'a b'"
        );
    }

    #[test]
    fn l1_init_relays_unix_sockets_with_memvisor_and_tcp_with_nc() {
        let init = crate::image::L1_INIT;
        assert!(init.contains("unix:*) /lab/memvisor/memvisor api --socket \"${1#unix:}\" pipe"));
        assert!(init.contains("tcp:*) nc 127.0.0.1 \"${1#tcp:}\" 2>/dev/null ;;"));
        assert!(init.contains("--control) control=$2; shift 2 ;;"));
        assert!(init.contains("control=tcp:4444"));
        assert!(init.contains(&format!("unix:*) {} api", l1::MEMVISOR)));
    }

    #[test]
    fn l1_init_records_the_vmm_pid_and_its_exit_status() {
        let init = crate::image::L1_INIT;
        // The pid is the VMM's own (for /proc/<pid>/status), the watcher writes its status.
        assert!(init.contains("\t\t\t(exec \"$@\" <>\"$L2CON\" >&0 2>/tmp/$name.log) &\n"));
        assert!(init.contains("\t\tfi\n\t\techo $! >/run/$name.pid\n\t\twait $!\n"));
        assert!(init.contains("(exec \"$@\" <>/run/$name.in 1<>/run/$name.out 2>/tmp/$name.log) &"));
        assert!(init.contains("echo $? >/run/$name.rc.tmp\n\t\tmv /run/$name.rc.tmp /run/$name.rc"));
        assert!(init.contains("rm -f /run/$name.pid /run/$name.rc /run/$name.rc.tmp"));
        // The host reads the files of the VMM it controls now.
        assert!(init.contains("cur() { cat /run/vmm.current 2>/dev/null || echo vmm; }"));
        assert!(init.contains("--second) second=1; shift ;;"));
        assert!(init.contains("if [ -n \"$second\" ]; then name=$(other); else name=vmm; fi"));
    }
}
