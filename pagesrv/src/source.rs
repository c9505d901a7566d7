//! Where a session's pages come from ([`PageSource`]), and the one source today: the VM's
//! memory file, mapped read-only, and how its pages are classified: holes in the file (known
//! zero without reading), all-zero pages, and data.
//!
//! The file is bytes; its pages are whatever size the destination asks for
//! ([`MemorySource::paged`]), as long as the file is a whole number of them. A Firecracker
//! snapshot of a huge-page guest is an ordinary file served in 2 MiB pages; a hugetlbfs file
//! can be served in 4 KiB pages too.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use common::digest::is_zero;
use common::mmap::{MapError, Mapping};
use thiserror::Error;

use common::free_hints::{FreeHints, HINT_PAGE_BYTES};

/// `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Errors opening the memory file.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The file could not be opened or examined.
    #[error("failed to open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("{path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a whole number of pages of the size asked for.
    #[error("{path} is {size_bytes} bytes, not a whole number of {page_size}-byte pages")]
    BadSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
        /// The page size asked for.
        page_size: u64,
    },
    /// mmap failed.
    #[error("failed to map {path}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: MapError,
    },
    /// The SIGBUS guard could not be set up.
    #[error("failed to guard the mapping of {path}")]
    Guard {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: common::sigbus::GuardError,
    },
    /// Pages could not be read from where they are kept (a store that went away, a damaged
    /// object): they cannot be served.
    #[error("the pages of {what} are lost: {why}")]
    Lost {
        /// The memory (a store address).
        what: String,
        /// Why.
        why: String,
    },
    /// The file shrank while it was served: its missing pages cannot be served.
    #[error(
        "the memory file {path} shrank while it was served ({size_bytes} of {expected_bytes} bytes left); its pages are gone"
    )]
    Shrank {
        /// The file.
        path: PathBuf,
        /// Its size now (0 if unknown).
        size_bytes: u64,
        /// Its size when pagesrv started.
        expected_bytes: u64,
    },
}

/// A run of pages of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// All-zero pages `first..first+count`.
    Zero {
        /// First page.
        first: u64,
        /// Page count.
        count: u64,
    },
    /// Pages with data.
    Data {
        /// First page.
        first: u64,
        /// Page count.
        count: u64,
    },
}

/// The memory file.
#[derive(Debug)]
pub struct MemorySource {
    /// Turns a read past a shrunk file's end into zeros and a count, not a crash; dropped
    /// before `map` (field order).
    sigbus_guard: common::sigbus::Guard,
    map: Mapping,
    path: PathBuf,
    size_bytes: u64,
    file: File,
    /// Byte ranges that hold data (everything else is a hole), sorted; read again at the
    /// start of every session, since the VM may have written holes since the last one.
    data_ranges: RwLock<Vec<(u64, u64)>>,
    /// Identity of the image served (see [`MemorySource::image_id`]).
    image_id: u64,
    /// Whether the guest is paused (its holes can be trusted).
    paused: AtomicBool,
    /// Pages the guest's allocator holds free (`--free-pages`): served as zero.
    free: FreeHints,
}

impl MemorySource {
    /// Opens and maps `path` read-only.
    ///
    /// # Errors
    /// Open, size or map failures.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, path, true)
    }

    /// Maps the RAM of a running guest that its VMM handed over (`--vmm-uds`). Its identity
    /// leaves out the modification time: the guest writes it while it is served.
    ///
    /// # Errors
    /// Size or map failures.
    pub fn running(file: File, name: &Path) -> Result<Self, SourceError> {
        Self::from_file(file, name, false)
    }

    fn from_file(file: File, path: &Path, paused: bool) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(open_err)?;
        let size_bytes = meta.len();
        if size_bytes == 0 {
            return Err(SourceError::Empty {
                path: path.to_owned(),
            });
        }
        // A hugetlbfs file is mapped (and, if it shrinks, replaced) in its huge pages.
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| open_err(e.into()))?;
        let map_page_bytes = if fs.filesystem_type().0 as i64 == HUGETLBFS_MAGIC {
            fs.block_size() as u64
        } else {
            4096
        };
        // A running guest fills holes while it is served: until it is paused, every page is
        // read (a hole found at the start may hold data by the time it is sent).
        let data_ranges = RwLock::new(if paused {
            data_ranges(&file, size_bytes)
        } else {
            vec![(0, size_bytes)]
        });
        let map = Mapping::file_readonly(file.as_fd(), size_bytes as usize).map_err(|source| {
            SourceError::Map {
                path: path.to_owned(),
                source,
            }
        })?;
        let sigbus_guard =
            common::sigbus::guard(map.addr() as usize, map.len(), map_page_bytes as usize)
                .map_err(|source| SourceError::Guard {
                    path: path.to_owned(),
                    source,
                })?;
        let image_id = if paused {
            common::digest::identity(&[
                meta.dev(),
                meta.ino(),
                size_bytes,
                meta.mtime() as u64,
                meta.mtime_nsec() as u64,
            ])
        } else {
            common::digest::identity(&[meta.dev(), meta.ino(), size_bytes])
        };
        Ok(MemorySource {
            sigbus_guard,
            map,
            path: path.to_owned(),
            size_bytes,
            file,
            data_ranges,
            image_id,
            paused: AtomicBool::new(paused),
            free: FreeHints::none(size_bytes),
        })
    }

    /// Takes the guest's free-page hints: those pages are served as zero.
    pub fn set_free_hints(&mut self, hints: FreeHints) {
        self.free = hints;
    }

    /// The guest's free pages (a 4 KiB-page bitmap from its VMM): from now on they are
    /// served as zero; returns how many.
    pub fn hint_free(&self, bitmap: &[u8]) -> u64 {
        self.free.replace(bitmap)
    }

    /// Whether some page is hinted free.
    pub fn has_free_hints(&self) -> bool {
        self.free.free_pages() > 0
    }

    /// The guest wrote these 4 KiB pages (a dirty bitmap): not free any more.
    pub fn written(&self, bitmap: &[u8]) {
        self.free.written(bitmap);
    }

    /// The file's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The file in pages of `page_size` bytes.
    ///
    /// # Errors
    /// [`SourceError::BadSize`]: the file is not a whole number of such pages.
    pub fn paged(&self, page_size: u64) -> Result<Paged<'_>, SourceError> {
        if page_size == 0 || !self.size_bytes.is_multiple_of(page_size) {
            return Err(SourceError::BadSize {
                path: self.path.clone(),
                size_bytes: self.size_bytes,
                page_size,
            });
        }
        Ok(Paged {
            source: self,
            page_size,
            total_pages: self.size_bytes / page_size,
        })
    }

    /// Identity of the image served: the file's device, inode, size and modification time.
    /// A pagesrv restarted on the same unchanged file serves the same image; another file,
    /// or one written since, is another image (destinations resuming a session refuse it).
    pub fn image_id(&self) -> u64 {
        self.image_id
    }

    /// Whether every read of the mapping so far found the file's pages (no read past a
    /// shrunk end). Cheap: check it before sending what was read.
    pub fn pages_intact(&self) -> bool {
        self.sigbus_guard.hits() == 0
    }

    /// Checks that the file still has its size and no read went past its end.
    ///
    /// # Errors
    /// [`SourceError::Shrank`].
    pub fn check_intact(&self) -> Result<(), SourceError> {
        let expected_bytes = self.size_bytes;
        let size_bytes = self.file.metadata().map_or(0, |m| m.len());
        if size_bytes < expected_bytes || !self.pages_intact() {
            return Err(SourceError::Shrank {
                path: self.path.clone(),
                size_bytes,
                expected_bytes,
            });
        }
        Ok(())
    }

    /// Reads the file's holes again (call when a session starts). For a running guest's RAM
    /// nothing changes until [`MemorySource::paused`].
    pub fn refresh_holes(&self) {
        if !self.paused.load(Ordering::Acquire) {
            return;
        }
        let ranges = data_ranges(&self.file, self.size_bytes);
        *self.data_ranges.write().unwrap_or_else(|p| p.into_inner()) = ranges;
    }

    /// The guest was paused: its holes stay holes from now on. Finding them walks the whole
    /// file (milliseconds per GiB): that waits for [`MemorySource::refresh_holes`] (the next
    /// session), not the switch.
    pub fn paused(&self) {
        self.paused.store(true, Ordering::Release);
    }
}

/// Where a session's pages come from, in pages of the session's size: the memory file of a
/// paused or running VM today ([`Paged`]); a stored snapshot next. A session reads pages
/// through this and nothing else.
pub trait PageSource: Send + Sync {
    /// Page size in bytes.
    fn page_size(&self) -> u64;

    /// Pages of guest RAM.
    fn total_pages(&self) -> u64;

    /// The bytes of pages `first..first+count` (the caller keeps the range in bounds). A
    /// source that could not read them lends zeros and says so in
    /// [`PageSource::pages_intact`], which callers check before they send what they read.
    fn bytes(&self, first: u64, count: u64) -> PageBytes<'_>;

    /// Whether the guest holds `page` free: it is served as zero.
    fn is_free(&self, page: u64) -> bool;

    /// Splits `first..first+count` into zero and data pieces (free pages count as zero),
    /// appending them to `out`.
    fn classify(&self, first: u64, count: u64, out: &mut Vec<Piece>);

    /// Whether every read so far found the source's pages (cheap: checked before sending
    /// what was read).
    fn pages_intact(&self) -> bool;

    /// Checks that the source still holds every page.
    ///
    /// # Errors
    /// It lost some (a memory file that shrank).
    fn check_intact(&self) -> Result<(), SourceError>;

    /// The digest of `page` as it is now ([`common::digest::page_digest`]), for the
    /// verification at the end of a session. A source that knows it without reading the
    /// page (a stored snapshot keeps each page's digest from when it arrived) says so here.
    fn digest(&self, page: u64) -> u64 {
        common::digest::page_digest(page, &self.bytes(page, 1))
    }

    /// Precopy: the running guest wrote these 4 KiB pages (a dirty bitmap). A source that
    /// never runs ignores it.
    fn written(&self, _bitmap: &[u8]) {}

    /// Precopy: the guest's free pages (a 4 KiB-page bitmap), served as zero from now on;
    /// returns how many. A source that never runs ignores it.
    fn hint_free(&self, _bitmap: &[u8]) -> u64 {
        0
    }

    /// Precopy: the guest was paused. A source that never runs ignores it.
    fn paused(&self) {}
}

/// Splits pages `first..end` into runs of zero and data pages (`is_zero` says which a page
/// is), appending them to `out`.
pub fn split_runs(first: u64, end: u64, is_zero: impl Fn(u64) -> bool, out: &mut Vec<Piece>) {
    let mut page = first;
    while page < end {
        let zero = is_zero(page);
        let mut next = page + 1;
        while next < end && is_zero(next) == zero {
            next += 1;
        }
        let count = next - page;
        out.push(if zero {
            Piece::Zero { first: page, count }
        } else {
            Piece::Data { first: page, count }
        });
        page = next;
    }
}

/// Pages' bytes as a source lends them: derefs to the bytes. A source that caches pages keeps
/// them from being evicted until this is dropped.
pub struct PageBytes<'a> {
    bytes: &'a [u8],
    _held: Option<Box<dyn Send + 'a>>,
}

impl<'a> PageBytes<'a> {
    /// Bytes that stay put as long as the source lives.
    pub fn borrowed(bytes: &'a [u8]) -> Self {
        PageBytes { bytes, _held: None }
    }

    /// Bytes that stay put as long as `hold` is not dropped.
    pub fn held(bytes: &'a [u8], hold: Box<dyn Send + 'a>) -> Self {
        PageBytes {
            bytes,
            _held: Some(hold),
        }
    }
}

impl<'a> PageBytes<'a> {
    /// The bytes and what keeps them put: the bytes are valid only while the hold is kept
    /// (for callers that collect many reads before one write).
    pub fn into_parts(self) -> (&'a [u8], Option<Box<dyn Send + 'a>>) {
        (self.bytes, self._held)
    }
}

impl std::ops::Deref for PageBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

/// The memory file in pages of one size (a session's view).
#[derive(Debug, Clone, Copy)]
pub struct Paged<'a> {
    source: &'a MemorySource,
    page_size: u64,
    total_pages: u64,
}

impl PageSource for Paged<'_> {
    /// Page size in bytes.
    fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages in the file.
    fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// The bytes of pages `first..first+count` (the caller keeps the range in bounds).
    fn bytes(&self, first: u64, count: u64) -> PageBytes<'_> {
        let start = (first * self.page_size) as usize;
        PageBytes::borrowed(
            &self.source.map.as_slice()[start..start + (count * self.page_size) as usize],
        )
    }

    /// Whether the guest holds `page` free (every 4 KiB of it): it is served as zero.
    fn is_free(&self, page: u64) -> bool {
        let per = self.page_size / HINT_PAGE_BYTES;
        self.source.free.all_free(page * per, per)
    }

    /// Splits `first..first+count` into zero and data pieces (free pages count as zero),
    /// appending them to `out`.
    fn classify(&self, first: u64, count: u64, out: &mut Vec<Piece>) {
        let data_ranges = self
            .source
            .data_ranges
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let is_zero_page = |page| {
            self.is_free(page)
                || in_hole(&data_ranges, page * self.page_size, self.page_size)
                || is_zero(&self.bytes(page, 1))
        };
        let end = (first + count).min(self.total_pages);
        split_runs(first, end, is_zero_page, out);
    }

    fn pages_intact(&self) -> bool {
        self.source.pages_intact()
    }

    fn check_intact(&self) -> Result<(), SourceError> {
        self.source.check_intact()
    }

    fn written(&self, bitmap: &[u8]) {
        self.source.written(bitmap);
    }

    fn hint_free(&self, bitmap: &[u8]) -> u64 {
        self.source.hint_free(bitmap)
    }

    fn paused(&self) {
        self.source.paused();
    }
}

/// Whether `start..start+len` lies wholly in a hole, given the sorted data ranges.
fn in_hole(data_ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    let i = data_ranges.partition_point(|&(_, e)| e <= start);
    data_ranges.get(i).is_none_or(|&(s, _)| s >= start + len)
}

/// Byte ranges holding data, from SEEK_DATA/SEEK_HOLE; the whole file if unsupported.
fn data_ranges(file: &File, size_bytes: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let mut ranges = Vec::new();
    let mut at = 0i64;
    while (at as u64) < size_bytes {
        let Ok(data) = lseek(file.as_raw_fd(), at, Whence::SeekData) else {
            break; // ENXIO: no data after `at`.
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole).unwrap_or(size_bytes as i64);
        ranges.push((data as u64, hole as u64));
        at = hole;
    }
    ranges
}

#[cfg(test)]
mod tests;
