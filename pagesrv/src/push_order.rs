//! What the background push sends next: plain data, no I/O.
//!
//! Order: a recorded working set in the order the guest first touched it (`--prefetch`),
//! then, after an urgent request for pages `p..q`, the pages from `q` on for a window
//! (pre-paging: guests touch neighbours next), then the background cursor through the file
//! (from page 0, or from where [`PushScheduler::start_at`] put it, wrapping around).
//! Pages already sent (or that the destination said it no longer needs) are skipped, so no
//! page is pushed twice.

use common::pagemap::PageMap;

use crate::prepage::{Plan, Prepager};

/// Chooses the next run of pages for the bulk connection.
#[derive(Debug)]
pub struct PushScheduler {
    cursor: u64,
    /// Pre-paging still to push after the last request (a downward plan is kept as the same
    /// pages upward: their order within a run does not matter); it shrinks as it is sent.
    prepage: Option<Plan>,
    prepager: Prepager,
    /// Pages to push first, in order (a recorded working set), and how far we are.
    prefetch: Vec<u64>,
    prefetched: usize,
    /// Pages claimed from the prefetch list (pushed in its order).
    prefetched_pages: u64,
}

impl PushScheduler {
    /// A scheduler that pre-pages as `prepager` decides after each request, and pushes
    /// `prefetch` (page indices) before the rest.
    pub fn new(prepager: Prepager, prefetch: Vec<u64>) -> Self {
        PushScheduler {
            cursor: 0,
            prepage: None,
            prepager,
            prefetch,
            prefetched: 0,
            prefetched_pages: 0,
        }
    }

    /// Whether pre-paging or the prefetch list has pages to offer (without the background
    /// push, the pusher is woken only then).
    pub fn has_prepaging(&self) -> bool {
        self.prepage.is_some() || self.prefetched < self.prefetch.len()
    }

    /// Pages pushed from the prefetch list so far.
    pub fn prefetched_pages(&self) -> u64 {
        self.prefetched_pages
    }

    /// The background cursor starts at `page` and wraps around at the end: restores of one
    /// template at once push different parts of it first, so clones that share what any of
    /// them placed on a host (faultd's shared guest RAM file) need each part sent once.
    pub fn start_at(&mut self, page: u64) {
        self.cursor = page;
    }

    /// The prefetch list (a recorded working set) starts `at` (0..1) of the way through it
    /// and wraps around: restores of one template sharing a guest RAM file on a host each
    /// push a different part of the set first (what the others placed they do not need).
    pub fn start_prefetch_at(&mut self, at: f64) {
        let len = self.prefetch.len();
        let first = ((at.clamp(0.0, 1.0) * len as f64) as usize).min(len);
        self.prefetch.rotate_left(first);
    }

    /// Starts over from the first page (a new precopy round).
    pub fn rewind(&mut self) {
        self.cursor = 0;
        self.prepage = None;
        self.prefetched = 0;
    }

    /// The next run of the prefetch list: its next unsent page and the unsent pages that
    /// follow it both in the list and in memory (at most `max_pages`).
    fn next_prefetched(&mut self, sent: &PageMap, max_pages: u64) -> Option<(u64, u64)> {
        while let Some(&first) = self.prefetch.get(self.prefetched) {
            self.prefetched += 1;
            if first >= sent.total_pages() || sent.is_set(first) {
                continue;
            }
            let mut count = 1;
            while count < max_pages
                && self.prefetch.get(self.prefetched) == Some(&(first + count))
                && !sent.is_set(first + count)
            {
                count += 1;
                self.prefetched += 1;
            }
            sent.set_range(first, count);
            self.prefetched_pages += count;
            return Some((first, count));
        }
        None
    }

    /// An urgent request for pages `first..end` arrived: pre-page after it, as the
    /// pre-pager decides (a new request replaces what is left of the last plan).
    pub fn on_request(&mut self, end: u64, total_pages: u64) {
        let Some(last) = end.checked_sub(1) else {
            return;
        };
        self.prepage = self.prepager.on_request(last).and_then(|plan| {
            let plan = match plan.stride {
                -1 => {
                    let end = (plan.first + 1).min(total_pages);
                    let first = end.saturating_sub(plan.count);
                    Plan {
                        first,
                        stride: 1,
                        count: end - first,
                    }
                }
                _ => plan,
            };
            (plan.count > 0 && plan.first < total_pages).then_some(plan)
        });
    }

    /// The next run of the pre-paging plan: unsent pages in a row (stride 1, at most
    /// `max_pages`), or the plan's next unsent page (other strides).
    fn next_prepage(&mut self, sent: &PageMap, max_pages: u64) -> Option<(u64, u64)> {
        let total = sent.total_pages();
        while let Some(plan) = self.prepage.as_mut() {
            // The plan ends at the end of memory (going down, after page 0: below).
            if plan.count == 0 || plan.first >= total {
                break;
            }
            if plan.stride == 1 {
                let end = (plan.first + plan.count).min(total);
                let Some(first) = sent.next_clear(plan.first).filter(|&p| p < end) else {
                    break;
                };
                let count = sent.clear_run(first, max_pages.min(end - first));
                sent.set_range(first, count);
                plan.count = end - (first + count);
                plan.first = first + count;
                return Some((first, count));
            }
            let page = plan.first;
            match page.checked_add_signed(plan.stride) {
                Some(next) => (plan.first, plan.count) = (next, plan.count - 1),
                None => plan.count = 0,
            }
            if !sent.is_set(page) {
                sent.set(page);
                return Some((page, 1));
            }
        }
        self.prepage = None;
        None
    }

    /// The next run of at most `max_pages` unsent pages, claimed in `sent`; `None` once every
    /// page has been sent.
    pub fn next_run(&mut self, sent: &PageMap, max_pages: u64) -> Option<(u64, u64)> {
        if let Some(run) = self.next_prepaged(sent, max_pages) {
            return Some(run);
        }
        let first = sent
            .next_clear(self.cursor)
            .or_else(|| sent.next_clear(0))?;
        let count = sent.clear_run(first, max_pages);
        sent.set_range(first, count);
        self.cursor = first + count;
        Some((first, count))
    }

    /// Like [`PushScheduler::next_run`] without the background cursor: the prefetch list
    /// and what pre-paging picked after requests only (`--no-push`); `None` until the next
    /// request once those are sent.
    pub fn next_prepaged(&mut self, sent: &PageMap, max_pages: u64) -> Option<(u64, u64)> {
        // The recorded working set is what the guest did last time; pre-paging is a guess.
        if let Some(run) = self.next_prefetched(sent, max_pages) {
            return Some(run);
        }
        self.next_prepage(sent, max_pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepage::Policy;

    fn fixed(window: u64) -> Prepager {
        Prepager::new(Policy::Fixed, 0, window)
    }

    fn drain(s: &mut PushScheduler, sent: &PageMap, max: u64) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| s.next_run(sent, max)).collect()
    }

    #[test]
    fn test_pushes_every_page_once_in_order() {
        let sent = PageMap::new(10);
        let mut s = PushScheduler::new(fixed(0), Vec::new());
        assert_eq!(drain(&mut s, &sent, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert!(sent.is_full());
    }

    #[test]
    fn test_a_push_started_midway_wraps_around_and_sends_every_page_once() {
        let sent = PageMap::new(10);
        let mut s = PushScheduler::new(fixed(0), Vec::new());
        s.start_at(6);
        assert_eq!(
            drain(&mut s, &sent, 3),
            vec![(6, 3), (9, 1), (0, 3), (3, 3)]
        );
        assert!(sent.is_full());
    }

    #[test]
    fn test_a_working_set_started_midway_wraps_around_before_the_rest() {
        let sent = PageMap::new(12);
        let mut s = PushScheduler::new(fixed(0), vec![8, 9, 2, 3, 4, 10]);
        s.start_prefetch_at(0.5);
        assert_eq!(
            drain(&mut s, &sent, 4),
            vec![(3, 2), (10, 1), (8, 2), (2, 1), (0, 2), (5, 3), (11, 1)]
        );
        assert_eq!(s.prefetched_pages(), 6);
        assert!(sent.is_full());
        // At the end (or past it): the list as it was.
        let mut s = PushScheduler::new(fixed(0), vec![4, 1]);
        s.start_prefetch_at(1.0);
        assert_eq!(s.next_run(&PageMap::new(6), 4), Some((4, 1)));
    }

    #[test]
    fn test_prepages_after_a_request_then_resumes_background() {
        let sent = PageMap::new(100);
        let mut s = PushScheduler::new(fixed(5), Vec::new());
        assert_eq!(s.next_run(&sent, 4), Some((0, 4)));
        sent.set(50); // the urgent path sent page 50
        s.on_request(51, 100);
        assert_eq!(s.next_run(&sent, 3), Some((51, 3)));
        assert_eq!(s.next_run(&sent, 3), Some((54, 2)));
        assert_eq!(s.next_run(&sent, 3), Some((4, 3)));
        let rest = drain(&mut s, &sent, 100);
        assert_eq!(rest, vec![(7, 43), (56, 44)]);
        assert!(sent.is_full());
    }

    #[test]
    fn test_skips_pages_marked_by_the_destination() {
        let sent = PageMap::new(20);
        sent.set_range(5, 10);
        let mut s = PushScheduler::new(fixed(8), Vec::new());
        s.on_request(3, 20);
        assert_eq!(drain(&mut s, &sent, 50), vec![(3, 2), (0, 3), (15, 5)]);
    }

    #[test]
    fn test_a_working_set_goes_first_in_its_order() {
        let sent = PageMap::new(30);
        // Recorded order: 20, 21, 22, then 5, 3, 4, then 25 (sent meanwhile), 40 (past the
        // end: ignored).
        let mut s = PushScheduler::new(fixed(2), vec![20, 21, 22, 5, 3, 4, 25, 40]);
        assert_eq!(s.next_run(&sent, 2), Some((20, 2)));
        s.on_request(10, 30);
        assert_eq!(s.next_run(&sent, 4), Some((22, 1)), "before pre-paging");
        sent.set(25);
        assert_eq!(s.next_run(&sent, 4), Some((5, 1)));
        assert_eq!(s.next_run(&sent, 4), Some((3, 2)));
        assert_eq!(s.next_run(&sent, 4), Some((10, 2)), "then pre-paging");
        assert_eq!(s.prefetched_pages(), 6);
        assert_eq!(
            drain(&mut s, &sent, 100),
            vec![(0, 3), (6, 4), (12, 8), (23, 2), (26, 4)]
        );
        assert!(sent.is_full());
    }

    #[test]
    fn test_adaptive_prepaging_follows_strides_and_direction() {
        let sent = PageMap::new(1000);
        let mut s = PushScheduler::new(Prepager::new(Policy::Adaptive, 2, 64), Vec::new());
        // Backward: 500, 499, 498 requested (and sent by the urgent path).
        for page in [500, 499, 498] {
            sent.set(page);
            s.on_request(page + 1, 1000);
        }
        // The window doubled twice to 8, downwards from 497.
        assert_eq!(s.next_run(&sent, 100), Some((490, 8)));
        // Strided by 10: 100, 110, 120: the next pages at the stride, one per run.
        for page in [100, 110, 120] {
            sent.set(page);
            s.on_request(page + 1, 1000);
        }
        assert_eq!(s.next_run(&sent, 100), Some((130, 1)));
        assert_eq!(s.next_run(&sent, 100), Some((140, 1)));
        assert_eq!(s.next_run(&sent, 100), Some((150, 1)));
        assert_eq!(s.next_run(&sent, 100), Some((160, 1)));
        assert_eq!(
            s.next_run(&sent, 100),
            Some((0, 100)),
            "then the background"
        );
    }

    #[test]
    fn test_without_the_background_only_prepaging_is_pushed() {
        let sent = PageMap::new(100);
        let mut s = PushScheduler::new(fixed(3), vec![50]);
        let first = s.next_prepaged(&sent, 10);
        assert_eq!(first, Some((50, 1)), "the prefetch list still goes");
        assert_eq!(s.next_prepaged(&sent, 10), None);
        assert!(!s.has_prepaging());
        sent.set(10);
        s.on_request(11, 100);
        assert!(s.has_prepaging());
        assert_eq!(s.next_prepaged(&sent, 10), Some((11, 3)));
        assert_eq!(s.next_prepaged(&sent, 10), None);
        // Precopy rounds and the stop-and-copy still see every page.
        assert_eq!(s.next_run(&sent, 10), Some((0, 10)));
    }

    #[test]
    fn test_a_downward_strided_plan_stops_at_page_zero() {
        let sent = PageMap::new(1000);
        let mut s = PushScheduler::new(Prepager::new(Policy::Adaptive, 2, 64), Vec::new());
        for page in [30, 20, 10] {
            sent.set(page);
            s.on_request(page + 1, 1000);
        }
        // Stride -10, window 4 from page 0: only page 0 lies in memory.
        assert_eq!(s.next_prepaged(&sent, 100), Some((0, 1)));
        assert_eq!(s.next_prepaged(&sent, 100), None);
        assert!(!s.has_prepaging());
    }
}
