//! `--base FILE`: a memory image this host already holds (an older copy of the VM, or the
//! template it was cloned from). pagesrv offers the hash of every page it has not sent yet;
//! a page whose hash matches the base's page at the same place is placed from the base and
//! never crosses the wire. Faults never wait for this: a page requested before its hash
//! arrives comes over the urgent connection as always (and its base copy is then skipped as
//! already placed).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, ensure};
use common::uffd::UffdError;
use common::wire::{PAGE_HASH_BYTES, PageRange};

use crate::core::kernel::Kernel;
use crate::core::push::{Pushed, place_run};
use crate::core::vm::{Origin, Vm};

/// Base pages read at once.
const READ_PAGES: u64 = 256;

/// The base image, open for reading.
#[derive(Debug)]
pub struct BaseImage {
    file: File,
    path: PathBuf,
    size_bytes: u64,
}

impl BaseImage {
    /// Opens `path` and checks it is a readable regular file.
    ///
    /// # Errors
    /// It cannot be opened, is not a regular file, or cannot be read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot open the base image {}", path.display()))?;
        let meta = file.metadata()?;
        ensure!(
            meta.is_file(),
            "the base image {} is not a regular file",
            path.display()
        );
        let mut probe = [0u8; 1];
        if meta.len() > 0 {
            file.read_exact_at(&mut probe, 0)
                .with_context(|| format!("cannot read the base image {}", path.display()))?;
        }
        Ok(BaseImage {
            file,
            path: path.to_owned(),
            size_bytes: meta.len(),
        })
    }

    /// Checks that the image is as large as the guest's RAM.
    ///
    /// # Errors
    /// It is not: it cannot be an image of this VM.
    pub fn check_size(&self, guest_bytes: u64) -> Result<()> {
        ensure!(
            self.size_bytes == guest_bytes,
            "the base image {} is {} bytes but the guest's RAM is {} bytes: not an image of this VM",
            self.path.display(),
            self.size_bytes,
            guest_bytes
        );
        Ok(())
    }

    /// Places the pages of `range` whose hash (`hashes`, [`PAGE_HASH_BYTES`] each, seeded with
    /// `seed`; all zero: not offered) matches the base's page there; returns the bitmap of
    /// those pages (bit `i % 8` of byte `i / 8` for page `range.first + i`), `None` if `stop`
    /// was set meanwhile.
    ///
    /// # Errors
    /// The base cannot be read, or a placement failed.
    pub fn place_matching<K: Kernel>(
        &self,
        vm: &Vm<K>,
        seed: u64,
        range: PageRange,
        hashes: &[u8],
        stop: &AtomicBool,
    ) -> Result<Option<Vec<u8>>, BaseError> {
        let page_size = vm.page_size();
        let mut bitmap = vec![0u8; range.count.div_ceil(8) as usize];
        let mut buf = vec![0u8; (READ_PAGES * page_size) as usize];
        let mut at = range.first;
        let end = range.first + range.count;
        let offered = |p: u64| {
            let i = (p - range.first) as usize;
            &hashes[i * PAGE_HASH_BYTES..][..PAGE_HASH_BYTES]
        };
        let is_offered = |p: u64| offered(p).iter().any(|&b| b != 0);
        while at < end {
            let n = (end - at).min(READ_PAGES);
            if !(at..at + n).any(is_offered) {
                at += n;
                continue;
            }
            let bytes = &mut buf[..(n * page_size) as usize];
            self.file
                .read_exact_at(bytes, at * page_size)
                .map_err(|source| BaseError::Read {
                    path: self.path.clone(),
                    offset: at * page_size,
                    source,
                })?;
            let bytes = &*bytes;
            let place = |first: u64, last: u64| {
                let data =
                    &bytes[((first - at) * page_size) as usize..((last - at) * page_size) as usize];
                place_run(vm, first, last - first, Some(data), Origin::Base, stop)
            };
            let mut run_start = None;
            for page in at..at + n {
                let i = (page - range.first) as usize;
                let mine = &bytes[((page - at) * page_size) as usize..][..page_size as usize];
                if is_offered(page) && common::digest::page_hash(seed, mine) == offered(page) {
                    bitmap[i / 8] |= 1 << (i % 8);
                    run_start.get_or_insert(page);
                } else if let Some(start) = run_start.take()
                    && place(start, page)? == Pushed::Stopped
                {
                    return Ok(None);
                }
            }
            if let Some(start) = run_start
                && place(start, at + n)? == Pushed::Stopped
            {
                return Ok(None);
            }
            at += n;
        }
        Ok(Some(bitmap))
    }
}

/// What can go wrong while placing from the base image.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// Reading the base image failed.
    #[error("cannot read the base image {} at byte {offset}", path.display())]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A placement failed.
    #[error(transparent)]
    Place(#[from] UffdError),
}
