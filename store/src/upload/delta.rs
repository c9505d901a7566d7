//! Pages stored as deltas against a parent snapshot's (`store put --parent`): a new page
//! whose parent page (same place) is data waits until the image is read; then the parent
//! pages are fetched (once each, in parallel ranged GETs) and the waiting pages are stored
//! sixteen at a time as delta frames, compressed with their parent pages as zstd's
//! dictionary, or as an ordinary frame when that is not smaller.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use crate::StoreError;
use crate::layout::{
    self, FRAME_PAGES, Frame, FrameRef, Hash, Manifest, PACK_BYTES, PAGE_BYTES, PageRef,
};

use super::{Builder, Known, LEVEL, New};

/// Most bytes of pages waiting to be stored as deltas; past it, new pages are stored whole.
const MAX_DEFERRED_BYTES: usize = 256 << 20;

/// The parent snapshot: for each of its pages, the hash of the page a changed page at that
/// place is stored against (the parent's page, or, if that is a delta, its base: a delta
/// is never the base of another).
pub(super) struct Parent {
    bases: Vec<Option<Hash>>,
}

impl Parent {
    pub(super) fn new(manifest: Manifest, known: &Known) -> Self {
        let bases = manifest
            .pages
            .iter()
            .map(|page| {
                let PageRef::Stored { frame, slot } = *page else {
                    return None;
                };
                let at = &manifest.frames[frame as usize];
                let key = (manifest.packs[at.pack as usize], at.frame.offset);
                let hashes = if at.frame.delta {
                    known.bases.get(&key)?
                } else {
                    known.hashes.get(&key)?
                };
                hashes.get(usize::from(slot)).copied()
            })
            .collect();
        Parent { bases }
    }
}

/// A new page waiting to be stored as a delta.
pub(super) struct Deferred {
    pub hash: Hash,
    pub bytes: Vec<u8>,
    /// The page it is stored against.
    pub base: Hash,
    /// The image's pages that hold it.
    pub users: Vec<u64>,
}

impl Builder<'_> {
    /// The page a new page at `page` would be stored against, if it may wait for that.
    pub(super) fn delta_base(&self, page: u64) -> Option<Hash> {
        if self.deferred_bytes >= MAX_DEFERRED_BYTES {
            return None;
        }
        let base = (*self.parent.as_ref()?.bases.get(page as usize)?)?;
        // A base must be a page of an ordinary frame that the store still lists.
        self.known
            .pages
            .get(&base)
            .filter(|s| !s.frame.delta)
            .map(|_| base)
    }

    /// Stores the waiting pages: fetches their bases, then writes delta frames (or
    /// ordinary ones where a delta is not smaller).
    pub(super) fn store_deferred(&mut self) -> Result<(), StoreError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let bases = self.fetch_bases()?;
        let deferred = std::mem::take(&mut self.deferred);
        let mut raw = Vec::with_capacity(FRAME_PAGES * PAGE_BYTES as usize);
        let mut dictionary = Vec::with_capacity(FRAME_PAGES * PAGE_BYTES as usize);
        for chunk in deferred.chunks(FRAME_PAGES) {
            raw.clear();
            dictionary.clear();
            for d in chunk {
                raw.extend_from_slice(&d.bytes);
                dictionary.extend_from_slice(&bases[&d.base]);
            }
            let delta = layout::compress_delta(&raw, &dictionary, LEVEL);
            let whole = zstd::bulk::compress(&raw, LEVEL).expect("compressing to a Vec");
            if let Some(delta) = delta.filter(|d| d.len() < whole.len()) {
                self.write_delta_frame(chunk, &raw, &delta)?;
            } else {
                for d in chunk {
                    self.add_to_open_frame(d.hash, &d.bytes, &d.users)?;
                }
            }
        }
        Ok(())
    }

    /// The bytes of every waiting page's base, fetched from the store.
    fn fetch_bases(&self) -> Result<HashMap<Hash, Vec<u8>>, StoreError> {
        let wanted: BTreeSet<Hash> = self.deferred.iter().map(|d| d.base).collect();
        // A manifest of just the frames that hold them.
        let mut frames: Vec<FrameRef> = Vec::new();
        let mut packs: Vec<Hash> = Vec::new();
        let mut frame_of: HashMap<(Hash, u64), usize> = HashMap::new();
        let mut slots: HashMap<usize, Vec<(u16, Hash)>> = HashMap::new();
        for &hash in &wanted {
            let stored = self.known.pages[&hash];
            let f = *frame_of
                .entry((stored.pack, stored.frame.offset))
                .or_insert_with(|| {
                    let pack = packs
                        .iter()
                        .position(|p| *p == stored.pack)
                        .unwrap_or_else(|| {
                            packs.push(stored.pack);
                            packs.len() - 1
                        });
                    frames.push(FrameRef {
                        pack: pack as u32,
                        frame: stored.frame,
                    });
                    frames.len() - 1
                });
            slots.entry(f).or_default().push((stored.slot, hash));
        }
        let manifest = Manifest {
            size_bytes: 0,
            image_id: 0,
            packs,
            frames,
            pages: Vec::new(),
            working_set: Vec::new(),
            bases: Default::default(),
        };
        let all: Vec<usize> = (0..manifest.frames.len()).collect();
        let got = Mutex::new(HashMap::with_capacity(wanted.len()));
        self.store.runtime.block_on(crate::download::fetch_frames(
            &*self.store.objects,
            &manifest,
            &all,
            &|f, raw| {
                let mut got = got.lock().unwrap_or_else(|p| p.into_inner());
                for &(slot, hash) in &slots[&f] {
                    let page =
                        &raw[usize::from(slot) * PAGE_BYTES as usize..][..PAGE_BYTES as usize];
                    got.insert(hash, page.to_vec());
                }
                Ok(())
            },
        ))?;
        Ok(got.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes `chunk` as one delta frame (`compressed` from `raw`) into the open pack.
    fn write_delta_frame(
        &mut self,
        chunk: &[Deferred],
        raw: &[u8],
        compressed: &[u8],
    ) -> Result<(), StoreError> {
        let pack = *self.open_pack.get_or_insert_with(|| {
            self.packs.push([0; 32]);
            self.packs.len() as u32 - 1
        });
        let frame = Frame {
            offset: self.pack_bytes.len() as u64,
            len: compressed.len() as u32,
            pages: chunk.len() as u16,
            raw_hash: *blake3::hash(raw).as_bytes(),
            delta: true,
        };
        self.pack_bytes.extend_from_slice(compressed);
        let index = self.frames.len() as u32;
        self.frames.push(FrameRef { pack, frame });
        self.pack_frames.push(frame);
        let mut places = Vec::with_capacity(chunk.len());
        for (slot, d) in chunk.iter().enumerate() {
            let slot = slot as u16;
            self.pack_hashes.push(d.hash);
            self.pack_bases.push(d.base);
            self.new.insert(d.hash, New::Closed { frame: index, slot });
            for &page in &d.users {
                self.pages[page as usize] = PageRef::Stored { frame: index, slot };
            }
            let base = self.known.pages[&d.base];
            let base_frame = self
                .frame_in(base.pack, base.frame)
                .expect("a base is a page of an ordinary frame");
            places.push((base_frame, base.slot));
        }
        self.bases.insert(index, places);
        self.report.delta_pages += chunk.len() as u64;
        if self.pack_bytes.len() >= PACK_BYTES {
            self.close_pack()?;
        }
        Ok(())
    }
}
