//! MSI-X through VFIO: [`IrqRouter`], the [`MsiSink`] the device's
//! [`MsixConfig`](memvisor_pci::MsixConfig) delivers through, which also
//! decides which eventfd the physical device signals for each vector.
//!
//! With VFIO the device raises its interrupts itself: the host kernel's
//! handler signals the eventfd VFIO was given for the vector. A *live*
//! vector (MSI-X enabled, neither function nor vector masked) signals the
//! VMM's irqfd, so KVM injects it with the vector's GSI route without a
//! VMM thread. A vector that is not live signals a *parking* eventfd of
//! this router instead, so nothing reaches the guest and nothing is lost:
//!
//! * when a vector goes live, the route is set up first (the VMM's sink),
//!   then VFIO is pointed at the irqfd, then the parking eventfd is
//!   drained: an interrupt that arrived while the vector was masked is
//!   delivered through the sink — the pending-bit semantics of MSI-X;
//! * when a vector stops being live, VFIO is pointed at the parking
//!   eventfd first, then the route is torn down, so no interrupt hits a
//!   missing route;
//! * a guest read of the pending bit array first moves parked interrupts
//!   into [`MsixConfig`](memvisor_pci::MsixConfig)'s pending bits
//!   ([`IrqRouter::collect_pending`]), so the PBA shows them; unmasking
//!   then delivers them from there.
//!
//! Enabling MSI-X enables VFIO MSI-X with every vector parked (one
//! `VFIO_DEVICE_SET_IRQS` for the whole table: the host allocates one
//! vector per table entry); the vectors that are live are then pointed at
//! their irqfds one by one as [`MsixConfig`](memvisor_pci::MsixConfig)
//! routes them. Linux enables MSI-X with the function masked, so
//! this costs nothing extra at enable time; each later mask or unmask of
//! a vector is one single-vector `SET_IRQS` (what QEMU does too).
//! Disabling MSI-X disables VFIO MSI-X first, then the routes go.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memvisor_pci::{MsiMessage, MsiSink, MsixConfig};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::io::{MSIX_IRQ_INDEX, VfioDeviceIo};

/// Borrows an eventfd's descriptor.
fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `fd`, which stays open for the
    // borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// Where VFIO sends each vector's interrupts.
#[derive(Debug)]
struct RouterState {
    /// VFIO MSI-X is enabled.
    enabled: bool,
    /// Per vector: VFIO signals the irqfd (true) or the parking eventfd.
    direct: Vec<bool>,
}

/// The VFIO side of MSI-X delivery; see the [module documentation](self).
pub(crate) struct IrqRouter {
    io: Arc<dyn VfioDeviceIo>,
    inner: Arc<dyn MsiSink>,
    irqfds: Vec<EventFd>,
    parking: Vec<EventFd>,
    state: Mutex<RouterState>,
}

impl fmt::Debug for IrqRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqRouter")
            .field("vectors", &self.irqfds.len())
            .field("state", &*self.lock())
            .finish()
    }
}

impl IrqRouter {
    /// A router for one vector per irqfd, delivering through `inner`.
    pub(crate) fn new(io: Arc<dyn VfioDeviceIo>, inner: Arc<dyn MsiSink>, irqfds: Vec<EventFd>) -> io::Result<Self> {
        let parking = (0..irqfds.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            io,
            inner,
            state: Mutex::new(RouterState {
                enabled: false,
                direct: vec![false; irqfds.len()],
            }),
            irqfds,
            parking,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True if VFIO signals `vector`'s irqfd directly.
    pub(crate) fn is_direct(&self, vector: u16) -> bool {
        let state = self.lock();
        state.enabled && state.direct.get(usize::from(vector)).copied().unwrap_or(false)
    }

    /// Enables VFIO MSI-X for the whole table, every vector parked.
    pub(crate) fn enable(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.enabled {
            return Ok(());
        }
        self.drain_parking();
        let fds: Vec<Option<BorrowedFd<'_>>> = self.parking.iter().map(|fd| Some(borrow(fd))).collect();
        self.io.set_irq_eventfds(MSIX_IRQ_INDEX, 0, &fds)?;
        state.enabled = true;
        state.direct.fill(false);
        Ok(())
    }

    /// Disables VFIO MSI-X; interrupts parked until now are dropped (MSI-X
    /// is off: there is nowhere to deliver them).
    pub(crate) fn disable(&self) -> io::Result<()> {
        let mut state = self.lock();
        if !state.enabled {
            return Ok(());
        }
        state.enabled = false;
        state.direct.fill(false);
        let result = self.io.disable_irqs(MSIX_IRQ_INDEX);
        drop(state);
        self.drain_parking();
        result
    }

    /// Moves interrupts parked since the last look into `msix` (as
    /// triggers of vectors that are not live: their pending bits).
    pub(crate) fn collect_pending(&self, msix: &mut MsixConfig) {
        let parked: Vec<u16> = {
            let state = self.lock();
            if !state.enabled {
                return;
            }
            (0..self.parking.len() as u16)
                .filter(|&v| !state.direct[usize::from(v)])
                .collect()
        };
        for vector in parked {
            if self.parking[usize::from(vector)].read().is_ok()
                && let Err(e) = msix.trigger(vector)
            {
                log::warn!("vfio-pci: MSI-X vector {vector}: delivering a parked interrupt failed: {e}");
            }
        }
    }

    fn drain_parking(&self) {
        for fd in &self.parking {
            let _ = fd.read();
        }
    }

    /// Points VFIO's trigger for `vector` at its irqfd (`direct`) or its
    /// parking eventfd. True if it changed.
    fn point(&self, vector: usize, direct: bool) -> io::Result<bool> {
        let mut state = self.lock();
        if !state.enabled || state.direct[vector] == direct {
            return Ok(false);
        }
        let fd = if direct {
            &self.irqfds[vector]
        } else {
            &self.parking[vector]
        };
        self.io
            .set_irq_eventfds(MSIX_IRQ_INDEX, vector as u32, &[Some(borrow(fd))])?;
        state.direct[vector] = direct;
        Ok(true)
    }
}

impl MsiSink for IrqRouter {
    fn configure(&self, vector: u16, msg: MsiMessage, enabled: bool) -> io::Result<()> {
        let v = usize::from(vector);
        if v >= self.irqfds.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} is outside the table of {}", self.irqfds.len()),
            ));
        }
        if enabled {
            // Route first: the irqfd must find it once VFIO signals it.
            self.inner.configure(vector, msg, true)?;
            if self.point(v, true)? && self.parking[v].read().is_ok() {
                // Raised while parked, after the last collect_pending.
                self.inner.trigger(vector)?;
            }
            Ok(())
        } else {
            // Park first: no interrupt may reach a torn-down route. If VFIO
            // cannot park it, the route stays: an interrupt delivered
            // while masked is better than one lost.
            self.point(v, false)?;
            self.inner.configure(vector, msg, false)
        }
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.inner.trigger(vector)
    }
}
