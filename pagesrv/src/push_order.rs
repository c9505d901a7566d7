//! What the background push sends next: plain data, no I/O.
//!
//! Order: after an urgent request for pages `p..q`, the pages from `q` on for a window
//! (pre-paging: guests touch neighbours next), then the background cursor through the file.
//! Pages already sent (or that the destination said it no longer needs) are skipped, so no
//! page is pushed twice.

use common::pagemap::PageMap;

/// Chooses the next run of pages for the bulk connection.
#[derive(Debug)]
pub struct PushScheduler {
    cursor: u64,
    prepage: Option<(u64, u64)>,
    window_pages: u64,
}

impl PushScheduler {
    /// A scheduler whose pre-paging window after each request is `window_pages` pages.
    pub fn new(window_pages: u64) -> Self {
        PushScheduler {
            cursor: 0,
            prepage: None,
            window_pages,
        }
    }

    /// Starts over from the first page (a new precopy round).
    pub fn rewind(&mut self) {
        self.cursor = 0;
        self.prepage = None;
    }

    /// An urgent request for pages `first..end` arrived: pre-page from `end` on.
    pub fn on_request(&mut self, end: u64, total_pages: u64) {
        if self.window_pages > 0 && end < total_pages {
            self.prepage = Some((end, (end + self.window_pages).min(total_pages)));
        }
    }

    /// The next run of at most `max_pages` unsent pages, claimed in `sent`; `None` once every
    /// page has been sent.
    pub fn next_run(&mut self, sent: &PageMap, max_pages: u64) -> Option<(u64, u64)> {
        if let Some((next, end)) = self.prepage.take()
            && let Some(first) = sent.next_clear(next).filter(|&p| p < end)
        {
            let count = sent.clear_run(first, max_pages.min(end - first));
            sent.set_range(first, count);
            if first + count < end {
                self.prepage = Some((first + count, end));
            }
            return Some((first, count));
        }
        let first = sent.next_clear(self.cursor)?;
        let count = sent.clear_run(first, max_pages);
        sent.set_range(first, count);
        self.cursor = first + count;
        Some((first, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut PushScheduler, sent: &PageMap, max: u64) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| s.next_run(sent, max)).collect()
    }

    #[test]
    fn test_pushes_every_page_once_in_order() {
        let sent = PageMap::new(10);
        let mut s = PushScheduler::new(0);
        assert_eq!(drain(&mut s, &sent, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert!(sent.is_full());
    }

    #[test]
    fn test_prepages_after_a_request_then_resumes_background() {
        let sent = PageMap::new(100);
        let mut s = PushScheduler::new(5);
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
        let mut s = PushScheduler::new(8);
        s.on_request(3, 20);
        assert_eq!(drain(&mut s, &sent, 50), vec![(3, 2), (0, 3), (15, 5)]);
    }
}
