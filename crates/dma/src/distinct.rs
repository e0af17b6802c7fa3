//! Distinct pinned bytes: several devices behind a vIOMMU that map the same
//! guest page each pin it, and the kernel accounts every pin (so libvirt
//! sets `RLIMIT_MEMLOCK` to N × guest memory for N such devices). The pin
//! budget counts each page once instead: [`RangeCounts`] keeps how many
//! live pins cover each byte of host memory, and how many bytes are covered
//! at least once.

use std::collections::BTreeMap;

/// Reference counts of host memory ranges: ranges are added and removed
/// (overlapping, repeated, split differently, in any order), and
/// [`covered`](Self::covered) is the bytes at least one live range covers.
///
/// ```
/// use memvisor_dma::distinct::RangeCounts;
///
/// let mut c = RangeCounts::default();
/// assert_eq!(c.add(0x1000, 0x2000), 0x2000);
/// // The same pages again (another device): nothing new is covered.
/// assert_eq!(c.add(0x2000, 0x1000), 0);
/// assert_eq!(c.covered(), 0x2000);
/// assert_eq!(c.remove(0x1000, 0x2000), 0x1000, "0x2000.. is still pinned once");
/// assert_eq!(c.remove(0x2000, 0x1000), 0x1000);
/// assert_eq!(c.covered(), 0);
/// ```
#[derive(Debug, Default, Clone)]
pub struct RangeCounts {
    /// Disjoint runs: start → (end, count ≥ 1).
    runs: BTreeMap<u64, (u64, u64)>,
    covered: u64,
}

impl RangeCounts {
    /// Bytes covered at least once.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Bytes of `[start, start + len)` no live range covers: what
    /// [`add`](Self::add) of it would newly cover.
    pub fn uncovered_in(&self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        let mut covered = 0;
        // The run that may start before `start` and reach into the range.
        if let Some((_, &(e, _))) = self.runs.range(..start).next_back() {
            covered += e.min(end).saturating_sub(start);
        }
        for (&s, &(e, _)) in self.runs.range(start..end) {
            covered += e.min(end) - s;
        }
        len - covered.min(len)
    }

    /// Adds one reference to every byte of `[start, start + len)`; returns
    /// the bytes it newly covers.
    pub fn add(&mut self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        if start >= end {
            return 0;
        }
        // The common case: the exact range of a live run (a second device
        // mapping the same page).
        if let Some((e, count)) = self.runs.get_mut(&start)
            && *e == end
        {
            *count += 1;
            return 0;
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        let mut at = start;
        let mut new = 0;
        for s in inside {
            if s > at {
                self.runs.insert(at, (s, 1));
                new += s - at;
            }
            let run = self.runs.get_mut(&s).expect("listed above");
            run.1 += 1;
            at = run.0;
        }
        if at < end {
            self.runs.insert(at, (end, 1));
            new += end - at;
        }
        self.covered += new;
        new
    }

    /// Drops one reference from every byte of `[start, start + len)` (bytes
    /// with none are left alone); returns the bytes no longer covered.
    pub fn remove(&mut self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        if start >= end {
            return 0;
        }
        if let Some(&(e, count)) = self.runs.get(&start)
            && e == end
        {
            if count > 1 {
                self.runs.insert(start, (e, count - 1));
                return 0;
            }
            self.runs.remove(&start);
            self.covered -= len;
            return len;
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<(u64, (u64, u64))> = self.runs.range(start..end).map(|(&s, &r)| (s, r)).collect();
        let mut freed = 0;
        for (s, (e, count)) in inside {
            if count > 1 {
                self.runs.insert(s, (e, count - 1));
            } else {
                self.runs.remove(&s);
                freed += e - s;
            }
        }
        self.covered -= freed;
        freed
    }

    /// Splits the run containing `at` (strictly inside it) in two.
    fn split_at(&mut self, at: u64) {
        if let Some((&s, &(e, count))) = self.runs.range(..at).next_back()
            && e > at
        {
            self.runs.insert(s, (at, count));
            self.runs.insert(at, (e, count));
        }
    }

    /// Live runs (for tests and debugging).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Per-page model: `pages[i]` references of page `i`.
    fn covered(pages: &[u32]) -> u64 {
        pages.iter().filter(|&&n| n > 0).count() as u64 * 4096
    }

    proptest! {
        /// Any sequence of adds and of removes of earlier adds agrees with
        /// a page-by-page count, and everything removed leaves nothing.
        #[test]
        fn agrees_with_counting_page_by_page(
            ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>(), any::<prop::sample::Index>()), 1..64)
        ) {
            let mut c = RangeCounts::default();
            let mut pages = vec![0u32; 80];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (first, n, add, pick) in ops {
                if add || live.is_empty() {
                    let before = covered(&pages);
                    prop_assert_eq!(c.uncovered_in(first * 4096, n * 4096), {
                        (first..first + n).filter(|&p| pages[p as usize] == 0).count() as u64 * 4096
                    });
                    let new = c.add(first * 4096, n * 4096);
                    for p in first..first + n {
                        pages[p as usize] += 1;
                    }
                    prop_assert_eq!(new, covered(&pages) - before);
                    live.push((first, n));
                } else {
                    let (first, n) = live.swap_remove(pick.index(live.len()));
                    let before = covered(&pages);
                    let freed = c.remove(first * 4096, n * 4096);
                    for p in first..first + n {
                        pages[p as usize] -= 1;
                    }
                    prop_assert_eq!(freed, before - covered(&pages));
                }
                prop_assert_eq!(c.covered(), covered(&pages));
            }
            for (first, n) in live {
                c.remove(first * 4096, n * 4096);
            }
            prop_assert_eq!((c.covered(), c.runs()), (0, 0));
        }
    }
}
