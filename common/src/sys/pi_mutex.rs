//! A lock with priority inheritance, for a lock a real-time thread shares with ordinary ones.
//!
//! faultd's fault thread and pagesrv's urgent threads run SCHED_FIFO and take locks that
//! ordinary-priority threads (faultd's bulk placements, pagesrv's pushers) hold at times.
//! With `std::sync::Mutex`, a holder preempted while holding keeps the real-time thread
//! waiting until the ordinary scheduler runs it again: milliseconds when many VMs' threads
//! share the CPUs (priority inversion). A `PTHREAD_PRIO_INHERIT` mutex lends the waiter's
//! priority to the holder, so the holder finishes its critical section at once.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// A mutex with priority inheritance, guarding a `T`. No poisoning: a panic while holding
/// it unlocks it.
pub struct PiMutex<T> {
    /// Boxed: a pthread mutex must not move once initialised.
    raw: Box<UnsafeCell<libc::pthread_mutex_t>>,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, which exists only while the pthread
// mutex is held; the mutex itself is made to be shared across threads and never moves.
unsafe impl<T: Send> Send for PiMutex<T> {}
// SAFETY: as above: `&PiMutex` gives `&mut T` to one thread at a time, so `T: Send` suffices.
unsafe impl<T: Send> Sync for PiMutex<T> {}

impl<T> std::fmt::Debug for PiMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiMutex")
    }
}

impl<T: Default> Default for PiMutex<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> PiMutex<T> {
    /// A new unlocked mutex around `data`: priority-inheriting where the C library and the
    /// kernel offer it, a plain mutex otherwise.
    pub fn new(data: T) -> Self {
        // SAFETY: an all-zero pthread_mutex_t is only storage here; pthread_mutex_init
        // below initialises it before any other use.
        let raw: Box<UnsafeCell<libc::pthread_mutex_t>> =
            Box::new(UnsafeCell::new(unsafe { std::mem::zeroed() }));
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
        // destroyed after; `raw` points to boxed storage nobody else sees yet, initialised
        // exactly once: with the attribute, or with the defaults if the attribute failed.
        let rc = unsafe {
            let with_attr = libc::pthread_mutexattr_init(attr.as_mut_ptr()) == 0;
            let mut rc = -1;
            if with_attr {
                if libc::pthread_mutexattr_setprotocol(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_PRIO_INHERIT,
                ) == 0
                {
                    rc = libc::pthread_mutex_init(raw.get(), attr.as_ptr());
                }
                libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            }
            if rc != 0 {
                rc = libc::pthread_mutex_init(raw.get(), std::ptr::null());
            }
            rc
        };
        assert_eq!(rc, 0, "pthread_mutex_init failed");
        PiMutex {
            raw,
            data: UnsafeCell::new(data),
        }
    }

    /// Waits for the mutex; it is released when the guard drops.
    ///
    /// # Panics
    /// If the C library reports an error (a deadlock it detected): handing out a guard
    /// anyway would break the exclusion.
    pub fn lock(&self) -> PiGuard<'_, T> {
        // SAFETY: an initialised mutex that outlives the guard borrowing it.
        let rc = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        assert_eq!(rc, 0, "pthread_mutex_lock failed");
        PiGuard {
            mutex: self,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl<T> Drop for PiMutex<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no guard borrows the mutex any more. A guard leaked with
        // mem::forget leaves it locked; glibc then refuses (EBUSY) and nothing happens.
        unsafe { libc::pthread_mutex_destroy(self.raw.get()) };
    }
}

/// Holds a [`PiMutex`] (and so its data) until dropped.
#[must_use = "the mutex is released when the guard drops"]
pub struct PiGuard<'a, T> {
    mutex: &'a PiMutex<T>,
    /// Guards stay on the thread that locked (pthreads requires the owner to unlock).
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<T> Deref for PiGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the mutex.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for PiGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for PiGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex when it made the guard (the raw-pointer marker
        // keeps guards on their thread) and unlocks it once.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn it_excludes_and_keeps_the_data() {
        let m = Arc::new(PiMutex::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let mut g = m.lock();
                        // Not atomic: a lost update would show exclusion failing.
                        let seen = *g;
                        std::hint::black_box(&seen);
                        *g = seen + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*m.lock(), 40_000);
    }

    #[test]
    fn a_panic_while_holding_unlocks() {
        let m = Arc::new(PiMutex::new(1u8));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("while holding");
        })
        .join();
        assert_eq!(*m.lock(), 1);
    }
}
