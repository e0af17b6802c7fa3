//! Dirty-page tracking of the VMM's own writes to guest memory, for precopy
//! live migration (`docs/live-migration.md` §3.2).
//!
//! Every mapping of guest RAM carries a [`DirtyBitmap`] — one bit per
//! 4 KiB page — which `vm-memory` sets on every write it makes: `Bytes`
//! writes, [`VolatileSlice`] copies and stores, and so everything built on
//! them (`write_guest`, status bytes, [`RamBlock::write`]). Writes
//! through raw pointers are not seen (`ptr_guard_mut`, a `preadv` into
//! guest memory, io_uring fixed-buffer reads, rings accessed through their
//! host address): their writers mark the pages themselves
//! ([`Region::mark_dirty`], or `slice.bitmap().mark_dirty(0, len)` on the
//! [`GuestSlice`] they wrote through).
//!
//! [`Region::take_dirty`] returns, as a [`PageSet`], the pages of a region
//! written since the last take and clears them. KVM reports the guest's
//! own writes per memory slot in the same form (one bit per 4 KiB page),
//! so the two are OR-ed with [`PageSet::union`] or
//! [`PageSet::union_at`].
//!
//! Other crates name the bitmap only through the aliases here:
//! [`DirtyBitmap`] for the bitmap, [`GuestSlice`] for a slice of guest
//! memory that marks its writes in it.
//!
//! [`RamBlock::write`]: crate::RamBlock::write
//! [`Region::mark_dirty`]: crate::map::Region::mark_dirty
//! [`Region::take_dirty`]: crate::map::Region::take_dirty

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BS;

use crate::block_state::{BlockBitmap, Runs};

/// The dirty bitmap of a guest RAM mapping: one bit per [`DIRTY_PAGE_SIZE`]
/// page, set by every write `vm-memory` makes through it.
pub type DirtyBitmap = vm_memory::bitmap::AtomicBitmap;

/// A slice of guest memory whose writes mark their pages in the mapping's
/// [`DirtyBitmap`] (what [`Region::slice`](crate::map::Region::slice)
/// returns).
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, DirtyBitmap>>;

/// The page size dirty pages are tracked in: 4 KiB, KVM's dirty-log page
/// size on x86, also for memory backed by huge pages.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// A set of pages of one range of guest memory: bit `i` is the page at
/// byte offset `i * 4 KiB` from the range's start.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PageSet {
    bits: BlockBitmap,
}

impl std::fmt::Debug for PageSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSet")
            .field("pages", &self.pages())
            .field("runs", &self.runs().collect::<Vec<_>>())
            .finish()
    }
}

impl PageSet {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            bits: BlockBitmap::new(to_usize(pages)),
        }
    }

    /// An empty set over the pages of `bytes` bytes (a partial last page
    /// counts as a page).
    pub fn for_bytes(bytes: u64) -> Self {
        Self::new(bytes.div_ceil(DIRTY_PAGE_SIZE))
    }

    /// A set over `pages` pages from bitmap words, least significant bit
    /// first (the layout of `KVM_GET_DIRTY_LOG` and of
    /// [`AtomicBitmap::get_and_reset`](vm_memory::bitmap::AtomicBitmap::get_and_reset)).
    /// Missing words are zero; words and bits past `pages` are ignored.
    pub fn from_words(words: &[u64], pages: u64) -> Self {
        let mut set = Self::new(pages);
        set.bits.or_words(0, words);
        set
    }

    /// Number of pages the set ranges over (its capacity, not its size).
    pub fn pages(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// True if no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.bits.words().iter().all(|&w| w == 0)
    }

    /// True if page `page` is in the set (false past its end).
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages() && self.bits.get(page as usize)
    }

    /// Adds pages `[first, first + count)`. Panics if they are not all
    /// inside the set's range.
    pub fn insert(&mut self, first: u64, count: u64) {
        self.bits.set_range(to_usize(first), to_usize(count));
    }

    /// Adds the pages touched by bytes `[offset, offset + len)`. Panics if
    /// they are not all inside the set's range.
    pub fn insert_bytes(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_PAGE_SIZE;
        let last = (offset + len - 1) / DIRTY_PAGE_SIZE;
        self.insert(first, last - first + 1);
    }

    /// The pages in the set, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(first, count)| first..first + count)
    }

    /// The maximal runs of pages in the set, as `(first_page, page_count)`
    /// in ascending order.
    pub fn runs(&self) -> PageRuns<'_> {
        PageRuns {
            inner: self.bits.runs(0, self.bits.len(), true),
        }
    }

    /// Adds every page of `other`, which must range over as many pages.
    ///
    /// # Panics
    ///
    /// If the two sets range over different page counts.
    pub fn union(&mut self, other: &PageSet) {
        assert_eq!(
            self.pages(),
            other.pages(),
            "union of page sets over {} and {} pages",
            self.pages(),
            other.pages()
        );
        self.bits.or_words(0, other.bits.words());
    }

    /// Adds every page of `other`, whose page 0 is page `at` of this set
    /// (a KVM slot's dirty log placed at the slot's offset in its region).
    ///
    /// # Panics
    ///
    /// If `other` does not fit at `at`.
    pub fn union_at(&mut self, at: u64, other: &PageSet) {
        let end = at.checked_add(other.pages());
        assert!(
            end.is_some_and(|end| end <= self.pages()),
            "page set of {} pages does not fit at page {at} of {}",
            other.pages(),
            self.pages()
        );
        if at % 64 == 0 {
            self.bits.or_words(to_usize(at / 64), other.bits.words());
        } else {
            for (first, count) in other.runs() {
                self.insert(at + first, count);
            }
        }
    }

    /// The set's words, least significant bit first; bits past
    /// [`pages`](Self::pages) are zero.
    pub fn words(&self) -> &[u64] {
        self.bits.words()
    }
}

/// Iterator over the runs of a [`PageSet`]; see [`PageSet::runs`].
#[derive(Debug, Clone)]
pub struct PageRuns<'a> {
    inner: Runs<'a>,
}

impl Iterator for PageRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        self.inner.next().map(|(first, count)| (first as u64, count as u64))
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a page count of guest memory fits usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_insert_iterate_and_unite() {
        let mut a = PageSet::new(200);
        assert!(a.is_empty());
        assert_eq!((a.pages(), a.len()), (200, 0));
        a.insert(3, 2);
        a.insert_bytes(100 * 4096 + 4095, 2); // pages 100 and 101
        a.insert_bytes(199 * 4096, 0);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 4, 100, 101]);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(3, 2), (100, 2)]);
        assert_eq!(a.len(), 4);
        assert!(a.contains(100) && !a.contains(5) && !a.contains(1000));

        let mut b = PageSet::new(200);
        b.insert(5, 1);
        b.insert(199, 1);
        a.union(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(3, 3), (100, 2), (199, 1)]);

        // A slot's log placed inside a region, word-aligned or not.
        let slot = PageSet::from_words(&[0b1011, !0], 66);
        assert_eq!(slot.runs().collect::<Vec<_>>(), vec![(0, 2), (3, 1), (64, 2)]);
        let mut region = PageSet::new(300);
        region.union_at(128, &slot);
        region.union_at(7, &slot);
        assert_eq!(
            region.runs().collect::<Vec<_>>(),
            vec![(7, 2), (10, 1), (71, 2), (128, 2), (131, 1), (192, 2)]
        );
        assert_eq!(PageSet::for_bytes(4097).pages(), 2);
        assert_eq!(
            format!("{:?}", PageSet::from_words(&[0b110], 3)),
            "PageSet { pages: 3, runs: [(1, 2)] }"
        );
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn union_at_past_the_end_panics() {
        PageSet::new(64).union_at(1, &PageSet::new(64));
    }

    #[test]
    #[should_panic(expected = "union of page sets")]
    fn union_of_different_sizes_panics() {
        PageSet::new(64).union(&PageSet::new(65));
    }
}
