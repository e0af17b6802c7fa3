//! [`BlockDiscardManager`]: the one implementation of the discard contract,
//! over the [`BlockBitmap`] core — its geometry, its lock and the
//! [`PopulatedView`] read guard, listener registration and replay, and the
//! plug and unplug protocol ([`DiscardWriter`]) with rollback and vetoes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{ListenerId, RamDiscardListener, RamDiscardManager, Refusal, RegisterError};
use crate::block_state::BlockBitmap;
use crate::range::GuestRange;

/// Geometry of a managed region: where it is and how it is cut in granules.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    region: GuestRange,
    shift: u32,
}

impl Geometry {
    fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The granules `[first, first + count)` touched by `range` ∩ region,
    /// or `None` when they share nothing.
    fn granules(&self, range: GuestRange) -> Option<(usize, usize)> {
        let clipped = self.region.intersection(&range)?;
        let first = (clipped.start() - self.region.start()) >> self.shift;
        let last = (clipped.end() - 1 - self.region.start()) >> self.shift;
        Some((first as usize, (last - first + 1) as usize))
    }

    /// The guest range of granules `[first, first + count)`.
    fn range_of(&self, first: usize, count: usize) -> GuestRange {
        GuestRange::new(
            self.region.start() + ((first as u64) << self.shift),
            (count as u64) << self.shift,
        )
        .expect("granules inside the region never overflow")
    }

    #[inline]
    fn is_populated(&self, bitmap: &BlockBitmap, range: GuestRange) -> bool {
        if range.is_empty() || !self.region.contains(&range) {
            return false;
        }
        // Inside the region, so no intersection to take (`granules`).
        let first = ((range.start() - self.region.start()) >> self.shift) as usize;
        let last = ((range.end() - 1 - self.region.start()) >> self.shift) as usize;
        // The common case (every IOMMU MAP of less than a block, every
        // virtqueue buffer): one granule, one bit.
        if first == last {
            return bitmap.get(first);
        }
        bitmap.all_set(first, last - first + 1)
    }

    fn is_discarded(&self, bitmap: &BlockBitmap, range: GuestRange) -> bool {
        match self.granules(range) {
            Some((first, count)) => bitmap.all_clear(first, count),
            None => true,
        }
    }

    fn populated_bytes(&self, bitmap: &BlockBitmap) -> u64 {
        (bitmap.count_ones() as u64) << self.shift
    }

    /// Maximal runs equal to `populated`, clipped to `range`.
    fn runs<'a>(
        &self,
        bitmap: &'a BlockBitmap,
        range: GuestRange,
        populated: bool,
    ) -> impl Iterator<Item = GuestRange> + 'a {
        let geometry = *self;
        let (first, count) = self.granules(range).unwrap_or((0, 0));
        bitmap
            .runs(first, count, populated)
            .filter_map(move |(s, n)| geometry.range_of(s, n).intersection(&range))
    }
}

struct Registration {
    id: ListenerId,
    range: GuestRange,
    listener: Arc<dyn RamDiscardListener>,
}

/// What the manager's lock protects.
struct State {
    bitmap: BlockBitmap,
    listeners: Vec<Registration>,
}

/// A read guard over a manager's populated state; see
/// [`RamDiscardManager::populated`].
pub struct PopulatedView<'a> {
    geometry: Geometry,
    state: RwLockReadGuard<'a, State>,
}

impl fmt::Debug for PopulatedView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PopulatedView")
            .field("region", &self.geometry.region)
            .field("bitmap", &self.state.bitmap)
            .finish()
    }
}

impl PopulatedView<'_> {
    /// See [`RamDiscardManager::is_populated`].
    #[inline]
    pub fn is_populated(&self, range: GuestRange) -> bool {
        self.geometry.is_populated(&self.state.bitmap, range)
    }

    /// True if no byte of `range` ∩ region is populated.
    pub fn is_discarded(&self, range: GuestRange) -> bool {
        self.geometry.is_discarded(&self.state.bitmap, range)
    }

    /// Populated bytes in the whole region.
    pub fn populated_bytes(&self) -> u64 {
        self.geometry.populated_bytes(&self.state.bitmap)
    }

    /// The bitmap itself, one bit per granule from the region's start.
    pub fn bitmap(&self) -> &BlockBitmap {
        &self.state.bitmap
    }

    /// Maximal runs equal to `populated`, clipped to `range`, as guest ranges.
    pub fn runs(&self, range: GuestRange, populated: bool) -> impl Iterator<Item = GuestRange> + '_ {
        self.geometry.runs(&self.state.bitmap, range, populated)
    }

    /// Calls `f` per maximal run equal to `populated`, clipped to `range`;
    /// the first error stops the walk.
    pub fn replay<E>(
        &self,
        range: GuestRange,
        populated: bool,
        mut f: impl FnMut(GuestRange) -> Result<(), E>,
    ) -> Result<(), E> {
        self.runs(range, populated).try_for_each(&mut f)
    }
}

/// Why a [`DiscardWriter::plug`] failed. Nothing changed: every listener
/// that accepted the range was told to discard it again, and the memory was
/// discarded again.
#[derive(Debug, thiserror::Error)]
pub enum PlugError<E> {
    /// A listener refused the populate.
    #[error("listener '{listener}' refused to populate {range}: {refusal}")]
    Refused {
        /// The listener's name.
        listener: String,
        /// The range.
        range: GuestRange,
        /// Its reason.
        refusal: Refusal,
    },
    /// The caller's preparation step (preallocation) failed.
    #[error("preparing {range} failed: {source}")]
    Prepare {
        /// The range.
        range: GuestRange,
        /// The caller's error.
        source: E,
    },
}

/// Why a [`DiscardWriter::unplug`] was refused: a listener vetoed it.
/// Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener '{listener}' vetoed discarding {range}")]
pub struct Vetoed {
    /// The listener's name.
    pub listener: String,
    /// The populated run it vetoed.
    pub range: GuestRange,
}

/// The reusable [`RamDiscardManager`]: a [`BlockBitmap`] of granules plus
/// the listener machinery, behind one reader-writer lock.
///
/// A memory device owns one, answers queries through the trait, and
/// changes state only through [`BlockDiscardManager::write`].
///
/// ```
/// use std::sync::Arc;
/// use memvisor_memory::GuestRange;
/// use memvisor_memory::discard::{BlockDiscardManager, RamDiscardManager};
///
/// let region = GuestRange::new(0x1_0000_0000, 8 << 20).unwrap();
/// let manager = BlockDiscardManager::new(region, 2 << 20).unwrap();
/// let block = GuestRange::new(0x1_0020_0000, 2 << 20).unwrap();
/// manager.write().plug(block, || Ok::<_, std::io::Error>(()), |_| {}).unwrap();
/// assert!(manager.is_populated(block));
/// assert!(!manager.is_populated(region));
/// ```
pub struct BlockDiscardManager {
    geometry: Geometry,
    state: RwLock<State>,
    next_id: AtomicU64,
}

impl fmt::Debug for BlockDiscardManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDiscardManager")
            .field("region", &self.geometry.region)
            .field("granularity", &self.geometry.granularity())
            .finish()
    }
}

/// Why a [`BlockDiscardManager`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The granularity is not a power of two.
    #[error("granularity {0:#x} is not a power of two")]
    Granularity(u64),
    /// The region is empty or not a multiple of the granularity.
    #[error("region {region} is empty or not aligned to the granularity {granularity:#x}")]
    Region {
        /// The region.
        region: GuestRange,
        /// The granularity.
        granularity: u64,
    },
}

impl BlockDiscardManager {
    /// A manager for `region`, cut in granules of `granularity` bytes, with
    /// everything discarded.
    pub fn new(region: GuestRange, granularity: u64) -> Result<Self, GeometryError> {
        if !granularity.is_power_of_two() {
            return Err(GeometryError::Granularity(granularity));
        }
        if region.is_empty() || !region.is_aligned(granularity) {
            return Err(GeometryError::Region { region, granularity });
        }
        let geometry = Geometry {
            region,
            shift: granularity.trailing_zeros(),
        };
        let granules = usize::try_from(region.len() >> geometry.shift)
            .map_err(|_| GeometryError::Region { region, granularity })?;
        Ok(Self {
            geometry,
            state: RwLock::new(State {
                bitmap: BlockBitmap::new(granules),
                listeners: Vec::new(),
            }),
            next_id: AtomicU64::new(1),
        })
    }

    /// Takes the write side of the lock, to plug or unplug. Listener
    /// notifications happen while it is held.
    pub fn write(&self) -> DiscardWriter<'_> {
        DiscardWriter {
            geometry: self.geometry,
            state: self.state.write().unwrap_or_else(|poison| poison.into_inner()),
        }
    }

    /// Number of registered listeners.
    pub fn listener_count(&self) -> usize {
        self.populated().state.listeners.len()
    }
}

impl RamDiscardManager for BlockDiscardManager {
    fn granularity(&self) -> u64 {
        self.geometry.granularity()
    }

    fn region(&self) -> GuestRange {
        self.geometry.region
    }

    fn populated(&self) -> PopulatedView<'_> {
        PopulatedView {
            geometry: self.geometry,
            state: self.state.read().unwrap_or_else(|poison| poison.into_inner()),
        }
    }

    fn register_listener(
        &self,
        listener: Arc<dyn RamDiscardListener>,
        range: GuestRange,
    ) -> Result<ListenerId, RegisterError> {
        let granularity = self.geometry.granularity();
        if range.is_empty() || !self.geometry.region.contains(&range) || !range.is_aligned(granularity) {
            return Err(RegisterError::BadRange {
                listener: listener.name().to_string(),
                range,
                region: self.geometry.region,
                granularity,
            });
        }
        let mut writer = self.write();
        let runs: Vec<GuestRange> = writer.view_runs(range, true);
        for (i, &run) in runs.iter().enumerate() {
            if let Err(refusal) = listener.notify_populate(run) {
                for &done in runs[..i].iter().rev() {
                    listener.notify_discard(done);
                }
                return Err(RegisterError::Refused {
                    listener: listener.name().to_string(),
                    range: run,
                    refusal,
                });
            }
        }
        let id = ListenerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        writer.state.listeners.push(Registration { id, range, listener });
        Ok(id)
    }

    fn unregister_listener(&self, id: ListenerId) -> bool {
        let mut writer = self.write();
        let Some(pos) = writer.state.listeners.iter().position(|r| r.id == id) else {
            return false;
        };
        let registration = writer.state.listeners.remove(pos);
        for run in writer.view_runs(registration.range, true) {
            registration.listener.notify_discard(run);
        }
        true
    }
}

/// The write side of a [`BlockDiscardManager`]: plug and unplug, with the
/// listener protocol of [`RamDiscardListener`]. Dropping it releases the
/// lock.
pub struct DiscardWriter<'a> {
    geometry: Geometry,
    state: RwLockWriteGuard<'a, State>,
}

impl fmt::Debug for DiscardWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscardWriter")
            .field("region", &self.geometry.region)
            .finish()
    }
}

impl DiscardWriter<'_> {
    fn view_runs(&self, range: GuestRange, populated: bool) -> Vec<GuestRange> {
        self.geometry.runs(&self.state.bitmap, range, populated).collect()
    }

    fn check_range(&self, range: GuestRange) -> (usize, usize) {
        assert!(
            !range.is_empty() && self.geometry.region.contains(&range) && range.is_aligned(self.geometry.granularity()),
            "range {range} is not a granule-aligned part of {}",
            self.geometry.region
        );
        self.geometry.granules(range).expect("checked above")
    }

    /// The bitmap, one bit per granule from the region's start.
    pub fn bitmap(&self) -> &BlockBitmap {
        &self.state.bitmap
    }

    /// True if every granule of `range` is populated; see
    /// [`PopulatedView::is_populated`].
    pub fn is_populated(&self, range: GuestRange) -> bool {
        self.geometry.is_populated(&self.state.bitmap, range)
    }

    /// True if no granule of `range` is populated.
    pub fn is_discarded(&self, range: GuestRange) -> bool {
        self.geometry.is_discarded(&self.state.bitmap, range)
    }

    /// Populated bytes in the whole region.
    pub fn populated_bytes(&self) -> u64 {
        self.geometry.populated_bytes(&self.state.bitmap)
    }

    /// Notifies every overlapping listener of `range`, rolling back on the
    /// first refusal. Returns the refusal.
    fn notify_populate(&self, range: GuestRange) -> Result<(), PlugError<std::convert::Infallible>> {
        let listeners = &self.state.listeners;
        for (i, reg) in listeners.iter().enumerate() {
            let Some(part) = reg.range.intersection(&range) else {
                continue;
            };
            if let Err(refusal) = reg.listener.notify_populate(part) {
                Self::notify_discard_to(&listeners[..i], range);
                return Err(PlugError::Refused {
                    listener: reg.listener.name().to_string(),
                    range: part,
                    refusal,
                });
            }
        }
        Ok(())
    }

    /// Tells `listeners`, last first, that `range` is discarded.
    fn notify_discard_to(listeners: &[Registration], range: GuestRange) {
        for reg in listeners.iter().rev() {
            if let Some(part) = reg.range.intersection(&range) {
                reg.listener.notify_discard(part);
            }
        }
    }

    /// Plugs `range` (granule-aligned, inside the region, entirely
    /// discarded — the caller validated the request):
    ///
    /// 1. every listener whose range overlaps it gets `notify_populate`;
    /// 2. `prepare()` runs (e.g. preallocation);
    /// 3. the granules are marked populated.
    ///
    /// If a listener refuses or `prepare` fails, the listeners that accepted
    /// get `notify_discard`, `discard(range)` runs so the backing memory is
    /// returned again (a listener may have faulted it in), and nothing is
    /// marked.
    ///
    /// Panics if `range` is not a granule-aligned part of the region: the
    /// caller must validate guest input before it gets here.
    pub fn plug<E>(
        &mut self,
        range: GuestRange,
        prepare: impl FnOnce() -> Result<(), E>,
        discard: impl FnOnce(GuestRange),
    ) -> Result<(), PlugError<E>> {
        let (first, count) = self.check_range(range);
        debug_assert!(self.state.bitmap.all_clear(first, count), "plug of populated {range}");
        if let Err(err) = self.notify_populate(range) {
            discard(range);
            return Err(match err {
                PlugError::Refused {
                    listener,
                    range,
                    refusal,
                } => PlugError::Refused {
                    listener,
                    range,
                    refusal,
                },
                PlugError::Prepare { source, .. } => match source {},
            });
        }
        if let Err(source) = prepare() {
            Self::notify_discard_to(&self.state.listeners, range);
            discard(range);
            return Err(PlugError::Prepare { range, source });
        }
        self.state.bitmap.set_range(first, count);
        Ok(())
    }

    /// Asks every listener whether the populated runs inside `range` may be
    /// discarded; the first veto is returned.
    pub fn check_discard(&self, range: GuestRange) -> Result<(), Vetoed> {
        for run in self.view_runs(range, true) {
            for reg in &self.state.listeners {
                if let Some(part) = reg.range.intersection(&run)
                    && !reg.listener.may_discard(part)
                {
                    return Err(Vetoed {
                        listener: reg.listener.name().to_string(),
                        range: part,
                    });
                }
            }
        }
        Ok(())
    }

    /// Unplugs every populated granule inside `range` (granule-aligned,
    /// inside the region), all or nothing:
    ///
    /// 1. every populated run is offered to every overlapping listener's
    ///    `may_discard`; one veto returns [`Vetoed`] and changes nothing —
    ///    unless `force` is set (a system reset, which cannot fail), in
    ///    which case the veto is logged and ignored;
    /// 2. each run is announced with `notify_discard`;
    /// 3. `discard(run)` returns its backing memory to the host;
    /// 4. the granules are marked discarded.
    ///
    /// Returns the number of bytes unplugged.
    pub fn unplug(
        &mut self,
        range: GuestRange,
        force: bool,
        mut discard: impl FnMut(GuestRange),
    ) -> Result<u64, Vetoed> {
        let (first, count) = self.check_range(range);
        if let Err(veto) = self.check_discard(range) {
            if !force {
                return Err(veto);
            }
            log::warn!("{veto}; discarding anyway because the machine is being reset");
        }
        let runs = self.view_runs(range, true);
        let mut bytes = 0;
        for &run in &runs {
            Self::notify_discard_to(&self.state.listeners, run);
            discard(run);
            bytes += run.len();
        }
        self.state.bitmap.clear_range(first, count);
        Ok(bytes)
    }

    /// Replaces the whole state with `bitmap` (migration): listeners get
    /// `notify_discard` for what is populated now but not in `bitmap`, then
    /// `notify_populate` for what becomes populated, and nothing for what
    /// stays populated (a live migration's last stream carries the bitmap
    /// its first one did: re-announcing every plugged block would rebuild
    /// each KVM slot while the guest is paused); `discard` runs for every
    /// granule that ends up discarded.
    ///
    /// If a listener refuses a populate, the new bitmap is kept for what was
    /// accepted up to that run and the refusal is returned, so the caller
    /// can fail the load. Panics if `bitmap` has the wrong length.
    pub fn restore(
        &mut self,
        bitmap: BlockBitmap,
        mut discard: impl FnMut(GuestRange),
    ) -> Result<(), PlugError<std::convert::Infallible>> {
        let len = bitmap.len();
        assert_eq!(len, self.state.bitmap.len(), "bitmap length mismatch");
        let diff = |f: fn(u64, u64) -> u64| {
            let words = self.state.bitmap.words().iter().zip(bitmap.words());
            BlockBitmap::from_words(words.map(|(&now, &new)| f(now, new)).collect(), len)
                .expect("a mask of two bitmaps of the same length")
        };
        let going = diff(|now, new| now & !new);
        let coming = diff(|now, new| new & !now);
        // Announce and perform discards of what is going away.
        for (s, n) in going.runs(0, len, true) {
            Self::notify_discard_to(&self.state.listeners, self.geometry.range_of(s, n));
            self.state.bitmap.clear_range(s, n);
        }
        for (s, n) in bitmap.runs(0, len, false) {
            discard(self.geometry.range_of(s, n));
        }
        for (s, n) in coming.runs(0, len, true) {
            let run = self.geometry.range_of(s, n);
            self.notify_populate(run)?;
            self.state.bitmap.set_range(s, n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 0x1_0000_0000;

    fn r(start_mib: u64, len_mib: u64) -> GuestRange {
        GuestRange::new(BASE + start_mib * MIB, len_mib * MIB).unwrap()
    }

    /// A listener that records what it was told and can refuse or veto.
    #[derive(Default)]
    struct Recorder {
        name: String,
        events: Mutex<Vec<(char, GuestRange)>>,
        refuse: Mutex<Option<GuestRange>>,
        veto: Mutex<Option<GuestRange>>,
    }

    impl Recorder {
        fn new(name: &str) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                ..Default::default()
            })
        }
        fn take(&self) -> Vec<(char, GuestRange)> {
            std::mem::take(&mut self.events.lock().unwrap())
        }
    }

    impl RamDiscardListener for Recorder {
        fn name(&self) -> &str {
            &self.name
        }
        fn notify_populate(&self, range: GuestRange) -> Result<(), Refusal> {
            if self.refuse.lock().unwrap().is_some_and(|x| x.overlaps(&range)) {
                return Err(Refusal("no".into()));
            }
            self.events.lock().unwrap().push(('p', range));
            Ok(())
        }
        fn notify_discard(&self, range: GuestRange) {
            self.events.lock().unwrap().push(('d', range));
        }
        fn may_discard(&self, range: GuestRange) -> bool {
            !self.veto.lock().unwrap().is_some_and(|x| x.overlaps(&range))
        }
    }

    fn manager() -> BlockDiscardManager {
        BlockDiscardManager::new(r(0, 64), 2 * MIB).unwrap()
    }

    fn plug(m: &BlockDiscardManager, range: GuestRange) -> Result<(), PlugError<()>> {
        m.write().plug(range, || Ok(()), |_| {})
    }

    fn collect(m: &BlockDiscardManager, range: GuestRange, populated: bool) -> Vec<GuestRange> {
        let mut out = Vec::new();
        let f = &mut |x| {
            out.push(x);
            Ok(())
        };
        if populated {
            m.replay_populated(range, f).unwrap();
        } else {
            m.replay_discarded(range, f).unwrap();
        }
        out
    }

    #[test]
    fn construction_checks_geometry() {
        assert_eq!(
            BlockDiscardManager::new(r(0, 64), 3 * MIB).unwrap_err(),
            GeometryError::Granularity(3 * MIB)
        );
        assert!(matches!(
            BlockDiscardManager::new(r(1, 64), 2 * MIB).unwrap_err(),
            GeometryError::Region { .. }
        ));
        assert!(BlockDiscardManager::new(r(0, 0), 2 * MIB).is_err());
    }

    #[test]
    fn is_populated_is_exact_for_unaligned_ranges() {
        let m = manager();
        plug(&m, r(4, 4)).unwrap();
        assert!(m.is_populated(r(4, 4)));
        assert!(m.is_populated(GuestRange::new(BASE + 4 * MIB + 1, 4 * MIB - 2).unwrap()));
        assert!(m.is_populated(GuestRange::new(BASE + 8 * MIB - 1, 1).unwrap()));
        assert!(!m.is_populated(GuestRange::new(BASE + 8 * MIB - 1, 2).unwrap()));
        assert!(!m.is_populated(GuestRange::new(BASE + 4 * MIB - 1, 2).unwrap()));
        assert!(!m.is_populated(GuestRange::new(BASE + 5 * MIB, 0).unwrap()));
        // Outside the region, even partly: never populated.
        assert!(!m.is_populated(GuestRange::new(BASE - 1, 1).unwrap()));
        plug(&m, r(62, 2)).unwrap();
        assert!(!m.is_populated(GuestRange::new(BASE + 63 * MIB, 2 * MIB).unwrap()));
    }

    proptest::proptest! {
        /// `is_populated`, with its one-granule shortcut, agrees with
        /// checking every granule a range touches.
        #[test]
        fn is_populated_matches_a_granule_by_granule_model(
            plugged in proptest::collection::vec(proptest::bool::ANY, 32),
            start in 0u64..(68 * MIB),
            len in 0u64..(8 * MIB),
        ) {
            let m = manager();
            for (i, _) in plugged.iter().enumerate().filter(|(_, p)| **p) {
                plug(&m, r(2 * i as u64, 2)).unwrap();
            }
            // From 2 MiB below the region to 2 MiB past it.
            let range = GuestRange::new(BASE - 2 * MIB + start, len).unwrap();
            let region = r(0, 64);
            let model = len > 0
                && region.contains(&range)
                && (range.start()..range.end())
                    .step_by(4096)
                    .chain([range.end() - 1])
                    .all(|at| plugged[((at - BASE) / (2 * MIB)) as usize]);
            proptest::prop_assert_eq!(m.is_populated(range), model, "{}", range);
        }
    }

    #[test]
    fn replay_clips_and_yields_maximal_runs() {
        let m = manager();
        plug(&m, r(0, 2)).unwrap();
        plug(&m, r(2, 2)).unwrap();
        plug(&m, r(8, 6)).unwrap();
        plug(&m, r(62, 2)).unwrap();
        assert_eq!(collect(&m, r(0, 64), true), vec![r(0, 4), r(8, 6), r(62, 2)]);
        // Clipped to an unaligned window.
        let window = GuestRange::new(BASE + 3 * MIB, 8 * MIB).unwrap();
        assert_eq!(
            collect(&m, window, true),
            vec![
                GuestRange::new(BASE + 3 * MIB, MIB).unwrap(),
                GuestRange::new(BASE + 8 * MIB, 3 * MIB).unwrap()
            ]
        );
        assert_eq!(collect(&m, window, false), vec![r(4, 4)]);
        assert_eq!(collect(&m, r(0, 64), false), vec![r(4, 4), r(14, 48)]);
        // A window partly outside the region is clipped to it.
        let wide = GuestRange::new(BASE - 4 * MIB, 8 * MIB).unwrap();
        assert_eq!(collect(&m, wide, true), vec![r(0, 4)]);
        assert_eq!(collect(&m, r(100, 4), true), vec![]);
    }

    #[test]
    fn replay_stops_at_first_error() {
        let m = manager();
        for i in 0..4 {
            plug(&m, r(i * 8, 2)).unwrap();
        }
        let mut seen = 0;
        let err = m
            .replay_populated(r(0, 64), &mut |range| {
                seen += 1;
                if range == r(8, 2) {
                    Err("stop here".into())
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "stop here");
        assert_eq!(seen, 2);
    }

    #[test]
    fn register_replays_and_unregister_discards() {
        let m = manager();
        plug(&m, r(0, 4)).unwrap();
        plug(&m, r(10, 2)).unwrap();
        let l = Recorder::new("l");
        let id = m.register_listener(l.clone(), r(2, 20)).unwrap();
        assert_eq!(l.take(), vec![('p', r(2, 2)), ('p', r(10, 2))]);
        plug(&m, r(40, 2)).unwrap(); // outside its range: not told
        plug(&m, r(20, 4)).unwrap(); // half inside
        assert_eq!(l.take(), vec![('p', r(20, 2))]);
        assert!(m.unregister_listener(id));
        assert_eq!(l.take(), vec![('d', r(2, 2)), ('d', r(10, 2)), ('d', r(20, 2))]);
        assert!(!m.unregister_listener(id));
        assert_eq!(m.listener_count(), 0);
    }

    #[test]
    fn register_refusal_rolls_back() {
        let m = manager();
        plug(&m, r(0, 2)).unwrap();
        plug(&m, r(8, 2)).unwrap();
        let l = Recorder::new("picky");
        *l.refuse.lock().unwrap() = Some(r(8, 2));
        let err = m.register_listener(l.clone(), r(0, 64)).unwrap_err();
        assert!(err.to_string().contains("picky"), "{err}");
        assert_eq!(l.take(), vec![('p', r(0, 2)), ('d', r(0, 2))]);
        assert_eq!(m.listener_count(), 0);
        assert!(matches!(
            m.register_listener(l, GuestRange::new(BASE + MIB, 2 * MIB).unwrap()),
            Err(RegisterError::BadRange { .. })
        ));
    }

    #[test]
    fn plug_refusal_rolls_back_earlier_listeners_and_discards_again() {
        let m = manager();
        let a = Recorder::new("a");
        let b = Recorder::new("b");
        m.register_listener(a.clone(), r(0, 64)).unwrap();
        m.register_listener(b.clone(), r(0, 64)).unwrap();
        *b.refuse.lock().unwrap() = Some(r(4, 2));
        let mut discarded = vec![];
        let err = m
            .write()
            .plug(r(4, 2), || Ok::<_, ()>(()), |x| discarded.push(x))
            .unwrap_err();
        assert!(matches!(err, PlugError::Refused { ref listener, .. } if listener == "b"));
        assert_eq!(a.take(), vec![('p', r(4, 2)), ('d', r(4, 2))]);
        assert_eq!(b.take(), vec![]);
        assert_eq!(discarded, vec![r(4, 2)]);
        assert!(!m.is_populated(r(4, 2)));
    }

    #[test]
    fn prepare_failure_rolls_back_all_listeners() {
        let m = manager();
        let a = Recorder::new("a");
        m.register_listener(a.clone(), r(0, 64)).unwrap();
        let mut discarded = vec![];
        let err = m
            .write()
            .plug(r(6, 2), || Err("ENOMEM"), |x| discarded.push(x))
            .unwrap_err();
        assert!(matches!(err, PlugError::Prepare { source: "ENOMEM", .. }));
        assert_eq!(a.take(), vec![('p', r(6, 2)), ('d', r(6, 2))]);
        assert_eq!(discarded, vec![r(6, 2)]);
        assert!(m.populated().is_discarded(r(0, 64)));
    }

    #[test]
    fn unplug_veto_changes_nothing_and_force_overrides() {
        let m = manager();
        let a = Recorder::new("a");
        let v = Recorder::new("vetoer");
        m.register_listener(a.clone(), r(0, 64)).unwrap();
        m.register_listener(v.clone(), r(0, 64)).unwrap();
        plug(&m, r(0, 4)).unwrap();
        plug(&m, r(8, 2)).unwrap();
        a.take();
        v.take();
        *v.veto.lock().unwrap() = Some(r(8, 2));
        let mut discarded = vec![];
        let veto = m.write().unplug(r(0, 64), false, |x| discarded.push(x)).unwrap_err();
        assert_eq!(
            veto,
            Vetoed {
                listener: "vetoer".into(),
                range: r(8, 2)
            }
        );
        assert!(discarded.is_empty() && a.take().is_empty() && v.take().is_empty());
        assert_eq!(m.populated().populated_bytes(), 6 * MIB);
        // Unplugging only the unvetoed part works, in reverse listener order.
        assert_eq!(
            m.write().unplug(r(0, 4), false, |x| discarded.push(x)).unwrap(),
            4 * MIB
        );
        assert_eq!(a.take(), vec![('d', r(0, 4))]);
        assert_eq!(v.take(), vec![('d', r(0, 4))]);
        assert_eq!(discarded, vec![r(0, 4)]);
        // A forced unplug ignores the veto.
        assert_eq!(m.write().unplug(r(0, 64), true, |_| {}).unwrap(), 2 * MIB);
        assert_eq!(v.take(), vec![('d', r(8, 2))]);
        assert_eq!(m.populated().populated_bytes(), 0);
    }

    #[test]
    fn restore_replaces_state_through_listeners() {
        let m = manager();
        let a = Recorder::new("a");
        m.register_listener(a.clone(), r(0, 64)).unwrap();
        plug(&m, r(0, 4)).unwrap();
        a.take();
        let mut target = BlockBitmap::new(32);
        target.set_range(1, 3); // [2, 8) MiB
        let mut discarded = vec![];
        m.write().restore(target.clone(), |x| discarded.push(x)).unwrap();
        // Only the difference: [0, 2) goes, [4, 8) comes, [2, 4) stays.
        assert_eq!(a.take(), vec![('d', r(0, 2)), ('p', r(4, 4))]);
        assert_eq!(discarded, vec![r(0, 2), r(8, 56)]);
        assert_eq!(m.populated().bitmap(), &target);
        // The same bitmap again (a live migration's last stream): no
        // listener hears of it, and what is populated keeps its memory.
        discarded.clear();
        m.write().restore(target.clone(), |x| discarded.push(x)).unwrap();
        assert_eq!(a.take(), vec![]);
        assert_eq!(discarded, vec![r(0, 2), r(8, 56)]);
        assert_eq!(m.populated().bitmap(), &target);
    }

    #[test]
    fn readers_exclude_writers() {
        let m = Arc::new(manager());
        let view = m.populated();
        let m2 = m.clone();
        let handle = std::thread::spawn(move || plug(&m2, r(0, 2)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The plug cannot have happened while the view is held.
        assert!(!view.is_populated(r(0, 2)));
        drop(view);
        handle.join().unwrap();
        assert!(m.is_populated(r(0, 2)));
    }
}
