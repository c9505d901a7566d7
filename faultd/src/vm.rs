//! One VM's state, shared by the fault thread and the bulk thread: its layout and uffd, the
//! page maps, the placement gate and the counters.
//!
//! Two bits per page:
//! - `done`: never to be fetched again (present, known zero, or removed by the VMM);
//! - `zero`: reads as zero and is *not* placed: pages pagesrv reported as zero, and pages the
//!   VMM removed (balloon, `madvise(DONTNEED)`) or unmapped. A fault on such a page is filled
//!   with a zero page locally; a zero page nobody touches costs no ioctl at all, and after
//!   completion (memory unregistered) the kernel fills it with zeros itself.
//!
//! The placement gate orders placements against REMOVE/UNMAP events: the event reader holds
//! it while reading the uffd and marking removed pages, and every placement holds it while it
//! checks the bits and copies. A placement therefore either finishes before a REMOVE is read
//! (and the VMM's zap, which waits for that read, clears it), or sees the page marked and
//! skips it; the kernel answers EAGAIN to a placement that races with an unread event.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Pages pagesrv reported as zero.
    pub pages_zero: AtomicU64,
    /// Pages the VMM removed (balloon, DONTNEED) or unmapped before they arrived.
    pub pages_removed: AtomicU64,
    /// Zero pages mapped because a thread faulted on them.
    pub zero_fills: AtomicU64,
    /// Bytes received from pagesrv on both connections.
    pub bytes_received: AtomicU64,
}

/// Pages per digest chunk: a mismatch is reported per chunk (64 MiB of 4 KiB pages).
pub const DIGEST_CHUNK_PAGES: u64 = 16384;

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One VM being migrated in.
pub struct Vm {
    /// The VMM's regions.
    pub layout: Layout,
    /// The VMM's userfaultfd.
    pub uffd: Uffd,
    /// Pages never to be fetched again.
    pub done: PageMap,
    /// Pages that read as zero and are filled only on a fault.
    pub zero: PageMap,
    /// Counters for the stats.
    pub counters: Counters,
    /// Sum of the page digests of the pages placed, per chunk of [`DIGEST_CHUNK_PAGES`].
    chunk_digests: Box<[AtomicU64]>,
    /// Chunks holding pages the VMM removed before they arrived (not verifiable).
    chunk_removed: Box<[AtomicBool]>,
    gate: Mutex<()>,
    /// With memfd placement: the VMM's guest RAM file. Pages are written into it and mapped
    /// with UFFDIO_CONTINUE (or woken, where the VMM registered MISSING only).
    memfd: Option<File>,
    /// Set when UFFDIO_CONTINUE is refused (RAM not registered in MINOR mode).
    continue_refused: AtomicBool,
    /// Zero bytes to copy from where UFFDIO_ZEROPAGE does not exist (hugetlbfs).
    zero_source: Vec<u8>,
}

impl Vm {
    /// A VM with nothing present yet. With `memfd`, pages are placed by writing the memory
    /// file and mapping them in place; without, by UFFDIO_COPY.
    pub fn new(layout: Layout, uffd: Uffd, memfd: Option<File>) -> Self {
        let total = layout.total_pages();
        let zero_source = if layout.page_size() > 4096 {
            vec![0; layout.page_size() as usize]
        } else {
            Vec::new()
        };
        let chunks = total.div_ceil(DIGEST_CHUNK_PAGES) as usize;
        Vm {
            layout,
            uffd,
            done: PageMap::new(total),
            zero: PageMap::new(total),
            counters: Counters::default(),
            chunk_digests: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
            chunk_removed: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            gate: Mutex::new(()),
            memfd,
            continue_refused: AtomicBool::new(false),
            zero_source,
        }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    /// Takes the placement gate (see the module docs).
    pub fn gate(&self) -> MutexGuard<'_, ()> {
        // The gate guards no data, so a panic elsewhere cannot leave anything inconsistent.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks pages that read as zero without placing them: they are done, and a fault on one
    /// maps a zero page. Pages already present are left alone. Returns how many were new.
    pub fn mark_zero(&self, first: u64, count: u64) -> u64 {
        let mut newly = 0;
        for (page, n) in self.done.clear_runs(first, count) {
            self.zero.set_range(page, n);
            newly += self.done.set_range(page, n);
        }
        newly
    }

    /// Marks pages the VMM removed or unmapped: zero from now on, never fetched, even if
    /// they were present before. Call with the gate held. Returns how many were not done yet.
    pub fn mark_removed(&self, first: u64, count: u64) -> u64 {
        for (page, n) in self.done.clear_runs(first, count) {
            for chunk in page / DIGEST_CHUNK_PAGES..=(page + n - 1) / DIGEST_CHUNK_PAGES {
                self.chunk_removed[chunk as usize].store(true, Ordering::Relaxed);
            }
        }
        self.zero.set_range(first, count);
        self.done.set_range(first, count)
    }

    /// Adds the digests of pages placed from `bytes`, starting at `first`.
    pub fn add_digests(&self, first: u64, bytes: &[u8]) {
        let page_size = self.page_size() as usize;
        for (page, chunk) in (first..).zip(bytes.chunks(page_size)) {
            let digest = common::digest::page_digest(page, chunk);
            self.chunk_digests[(page / DIGEST_CHUNK_PAGES) as usize]
                .fetch_add(digest, Ordering::Relaxed);
        }
    }

    /// Per-chunk digests of the pages placed, and whether each chunk is verifiable.
    pub fn chunk_digests(&self) -> Vec<(u64, bool)> {
        self.chunk_digests
            .iter()
            .zip(self.chunk_removed.iter())
            .map(|(d, r)| (d.load(Ordering::Relaxed), !r.load(Ordering::Relaxed)))
            .collect()
    }

    /// The guest RAM file, when pages are placed through it.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// Whether UFFDIO_CONTINUE was refused (the VMM registered MISSING only).
    pub fn continue_refused(&self) -> bool {
        self.continue_refused.load(Ordering::Relaxed)
    }

    /// Remembers that UFFDIO_CONTINUE is refused.
    pub fn refuse_continue(&self) {
        self.continue_refused.store(true, Ordering::Relaxed);
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
