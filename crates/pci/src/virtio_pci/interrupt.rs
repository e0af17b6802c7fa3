//! Interrupts from a virtio device to its driver, routed to MSI-X vectors
//! without the transport's lock.
//!
//! A device signals from inside `queue_notify` (with its own lock held)
//! and from other threads (a virtio-mem configuration change from the API
//! thread). So the transport keeps what an interrupt needs — the ISR bits,
//! the configuration generation, the queue and configuration vectors, and
//! the MSI-X state — in [`Shared`], reachable through atomics and one leaf
//! lock (the MSI-X state's) that is never held while another lock is taken.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memvisor_virtio::{InterruptKind, VirtioInterrupt};

use crate::msix::{MsixConfig, MsixDelivery};

/// The vector value that maps an event to no interrupt.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR status bit: a queue was used.
pub const ISR_QUEUE: u8 = 1 << 0;
/// ISR status bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 1 << 1;

/// The transport state interrupts touch, shared by the transport, the
/// interrupt handles it gives to the device, and the queue notifiers.
pub(crate) struct Shared {
    /// ISR status; reading it through the ISR region clears it.
    pub(crate) isr: AtomicU8,
    /// `config_generation`, bumped by every configuration interrupt.
    pub(crate) config_generation: AtomicU8,
    /// `config_msix_vector`.
    pub(crate) config_vector: AtomicU16,
    /// `queue_msix_vector` of each queue.
    pub(crate) queue_vectors: Box<[AtomicU16]>,
    /// The MSI-X table, PBA and control: the leaf lock.
    msix: Mutex<MsixConfig>,
    /// Bumped at every device reset: handles from before it are stale.
    pub(crate) epoch: AtomicU64,
    /// True while the device is activated (DRIVER_OK, activation succeeded).
    pub(crate) active: AtomicBool,
    warned_no_vector: AtomicBool,
    warned_disabled: AtomicBool,
}

impl Shared {
    pub(crate) fn new(queues: usize, msix: MsixConfig) -> Self {
        Self {
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR)).collect(),
            msix: Mutex::new(msix),
            epoch: AtomicU64::new(0),
            active: AtomicBool::new(false),
            warned_no_vector: AtomicBool::new(false),
            warned_disabled: AtomicBool::new(false),
        }
    }

    /// The MSI-X state, locked. Callers take no other lock while holding it.
    pub(crate) fn msix(&self) -> MutexGuard<'_, MsixConfig> {
        self.msix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every event back to NO_VECTOR, ISR cleared (device reset).
    pub(crate) fn reset_vectors(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.config_vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for vector in self.queue_vectors.iter() {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// Signals `kind`: sets its ISR bit (and, for a configuration change,
    /// bumps the generation first), then triggers its MSI-X vector.
    pub(crate) fn signal(&self, kind: InterruptKind) -> io::Result<()> {
        let (vector, bit) = match kind {
            InterruptKind::Queue(index) => {
                let vector = self.queue_vectors.get(usize::from(index)).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no queue {index} to interrupt for"),
                    )
                })?;
                (vector.load(Ordering::SeqCst), ISR_QUEUE)
            }
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                (self.config_vector.load(Ordering::SeqCst), ISR_CONFIG)
            }
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == VIRTIO_MSI_NO_VECTOR {
            if !self.warned_no_vector.swap(true, Ordering::Relaxed) {
                log::warn!("virtio-pci: {kind:?} has no MSI-X vector (INTx is not offered); interrupt not delivered");
            }
            return Ok(());
        }
        if self.msix().trigger(vector)? == MsixDelivery::Disabled && !self.warned_disabled.swap(true, Ordering::Relaxed)
        {
            log::warn!("virtio-pci: {kind:?} while MSI-X is disabled (INTx is not offered); interrupt dropped");
        }
        Ok(())
    }
}

/// The [`VirtioInterrupt`] a device gets at activation. It stops
/// signalling once the device is reset, so a device that keeps it (or a
/// thread that still holds it) cannot interrupt the next driver instance.
pub(crate) struct PciInterrupt {
    shared: Arc<Shared>,
    epoch: u64,
}

impl PciInterrupt {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        Self { shared, epoch }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        if self.shared.epoch.load(Ordering::SeqCst) != self.epoch {
            log::debug!("virtio-pci: {kind:?} from before the last device reset ignored");
            return Ok(());
        }
        self.shared.signal(kind)
    }
}
