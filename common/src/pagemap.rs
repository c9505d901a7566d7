//! A page map: one atomic bit per page and a count of set bits, shared between threads.
//!
//! faultd uses one for "done" (present, or removed by the VMM and never to be fetched);
//! pagesrv uses one for "sent". Memory is `pages / 8` bytes, never a copy of guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

/// One atomic bit per page.
#[derive(Debug)]
pub struct PageMap {
    words: Box<[AtomicU64]>,
    total_pages: u64,
    set_pages: AtomicU64,
}

impl PageMap {
    /// A map of `total_pages` clear bits.
    pub fn new(total_pages: u64) -> Self {
        let words = (0..total_pages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        PageMap {
            words,
            total_pages,
            set_pages: AtomicU64::new(0),
        }
    }

    /// A map of `total_pages` clear bits, or an error instead of an abort when the memory
    /// cannot be had (the size comes from a peer).
    ///
    /// # Errors
    /// The allocation failed.
    pub fn try_new(total_pages: u64) -> Result<Self, std::collections::TryReserveError> {
        let n_words = usize::try_from(total_pages.div_ceil(64)).unwrap_or(usize::MAX);
        let mut words = Vec::new();
        words.try_reserve_exact(n_words)?;
        words.extend((0..n_words).map(|_| AtomicU64::new(0)));
        Ok(PageMap {
            words: words.into_boxed_slice(),
            total_pages,
            set_pages: AtomicU64::new(0),
        })
    }

    /// Pages covered by the map.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Pages whose bit is set.
    pub fn set_pages(&self) -> u64 {
        self.set_pages.load(Ordering::Acquire)
    }

    /// True once every bit is set.
    pub fn is_full(&self) -> bool {
        self.set_pages() == self.total_pages
    }

    /// Whether `page`'s bit is set. Pages past the end read as set.
    pub fn is_set(&self, page: u64) -> bool {
        if page >= self.total_pages {
            return true;
        }
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Sets `page`'s bit; true if this call set it.
    pub fn set(&self, page: u64) -> bool {
        self.set_range(page, 1) == 1
    }

    /// Sets the bits of `first..first+count` (clipped to the map); returns how many this call
    /// set.
    pub fn set_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.total_pages);
        let mut page = first;
        let mut newly = 0;
        while page < end {
            let word = page / 64;
            let lo = page % 64;
            let hi = (end - word * 64).min(64);
            let mask = mask_bits(lo, hi);
            let old = self.words[word as usize].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((mask & !old).count_ones());
            page = (word + 1) * 64;
        }
        self.set_pages.fetch_add(newly, Ordering::AcqRel);
        newly
    }

    /// Clears the bits of `first..first+count` (clipped to the map); returns how many this
    /// call cleared.
    pub fn clear_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.total_pages);
        let mut page = first;
        let mut cleared = 0;
        while page < end {
            let word = page / 64;
            let lo = page % 64;
            let hi = (end - word * 64).min(64);
            let mask = mask_bits(lo, hi);
            let old = self.words[word as usize].fetch_and(!mask, Ordering::AcqRel);
            cleared += u64::from((mask & old).count_ones());
            page = (word + 1) * 64;
        }
        self.set_pages.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// Calls `f(first, count)` for every run of pages a bitmap (as [`PageMap::bitmap`] makes
    /// it, for pages `first..`) names.
    pub fn bitmap_runs(first: u64, bitmap: &[u8], mut f: impl FnMut(u64, u64)) {
        let count = bitmap.len() as u64 * 8;
        let mut run_start: Option<u64> = None;
        let mut i = 0;
        while i < count {
            // Skip 64 or 8 bits at a time where nothing changes (a guest's maps are mostly
            // all clear or all set): what makes a 4 GiB bitmap take microseconds.
            let at = (i / 8) as usize;
            let same = if run_start.is_some() { u8::MAX } else { 0 };
            if i % 64 == 0
                && at + 8 <= bitmap.len()
                && bitmap[at..at + 8].iter().all(|&b| b == same)
            {
                i += 64;
                continue;
            }
            if i % 8 == 0 && bitmap[at] == same {
                i += 8;
                continue;
            }
            let set = bitmap[at] & (1 << (i % 8)) != 0;
            match (set, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(start)) => {
                    f(first + start, i - start);
                    run_start = None;
                }
                _ => {}
            }
            i += 1;
        }
        if let Some(start) = run_start {
            f(first + start, count - start);
        }
    }

    /// The first clear page at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut page = from;
        while page < self.total_pages {
            let word = page / 64;
            let bits =
                !self.words[word as usize].load(Ordering::Acquire) & mask_bits(page % 64, 64);
            if bits != 0 {
                let found = word * 64 + u64::from(bits.trailing_zeros());
                return (found < self.total_pages).then_some(found);
            }
            page = (word + 1) * 64;
        }
        None
    }

    /// Length of the run of clear pages starting at `first`, at most `max_pages`.
    pub fn clear_run(&self, first: u64, max_pages: u64) -> u64 {
        let end = first.saturating_add(max_pages).min(self.total_pages);
        let mut page = first;
        while page < end {
            let word = page / 64;
            let bits = self.words[word as usize].load(Ordering::Acquire) & mask_bits(page % 64, 64);
            if bits != 0 {
                let set_at = word * 64 + u64::from(bits.trailing_zeros());
                return set_at.min(end) - first;
            }
            page = (word + 1) * 64;
        }
        end.saturating_sub(first)
    }

    /// Length of the run of set pages starting at `first`, at most `max_pages`.
    pub fn set_run(&self, first: u64, max_pages: u64) -> u64 {
        let end = first.saturating_add(max_pages).min(self.total_pages);
        let mut page = first;
        while page < end {
            let word = page / 64;
            let bits =
                !self.words[word as usize].load(Ordering::Acquire) & mask_bits(page % 64, 64);
            if bits != 0 {
                let clear_at = word * 64 + u64::from(bits.trailing_zeros());
                return clear_at.min(end) - first;
            }
            page = (word + 1) * 64;
        }
        end.saturating_sub(first)
    }

    /// The bits of pages `first..first+count` (clipped to the map), bit `i % 8` of byte
    /// `i / 8` for page `first + i`.
    pub fn bitmap(&self, first: u64, count: u64) -> Vec<u8> {
        let end = first.saturating_add(count).min(self.total_pages);
        let pages = end.saturating_sub(first);
        let mut out = vec![0u8; pages.div_ceil(8) as usize];
        if first.is_multiple_of(64) {
            // Word-aligned: the map's words are the bitmap's bytes, little-endian.
            let word0 = (first / 64) as usize;
            for (i, bytes) in out.chunks_mut(8).enumerate() {
                let word = self.words[word0 + i].load(Ordering::Acquire);
                bytes.copy_from_slice(&word.to_le_bytes()[..bytes.len()]);
            }
            if let (tail @ 1.., Some(last)) = (pages % 8, out.last_mut()) {
                *last &= (1u8 << tail) - 1;
            }
            return out;
        }
        let mut page = first;
        while page < end {
            let run = self.set_run(page, end - page);
            for p in page..page + run {
                let i = p - first;
                out[(i / 8) as usize] |= 1 << (i % 8);
            }
            page += run;
            page += self.clear_run(page, end - page);
        }
        out
    }

    /// Sets the bits of the pages a bitmap (as [`PageMap::bitmap`] makes it) names, for pages
    /// `first..first+count`; returns how many this call set.
    pub fn set_from_bitmap(&self, first: u64, count: u64, bitmap: &[u8]) -> u64 {
        let bytes = (count.div_ceil(8) as usize).min(bitmap.len());
        let end = first.saturating_add(count);
        let mut newly = 0;
        Self::bitmap_runs(first, &bitmap[..bytes], |page, n| {
            newly += self.set_range(page, n.min(end.saturating_sub(page)));
        });
        newly
    }

    /// Runs of clear pages within `first..first+count`, as `(first, pages)`.
    pub fn clear_runs(&self, first: u64, count: u64) -> Vec<(u64, u64)> {
        let end = first.saturating_add(count).min(self.total_pages);
        let mut runs = Vec::new();
        let mut page = first;
        while let Some(start) = self.next_clear(page).filter(|&p| p < end) {
            let n = self.clear_run(start, end - start);
            runs.push((start, n));
            page = start + n;
        }
        runs
    }
}

fn mask_bits(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn test_set_counts_only_new_bits() {
        let m = PageMap::new(130);
        assert_eq!(m.set_range(60, 10), 10);
        assert_eq!(m.set_range(65, 10), 5);
        assert!(m.set(0));
        assert!(!m.set(0));
        assert_eq!(m.set_pages(), 16);
        assert_eq!(m.set_range(120, 100), 10);
        assert!(m.is_set(129) && m.is_set(500));
        assert!(!m.is_full());
        m.set_range(0, 130);
        assert!(m.is_full());
        assert_eq!(m.next_clear(0), None);
    }

    #[test]
    fn test_concurrent_setters_count_each_page_once() {
        let m = std::sync::Arc::new(PageMap::new(10_000));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .step_by(7)
                        .map(|p| m.set_range(p + t, 3))
                        .sum::<u64>()
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, m.set_pages());
    }

    proptest! {
        #[test]
        fn prop_matches_a_set_model(total in 1u64..300, ops in proptest::collection::vec((0u64..320, 1u64..80), 0..20), probe in 0u64..300) {
            let m = PageMap::new(total);
            let mut model = BTreeSet::new();
            for (first, count) in ops {
                let before = model.len();
                for p in first..(first + count).min(total) { model.insert(p); }
                prop_assert_eq!(m.set_range(first, count), (model.len() - before) as u64);
            }
            prop_assert_eq!(m.set_pages(), model.len() as u64);
            let expect_set_run = (probe..total).take_while(|p| model.contains(p)).count() as u64;
            prop_assert_eq!(m.set_run(probe, u64::MAX), expect_set_run);
            let expect_next = (probe..total).find(|p| !model.contains(p));
            prop_assert_eq!(m.next_clear(probe), expect_next);
            let bits = m.bitmap(probe, total);
            for (i, p) in (probe..total).enumerate() {
                prop_assert_eq!(bits[i / 8] & (1 << (i % 8)) != 0, model.contains(&p));
            }
            let copy = PageMap::try_new(total).unwrap();
            let ones: u64 = bits.iter().map(|b| u64::from(b.count_ones())).sum();
            prop_assert_eq!(copy.set_from_bitmap(probe, total, &bits), ones);
            for p in probe..total {
                prop_assert_eq!(copy.is_set(p), model.contains(&p));
            }
            let cleared = copy.clear_range(probe, total);
            prop_assert_eq!(cleared, ones);
            prop_assert_eq!(copy.set_pages(), 0);
            let mut from_bitmap = BTreeSet::new();
            let mut last_end = None;
            PageMap::bitmap_runs(probe, &bits, |f, n| {
                assert!(n > 0 && last_end.is_none_or(|e| e < f), "runs are maximal and ordered");
                last_end = Some(f + n);
                from_bitmap.extend(f..f + n);
            });
            let expect: BTreeSet<u64> = model.iter().copied().filter(|&p| p >= probe).collect();
            prop_assert_eq!(from_bitmap, expect);
            let aligned = m.bitmap(0, total);
            for p in 0..total {
                let i = p as usize;
                prop_assert_eq!(aligned[i / 8] & (1 << (i % 8)) != 0, model.contains(&p));
            }
            let runs = m.clear_runs(0, total);
            let from_runs: BTreeSet<u64> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
            let clear: BTreeSet<u64> = (0..total).filter(|p| !model.contains(p)).collect();
            prop_assert_eq!(from_runs, clear);
        }
    }
}
