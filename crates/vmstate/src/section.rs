//! The [`Section`] trait: one piece of machine state with a declared place
//! in the restore order.

use std::fmt;
use std::io::{Read, Write};

use crate::context::{LoadContext, Restores};
use crate::error::{SectionError, SectionId};

/// When a section is sent, relative to RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Before RAM: what RAM loading depends on, such as the immutable
    /// configuration and block bitmap of a memory device.
    Setup,
    /// RAM contents ([`crate::ram::RamSection`]).
    Ram,
    /// After RAM: device state.
    Device,
}

/// Order inside a phase: higher first; ties keep registration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Priority(pub i32);

impl Priority {
    /// The machine's shape (a fingerprint of its configuration): checked
    /// before anything else is restored.
    pub const MACHINE: Priority = Priority(400);
    /// Memory devices (virtio-mem): their discard managers must be
    /// restored before anything maps their memory.
    pub const MEMORY_DEVICE: Priority = Priority(300);
    /// IOMMUs: their mappings are replayed to the DMA layer.
    pub const IOMMU: Priority = Priority(200);
    /// DMA mappers, which re-derive their pins from the restored IOMMU and
    /// discard state.
    pub const DMA: Priority = Priority(100);
    /// Every other device.
    pub const DEVICE: Priority = Priority(100);
    /// Transports (virtio-pci): they activate their devices with the
    /// restored queues, so every device model is restored first.
    pub const TRANSPORT: Priority = Priority(50);
    /// The VM-wide interrupt controllers and timers, once every device
    /// that may raise an interrupt is back.
    pub const PLATFORM: Priority = Priority(20);
    /// vCPUs, last: their local APICs and pending events refer to the
    /// platform.
    pub const VCPU: Priority = Priority(10);
    /// RAM (alone in its phase).
    pub const RAM: Priority = Priority(0);
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Default limit on a payload the registry reads into memory.
pub const DEFAULT_MAX_PAYLOAD: u64 = 16 << 20;

/// One piece of migratable state.
///
/// # Contract
///
/// The [`Registry`](crate::Registry) guarantees:
/// * on save, [`pre_save`](Self::pre_save) of every section runs before
///   anything is written, then every section's `save` in the declared
///   order (phase, then priority, highest first, then registration order),
///   then [`post_save`](Self::post_save) of every section — also after a
///   failure;
/// * on load, [`pre_load`](Self::pre_load) of every section runs first,
///   then `load` in stream order, at most once per section, with
///   a payload whose length is at most [`max_payload`](Self::max_payload)
///   and — unless the section is [`streaming`](Self::streaming) — whose
///   checksum was verified before `load` sees a byte;
///   [`post_load`](Self::post_load) runs for the loaded sections in the
///   declared order once the end marker was read and checked and every
///   required section was loaded; if anything fails, every section whose
///   `load` was called gets [`abort_load`](Self::abort_load), last first.
///
/// The implementer must:
/// * write exactly the bytes it later reads, and read its whole payload;
/// * in `load`, check with the [`LoadContext`] that every section it
///   depends on was restored, and fail with
///   [`SectionError::MissingPredecessor`] if not;
/// * defer effects that cannot be undone, or that pin memory, to
///   `post_load`, and undo them in `abort_load`;
/// * never panic, whatever the payload.
pub trait Section: Send {
    /// The section's name in the stream (1 to 64 printable ASCII bytes).
    fn name(&self) -> &str;

    /// Which instance (several devices of one kind).
    fn instance(&self) -> u32 {
        0
    }

    /// The version `save` writes; the newest one `load` accepts.
    fn version(&self) -> u16;

    /// The oldest version `load` accepts.
    fn min_version(&self) -> u16 {
        self.version()
    }

    /// Order inside the phase.
    fn priority(&self) -> Priority;

    /// Before or after RAM.
    fn phase(&self) -> Phase;

    /// A stream without this section is refused.
    fn required(&self) -> bool {
        true
    }

    /// The longest payload this section can ever have; a longer one is
    /// refused before anything is allocated or read.
    fn max_payload(&self) -> u64 {
        DEFAULT_MAX_PAYLOAD
    }

    /// What it restores that others may need (see [`LoadContext`]).
    fn restores(&self) -> Vec<Restores> {
        Vec::new()
    }

    /// A streaming section announces its payload length with
    /// [`save_len`](Self::save_len) and writes its payload straight to the
    /// stream; on load it reads straight from it, and the checksum is
    /// verified only after `load` returns. Other sections are buffered.
    fn streaming(&self) -> bool {
        false
    }

    /// The exact payload length the next `save` writes (streaming sections
    /// only).
    fn save_len(&mut self) -> Result<u64, SectionError> {
        Err(SectionError::Invalid(format!(
            "section '{}' is not a streaming section",
            self.name()
        )))
    }

    /// Called on every section before any is saved (e.g. to make a device
    /// refuse guest changes while the migration runs).
    fn pre_save(&mut self) -> Result<(), SectionError> {
        Ok(())
    }

    /// Writes the payload.
    fn save(&mut self, out: &mut dyn Write) -> Result<(), SectionError>;

    /// Called on every section after the save ended, `succeeded` or not.
    fn post_save(&mut self, succeeded: bool) {
        let _ = succeeded;
    }

    /// Called on every section before a load reads the stream (e.g. to
    /// drop pins that RAM loading would discard under).
    fn pre_load(&mut self) {}

    /// Reads the payload of `version`, checking first that its
    /// predecessors are restored.
    fn load(&mut self, ctx: &LoadContext, version: u16, payload: &mut dyn Read) -> Result<(), SectionError>;

    /// Called after every section was loaded and the stream was checked
    /// to its end.
    fn post_load(&mut self, ctx: &LoadContext) -> Result<(), SectionError> {
        let _ = ctx;
        Ok(())
    }

    /// The load failed: undo what `load` and `post_load` did that outlives
    /// the failure (pins, above all).
    fn abort_load(&mut self) {}

    /// The section's id.
    fn id(&self) -> SectionId {
        SectionId::new(self.name(), self.instance())
    }
}
