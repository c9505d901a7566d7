//! Extended attributes of an open file (`fgetxattr`, `fsetxattr` with `XATTR_CREATE`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The value of attribute `name` of `file` (at most 255 bytes), or `None` if it has none.
///
/// # Errors
/// The kernel refused the read (other than for an absent attribute).
pub fn get(file: impl AsFd, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut value = [0u8; 255];
    // SAFETY: `name` is NUL-terminated; the kernel writes at most `value.len()` bytes into
    // the buffer on our stack.
    let n = unsafe {
        libc::fgetxattr(
            file.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(value[..n as usize].to_vec()))
}

/// Sets attribute `name` of `file` to `value` unless it exists.
///
/// # Errors
/// The attribute exists (`EEXIST`), or the kernel refused the write.
pub fn create(file: impl AsFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the kernel reads `value.len()` bytes of a live slice.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            libc::XATTR_CREATE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
