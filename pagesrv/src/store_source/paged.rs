//! A session's view of a stored snapshot: the [`PageSource`] over the cache, in the
//! session's page size.

use std::sync::Arc;

use snapstore::layout::{PAGE_BYTES, PageRef};

use super::{Pins, StoreSource};
use crate::source::{PageBytes, PageSource, Piece, SourceError};

/// A session's view of a stored snapshot, in pages of one size.
pub struct StorePaged {
    pub(super) source: Arc<StoreSource>,
    pub(super) page_size: u64,
    /// The source's count of losses when this session's reads began.
    pub(super) losses_at_start: u64,
}

impl PageSource for StorePaged {
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn total_pages(&self) -> u64 {
        self.source.manifest.size_bytes / self.page_size
    }

    fn bytes(&self, first: u64, count: u64) -> PageBytes<'_> {
        let per = self.page_size / PAGE_BYTES;
        let start = (first * self.page_size) as usize;
        let len = (count * self.page_size) as usize;
        let bytes = &self.source.map.as_slice()[start..start + len];
        match self.source.pin(first * per, (first + count) * per) {
            Some(frames) => PageBytes::held(
                bytes,
                Box::new(Pins {
                    source: self.source.clone(),
                    frames,
                }),
            ),
            // Lost: whatever is lent is not sent (the caller checks `pages_intact`).
            None => PageBytes::borrowed(bytes),
        }
    }

    fn digest(&self, page: u64) -> u64 {
        let per = self.page_size / PAGE_BYTES;
        match self.source.known_digest(page * per, (page + 1) * per) {
            Some(digest) => digest,
            None => common::digest::page_digest(page, &self.bytes(page, 1)),
        }
    }

    fn is_free(&self, _page: u64) -> bool {
        false
    }

    fn classify(&self, first: u64, count: u64, out: &mut Vec<Piece>) {
        let per = self.page_size / PAGE_BYTES;
        let pages = &self.source.manifest.pages;
        let is_zero = |page: u64| {
            pages[(page * per) as usize..((page + 1) * per) as usize]
                .iter()
                .all(|p| *p == PageRef::Zero)
        };
        let end = (first + count).min(self.total_pages());
        crate::source::split_runs(first, end, is_zero, out);
    }

    fn pages_intact(&self) -> bool {
        self.source.losses() == self.losses_at_start
    }

    fn check_intact(&self) -> Result<(), SourceError> {
        self.source.check_intact_since(self.losses_at_start)
    }
}
