//! vCPU threads: each runs `KVM_RUN` in a loop, hands port and MMIO exits
//! to the platform ([`VcpuIo`]) and turns the exits that end a run
//! (power off, reset, a failure) into an [`ExitReason`].
//!
//! Stopping: [`VcpuThreads::stop`] sets a shared flag and sends each
//! thread [`kick_signal`] until it has left `KVM_RUN`; the flag is checked
//! before every entry, so a signal that lands just before the entry is
//! caught by the next check and a repeated kick.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{Killable, register_signal_handler};

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

/// The running vCPU threads of one boot.
pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for mut vcpu in vcpus {
            let (io, exit, stopping) = (io.clone(), exit.clone(), stop.clone());
            let name = format!("vcpu{}", vcpu.id());
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                if let Some(reason) = run(&mut vcpu, io.as_ref(), &stopping) {
                    exit.raise(reason);
                }
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let mut started = Self { stop, threads };
                    started.stop();
                    return Err(e);
                }
            }
        }
        Ok(Self { stop, threads })
    }

    /// Stops every vCPU and joins its thread; the vCPU fds are closed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            while !t.is_finished() {
                if let Err(e) = t.kill(kick_signal()) {
                    log::debug!("kicking a vCPU thread: {e}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
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

/// Runs `vcpu` until the run ends (a reason) or `stop` is set (`None`).
fn run(vcpu: &mut Vcpu, io: &dyn VcpuIo, stop: &AtomicBool) -> Option<ExitReason> {
    let id = vcpu.id();
    loop {
        if stop.load(Ordering::SeqCst) {
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
