//! The objects of a store and their binary formats (all integers little-endian).
//!
//! ```text
//! BUCKET/
//!   snapshots/NAME.manifest   one snapshot; written last, so a half-written upload is never seen
//!   packs/ID.pack             frames back to back (ID: the BLAKE3 of the pack's bytes, in hex)
//!   packs/ID.index            what pack ID holds: its frames and the hash of every page in them
//! ```
//!
//! The unit of deduplication is the 4 KiB page, named by its BLAKE3 hash: a page is stored
//! once in a store, whichever snapshot, VM or tenant it came from, and all-zero pages are
//! never stored. The unit of storage and of fetching is the *frame*: up to [`FRAME_PAGES`]
//! distinct pages, compressed together as one zstd frame; frames are packed into pack objects
//! of about [`PACK_BYTES`] so that a store holds few large objects, and a reader fetches a
//! frame (or a run of neighbouring frames) with one ranged GET. A snapshot's manifest maps
//! each of its pages to a frame and a slot in it (or to zero), and names the frames' packs,
//! offsets, lengths and the BLAKE3 of their decompressed bytes, which a reader checks before
//! it uses a byte.
//!
//! A *delta frame* holds pages that changed a little from pages stored before (a snapshot of
//! a clone against its template's, `store put --parent`): it is compressed with its *base*
//! pages (one per slot, in slot order) as a raw-content prefix (`frame.rs`), so a page with a
//! few bytes changed costs tens of bytes. Bases are pages of ordinary frames (never of delta frames:
//! one step to decode), named by hash in the pack index and by place in a manifest, which
//! lists their frames among its own; a reader fetches them in the same batch.
//!
//! Manifest object: `"PMSNAP02"`, the BLAKE3 of what follows (32 bytes), the body
//! compressed with zstd. Body:
//! ```text
//! size_bytes u64 | page_size u32 (4096) | frame_pages u32 | image_id u64
//! packs u32     | packs × pack id [32]
//! frames u32    | frames × { pack u32, frame, [delta: pages × base { frame u32, slot u16 }] }
//! pages u64     | pages × { frame u32 (0: a zero page; else frame index + 1), slot u16 }
//! working_set u32 | working_set × page u32   (pages in the order the guest first touched them)
//! frame = { offset u64, len u32, pages u16, raw_hash [32], delta u8 (0 or 1) }
//! ```
//! Pack index object: `"PMPKIDX2"`, the BLAKE3 of the body, the body (uncompressed):
//! ```text
//! frames u32 | frames × frame | every page's hash [32] | every delta frame's base hashes [32]
//! ```

mod codec;
mod frame;

use codec::{Reader, Writer};
use frame::decompress_bounded;
pub use frame::{compress_delta, open_delta_frame, open_frame};

use thiserror::Error;

/// Bytes of a page, the unit of deduplication.
pub const PAGE_BYTES: u64 = 4096;
/// Most distinct pages in one frame (64 KiB before compression).
pub const FRAME_PAGES: usize = 16;
/// A pack is closed once its frames reach this many bytes (compressed).
pub const PACK_BYTES: usize = 4 << 20;

const MANIFEST_MAGIC: &[u8; 8] = b"PMSNAP02";
const INDEX_MAGIC: &[u8; 8] = b"PMPKIDX2";
/// Bytes of a frame record.
const FRAME_RECORD: usize = 8 + 4 + 2 + 32 + 1;
/// Most bytes a manifest body may decompress to (a 1 TiB guest's table is 1.5 GiB; this
/// bounds what a damaged or hostile object can make a reader allocate).
const MAX_MANIFEST_BODY: usize = 2 << 30;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// One frame of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset in its pack.
    pub offset: u64,
    /// Compressed length in bytes.
    pub len: u32,
    /// Pages in it (1..=[`FRAME_PAGES`]).
    pub pages: u16,
    /// BLAKE3 of its decompressed bytes.
    pub raw_hash: Hash,
    /// Compressed against its base pages ([`Manifest::bases`], [`PackIndex::bases`]).
    pub delta: bool,
}

/// A page where a manifest stores it: slot `slot` of frame `frame` (an index into
/// [`Manifest::frames`]).
pub type PagePlace = (u32, u16);

/// A frame as a snapshot refers to it: which of the manifest's packs holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// The frame.
    pub frame: Frame,
}

/// Where one page of a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRef {
    /// All zero: not stored.
    Zero,
    /// Slot `slot` of frame `frame` (an index into [`Manifest::frames`]).
    Stored {
        /// The frame.
        frame: u32,
        /// The page's place in it.
        slot: u16,
    },
}

/// A snapshot: its size, where each page is, and the recorded working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Bytes of guest memory (a whole number of pages).
    pub size_bytes: u64,
    /// Identity of the image (from its page table): equal images, equal ids.
    pub image_id: u64,
    /// The packs its frames are in.
    pub packs: Vec<Hash>,
    /// The frames its pages are in.
    pub frames: Vec<FrameRef>,
    /// Every page, in order.
    pub pages: Vec<PageRef>,
    /// Pages in the order the guest first touched them (may be empty).
    pub working_set: Vec<u32>,
    /// The base pages of each delta frame (by its index), one per slot: pages of ordinary
    /// frames of this manifest.
    pub bases: std::collections::BTreeMap<u32, Vec<PagePlace>>,
}

/// What a pack holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    /// Its frames, in order.
    pub frames: Vec<Frame>,
    /// The hash of every page in its frames, frame by frame.
    pub page_hashes: Vec<Hash>,
    /// The hashes of the delta frames' base pages, frame by frame, one per slot.
    pub bases: Vec<Hash>,
}

/// A stored object that cannot be read as what it claims to be.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// The object does not start as the format does.
    #[error("not a {what} (wrong magic bytes)")]
    Magic {
        /// What was expected.
        what: &'static str,
    },
    /// The object is of another version of the format (an older build wrote it).
    #[error(
        "a {what} of format version {found}, which this build does not read (it reads version {reads}): upload the snapshot again with this build"
    )]
    OtherVersion {
        /// What was read.
        what: &'static str,
        /// The version it carries (the magic's last two characters).
        found: String,
        /// The version this build reads.
        reads: &'static str,
    },
    /// The object's bytes do not match the hash it carries: damaged.
    #[error("the {what} is damaged: its bytes do not match its hash")]
    Checksum {
        /// What was read.
        what: &'static str,
    },
    /// The object ends early or holds counts that do not fit.
    #[error("the {what} is malformed: {detail}")]
    Malformed {
        /// What was read.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl Manifest {
    /// Pages of guest memory.
    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.size_bytes);
        w.u32(PAGE_BYTES as u32);
        w.u32(FRAME_PAGES as u32);
        w.u64(self.image_id);
        w.u32(self.packs.len() as u32);
        for pack in &self.packs {
            w.bytes(pack);
        }
        w.u32(self.frames.len() as u32);
        for (i, f) in self.frames.iter().enumerate() {
            w.u32(f.pack);
            w.frame(&f.frame);
            if f.frame.delta {
                let bases = self.bases.get(&(i as u32)).map_or(&[][..], Vec::as_slice);
                debug_assert_eq!(
                    bases.len(),
                    usize::from(f.frame.pages),
                    "a delta frame's bases"
                );
                for slot in 0..usize::from(f.frame.pages) {
                    let (frame, slot) = bases.get(slot).copied().unwrap_or((u32::MAX, 0));
                    w.u32(frame);
                    w.u16(slot);
                }
            }
        }
        w.u64(self.pages.len() as u64);
        for page in &self.pages {
            let (frame, slot) = match *page {
                PageRef::Zero => (0, 0),
                PageRef::Stored { frame, slot } => (frame + 1, slot),
            };
            w.u32(frame);
            w.u16(slot);
        }
        w.u32(self.working_set.len() as u32);
        for &page in &self.working_set {
            w.u32(page);
        }
        let body = zstd::bulk::compress(&w.0, 3).expect("compressing to a Vec cannot fail");
        seal(MANIFEST_MAGIC, &body)
    }

    /// Reads a manifest object, checking its hash and that every reference in it is in
    /// bounds.
    ///
    /// # Errors
    /// A [`FormatError`]: wrong magic, damaged (hash mismatch) or malformed.
    pub fn decode(object: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "snapshot manifest";
        let (hash, compressed) = unseal(MANIFEST_MAGIC, object, WHAT)?;
        if blake3::hash(compressed).as_bytes() != hash {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let body = decompress_bounded(compressed, MAX_MANIFEST_BODY).ok_or_else(|| {
            FormatError::Malformed {
                what: WHAT,
                detail: "its body is not a zstd frame of a bounded size".to_owned(),
            }
        })?;
        let mut r = Reader::new(&body, WHAT);
        let size_bytes = r.u64()?;
        let page_size = r.u32()?;
        let frame_pages = r.u32()?;
        if u64::from(page_size) != PAGE_BYTES || frame_pages as usize != FRAME_PAGES {
            return Err(r.malformed(format!(
                "pages of {page_size} bytes in frames of {frame_pages}: this build reads {PAGE_BYTES} and {FRAME_PAGES}"
            )));
        }
        let image_id = r.u64()?;
        let packs = (0..r.count(32)?)
            .map(|_| r.hash())
            .collect::<Result<Vec<_>, _>>()?;
        let frame_count = r.count(4 + FRAME_RECORD)?;
        let mut frames = Vec::with_capacity(frame_count);
        let mut bases = std::collections::BTreeMap::new();
        for i in 0..frame_count {
            let pack = r.u32()?;
            if pack as usize >= packs.len() {
                return Err(r.malformed(format!("a frame names pack {pack} of {}", packs.len())));
            }
            let frame = r.frame()?;
            if frame.delta {
                let places = (0..frame.pages)
                    .map(|_| Ok((r.u32()?, r.u16()?)))
                    .collect::<Result<Vec<_>, FormatError>>()?;
                bases.insert(i as u32, places);
            }
            frames.push(FrameRef { pack, frame });
        }
        // A base is a page of an ordinary frame of this manifest (one step to decode).
        for places in bases.values() {
            for &(frame, slot) in places {
                match frames.get(frame as usize) {
                    Some(f) if !f.frame.delta && slot < f.frame.pages => {}
                    _ => {
                        return Err(r.malformed(format!(
                            "a delta frame's base is slot {slot} of frame {frame}, not a page of an ordinary frame"
                        )));
                    }
                }
            }
        }
        let page_count = r.u64()?;
        if page_count.checked_mul(PAGE_BYTES) != Some(size_bytes) {
            return Err(r.malformed(format!("{page_count} pages for {size_bytes} bytes")));
        }
        let page_count = usize::try_from(page_count)
            .ok()
            .filter(|&n| n <= r.remaining() / 6)
            .ok_or_else(|| r.malformed(format!("{page_count} pages in a short table")))?;
        let mut pages = Vec::with_capacity(page_count);
        for _ in 0..page_count {
            let (frame, slot) = (r.u32()?, r.u16()?);
            pages.push(if frame == 0 {
                PageRef::Zero
            } else {
                let f = frames.get(frame as usize - 1).ok_or_else(|| {
                    r.malformed(format!("a page names frame {frame} of {}", frames.len()))
                })?;
                if slot >= f.frame.pages {
                    return Err(r.malformed(format!(
                        "a page names slot {slot} of a frame of {} pages",
                        f.frame.pages
                    )));
                }
                PageRef::Stored {
                    frame: frame - 1,
                    slot,
                }
            });
        }
        let ws_count = r.count(4)?;
        let mut working_set = Vec::with_capacity(ws_count);
        for _ in 0..ws_count {
            let page = r.u32()?;
            if u64::from(page) >= page_count as u64 {
                return Err(r.malformed(format!("working-set page {page} past the end")));
            }
            working_set.push(page);
        }
        r.finish()?;
        Ok(Manifest {
            size_bytes,
            image_id,
            packs,
            frames,
            pages,
            working_set,
            bases,
        })
    }
}

impl PackIndex {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.frames.len() as u32);
        for f in &self.frames {
            w.frame(f);
        }
        for h in self.page_hashes.iter().chain(&self.bases) {
            w.bytes(h);
        }
        seal(INDEX_MAGIC, &w.0)
    }

    /// Reads a pack index object.
    ///
    /// # Errors
    /// A [`FormatError`]: wrong magic, damaged or malformed.
    pub fn decode(object: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "pack index";
        let (hash, body) = unseal(INDEX_MAGIC, object, WHAT)?;
        if blake3::hash(body).as_bytes() != hash {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let mut r = Reader::new(body, WHAT);
        let frames = (0..r.count(FRAME_RECORD)?)
            .map(|_| r.frame())
            .collect::<Result<Vec<_>, _>>()?;
        let pages: usize = frames.iter().map(|f| usize::from(f.pages)).sum();
        let based: usize = frames
            .iter()
            .filter(|f| f.delta)
            .map(|f| usize::from(f.pages))
            .sum();
        if pages + based != r.remaining() / 32 {
            return Err(r.malformed(format!(
                "{pages} pages and {based} bases in frames, {} hashes",
                r.remaining() / 32
            )));
        }
        let page_hashes = (0..pages)
            .map(|_| r.hash())
            .collect::<Result<Vec<_>, _>>()?;
        let bases = (0..based)
            .map(|_| r.hash())
            .collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(PackIndex {
            frames,
            page_hashes,
            bases,
        })
    }
}

/// Identity of an image, from a BLAKE3 hasher fed every page's hash in order (32 zero bytes
/// for a zero page): equal page contents, equal ids; never 0.
pub fn image_id(pages: &blake3::Hasher) -> u64 {
    let hash = pages.finalize();
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// The key of a snapshot's manifest.
pub fn manifest_key(name: &str) -> String {
    format!("snapshots/{name}.manifest")
}

/// The key of a pack.
pub fn pack_key(id: &Hash) -> String {
    format!("packs/{}.pack", hex(id))
}

/// The key of a pack's index.
pub fn index_key(id: &Hash) -> String {
    format!("packs/{}.index", hex(id))
}

/// A hash in lower-case hex.
pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pack id from the hex in its key, if it is one.
pub fn parse_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The object: `magic`, the BLAKE3 of `body`, `body`.
fn seal(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out.extend_from_slice(body);
    out
}

/// The hash and the body of an object [`seal`] made.
fn unseal<'a>(
    magic: &'static [u8; 8],
    object: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), FormatError> {
    if object.len() >= 8 && object[..6] == magic[..6] && object[6..8] != magic[6..8] {
        return Err(FormatError::OtherVersion {
            what,
            found: String::from_utf8_lossy(&object[6..8]).into_owned(),
            reads: std::str::from_utf8(&magic[6..8]).unwrap_or("?"),
        });
    }
    if object.len() < 40 || &object[..8] != magic {
        return Err(FormatError::Magic { what });
    }
    Ok((&object[8..40], &object[40..]))
}

#[cfg(test)]
mod tests;
