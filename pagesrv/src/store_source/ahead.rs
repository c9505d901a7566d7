//! What a fetch brings besides what was asked: the frames of the pages that follow (read
//! ahead), the base frames of delta frames that the image also uses, and the recorded
//! working set, fetched first by a thread of its own.

use std::collections::HashSet;
use std::sync::Arc;

use snapstore::layout::{FRAME_PAGES, PageRef};
use tracing::info;

use super::{CacheState, FrameState, Handover, StoreSource};

/// Frames read ahead of a fetch (1 MiB of pages each at most before compression: 16 MiB).
const READ_AHEAD_FRAMES: usize = 256;
/// Pages looked at past a read for frames to read ahead.
const READ_AHEAD_SCAN_PAGES: u64 = 16 * 1024;
/// Batches whose readers went on while what they read ahead still arrives, at most (more
/// would only queue their GETs and decoding behind those already running).
const READ_AHEADS_RUNNING: usize = 4;
/// Working-set frames in one batch of the prefetcher. Its GETs run in parallel and their
/// frames are handed over in the set's order (a set stored first by `store put
/// --working-set` lies back to back: ≈ one GET per MiB), so one batch brings the first
/// frames after one round trip and the rest behind them; each further batch would cost a
/// round trip (a 64 MiB set behind 20 ms, with a guest restoring: in the cache ≈ 125 ms
/// after pagesrv starts with one batch, ≈ 180 with a first batch of 64 frames).
const PREFETCH_BATCH_MAX: usize = 4096;
/// The prefetcher's nice value: above the sessions' ordinary threads, since a restored
/// guest waits for its working set (measured with the rest of this change: the set in the
/// cache ≈ 150 ms after pagesrv starts instead of ≈ 250, as the pushes and the guest held
/// the CPUs from its decoding; ≈ 240 with one batch but no raised weight).
const PREFETCH_NICE: i32 = -10;

impl StoreSource {
    /// Marks absent frames of the pages after `end` as being fetched (at most
    /// [`READ_AHEAD_FRAMES`], and a quarter of the cache) and returns them.
    pub(super) fn read_ahead(&self, state: &mut CacheState, end: u64) -> Vec<usize> {
        let stop = (end + READ_AHEAD_SCAN_PAGES).min(self.manifest.page_count());
        // At most a quarter of the cache, so that what is read ahead is not evicted before
        // it is read.
        let most = READ_AHEAD_FRAMES.min((self.limit_pages / FRAME_PAGES as u64 / 4) as usize);
        let mut ahead = Vec::new();
        for page in end..stop {
            if ahead.len() >= most {
                break;
            }
            if let PageRef::Stored { frame, .. } = self.manifest.pages[page as usize]
                && state.frames[frame as usize] == FrameState::Absent
            {
                state.frames[frame as usize] = FrameState::Fetching;
                ahead.push(frame as usize);
            }
        }
        ahead
    }

    /// Whether a read that fetches its frames with `ahead` read ahead may go on as soon as
    /// its own frames are in, the rest of the batch arriving in the background: if `ahead`
    /// is not empty and fewer than [`READ_AHEADS_RUNNING`] batches run so (counted here).
    /// Past that the read waits for its whole batch, so that a reader missing again and
    /// again cannot pile up batches faster than they are decoded.
    pub(super) fn may_leave_early(&self, state: &mut CacheState, ahead: &[usize]) -> bool {
        let early = !ahead.is_empty() && state.reading_ahead < READ_AHEADS_RUNNING;
        if early {
            state.reading_ahead += 1;
        }
        early
    }

    /// Fetches `pinned` and `ahead` (one batch: the same GETs as [`StoreSource::fetch`]) on
    /// a thread of its own and returns once every frame of `pinned` is in, pinned for the
    /// caller (true), or will not come (false, a loss counted); the frames read ahead keep
    /// arriving. A read that misses thus waits for one round trip and its own frames'
    /// decoding, not for a batch read ahead. Where no thread can start, fetches on this
    /// one. Call after [`StoreSource::may_leave_early`] said yes.
    pub(super) fn fetch_leaving_early(
        self: &Arc<Self>,
        pinned: Vec<usize>,
        ahead: Vec<usize>,
    ) -> bool {
        let handover = Arc::new(Handover::default());
        let (source, answer) = (self.clone(), handover.clone());
        let batch = Arc::new((pinned, ahead));
        let in_thread = batch.clone();
        let started = std::thread::Builder::new()
            .name("store-fetch".into())
            .spawn(move || {
                // Whatever happens (a panic included), the reader is answered and the batch
                // no longer counted.
                let _done = BatchDone {
                    source: &source,
                    handover: &answer,
                };
                let (pinned, ahead) = &*in_thread;
                source.fetch(pinned, ahead, Some(&answer));
            });
        match started {
            Ok(_) => handover.wait(),
            Err(e) => {
                tracing::debug!(error = %e, "a read waits for what it reads ahead");
                self.lock().reading_ahead -= 1;
                self.fetch(&batch.0, &batch.1, None)
            }
        }
    }

    /// The absent frames holding the bases of delta frames `frames` that the image also
    /// uses (its unchanged pages, usually): they come in the same fetch anyway, so they are
    /// kept (marked `Fetching` here) rather than fetched again for their own pages later.
    pub(super) fn bases_in_use<'f>(
        &self,
        state: &mut CacheState,
        frames: impl Iterator<Item = &'f usize>,
    ) -> Vec<usize> {
        let mut out = Vec::new();
        for &f in frames {
            for &(base, _) in self.manifest.bases.get(&(f as u32)).into_iter().flatten() {
                let base = base as usize;
                if !self.users[base].is_empty() && state.frames[base] == FrameState::Absent {
                    state.frames[base] = FrameState::Fetching;
                    out.push(base);
                }
            }
        }
        out
    }

    /// Fetches the recorded working set's frames, in the order the guest first touched
    /// them, before anything asks for them, at a higher CPU weight (the threads decoding
    /// its frames inherit it) where pagesrv may raise it.
    pub(super) fn prefetch_working_set(&self) {
        if let Err(e) = common::sched::set_thread_nice(PREFETCH_NICE) {
            tracing::debug!(error = %e, "the working set's prefetch runs at the ordinary weight");
        }
        let mut seen = HashSet::new();
        let order: Vec<usize> = self
            .manifest
            .working_set
            .iter()
            .filter_map(|&p| match self.manifest.pages[p as usize] {
                PageRef::Stored { frame, .. } => Some(frame as usize),
                PageRef::Zero => None,
            })
            .filter(|f| seen.insert(*f))
            .collect();
        let started = std::time::Instant::now();
        // A batch is at most a quarter of the cache: the set's first frames must not be
        // evicted by its later ones before they are read.
        let most = PREFETCH_BATCH_MAX
            .min((self.limit_pages / FRAME_PAGES as u64 / 4) as usize)
            .max(1);
        let mut at = 0;
        while at < order.len() {
            let batch = &order[at..(at + most).min(order.len())];
            at += batch.len();
            let mine: Vec<usize> = {
                let mut state = self.lock();
                let mut mine: Vec<usize> = batch
                    .iter()
                    .copied()
                    .filter(|&f| {
                        let absent = state.frames[f] == FrameState::Absent;
                        if absent {
                            state.frames[f] = FrameState::Fetching;
                        }
                        absent
                    })
                    .collect();
                let bases = self.bases_in_use(&mut state, mine.iter());
                mine.extend(bases);
                mine
            };
            if !mine.is_empty() && !self.fetch(&[], &mine, None) {
                return;
            }
        }
        info!(
            frames = order.len(),
            ms = started.elapsed().as_millis() as u64,
            "the working set is in the cache"
        );
    }
}

/// Ends a batch left running by its reader: answers it (no frames, if the fetch did not),
/// counts a loss if it panicked, and stops counting the batch.
struct BatchDone<'a> {
    source: &'a StoreSource,
    handover: &'a Handover,
}

impl Drop for BatchDone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Its reader's pages, and what others waited for, did not come: every session
            // running is told (pages_intact), none sends the zeros it would read.
            self.source
                .losses
                .record("a fetch from the object store panicked".to_owned(), false);
        }
        self.handover.answer(false);
        self.source.lock().reading_ahead -= 1;
    }
}
