//! One VM's state, shared by the fault thread and the bulk threads: page maps, the placement
//! gate, the event epoch, counters and digests; and placement itself.
//!
//! Three bits per page:
//! - `done`: never to be fetched again (present, known zero, or removed by the VMM);
//! - `zero`: reads as zero and is *not* placed: pages pagesrv reported as zero, and pages the
//!   VMM removed (balloon, `madvise(DONTNEED)`) or unmapped. A fault on such a page is filled
//!   with a zero page locally; a zero page nobody touches costs no ioctl at all, and after
//!   completion (memory unregistered) the kernel fills it with zeros itself;
//! - `skipped`: removed before its bytes arrived. pagesrv is told (`Skip`, `SkipMap`), never
//!   sends it, and leaves it out of the digests; every other page is verified.
//!
//! The placement gate orders placements against REMOVE/UNMAP events: the event reader holds
//! it while reading the uffd and marking removed pages, and every placement that may race
//! with the reader holds it while it checks the bits and copies. A placement therefore either
//! finishes before a REMOVE is read (and the VMM's zap, which waits for that read, clears
//! it), or sees the page marked and skips it. The kernel answers EAGAIN to a placement while
//! an event is unread (and until the VMM's thread resumes after it): a placement that meets
//! EAGAIN releases the gate and waits for the event epoch to move (see [`Vm::wait_for_events`]),
//! never spinning and never waiting on a thread that waits on it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use common::pi_mutex::{PiGuard, PiMutex};
use std::time::Duration;

use common::pagemap::PageMap;
use common::uffd::UffdError;
use thiserror::Error;

use super::kernel::{Installed, Kernel, VmEvent};

/// Bytes per digest chunk: a mismatch is reported per chunk.
pub const DIGEST_CHUNK_BYTES: u64 = 64 << 20;

/// Why a VM could not be set up.
#[derive(Debug, Error)]
pub enum VmError {
    /// The page maps could not be allocated.
    #[error("cannot allocate the page maps of {total_pages} pages")]
    Alloc {
        /// Pages of guest RAM.
        total_pages: u64,
        /// Why.
        #[source]
        source: std::collections::TryReserveError,
    },
}

/// Counters for the stats JSON.
#[derive(Debug, Default)]
pub struct Counters {
    /// Faults that had to wait for pagesrv (a page neither present, nor known zero, nor
    /// already awaited): each a request, unless the page arrived by push first.
    pub demand_faults: AtomicU64,
    /// Data pages placed from urgent replies.
    pub pages_requested: AtomicU64,
    /// Data pages placed from the background push.
    pub pages_pushed: AtomicU64,
    /// Pages pagesrv reported as zero.
    pub pages_zero: AtomicU64,
    /// Pages the VMM removed (balloon, DONTNEED) or unmapped before they arrived.
    pub pages_removed: AtomicU64,
    /// Pages found in a guest RAM file shared with other restores of the image, placed by
    /// them before they arrived here (not fetched; see `shared_ram`).
    pub pages_shared: AtomicU64,
    /// Zero pages mapped because a thread faulted on them.
    pub zero_fills: AtomicU64,
    /// Bytes received from pagesrv on every connection.
    pub bytes_received: AtomicU64,
    /// Placements that met EAGAIN and waited for the event reader.
    pub placement_retries: AtomicU64,
    /// Pages the VMM removed while there was no link to pagesrv.
    pub removed_while_link_down: AtomicU64,
    /// Pages dropped because the source wrote them after they were sent (precopy).
    pub pages_discarded: AtomicU64,
    /// Page bytes received in precopy rounds (before the switch).
    pub bytes_precopy: AtomicU64,
    /// Pages placed from the base image (`--base`): their hashes matched the source's.
    pub pages_reused: AtomicU64,
    /// Bytes of page hashes received (`--base`).
    pub bytes_hashes: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Where pages came from, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An urgent reply to a fault.
    Requested,
    /// The background push.
    Pushed,
    /// The destination's base image (its hash matched the source's page).
    Base,
}

/// What to do with pages marked zero (known zero, or removed by the VMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Leave them unplaced (nobody waits on them).
    Skip,
    /// Map zero pages there: a thread faulted on them and waits.
    Fill,
}

/// Result of a placement attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every page of the range is handled.
    Done,
    /// The mapping is changing (an unread REMOVE/UNMAP): pages from `resume_at` on were not
    /// handled. Read the uffd's events, then call again from there.
    Again {
        /// First page not yet handled.
        resume_at: u64,
    },
}

/// Counts the event reader's passes, so a placement that met EAGAIN can wait for the next
/// one without spinning.
#[derive(Debug, Default)]
struct EventEpoch {
    epoch: AtomicU64,
    waiters: AtomicU32,
    lock: Mutex<()>,
    moved: Condvar,
}

/// One VM being migrated in.
pub struct Vm<K> {
    /// Placement and events.
    pub kernel: K,
    /// Pages never to be fetched again.
    pub done: PageMap,
    /// Pages that read as zero and are filled only on a fault.
    pub zero: PageMap,
    /// Zero pages whose zeros are in place: a later fill of the same page (a request's
    /// answer after the push's) must not write zeros over what the guest wrote since, which
    /// memfd placement (zeros written into the file) would. Cleared where the page goes
    /// away (a REMOVE, a discard).
    zero_filled: PageMap,
    /// Pages removed before they arrived: not sent, not verified.
    pub skipped: PageMap,
    /// Counters for the stats.
    pub counters: Counters,
    /// Sum of the digests of the pages placed, per chunk of `chunk_pages`.
    chunk_digests: Box<[AtomicU64]>,
    /// Pages per digest chunk ([`DIGEST_CHUNK_BYTES`], at least one page).
    chunk_pages: u64,
    /// Priority-inheriting: the fault thread (SCHED_FIFO) waits on it behind bulk threads.
    gate: PiMutex<()>,
    events: EventEpoch,
}

impl<K: Kernel> Vm<K> {
    /// A VM with nothing present yet.
    ///
    /// # Errors
    /// The page maps could not be allocated (a guest this host cannot hold).
    pub fn new(kernel: K) -> Result<Self, VmError> {
        let total_pages = kernel.total_pages();
        let alloc = |source| VmError::Alloc {
            total_pages,
            source,
        };
        let chunk_pages = (DIGEST_CHUNK_BYTES / kernel.page_size()).max(1);
        let chunks = usize::try_from(total_pages.div_ceil(chunk_pages)).unwrap_or(0);
        let mut chunk_digests = Vec::new();
        chunk_digests.try_reserve_exact(chunks).map_err(alloc)?;
        chunk_digests.extend((0..chunks).map(|_| AtomicU64::new(0)));
        Ok(Vm {
            done: PageMap::try_new(total_pages).map_err(alloc)?,
            zero: PageMap::try_new(total_pages).map_err(alloc)?,
            zero_filled: PageMap::try_new(total_pages).map_err(alloc)?,
            skipped: PageMap::try_new(total_pages).map_err(alloc)?,
            kernel,
            counters: Counters::default(),
            chunk_digests: chunk_digests.into_boxed_slice(),
            chunk_pages,
            gate: PiMutex::new(()),
            events: EventEpoch::default(),
        })
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.kernel.page_size()
    }

    /// Pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.kernel.total_pages()
    }

    /// True once every page is present (or will never be needed).
    pub fn is_complete(&self) -> bool {
        self.done.is_full()
    }

    /// Takes the placement gate (see the module docs).
    pub fn gate(&self) -> PiGuard<'_, ()> {
        self.gate.lock()
    }

    /// Reads every pending event under the gate, marks removed pages before any placement
    /// can see them, appends the events to `out` and the runs newly skipped (removed before
    /// they arrived) to `skipped`; then tells waiting placements the events were read.
    ///
    /// # Errors
    /// The uffd failed (the VMM is gone).
    pub fn read_events(
        &self,
        out: &mut Vec<VmEvent>,
        skipped: &mut Vec<(u64, u64)>,
    ) -> Result<(), UffdError> {
        let start = out.len();
        let result = {
            let _gate = self.gate();
            let result = self.kernel.read_events(out);
            for event in &out[start..] {
                if let VmEvent::Removed { first, count } = *event {
                    self.mark_removed(first, count, skipped);
                }
            }
            result
        };
        self.events.epoch.fetch_add(1, Ordering::AcqRel);
        if self.events.waiters.load(Ordering::Acquire) > 0 {
            let _lock = self.events.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.events.moved.notify_all();
        }
        result
    }

    /// How many times the events were read so far.
    pub fn events_epoch(&self) -> u64 {
        self.events.epoch.load(Ordering::Acquire)
    }

    /// Waits until the events are read after `epoch`, `stop` is set, or `limit` passes: what
    /// a placement does after EAGAIN. The limit matters: the kernel keeps answering EAGAIN
    /// after the event is read until the VMM's thread resumes, and no further event may come.
    pub fn wait_for_events(&self, epoch: u64, stop: &AtomicBool, limit: Duration) {
        Counters::add(&self.counters.placement_retries, 1);
        self.events.waiters.fetch_add(1, Ordering::AcqRel);
        {
            let mut lock = self.events.lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.events_epoch() == epoch && !stop.load(Ordering::Acquire) {
                lock = self
                    .events
                    .moved
                    .wait_timeout(lock, limit)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            drop(lock);
        }
        self.events.waiters.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wakes every placement waiting in [`Vm::wait_for_events`] (after setting its stop flag).
    pub fn wake_waiting_placements(&self) {
        let _lock = self.events.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.events.moved.notify_all();
    }

    /// Marks pages that read as zero without placing them: they are done, and a fault on one
    /// maps a zero page. Pages already done are left alone. Returns how many were new.
    pub fn mark_zero(&self, first: u64, count: u64) -> u64 {
        let mut newly = 0;
        for (page, n) in self.done.clear_runs(first, count) {
            self.zero.set_range(page, n);
            newly += self.done.set_range(page, n);
        }
        newly
    }

    /// Marks pages the VMM removed or unmapped: zero from now on, never fetched. Pages not
    /// done yet are skipped (appended to `skipped`): they never arrive and are not verified.
    /// Pages that arrived before keep their digest (their bytes were right). Call with the
    /// gate held.
    fn mark_removed(&self, first: u64, count: u64, skipped: &mut Vec<(u64, u64)>) {
        let end = first.saturating_add(count).min(self.total_pages());
        let first = first.min(end);
        for (page, n) in self.done.clear_runs(first, end - first) {
            self.skipped.set_range(page, n);
            skipped.push((page, n));
            Counters::add(&self.counters.pages_removed, n);
        }
        self.zero.set_range(first, end - first);
        self.zero_filled.clear_range(first, end - first);
        self.done.set_range(first, end - first);
    }

    fn add_digest(&self, page: u64, bytes: &[u8]) {
        let digest = common::digest::page_digest(page, bytes);
        self.chunk_digests[(page / self.chunk_pages) as usize].fetch_add(digest, Ordering::Relaxed);
    }

    /// Pages per digest chunk: 64 MiB worth.
    pub fn digest_chunk_pages(&self) -> u64 {
        self.chunk_pages
    }

    /// Per-chunk digests of the pages placed. Call it once every page is done: it first
    /// waits for placements still recording (a page is done as soon as a placement that lost
    /// an EEXIST race sees it, which can be before the winner has digested it; the winner
    /// holds the gate until it has, or is the caller's own thread).
    pub fn chunk_digests(&self) -> Vec<u64> {
        drop(self.gate());
        self.chunk_digests
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect()
    }

    /// Places pages `first..first+count`: `data` holds their bytes, or `None` when pagesrv
    /// reported them as zero. Pages already done are skipped; pages marked zero are skipped or
    /// filled as `zero_pages` says. Only pages this call placed are counted and digested:
    /// where another placement won a race (EEXIST), its bytes are the ones that landed.
    ///
    /// # Errors
    /// The VMM is gone, or the kernel refused the placement.
    pub fn place(
        &self,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        origin: Origin,
        zero_pages: ZeroPages,
    ) -> Result<Placed, UffdError> {
        // The gate orders placements against the event reader. The fault thread *is* the
        // event reader, so its own UFFDIO_COPYs need no gate (a race with a bulk thread ends
        // in EEXIST); memfd placement writes the page cache first, which only the done bits
        // under the gate keep from overwriting a page the guest already uses.
        let _gate =
            (origin != Origin::Requested || self.kernel.writes_page_cache()).then(|| self.gate());
        if data.is_none() {
            Counters::add(&self.counters.pages_zero, self.mark_zero(first, count));
        }
        let page_size = self.page_size();
        let end = first + count;
        let mut at = first;
        while at < end {
            let zero_run = self.zero.set_run(at, end - at);
            if zero_run > 0 {
                if zero_pages == ZeroPages::Fill {
                    for (page, n) in self.zero_filled.clear_runs(at, zero_run) {
                        let installed = self.kernel.install_zero(page, n)?;
                        let fills = installed.present_pages - installed.existing.len() as u64;
                        Counters::add(&self.counters.zero_fills, fills);
                        self.zero_filled.set_range(page, installed.present_pages);
                        if installed.again {
                            return Ok(Placed::Again {
                                resume_at: page + installed.present_pages,
                            });
                        }
                    }
                }
                at += zero_run;
                continue;
            }
            let run = self.zero.clear_run(at, end - at);
            for (page, n) in self.done.clear_runs(at, run) {
                let bytes = data.map(|d| {
                    let offset = ((page - first) * page_size) as usize;
                    &d[offset..offset + (n * page_size) as usize]
                });
                let installed = match bytes {
                    Some(b) => self.kernel.install(page, b)?,
                    None => Installed::all(n),
                };
                let newly = self.record_installed(page, &installed, bytes);
                tracing::trace!(page, n, ?origin, newly, existing = ?installed.existing, "placed");
                let counter = match origin {
                    Origin::Requested => &self.counters.pages_requested,
                    Origin::Pushed => &self.counters.pages_pushed,
                    Origin::Base => &self.counters.pages_reused,
                };
                Counters::add(counter, newly);
                if installed.again {
                    return Ok(Placed::Again {
                        resume_at: page + installed.present_pages,
                    });
                }
            }
            at += run;
        }
        Ok(Placed::Done)
    }

    /// Marks the present pages of a placement done and digests the ones it placed; returns
    /// how many it placed.
    fn record_installed(&self, page: u64, installed: &Installed, bytes: Option<&[u8]>) -> u64 {
        let page_size = self.page_size() as usize;
        let mut placed = 0;
        for p in page..page + installed.present_pages {
            self.done.set(p);
            if installed.existing.contains(&p) {
                continue;
            }
            placed += 1;
            if let Some(b) = bytes {
                let at = (p - page) as usize * page_size;
                self.add_digest(p, &b[at..at + page_size]);
            }
        }
        placed
    }

    /// Drops the pages a bitmap names (for pages `first..first+count`) that are here: the source wrote
    /// them after it sent them (precopy). Their digests are taken back (read back before the
    /// drop), and they are missing again: sent again, or requested on the next touch.
    /// Returns how many were dropped.
    ///
    /// # Errors
    /// Pages cannot be read back or dropped (no memfd), or the kernel refused.
    pub fn discard(&self, first: u64, count: u64, bitmap: &[u8]) -> Result<u64, UffdError> {
        let _gate = self.gate();
        let mut page_buf = vec![0u8; self.page_size() as usize];
        let mut runs = Vec::new();
        PageMap::bitmap_runs(first, bitmap, |page, n| runs.push((page, n)));
        let limit = first.saturating_add(count).min(self.total_pages());
        let mut dropped = 0;
        for (page, n) in runs {
            let end = (page + n).min(limit);
            for p in page..end {
                if !self.done.is_set(p) {
                    continue;
                }
                if !self.zero.is_set(p) {
                    self.kernel.read_page(p, &mut page_buf)?;
                    let digest = common::digest::page_digest(p, &page_buf);
                    self.chunk_digests[(p / self.chunk_pages) as usize]
                        .fetch_sub(digest, Ordering::Relaxed);
                }
                dropped += 1;
            }
            if page < end {
                self.kernel.drop_pages(page, end - page)?;
                self.zero.clear_range(page, end - page);
                self.zero_filled.clear_range(page, end - page);
                self.done.clear_range(page, end - page);
            }
        }
        Counters::add(&self.counters.pages_discarded, dropped);
        Ok(dropped)
    }

    /// Writes the pieces of a `Patch` into a present page, in place: the guest wrote them at
    /// the source since the page was sent (precopy on huge pages; the guest does not run
    /// here yet). `bitmap` names the page's `piece_bytes`-byte pieces, `pieces` holds the set
    /// ones in order. The page's digest is taken back before and added after. Returns false,
    /// changing nothing, for a page that is not here (pagesrv thought it was).
    ///
    /// # Errors
    /// The page cannot be read back or written in place.
    pub fn patch(
        &self,
        page: u64,
        piece_bytes: u64,
        bitmap: &[u8],
        pieces: &[u8],
    ) -> Result<bool, UffdError> {
        use common::digest::{DIGEST_PIECE_BYTES, piece_digest};
        let _gate = self.gate();
        if page >= self.total_pages() || !self.done.is_set(page) {
            return Ok(false);
        }
        let page_size = self.page_size();
        let mut runs = Vec::new();
        PageMap::bitmap_runs(0, bitmap, |first, n| {
            let (at, len) = (first * piece_bytes, n * piece_bytes);
            if at + len <= page_size {
                runs.push((at, len));
            }
        });
        // The page's digest is the sum of its digest pieces' (`common::digest`): only those
        // the patch touches are digested again, their old bytes taken back first.
        let unit = (DIGEST_PIECE_BYTES as u64).min(page_size);
        let first_index = page * (page_size / unit);
        let mut touched: Vec<u64> = runs
            .iter()
            .flat_map(|&(at, len)| at / unit..(at + len).div_ceil(unit))
            .collect();
        touched.dedup();
        let digests = &self.chunk_digests[(page / self.chunk_pages) as usize];
        let mut buf = vec![0u8; unit as usize];
        let was_zero = self.zero.is_set(page);
        if !was_zero {
            for &d in &touched {
                self.kernel.read_in_place(page, d * unit, &mut buf)?;
                digests.fetch_sub(piece_digest(first_index + d, &buf), Ordering::Relaxed);
            }
        }
        let mut taken = 0;
        for (at, len) in runs {
            let Some(new) = pieces.get(taken..taken + len as usize) else {
                break; // the decoder checked the lengths: not reached
            };
            self.kernel.write_in_place(page, at, new)?;
            taken += len as usize;
        }
        for &d in &touched {
            self.kernel.read_in_place(page, d * unit, &mut buf)?;
            digests.fetch_add(piece_digest(first_index + d, &buf), Ordering::Relaxed);
        }
        if was_zero {
            self.zero.clear_range(page, 1);
        }
        Ok(true)
    }

    /// Takes over pages that other restores sharing the guest RAM file placed in it before
    /// they arrived here: it looks at `max_pages` pages from the first not done yet at or
    /// after `*cursor` (one `Kernel::filled_runs`; the cursor moves on past them, back to 0
    /// after the end). The pages taken are done, and skipped like pages removed before they
    /// arrived (pagesrv stops sending them; the restore that placed them verified them).
    /// Appends the runs taken to `taken`; returns how many pages, `None` where RAM is not
    /// shared.
    ///
    /// # Errors
    /// The kernel refused to say what the file holds.
    pub fn adopt_shared(
        &self,
        cursor: &mut u64,
        max_pages: u64,
        taken: &mut Vec<(u64, u64)>,
    ) -> Result<Option<u64>, UffdError> {
        let total = self.total_pages();
        let Some(first) = self
            .done
            .next_clear(*cursor)
            .or_else(|| self.done.next_clear(0))
        else {
            return Ok(Some(0));
        };
        let end = first.saturating_add(max_pages).min(total);
        let mut runs = Vec::new();
        if !self.kernel.filled_runs(first..end, &mut runs)? {
            return Ok(None);
        }
        *cursor = if end >= total { 0 } else { end };
        // Ordered against placements, which set done bits after writing.
        let _gate = self.gate();
        let mut adopted = 0;
        for (first, count) in runs {
            let end = first.saturating_add(count).min(self.total_pages());
            let first = first.min(end);
            for (page, n) in self.done.clear_runs(first, end - first) {
                self.skipped.set_range(page, n);
                self.done.set_range(page, n);
                taken.push((page, n));
                adopted += n;
            }
        }
        Counters::add(&self.counters.pages_shared, adopted);
        Ok(Some(adopted))
    }

    /// A MINOR fault: the page is in the page cache but not mapped in the VMM (written by us
    /// but not yet mapped, or zapped by the VMM): map it.
    ///
    /// # Errors
    /// As [`Vm::place`].
    pub fn map_cached_page(&self, page: u64) -> Result<Placed, UffdError> {
        let _gate = self.gate();
        let installed = self.kernel.map_cached(page)?;
        if installed.again {
            return Ok(Placed::Again { resume_at: page });
        }
        self.done.set(page);
        Ok(Placed::Done)
    }
}
