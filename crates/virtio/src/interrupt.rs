//! Interrupt signalling from a device to its driver.

use std::io;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// What an interrupt announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterruptKind {
    /// The device used buffers of the queue with this index.
    Queue(u16),
    /// The configuration space changed, or the device needs a reset.
    Config,
}

/// How a device signals its driver. A transport implements it (an MSI-X
/// vector, an irqfd, an emulated interrupt line).
pub trait VirtioInterrupt: Send + Sync {
    /// Signals `kind`. A failure is the transport's: the device logs it and
    /// goes on, since the driver will still find the used buffers.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// A [`VirtioInterrupt`] over eventfds, one per queue plus one for
/// configuration changes — the shape of KVM irqfds. Reading an eventfd
/// returns (and resets) how many times it was signalled.
#[derive(Debug)]
pub struct EventFdInterrupt {
    queues: Vec<EventFd>,
    config: EventFd,
}

impl EventFdInterrupt {
    /// Non-blocking eventfds for `queues` queues and the configuration.
    pub fn new(queues: u16) -> io::Result<Self> {
        Ok(Self {
            queues: (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
            config: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd behind `kind`, e.g. to register it as a KVM irqfd.
    /// Returns `None` for a queue index the interrupt was not built for.
    pub fn eventfd(&self, kind: InterruptKind) -> Option<&EventFd> {
        match kind {
            InterruptKind::Queue(i) => self.queues.get(usize::from(i)),
            InterruptKind::Config => Some(&self.config),
        }
    }

    /// How many times `kind` was signalled since the last call (0 if never).
    pub fn take(&self, kind: InterruptKind) -> u64 {
        match self.eventfd(kind).map(EventFd::read) {
            Some(Ok(n)) => n,
            _ => 0,
        }
    }
}

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.eventfd(kind)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no eventfd for {kind:?}")))?
            .write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_resets() {
        let irq = EventFdInterrupt::new(2).unwrap();
        assert_eq!(irq.take(InterruptKind::Queue(1)), 0);
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(irq.take(InterruptKind::Queue(1)), 2);
        assert_eq!(irq.take(InterruptKind::Queue(1)), 0);
        assert_eq!(irq.take(InterruptKind::Queue(0)), 0);
        assert_eq!(irq.take(InterruptKind::Config), 1);
        assert!(irq.trigger(InterruptKind::Queue(2)).is_err());
    }
}
