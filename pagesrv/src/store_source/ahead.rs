//! What a fetch brings besides what was asked: the frames of the pages that follow (read
//! ahead), the base frames of delta frames that the image also uses, and the recorded
//! working set, fetched first by a thread of its own.

use std::collections::HashSet;

use snapstore::layout::{FRAME_PAGES, PageRef};
use tracing::info;

use super::{CacheState, FrameState, StoreSource};

/// Frames read ahead of a fetch (1 MiB of pages each at most before compression: 16 MiB).
const READ_AHEAD_FRAMES: usize = 256;
/// Pages looked at past a read for frames to read ahead.
const READ_AHEAD_SCAN_PAGES: u64 = 16 * 1024;
/// Working-set frames in the prefetcher's first batch: the first-touched frames come after
/// one round trip. The rest follow in batches of [`PREFETCH_BATCH_MAX`], whose GETs run in
/// parallel and hand over each frame as it arrives (a set stored first by `store put
/// --working-set` lies back to back: ≈ one GET per MiB). Each batch costs a round trip, so
/// few large ones beat many doubling ones (measured: 215–250 ms instead of ≈ 300 for a
/// 64 MiB set behind 20 ms).
const PREFETCH_BATCH: usize = 64;
/// The prefetcher's later batches.
const PREFETCH_BATCH_MAX: usize = 4096;

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
    /// them, before anything asks for them.
    pub(super) fn prefetch_working_set(&self) {
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
        let (mut at, mut size) = (0, PREFETCH_BATCH.min(most));
        while at < order.len() {
            let batch = &order[at..(at + size).min(order.len())];
            at += batch.len();
            size = most;
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
            if !mine.is_empty() && !self.fetch(&[], &mine) {
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
