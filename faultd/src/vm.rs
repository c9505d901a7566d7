//! One VM's state, shared by the fault thread and the bulk thread: its layout and uffd, the
//! "done" page map, the ranges the VMM removed, and the counters.
//!
//! The placement gate (a mutex around the removed ranges) orders placements against
//! REMOVE/UNMAP events: the event reader holds it while reading the uffd, and every placement
//! holds it while it checks the removed ranges and copies. A placement therefore either
//! finishes before a REMOVE is read (and the VMM's zap, which waits for that read, clears it),
//! or sees the removed range and skips it; the kernel answers EAGAIN to a placement that
//! races with an unread event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use common::layout::Layout;
use common::pagemap::PageMap;
use common::uffd::Uffd;

/// Counters for the stats JSON.
#[derive(Debug, Default)]
pub struct Counters {
    /// Data pages placed from urgent replies.
    pub pages_requested: AtomicU64,
    /// Data pages placed from the background push.
    pub pages_pushed: AtomicU64,
    /// Zero pages placed (either connection).
    pub pages_zero: AtomicU64,
    /// Pages the VMM removed (balloon, DONTNEED) or unmapped before they arrived.
    pub pages_removed: AtomicU64,
    /// Bytes received from pagesrv on both connections.
    pub bytes_received: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Page ranges that read as zero from now on and are never fetched: `first → end`.
#[derive(Debug, Default)]
pub struct RemovedRanges {
    ranges: BTreeMap<u64, u64>,
}

impl RemovedRanges {
    /// Adds `first..end`, merging with neighbours.
    pub fn insert(&mut self, mut first: u64, mut end: u64) {
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= first)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            first = first.min(s);
            end = end.max(e);
        }
        self.ranges.insert(first, end);
    }

    /// Whether `page` is removed.
    pub fn contains(&self, page: u64) -> bool {
        self.ranges
            .range(..=page)
            .next_back()
            .is_some_and(|(_, &e)| page < e)
    }

    /// Splits `first..first+count` into runs `(first, count, removed)`.
    pub fn split(&self, first: u64, count: u64) -> Vec<(u64, u64, bool)> {
        let end = first + count;
        let mut out = Vec::new();
        let mut at = first;
        let start_key = self
            .ranges
            .range(..=first)
            .next_back()
            .map_or(first, |(&s, _)| s);
        for (&s, &e) in self.ranges.range(start_key..end) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s - at, false));
            }
            let lo = s.max(at);
            let hi = e.min(end);
            out.push((lo, hi - lo, true));
            at = hi;
        }
        if at < end {
            out.push((at, end - at, false));
        }
        out
    }
}

/// One VM being migrated in.
pub struct Vm {
    /// The VMM's regions.
    pub layout: Layout,
    /// The VMM's userfaultfd.
    pub uffd: Uffd,
    /// Pages present in the VMM, or removed (both: never fetched again).
    pub done: PageMap,
    /// Counters for the stats.
    pub counters: Counters,
    gate: Mutex<RemovedRanges>,
    /// Zero bytes to copy from where UFFDIO_ZEROPAGE does not exist (hugetlbfs).
    zero_source: Vec<u8>,
}

impl Vm {
    /// A VM with nothing present yet.
    pub fn new(layout: Layout, uffd: Uffd) -> Self {
        let total = layout.total_pages();
        let zero_source = if layout.page_size() > 4096 {
            vec![0; layout.page_size() as usize]
        } else {
            Vec::new()
        };
        Vm {
            layout,
            uffd,
            done: PageMap::new(total),
            counters: Counters::default(),
            gate: Mutex::new(RemovedRanges::default()),
            zero_source,
        }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    /// Takes the placement gate (see the module docs).
    pub fn gate(&self) -> MutexGuard<'_, RemovedRanges> {
        // A poisoned gate only means another thread panicked mid-placement; the ranges are
        // still consistent (insert is the only mutation and cannot panic halfway).
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Zero bytes for one page (hugetlbfs only).
    pub fn zero_page_bytes(&self) -> &[u8] {
        &self.zero_source
    }

    /// True when the RAM is hugetlbfs-backed (no UFFDIO_ZEROPAGE).
    pub fn is_hugetlb(&self) -> bool {
        self.layout.page_size() > 4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_removed_ranges_merge_and_split() {
        let mut r = RemovedRanges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(18, 32);
        assert!(r.contains(10) && r.contains(39) && !r.contains(40) && !r.contains(9));
        assert_eq!(
            r.split(0, 50),
            vec![(0, 10, false), (10, 30, true), (40, 10, false)]
        );
        assert_eq!(r.split(15, 3), vec![(15, 3, true)]);
        r.insert(50, 60);
        assert_eq!(
            r.split(35, 20),
            vec![(35, 5, true), (40, 10, false), (50, 5, true)]
        );
        r.insert(40, 50);
        assert_eq!(
            r.split(0, 100),
            vec![(0, 10, false), (10, 50, true), (60, 40, false)]
        );
    }
}
