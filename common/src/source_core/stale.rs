//! Which pages a destination may hold at a version older than the source's while the source
//! guest still runs (precopy), across sessions: the guest's writes since a page was sent,
//! discards a cut link may have lost, and what was stale when the switch was decided.
//! pagesrv's precopy engine keeps one; the destination's simulation drives the same rules.
//!
//! ```text
//!  written (dirty bitmap) ─► pending ─discard (pending ∧ sent)─► unsent, unconfirmed
//!  sending a page ─► not pending          a Synced ─► nothing unconfirmed
//!  a new session ─► unconfirmed are pending again (its discards may not have arrived)
//!  the switch ─► pending becomes stale at the switch (dropped on every link that missed it)
//! ```

use crate::pagemap::PageMap;
use crate::wire::MAX_PAYLOAD_BYTES;

/// Which stale pages a discard drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Written since they were sent (and not sent again), or dropped by an unconfirmed
    /// discard on a link since cut.
    Written,
    /// Stale when the source paused and the switch was decided.
    AtSwitch,
}

/// The stale-page maps of one migration (see the module docs).
#[derive(Debug)]
pub struct StaleMaps {
    pending: PageMap,
    unconfirmed: PageMap,
    at_switch: PageMap,
}

/// A discard to send: `Discard(first, count)` with this bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardFrame {
    /// The first page the bitmap covers.
    pub first: u64,
    /// Pages the bitmap covers.
    pub count: u64,
    /// One bit per page, set for the pages to drop.
    pub bitmap: Vec<u8>,
}

impl StaleMaps {
    /// Maps for a guest of `total_pages` pages, nothing stale.
    pub fn new(total_pages: u64) -> Self {
        StaleMaps {
            pending: PageMap::new(total_pages),
            unconfirmed: PageMap::new(total_pages),
            at_switch: PageMap::new(total_pages),
        }
    }

    /// Pages written since they were last sent.
    pub fn pending(&self) -> &PageMap {
        &self.pending
    }

    /// The guest wrote the pages of `bitmap` (whole guest, one bit per page); returns how
    /// many became pending.
    pub fn written(&self, bitmap: &[u8]) -> u64 {
        self.pending
            .set_from_bitmap(0, self.pending.total_pages(), bitmap)
    }

    /// The guest wrote these pages.
    pub fn written_range(&self, first: u64, count: u64) {
        self.pending.set_range(first, count);
    }

    /// These pages are about to be read and sent: a write after this is pending again.
    pub fn sending(&self, first: u64, count: u64) {
        self.pending.clear_range(first, count);
    }

    /// A new session begins: a discard its predecessor sent may never have arrived, so the
    /// destination may still hold those pages at an older version (they were sent again
    /// since, so they are no longer pending): they are pending again. Call it before the
    /// session's first `Sync` ([`StaleMaps::confirmed`] would clear them unsent). After the
    /// switch this can leave pages pending that the push never clears: a later session that
    /// missed the switch drops and resends them again (extra work, never a wrong drop: a
    /// destination whose guest runs gets no precopy, so no discard).
    pub fn session_begins(&self) {
        let total = self.unconfirmed.total_pages();
        let bitmap = self.unconfirmed.bitmap(0, total);
        self.pending.set_from_bitmap(0, total, &bitmap);
    }

    /// The destination answered a `Sync`: every discard before it was applied.
    pub fn confirmed(&self) {
        self.unconfirmed
            .clear_range(0, self.unconfirmed.total_pages());
    }

    /// The source paused before anything was sent (postcopy from a running source): its
    /// writes so far make nothing stale.
    pub fn nothing_sent_yet(&self) {
        self.pending.clear_range(0, self.pending.total_pages());
    }

    /// The source paused: what is pending is stale at the switch (and no longer pending).
    pub fn decide_switch(&self) {
        let total = self.pending.total_pages();
        let bitmap = self.pending.bitmap(0, total);
        self.at_switch.set_from_bitmap(0, total, &bitmap);
        self.pending.clear_range(0, total);
    }

    /// The pages that `which` names and the destination got (`sent`), to be patched in
    /// place rather than dropped (huge pages: their written pieces are sent); mark each one
    /// patched with [`StaleMaps::patched`], and drop the rest with [`StaleMaps::discards`].
    pub fn patches(&self, which: Stale, sent: &PageMap) -> Vec<u64> {
        let stale = self.map(which);
        let total = stale.total_pages();
        let mut bitmap = stale.bitmap(0, total);
        for (b, s) in bitmap.iter_mut().zip(sent.bitmap(0, total)) {
            *b &= s;
        }
        let mut pages = Vec::new();
        PageMap::bitmap_runs(0, &bitmap, |p, n| pages.extend(p..p + n));
        pages
    }

    /// A patch of `page` was sent: it is no longer stale as `which` says, and unconfirmed
    /// (a cut may lose the patch: the next session drops the page).
    pub fn patched(&self, which: Stale, page: u64) {
        self.map(which).clear_range(page, 1);
        self.unconfirmed.set_range(page, 1);
    }

    fn map(&self, which: Stale) -> &PageMap {
        match which {
            Stale::Written => &self.pending,
            Stale::AtSwitch => &self.at_switch,
        }
    }

    /// The discards that drop, at a destination that got the pages of `sent`, those `which`
    /// names: each frame's pages are marked unsent (they go again) and unconfirmed; in
    /// frames of at most a payload's bitmap. All are marked before the caller writes any: if
    /// a write fails the session ends, and a page marked but never dropped is only sent
    /// again (over-marking is the safe side).
    pub fn discards(&self, which: Stale, sent: &PageMap) -> Vec<DiscardFrame> {
        let stale = self.map(which);
        let total = stale.total_pages();
        let chunk = MAX_PAYLOAD_BYTES as u64 * 8;
        let mut frames = Vec::new();
        let mut first = 0;
        while first < total {
            let count = chunk.min(total - first);
            let mut bitmap = stale.bitmap(first, count);
            for (b, s) in bitmap.iter_mut().zip(sent.bitmap(first, count)) {
                *b &= s;
            }
            if bitmap.iter().any(|&b| b != 0) {
                PageMap::bitmap_runs(first, &bitmap, |p, n| {
                    sent.clear_range(p, n);
                    self.unconfirmed.set_range(p, n);
                });
                frames.push(DiscardFrame {
                    first,
                    count,
                    bitmap,
                });
            }
            first += count;
        }
        frames
    }
}

/// A bitmap of small pages (`per` to a large page) as a bitmap of `large_pages` large
/// pages: a large page is set when `any` (a write to any of its small pages dirties it) or
/// else when every one of its small pages is set (a huge page is free when all of it is).
/// Small pages past the end of `small` count as clear.
pub fn fold_bitmap(small: &[u8], per: u64, large_pages: u64, any: bool) -> Vec<u8> {
    let bit = |i: u64| {
        small
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    };
    let mut large = vec![0u8; large_pages.div_ceil(8) as usize];
    for page in 0..large_pages {
        let mut small_pages = (page * per..(page + 1) * per).map(bit);
        let set = if any {
            small_pages.any(|b| b)
        } else {
            small_pages.all(|b| b)
        };
        if set {
            large[(page / 8) as usize] |= 1 << (page % 8);
        }
    }
    large
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dropped(frames: &[DiscardFrame]) -> Vec<u64> {
        let mut pages = Vec::new();
        for f in frames {
            PageMap::bitmap_runs(f.first, &f.bitmap, |p, n| pages.extend(p..p + n));
        }
        pages
    }

    #[test]
    fn test_a_page_written_after_it_was_sent_is_dropped_and_sent_again() {
        let (maps, sent) = (StaleMaps::new(16), PageMap::new(16));
        maps.sending(0, 16);
        sent.set_range(0, 16);
        maps.written_range(3, 2);
        maps.written_range(9, 1);
        // Page 9 is sent again before the discard: only 3 and 4 are stale.
        maps.sending(9, 1);
        let frames = maps.discards(Stale::Written, &sent);
        assert_eq!(dropped(&frames), vec![3, 4]);
        assert!(!sent.is_set(3) && !sent.is_set(4) && sent.is_set(9));
        // Not sent: nothing to drop.
        assert!(maps.discards(Stale::Written, &sent).is_empty());
    }

    #[test]
    fn test_a_discard_lost_in_a_cut_is_made_again_on_the_next_session() {
        let maps = StaleMaps::new(16);
        let first = PageMap::new(16);
        first.set_range(0, 16);
        maps.written_range(5, 1);
        assert_eq!(dropped(&maps.discards(Stale::Written, &first)), vec![5]);
        // Sent again (no longer pending), then the link is cut before a Synced: the
        // destination may still hold the old page 5 and lists it as held.
        maps.sending(5, 1);
        let second = PageMap::new(16);
        second.set_range(0, 16);
        assert!(maps.discards(Stale::Written, &second).is_empty(), "the bug");
        maps.session_begins();
        assert_eq!(dropped(&maps.discards(Stale::Written, &second)), vec![5]);
        // Once confirmed, a new session drops nothing.
        maps.sending(5, 1);
        maps.confirmed();
        maps.session_begins();
        let third = PageMap::new(16);
        third.set_range(0, 16);
        assert!(maps.discards(Stale::Written, &third).is_empty());
    }

    #[test]
    fn test_the_switch_keeps_what_was_stale_for_every_link_that_missed_it() {
        let maps = StaleMaps::new(16);
        maps.written_range(7, 2);
        maps.decide_switch();
        assert_eq!(maps.pending().set_pages(), 0);
        for _ in 0..2 {
            let sent = PageMap::new(16);
            sent.set_range(0, 16);
            assert_eq!(dropped(&maps.discards(Stale::AtSwitch, &sent)), vec![7, 8]);
        }
    }

    #[test]
    fn test_folding_marks_a_huge_page_written_by_any_and_free_by_all_of_its_pages() {
        // 4 small pages to a large one; 3 large pages (12 small).
        // Small pages 0, 4..8 and 8 are set.
        let small = [0b1111_0001u8, 0b0000_0001];
        assert_eq!(fold_bitmap(&small, 4, 3, true), vec![0b111]);
        assert_eq!(fold_bitmap(&small, 4, 3, false), vec![0b010]);
        assert_eq!(fold_bitmap(&small, 1, 9, true), vec![0b1111_0001, 1]);
        assert_eq!(
            fold_bitmap(&[], 512, 2, true),
            vec![0],
            "a short bitmap is clear"
        );
    }

    #[test]
    fn test_patched_pages_stay_sent_and_a_new_session_drops_them_if_unconfirmed() {
        let maps = StaleMaps::new(16);
        let sent = PageMap::new(16);
        sent.set_range(0, 8);
        maps.written_range(2, 3); // 2, 3, 4: sent and written
        maps.written_range(12, 1); // never sent: not patched
        assert_eq!(maps.patches(Stale::Written, &sent), vec![2, 3, 4]);
        for page in [2, 3, 4] {
            maps.patched(Stale::Written, page);
        }
        assert_eq!(sent.set_pages(), 8, "patched pages stay at the destination");
        assert!(!maps.pending().is_set(3) && maps.pending().is_set(12));
        // The link is cut before a Sync: the next session drops them.
        maps.session_begins();
        assert!(maps.pending().is_set(3));
        maps.confirmed();
        maps.sending(2, 3);
        maps.session_begins();
        assert!(!maps.pending().is_set(3), "confirmed by a Sync");
    }
}
