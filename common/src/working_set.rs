//! A recorded working set: the pages a guest faulted on, in the order it first touched them
//! (`faultd --record-working-set FILE`), pushed first by a later migration or restore of the
//! same memory image (`pagesrv --prefetch FILE`).
//!
//! The file (little-endian):
//!
//! ```text
//! magic        8 bytes  "PMWSET\0\0"
//! version      u32      1
//! page_size    u32      bytes per page of the image it was recorded on
//! total_pages  u64      pages of that image
//! image_id     u64      pagesrv's id of that image (device, inode, size, mtime)
//! count        u64      pages that follow
//! pages        count × u64, page indices in first-touch order, each once
//! checksum     u64      XXH3-64 of every byte before it
//! ```
//!
//! A file is trusted only when it decodes whole (magic, version, length, checksum, every page
//! in range and listed once) and names the image it is used with: anything else is an error
//! the caller reports and then ignores the file.

use std::path::Path;

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::pagemap::PageMap;

const MAGIC: &[u8; 8] = b"PMWSET\0\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 8;
/// Most pages a file may list: one entry per page of a 64 TiB guest of 4 KiB pages.
const MAX_PAGES: u64 = 1 << 34;

/// Why a working-set file was not used.
#[derive(Debug, Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("cannot {what} {path}")]
    Io {
        /// "read" or "write".
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a working-set file, or damaged.
    #[error("not a valid working-set file: {0}")]
    Corrupt(String),
    /// A working set of another memory image.
    #[error(
        "recorded on another memory image (image {recorded_image:016x}, {recorded_pages} pages of {recorded_page_size} bytes; this one is {image:016x}, {pages} pages of {page_size} bytes)"
    )]
    Foreign {
        /// The image it was recorded on.
        recorded_image: u64,
        /// Its pages.
        recorded_pages: u64,
        /// Its page size.
        recorded_page_size: u32,
        /// The image at hand.
        image: u64,
        /// Its pages.
        pages: u64,
        /// Its page size.
        page_size: u32,
    },
}

/// The pages a guest first touched, in order, and the image they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Bytes per page of the image.
    pub page_size: u32,
    /// Pages of the image.
    pub total_pages: u64,
    /// pagesrv's id of the image.
    pub image_id: u64,
    /// Page indices in first-touch order, each once.
    pub pages: Vec<u64>,
}

impl WorkingSet {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 8 * self.pages.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.total_pages.to_le_bytes());
        out.extend_from_slice(&self.image_id.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for page in &self.pages {
            out.extend_from_slice(&page.to_le_bytes());
        }
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes and checks a file's bytes.
    ///
    /// # Errors
    /// [`WorkingSetError::Corrupt`] for anything but a whole, consistent file.
    pub fn decode(bytes: &[u8]) -> Result<Self, WorkingSetError> {
        let corrupt = |why: String| WorkingSetError::Corrupt(why);
        if bytes.len() < HEADER_BYTES + 8 {
            return Err(corrupt(format!("{} bytes is too short", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("wrong magic".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(format!(
                "version {version} (this build reads {VERSION})"
            )));
        }
        let (page_size, total_pages, image_id, count) =
            (u32_at(12), u64_at(16), u64_at(24), u64_at(32));
        if count > MAX_PAGES || count > total_pages {
            return Err(corrupt(format!(
                "{count} pages listed for an image of {total_pages}"
            )));
        }
        let expected = HEADER_BYTES as u64 + 8 * count + 8;
        if bytes.len() as u64 != expected {
            return Err(corrupt(format!(
                "{} bytes, {expected} expected for {count} pages",
                bytes.len()
            )));
        }
        let body = bytes.len() - 8;
        if xxh3_64(&bytes[..body]) != u64_at(body) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut pages = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let page = u64_at(HEADER_BYTES + 8 * i);
            if page >= total_pages {
                return Err(corrupt(format!(
                    "page {page} is past the image's {total_pages}"
                )));
            }
            pages.push(page);
        }
        // Each page once (sorted copy: no allocation sized by the file's claimed image).
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(corrupt(format!("page {} is listed twice", pair[0])));
        }
        Ok(WorkingSet {
            page_size,
            total_pages,
            image_id,
            pages,
        })
    }

    /// Reads and checks a file.
    ///
    /// # Errors
    /// As [`WorkingSet::decode`], or the read failing.
    /// Reads no more than the header says the file holds: a wrong file (an image, a
    /// device) is refused without reading it whole.
    pub fn read(path: &Path) -> Result<Self, WorkingSetError> {
        use std::io::Read;
        let io = |source| WorkingSetError::Io {
            what: "read",
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(WorkingSetError::Corrupt("not a regular file".into()));
        }
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact(&mut header)
            .map_err(|_| WorkingSetError::Corrupt(format!("{} bytes is too short", meta.len())))?;
        let count = u64::from_le_bytes(header[32..40].try_into().expect("8"));
        let expected = (HEADER_BYTES as u64)
            .saturating_add(count.saturating_mul(8))
            .saturating_add(8);
        if count > MAX_PAGES || meta.len() != expected {
            return Err(WorkingSetError::Corrupt(format!(
                "{} bytes, {expected} expected for {count} pages",
                meta.len()
            )));
        }
        let mut bytes = header.to_vec();
        file.take(expected - HEADER_BYTES as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Self::decode(&bytes)
    }

    /// Writes the file (to a temporary name first, so a reader never sees half of it).
    ///
    /// # Errors
    /// The write failing.
    pub fn write(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            what: "write",
            path: path.display().to_string(),
            source,
        };
        crate::atomic_file::write(path, &self.encode()).map_err(io)
    }

    /// Checks that the set was recorded on this image.
    ///
    /// # Errors
    /// [`WorkingSetError::Foreign`] naming both.
    pub fn check_image(
        &self,
        page_size: u32,
        total_pages: u64,
        image_id: u64,
    ) -> Result<(), WorkingSetError> {
        if (self.page_size, self.total_pages, self.image_id) == (page_size, total_pages, image_id) {
            return Ok(());
        }
        Err(WorkingSetError::Foreign {
            recorded_image: self.image_id,
            recorded_pages: self.total_pages,
            recorded_page_size: self.page_size,
            image: image_id,
            pages: total_pages,
            page_size,
        })
    }
}

/// Records pages in the order they are first faulted on: one bit per page, and the order.
#[derive(Debug)]
pub struct Recorder {
    seen: PageMap,
    order: Vec<u64>,
}

impl Recorder {
    /// A recorder for an image of `total_pages` pages.
    pub fn new(total_pages: u64) -> Self {
        Recorder {
            seen: PageMap::new(total_pages),
            order: Vec::new(),
        }
    }

    /// A fault on `page`: recorded if it is the first.
    pub fn fault(&mut self, page: u64) {
        if page < self.seen.total_pages() && !self.seen.is_set(page) {
            self.seen.set(page);
            self.order.push(page);
        }
    }

    /// The pages recorded, in first-fault order.
    pub fn pages(&self) -> &[u64] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            page_size: 4096,
            total_pages: 1000,
            image_id: 0xABCD,
            pages: vec![7, 3, 999, 0, 500],
        }
    }

    #[test]
    fn a_working_set_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("ws-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ws");
        sample().write(&path).unwrap();
        assert_eq!(WorkingSet::read(&path).unwrap(), sample());
        let empty = WorkingSet {
            pages: vec![],
            ..sample()
        };
        assert_eq!(WorkingSet::decode(&empty.encode()).unwrap(), empty);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let good = sample().encode();
        let mut flipped = good.clone();
        flipped[HEADER_BYTES + 3] ^= 1;
        let mut wrong_magic = good.clone();
        wrong_magic[0] = b'X';
        let mut version = good.clone();
        version[8] = 9;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 1].to_vec(), "bytes"),
            (good[..10].to_vec(), "too short"),
            (flipped, "checksum"),
            (wrong_magic, "magic"),
            (version, "version"),
        ];
        for (bytes, why) in cases {
            let err = WorkingSet::decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should say {why}");
        }
        // Well-formed but inconsistent: checksums computed over bad contents.
        for (pages, why) in [(vec![1, 1], "twice"), (vec![1000], "past")] {
            let bad = WorkingSet { pages, ..sample() }.encode();
            let err = WorkingSet::decode(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should say {why}");
        }
        assert!(WorkingSet::read(Path::new("/nonexistent/ws")).is_err());
        // A device or a big unrelated file is refused from its header and size alone.
        let err = WorkingSet::read(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_foreign_working_set_is_named_as_such() {
        let ws = sample();
        assert!(ws.check_image(4096, 1000, 0xABCD).is_ok());
        for (ps, n, id) in [
            (4096, 1000, 0xABCE),
            (4096, 999, 0xABCD),
            (2 << 20, 1000, 0xABCD),
        ] {
            let err = ws.check_image(ps, n, id).unwrap_err();
            assert!(matches!(err, WorkingSetError::Foreign { .. }), "{err}");
            assert!(err.to_string().contains("another memory image"));
        }
    }

    #[test]
    fn the_recorder_keeps_first_touches_in_order() {
        let mut r = Recorder::new(10);
        for page in [4, 2, 4, 9, 2, 0, 12] {
            r.fault(page);
        }
        assert_eq!(r.pages(), &[4, 2, 9, 0]);
    }
}
