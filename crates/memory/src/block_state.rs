//! The block-state core: one bit per granule, scanned a 64-bit word at a time.
//!
//! [`BlockBitmap`] is the storage behind every [`RamDiscardManager`]
//! implementation in memvisor (see [`crate::discard::BlockDiscardManager`]):
//! bit `i` set means granule `i` is populated. All range operations work on
//! whole words where they can, and run iteration finds run boundaries with
//! `trailing_zeros`, so walking a 1 TiB region of 2 MiB blocks (8192 words)
//! costs a few microseconds.
//!
//! [`RamDiscardManager`]: crate::discard::RamDiscardManager

const WORD_BITS: usize = 64;

/// A fixed-size bitmap with word-at-a-time range operations.
///
/// Bits past `len` in the last word are always zero; every operation keeps
/// that invariant, so whole-word scans never see phantom bits.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BlockBitmap {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for BlockBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBitmap")
            .field("len", &self.len)
            .field("set", &self.count_ones())
            .finish()
    }
}

/// Mask of bits `[lo, hi)` inside one word; `hi <= 64`.
#[inline]
fn mask(lo: usize, hi: usize) -> u64 {
    debug_assert!(lo <= hi && hi <= WORD_BITS);
    if hi - lo == WORD_BITS {
        !0
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

/// True if every word equals `fill`. Eight words are folded per step with
/// no branch between them, which the compiler turns into vector
/// instructions; an early exit per word would prevent that.
#[inline]
fn words_equal(words: &[u64], fill: u64) -> bool {
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        if chunk.iter().fold(0, |acc, &w| acc | (w ^ fill)) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&w| w == fill)
}

impl BlockBitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(WORD_BITS)],
            len,
        }
    }

    /// Rebuilds a bitmap from the words [`BlockBitmap::words`] returned.
    ///
    /// Returns `None` if `words` does not have exactly `len.div_ceil(64)`
    /// entries or has a bit set at or past `len`, so that a corrupt
    /// migration stream cannot smuggle in phantom blocks.
    pub fn from_words(words: Vec<u64>, len: usize) -> Option<Self> {
        if words.len() != len.div_ceil(WORD_BITS) {
            return None;
        }
        let tail = len % WORD_BITS;
        if tail != 0 && words.last().is_some_and(|w| w & !mask(0, tail) != 0) {
            return None;
        }
        Some(Self { words, len })
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing words, least significant bit first.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The value of bit `index`. Panics if `index >= len()`.
    #[inline]
    pub fn get(&self, index: usize) -> bool {
        assert!(index < self.len, "bit {index} out of range {}", self.len);
        self.words[index / WORD_BITS] >> (index % WORD_BITS) & 1 == 1
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Calls `f(word_index, lo, hi)` for every word touched by `[start, end)`,
    /// with `[lo, hi)` the bits of that word inside the range.
    #[inline]
    fn for_each_word(start: usize, end: usize, mut f: impl FnMut(usize, usize, usize) -> bool) {
        let mut bit = start;
        while bit < end {
            let word = bit / WORD_BITS;
            let lo = bit % WORD_BITS;
            let hi = (end - word * WORD_BITS).min(WORD_BITS);
            if !f(word, lo, hi) {
                return;
            }
            bit = (word + 1) * WORD_BITS;
        }
    }

    fn check(&self, start: usize, count: usize) -> usize {
        let end = start
            .checked_add(count)
            .unwrap_or_else(|| panic!("bit range {start}+{count} overflows"));
        assert!(end <= self.len, "bit range [{start}, {end}) past length {}", self.len);
        end
    }

    /// Sets bits `[start, start + count)`. Panics if the range leaves the bitmap.
    pub fn set_range(&mut self, start: usize, count: usize) {
        let end = self.check(start, count);
        Self::for_each_word(start, end, |w, lo, hi| {
            self.words[w] |= mask(lo, hi);
            true
        });
    }

    /// Clears bits `[start, start + count)`. Panics if the range leaves the bitmap.
    pub fn clear_range(&mut self, start: usize, count: usize) {
        let end = self.check(start, count);
        Self::for_each_word(start, end, |w, lo, hi| {
            self.words[w] &= !mask(lo, hi);
            true
        });
    }

    /// ORs `words` into the bitmap from word `at` on; words and bits past
    /// the end are dropped, so no phantom bit appears.
    pub(crate) fn or_words(&mut self, at: usize, words: &[u64]) {
        let Some(dst) = self.words.get_mut(at..) else {
            return;
        };
        for (d, s) in dst.iter_mut().zip(words) {
            *d |= s;
        }
        let tail = self.len % WORD_BITS;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= mask(0, tail);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// True if every bit of `[start, start + count)` is set (vacuously true
    /// for `count == 0`). Panics if the range leaves the bitmap.
    #[inline]
    pub fn all_set(&self, start: usize, count: usize) -> bool {
        let end = self.check(start, count);
        self.all_equal(start, end, !0)
    }

    /// True if every bit of `[start, start + count)` is clear (vacuously
    /// true for `count == 0`). Panics if the range leaves the bitmap.
    #[inline]
    pub fn all_clear(&self, start: usize, count: usize) -> bool {
        let end = self.check(start, count);
        self.all_equal(start, end, 0)
    }

    /// True if every bit of `[start, end)` equals the bits of `fill`
    /// (all ones or all zeros): the partial words at either end are
    /// masked, the whole words between them compared directly — the same
    /// loop a hand-written scan would run.
    #[inline]
    fn all_equal(&self, start: usize, end: usize, fill: u64) -> bool {
        if start >= end {
            return true;
        }
        let (first, last) = (start / WORD_BITS, (end - 1) / WORD_BITS);
        let edge = |w: usize, lo: usize, hi: usize| {
            let m = mask(lo, hi);
            self.words[w] & m == fill & m
        };
        if first == last {
            return edge(first, start % WORD_BITS, (end - 1) % WORD_BITS + 1);
        }
        edge(first, start % WORD_BITS, WORD_BITS)
            && edge(last, 0, (end - 1) % WORD_BITS + 1)
            && words_equal(&self.words[first + 1..last], fill)
    }

    /// Number of set bits in `[start, start + count)`.
    pub fn count_ones_in(&self, start: usize, count: usize) -> usize {
        let end = self.check(start, count);
        let mut n = 0;
        Self::for_each_word(start, end, |w, lo, hi| {
            n += (self.words[w] & mask(lo, hi)).count_ones() as usize;
            true
        });
        n
    }

    /// Index of the first bit at or after `from` and before `end` whose value
    /// is `value`, or `end` if there is none.
    #[inline]
    fn find(&self, from: usize, end: usize, value: bool) -> usize {
        let flip = if value { 0 } else { !0 };
        let mut bit = from;
        while bit < end {
            let w = bit / WORD_BITS;
            let word = (self.words[w] ^ flip) & (!0u64 << (bit % WORD_BITS));
            if word != 0 {
                return (w * WORD_BITS + word.trailing_zeros() as usize).min(end);
            }
            bit = (w + 1) * WORD_BITS;
        }
        end
    }

    /// Maximal runs of bits equal to `value` inside `[start, start + count)`,
    /// as `(first_bit, bit_count)` pairs in ascending order, clipped to the
    /// range. Panics if the range leaves the bitmap.
    pub fn runs(&self, start: usize, count: usize, value: bool) -> Runs<'_> {
        let end = self.check(start, count);
        Runs {
            bitmap: self,
            pos: start,
            end,
            value,
        }
    }
}

/// Iterator over maximal runs of equal bits; see [`BlockBitmap::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bitmap: &'a BlockBitmap,
    pos: usize,
    end: usize,
    value: bool,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize);

    #[inline]
    fn next(&mut self) -> Option<(usize, usize)> {
        let first = self.bitmap.find(self.pos, self.end, self.value);
        if first >= self.end {
            self.pos = self.end;
            return None;
        }
        let last = self.bitmap.find(first, self.end, !self.value);
        self.pos = last;
        Some((first, last - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_runs(bits: &[bool], start: usize, count: usize, value: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = start;
        while i < start + count {
            if bits[i] == value {
                let s = i;
                while i < start + count && bits[i] == value {
                    i += 1;
                }
                out.push((s, i - s));
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn ranges_across_word_boundaries() {
        let mut b = BlockBitmap::new(200);
        b.set_range(60, 70);
        assert_eq!(b.count_ones(), 70);
        assert!(b.all_set(60, 70));
        assert!(!b.all_set(59, 2));
        assert!(b.all_clear(0, 60));
        assert!(b.all_clear(130, 70));
        assert_eq!(b.count_ones_in(100, 100), 30);
        assert_eq!(b.runs(0, 200, true).collect::<Vec<_>>(), vec![(60, 70)]);
        assert_eq!(b.runs(70, 10, true).collect::<Vec<_>>(), vec![(70, 10)]);
        assert_eq!(b.runs(0, 200, false).collect::<Vec<_>>(), vec![(0, 60), (130, 70)]);
        b.clear_range(64, 64);
        assert_eq!(b.runs(0, 200, true).collect::<Vec<_>>(), vec![(60, 4), (128, 2)]);
    }

    #[test]
    fn full_words_and_empty_ranges() {
        let mut b = BlockBitmap::new(128);
        b.set_range(0, 128);
        assert_eq!(b.words(), &[!0, !0]);
        assert!(b.all_set(0, 128));
        assert!(b.all_set(5, 0));
        assert!(b.all_clear(5, 0));
        assert_eq!(b.runs(3, 0, true).count(), 0);
        b.clear_all();
        assert_eq!(b.count_ones(), 0);
    }

    #[test]
    fn from_words_rejects_phantom_bits() {
        assert!(BlockBitmap::from_words(vec![0b111], 3).is_some());
        assert!(BlockBitmap::from_words(vec![0b1000], 3).is_none());
        assert!(BlockBitmap::from_words(vec![0, 0], 64).is_none());
        assert!(BlockBitmap::from_words(vec![], 1).is_none());
        assert!(BlockBitmap::from_words(vec![!0], 64).is_some());
    }

    #[test]
    #[should_panic(expected = "past length")]
    fn out_of_range_panics() {
        BlockBitmap::new(10).set_range(5, 6);
    }

    proptest! {
        #[test]
        fn matches_naive_model(
            len in 1usize..1400,
            ops in prop::collection::vec((any::<bool>(), 0usize..1400, 0usize..1400), 0..20),
            q in (0usize..1400, 0usize..1400),
        ) {
            let mut b = BlockBitmap::new(len);
            let mut model = vec![false; len];
            for (set, s, c) in ops {
                let s = s % len;
                let c = c.min(len - s);
                if set { b.set_range(s, c) } else { b.clear_range(s, c) }
                model[s..s + c].iter_mut().for_each(|x| *x = set);
            }
            let s = q.0 % len;
            let c = q.1.min(len - s);
            prop_assert_eq!(b.all_set(s, c), model[s..s + c].iter().all(|&x| x));
            prop_assert_eq!(b.all_clear(s, c), model[s..s + c].iter().all(|&x| !x));
            prop_assert_eq!(b.count_ones_in(s, c), model[s..s + c].iter().filter(|&&x| x).count());
            for v in [true, false] {
                prop_assert_eq!(b.runs(s, c, v).collect::<Vec<_>>(), naive_runs(&model, s, c, v));
            }
            let rebuilt = BlockBitmap::from_words(b.words().to_vec(), len).unwrap();
            prop_assert_eq!(rebuilt, b);
        }
    }
}
