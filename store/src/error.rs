//! What can go wrong with a store.

use std::path::PathBuf;

use thiserror::Error;

use crate::layout;

/// What can go wrong with a store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The environment does not describe a usable store.
    #[error("cannot set up the object store client: {0}")]
    Config(String),
    /// A request failed (after its retries). The client's error is part of the message
    /// rather than a source: its own message repeats its sources already.
    #[error("cannot {op} {key} in the object store: {cause}")]
    Request {
        /// What was tried.
        op: &'static str,
        /// The object.
        key: String,
        /// Why.
        cause: Box<object_store::Error>,
    },
    /// A ranged read returned fewer bytes than asked.
    #[error("{key}: asked for {wanted} bytes, got {got}")]
    Short {
        /// The object.
        key: String,
        /// Bytes asked for.
        wanted: u64,
        /// Bytes returned.
        got: u64,
    },
    /// No snapshot by that name.
    #[error("no snapshot {name} in the store")]
    NoSnapshot {
        /// The name.
        name: String,
    },
    /// A snapshot by that name exists already.
    #[error("a snapshot {name} exists already (remove it first)")]
    Exists {
        /// The name.
        name: String,
    },
    /// An object is damaged or not what it claims to be.
    #[error("{key}")]
    Format {
        /// The object.
        key: String,
        /// What is wrong.
        #[source]
        source: layout::FormatError,
    },
    /// A local file could not be read or written.
    #[error("cannot {op} {}", path.display())]
    File {
        /// What was tried.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is not a whole number of pages.
    #[error("{} is {size} bytes: not a non-empty whole number of 4 KiB pages", path.display())]
    BadImage {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A working-set page is past the image's end.
    #[error("the working set names page {page}, but the image has {pages} pages")]
    BadWorkingSet {
        /// The page.
        page: u64,
        /// Pages in the image.
        pages: u64,
    },
    /// Another snapshot's manifest cannot be read, so removal cannot tell what it uses.
    #[error("removal stopped: cannot tell which packs {key} uses")]
    Unreadable {
        /// The manifest.
        key: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
}

impl StoreError {
    pub(crate) fn request(op: &'static str, key: &str, cause: object_store::Error) -> Self {
        StoreError::Request {
            op,
            key: key.to_owned(),
            cause: Box::new(cause),
        }
    }

    pub(crate) fn file(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| StoreError::File { op, path, source }
    }

    /// Whether the object was not there.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::Request { cause, .. } if matches!(**cause, object_store::Error::NotFound { .. })
        )
    }
}
