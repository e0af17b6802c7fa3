//! The running VM as the management API controls it: the current boot's
//! vCPUs (pause, resume), the power button, reboot and stop requests, and
//! the event bus. The runner updates it at every boot; the API only reads
//! it and asks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::events::EventBus;
use crate::exit::{ExitReason, ExitSignal};
use crate::vcpu::{PauseError, VcpuControl};

/// Why a control request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No boot is running (the VM is between a reset and its next boot, or stopping).
    #[error("the VM is not running (between boots or stopping)")]
    NotRunning,
    /// Pause or resume refused.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// The power button could not be pressed.
    #[error("pressing the ACPI power button: {0}")]
    Button(std::io::Error),
    /// A snapshot needs the vCPUs paused.
    #[error("the VM must be paused for a snapshot (PUT /api/v1/vm/pause first)")]
    NotPaused,
    /// The event loop did not take or answer the request.
    #[error("the VMM's event loop: {0}")]
    Loop(String),
    /// The snapshot failed; the VM is unchanged and still paused.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The migration failed; the guest runs here again.
    #[error("migration: {0}")]
    Migration(String),
}

/// Work that must run on the event loop's thread, where the devices'
/// queues are served, so that it sees the devices between requests.
#[derive(Debug)]
pub enum LoopRequest {
    /// Save the paused VM to `path`; the reply is the summary or why not.
    Snapshot {
        /// The file to write.
        path: PathBuf,
        /// Where the answer goes.
        reply: mpsc::Sender<Result<serde_json::Value, String>>,
    },
    /// Migrate the VM to `destination`, over `connection`; the reply is the
    /// summary (then the VMM exits) or why not (then the guest runs here
    /// again).
    Migrate {
        /// Where the destination VMM listens.
        destination: crate::migration::Endpoint,
        /// When the precopy stops.
        limits: crate::migration::Limits,
        /// Connected to it (by the API's thread, so that a slow connect
        /// never holds up the event loop).
        connection: crate::migration::Connection,
        /// Where the answer goes.
        reply: mpsc::Sender<Result<serde_json::Value, String>>,
    },
    /// The migration's own thread finished the precopy: pause the guest and
    /// send the rest (a [`LoopRequest::Migrate`]'s second half).
    StopAndCopy {
        /// Where the destination VMM listens.
        destination: crate::migration::Endpoint,
        /// The connection to it.
        connection: crate::migration::Connection,
        /// What the precopy worked on.
        live: Box<crate::migration::Live>,
        /// Where it left off.
        precopy: Box<crate::migration::Precopy>,
        /// Where the answer goes.
        reply: mpsc::Sender<Result<serde_json::Value, String>>,
    },
}

/// The sending end of the event loop's requests: a channel and the
/// eventfd that wakes the loop.
#[derive(Debug)]
pub struct LoopRequests {
    /// The channel.
    pub tx: mpsc::Sender<LoopRequest>,
    /// Written after each request.
    pub wake: EventFd,
}

/// How long a snapshot or migration may take before the API gives up
/// waiting (the work itself still completes).
const LOOP_TIMEOUT: Duration = Duration::from_secs(600);

struct Boot {
    vcpus: Arc<VcpuControl>,
    /// Why this boot cannot be saved or migrated; empty if it can.
    blockers: Vec<String>,
    power_button: EventFd,
    requests: LoopRequests,
}

/// What the API may do to the running VM; see the [module documentation](self).
pub struct VmControl {
    exit: Arc<ExitSignal>,
    events: Arc<EventBus>,
    boot: Mutex<Option<Boot>>,
    boots: AtomicU64,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl").field("boots", &self.boots()).finish()
    }
}

/// What [`VmControl::state`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are paused.
    Paused,
    /// Between boots, or stopping.
    Stopped,
}

impl VmState {
    /// The API's name for it.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }
}

impl VmControl {
    /// Control over a VM that stops through `exit` and tells `events`.
    pub fn new(exit: Arc<ExitSignal>, events: Arc<EventBus>) -> Arc<Self> {
        Arc::new(Self {
            exit,
            events,
            boot: Mutex::new(None),
            boots: AtomicU64::new(0),
        })
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// A boot started with these vCPUs, these reasons it cannot be saved or
    /// migrated (none if it can), this power-button irqfd, and its event
    /// loop taking `requests`.
    pub fn booted(
        &self,
        vcpus: Arc<VcpuControl>,
        blockers: Vec<String>,
        power_button: EventFd,
        requests: LoopRequests,
    ) {
        *lock(&self.boot) = Some(Boot {
            vcpus,
            blockers,
            power_button,
            requests,
        });
        let n = self.boots.fetch_add(1, Ordering::SeqCst) + 1;
        self.events.publish("boot", json!({ "boot": n }));
    }

    /// The boot ended (its vCPUs are stopping).
    pub fn ended(&self, reason: &ExitReason) {
        *lock(&self.boot) = None;
        let (event, detail) = match reason {
            ExitReason::PowerOff => ("power-off", json!({})),
            ExitReason::Reset => ("reset", json!({})),
            ExitReason::Shutdown => ("shutdown", json!({})),
            ExitReason::Migrated => ("migrated", json!({})),
            ExitReason::Error(why) => ("error", json!({ "message": why })),
        };
        self.events.publish(event, detail);
    }

    /// Boots so far (1 during the first).
    pub fn boots(&self) -> u64 {
        self.boots.load(Ordering::SeqCst)
    }

    /// Running, paused or stopped.
    pub fn state(&self) -> VmState {
        match &*lock(&self.boot) {
            Some(b) if b.vcpus.is_paused() => VmState::Paused,
            Some(_) => VmState::Running,
            None => VmState::Stopped,
        }
    }

    fn vcpus(&self) -> Result<Arc<VcpuControl>, ControlError> {
        lock(&self.boot)
            .as_ref()
            .map(|b| b.vcpus.clone())
            .ok_or(ControlError::NotRunning)
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.vcpus()?.pause()?;
        self.events.publish("paused", json!({}));
        Ok(())
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.vcpus()?.resume()?;
        self.events.publish("resumed", json!({}));
        Ok(())
    }

    /// Hands `request` (built around its reply channel) to the event loop
    /// and waits for the answer; `paused` requires the vCPUs paused.
    fn ask_loop(
        &self,
        paused: bool,
        request: impl FnOnce(mpsc::Sender<Result<serde_json::Value, String>>) -> LoopRequest,
    ) -> Result<Result<serde_json::Value, String>, ControlError> {
        let (tx, rx) = mpsc::channel();
        {
            let boot = lock(&self.boot);
            let b = boot.as_ref().ok_or(ControlError::NotRunning)?;
            if paused && !b.vcpus.is_paused() {
                return Err(ControlError::NotPaused);
            }
            b.requests
                .tx
                .send(request(tx))
                .map_err(|_| ControlError::Loop("it has stopped".into()))?;
            b.requests
                .wake
                .write(1)
                .map_err(|e| ControlError::Loop(e.to_string()))?;
        }
        rx.recv_timeout(LOOP_TIMEOUT)
            .map_err(|e| ControlError::Loop(format!("no answer: {e}")))
    }

    /// Saves the paused VM to `path` (run by the event loop) and returns
    /// the summary; the VM stays paused.
    pub fn snapshot(&self, path: PathBuf) -> Result<serde_json::Value, ControlError> {
        let summary = self
            .ask_loop(true, |reply| LoopRequest::Snapshot { path, reply })?
            .map_err(ControlError::Snapshot)?;
        self.events.publish("snapshot", summary.clone());
        Ok(summary)
    }

    /// Migrates the VM to the VMM listening at `destination` (run by the
    /// event loop: the guest is paused for the transfer). On success the
    /// guest runs there and this VMM stops; on failure it runs here again.
    pub fn migrate(
        &self,
        destination: crate::migration::Endpoint,
        limits: crate::migration::Limits,
    ) -> Result<serde_json::Value, ControlError> {
        let blocker = match &*lock(&self.boot) {
            None => return Err(ControlError::NotRunning),
            Some(b) => b.blockers.first().cloned(),
        };
        // Refused before anything reaches the destination.
        if let Some(why) = blocker {
            return Err(ControlError::Migration(why));
        }
        let connection = crate::migration::Connection::connect(&destination)
            .map_err(|e| ControlError::Migration(format!("connecting to {destination}: {e}")))?;
        self.events
            .publish("migration-started", json!({ "destination": destination.to_string() }));
        let answer = self.ask_loop(false, |reply| LoopRequest::Migrate {
            destination,
            limits,
            connection,
            reply,
        })?;
        match answer {
            Ok(summary) => {
                self.events.publish("migration-completed", summary.clone());
                Ok(summary)
            }
            Err(why) => {
                self.events.publish(
                    "migration-failed",
                    json!({ "error": why, "state": self.state().name() }),
                );
                Err(ControlError::Migration(why))
            }
        }
    }

    /// Resets the machine; it boots again.
    pub fn reboot(&self) {
        self.exit.raise(ExitReason::Reset);
    }

    /// Stops the VMM (exit status 0).
    pub fn shutdown(&self) {
        self.exit.raise(ExitReason::Shutdown);
    }

    /// Presses the ACPI power button; if the same boot still runs after
    /// `timeout`, the VM is stopped as if it had powered off.
    pub fn power_off(self: &Arc<Self>, timeout: Duration) -> Result<(), ControlError> {
        let boot = {
            let current = lock(&self.boot);
            let b = current.as_ref().ok_or(ControlError::NotRunning)?;
            b.power_button.write(1).map_err(ControlError::Button)?;
            self.boots()
        };
        self.events
            .publish("power-button", json!({ "timeout_s": timeout.as_secs() }));
        let this = Arc::clone(self);
        std::thread::Builder::new()
            .name("power-off".into())
            .spawn(move || {
                std::thread::sleep(timeout);
                if this.boots() == boot && this.state() != VmState::Stopped {
                    log::warn!("the guest did not power off within {timeout:?} of the power button; stopping it");
                    this.exit.raise(ExitReason::PowerOff);
                }
            })
            .map(drop)
            .map_err(ControlError::Button)
    }
}
