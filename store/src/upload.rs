//! Upload: a memory file becomes a snapshot. Its pages are hashed; zero pages are only
//! noted; a page the store holds already (any snapshot's) is referred to where it is; the
//! others are compressed into frames and packs and written, each pack before its index.
//! The manifest is written last, once every pack it names is stored: a half-done upload is
//! never visible as a snapshot.
//!
//! With a recorded working set, its pages are stored first, in the order the guest first
//! touched them, in frames of their own: a restore then fetches the set in a few dense
//! ranged GETs, in its order, instead of picking its pages out of frames spread over the
//! whole image (a set of one 64 KiB block in 16 sits in nearly every frame otherwise).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use object_store::ObjectStore;
use tokio::task::JoinHandle;

use crate::layout::{
    self, FRAME_PAGES, Frame, FrameRef, Hash, Manifest, PACK_BYTES, PAGE_BYTES, PackIndex, PageRef,
};
use crate::{Store, StoreError, client};

mod delta;

/// Bytes read from the memory file at a time.
const READ_BYTES: usize = 4 << 20;
/// Packs being written at once.
const PACKS_IN_FLIGHT: usize = 4;
/// Pack indexes read at once.
const INDEX_READS: usize = 8;
/// zstd level of frames (fast, and most of a guest's redundancy is zero runs and repeats).
const LEVEL: i32 = 3;

/// What [`Store::put`] takes besides the file and the name.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Pages in the order the guest first touched them (stored in the manifest).
    pub working_set: Vec<u64>,
    /// A snapshot this one was made from (a clone's template): a page that changed from
    /// the parent's page at the same place is stored as a delta against it when that is
    /// smaller (`layout`, "delta frame").
    pub parent: Option<String>,
}

/// How far an upload is.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Pages read so far.
    pub pages_done: u64,
    /// Pages in the file.
    pub pages_total: u64,
    /// Bytes written to the store so far.
    pub bytes_written: u64,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutReport {
    /// Pages in the image.
    pub pages: u64,
    /// All-zero pages (not stored).
    pub zero_pages: u64,
    /// Pages the store held already (from other snapshots).
    pub reused_pages: u64,
    /// Pages repeated within this image (stored once).
    pub repeated_pages: u64,
    /// Pages stored by this upload.
    pub new_pages: u64,
    /// Of those, pages stored as deltas against the parent's.
    pub delta_pages: u64,
    /// Packs written.
    pub packs_written: u64,
    /// Bytes written to the store (packs, indexes, manifest).
    pub bytes_written: u64,
    /// Pack indexes in the store that could not be read (their pages were not reused).
    pub unreadable_indexes: u64,
    /// Seconds the upload took.
    pub seconds: f64,
}

/// A data page's BLAKE3 hash; `None` for an all-zero page (never stored).
fn page_hash(bytes: &[u8]) -> Option<Hash> {
    (!common::digest::is_zero(bytes)).then(|| *blake3::hash(bytes).as_bytes())
}

/// Where a page the store holds is.
#[derive(Debug, Clone, Copy)]
struct Stored {
    pack: Hash,
    frame: Frame,
    slot: u16,
}

/// What the store holds: every page by hash (in an ordinary frame where it is in one), and
/// the base pages of every delta frame by (pack, offset).
#[derive(Debug, Default)]
struct Known {
    pages: HashMap<Hash, Stored>,
    bases: HashMap<(Hash, u64), Vec<Hash>>,
    /// The parent's frames' page hashes by (pack, offset): what its pages are.
    hashes: HashMap<(Hash, u64), Vec<Hash>>,
    /// Pack indexes that could not be read (their pages are not reused).
    unreadable: u64,
}

/// Where a page this upload stores is: in the frame being filled, a closed one, or among
/// the pages waiting to be stored as deltas.
#[derive(Debug, Clone, Copy)]
enum New {
    Open(u16),
    Closed { frame: u32, slot: u16 },
    Deferred(usize),
}

impl Store {
    /// Uploads the memory file `path` as snapshot `name`, calling `progress` now and then.
    ///
    /// # Errors
    /// The name is taken, the file cannot be read or is not whole pages, the working set
    /// names a page past the end, or a request failed.
    pub fn put(
        &self,
        path: &Path,
        name: &str,
        options: &PutOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<PutReport, StoreError> {
        let started = Instant::now();
        let file = File::open(path).map_err(StoreError::file("open", path))?;
        let size = file
            .metadata()
            .map_err(StoreError::file("examine", path))?
            .len();
        if size == 0 || !size.is_multiple_of(PAGE_BYTES) {
            return Err(StoreError::BadImage {
                path: path.to_owned(),
                size,
            });
        }
        let pages_total = size / PAGE_BYTES;
        if let Some(&page) = options.working_set.iter().find(|&&p| p >= pages_total) {
            return Err(StoreError::BadWorkingSet {
                page,
                pages: pages_total,
            });
        }
        let objects = self.objects.clone();
        let manifest_key = layout::manifest_key(name);
        if self
            .runtime
            .block_on(client::object_exists(&*objects, &manifest_key))?
        {
            return Err(StoreError::Exists {
                name: name.to_owned(),
            });
        }
        let parent = match &options.parent {
            Some(name) => Some(
                self.runtime
                    .block_on(crate::download::read_manifest(&*objects, name))?
                    .0,
            ),
            None => None,
        };
        // The page hashes of the parent's frames are kept (what its pages are).
        let parent_frames: HashSet<(Hash, u64)> = parent
            .iter()
            .flat_map(|m| {
                m.frames
                    .iter()
                    .map(|f| (m.packs[f.pack as usize], f.frame.offset))
            })
            .collect();
        let known = self
            .runtime
            .block_on(known_pages(&*objects, &parent_frames))?;
        let parent = parent.map(|manifest| delta::Parent::new(manifest, &known));
        let mut b = Builder::new(self, pages_total, known);
        b.parent = parent;
        b.report.unreadable_indexes = b.known.unreadable;
        // The working set first, in its order; its last frame is closed so that no other
        // page shares one with it.
        let mut in_set = vec![false; pages_total as usize];
        let mut page_buf = vec![0u8; PAGE_BYTES as usize];
        // Whole, not as deltas: a delta would be stored last and need its bases.
        b.defer = false;
        for &page in &options.working_set {
            if std::mem::replace(&mut in_set[page as usize], true) {
                continue;
            }
            file.read_exact_at(&mut page_buf, page * PAGE_BYTES)
                .map_err(StoreError::file("read", path))?;
            b.place_page(page, &page_buf)?;
        }
        b.close_frame()?;
        b.defer = true;
        let mut buf = vec![0u8; READ_BYTES];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(READ_BYTES as u64) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .map_err(StoreError::file("read", path))?;
            for (i, bytes) in buf[..n].chunks_exact(PAGE_BYTES as usize).enumerate() {
                let page = offset / PAGE_BYTES + i as u64;
                if in_set[page as usize] {
                    // Placed already: its hash still goes into the image's, in page order.
                    b.hash_page(bytes);
                } else {
                    b.add_page(page, bytes)?;
                }
            }
            offset += n as u64;
            progress(&Progress {
                pages_done: offset / PAGE_BYTES,
                pages_total,
                bytes_written: b.report.bytes_written,
            });
        }
        b.store_deferred()?;
        let mut manifest = b.finish()?;
        manifest.working_set = options.working_set.iter().map(|&p| p as u32).collect();
        let bytes = manifest.encode();
        let mut report = b.report;
        report.bytes_written += bytes.len() as u64;
        // Only if no other upload of the name won meanwhile (the check above is not enough
        // for two uploads at once): the packs stay, as any unused pack of an upload that
        // stopped midway (shared by content, they may serve a later upload).
        if !self
            .runtime
            .block_on(client::put_new_object(&*objects, &manifest_key, bytes))?
        {
            return Err(StoreError::Exists {
                name: name.to_owned(),
            });
        }
        report.seconds = started.elapsed().as_secs_f64();
        progress(&Progress {
            pages_done: pages_total,
            pages_total,
            bytes_written: report.bytes_written,
        });
        Ok(report)
    }
}

/// Every page the store holds, from its pack indexes.
/// The page hashes of frames in `keep` are kept too ([`Known::hashes`]).
async fn known_pages(
    objects: &dyn ObjectStore,
    keep: &HashSet<(Hash, u64)>,
) -> Result<Known, StoreError> {
    let indexes: Vec<(Hash, String)> = client::list_objects(objects, "packs")
        .await?
        .into_iter()
        .filter_map(|meta| {
            let key = meta.location.to_string();
            let id = layout::parse_hex(key.strip_prefix("packs/")?.strip_suffix(".index")?)?;
            Some((id, key))
        })
        .collect();
    let mut reads = futures::stream::iter(indexes)
        .map(|(id, key)| async move { (id, client::get_object(objects, &key).await) })
        .buffer_unordered(INDEX_READS);
    let mut known = Known::default();
    while let Some((pack, got)) = reads.next().await {
        let index = match got {
            Ok(bytes) => PackIndex::decode(&bytes),
            // Removed meanwhile: its pages are simply not reused.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let Ok(index) = index else {
            known.unreadable += 1;
            continue;
        };
        let (mut hashes, mut bases) = (index.page_hashes.iter(), index.bases.iter());
        for frame in &index.frames {
            let pages: Vec<Hash> = hashes.by_ref().take(frame.pages.into()).copied().collect();
            for (slot, &hash) in pages.iter().enumerate() {
                let stored = Stored {
                    pack,
                    frame: *frame,
                    slot: slot as u16,
                };
                // A page in an ordinary frame is cheaper to read than one in a delta frame.
                known
                    .pages
                    .entry(hash)
                    .and_modify(|s| {
                        if s.frame.delta && !frame.delta {
                            *s = stored;
                        }
                    })
                    .or_insert(stored);
            }
            if keep.contains(&(pack, frame.offset)) {
                known.hashes.insert((pack, frame.offset), pages);
            }
            if frame.delta {
                let of: Vec<Hash> = bases.by_ref().take(frame.pages.into()).copied().collect();
                known.bases.insert((pack, frame.offset), of);
            }
        }
    }
    Ok(known)
}

/// The manifest being built, the frame and pack being filled, and the packs being written.
struct Builder<'a> {
    store: &'a Store,
    known: Known,
    /// The snapshot this one was made from, if given.
    parent: Option<delta::Parent>,
    /// New pages waiting to be stored as deltas against the parent's (at the end), and
    /// whether a new page may wait so.
    deferred: Vec<delta::Deferred>,
    defer: bool,
    deferred_bytes: usize,
    /// The base pages of each delta frame of the manifest.
    bases: std::collections::BTreeMap<u32, Vec<layout::PagePlace>>,
    new: HashMap<Hash, New>,
    pages: Vec<PageRef>,
    image: blake3::Hasher,
    frames: Vec<FrameRef>,
    frame_of: HashMap<(u32, u64), u32>,
    packs: Vec<Hash>,
    pack_of: HashMap<Hash, u32>,
    /// The frame being filled: its pages' bytes and hashes, and the image's pages in it.
    open_raw: Vec<u8>,
    open_hashes: Vec<Hash>,
    open_users: Vec<(u64, u16)>,
    /// The pack being filled: its slot in `packs` (reserved; its id is set when it
    /// closes), its bytes, frames and page hashes.
    open_pack: Option<u32>,
    pack_bytes: Vec<u8>,
    pack_frames: Vec<Frame>,
    pack_hashes: Vec<Hash>,
    pack_bases: Vec<Hash>,
    writes: Vec<JoinHandle<Result<u64, StoreError>>>,
    report: PutReport,
}

impl<'a> Builder<'a> {
    fn new(store: &'a Store, pages: u64, known: Known) -> Self {
        Builder {
            store,
            known,
            parent: None,
            deferred: Vec::new(),
            defer: true,
            deferred_bytes: 0,
            bases: std::collections::BTreeMap::new(),
            new: HashMap::new(),
            pages: vec![PageRef::Zero; pages as usize],
            image: blake3::Hasher::new(),
            frames: Vec::new(),
            frame_of: HashMap::new(),
            packs: Vec::new(),
            pack_of: HashMap::new(),
            open_raw: Vec::with_capacity(FRAME_PAGES * PAGE_BYTES as usize),
            open_hashes: Vec::new(),
            open_users: Vec::new(),
            open_pack: None,
            pack_bytes: Vec::new(),
            pack_frames: Vec::new(),
            pack_hashes: Vec::new(),
            pack_bases: Vec::new(),
            writes: Vec::new(),
            report: PutReport {
                pages,
                ..PutReport::default()
            },
        }
    }

    /// Adds page `page` of the image, in page order: its hash into the image's, and the
    /// page to the snapshot.
    fn add_page(&mut self, page: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.hash_page(bytes);
        self.place_page(page, bytes)
    }

    /// Adds a page's hash to the image's (pages must come in page order).
    fn hash_page(&mut self, bytes: &[u8]) {
        match page_hash(bytes) {
            None => self.image.update(&[0; 32]),
            Some(hash) => self.image.update(&hash),
        };
    }

    /// Puts page `page` into the snapshot: a zero page noted, a known one referred to, a new
    /// one into the open frame.
    fn place_page(&mut self, page: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let Some(hash) = page_hash(bytes) else {
            self.report.zero_pages += 1;
            return Ok(());
        };
        if let Some(stored) = self.known.pages.get(&hash).copied()
            && let Some(frame) = self.frame_in(stored.pack, stored.frame)
        {
            self.report.reused_pages += 1;
            self.pages[page as usize] = PageRef::Stored {
                frame,
                slot: stored.slot,
            };
            return Ok(());
        }
        match self.new.get(&hash).copied() {
            Some(New::Closed { frame, slot }) => {
                self.report.repeated_pages += 1;
                self.pages[page as usize] = PageRef::Stored { frame, slot };
            }
            Some(New::Open(slot)) => {
                self.report.repeated_pages += 1;
                self.open_users.push((page, slot));
            }
            Some(New::Deferred(at)) => {
                self.report.repeated_pages += 1;
                self.deferred[at].users.push(page);
            }
            None => {
                self.report.new_pages += 1;
                if let Some(base) = self.delta_base(page).filter(|_| self.defer) {
                    self.new.insert(hash, New::Deferred(self.deferred.len()));
                    self.deferred_bytes += bytes.len();
                    self.deferred.push(delta::Deferred {
                        hash,
                        bytes: bytes.to_vec(),
                        base,
                        users: vec![page],
                    });
                } else {
                    self.add_to_open_frame(hash, bytes, &[page])?;
                }
            }
        }
        Ok(())
    }

    /// Puts a new page (used at `users`) into the open frame, closing it when full.
    fn add_to_open_frame(
        &mut self,
        hash: Hash,
        bytes: &[u8],
        users: &[u64],
    ) -> Result<(), StoreError> {
        let slot = self.open_hashes.len() as u16;
        self.new.insert(hash, New::Open(slot));
        self.open_raw.extend_from_slice(bytes);
        self.open_hashes.push(hash);
        self.open_users
            .extend(users.iter().map(|&page| (page, slot)));
        if self.open_hashes.len() == FRAME_PAGES {
            self.close_frame()?;
        }
        Ok(())
    }

    /// The manifest's index of a frame of a stored pack (the pack and the frame are added
    /// to the manifest on first use; a delta frame's bases with it). `None`: a delta frame
    /// whose bases the store no longer lists (not reused).
    fn frame_in(&mut self, pack_id: Hash, frame: Frame) -> Option<u32> {
        let bases = if frame.delta {
            // Every base found first: a frame that cannot be reused adds nothing.
            let stored: Vec<Stored> = self
                .known
                .bases
                .get(&(pack_id, frame.offset))?
                .iter()
                .map(|hash| {
                    self.known
                        .pages
                        .get(hash)
                        .copied()
                        .filter(|s| !s.frame.delta)
                })
                .collect::<Option<_>>()?;
            let mut places = Vec::with_capacity(stored.len());
            for base in stored {
                places.push((self.frame_in(base.pack, base.frame)?, base.slot));
            }
            Some(places)
        } else {
            None
        };
        let next = self.packs.len() as u32;
        let pack = *self.pack_of.entry(pack_id).or_insert(next);
        if pack == next {
            self.packs.push(pack_id);
        }
        let next = self.frames.len() as u32;
        let index = *self.frame_of.entry((pack, frame.offset)).or_insert(next);
        if index == next {
            self.frames.push(FrameRef { pack, frame });
            if let Some(places) = bases {
                self.bases.insert(index, places);
            }
        }
        Some(index)
    }

    /// Compresses the open frame into the open pack, and closes the pack once it is full.
    fn close_frame(&mut self) -> Result<(), StoreError> {
        if self.open_hashes.is_empty() {
            return Ok(());
        }
        let pack = *self.open_pack.get_or_insert_with(|| {
            // A new pack: its slot in the manifest now, its id once it is closed.
            self.packs.push([0; 32]);
            self.packs.len() as u32 - 1
        });
        let compressed = zstd::bulk::compress(&self.open_raw, LEVEL).expect("compressing to a Vec");
        let frame = Frame {
            offset: self.pack_bytes.len() as u64,
            len: compressed.len() as u32,
            pages: self.open_hashes.len() as u16,
            raw_hash: *blake3::hash(&self.open_raw).as_bytes(),
            delta: false,
        };
        self.pack_bytes.extend_from_slice(&compressed);
        let index = self.frames.len() as u32;
        self.frames.push(FrameRef { pack, frame });
        self.pack_frames.push(frame);
        for (slot, hash) in self.open_hashes.drain(..).enumerate() {
            self.new.insert(
                hash,
                New::Closed {
                    frame: index,
                    slot: slot as u16,
                },
            );
            self.pack_hashes.push(hash);
        }
        for (page, slot) in self.open_users.drain(..) {
            self.pages[page as usize] = PageRef::Stored { frame: index, slot };
        }
        self.open_raw.clear();
        if self.pack_bytes.len() >= PACK_BYTES {
            self.close_pack()?;
        }
        Ok(())
    }

    /// Names the open pack by its hash and starts writing it (then its index).
    fn close_pack(&mut self) -> Result<(), StoreError> {
        let Some(slot) = self.open_pack.take() else {
            return Ok(());
        };
        let bytes = std::mem::take(&mut self.pack_bytes);
        let id = *blake3::hash(&bytes).as_bytes();
        self.packs[slot as usize] = id;
        self.pack_of.insert(id, slot);
        let index = PackIndex {
            frames: std::mem::take(&mut self.pack_frames),
            page_hashes: std::mem::take(&mut self.pack_hashes),
            bases: std::mem::take(&mut self.pack_bases),
        }
        .encode();
        while self.writes.len() >= PACKS_IN_FLIGHT {
            let oldest = self.writes.remove(0);
            self.report.bytes_written += self.wait(oldest)?;
        }
        let objects: Arc<dyn ObjectStore> = self.store.objects.clone();
        self.writes.push(self.store.runtime.spawn(async move {
            let written = (bytes.len() + index.len()) as u64;
            client::put_object(&*objects, &layout::pack_key(&id), bytes).await?;
            client::put_object(&*objects, &layout::index_key(&id), index).await?;
            Ok(written)
        }));
        self.report.packs_written += 1;
        Ok(())
    }

    fn wait(&self, write: JoinHandle<Result<u64, StoreError>>) -> Result<u64, StoreError> {
        self.store
            .runtime
            .block_on(write)
            .map_err(|e| StoreError::Config(format!("a pack upload stopped: {e}")))?
    }

    /// Closes what is open, waits for every pack and returns the manifest (without the
    /// working set).
    fn finish(&mut self) -> Result<Manifest, StoreError> {
        self.close_frame()?;
        self.close_pack()?;
        for write in std::mem::take(&mut self.writes) {
            self.report.bytes_written += self.wait(write)?;
        }
        Ok(Manifest {
            size_bytes: self.pages.len() as u64 * PAGE_BYTES,
            image_id: layout::image_id(&self.image),
            packs: std::mem::take(&mut self.packs),
            frames: std::mem::take(&mut self.frames),
            pages: std::mem::take(&mut self.pages),
            working_set: Vec::new(),
            bases: std::mem::take(&mut self.bases),
        })
    }
}
