//! vCPU threads: each runs `KVM_RUN` in a loop, hands port and MMIO exits
//! to the platform ([`VcpuIo`]) and turns the exits that end a run
//! (power off, reset, a failure) into an [`ExitReason`].
//!
//! Stopping and pausing: [`VcpuControl`] sets a shared flag and sends
//! each thread [`kick_signal`] until it has left `KVM_RUN` (and, to pause,
//! parked); the flags are checked before every entry, so a signal that
//! lands just before the entry is caught by the next check and a repeated
//! kick.

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

#[derive(Default)]
struct Parking {
    paused: bool,
    parked: usize,
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

    /// Parks the calling vCPU thread while paused; false once stopping.
    fn park_if_paused(&self) -> bool {
        let mut p = lock(&self.parking);
        if p.paused {
            p.parked += 1;
            self.changed.notify_all();
            p = self
                .changed
                .wait_while(p, |p| p.paused && !self.stop.load(Ordering::SeqCst))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            p.parked -= 1;
        }
        !self.stop.load(Ordering::SeqCst)
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
    loop {
        if !control.park_if_paused() {
            return None;
        }
        let exit = match vcpu.fd_mut().run() {
            Ok(exit) => exit,
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
                log::warn!("vCPU {id}: triple fault; resetting the machine");
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
