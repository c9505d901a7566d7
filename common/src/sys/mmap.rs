//! RAII memory mappings: anonymous memory, and files mapped read-only or shared.

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

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; no slice outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
