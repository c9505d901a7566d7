//! Surviving a file that shrinks under a read-only mapping of it. Reading a mapped page past
//! the file's new end raises SIGBUS, which would kill the whole daemon (every session, every
//! VM). For the ranges registered here, a SIGBUS handler instead maps an anonymous zero page
//! over the faulting page (so the read completes) and counts the event; the owner checks
//! [`hits`] before it trusts what it read, and fails the session instead. A SIGBUS at any
//! other address keeps its default action.
//!
//! Kernel-side copies from such a mapping (`writev` of mapped pages) never raise SIGBUS: they
//! fail with EFAULT, which the sender sees as an ordinary write error.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use thiserror::Error;

/// Most ranges guarded at once.
const SLOTS: usize = 8;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
};
static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
static HITS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
static INSTALL_ERRNO: AtomicUsize = AtomicUsize::new(0);

/// Errors guarding a range.
#[derive(Debug, Error)]
pub enum GuardError {
    /// The handler could not be installed.
    #[error("failed to install the SIGBUS handler")]
    Install(#[source] std::io::Error),
    /// Every slot is taken.
    #[error("more than {SLOTS} mappings guarded at once")]
    Full,
}

/// A guarded range; unguarded on drop (drop it before unmapping the range).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &GUARDED[self.slot];
        slot.len.store(0, Ordering::Release);
        slot.page.store(0, Ordering::Release);
    }
}

/// Pages replaced by zeros since the process started (any guarded range).
pub fn hits() -> u64 {
    HITS.load(Ordering::Acquire)
}

/// Guards the read-only mapping `start..start+len`, whose pages are `page` bytes.
///
/// # Errors
/// The handler could not be installed, or too many ranges are guarded.
pub fn guard(start: usize, len: usize, page: usize) -> Result<Guard, GuardError> {
    INSTALL.call_once(|| {
        if let Err(e) = install_handler() {
            INSTALL_ERRNO.store(
                e.raw_os_error().unwrap_or(libc::EINVAL) as usize,
                Ordering::Release,
            );
        }
    });
    let errno = INSTALL_ERRNO.load(Ordering::Acquire);
    if errno != 0 {
        return Err(GuardError::Install(std::io::Error::from_raw_os_error(
            errno as i32,
        )));
    }
    for (i, slot) in GUARDED.iter().enumerate() {
        // Claim a free slot by its page size (0 = free), then publish the range.
        if slot
            .page
            .compare_exchange(0, page.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.start.store(start, Ordering::Release);
            slot.len.store(len, Ordering::Release);
            return Ok(Guard { slot: i });
        }
    }
    Err(GuardError::Full)
}

fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; every field we rely on is set
    // below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler for SIGBUS; `action` is fully initialised and the old
    // action is not needed.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGBUS handler: only atomics and async-signal-safe system calls.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &GUARDED {
        let (start, len, page) = (
            slot.start.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
            slot.page.load(Ordering::Acquire),
        );
        if len == 0 || page == 0 || addr < start || addr >= start + len {
            continue;
        }
        let at = start + (addr - start) / page * page;
        // SAFETY: replaces one page of a read-only mapping this process owns (registered
        // by its owner) with anonymous zeros; mmap is async-signal-safe.
        let mapped = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            HITS.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    // Not a guarded range: the default action, when the access is retried.
    // SAFETY: restoring SIG_DFL is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mapping;
    use std::os::fd::AsFd;

    #[test]
    fn test_reading_past_a_shrunk_file_reads_zero_and_counts() {
        let path = std::env::temp_dir().join(format!("sigbus-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 4 * 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = Mapping::file_readonly(file.as_fd(), 4 * 4096).unwrap();
        let guard = guard(map.addr() as usize, map.len(), 4096).unwrap();
        assert_eq!(map.as_slice()[3 * 4096], 7);
        let before = hits();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Pages 1..4 are gone: reading them would kill the process without the guard.
        let tail: u64 = map.as_slice()[4096..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0);
        assert_eq!(hits() - before, 3, "one hit per page");
        assert_eq!(
            map.as_slice()[0],
            7,
            "the page still in the file is untouched"
        );
        drop(guard);
        std::fs::remove_file(&path).unwrap();
    }
}
