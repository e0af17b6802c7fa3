//! vCPU threads: each runs `KVM_RUN` in a loop, hands port and MMIO exits
//! to the platform ([`VcpuIo`]) and turns the exits that end a run
//! (power off, reset, a failure) into an [`ExitReason`].
//!
//! Stopping and pausing: [`VcpuControl`] sets a shared flag and sends
//! each thread [`kick_signal`] until it has left `KVM_RUN` (and, to pause,
//! parked); the flags are checked before every entry, so a signal that
//! lands just before the entry is caught by the next check and a repeated
//! kick.
//!
//! A vCPU parks only with no port or MMIO access half done: KVM finishes
//! the instruction of an I/O exit (an `in`'s value into RAX, RIP past it)
//! on the next `KVM_RUN`, and the `KVM_GET_*` calls do not see that
//! pending state, so a snapshot taken in between would lose the access.
//! While a pause is asked for, every `KVM_RUN` is made with
//! `immediate_exit` set: KVM then completes the pending access and
//! returns `EINTR` without entering the guest (or, for a string or split
//! access that needs another exit, that exit, which is handled as usual),
//! and the thread parks on that `EINTR`.
//!
//! Parked vCPU threads run jobs for [`VcpuControl::with_parked`] on their
//! own [`Vcpu`], such as saving its state.

use std::any::Any;
use std::marker::PhantomData;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::register_signal_handler;

use crate::bus::lock;

use crate::exit::{ExitReason, ExitSignal};
use crate::vm::Vcpu;

/// The platform as a vCPU sees it: port I/O and MMIO that left the kernel.
pub trait VcpuIo: Send + Sync {
    /// A port read of `data.len()` bytes.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// An MMIO read outside every memory slot.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// An MMIO write outside every memory slot.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Why pausing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The vCPUs are already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// The vCPUs are not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// The vCPUs were stopped, or a vCPU thread ended, before a
    /// [`VcpuControl::with_parked`] job ran on every vCPU.
    #[error("the vCPUs stopped before the job ran on all of them ({done} of {total})")]
    Stopped {
        /// vCPUs that ran the job.
        done: usize,
        /// vCPUs in all.
        total: usize,
    },
    /// A vCPU did not leave `KVM_RUN` in time.
    #[error("{parked} of {total} vCPUs paused within {waited:?}")]
    Timeout {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs in all.
        total: usize,
        /// How long it waited.
        waited: Duration,
    },
}

/// A [`VcpuControl::with_parked`] job, type-erased.
type JobFn = Arc<dyn Fn(&mut Vcpu) -> Box<dyn Any + Send> + Send + Sync>;

/// The job parked threads are to run, once each, and their results.
struct Job {
    /// Which job this is: a thread runs a job whose generation is newer
    /// than the last it ran.
    generation: u64,
    run: JobFn,
    /// (vCPU id, result).
    results: Vec<(u64, Box<dyn Any + Send>)>,
}

#[derive(Default)]
struct Parking {
    paused: bool,
    parked: usize,
    /// vCPU threads that have ended.
    gone: usize,
    /// The generation of the last job posted.
    generation: u64,
    job: Option<Job>,
}

/// The shared run state of one boot's vCPU threads: stop, pause, resume.
pub struct VcpuControl {
    stop: AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("paused", &self.is_paused())
            .finish()
    }
}

/// How long [`VcpuControl::pause`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuControl {
    fn new() -> Self {
        Self {
            stop: AtomicBool::new(false),
            parking: Mutex::new(Parking::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn kick_all(&self) {
        for &t in lock(&self.threads).iter() {
            // SAFETY: `t` is a thread of this process that has not been
            // joined: `VcpuThreads::stop` clears the list before joining.
            // The signal's handler does nothing.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// True while the vCPUs are paused (or being paused).
    pub fn is_paused(&self) -> bool {
        lock(&self.parking).paused
    }

    /// Pauses every vCPU: each leaves `KVM_RUN` and waits; returns once
    /// all have parked.
    pub fn pause(&self) -> Result<(), PauseError> {
        let total = lock(&self.threads).len();
        {
            let mut p = lock(&self.parking);
            if p.paused {
                return Err(PauseError::AlreadyPaused);
            }
            p.paused = true;
        }
        let started = Instant::now();
        loop {
            self.kick_all();
            let p = lock(&self.parking);
            let (p, _) = self
                .changed
                .wait_timeout_while(p, Duration::from_millis(10), |p| p.parked < total)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if p.parked >= total || self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if started.elapsed() > PAUSE_TIMEOUT {
                return Err(PauseError::Timeout {
                    parked: p.parked,
                    total,
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut p = lock(&self.parking);
        if !p.paused {
            return Err(PauseError::NotPaused);
        }
        p.paused = false;
        self.changed.notify_all();
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Runs `job` on every vCPU, each in its own parked thread, once, and
    /// returns the results in vCPU id order: [`post_parked`](Self::post_parked)
    /// and [`Posted::collect`] at once.
    ///
    /// # Errors
    ///
    /// As [`post_parked`](Self::post_parked) and [`Posted::collect`].
    pub fn with_parked<T: Send + 'static>(
        &self,
        job: impl Fn(&mut Vcpu) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, PauseError> {
        self.post_parked(job)?.collect()
    }

    /// Posts `job` for every vCPU to run, each in its own parked thread,
    /// once, and returns without waiting: [`Posted::collect`] waits for the
    /// results. The vCPUs must be paused (a vCPU still on its way to park
    /// runs the job once parked); one job is posted at a time, so this waits
    /// while another is.
    ///
    /// # Errors
    ///
    /// [`PauseError::NotPaused`], or [`PauseError::Stopped`] if the vCPUs
    /// are being stopped.
    pub fn post_parked<T: Send + 'static>(
        &self,
        job: impl Fn(&mut Vcpu) -> T + Send + Sync + 'static,
    ) -> Result<Posted<'_, T>, PauseError> {
        let total = lock(&self.threads).len();
        let p = lock(&self.parking);
        let mut p = self
            .changed
            .wait_while(p, |p| p.job.is_some())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !p.paused {
            return Err(PauseError::NotPaused);
        }
        if self.stopping() {
            return Err(PauseError::Stopped { done: 0, total });
        }
        p.generation += 1;
        p.job = Some(Job {
            generation: p.generation,
            run: Arc::new(move |vcpu| Box::new(job(vcpu))),
            results: Vec::new(),
        });
        self.changed.notify_all();
        Ok(Posted {
            control: self,
            generation: p.generation,
            total,
            collected: false,
            result: PhantomData,
        })
    }

    /// Parks the calling vCPU thread while paused, running each new
    /// [`with_parked`](Self::with_parked) job on `vcpu` (`seen`: the
    /// generation of the last job it ran); false once stopping.
    fn park(&self, vcpu: &mut Vcpu, seen: &mut u64) -> bool {
        let mut p = lock(&self.parking);
        p.parked += 1;
        self.changed.notify_all();
        loop {
            p = self
                .changed
                .wait_while(p, |p| {
                    let new_job = p.job.as_ref().is_some_and(|j| j.generation > *seen);
                    p.paused && !self.stopping() && !new_job
                })
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let job = match &p.job {
                Some(job) if job.generation > *seen && !self.stopping() => job,
                _ => break,
            };
            let (generation, run) = (job.generation, job.run.clone());
            *seen = generation;
            drop(p);
            let result = run(vcpu);
            p = lock(&self.parking);
            if let Some(job) = p.job.as_mut().filter(|j| j.generation == generation) {
                job.results.push((vcpu.id(), result));
            }
            self.changed.notify_all();
        }
        p.parked -= 1;
        !self.stopping()
    }
}

/// A job posted with [`VcpuControl::post_parked`], running on the parked
/// vCPUs while the poster goes on. [`collect`](Self::collect) waits for its
/// results; dropped uncollected, the job is withdrawn (a vCPU running it
/// finishes, its result unused) and the next job can be posted.
#[must_use = "a posted job is only waited for by `collect`"]
pub struct Posted<'a, T> {
    control: &'a VcpuControl,
    generation: u64,
    total: usize,
    collected: bool,
    result: PhantomData<fn() -> T>,
}

impl<T: Send + 'static> Posted<'_, T> {
    /// Waits until every vCPU ran the job and returns the results in vCPU
    /// id order.
    ///
    /// # Errors
    ///
    /// [`PauseError::Stopped`] if the vCPUs are stopped (or a vCPU thread
    /// ends) before every vCPU ran the job.
    pub fn collect(mut self) -> Result<Vec<T>, PauseError> {
        let control = self.control;
        let total = self.total;
        let p = lock(&control.parking);
        let mut p = control
            .changed
            .wait_while(p, |p| {
                let done = p.job.as_ref().map_or(0, |j| j.results.len());
                !control.stopping() && done + p.gone < total
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut results = p.job.take().expect("only its Posted takes a job").results;
        self.collected = true;
        // Another poster may be waiting for the slot.
        control.changed.notify_all();
        drop(p);
        if results.len() < total {
            return Err(PauseError::Stopped {
                done: results.len(),
                total,
            });
        }
        results.sort_by_key(|&(id, _)| id);
        Ok(results
            .into_iter()
            .map(|(_, r)| *r.downcast::<T>().expect("the job returns a T"))
            .collect())
    }
}

impl<T> Drop for Posted<'_, T> {
    fn drop(&mut self) {
        if self.collected {
            return;
        }
        let mut p = lock(&self.control.parking);
        if p.job.as_ref().is_some_and(|j| j.generation == self.generation) {
            p.job = None;
            self.control.changed.notify_all();
        }
    }
}

/// Counts its vCPU thread as gone when dropped (the thread ended, or
/// panicked), so [`VcpuControl::with_parked`] does not wait for it.
struct Gone(Arc<VcpuControl>);

impl Drop for Gone {
    fn drop(&mut self) {
        lock(&self.0.parking).gone += 1;
        self.0.changed.notify_all();
    }
}

/// The running vCPU threads of one boot.
pub struct VcpuThreads {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuThreads")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl VcpuThreads {
    /// Starts a thread per vCPU (already configured), each raising its end
    /// on `exit`.
    pub fn start(vcpus: Vec<Vcpu>, io: Arc<dyn VcpuIo>, exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::other)?;
        let mut this = Self {
            control: Arc::new(VcpuControl::new()),
            threads: Vec::new(),
        };
        for mut vcpu in vcpus {
            let (io, exit, control) = (io.clone(), exit.clone(), this.control.clone());
            let name = format!("vcpu{}", vcpu.id());
            let thread = std::thread::Builder::new().name(name).spawn(move || {
                let _gone = Gone(control.clone());
                // Found now, not in a save while the guest is paused.
                if let Err(e) = vcpu.migratable_msrs() {
                    log::warn!("vCPU {}: {e}", vcpu.id());
                }
                if let Some(reason) = run(&mut vcpu, io.as_ref(), &control) {
                    exit.raise(reason);
                }
            })?;
            lock(&this.control.threads).push(thread.as_pthread_t());
            this.threads.push(thread);
        }
        Ok(this)
    }

    /// The pause and resume handle of these threads.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// Stops every vCPU (paused ones too) and joins its thread; the vCPU
    /// fds are closed.
    pub fn stop(&mut self) {
        let control = &self.control;
        control.stop.store(true, Ordering::SeqCst);
        {
            let _parking = lock(&control.parking);
            control.changed.notify_all();
        }
        while self.threads.iter().any(|t| !t.is_finished()) {
            control.kick_all();
            std::thread::sleep(Duration::from_millis(5));
        }
        lock(&control.threads).clear();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `vcpu` until the run ends (a reason) or a stop (`None`).
fn run(vcpu: &mut Vcpu, io: &dyn VcpuIo, control: &VcpuControl) -> Option<ExitReason> {
    let id = vcpu.id();
    let mut jobs_seen = 0;
    loop {
        if control.stopping() {
            return None;
        }
        // While a pause is asked for, enter with immediate_exit: KVM
        // completes a pending port or MMIO access and returns EINTR (see
        // the module documentation); only then does the thread park.
        let pausing = control.is_paused();
        vcpu.fd_mut().set_kvm_immediate_exit(u8::from(pausing));
        let exit = match vcpu.fd_mut().run() {
            Ok(exit) => exit,
            Err(e) if pausing && e.errno() == libc::EINTR => {
                vcpu.fd_mut().set_kvm_immediate_exit(0);
                if !control.park(vcpu, &mut jobs_seen) {
                    return None;
                }
                continue;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Some(ExitReason::Error(format!(
                    "KVM_RUN of vCPU {id} failed at rip {:#x}: {e}",
                    vcpu.rip()
                )));
            }
        };
        let end = match exit {
            VcpuExit::IoIn(port, data) => {
                io.pio_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                io.pio_write(port, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                io.mmio_read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                io.mmio_write(addr, data);
                None
            }
            VcpuExit::Intr | VcpuExit::Hlt => None,
            VcpuExit::Shutdown => {
                log::warn!("vCPU {id}: triple fault ({}); resetting the machine", vcpu.describe());
                Some(ExitReason::Reset)
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                other => Some(ExitReason::Error(format!("vCPU {id}: system event {other}"))),
            },
            VcpuExit::InternalError => Some(ExitReason::Error(
                "KVM internal error: the host's KVM could not run an instruction (on a PVM \
                 host an unmodified Linux does not run: use `memvisor lab`)"
                    .into(),
            )),
            other => Some(ExitReason::Error(format!("unexpected exit {other:?}"))),
        };
        match end {
            Some(ExitReason::Error(why)) => {
                return Some(ExitReason::Error(format!("vCPU {id} at rip {:#x}: {why}", vcpu.rip())));
            }
            Some(end) => return Some(end),
            None => {}
        }
    }
}
