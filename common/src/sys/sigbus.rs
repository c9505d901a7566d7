//! Surviving a file that shrinks under a mapping of it. Touching a mapped page past the
//! file's new end raises SIGBUS, which would kill the whole daemon (every session, every
//! VM). For the ranges registered here, a SIGBUS handler instead maps an anonymous zero page
//! over the faulting page (so the read, or write, completes) and counts the event *for that range*; the
//! owner checks [`Guard::hits`] before it trusts what it read, and fails its session
//! instead. One VM's shrinking file therefore fails that VM's sessions only. A SIGBUS at any
//! other address keeps its default action.
//!
//! Kernel-side copies from such a mapping (`writev` of mapped pages) never raise SIGBUS: they
//! fail with EFAULT, which the sender sees as an ordinary write error.
//!
//! The registry is a fixed table of [`SLOTS`] entries the handler scans (only on a SIGBUS);
//! each entry is published under a sequence counter, so the handler never acts on a range
//! torn between an old and a new owner.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use thiserror::Error;

/// Most ranges guarded at once (a pagesrv guards one per VM it serves).
pub const SLOTS: usize = 1024;

/// How often the handler re-reads an entry that is being rewritten before it skips it.
const READ_TRIES: usize = 8;

struct Slot {
    /// Even: the fields are stable; odd: being rewritten.
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Page size of the range; 0 = the slot is free (claimed by a CAS from 0).
    page: AtomicUsize,
    /// Pages replaced by zeros in this range since it was guarded.
    hits: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    seq: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    hits: AtomicU64::new(0),
};
static GUARDED: [Slot; SLOTS] = [EMPTY; SLOTS];
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

impl Guard {
    /// Pages of this range replaced by zeros since it was guarded (reads past the end of a
    /// file that shrank).
    pub fn hits(&self) -> u64 {
        GUARDED[self.slot].hits.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &GUARDED[self.slot];
        slot.seq.fetch_add(1, Ordering::AcqRel);
        slot.len.store(0, Ordering::Release);
        slot.start.store(0, Ordering::Release);
        slot.seq.fetch_add(1, Ordering::AcqRel);
        // Free for the next owner only once the handler can no longer match the range.
        slot.page.store(0, Ordering::Release);
    }
}

/// Guards the mapping `start..start+len`, whose pages are `page` bytes.
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
            slot.seq.fetch_add(1, Ordering::AcqRel);
            slot.hits.store(0, Ordering::Release);
            slot.start.store(start, Ordering::Release);
            slot.len.store(len, Ordering::Release);
            slot.seq.fetch_add(1, Ordering::AcqRel);
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

/// A slot's range as one consistent snapshot (`None`: free, or rewritten under us).
fn read_slot(slot: &Slot) -> Option<(usize, usize, usize)> {
    for _ in 0..READ_TRIES {
        let before = slot.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            continue;
        }
        let range = (
            slot.start.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
            slot.page.load(Ordering::Acquire),
        );
        if slot.seq.load(Ordering::Acquire) == before {
            return Some(range).filter(|&(_, len, page)| len != 0 && page != 0);
        }
    }
    None
}

/// The SIGBUS handler: atomics, and the `mmap` and `signal` system calls.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life;
    // the handler restores it on its way out, so the interrupted code never sees ours.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved_errno = unsafe { *errno };
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut handled = false;
    for slot in &GUARDED {
        let Some((start, len, page)) = read_slot(slot) else {
            continue;
        };
        if addr < start || addr >= start + len {
            continue;
        }
        let at = start + (addr - start) / page * page;
        // SAFETY: replaces one page of a mapping this process owns (registered by its owner,
        // who keeps it mapped while guarded) with anonymous zeros (writable, so a faulting
        // write completes too, into memory nobody reads). `mmap` is not
        // on POSIX's list of async-signal-safe functions, but on Linux glibc's wrapper is the
        // bare system call, which touches no lock or heap; it may set errno, restored below.
        let mapped = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.hits.fetch_add(1, Ordering::AcqRel);
            handled = true;
            break;
        }
    }
    if !handled {
        // Not a guarded range: the default action, when the access is retried.
        // SAFETY: signal(2) is async-signal-safe; restoring SIG_DFL has no preconditions.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
    // SAFETY: `errno` points at this thread's errno (above).
    unsafe { *errno = saved_errno };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mapping;
    use std::os::fd::AsFd;

    fn mapped_file(name: &str, pages: usize) -> (std::path::PathBuf, std::fs::File, Mapping) {
        let path = std::env::temp_dir().join(format!("sigbus-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; pages * 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = Mapping::file_readonly(file.as_fd(), pages * 4096).unwrap();
        (path, file, map)
    }

    #[test]
    fn test_reading_past_a_shrunk_file_reads_zero_and_counts_for_that_range_only() {
        let (path, _file, map) = mapped_file("shrunk", 4);
        let (other_path, _other_file, other_map) = mapped_file("intact", 2);
        let guard = guard(map.addr() as usize, map.len(), 4096).unwrap();
        let other = super::guard(other_map.addr() as usize, other_map.len(), 4096).unwrap();
        assert_eq!(map.as_slice()[3 * 4096], 7);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Pages 1..4 are gone: reading them would kill the process without the guard.
        let tail: u64 = map.as_slice()[4096..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0);
        assert_eq!(guard.hits(), 3, "one hit per page");
        assert_eq!(
            map.as_slice()[0],
            7,
            "the page still in the file is untouched"
        );
        assert_eq!(other_map.as_slice()[4096], 7);
        assert_eq!(
            other.hits(),
            0,
            "another range is not charged with this one's hits"
        );
        drop(guard);
        drop(other);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&other_path).unwrap();
    }

    #[test]
    fn test_many_ranges_can_be_guarded_and_a_dropped_one_leaves_nothing() {
        let guards: Vec<Guard> = (0..64)
            .map(|i| guard(0x1000_0000 + i * 0x10_0000, 0x1000, 4096).unwrap())
            .collect();
        let slots: std::collections::HashSet<usize> = guards.iter().map(|g| g.slot).collect();
        assert_eq!(slots.len(), 64, "each its own slot");
        let freed = guards[10].slot;
        drop(guards);
        assert_ne!(
            read_slot(&GUARDED[freed]),
            Some((0x1000_0000 + 10 * 0x10_0000, 0x1000, 4096)),
            "a dropped guard's range is matched no more"
        );
        // A range in a reused slot is matched by the handler, with no hits of the old one.
        let again = guard(0x2000_0000, 0x1000, 4096).unwrap();
        assert_eq!(again.hits(), 0);
        assert_eq!(
            read_slot(&GUARDED[again.slot]),
            Some((0x2000_0000, 0x1000, 4096))
        );
    }
}
