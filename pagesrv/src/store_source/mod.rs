//! A snapshot in an object store, served as a [`PageSource`] (`--vm-mem NAME=s3://BUCKET/NAME`).
//!
//! pagesrv is the host's cache tier: frames fetched from the store are written, page by page,
//! into a cache file of the image's size (sparse, on local disk, unlinked at once so nothing
//! is left behind) and read through a mapping of it. A frame is fetched once however many
//! sessions or requests wait on it (the others wait for it); a read pins the frames it lends
//! until the bytes are dropped; past `--store-cache-mib` the least recently used unpinned
//! frames are evicted (their pages punched out of the file). A fetch also reads ahead the
//! frames of the pages that follow, in one batch of parallel ranged GETs, and a background
//! thread fetches the recorded working set first, in its order. Zero pages are known from the
//! manifest and never fetched. Nothing is asked of the store before it is read (no HEAD).
//!
//! A fetch that fails (the store gone, a damaged frame) loses the pages of the sessions that
//! waited for them: their reads lend zeros and [`crate::source::PageSource::pages_intact`]
//! turns false for every session running then, so none sends anything wrong and each ends
//! with the reason. The frames that did not arrive are absent again: a session that starts
//! later fetches them anew (a store back after an outage serves new restores without a
//! restart of pagesrv), unless the store's bytes were damaged, which is final.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use common::mmap::Mapping;
use snapstore::layout::{Manifest, PAGE_BYTES, PageRef};
use snapstore::{Store, StoreError, StoreUrl};
use tracing::info;

use crate::source::SourceError;
use handover::Handover;
use losses::Losses;
use runs::contiguous_runs;

mod ahead;
mod fill;
mod handover;
mod losses;
mod paged;
mod runs;
pub use paged::StorePaged;

/// A frame's state in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    Absent,
    Fetching,
    Resident { pins: u32, last_use: u64 },
}

#[derive(Debug)]
struct CacheState {
    frames: Vec<FrameState>,
    /// 4 KiB pages written into the cache file.
    resident_pages: u64,
    clock: u64,
    fetches: u64,
    evictions: u64,
    /// Ranged GETs made, and the batches they came in (one round trip each).
    gets: u64,
    batches: u64,
    /// Batches still arriving whose readers went on with their own frames
    /// ([`StoreSource::fetch_leaving_early`]).
    reading_ahead: usize,
}

/// A stored snapshot served from a local cache.
pub struct StoreSource {
    url: StoreUrl,
    store: Store,
    manifest: Manifest,
    /// For each frame, the image's pages in it: (slot, 4 KiB page).
    users: Vec<Vec<(u16, u64)>>,
    file: File,
    map: Mapping,
    limit_pages: u64,
    /// Each 4 KiB page's digest ([`common::digest::piece_digest`]) once known: from the
    /// manifest for zero pages, from its frame when it arrived for the others (the
    /// verification then reads nothing again, however small the cache).
    digests: Vec<AtomicU64>,
    digest_known: Vec<AtomicBool>,
    state: Mutex<CacheState>,
    ready: Condvar,
    /// Fetches that failed and lost pages a reader waited for.
    losses: Losses,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource")
            .field("url", &self.url)
            .finish()
    }
}

/// The pins a read holds: released when the bytes it lent are dropped.
struct Pins {
    source: Arc<StoreSource>,
    frames: Vec<u32>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.source.unpin(&self.frames);
    }
}

impl StoreSource {
    /// Reads the manifest of `url` and prepares a cache of at most `limit_mib` MiB in `dir`.
    ///
    /// # Errors
    /// The store cannot be reached, the snapshot does not exist or is damaged, or the cache
    /// file cannot be made.
    pub fn open(url: &StoreUrl, dir: &Path, limit_mib: u64) -> Result<Arc<Self>, StoreError> {
        let store = Store::open(url)?;
        let manifest = store.manifest(&url.name)?;
        let mut users: Vec<Vec<(u16, u64)>> = vec![Vec::new(); manifest.frames.len()];
        for (page, at) in manifest.pages.iter().enumerate() {
            if let PageRef::Stored { frame, slot } = *at {
                users[frame as usize].push((slot, page as u64));
            }
        }
        std::fs::create_dir_all(dir).map_err(file_error("create", dir))?;
        let path = dir.join(format!(
            "pagesrv-{}-{:016x}.cache",
            std::process::id(),
            manifest.image_id
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(file_error("create", &path))?;
        // Unlinked at once: the cache lives as long as pagesrv and leaves nothing behind.
        std::fs::remove_file(&path).map_err(file_error("unlink", &path))?;
        file.set_len(manifest.size_bytes)
            .map_err(file_error("size", &path))?;
        let map =
            Mapping::file_readonly(file.as_fd(), manifest.size_bytes as usize).map_err(|e| {
                StoreError::File {
                    op: "map",
                    path: path.clone(),
                    source: std::io::Error::other(e),
                }
            })?;
        let frames = manifest.frames.len();
        let digests = (0..manifest.pages.len())
            .map(|_| AtomicU64::new(0))
            .collect();
        let digest_known = manifest
            .pages
            .iter()
            .map(|p| AtomicBool::new(*p == PageRef::Zero))
            .collect();
        info!(
            store = %url,
            pages = manifest.page_count(),
            frames,
            packs = manifest.packs.len(),
            working_set = manifest.working_set.len(),
            cache_mib = limit_mib,
            "serving a snapshot from the object store"
        );
        let source = Arc::new(StoreSource {
            url: url.clone(),
            store,
            manifest,
            users,
            file,
            map,
            limit_pages: (limit_mib << 20) / PAGE_BYTES,
            digests,
            digest_known,
            state: Mutex::new(CacheState {
                frames: vec![FrameState::Absent; frames],
                resident_pages: 0,
                clock: 0,
                fetches: 0,
                evictions: 0,
                gets: 0,
                batches: 0,
                reading_ahead: 0,
            }),
            ready: Condvar::new(),
            losses: Losses::default(),
        });
        if !source.manifest.working_set.is_empty() {
            let prefetcher = source.clone();
            std::thread::Builder::new()
                .name("store-prefetch".into())
                .spawn(move || prefetcher.prefetch_working_set())
                .map_err(file_error("start the prefetch thread of", dir))?;
        }
        Ok(source)
    }

    /// Bytes of guest memory.
    pub fn size_bytes(&self) -> u64 {
        self.manifest.size_bytes
    }

    /// The stored image's identity.
    pub fn image_id(&self) -> u64 {
        self.manifest.image_id
    }

    /// What the cache did so far.
    pub fn cache_counts(&self) -> CacheCounts {
        let state = self.lock();
        CacheCounts {
            frames_fetched: state.fetches,
            frames_evicted: state.evictions,
            gets: state.gets,
            batches: state.batches,
            mib_held: (state.resident_pages * PAGE_BYTES) >> 20,
        }
    }

    /// The recorded working set, in 4 KiB pages, if the snapshot has one.
    pub fn working_set(&self) -> Option<common::working_set::WorkingSet> {
        (!self.manifest.working_set.is_empty()).then(|| common::working_set::WorkingSet {
            page_size: PAGE_BYTES as u32,
            total_pages: self.manifest.page_count(),
            image_id: self.manifest.image_id,
            pages: self
                .manifest
                .working_set
                .iter()
                .map(|&p| u64::from(p))
                .collect(),
        })
    }

    /// A session's view in pages of `page_size` bytes.
    ///
    /// # Errors
    /// The image is not a whole number of such pages.
    pub fn paged(self: &Arc<Self>, page_size: u64) -> Result<StorePaged, SourceError> {
        if page_size < PAGE_BYTES || !self.manifest.size_bytes.is_multiple_of(page_size) {
            return Err(SourceError::BadSize {
                path: self.url.to_string().into(),
                size_bytes: self.manifest.size_bytes,
                page_size,
            });
        }
        Ok(StorePaged {
            source: self.clone(),
            page_size,
            losses_at_start: self.losses(),
        })
    }

    /// The digest of 4 KiB pages `first..end` (the sum of their piece digests), if every
    /// one is known.
    pub(super) fn known_digest(&self, first: u64, end: u64) -> Option<u64> {
        (first..end).try_fold(0u64, |sum, page| {
            self.digest_known[page as usize]
                .load(Ordering::Acquire)
                .then(|| sum.wrapping_add(self.digests[page as usize].load(Ordering::Relaxed)))
        })
    }

    /// Fetches so far that failed and lost pages.
    pub(super) fn losses(&self) -> u64 {
        self.losses.count()
    }

    /// Whether a new session can be served: not if the store's bytes were found damaged
    /// (fetching again cannot mend them); after any other failure (the store gone past the
    /// retries), a new session fetches anew.
    ///
    /// # Errors
    /// [`SourceError::Lost`] with the reason.
    pub fn check_intact(&self) -> Result<(), SourceError> {
        match self.losses.damage() {
            Some(why) => Err(self.lost(why)),
            None => Ok(()),
        }
    }

    /// A session's check, given the count of losses when its reads began.
    ///
    /// # Errors
    /// [`SourceError::Lost`] with the reason, if a fetch failed since.
    pub(super) fn check_intact_since(&self, losses_at_start: u64) -> Result<(), SourceError> {
        match self.losses.since(losses_at_start) {
            Some(why) => Err(self.lost(why)),
            None => Ok(()),
        }
    }

    fn lost(&self, why: String) -> SourceError {
        SourceError::Lost {
            what: self.url.to_string(),
            why,
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frames 4 KiB pages `first..end` are in.
    fn frames_of(&self, first: u64, end: u64) -> Vec<u32> {
        let mut frames: Vec<u32> = self.manifest.pages[first as usize..end as usize]
            .iter()
            .filter_map(|p| match *p {
                PageRef::Stored { frame, .. } => Some(frame),
                PageRef::Zero => None,
            })
            .collect();
        frames.sort_unstable();
        frames.dedup();
        frames
    }

    /// Pins the frames of 4 KiB pages `first..end`, fetching those that are absent (and
    /// reading ahead: this read goes on once its own frames are in, while the rest of the
    /// batch arrives) and waiting for those another thread fetches. Returns the pins, or
    /// `None` if a fetch failed (this one, or one it waited for: the pages are lost).
    fn pin(self: &Arc<Self>, first: u64, end: u64) -> Option<Vec<u32>> {
        let needed = self.frames_of(first, end);
        let losses = self.losses();
        let mut pinned = vec![false; needed.len()];
        let mut state = self.lock();
        loop {
            let (mut mine, mut others) = (Vec::new(), false);
            state.clock += 1;
            let now = state.clock;
            for (i, &f) in needed.iter().enumerate() {
                if pinned[i] {
                    continue;
                }
                match state.frames[f as usize] {
                    FrameState::Resident { pins, .. } => {
                        state.frames[f as usize] = FrameState::Resident {
                            pins: pins + 1,
                            last_use: now,
                        };
                        pinned[i] = true;
                    }
                    FrameState::Absent => {
                        state.frames[f as usize] = FrameState::Fetching;
                        mine.push(i);
                    }
                    FrameState::Fetching => others = true,
                }
            }
            if !mine.is_empty() {
                let frames: Vec<usize> = mine.iter().map(|&i| needed[i] as usize).collect();
                let mut ahead = self.read_ahead(&mut state, end);
                let bases = self.bases_in_use(&mut state, frames.iter().chain(&ahead));
                ahead.extend(bases);
                let leave_early = self.may_leave_early(&mut state, &ahead);
                drop(state);
                let ok = if leave_early {
                    self.fetch_leaving_early(frames, ahead)
                } else {
                    self.fetch(&frames, &ahead, None)
                };
                state = self.lock();
                if !ok {
                    drop(state);
                    self.unpin_some(&needed, &pinned);
                    return None;
                }
                // fetch() handed them over pinned.
                for i in mine {
                    pinned[i] = true;
                }
            } else if others {
                state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                if self.losses() != losses {
                    drop(state);
                    self.unpin_some(&needed, &pinned);
                    return None;
                }
            } else {
                return Some(needed);
            }
        }
    }

    fn unpin_some(&self, frames: &[u32], pinned: &[bool]) {
        let held: Vec<u32> = frames
            .iter()
            .zip(pinned)
            .filter_map(|(&f, &p)| p.then_some(f))
            .collect();
        self.unpin(&held);
    }

    fn unpin(&self, frames: &[u32]) {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        for &f in frames {
            if let FrameState::Resident { pins, .. } = state.frames[f as usize] {
                state.frames[f as usize] = FrameState::Resident {
                    pins: pins.saturating_sub(1),
                    last_use: now,
                };
            }
        }
    }
}

/// What a stored snapshot's cache did.
#[derive(Debug, Clone, Copy)]
pub struct CacheCounts {
    /// Frames fetched (a frame evicted and needed again counts again).
    pub frames_fetched: u64,
    /// Frames evicted.
    pub frames_evicted: u64,
    /// Ranged GETs.
    pub gets: u64,
    /// Batches of GETs (each one round trip).
    pub batches: u64,
    /// MiB of pages in the cache now.
    pub mib_held: u64,
}

fn file_error(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::File { op, path, source }
}
