//! RAII memory mappings: anonymous memory, files mapped read-only, and a writable shared
//! window on a file ([`FileWindow`]) that is only ever copied into and out of.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use thiserror::Error;

/// A failed `mmap`.
#[derive(Debug, Error)]
#[error("failed to map {len_bytes} bytes")]
pub struct MapError {
    /// Requested length.
    pub len_bytes: usize,
    /// The kernel's answer.
    #[source]
    pub source: std::io::Error,
}

/// A mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; sharing the pointer between
// threads is as safe as sharing a `&[u8]` (readers) — writers go through the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out shared slices.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous memory of `len` bytes (not populated).
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn anonymous(len: usize) -> Result<Self, MapError> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        )
    }

    /// `fd`'s first `len` bytes, read-only and shared (pages come from the page cache).
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn file_readonly(fd: BorrowedFd<'_>, len: usize) -> Result<Self, MapError> {
        Self::map(len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd())
    }

    fn map(len: usize, prot: i32, flags: i32, fd: i32) -> Result<Self, MapError> {
        if len == 0 {
            return Err(MapError {
                len_bytes: 0,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: a new mapping at an address the kernel chooses; it aliases nothing we own.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(MapError {
                len_bytes: len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            writable: prot & libc::PROT_WRITE != 0,
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable.
    ///
    /// # Panics
    /// On a read-only mapping (a caller bug, never input).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "as_mut_slice on a read-only mapping");
        // SAFETY: ptr..ptr+len is mapped for the life of self and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A file mapped shared and writable (a guest RAM memfd, shmem or hugetlbfs), used only
/// through copies: other processes map the same pages and may touch them at any time, so no
/// Rust slice of it is ever handed out. Writing through it puts the bytes in the file's page
/// cache (as `pwrite` would, which hugetlbfs does not support).
#[derive(Debug)]
pub struct FileWindow {
    map: Mapping,
}

/// A copy that does not fit in the window (a caller bug, reported rather than done).
#[derive(Debug, Error)]
#[error("{len} bytes at offset {offset} are outside the {size}-byte window")]
pub struct OutOfWindow {
    /// Where the copy was to start.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The window's size.
    pub size: u64,
}

impl FileWindow {
    /// `fd`'s first `len` bytes, shared, readable and writable.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> Result<Self, MapError> {
        Ok(FileWindow {
            map: Mapping::map(
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
            )?,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len as u64
    }

    /// Start address (to guard it against the file shrinking: `sigbus::guard`).
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// Always false: windows are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, OutOfWindow> {
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.len());
        if fits {
            Ok(offset as usize)
        } else {
            Err(OutOfWindow {
                offset,
                len: len as u64,
                size: self.len(),
            })
        }
    }

    /// Allocates the pages of `offset..offset+len` in the file (`MADV_POPULATE_WRITE`), so
    /// that copies into them later neither allocate nor fault; an error rather than a
    /// SIGBUS where the file cannot get them (a hugetlbfs pool too small).
    ///
    /// # Errors
    /// Out of the window, or the kernel's refusal (ENOMEM, EFAULT, EINVAL before 5.14).
    pub fn populate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let at = self
            .check(offset, len as usize)
            .map_err(std::io::Error::other)?;
        // SAFETY: the range is inside our mapping (checked); MADV_POPULATE_WRITE only faults
        // pages in as if written, without changing their bytes.
        let rc = unsafe {
            libc::madvise(
                self.map.ptr.as_ptr().add(at).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Which pages of `offset..offset+len` are in the file's page cache (`mincore`: one
    /// byte per page of the system's page size in `out`, bit 0 set where resident), without
    /// touching them.
    ///
    /// # Errors
    /// Out of the window, or the kernel's refusal.
    pub fn resident(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
        let at = self
            .check(offset, len as usize)
            .map_err(std::io::Error::other)?;
        out.clear();
        out.resize(len.div_ceil(4096) as usize, 0);
        // SAFETY: the range is inside our mapping (checked; `offset` is page-aligned by the
        // caller, else the kernel says EINVAL); `out` has a byte per 4 KiB page of it.
        let rc = unsafe {
            libc::mincore(
                self.map.ptr.as_ptr().add(at).cast(),
                len as usize,
                out.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies `src` into the file at `offset`.
    ///
    /// # Errors
    /// The copy does not fit.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), OutOfWindow> {
        let at = self.check(offset, src.len())?;
        // SAFETY: the destination range is inside our writable mapping (checked) and cannot
        // overlap `src` (a Rust slice, never a slice of this window). Other processes may
        // access the same pages meanwhile: the copy is of plain bytes, as by `pwrite`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.ptr.as_ptr().add(at), src.len());
        }
        Ok(())
    }

    /// Writes `len` zero bytes into the file at `offset`.
    ///
    /// # Errors
    /// The range does not fit.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), OutOfWindow> {
        let at = self.check(offset, len as usize)?;
        // SAFETY: the range is inside our writable mapping (checked).
        unsafe { std::ptr::write_bytes(self.map.ptr.as_ptr().add(at), 0, len as usize) };
        Ok(())
    }

    /// Copies the file's bytes at `offset` into `dst`.
    ///
    /// # Errors
    /// The copy does not fit.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), OutOfWindow> {
        let at = self.check(offset, dst.len())?;
        // SAFETY: the source range is inside our mapping (checked); `dst` is a Rust slice,
        // never part of this window.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.ptr.as_ptr().add(at),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    use super::*;

    fn shm_file(len: u64) -> std::fs::File {
        let path = format!("/dev/shm/common-window-test-{}", std::process::id());
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn test_a_window_writes_and_reads_the_files_bytes_and_refuses_what_does_not_fit() {
        let file = shm_file(4 * 4096);
        let window = FileWindow::new(file.as_fd(), 4 * 4096).unwrap();
        window.populate(0, 2 * 4096).unwrap();
        window.write(4096 + 7, b"hello").unwrap();
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, 4096 + 7).unwrap();
        assert_eq!(&back, b"hello", "written through the window, read by pread");
        file.write_all_at(b"world", 3 * 4096).unwrap();
        window.read(3 * 4096, &mut back).unwrap();
        assert_eq!(
            &back, b"world",
            "written by pwrite, read through the window"
        );
        window.zero(4096, 4096).unwrap();
        file.read_exact_at(&mut back, 4096 + 7).unwrap();
        assert_eq!(back, [0; 5]);
        let err = window.write(4 * 4096 - 2, b"abc").unwrap_err();
        assert_eq!((err.offset, err.len, err.size), (4 * 4096 - 2, 3, 4 * 4096));
        assert!(window.read(u64::MAX, &mut back).is_err(), "no overflow");
        assert!(window.populate(4096, 4 * 4096).is_err());
    }
}
