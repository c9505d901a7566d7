//! A lock with priority inheritance, for a lock a real-time thread shares with ordinary ones.
//!
//! faultd's fault thread runs SCHED_FIFO and takes the placement gate that bulk threads
//! (ordinary priority) hold while they place pages. With `std::sync::Mutex` a bulk thread
//! preempted while holding it keeps the fault thread waiting until the ordinary scheduler
//! runs it again: milliseconds when many VMs' threads share the CPUs (priority inversion).
//! A `PTHREAD_PRIO_INHERIT` mutex lends the waiter's priority to the holder, so the holder
//! finishes its placement at once.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;

/// A mutex guarding no data, with priority inheritance.
pub struct PiMutex {
    /// Boxed: a pthread mutex must not move once initialised.
    raw: Box<UnsafeCell<libc::pthread_mutex_t>>,
}

// SAFETY: a pthread mutex is made to be shared and locked from any thread; it is never
// moved (boxed) and only touched through the pthread calls.
unsafe impl Send for PiMutex {}
// SAFETY: as above.
unsafe impl Sync for PiMutex {}

impl std::fmt::Debug for PiMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiMutex")
    }
}

impl Default for PiMutex {
    fn default() -> Self {
        Self::new()
    }
}

impl PiMutex {
    /// A new unlocked mutex (priority inheritance where the C library offers it; a plain
    /// mutex otherwise).
    pub fn new() -> Self {
        let raw = Box::new(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
        // destroyed after; `raw` points to a boxed mutex nobody else sees yet. On a failed
        // attribute call the statically initialised plain mutex stays in place.
        unsafe {
            if libc::pthread_mutexattr_init(attr.as_mut_ptr()) == 0 {
                if libc::pthread_mutexattr_setprotocol(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_PRIO_INHERIT,
                ) == 0
                {
                    libc::pthread_mutex_init(raw.get(), attr.as_ptr());
                }
                libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            }
        }
        PiMutex { raw }
    }

    /// Waits for the mutex; it is released when the guard drops.
    pub fn lock(&self) -> PiGuard<'_> {
        // SAFETY: an initialised mutex that lives as long as the guard borrowing it. A
        // default (non-error-checking) mutex returns no error a correct caller can cause.
        let rc = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        debug_assert_eq!(rc, 0, "pthread_mutex_lock");
        PiGuard(self, std::marker::PhantomData)
    }
}

impl Drop for PiMutex {
    fn drop(&mut self) {
        // SAFETY: no guard can be alive (they borrow the mutex); destroyed once.
        unsafe { libc::pthread_mutex_destroy(self.raw.get()) };
    }
}

/// Holds a [`PiMutex`] until dropped.
#[must_use = "the mutex is released when the guard drops"]
pub struct PiGuard<'a>(&'a PiMutex, std::marker::PhantomData<*const ()>);

impl Drop for PiGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex when it made the guard (the raw-pointer marker
        // keeps guards on their thread, as pthreads requires) and unlocks it once.
        unsafe { libc::pthread_mutex_unlock(self.0.raw.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn it_excludes() {
        let m = Arc::new(PiMutex::new());
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (m, inside) = (m.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let _g = m.lock();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
