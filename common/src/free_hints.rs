//! Free-page hints (`pagesrv --free-pages FILE`, or the source VMM's `free` answer): pages
//! the guest's own allocator holds free.
//! They are never sent: the destination gets them as zero ranges first, so a fault on one is
//! resolved there at once with a zero page, and the digests count them as zero. The hints
//! are those of a paused VM: given as a file with `--vm-mem`, or by the source VMM when it
//! pauses (`common::source_link`'s `free`); nothing writes the memory after that.
//!
//! The file is a bitmap of the memory in 4 KiB pages, one bit per page, bit `i % 8` of byte
//! `i / 8` set for free page `i`, exactly `ceil(pages / 8)` bytes long (what the VMM writes
//! from the guest's free list when it pauses it).

use std::path::Path;

use crate::pagemap::PageMap;
use thiserror::Error;

/// The unit of the hint bitmap.
pub const HINT_PAGE_BYTES: u64 = 4096;

/// What a hint file can get wrong.
#[derive(Debug, Error)]
pub enum FreeHintsError {
    /// It cannot be read.
    #[error("cannot read the free-page hints {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a bitmap of this memory.
    #[error(
        "the free-page hints {path} are {got} bytes; a bitmap of this memory's {pages} pages of 4 KiB is {want} bytes"
    )]
    BadLength {
        /// The file.
        path: String,
        /// Its length.
        got: u64,
        /// Pages of the memory.
        pages: u64,
        /// The length it must have.
        want: u64,
    },
}

/// The free pages, in 4 KiB units.
#[derive(Debug)]
pub struct FreeHints {
    free: PageMap,
}

impl FreeHints {
    /// No page free.
    pub fn none(size_bytes: u64) -> Self {
        FreeHints {
            free: PageMap::new(size_bytes / HINT_PAGE_BYTES),
        }
    }

    /// Reads a hint file for memory of `size_bytes`.
    ///
    /// # Errors
    /// The file cannot be read, or its length does not fit the memory.
    pub fn load(path: &Path, size_bytes: u64) -> Result<Self, FreeHintsError> {
        let bitmap = std::fs::read(path).map_err(|source| FreeHintsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        FreeHints::from_bitmap(&bitmap, size_bytes, &path.display().to_string())
    }

    /// Hints from a bitmap (the bytes of a hint file, named `what` in errors) for memory of
    /// `size_bytes`.
    ///
    /// # Errors
    /// [`FreeHintsError::BadLength`]: the bitmap does not fit the memory.
    pub fn from_bitmap(bitmap: &[u8], size_bytes: u64, what: &str) -> Result<Self, FreeHintsError> {
        let pages = size_bytes / HINT_PAGE_BYTES;
        if bitmap.len() as u64 != pages.div_ceil(8) {
            return Err(FreeHintsError::BadLength {
                path: what.to_owned(),
                got: bitmap.len() as u64,
                pages,
                want: pages.div_ceil(8),
            });
        }
        let hints = FreeHints::none(size_bytes);
        hints.free.set_from_bitmap(0, pages, bitmap);
        Ok(hints)
    }

    /// Takes a new hint bitmap (4 KiB pages) in place of the old; returns the free pages.
    pub fn replace(&self, bitmap: &[u8]) -> u64 {
        let total = self.free.total_pages();
        self.free.clear_range(0, total);
        self.free.set_from_bitmap(0, total, bitmap)
    }

    /// The source wrote these 4 KiB pages (a dirty bitmap): they are not free, whatever the
    /// last hint said.
    pub fn written(&self, bitmap: &[u8]) {
        PageMap::bitmap_runs(0, bitmap, |first, count| {
            self.free.clear_range(first, count);
        });
    }

    /// Whether every 4 KiB page of `first..first+count` is free.
    pub fn all_free(&self, first: u64, count: u64) -> bool {
        count > 0 && self.free.set_run(first, count) >= count
    }

    /// Free 4 KiB pages.
    pub fn free_pages(&self) -> u64 {
        self.free.set_pages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hints_load_check_and_yield_to_writes() {
        let dir = std::env::temp_dir().join(format!("free-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hints");
        // 20 pages: 0..8 free, 8..16 not, 16..20 free.
        std::fs::write(&path, [0xFF, 0x00, 0x0F]).unwrap();
        let hints = FreeHints::load(&path, 20 * HINT_PAGE_BYTES).unwrap();
        assert_eq!(hints.free_pages(), 12);
        assert!(hints.all_free(0, 8) && hints.all_free(16, 4));
        assert!(!hints.all_free(7, 2) && !hints.all_free(0, 0));
        let err = FreeHints::load(&path, 40 * HINT_PAGE_BYTES).unwrap_err();
        assert!(
            err.to_string()
                .contains("a bitmap of this memory's 40 pages"),
            "{err}"
        );
        assert!(FreeHints::load(&dir.join("none"), 4096).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
