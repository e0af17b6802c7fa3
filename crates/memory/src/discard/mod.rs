//! The discard contract between memory devices and DMA mappers.
//!
//! A [`RamDiscardManager`] owns the populated/discarded state of one
//! guest-physical RAM region (a virtio-mem device is one). Consumers that
//! must never touch discarded memory — DMA mappers above all — either ask
//! it ([`RamDiscardManager::is_populated`], under a [`PopulatedView`] read
//! guard so that the answer stays true while they act on it), or register
//! as a [`RamDiscardListener`] and are told before anything changes.
//!
//! This module is the contract; [`block`] is its one implementation,
//! [`BlockDiscardManager`], over the
//! [`BlockBitmap`](crate::block_state::BlockBitmap) core; a memory device embeds it and adds its own
//! request validation.
//!
//! # Locking (DESIGN.md rule 3)
//!
//! The manager has one reader-writer lock. Queries, replays and every
//! [`PopulatedView`] hold the read side; plug, unplug, listener
//! registration and unregistration hold the write side *for their whole
//! duration, including every listener notification*. Hence:
//!
//! * a caller that checks [`PopulatedView::is_populated`] and then pins the
//!   memory while still holding the view can never pin discarded memory;
//! * listeners are notified with the write lock held and **must not call
//!   back into the manager** (that would deadlock); they may take their own
//!   locks, so the global lock order is *manager, then listener*.

use std::sync::Arc;

use crate::range::GuestRange;

pub mod block;

pub use block::{BlockDiscardManager, DiscardWriter, GeometryError, PlugError, PopulatedView, Vetoed};

/// Identifies a listener registration; returned by
/// [`RamDiscardManager::register_listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(u64);

/// A listener's refusal to populate a range, or a replay callback's error.
///
/// Carries a human-readable reason; the manager passes it on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// The error a [`RamDiscardManager::replay_populated`] callback may return
/// to stop the walk; any error type converts into it.
pub type ReplayError = Box<dyn std::error::Error + Send + Sync>;

/// Someone who must know before RAM in a managed region is populated or
/// discarded — typically a DMA mapper that pins what it maps.
///
/// # Contract
///
/// The manager guarantees:
/// * every range it passes covers whole, aligned granules
///   ([`RamDiscardManager::granularity`]) and lies inside the range the
///   listener registered for;
/// * `notify_populate(r)` is called before `r` becomes visible as
///   populated, and `notify_discard(r)` before the memory behind `r` is
///   discarded, each at most once per state change;
/// * for one listener, notifications never overlap in time (they run under
///   the manager's write lock), and a discard is only sent for memory the
///   listener was told was populated.
///
/// The implementer must:
/// * not call back into the manager from any of these methods (it would
///   deadlock: the manager holds its write lock);
/// * in `notify_populate`, either fully accept the range (e.g. map and pin
///   all of it) or refuse it and leave no trace;
/// * in `notify_discard`, drop every pin and mapping of the range before
///   returning: the memory is discarded right after.
pub trait RamDiscardListener: Send + Sync {
    /// A short name used in errors and logs, such as `"vfio0"`.
    fn name(&self) -> &str;

    /// `range` is about to become populated.
    ///
    /// On `Err`, the manager notifies `notify_discard(range)` to every
    /// listener that had already accepted it (in reverse order), discards
    /// the memory again, and fails the operation (virtio-mem answers
    /// `VIRTIO_MEM_RESP_BUSY`). This listener gets no discard for a range
    /// it refused.
    fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal>;

    /// `range` is about to be discarded: drop every use of it now.
    fn notify_discard(&self, range: GuestRange);

    /// May `range` be discarded now? A listener that still needs the memory
    /// (a guest IOMMU mapping covers it) answers `false`, and the unplug is
    /// refused before anything changes (DESIGN.md rule 2). Called before any
    /// `notify_discard` of the same operation. The default allows it.
    fn may_discard(&self, range: GuestRange) -> bool {
        let _ = range;
        true
    }
}

/// Errors of listener registration.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The range is not inside the managed region or not granule-aligned.
    #[error(
        "listener '{listener}': range {range} is not a granule-aligned ({granularity:#x}) part of the managed region {region}"
    )]
    BadRange {
        /// The listener's name.
        listener: String,
        /// The range asked for.
        range: GuestRange,
        /// The managed region.
        region: GuestRange,
        /// The manager's granularity.
        granularity: u64,
    },
    /// The listener refused the replay of an already populated range; the
    /// parts it had accepted were discarded again and it is not registered.
    #[error("listener '{listener}' refused populated range {range}: {refusal}")]
    Refused {
        /// The listener's name.
        listener: String,
        /// The range it refused.
        range: GuestRange,
        /// Its reason.
        refusal: Refusal,
    },
}

/// The populated/discarded state of one guest-physical RAM region.
///
/// See the [module documentation](self) for the locking rules; the
/// provided methods are the contract's queries.
///
/// # One core, many wrappers
///
/// The state behind every implementation is the granule bitmap of a
/// [`BlockDiscardManager`]: [`populated`](Self::populated) returns that
/// core's read guard, a concrete [`PopulatedView`], and no other type can
/// make one. An implementation is therefore a device that *owns* a
/// `BlockDiscardManager` and forwards to it (memvisor's virtio-mem region
/// does), adding its own policy around plug and unplug. This is deliberate:
///
/// * rule 3 (check and pin are one step) hands the very guard the check
///   ran under to every IOMMU notifier (`MapEvent::populated` in
///   `memvisor-iommu`); a concrete view keeps that a borrow, where a trait
///   object would cost an allocation and dynamic calls on every MAP, the
///   hottest path the DMA layer has;
/// * the bitmap answers `is_populated` with whole-word compares and the
///   replays with a trailing-zeros run finder (`memvisor bench`:
///   `populated_check`, `populated_replay`), which a second representation
///   would have to match;
/// * every coordinated discarder in view (virtio-mem now; a
///   hot-pluggable DIMM or a free-page-reporting device later) manages
///   fixed-size granules, which is exactly what the bitmap holds.
///
/// A manager with a different representation would first have to turn
/// [`PopulatedView`] into a trait (or an associated type of this one).
pub trait RamDiscardManager: Send + Sync {
    /// Bytes per granule: a power of two; every notification covers whole,
    /// aligned granules.
    fn granularity(&self) -> u64;

    /// The guest-physical range this manager is responsible for.
    fn region(&self) -> GuestRange;

    /// A read guard over the state. While it lives, no plug or unplug can
    /// change the answer of any query made through it (rule 3).
    fn populated(&self) -> PopulatedView<'_>;

    /// Registers `listener` for `range` (granule-aligned, inside
    /// [`region`](Self::region)) and replays every populated part of it as
    /// `notify_populate`, one call per maximal run. If the listener refuses
    /// one, the runs it accepted get `notify_discard` and it is not
    /// registered.
    fn register_listener(
        &self,
        listener: Arc<dyn RamDiscardListener>,
        range: GuestRange,
    ) -> Result<ListenerId, RegisterError>;

    /// Unregisters a listener, sending `notify_discard` for every populated
    /// run of its range first. Returns `false` for an unknown id.
    fn unregister_listener(&self, id: ListenerId) -> bool;

    /// True only if every byte of `range` lies in the region and is
    /// populated. Any alignment is accepted; an empty range is never
    /// populated (so a zero-length request cannot be used as a probe that
    /// always passes).
    fn is_populated(&self, range: GuestRange) -> bool {
        self.populated().is_populated(range)
    }

    /// Calls `f` once per maximal populated run, clipped to `range`, in
    /// ascending order. The first error stops the walk and is returned.
    fn replay_populated(
        &self,
        range: GuestRange,
        f: &mut dyn FnMut(GuestRange) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        self.populated().replay(range, true, f)
    }

    /// Calls `f` once per maximal discarded run, clipped to `range`, in
    /// ascending order. The first error stops the walk and is returned.
    fn replay_discarded(
        &self,
        range: GuestRange,
        f: &mut dyn FnMut(GuestRange) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        self.populated().replay(range, false, f)
    }
}
