//! Download: a snapshot back into a memory file. Each frame the snapshot uses is fetched
//! once (neighbouring frames of a pack in one ranged GET), checked against its hash, and its
//! pages written where the snapshot has them; zero pages stay holes. The file appears under
//! its name only when every page is in it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::layout::{self, Manifest, PAGE_BYTES, PagePlace, PageRef};
use crate::{Store, StoreError, client};

/// Neighbouring frames are fetched together up to this many bytes: a connection to an
/// object store carries ≈ 100 MB/s, so larger ranges arrive later than the same bytes in
/// parallel GETs of this size (and a frame is usable only once its GET is in).
const RANGE_BYTES: u64 = 1 << 20;
/// Frames of a pack this close are fetched in one GET, the bytes between them read and
/// dropped: reading 256 KiB more costs ≈ 2 ms at 1 Gbit/s, a tenth of a 20 ms round trip
/// (a larger gap made sparse batches read whole packs: 50× the bytes they needed).
const MAX_GAP: u64 = 256 << 10;
/// Ranged GETs in flight (their frames are still handed over in the caller's order).
const GETS_IN_FLIGHT: usize = 32;
/// Threads that decode one GET's frames at most.
const MAX_DECODERS: usize = 4;
/// Frames below which a GET's frames are not split among threads (a thread costs ≈ 20 µs
/// to start; a frame ≈ 60 µs to decode).
const MIN_FRAMES_PER_DECODER: usize = 8;

/// What a download did.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetReport {
    /// Pages in the image.
    pub pages: u64,
    /// Zero pages (not fetched).
    pub zero_pages: u64,
    /// Frames fetched (each once).
    pub frames: u64,
    /// Ranged GETs made (the manifest's not counted).
    pub requests: u64,
    /// Bytes fetched (the manifest's included).
    pub bytes_fetched: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Frames of the manifest (indexes into [`Manifest::frames`]) that lie back to back in one
/// pack, in order: fetched with one ranged GET.
type Run = Vec<usize>;

impl Store {
    /// Reads and checks snapshot `name`'s manifest.
    ///
    /// # Errors
    /// [`StoreError::NoSnapshot`], a failed request, or a damaged manifest.
    pub fn manifest(&self, name: &str) -> Result<Manifest, StoreError> {
        self.runtime
            .block_on(read_manifest(&*self.objects, name))
            .map(|(m, _)| m)
    }

    /// Writes snapshot `name` into a new file `out` (replacing one that exists), fetching
    /// every frame it uses once and checking each against its hash.
    ///
    /// # Errors
    /// No such snapshot, a failed request, a damaged object, or the file cannot be written;
    /// then `out` is left as it was.
    pub fn get(&self, name: &str, out: &Path) -> Result<GetReport, StoreError> {
        let started = Instant::now();
        let partial = PathBuf::from(format!("{}.partial", out.display()));
        let result = self
            .runtime
            .block_on(download(&*self.objects, name, &partial));
        let mut report = match result {
            Ok(report) => report,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        std::fs::rename(&partial, out).map_err(StoreError::file("rename into place", out))?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// The manifest of `name`, and its size in bytes.
pub(crate) async fn read_manifest(
    objects: &dyn object_store::ObjectStore,
    name: &str,
) -> Result<(Manifest, u64), StoreError> {
    let key = layout::manifest_key(name);
    let bytes = match client::get_object(objects, &key).await {
        Err(e) if e.is_not_found() => {
            return Err(StoreError::NoSnapshot {
                name: name.to_owned(),
            });
        }
        other => other?,
    };
    let manifest = Manifest::decode(&bytes).map_err(|source| StoreError::Format { key, source })?;
    Ok((manifest, bytes.len() as u64))
}

async fn download(
    objects: &dyn object_store::ObjectStore,
    name: &str,
    out: &Path,
) -> Result<GetReport, StoreError> {
    let (manifest, manifest_bytes) = read_manifest(objects, name).await?;
    let file = File::create(out).map_err(StoreError::file("create", out))?;
    file.set_len(manifest.size_bytes)
        .map_err(StoreError::file("size", out))?;
    // Which pages each frame holds.
    let mut users: Vec<Vec<(u16, u64)>> = vec![Vec::new(); manifest.frames.len()];
    let mut report = GetReport {
        pages: manifest.page_count(),
        bytes_fetched: manifest_bytes,
        ..GetReport::default()
    };
    for (page, at) in manifest.pages.iter().enumerate() {
        match *at {
            PageRef::Zero => report.zero_pages += 1,
            PageRef::Stored { frame, slot } => users[frame as usize].push((slot, page as u64)),
        }
    }
    let wanted: Vec<usize> = (0..manifest.frames.len())
        .filter(|&f| !users[f].is_empty())
        .collect();
    let fetched = fetch_frames(objects, &manifest, &wanted, &|f, raw| {
        for &(slot, page) in &users[f] {
            let page_bytes = &raw[usize::from(slot) * PAGE_BYTES as usize..][..PAGE_BYTES as usize];
            file.write_all_at(page_bytes, page * PAGE_BYTES)
                .map_err(StoreError::file("write", out))?;
        }
        Ok(())
    })
    .await?;
    report.frames = wanted.len() as u64;
    report.requests = fetched.requests;
    report.bytes_fetched += fetched.bytes;
    Ok(report)
}

/// What [`Store::fetch_frames`] hands each frame to: its index in the manifest and its
/// pages' bytes, checked. Called from several threads at once (the frames of a GET are
/// decoded in parallel).
pub type OnFrame<'a> = dyn Fn(usize, &[u8]) -> Result<(), StoreError> + Sync + 'a;

/// What fetching frames took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetched {
    /// Ranged GETs made.
    pub requests: u64,
    /// Bytes they returned.
    pub bytes: u64,
}

impl Store {
    /// Fetches frames `frames` (indexes into `manifest.frames`): neighbouring frames of a
    /// pack in one ranged GET, up to `GETS_IN_FLIGHT` (32) at once; checks each against its hash and
    /// hands it, decompressed, to `on_frame`. GETs are made and opened in the order of
    /// `frames` (each by its earliest frame there): list first what is needed first (a
    /// fault's frames before what is read ahead, a working set in its order), as later GETs
    /// that arrive first wait for it.
    ///
    /// # Errors
    /// A failed request, a damaged frame, or `on_frame`'s error.
    pub fn fetch_frames(
        &self,
        manifest: &Manifest,
        frames: &[usize],
        on_frame: &OnFrame<'_>,
    ) -> Result<Fetched, StoreError> {
        self.runtime
            .block_on(fetch_frames(&*self.objects, manifest, frames, on_frame))
    }
}

pub(crate) async fn fetch_frames(
    objects: &dyn object_store::ObjectStore,
    manifest: &Manifest,
    frames: &[usize],
    on_frame: &OnFrame<'_>,
) -> Result<Fetched, StoreError> {
    // Delta frames need their base pages: the ordinary frames that hold them come in the
    // same batch (handed to `on_frame` only if asked for), and only the base pages are kept,
    // each until the last delta frame that needs it is open.
    let wanted: HashSet<usize> = frames.iter().copied().collect();
    let mut uses: HashMap<PagePlace, usize> = HashMap::new();
    for &f in &wanted {
        for &place in manifest.bases.get(&(f as u32)).into_iter().flatten() {
            *uses.entry(place).or_default() += 1;
        }
    }
    let mut slots: HashMap<u32, Vec<u16>> = HashMap::new();
    for &(f, slot) in uses.keys() {
        slots.entry(f).or_default().push(slot);
    }
    let base_frames: HashSet<usize> = slots.keys().map(|&f| f as usize).collect();
    let mut all: Vec<usize> = frames.to_vec();
    all.extend(base_frames.iter().filter(|f| !wanted.contains(f)));
    let runs = in_callers_order(manifest, runs(manifest, &all), frames);
    let decoders = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_DECODERS);
    let mut fetched = Fetched {
        requests: runs.len() as u64,
        bytes: 0,
    };
    let bases = Mutex::new(Bases {
        pages: HashMap::new(),
        uses,
        slots,
    });
    // Delta frames whose bases had not all come in: (frame, key, compressed bytes).
    let waiting: Mutex<Vec<(usize, String, bytes::Bytes)>> = Mutex::new(Vec::new());
    let mut gets = futures::stream::iter(runs)
        .map(|run| async move {
            let first = &manifest.frames[run[0]];
            let last = &manifest.frames[run[run.len() - 1]];
            let key = layout::pack_key(&manifest.packs[first.pack as usize]);
            let range = first.frame.offset..last.frame.offset + u64::from(last.frame.len);
            let bytes = client::get_object_range(objects, &key, range).await?;
            Ok::<_, StoreError>((run, key, bytes))
        })
        .buffered(GETS_IN_FLIGHT);
    let damaged = |key: &str, frame: &layout::Frame| {
        let key = format!("{key} at byte {}", frame.offset);
        move |source| StoreError::Format { key, source }
    };
    // Opens delta frame `f` if its bases are in; false if not yet.
    let open_delta = |f: usize, key: &str, compressed: &[u8]| -> Result<bool, StoreError> {
        let frame = &manifest.frames[f].frame;
        let places = manifest
            .bases
            .get(&(f as u32))
            .map_or(&[][..], Vec::as_slice);
        let Some(dictionary) = bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dictionary(places)
        else {
            return Ok(false);
        };
        let raw = layout::open_delta_frame(compressed, frame, &dictionary)
            .map_err(damaged(key, frame))?;
        bases.lock().unwrap_or_else(|p| p.into_inner()).used(places);
        on_frame(f, &raw)?;
        Ok(true)
    };
    while let Some((run, key, bytes)) = gets.try_next().await? {
        fetched.bytes += bytes.len() as u64;
        // The GETs still in flight go on meanwhile (their bytes wait in the sockets).
        let start = manifest.frames[run[0]].frame.offset;
        let open = |f: usize| -> Result<(), StoreError> {
            let frame = &manifest.frames[f].frame;
            let at = (frame.offset - start) as usize;
            let compressed = bytes.slice(at..at + frame.len as usize);
            if frame.delta {
                if !open_delta(f, &key, &compressed)? {
                    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                    waiting.push((f, key.clone(), compressed));
                }
                return Ok(());
            }
            let raw = layout::open_frame(&compressed, frame).map_err(damaged(&key, frame))?;
            if base_frames.contains(&f) {
                bases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keep(f as u32, &raw);
            }
            if wanted.contains(&f) {
                on_frame(f, &raw)?;
            }
            Ok(())
        };
        decode_in_parallel(&run, decoders, &open)?;
        // Delta frames whose bases came in since.
        let parked = std::mem::take(&mut *waiting.lock().unwrap_or_else(|p| p.into_inner()));
        for (f, key, compressed) in parked {
            if !open_delta(f, &key, &compressed)? {
                waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((f, key, compressed));
            }
        }
    }
    if let Some((f, key, _)) = waiting
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .first()
    {
        return Err(StoreError::Format {
            key: key.clone(),
            source: layout::FormatError::Malformed {
                what: "delta frame",
                detail: format!("frame {f}'s base pages never came"),
            },
        });
    }
    Ok(fetched)
}

/// The base pages a fetch holds for its delta frames.
struct Bases {
    /// Each base page that came in, until its last use.
    pages: HashMap<PagePlace, Vec<u8>>,
    /// Delta-frame slots still to open that use each base page.
    uses: HashMap<PagePlace, usize>,
    /// The slots of each base frame that are base pages.
    slots: HashMap<u32, Vec<u16>>,
}

impl Bases {
    /// Keeps the base pages of ordinary frame `frame` (its decompressed bytes `raw`).
    fn keep(&mut self, frame: u32, raw: &[u8]) {
        for &slot in self.slots.get(&frame).into_iter().flatten() {
            let page = &raw[usize::from(slot) * PAGE_BYTES as usize..][..PAGE_BYTES as usize];
            self.pages.insert((frame, slot), page.to_vec());
        }
    }

    /// The dictionary of a delta frame with bases `places`, if they all came in.
    fn dictionary(&self, places: &[PagePlace]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(places.len() * PAGE_BYTES as usize);
        for place in places {
            out.extend_from_slice(self.pages.get(place)?);
        }
        Some(out)
    }

    /// A delta frame with bases `places` is open: drops the pages nothing else needs.
    fn used(&mut self, places: &[PagePlace]) {
        for place in places {
            if let Some(n) = self.uses.get_mut(place) {
                *n -= 1;
                if *n == 0 {
                    self.uses.remove(place);
                    self.pages.remove(place);
                }
            }
        }
    }
}

/// Runs `open` on every frame of `run`, on up to `threads` threads (this one included): a
/// GET's frames are independent, and decoding them is most of a fetch's CPU. The first
/// error is returned (the others' frames may have been opened).
fn decode_in_parallel(
    run: &[usize],
    threads: usize,
    open: &(dyn Fn(usize) -> Result<(), StoreError> + Sync),
) -> Result<(), StoreError> {
    let threads = threads
        .min(run.len().div_ceil(MIN_FRAMES_PER_DECODER))
        .max(1);
    if threads == 1 {
        return run.iter().try_for_each(|&f| open(f));
    }
    let share = run.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut parts = run.chunks(share);
        let mine = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| s.spawn(move || part.iter().try_for_each(|&f| open(f))))
            .collect();
        let first = mine.iter().try_for_each(|&f| open(f));
        others
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .fold(first, Result::and)
    })
}

/// `runs` ordered by the earliest place any of their frames has in `frames`, a delta
/// frame's bases taking its place just before it (so that it is not parked), stably.
fn in_callers_order(manifest: &Manifest, mut runs: Vec<Run>, frames: &[usize]) -> Vec<Run> {
    // (place in `frames`, 0 for a base, 1 for the frame itself)
    let mut place: HashMap<usize, (usize, u8)> = HashMap::with_capacity(frames.len());
    for (i, &f) in frames.iter().enumerate() {
        let at = place.entry(f).or_insert((i, 1));
        *at = (*at).min((i, 1));
        for &(base, _) in manifest.bases.get(&(f as u32)).into_iter().flatten() {
            let at = place.entry(base as usize).or_insert((i, 0));
            *at = (*at).min((i, 0));
        }
    }
    runs.sort_by_cached_key(|run| {
        run.iter()
            .filter_map(|f| place.get(f).copied())
            .min()
            .unwrap_or((usize::MAX, 0))
    });
    runs
}

/// The frames `wanted`, grouped into runs of one pack whose gaps are at most [`MAX_GAP`]
/// (at most [`RANGE_BYTES`] from the first frame's start to the last's end): one ranged GET
/// per run.
fn runs(manifest: &Manifest, wanted: &[usize]) -> Vec<Run> {
    let mut order = wanted.to_vec();
    order.sort_by_key(|&f| (manifest.frames[f].pack, manifest.frames[f].frame.offset, f));
    order.dedup();
    let mut runs: Vec<Run> = Vec::new();
    for f in order {
        let this = &manifest.frames[f];
        if let Some(run) = runs.last_mut() {
            let (first, prev) = (
                &manifest.frames[run[0]],
                &manifest.frames[run[run.len() - 1]],
            );
            let prev_end = prev.frame.offset + u64::from(prev.frame.len);
            let end = this.frame.offset + u64::from(this.frame.len);
            if prev.pack == this.pack
                && this.frame.offset >= prev_end
                && this.frame.offset - prev_end <= MAX_GAP
                && end - first.frame.offset <= RANGE_BYTES
            {
                run.push(f);
                continue;
            }
        }
        runs.push(vec![f]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Frame, FrameRef};
    use std::sync::Mutex;

    #[test]
    fn test_a_gets_frames_are_each_opened_once_on_several_threads_and_errors_come_back() {
        for (frames, threads) in [(1, 4), (7, 4), (100, 1), (100, 3), (1000, 4)] {
            let run: Vec<usize> = (0..frames).collect();
            let seen = Mutex::new(Vec::new());
            let open = |f: usize| {
                seen.lock().unwrap().push((f, std::thread::current().id()));
                Ok(())
            };
            decode_in_parallel(&run, threads, &open).unwrap();
            let mut seen = seen.into_inner().unwrap();
            let used: std::collections::HashSet<_> = seen.iter().map(|(_, t)| *t).collect();
            seen.sort_unstable_by_key(|(f, _)| *f);
            assert_eq!(seen.iter().map(|(f, _)| *f).collect::<Vec<_>>(), run);
            let most = threads.min(frames.div_ceil(MIN_FRAMES_PER_DECODER));
            assert!(
                used.len() <= most.max(1),
                "{frames} frames, {threads} threads"
            );
            if frames >= 100 && threads > 1 {
                assert!(used.len() > 1, "{frames} frames were not shared");
            }
        }
        let failing = |f: usize| {
            if f == 63 {
                Err(StoreError::NoSnapshot { name: "x".into() })
            } else {
                Ok(())
            }
        };
        let run: Vec<usize> = (0..100).collect();
        assert!(matches!(
            decode_in_parallel(&run, 4, &failing),
            Err(StoreError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn test_neighbouring_frames_of_a_pack_are_fetched_together() {
        let frame = |pack, offset, len| FrameRef {
            pack,
            frame: Frame {
                offset,
                len,
                pages: 1,
                raw_hash: [0; 32],
                delta: false,
            },
        };
        let far = 310 + MAX_GAP + 1;
        let manifest = Manifest {
            size_bytes: PAGE_BYTES,
            image_id: 1,
            packs: vec![[1; 32], [2; 32]],
            // Out of order on purpose; frame 4 is in the other pack, frame 5 too far.
            frames: vec![
                frame(0, 100, 50),
                frame(0, 0, 100),
                frame(0, 300, 10),
                frame(0, 150, 150),
                frame(1, 150, 10),
                frame(0, far, 10),
            ],
            pages: vec![PageRef::Zero],
            working_set: vec![],
            bases: Default::default(),
        };
        // Frame 3 is not wanted: the gap it leaves is read in the same GET.
        let runs = runs(&manifest, &[0, 1, 2, 4, 5]);
        assert_eq!(runs, vec![vec![1, 0, 2], vec![5], vec![4]]);
        let all = super::runs(&manifest, &[0, 1, 2, 3, 4, 5, 2]);
        assert_eq!(all, vec![vec![1, 0, 3, 2], vec![5], vec![4]]);

        // Made and opened in the caller's order: the run of what it lists first comes first
        // (frame 4 before frame 5 before the run of 1, 0, 2).
        let ordered = in_callers_order(&manifest, runs.clone(), &[4, 5, 2, 0, 1]);
        assert_eq!(ordered, vec![vec![4], vec![5], vec![1, 0, 2]]);
        // A delta frame's bases take its place, just before it: frame 5 as delta over a
        // page of frame 4, listed before frame 4's own place.
        let mut with_delta = manifest.clone();
        with_delta.bases.insert(5, vec![(4, 0)]);
        let ordered = in_callers_order(&with_delta, runs, &[0, 5, 4]);
        assert_eq!(ordered, vec![vec![1, 0, 2], vec![4], vec![5]]);
        let ordered = in_callers_order(&with_delta, super::runs(&with_delta, &[5, 4, 1]), &[5, 1]);
        assert_eq!(ordered, vec![vec![4], vec![5], vec![1]]);
    }
}
