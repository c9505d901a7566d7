//! The VMM's guest RAM file, as memfd placement writes it: `pwrite` for 4 KiB pages, a
//! shared mapping of faultd's own for hugetlbfs (which has no `pwrite`), guarded against the
//! file shrinking under it.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::mmap::{FileWindow, MapError, OutOfWindow};
use common::sigbus::{self, Guard, GuardError};
use common::uffd::UffdError;

/// The VMM's guest RAM file (memfd placement), shmem or hugetlbfs: pages are copied into it
/// through a shared window of faultd's own (hugetlbfs has no `pwrite`), then mapped into the
/// VMM with UFFDIO_CONTINUE.
pub struct GuestFile {
    file: File,
    /// Dropped before the window (fields drop in order).
    guard: Guard,
    window: FileWindow,
    /// Shared with other VMMs (`--shared-ram`, see `shared_ram`).
    shared: bool,
}

/// Why the VMM's guest RAM file cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    /// Shorter than the guest's RAM.
    #[error("the VMM's guest RAM file is {size} bytes, less than the {len} bytes of its regions")]
    TooShort {
        /// Its size.
        size: u64,
        /// The RAM its layout declares.
        len: u64,
    },
    /// Its size cannot be read.
    #[error("cannot examine the VMM's guest RAM file")]
    Stat(#[source] std::io::Error),
    /// It cannot be mapped.
    #[error("cannot map the VMM's guest RAM file")]
    Map(#[from] MapError),
    /// The window cannot be guarded against the file shrinking.
    #[error("cannot guard the window on the VMM's guest RAM file")]
    Guard(#[from] GuardError),
}

impl GuestFile {
    /// The file (to punch holes in it).
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Maps the first `len` bytes of the VMM's guest RAM file (the guest's pages, page `p` at
    /// byte `p * page_size`), guarded: if the VMM shrinks the file, a write past its end
    /// fails the placement instead of killing faultd. `shared`: other VMMs map it too
    /// (`--shared-ram`, checked by the caller).
    ///
    /// # Errors
    /// The file is shorter than `len`, or cannot be mapped shared.
    pub fn new(file: File, len: u64, page_size: u64, shared: bool) -> Result<Self, GuestFileError> {
        let size = file.metadata().map_err(GuestFileError::Stat)?.len();
        if size < len {
            return Err(GuestFileError::TooShort { size, len });
        }
        let window = FileWindow::new(file.as_fd(), len as usize)?;
        let guard = sigbus::guard(window.addr() as usize, len as usize, page_size as usize)?;
        Ok(GuestFile {
            file,
            guard,
            window,
            shared,
        })
    }

    /// Whether other VMMs map the file too (`--shared-ram`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Appends to `out` the runs of the pages `pages` (of `page_size` bytes) that are in
    /// the file's page cache (`mincore` on faultd's window: one call, nothing touched). A
    /// page another process is writing counts as there: a guest touching it waits for the
    /// write to end (the page is locked meanwhile).
    ///
    /// # Errors
    /// The kernel refused.
    pub(super) fn filled_runs(
        &self,
        pages: std::ops::Range<u64>,
        page_size: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> std::io::Result<()> {
        let per_page = (page_size / 4096).max(1) as usize;
        let mut resident = Vec::new();
        let len = (pages.end - pages.start) * page_size;
        self.window
            .resident(pages.start * page_size, len, &mut resident)?;
        let mut run_start = None;
        for (i, page) in pages.clone().enumerate() {
            let here = resident.get(i * per_page).is_some_and(|b| b & 1 != 0);
            match (here, run_start) {
                (true, None) => run_start = Some(page),
                (false, Some(first)) => {
                    out.push((first, page - first));
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(first) = run_start {
            out.push((first, pages.end - first));
        }
        Ok(())
    }

    /// Fails if a write since the start fell past the file's end (the VMM shrank it).
    pub(super) fn check_intact(&self, page: u64, len: u64) -> Result<(), UffdError> {
        if self.guard.hits() == 0 {
            return Ok(());
        }
        Err(UffdError::Place {
            op: "write to the guest memfd",
            addr: page,
            len,
            source: std::io::Error::other(
                "touched past the end of the VMM's guest RAM file (it shrank, or its hugetlbfs pool ran out)",
            ),
        })
    }

    /// Whether pages are huge (hugetlbfs): written through the window, as hugetlbfs has no
    /// `pwrite`; small pages go by `pwrite`, which maps nothing into faultd (a page-table
    /// entry per 4 KiB page costs more than the copy on a host with shadow paging).
    fn through_window(page_size: u64) -> bool {
        page_size > 4096
    }

    /// Writes `src` at byte `offset`.
    pub(super) fn write(&self, offset: u64, src: &[u8], page_size: u64) -> Result<(), UffdError> {
        if Self::through_window(page_size) {
            return self
                .window
                .write(offset, src)
                .map_err(|e| window_error("write to the guest memfd", e));
        }
        self.file.write_all_at(src, offset).map_err(file_error(
            "pwrite to the guest memfd",
            offset,
            src.len(),
        ))
    }

    /// Writes `len` zero bytes at byte `offset` (small pages: huge pages are placed by
    /// UFFDIO_COPY, zeros included).
    pub(super) fn zero(&self, offset: u64, len: u64, page_size: u64) -> Result<(), UffdError> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZEROS.len() as u64);
            self.write(offset + at, &ZEROS[..n as usize], page_size)?;
            at += n;
        }
        Ok(())
    }

    /// Reads the bytes at `offset` into `buf`.
    pub(super) fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        page_size: u64,
    ) -> Result<(), UffdError> {
        if Self::through_window(page_size) {
            self.window
                .read(offset, buf)
                .map_err(|e| window_error("read back a page of the guest memfd", e))?;
            // A read past a shrunk end read the guard's zeros, not the page.
            return self.check_intact(offset, buf.len() as u64);
        }
        let len = buf.len();
        self.file.read_exact_at(buf, offset).map_err(file_error(
            "read back a page of the guest memfd",
            offset,
            len,
        ))
    }
}

/// A failed `op` on the file's `len` bytes at `offset`, for `map_err`.
fn file_error(
    op: &'static str,
    offset: u64,
    len: usize,
) -> impl FnOnce(std::io::Error) -> UffdError {
    move |source| UffdError::Place {
        op,
        addr: offset,
        len: len as u64,
        source,
    }
}

fn window_error(op: &'static str, e: OutOfWindow) -> UffdError {
    UffdError::Place {
        op,
        addr: e.offset,
        len: e.len,
        source: std::io::Error::other(e),
    }
}
