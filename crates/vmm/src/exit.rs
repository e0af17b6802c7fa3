//! Why a running VM stops, told from whichever thread saw it (a vCPU
//! writing the ACPI sleep register, the API, an error) to the VMM's event
//! loop.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM stops running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5): the VMM exits with status 0.
    PowerOff,
    /// The guest rebooted (ACPI reset register, i8042 reset, triple fault):
    /// the machine is reset and boots again.
    Reset,
    /// The VMM was asked to stop (the API's shutdown, a signal).
    Shutdown,
    /// The guest migrated to another VMM, which runs it now: this one
    /// exits with status 0.
    Migrated,
    /// A vCPU or device failed: the VMM exits non-zero with this message.
    Error(String),
}

/// A one-shot stop request: the first reason wins, later ones are logged
/// and dropped; the eventfd wakes the event loop.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal nobody raised yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop for `reason`, unless a stop is already pending.
    pub fn raise(&self, reason: ExitReason) {
        let mut pending = crate::bus::lock(&self.reason);
        match &*pending {
            Some(first) => log::debug!("stop {reason:?} ignored: {first:?} is already pending"),
            None => {
                log::info!("stopping the VM: {reason:?}");
                *pending = Some(reason);
                if let Err(e) = self.evt.write(1) {
                    log::error!("waking the event loop for a stop: {e}");
                }
            }
        }
    }

    /// The pending reason, if any (it stays pending).
    pub fn pending(&self) -> Option<ExitReason> {
        crate::bus::lock(&self.reason).clone()
    }

    /// Takes the pending reason, making the signal ready for the next run.
    pub fn take(&self) -> Option<ExitReason> {
        let _ = self.evt.read();
        crate::bus::lock(&self.reason).take()
    }

    /// The eventfd that becomes readable when a stop is raised.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_until_taken() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.pending(), None);
        s.raise(ExitReason::Reset);
        s.raise(ExitReason::PowerOff);
        assert_eq!(s.eventfd().read().unwrap(), 1);
        assert_eq!(s.take(), Some(ExitReason::Reset));
        assert_eq!(s.take(), None);
        s.raise(ExitReason::PowerOff);
        assert_eq!(s.take(), Some(ExitReason::PowerOff));
    }
}
