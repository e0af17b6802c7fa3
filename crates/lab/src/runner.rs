//! A run: setup, images, the VMM's host (L1 under TCG when nested, this host when direct),
//! the VMM, the guest script and its host steps, the report; every stage with a timeout,
//! every process killed and reaped on every path.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::apt::{self, Packages};
use crate::console::NoLine;
use crate::direct::{self, Direct};
use crate::error::{Error, IoContext, Result};
use crate::host::{Host, KvmProbe, Mode, ModeChoice, StreamFault, Topology};
use crate::image::{self, Modules};
use crate::nested::Nested;
use crate::report::{
    self, Figures, GuestReport, HostSample, HostStep, Observation, RETURNED_FRACTION, Report, StageTime, VmmExit,
};
use crate::scenario::{DiskKind, Expectation, Scenario, Size};
use crate::vmm::{self, Accel, Control, Launch, Placement, RamBlock, SizeWatch, Vmm, VmmKind};

/// How long a shrinking resize waits, once the device reached the size, for the VMM's RSS
/// to give the memory back ([`HostStep::returned_s`]).
const RETURN_GRACE: Duration = Duration::from_secs(3);
/// How often a resize step looks at the plugged size (or the longest it waits for the VMM's
/// size-change reports at once).
const POLL: Duration = Duration::from_millis(100);

/// Where a migration's destination listens in L1.
const MIGRATION_SOCKET: &str = "/run/migrate.sock";

/// `migrate kill-destination`: the destination is killed once its RSS grew by this much
/// (64 MiB of a stream of about 250 MB in the shipped scenarios): mid-stream.
const KILL_DESTINATION_AFTER_KB: u64 = 64 << 10;

/// `migrate corrupt`: the offset of the byte flipped (32 MiB into the stream: guest pages).
const CORRUPT_OFFSET: u64 = 32 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario file.
    pub scenario: PathBuf,
    /// The VMM for L2.
    pub vmm: VmmKind,
    /// Nested, direct, or whichever this host's KVM allows.
    pub mode: ModeChoice,
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

/// How many of L2's last console lines a failure that the guest restarted shows.
const RECENT_LINES: usize = 40;

/// The environment variable whose value, when set, becomes memvisor's `RUST_LOG` (its log
/// filter, e.g. `debug` or `memvisor_vmm=debug`) in the runs of the lab.
pub const VMM_LOG_ENV: &str = "MEMVISOR_LAB_VMM_LOG";

/// `argv` for the VMM `kind` with the log `filter`: memvisor's runs through
/// `env RUST_LOG=FILTER` (the pid stays memvisor's: `env` execs it); QEMU's is unchanged.
pub fn with_log_filter(kind: VmmKind, argv: Vec<String>, filter: Option<&str>) -> Vec<String> {
    match (kind, filter) {
        (VmmKind::Memvisor, Some(f)) if !f.is_empty() => ["env".to_string(), format!("RUST_LOG={f}")]
            .into_iter()
            .chain(argv)
            .collect(),
        _ => argv,
    }
}

/// What the guest's kernel prints when it restarts (`reboot -f`) or panics (`panic=-1`
/// restarts it), if `line` of L2's console holds it.
pub fn restart_line(line: &str) -> Option<&'static str> {
    ["reboot: Restarting system", "Kernel panic - not syncing"]
        .into_iter()
        .find(|m| line.contains(m))
}

/// Runs `opts` once per VMM in `vmms`, one after the other (for a side-by-side
/// [`report::side_by_side`]); each result as [`run`] gives it.
pub fn run_each(opts: &RunOptions, vmms: &[VmmKind]) -> Vec<(VmmKind, Result<Report>)> {
    vmms.iter()
        .map(|&vmm| (vmm, run(&RunOptions { vmm, ..opts.clone() })))
        .collect()
}

/// Runs a scenario, nested or direct as `opts.mode` and this host's KVM decide (see
/// [`Topology::resolve`]). Errors before anything boots (a malformed scenario, a scenario
/// the VMM cannot run, a scenario this host cannot run directly, setup) come back as `Err`;
/// a failing stage or expectation gives a report with `passed: false`, the stage and the
/// last console lines.
pub fn run(opts: &RunOptions) -> Result<Report> {
    let scenario = Scenario::load(&opts.scenario)?;
    let base = opts.scenario.parent().unwrap_or(Path::new("."));
    let script = scenario.guest_script(base, opts.guest_script.as_deref())?;
    let driver = vmm::driver(opts.vmm)?;
    let topology = Topology::resolve(opts.mode, &KvmProbe::read(Path::new("/")));
    driver
        .supports(&scenario.vm, topology.accel)
        .map_err(|missing| Error::Unsupported {
            scenario: scenario.name.clone(),
            vmm: opts.vmm.to_string(),
            missing,
        })?;
    // memvisor runs from the binary running the lab (copied into L1 when nested).
    let memvisor = match opts.vmm {
        VmmKind::Memvisor => Some(crate::memvisor::binary()?),
        VmmKind::Qemu => None,
    };
    let vfio = match topology.mode {
        Mode::Direct => direct::preflight(&scenario, Path::new("/"))?,
        Mode::Nested => Vec::new(),
    };
    if let Some(why) = &topology.tcg_fallback {
        eprintln!("memvisor lab: {why}");
    }
    let mut run = Run::new(&scenario, opts.vmm, &topology);
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
    run.memvisor = memvisor;
    let result = run.execute(&pkgs, &script, driver, &work.path, opts.verbose, vfio);
    if let Err((stage, e)) = result {
        run.report.failed_stage = Some(stage);
        run.report.error = Some(e.to_string());
    }
    run.report.figures = Figures::of(&run.report.host_steps, &run.report.guest);
    run.report.expectations = report::evaluate(&scenario, &run.report);
    run.report.passed = run.report.failed_stage.is_none() && run.report.expectations.iter().all(|c| c.passed);
    if !run.report.passed {
        run.report.console_tail = run.tails.clone();
    }
    Ok(run.report)
}

struct Run<'a> {
    scenario: &'a Scenario,
    topology: Topology,
    /// The guest's RAM blocks in the VMM, when samples measure them (L2 under TCG).
    ram_blocks: Option<Vec<RamBlock>>,
    /// The memvisor binary, when memvisor runs L2.
    memvisor: Option<PathBuf>,
    report: Report,
    start: Instant,
    /// When the VMM was started (set by `l2-boot`).
    vmm_started: Option<Instant>,
    /// What the VMM was started with (set by `l2-boot`), to start it again for a restore.
    launch: Option<Launch>,
    tails: Vec<String>,
}

/// A stage failure: the stage's name and the error.
type StageResult<T> = std::result::Result<T, (String, Error)>;

/// An error of the stage `stage`.
pub(crate) fn stage_err(stage: &str, message: impl Into<String>) -> Error {
    Error::Stage {
        stage: stage.to_string(),
        message: message.into(),
    }
}

impl<'a> Run<'a> {
    fn new(scenario: &'a Scenario, vmm: VmmKind, topology: &Topology) -> Self {
        let report = Report {
            scenario: scenario.name.clone(),
            vmm,
            mode: topology.mode,
            mode_reason: topology.reason.clone(),
            l2_accel: topology.accel,
            tcg_fallback: topology.tcg_fallback.clone(),
            passed: false,
            failed_stage: None,
            error: None,
            stages: Vec::new(),
            host_steps: Vec::new(),
            guest: GuestReport::default(),
            vmm_exit: None,
            figures: Figures::default(),
            expectations: Vec::new(),
            checked_keys: scenario
                .expect
                .iter()
                .filter_map(|e| match &e.check {
                    Expectation::Observation { key, .. } => Some(key.clone()),
                    _ => None,
                })
                .fold(Vec::new(), |mut keys, k| {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                    keys
                }),
            packages: BTreeMap::new(),
            work_dir: None,
            console_tail: Vec::new(),
        };
        Run {
            scenario,
            topology: topology.clone(),
            ram_blocks: None,
            memvisor: None,
            report,
            start: Instant::now(),
            vmm_started: None,
            launch: None,
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

    /// Builds the images and brings up the VMM's host: L1 (the `l1-boot` stage) or this one.
    fn host(
        &mut self,
        pkgs: &Packages,
        script: &str,
        work: &Path,
        echo: bool,
        vfio: Vec<String>,
    ) -> StageResult<Box<dyn Host>> {
        let scenario = self.scenario;
        let (l2, l1) = (work.join("l2.cpio"), work.join("l1.cpio"));
        let mode = self.topology.mode;
        let memvisor = self.memvisor.clone();
        let memvisor = memvisor.as_deref();
        self.timed("images", |_| {
            let mods = Modules::index(&pkgs.modules())?;
            image::build_l2(pkgs, &mods, scenario, script, &l2)?;
            if mode == Mode::Nested {
                image::build_l1(pkgs, &mods, scenario, &l2, memvisor, &l1)?;
            }
            Ok(())
        })?;
        Ok(match mode {
            Mode::Nested => {
                let placement = Placement::in_l1_for(self.report.vmm);
                Box::new(self.timed("l1-boot", |r| {
                    Nested::boot(pkgs, scenario, &l1, placement, work, echo, &mut r.tails)
                })?)
            }
            Mode::Direct => {
                let accel = self.topology.accel;
                let placement = match memvisor {
                    Some(binary) => direct::memvisor_placement(pkgs, binary, accel, &l2, work),
                    None => direct::placement(pkgs, accel, &l2, work),
                };
                Box::new(Direct::new(pkgs, placement, work, echo, vfio))
            }
        })
    }

    fn execute(
        &mut self,
        pkgs: &Packages,
        script: &str,
        mut vmm: Box<dyn Vmm>,
        work: &Path,
        echo: bool,
        vfio: Vec<String>,
    ) -> StageResult<()> {
        let mut host = self.host(pkgs, script, work, echo, vfio)?;
        let result = self.with_host(host.as_mut(), vmm.as_mut());
        self.tails = host.tails();
        // A VMM that exited by itself has nobody left to answer a request to quit.
        let exited = self.report.vmm_exit.is_some_and(|x| x.status.is_some());
        let _ = self.timed("shutdown", |_| {
            if !exited {
                let _ = vmm.shutdown();
            }
            host.shutdown()
        });
        result
    }

    fn with_host(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm) -> StageResult<()> {
        self.timed("l2-boot", |r| r.boot_l2(host, vmm))?;
        self.timed("scenario", |r| r.scenario_loop(host, vmm))
    }

    fn sample(&self, host: &mut dyn Host) -> Result<HostSample> {
        let mut s = HostSample::parse(self.now(), &host.vmm_status()?);
        if let Some(blocks) = &self.ram_blocks {
            s.ram_kb = Some(report::resident_in(&host.vmm_smaps()?, blocks));
        }
        Ok(s)
    }

    fn vmm_failure(&self, host: &mut dyn Host, stage: &str, what: &str) -> Error {
        stage_err(stage, format!("{what}; VMM log:\n{}", host.vmm_log()))
    }

    fn boot_l2(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm) -> Result<()> {
        let s = self.scenario;
        let cmdline = format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off memhp_default_state=online_movable {}",
            s.vm.kernel_args
        );
        let mut launch = Launch::new(cmdline.trim().to_string(), host.placement());
        for d in s.vm.disks.iter().filter(|d| d.kind == DiskKind::VirtioBlk) {
            host.create_disk(&launch.placement.disk(&d.id), d.size.0)?;
        }
        let assigned: Vec<_> = s.vm.disks.iter().filter(|d| d.kind == DiskKind::VfioNvme).collect();
        if !assigned.is_empty() {
            let bdfs = host.bind_vfio(assigned.len())?;
            for (d, bdf) in assigned.iter().zip(bdfs) {
                launch.vfio.insert(d.id.clone(), bdf);
            }
        }
        let argv = self.vmm_argv(vmm, &launch)?;
        self.launch = Some(launch.clone());
        let started = Instant::now();
        self.vmm_started = Some(started);
        let control = match host.start_vmm(&argv) {
            Ok(c) => c,
            Err(e) => return Err(self.vmm_failure(host, "l2-boot", &format!("starting the VMM: {e}"))),
        };
        control
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ctx(|| "control socket timeout".into())?;
        if let Err(e) = vmm.attach(control) {
            return Err(self.vmm_failure(
                host,
                "l2-boot",
                &format!("attaching to the VMM's control interface: {e}"),
            ));
        }
        if launch.placement.accel == Accel::Tcg {
            self.ram_blocks = Some(vmm.ram_blocks()?);
        }
        let deadline = started + Duration::from_secs(s.timeouts.l2_boot);
        loop {
            match host.console()?.next_within(Duration::from_secs(10)) {
                Ok(line) if line.starts_with("@@agent ready") => {
                    let t = started.elapsed().as_secs_f64();
                    self.report.guest.agent_ready_at = Some(t);
                    self.report.guest.boots.push(t);
                    return Ok(());
                }
                Ok(_) => {}
                Err(NoLine::Closed) => return Err(self.vmm_failure(host, "l2-boot", "L2 console closed")),
                Err(NoLine::Timeout) => {
                    if !host.vmm_running()? {
                        return Err(self.vmm_failure(host, "l2-boot", "the VMM exited before the agent ran"));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.vmm_failure(host, "l2-boot", &format!("no agent after {} s", s.timeouts.l2_boot)));
            }
        }
    }

    fn scenario_loop(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm) -> Result<()> {
        let timeouts = &self.scenario.timeouts;
        let deadline = Instant::now() + Duration::from_secs(timeouts.scenario);
        let too_late = format!("timed out after {} s", timeouts.scenario);
        // Set when the guest's kernel said it restarts or panicked (`panic=-1` restarts): the
        // next agent is due within l2_boot.
        let mut restarted: Option<(f64, Instant, String)> = None;
        let no_agent = |t: f64, line: &str| {
            format!(
                "the guest restarted (`{line}` {t:.1} s after the VMM started) and no agent came within {} s",
                timeouts.l2_boot
            )
        };
        // L2's last console lines, for a failure that needs what led to it (a panic's trace).
        let mut recent: VecDeque<String> = VecDeque::with_capacity(RECENT_LINES);
        loop {
            if let Some((t, due, line)) = &restarted
                && Instant::now() > *due
            {
                let what = no_agent(*t, line);
                return Err(self.vmm_failure(host, "scenario", &what));
            }
            let line = match host.console()?.next_within(Duration::from_secs(15)) {
                Ok(l) => l,
                Err(NoLine::Closed) => return Err(self.vmm_failure(host, "scenario", "L2 console closed")),
                Err(NoLine::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(self.vmm_failure(host, "scenario", &too_late));
                    }
                    if !host.vmm_running()? {
                        return Err(self.vmm_failure(host, "scenario", "the VMM exited before the script finished"));
                    }
                    continue;
                }
            };
            if recent.len() == RECENT_LINES {
                recent.pop_front();
            }
            recent.push_back(line.clone());
            if let Some(said) = restart_line(&line) {
                let t = self.vmm_started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                let due = Instant::now() + Duration::from_secs(timeouts.l2_boot);
                restarted = Some((t, due, said.to_string()));
            }
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
                let step = self.host_step(host, vmm, req.trim());
                let reply = if step.ok {
                    format!("@@ok {}\n", step.detail)
                } else {
                    format!("@@err {}\n", step.detail)
                };
                self.report.host_steps.push(step);
                if let Err(e) = host.answer(&reply) {
                    return Err(self.vmm_failure(host, "scenario", &e.to_string()));
                }
            } else if let Some(rc) = line.strip_prefix("@@exit ") {
                self.report.guest.exit_status = rc.trim().parse().ok();
                if let Some(within) = self.vmm_exit_wait() {
                    self.wait_vmm_exit(host, within)?;
                }
                return Ok(());
            } else if line.starts_with("@@agent ready") {
                let said = restarted.take();
                let t = self.vmm_started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                self.report.guest.boots.push(t);
                if !self.scenario.vm.reboot {
                    // What the guest's kernel said, if anything, and what the VMM logged: a
                    // triple fault is only in the VMM's log.
                    let cause = match said {
                        Some((at, _, said)) => format!("its kernel said `{said}` at {at:.1} s"),
                        None => "its kernel said nothing of a restart (a reset by the VMM?)".to_string(),
                    };
                    let lines: Vec<String> = recent.iter().map(|l| format!("  {l}")).collect();
                    let what = format!(
                        "the guest booted again ({t:.1} s after the VMM started) although the scenario \
                         does not reboot (no `reboot = true` in [vm]): {cause}; L2's console before:\n{}",
                        lines.join("\n")
                    );
                    return Err(self.vmm_failure(host, "scenario", &what));
                }
            }
            if Instant::now() > deadline {
                return Err(self.vmm_failure(host, "scenario", &too_late));
            }
        }
    }

    fn host_step(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm, request: &str) -> HostStep {
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
            returned_s: None,
            unassigned: None,
            size_events: None,
            save_restore_s: None,
            migration: None,
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
                ["stats"] => self.sample(host).map(|s| {
                    step.after = Some(s);
                    format!("rss_kb={} lck_kb={} pin_kb={}", s.rss_kb, s.lck_kb, s.pin_kb)
                }),
                ["resize", id, size] => self.resize(host, vmm, id, size, &mut step),
                ["unassigned", id] => self.unassigned(host, vmm, id, &mut step),
                ["restore"] => self.save_and_restore(host, vmm, &mut step),
                ["migrate"] => self.migrate(host, vmm, &mut step),
                ["migrate", fault] => self.migrate_broken(host, vmm, fault),
                _ => Err(Error::Vmm(format!(
                    "cannot do `{request}` (resize ID SIZE, stats, unassigned ID, restore, migrate [FAULT])"
                ))),
            }
        };
        step.seconds = (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        match result {
            Ok(d) => (step.ok, step.detail) = (true, d),
            Err(e) => step.detail = e.to_string().replace('\n', " "),
        }
        step
    }

    /// The VMM's command line for `launch`, with the log filter of [`VMM_LOG_ENV`].
    fn vmm_argv(&self, vmm: &dyn Vmm, launch: &Launch) -> Result<Vec<String>> {
        let filter = std::env::var(VMM_LOG_ENV).ok();
        Ok(with_log_filter(
            vmm.kind(),
            vmm.command_line(&self.scenario.vm, launch)?,
            filter.as_deref(),
        ))
    }

    /// The host step `restore`: saves the paused VM to a file, stops the VMM, and starts a
    /// new one with the same command line that continues the VM from that file. The guest
    /// that asked gets the answer from the new VMM's console.
    fn save_and_restore(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm, step: &mut HostStep) -> Result<String> {
        let launch = self
            .launch
            .clone()
            .ok_or_else(|| Error::Vmm("the VMM was not started".into()))?;
        let file = format!("{}/vm.snapshot", launch.placement.disk_dir);
        let t0 = Instant::now();
        let saved = vmm.save_snapshot(&file)?;
        let save_s = t0.elapsed().as_secs_f64();
        vmm.shutdown()?;
        exits_cleanly(host, "saved VMM", "its shutdown")?;
        let t1 = Instant::now();
        let mut argv = self.vmm_argv(vmm, &launch)?;
        argv.extend(vmm.restore_args(&file));
        let control = host.start_vmm(&argv)?;
        control
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ctx(|| "control socket timeout".into())?;
        vmm.attach(control)?;
        let resumed = vmm.resume_restored()?;
        let restore_s = t1.elapsed().as_secs_f64();
        let round = |s: f64| (s * 100.0).round() / 100.0;
        step.save_restore_s = Some((round(save_s), round(restore_s)));
        Ok(format!(
            "save_s={save_s:.2} restore_s={restore_s:.2} saved={} resumed={}",
            saved.trim(),
            resumed.trim()
        ))
    }

    /// The host step `migrate`: starts a second VMM beside the first, with the same command
    /// line but its own control interface and waiting for a migration on a Unix socket,
    /// migrates the guest to it, waits for the first VMM to exit 0, and controls the second
    /// from then on. The guest that asked gets the answer from the second VMM's console.
    fn migrate(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm, step: &mut HostStep) -> Result<String> {
        let control = self.start_destination(host, vmm)?;
        let t0 = Instant::now();
        let figures = vmm.migrate(MIGRATION_SOCKET)?;
        exits_cleanly(host, "source VMM", "the migration")?;
        // Where the pause went, if the source VMM logs it (memvisor's stop-and-copy line).
        let source_log = host.vmm_log();
        let pause = source_log
            .lines()
            .find_map(|l| l.split_once("stop-and-copy").map(|(_, rest)| rest.trim()))
            .map(|rest| format!(" source: stop-and-copy {rest}"))
            .unwrap_or_default();
        let stream = host.adopt_second_vmm(&control)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .ctx(|| "control socket timeout".into())?;
        vmm.attach(stream)?;
        // The second VMM is the VMM now: a later migration's destination controls elsewhere.
        if let Some(launch) = self.launch.as_mut() {
            launch.placement.control = control;
        }
        let resumed = vmm.resume_restored()?;
        step.migration = Some(figures);
        Ok(format!(
            "total_s={:.2} downtime_s={:.3} bytes={} passes={} wall_s={:.2} resumed={}{pause}",
            figures.total_s,
            figures.downtime_s,
            figures.bytes,
            figures.passes,
            t0.elapsed().as_secs_f64(),
            resumed.trim()
        ))
    }

    /// Starts a second VMM beside the first, with the same command line but its own control
    /// interface, waiting for a migration on [`MIGRATION_SOCKET`]; returns that interface.
    fn start_destination(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm) -> Result<Control> {
        let mut launch = self
            .launch
            .clone()
            .ok_or_else(|| Error::Vmm("the VMM was not started".into()))?;
        let control = launch.placement.second_control();
        launch.placement.control = control.clone();
        let mut argv = self.vmm_argv(vmm, &launch)?;
        argv.extend(vmm.incoming_args(MIGRATION_SOCKET));
        host.start_second_vmm(&argv, MIGRATION_SOCKET)?;
        Ok(control)
    }

    /// The host step `migrate FAULT`: a migration that must fail, after which the guest must
    /// run on in the first VMM with its pins as before. `kill-destination`: the destination is
    /// killed mid-stream ([`KILL_DESTINATION_AFTER_KB`]); `corrupt`: one bit of the stream's
    /// byte [`CORRUPT_OFFSET`] is flipped on the way; `refused`: no destination at all, the
    /// VMM must refuse at once (an assigned device that cannot migrate says why).
    fn migrate_broken(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm, fault: &str) -> Result<String> {
        let fault = match fault {
            "kill-destination" => Some(StreamFault::KillDestinationAfterKb(KILL_DESTINATION_AFTER_KB)),
            "corrupt" => Some(StreamFault::FlipByte {
                listen: "/run/migrate-proxy.sock".into(),
                target: MIGRATION_SOCKET.into(),
                offset: CORRUPT_OFFSET,
            }),
            "refused" => None,
            other => {
                return Err(Error::Vmm(format!(
                    "no migration fault `{other}` (kill-destination, corrupt, refused)"
                )));
            }
        };
        let pins = self.sample(host)?.pin_kb;
        let target = match &fault {
            None => "/run/no-destination.sock".to_string(),
            Some(f) => {
                self.start_destination(host, vmm)?;
                host.break_migration(f)?;
                match f {
                    StreamFault::FlipByte { listen, .. } => listen.clone(),
                    StreamFault::KillDestinationAfterKb(_) => MIGRATION_SOCKET.into(),
                }
            }
        };
        let t0 = Instant::now();
        let why = match vmm.migrate(&target) {
            Ok(f) => {
                return Err(Error::Vmm(format!(
                    "the migration completed ({:.2} s, {} bytes) despite the fault {fault:?}",
                    f.total_s, f.bytes
                )));
            }
            Err(e) => e.to_string().replace('\n', " "),
        };
        let failed_s = t0.elapsed().as_secs_f64();
        let destination = match fault {
            None => "none".to_string(),
            Some(f) => {
                let (status, log) = wait_exit(|| host.second_vmm_exit(), "destination VMM", "the failed migration")?;
                // Killed means killed by the fault, not failed on its own before.
                if matches!(f, StreamFault::KillDestinationAfterKb(_)) && status != 128 + libc::SIGKILL {
                    return Err(Error::Vmm(format!(
                        "the destination exited with status {status} before it was killed: {log}"
                    )));
                }
                format!("exit status {status} ({log})")
            }
        };
        let state = vmm.vm_state()?;
        if state != "running" {
            return Err(Error::Vmm(format!(
                "the source VMM's guest is `{state}` after the failed migration ({why}), not running"
            )));
        }
        let pins_after = self.sample(host)?.pin_kb;
        if pins_after != pins {
            return Err(Error::Vmm(format!(
                "the source VMM pins {pins_after} kB after the failed migration, {pins} kB before"
            )));
        }
        Ok(format!(
            "failed after {failed_s:.2} s: {why}; destination: {destination}; the source runs, pin_kb {pins} before and after"
        ))
    }

    fn resize(
        &mut self,
        host: &mut dyn Host,
        vmm: &mut dyn Vmm,
        id: &str,
        size: &str,
        step: &mut HostStep,
    ) -> Result<String> {
        if !self.scenario.vm.vmem.iter().any(|v| v.id == id) {
            return Err(Error::Vmm(format!("no virtio-mem device `{id}`")));
        }
        let bytes = Size::parse(size)
            .ok_or_else(|| Error::Vmm(format!("`{size}` is not a size")))?
            .0;
        let from = vmm.plugged_size(id)?;
        let before = self.sample(host)?;
        step.before = Some(before);
        step.resize = Some((from, bytes));
        // A shrink is timed until the VMM's RSS gave the memory back, too.
        let want_kb = from.saturating_sub(bytes) as f64 / 1024.0 * RETURNED_FRACTION;
        let returned = |s: &HostSample| match (before.ram_kb, s.ram_kb) {
            (Some(b), Some(a)) => b as f64 - a as f64 >= want_kb,
            _ => before.rss_kb as f64 - s.rss_kb as f64 >= want_kb,
        };
        vmm.request_size(id, bytes)?;
        let requested = Instant::now();
        let deadline = requested + Duration::from_secs(self.scenario.timeouts.host_step);
        let mut now = from;
        let mut reached: Option<Instant> = None;
        let mut after = before;
        loop {
            // A VMM that reports size changes itself is followed through that (waiting up
            // to one poll for them); another is polled.
            let mut waited = false;
            if now != bytes {
                now = match vmm.watch_size(id, POLL)? {
                    SizeWatch::Plugged(n) => {
                        waited = true;
                        step.size_events = Some(step.size_events.unwrap_or(0) + 1);
                        n
                    }
                    SizeWatch::Quiet => {
                        waited = true;
                        step.size_events.get_or_insert(0);
                        now
                    }
                    SizeWatch::Unsupported => vmm.plugged_size(id)?,
                };
            }
            if now == bytes && reached.is_none() {
                reached = Some(Instant::now());
            }
            if bytes < from && step.returned_s.is_none() {
                after = self.sample(host)?;
                if returned(&after) {
                    step.returned_s = Some((requested.elapsed().as_secs_f64() * 100.0).round() / 100.0);
                }
            }
            // Done once plugged, and for a shrink once the memory is back (or 3 s after:
            // memory the guest never touched without `prealloc` is not resident to give back).
            let settled =
                bytes >= from || step.returned_s.is_some() || reached.is_some_and(|t| t.elapsed() > RETURN_GRACE);
            if reached.is_some() && settled {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Vmm(format!(
                    "{id} plugged {now} of {bytes} bytes after the timeout"
                )));
            }
            if !waited {
                std::thread::sleep(POLL);
            }
        }
        if bytes >= from || step.returned_s.is_none() {
            after = self.sample(host)?;
        }
        step.after = Some(after);
        Ok(format!(
            "size={bytes} rss_kb={} lck_kb={} pin_kb={}",
            after.rss_kb, after.lck_kb, after.pin_kb
        ))
    }

    /// `unassigned ID`: the VMM's counts of accesses to unplugged memory of `id` (`n/a` under
    /// a VMM that does not count them), with its counters.
    fn unassigned(&mut self, host: &mut dyn Host, vmm: &mut dyn Vmm, id: &str, step: &mut HostStep) -> Result<String> {
        if !self.scenario.vm.vmem.iter().any(|v| v.id == id) {
            return Err(Error::Vmm(format!("no virtio-mem device `{id}`")));
        }
        let counts = vmm.unassigned_accesses(id)?;
        let after = self.sample(host)?;
        step.unassigned = counts;
        step.after = Some(after);
        Ok(match counts {
            Some(c) => format!("reads={} writes={} rss_kb={}", c.reads, c.writes, after.rss_kb),
            None => format!("n/a rss_kb={}", after.rss_kb),
        })
    }

    /// The longest `within_s` of the `vmm-exit` expectations that apply to this VMM.
    fn vmm_exit_wait(&self) -> Option<f64> {
        self.scenario
            .expect
            .iter()
            .filter(|e| e.applies_to(self.report.vmm))
            .filter_map(|e| match e.check {
                Expectation::VmmExit { within_s, .. } => Some(within_s),
                _ => None,
            })
            .reduce(f64::max)
    }

    /// Waits up to `within` seconds (and a little more, to tell late from never) for the
    /// VMM to exit by itself; records how and when in the report.
    fn wait_vmm_exit(&mut self, host: &mut dyn Host, within: f64) -> Result<()> {
        let t0 = Instant::now();
        let limit = Duration::from_secs_f64(within + 5.0);
        loop {
            let status = host.vmm_exit_status()?;
            let seconds = (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0;
            if status.is_some() || t0.elapsed() > limit {
                self.report.vmm_exit = Some(VmmExit { status, seconds });
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits up to 60 s for the VMM (the `who`, asked to go by `after`) to exit, and fails
/// unless it exits with status 0.
/// Polls `exited` until it has the `who` VMM's exit (status or more), for up to 60 s.
fn wait_exit<T>(mut exited: impl FnMut() -> Result<Option<T>>, who: &str, after: &str) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(exit) = exited()? {
            return Ok(exit);
        }
        if Instant::now() > deadline {
            return Err(Error::Vmm(format!("the {who} did not exit within 60 s of {after}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exits_cleanly(host: &mut dyn Host, who: &str, after: &str) -> Result<()> {
    let status = wait_exit(|| host.vmm_exit_status(), who, after)?;
    if status != 0 {
        return Err(Error::Vmm(format!("the {who} exited with status {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_wraps_memvisor_only() {
        let argv = vec!["/lab/memvisor/memvisor".to_string(), "run".to_string()];
        assert_eq!(
            with_log_filter(VmmKind::Memvisor, argv.clone(), Some("memvisor_vmm=debug")),
            ["env", "RUST_LOG=memvisor_vmm=debug", "/lab/memvisor/memvisor", "run"]
        );
        assert_eq!(with_log_filter(VmmKind::Memvisor, argv.clone(), None), argv);
        assert_eq!(with_log_filter(VmmKind::Memvisor, argv.clone(), Some("")), argv);
        assert_eq!(with_log_filter(VmmKind::Qemu, argv.clone(), Some("debug")), argv);
    }

    #[test]
    fn restarts_and_panics_are_recognised_on_the_console() {
        assert_eq!(
            restart_line("[    4.884850] reboot: Restarting system"),
            Some("reboot: Restarting system")
        );
        assert_eq!(
            restart_line("[    2.1] Kernel panic - not syncing: Attempted to kill init!"),
            Some("Kernel panic - not syncing")
        );
        assert_eq!(restart_line("[    6.0] reboot: Power down"), None);
        assert_eq!(restart_line("@@out rebooting"), None);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
