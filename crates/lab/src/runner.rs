//! A run: setup, images, L1 under TCG, the VMM in L1, the guest script and its host steps,
//! the report; every stage with a timeout, every process killed and reaped on every path.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::apt::{self, Packages};
use crate::console::{Lines, NoLine};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Modules};
use crate::report::{self, GuestReport, HostSample, HostStep, Observation, Report, StageTime};
use crate::scenario::{DiskKind, Scenario, Size};
use crate::vmm::{self, Launch, Vmm, VmmKind};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario file.
    pub scenario: PathBuf,
    /// The VMM for L2.
    pub vmm: VmmKind,
    /// A guest script file that replaces the scenario's.
    pub guest_script: Option<PathBuf>,
    /// Keep the work folder (images, console logs).
    pub keep: bool,
    /// The package cache (default `~/.cache/memvisor-lab`).
    pub cache_dir: Option<PathBuf>,
    /// Echo the consoles to stderr while running.
    pub verbose: bool,
}

/// Kills and reaps a child process when dropped (on every path, panics included).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the work folder when dropped unless it is to be kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Fetches and unpacks the lab's packages (the `setup` stage on its own).
pub fn setup(cache_dir: Option<&Path>) -> Result<Packages> {
    let cache = cache_dir.map(Path::to_path_buf).unwrap_or_else(apt::cache_dir);
    apt::setup(&cache)
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=,./:+".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs a scenario. Errors before anything boots (a malformed scenario, a VMM that is not
/// available, setup) come back as `Err`; a failing stage or expectation gives a report with
/// `passed: false`, the stage and the last console lines.
pub fn run(opts: &RunOptions) -> Result<Report> {
    let scenario = Scenario::load(&opts.scenario)?;
    let base = opts.scenario.parent().unwrap_or(Path::new("."));
    let script = scenario.guest_script(base, opts.guest_script.as_deref())?;
    let driver = vmm::driver(opts.vmm)?;
    let mut run = Run::new(&scenario, opts.vmm);
    let t = Instant::now();
    let pkgs = setup(opts.cache_dir.as_deref());
    run.stage("setup", t, pkgs.is_ok());
    let pkgs = pkgs?;
    run.report.packages = pkgs.versions.clone();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let path = std::env::temp_dir().join(format!("memvisor-lab-{}-{}", std::process::id(), stamp.as_millis()));
    fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
    let work = WorkDir { path, keep: opts.keep };
    if opts.keep {
        run.report.work_dir = Some(work.path.display().to_string());
    }
    let result = run.execute(&pkgs, &script, driver, &work.path, opts.verbose);
    if let Err((stage, e)) = result {
        run.report.failed_stage = Some(stage);
        run.report.error = Some(e.to_string());
    }
    run.report.expectations = report::evaluate(&scenario, &run.report.host_steps, &run.report.guest);
    run.report.passed = run.report.failed_stage.is_none() && run.report.expectations.iter().all(|c| c.passed);
    if !run.report.passed {
        run.report.console_tail = run.tails.clone();
    }
    Ok(run.report)
}

/// The processes and channels of a booted L1.
struct L1 {
    /// Declared first so it is dropped (killed) before the streams close.
    qemu: ChildGuard,
    console: Lines,
    ctl: Lines,
    ctl_tx: UnixStream,
    l2con: Lines,
    l2con_tx: UnixStream,
    relay: UnixStream,
}

struct Run<'a> {
    scenario: &'a Scenario,
    report: Report,
    start: Instant,
    tails: Vec<String>,
}

/// A stage failure: the stage's name and the error.
type StageResult<T> = std::result::Result<T, (String, Error)>;

fn stage_err(stage: &str, message: impl Into<String>) -> Error {
    Error::Stage {
        stage: stage.to_string(),
        message: message.into(),
    }
}

impl<'a> Run<'a> {
    fn new(scenario: &'a Scenario, vmm: VmmKind) -> Self {
        let report = Report {
            scenario: scenario.name.clone(),
            vmm,
            passed: false,
            failed_stage: None,
            error: None,
            stages: Vec::new(),
            host_steps: Vec::new(),
            guest: GuestReport::default(),
            expectations: Vec::new(),
            packages: BTreeMap::new(),
            work_dir: None,
            console_tail: Vec::new(),
        };
        Run {
            scenario,
            report,
            start: Instant::now(),
            tails: Vec::new(),
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn stage(&mut self, name: &str, since: Instant, ok: bool) {
        let seconds = (since.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        self.report.stages.push(StageTime {
            name: name.to_string(),
            seconds,
            ok,
        });
    }

    /// Runs `f` as the stage `name`, recording its time.
    fn timed<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> StageResult<T> {
        let t = Instant::now();
        let r = f(self);
        self.stage(name, t, r.is_ok());
        r.map_err(|e| (name.to_string(), e))
    }

    fn execute(
        &mut self,
        pkgs: &Packages,
        script: &str,
        mut vmm: Box<dyn Vmm>,
        work: &Path,
        echo: bool,
    ) -> StageResult<()> {
        let scenario = self.scenario;
        let l1_initrd = work.join("l1.cpio");
        self.timed("images", |_| {
            let mods = Modules::index(&pkgs.modules())?;
            let l2 = work.join("l2.cpio");
            image::build_l2(pkgs, &mods, scenario, script, &l2)?;
            image::build_l1(pkgs, &mods, scenario, &l2, &l1_initrd)?;
            Ok(())
        })?;
        let mut l1 = self.timed("l1-boot", |r| r.boot_l1(pkgs, &l1_initrd, work, echo))?;
        let result = self.with_l1(&mut l1, vmm.as_mut());
        self.tails = l1.console.tail();
        self.tails.extend(l1.ctl.tail());
        self.tails.extend(l1.l2con.tail());
        let _ = self.timed("shutdown", |_| {
            let _ = vmm.shutdown();
            let _ = writeln!(l1.ctl_tx, "poweroff -f");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if l1.qemu.0.try_wait().ok().flatten().is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(stage_err("shutdown", "L1 did not power off in 30 s; killed"))
        });
        result
    }

    fn with_l1(&mut self, l1: &mut L1, vmm: &mut dyn Vmm) -> StageResult<()> {
        let pid = self.timed("l2-boot", |r| r.boot_l2(l1, vmm))?;
        self.timed("scenario", |r| r.scenario_loop(l1, vmm, pid))
    }

    fn boot_l1(&mut self, pkgs: &Packages, initrd: &Path, work: &Path, echo: bool) -> Result<L1> {
        let s = self.scenario;
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
        let mut l1 = L1 {
            qemu,
            console,
            ctl,
            ctl_tx,
            l2con,
            l2con_tx,
            relay,
        };
        let deadline = Instant::now() + Duration::from_secs(s.timeouts.l1_boot);
        loop {
            match l1.ctl.next_before(deadline) {
                Ok(line) if line.starts_with("@@ready") => return Ok(l1),
                Ok(_) => {}
                Err(e) => {
                    self.tails = l1.console.tail();
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
    fn l1_exec(&self, l1: &mut L1, command: &str, timeout: Duration) -> Result<(i32, Vec<String>)> {
        writeln!(l1.ctl_tx, "{command}").ctx(|| "writing to L1's control port".into())?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match l1.ctl.next_before(deadline) {
                Ok(line) => match line.strip_prefix("@@rc ") {
                    Some(rc) => return Ok((rc.trim().parse().unwrap_or(-1), out)),
                    None => out.push(line),
                },
                Err(_) => return Err(Error::Vmm(format!("L1 command timed out or L1 closed: {command:.80}"))),
            }
        }
    }

    fn sample(&self, l1: &mut L1) -> Result<HostSample> {
        let (rc, out) = self.l1_exec(l1, "vmm_status", Duration::from_secs(30))?;
        if rc != 0 {
            return Err(Error::Vmm(format!("reading the VMM's status: {}", out.join(" | "))));
        }
        Ok(HostSample::parse(self.now(), &out.join("\n")))
    }

    fn vmm_failure(&self, l1: &mut L1, stage: &str, what: &str) -> Error {
        let log = self
            .l1_exec(l1, "vmm_log", Duration::from_secs(20))
            .map(|(_, o)| o.join("\n"))
            .unwrap_or_default();
        stage_err(stage, format!("{what}; VMM log:\n{log}"))
    }

    fn boot_l2(&mut self, l1: &mut L1, vmm: &mut dyn Vmm) -> Result<u32> {
        let s = self.scenario;
        let mut launch = Launch {
            cmdline: format!(
                "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off memhp_default_state=online_movable {}",
                s.vm.kernel_args
            )
            .trim()
            .to_string(),
            ..Default::default()
        };
        for d in s.vm.disks.iter().filter(|d| d.kind == DiskKind::VirtioBlk) {
            let cmd = format!("truncate -s {} {}", d.size.0, vmm::l1::disk(&d.id));
            let (rc, out) = self.l1_exec(l1, &cmd, Duration::from_secs(30))?;
            if rc != 0 {
                return Err(stage_err(
                    "l2-boot",
                    format!("creating disk {}: {}", d.id, out.join(" ")),
                ));
            }
        }
        if s.needs_vfio() {
            let (rc, out) = self.l1_exec(l1, "bind_vfio", Duration::from_secs(60))?;
            if rc != 0 {
                return Err(stage_err(
                    "l2-boot",
                    format!("binding the NVMe to vfio-pci in L1: {}", out.join(" | ")),
                ));
            }
            let bdfs: Vec<_> = out
                .iter()
                .filter_map(|l| l.strip_prefix("bdf ")?.split_whitespace().next())
                .collect();
            for (d, bdf) in s.vm.disks.iter().filter(|d| d.kind == DiskKind::VfioNvme).zip(bdfs) {
                launch.vfio.insert(d.id.clone(), bdf.to_string());
            }
        }
        let argv = vmm.command_line(&s.vm, &launch)?;
        let line = format!(
            "start_vmm {}",
            argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
        );
        let started = Instant::now();
        let (rc, out) = self.l1_exec(l1, &line, Duration::from_secs(30))?;
        let pid = out
            .iter()
            .find_map(|l| l.strip_prefix("pid ")?.trim().parse::<u32>().ok());
        let pid = match (rc, pid) {
            (0, Some(p)) => p,
            _ => return Err(stage_err("l2-boot", format!("starting the VMM: {}", out.join(" | ")))),
        };
        let relay = l1.relay.try_clone().ctx(|| "cloning the relay".into())?;
        relay
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ctx(|| "relay timeout".into())?;
        if let Err(e) = vmm.attach(relay) {
            return Err(self.vmm_failure(l1, "l2-boot", &format!("attaching to the VMM's control interface: {e}")));
        }
        let deadline = started + Duration::from_secs(s.timeouts.l2_boot);
        loop {
            match l1.l2con.next_within(Duration::from_secs(10)) {
                Ok(line) if line.starts_with("@@agent ready") => {
                    self.report.guest.agent_ready_at = Some(started.elapsed().as_secs_f64());
                    return Ok(pid);
                }
                Ok(_) => {}
                Err(NoLine::Closed) => return Err(stage_err("l2-boot", "L2 console closed")),
                Err(NoLine::Timeout) => {
                    let (rc, _) = self.l1_exec(l1, &format!("kill -0 {pid}"), Duration::from_secs(20))?;
                    if rc != 0 {
                        return Err(self.vmm_failure(l1, "l2-boot", "the VMM exited before the agent ran"));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.vmm_failure(l1, "l2-boot", &format!("no agent after {} s", s.timeouts.l2_boot)));
            }
        }
    }

    fn scenario_loop(&mut self, l1: &mut L1, vmm: &mut dyn Vmm, pid: u32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.scenario.timeouts.scenario);
        loop {
            let line = match l1.l2con.next_within(Duration::from_secs(15)) {
                Ok(l) => l,
                Err(NoLine::Closed) => return Err(stage_err("scenario", "L2 console closed")),
                Err(NoLine::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(stage_err(
                            "scenario",
                            format!("timed out after {} s", self.scenario.timeouts.scenario),
                        ));
                    }
                    let (rc, _) = self.l1_exec(l1, &format!("kill -0 {pid}"), Duration::from_secs(20))?;
                    if rc != 0 {
                        return Err(self.vmm_failure(l1, "scenario", "the VMM exited before the script finished"));
                    }
                    continue;
                }
            };
            if let Some(out) = line
                .strip_prefix("@@out ")
                .or(if line == "@@out" { Some("") } else { None })
            {
                self.report.guest.output.push(out.to_string());
            } else if let Some(o) = line.strip_prefix("@@obs ") {
                let (key, value) = o.split_once(' ').unwrap_or((o, ""));
                let t = self.now();
                self.report.guest.observations.push(Observation {
                    t,
                    key: key.into(),
                    value: value.trim().into(),
                });
            } else if let Some(req) = line.strip_prefix("@@host ") {
                let step = self.host_step(l1, vmm, req.trim());
                let reply = if step.ok {
                    format!("@@ok {}\n", step.detail)
                } else {
                    format!("@@err {}\n", step.detail)
                };
                self.report.host_steps.push(step);
                l1.l2con_tx
                    .write_all(reply.as_bytes())
                    .ctx(|| "answering the guest".into())?;
            } else if let Some(rc) = line.strip_prefix("@@exit ") {
                self.report.guest.exit_status = rc.trim().parse().ok();
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(stage_err(
                    "scenario",
                    format!("timed out after {} s", self.scenario.timeouts.scenario),
                ));
            }
        }
    }

    fn host_step(&mut self, l1: &mut L1, vmm: &mut dyn Vmm, request: &str) -> HostStep {
        let t0 = Instant::now();
        let mut step = HostStep {
            t: self.now(),
            request: request.to_string(),
            seconds: 0.0,
            ok: false,
            detail: String::new(),
            resize: None,
            before: None,
            after: None,
        };
        let words: Vec<&str> = request.split_whitespace().collect();
        let allowed = words
            .first()
            .is_some_and(|w| self.scenario.host_steps.iter().any(|s| s == w));
        let result: Result<String> = if !allowed {
            Err(Error::Vmm(format!(
                "host step `{request}` is not declared in the scenario"
            )))
        } else {
            match words.as_slice() {
                ["stats"] => self.sample(l1).map(|s| {
                    step.after = Some(s);
                    format!("rss_kb={} lck_kb={} pin_kb={}", s.rss_kb, s.lck_kb, s.pin_kb)
                }),
                ["resize", id, size] => self.resize(l1, vmm, id, size, &mut step),
                _ => Err(Error::Vmm(format!("cannot do `{request}` (resize ID SIZE, stats)"))),
            }
        };
        step.seconds = (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        match result {
            Ok(d) => (step.ok, step.detail) = (true, d),
            Err(e) => step.detail = e.to_string().replace('\n', " "),
        }
        step
    }

    fn resize(&mut self, l1: &mut L1, vmm: &mut dyn Vmm, id: &str, size: &str, step: &mut HostStep) -> Result<String> {
        if !self.scenario.vm.vmem.iter().any(|v| v.id == id) {
            return Err(Error::Vmm(format!("no virtio-mem device `{id}`")));
        }
        let bytes = Size::parse(size)
            .ok_or_else(|| Error::Vmm(format!("`{size}` is not a size")))?
            .0;
        let from = vmm.plugged_size(id)?;
        step.before = Some(self.sample(l1)?);
        step.resize = Some((from, bytes));
        vmm.request_size(id, bytes)?;
        let deadline = Instant::now() + Duration::from_secs(self.scenario.timeouts.host_step);
        let mut now = from;
        while now != bytes {
            if Instant::now() > deadline {
                return Err(Error::Vmm(format!(
                    "{id} plugged {now} of {bytes} bytes after the timeout"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
            now = vmm.plugged_size(id)?;
        }
        let after = self.sample(l1)?;
        step.after = Some(after);
        Ok(format!(
            "size={bytes} rss_kb={} lck_kb={} pin_kb={}",
            after.rss_kb, after.lck_kb, after.pin_kb
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
