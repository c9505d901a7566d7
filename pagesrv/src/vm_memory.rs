//! A served VM's memory: a memory file (a paused VM's, or a running VM's RAM from its source
//! VMM), or a snapshot in an object store (`s3://BUCKET/NAME`). Sessions read either through
//! [`PageSource`].

use std::sync::Arc;

use crate::source::{MemorySource, PageSource, SourceError};
use crate::store_source::StoreSource;

/// Where a served VM's pages come from.
#[derive(Debug)]
pub enum VmMemory {
    /// A memory file.
    File(MemorySource),
    /// A snapshot in an object store, through the local cache.
    Store(Arc<StoreSource>),
}

impl VmMemory {
    /// A session's view in pages of `page_size` bytes.
    ///
    /// # Errors
    /// The memory is not a whole number of such pages.
    pub fn paged(&self, page_size: u64) -> Result<Box<dyn PageSource + '_>, SourceError> {
        Ok(match self {
            VmMemory::File(file) => Box::new(file.paged(page_size)?),
            VmMemory::Store(store) => Box::new(store.paged(page_size)?),
        })
    }

    /// Bytes of guest memory.
    pub fn size_bytes(&self) -> u64 {
        match self {
            VmMemory::File(file) => file.size_bytes(),
            VmMemory::Store(store) => store.size_bytes(),
        }
    }

    /// Identity of the image served.
    pub fn image_id(&self) -> u64 {
        match self {
            VmMemory::File(file) => file.image_id(),
            VmMemory::Store(store) => store.image_id(),
        }
    }

    /// Checks that a new session can be served.
    ///
    /// # Errors
    /// The file shrank, or the store's bytes were found damaged.
    pub fn check_intact(&self) -> Result<(), SourceError> {
        match self {
            VmMemory::File(file) => file.check_intact(),
            VmMemory::Store(store) => store.check_intact(),
        }
    }

    /// Reads the file's holes again (a new session: the VM may have written some).
    pub fn refresh_holes(&self) {
        if let VmMemory::File(file) = self {
            file.refresh_holes();
        }
    }

    /// Whether free-page hints were given.
    pub fn has_free_hints(&self) -> bool {
        matches!(self, VmMemory::File(file) if file.has_free_hints())
    }

    /// The memory file, if it is one, to change.
    pub fn file_mut(&mut self) -> Option<&mut MemorySource> {
        match self {
            VmMemory::File(file) => Some(file),
            VmMemory::Store(_) => None,
        }
    }
}
