//! Filling the cache from the store and emptying it: a batch of frames fetched and written
//! into the cache file (each frame usable as soon as it is in), and eviction past the limit.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use snapstore::StoreError;
use snapstore::layout::PAGE_BYTES;
use tracing::warn;

use super::{CacheState, FrameState, Handover, StoreSource, contiguous_runs};

impl StoreSource {
    /// Fetches `pinned` and `ahead` (all marked `Fetching` by the caller) into the cache
    /// file: `pinned` are handed back pinned once, `ahead` unpinned. On failure marks what
    /// did not arrive absent and, if some of `pinned` did not arrive, counts a loss. Returns
    /// whether the caller has what it needs: everything arrived, or every frame of a
    /// non-empty `pinned` did (only frames read ahead were lost). `handover`, if given, is
    /// told as soon as that is known (every frame of `pinned` in, or the fetch over).
    pub(super) fn fetch(
        &self,
        pinned: &[usize],
        ahead: &[usize],
        handover: Option<&Handover>,
    ) -> bool {
        // An urgent thread fetching runs ordinary meanwhile: it waits for the store anyway,
        // and decoding a batch read ahead (on it and on the threads it spawns, which would
        // inherit its policy) must not hold the CPUs from the guest's vCPUs.
        let _ordinary = common::sched::OrdinaryPriority::enter();
        let all: Vec<usize> = pinned.iter().chain(ahead).copied().collect();
        let _unwinding = Unwinding {
            source: self,
            frames: &all,
            pinned,
            handover,
        };
        let pinned_set: HashSet<usize> = pinned.iter().copied().collect();
        let written = Mutex::new(HashSet::with_capacity(all.len()));
        let pinned_left = std::sync::atomic::AtomicUsize::new(pinned_set.len());
        let result = self.store.fetch_frames(&self.manifest, &all, &|f, raw| {
            let page_bytes = PAGE_BYTES as usize;
            for &(slot, page) in &self.users[f] {
                if !self.digest_known[page as usize].load(Ordering::Acquire) {
                    let bytes = &raw[usize::from(slot) * page_bytes..][..page_bytes];
                    let digest = common::digest::piece_digest(page, bytes);
                    self.digests[page as usize].store(digest, Ordering::Relaxed);
                    self.digest_known[page as usize].store(true, Ordering::Release);
                }
            }
            // One write per run of pages that follow each other both in the frame and in
            // the image (usually the whole frame): a 4 KiB write costs about as much
            // again on ext4 as a page of a 64 KiB one.
            for (slot, page, pages) in contiguous_runs(&self.users[f]) {
                let bytes = &raw[usize::from(slot) * page_bytes..][..pages * page_bytes];
                self.file
                    .write_all_at(bytes, page * PAGE_BYTES)
                    .map_err(|source| StoreError::File {
                        op: "write the cache of",
                        path: self.url.to_string().into(),
                        source,
                    })?;
            }
            // Each frame is usable as soon as it is in: whoever waits on it goes on
            // while the rest of the batch arrives.
            let mut state = self.lock();
            state.clock += 1;
            let now = state.clock;
            state.frames[f] = FrameState::Resident {
                pins: u32::from(pinned_set.contains(&f)),
                last_use: now,
            };
            state.resident_pages += self.users[f].len() as u64;
            state.fetches += 1;
            drop(state);
            self.ready.notify_all();
            written.lock().unwrap_or_else(|p| p.into_inner()).insert(f);
            if let Some(handover) = handover
                && pinned_set.contains(&f)
                && pinned_left.fetch_sub(1, Ordering::AcqRel) == 1
            {
                // Every frame the reader needs is in, pinned for it: it goes on.
                handover.answer(true);
            }
            Ok(())
        });
        let written = written.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut state = self.lock();
        state.batches += 1;
        let ok = match result {
            Ok(fetched) => {
                state.gets += fetched.requests;
                true
            }
            Err(e) => {
                // What did not arrive is absent again: a read that needs it fetches it
                // itself (and whoever waits on it wakes below and does so).
                for &f in all.iter().filter(|f| !written.contains(f)) {
                    state.frames[f] = FrameState::Absent;
                }
                let damaged = matches!(e, StoreError::Format { .. });
                let why = format!("{:#}", anyhow::Error::new(e));
                if pinned.is_empty() {
                    warn!(store = %self.url, error = %why, "prefetching or reading ahead from the object store failed: only those frames are dropped");
                    false
                } else if pinned.iter().all(|f| written.contains(f)) {
                    // The caller has what it asked for; only frames read ahead are lost.
                    warn!(store = %self.url, error = %why, "reading ahead from the object store failed");
                    true
                } else {
                    // The pins taken for the caller on frames that did arrive go back: the
                    // caller gives up.
                    for &f in pinned.iter().filter(|f| written.contains(f)) {
                        if let FrameState::Resident { pins, last_use } = state.frames[f] {
                            state.frames[f] = FrameState::Resident {
                                pins: pins.saturating_sub(1),
                                last_use,
                            };
                        }
                    }
                    warn!(store = %self.url, error = %why, "a fetch from the object store failed: its pages are lost");
                    self.losses.record(why, damaged);
                    false
                }
            }
        };
        self.evict(&mut state);
        drop(state);
        self.ready.notify_all();
        if let Some(handover) = handover {
            handover.answer(ok);
        }
        ok
    }

    /// Evicts least recently used unpinned frames while the cache is over its limit.
    fn evict(&self, state: &mut CacheState) {
        if state.resident_pages <= self.limit_pages {
            return;
        }
        let mut victims: Vec<(u64, usize)> = state
            .frames
            .iter()
            .enumerate()
            .filter_map(|(f, s)| match *s {
                FrameState::Resident { pins: 0, last_use } => Some((last_use, f)),
                _ => None,
            })
            .collect();
        victims.sort_unstable();
        for (_, f) in victims {
            if state.resident_pages <= self.limit_pages {
                break;
            }
            let mut punched = 0;
            for &(_, page) in &self.users[f] {
                match nix::fcntl::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    (page * PAGE_BYTES) as i64,
                    PAGE_BYTES as i64,
                ) {
                    Ok(()) => punched += 1,
                    Err(e) if punched == 0 => {
                        // Nothing of the frame is gone: it stays (the cache stays over its
                        // limit until a later eviction can punch).
                        warn!(error = %e, "cannot evict a page from the store cache");
                        return;
                    }
                    Err(e) => {
                        // Part of the frame is gone: it is absent, whatever the rest holds.
                        warn!(error = %e, "cannot evict a page from the store cache");
                        break;
                    }
                }
            }
            state.frames[f] = FrameState::Absent;
            state.resident_pages -= self.users[f].len() as u64;
            state.evictions += 1;
        }
    }
}

/// If a fetch unwinds (a panic): puts the frames it marked `Fetching` and did not deliver
/// back to `Absent` (their waiters wake and fetch them again instead of sleeping for ever),
/// and takes back the pins of the `pinned` frames it delivered unless their reader was told
/// they are in (it never will use them).
struct Unwinding<'a> {
    source: &'a StoreSource,
    frames: &'a [usize],
    pinned: &'a [usize],
    handover: Option<&'a Handover>,
}

impl Drop for Unwinding<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let handed_over = self.handover.and_then(Handover::given) == Some(true);
        let mut state = self.source.lock();
        for &f in self.frames {
            if state.frames[f] == FrameState::Fetching {
                state.frames[f] = FrameState::Absent;
            }
        }
        if !handed_over {
            for &f in self.pinned {
                if let FrameState::Resident { pins, last_use } = state.frames[f] {
                    state.frames[f] = FrameState::Resident {
                        pins: pins.saturating_sub(1),
                        last_use,
                    };
                }
            }
        }
        drop(state);
        self.source.ready.notify_all();
    }
}
