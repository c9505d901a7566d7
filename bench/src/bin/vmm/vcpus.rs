//! The vCPU threads: registered so a signal can interrupt `KVM_RUN` (to pause, or when
//! faultd dies), and the secondary vCPUs' threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bench::kvm_vm::Vcpu;

extern "C" fn on_stop_signal(_: libc::c_int) {}

/// The running vCPU threads, for signals that make a blocked KVM_RUN return. A thread is
/// taken off before it ends (under this lock), so no signal goes to a thread that is gone.
pub(crate) static VCPU_THREADS: std::sync::Mutex<Vec<libc::pthread_t>> =
    std::sync::Mutex::new(Vec::new());

/// Installs a SIGUSR1 handler that does nothing (without SA_RESTART, so the signal makes a
/// blocked KVM_RUN return EINTR instead of killing the process) and registers the calling
/// thread as a vCPU thread.
pub(crate) fn install_stop_signal() {
    // SAFETY: installs a handler that does nothing; `action` is fully initialised.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop_signal as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
    register_vcpu_thread();
}

pub(crate) fn register_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(me);
}

pub(crate) fn unregister_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&t| t != me);
}

/// Makes every vCPU thread's KVM_RUN return now.
pub(crate) fn interrupt_vcpu() {
    for &thread in VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        // SAFETY: a registered thread is alive (it unregisters under this lock before it
        // ends) and handles SIGUSR1 with a no-op handler.
        unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
    }
}

/// Keeps the calling thread registered as a vCPU thread until dropped (also when the thread
/// panics).
pub(crate) struct Registered;

impl Registered {
    fn new() -> Self {
        register_vcpu_thread();
        Registered
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        unregister_vcpu_thread();
    }
}

/// vCPUs 1.. on threads of their own: they run until [`Secondaries::stop`] (or the drop:
/// declared after the VM and the uffd, they stop before either goes), reporting into guest
/// RAM (vCPU 0's thread reads every vCPU's counters when it reports).
pub(crate) struct Secondaries {
    stop: Arc<AtomicBool>,
    threads: Vec<(u64, std::thread::JoinHandle<Result<Vcpu>>)>,
}

impl Secondaries {
    pub(crate) fn start(vcpus: Vec<Vcpu>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vcpus
            .into_iter()
            .zip(1..)
            .map(|(mut vcpu, index)| {
                let stop = stop.clone();
                let thread = std::thread::spawn(move || {
                    let _registered = Registered::new();
                    while !stop.load(Ordering::Acquire) {
                        vcpu.run_until_report()?;
                    }
                    Ok(vcpu)
                });
                (index, thread)
            })
            .collect();
        Secondaries { stop, threads }
    }

    /// Fails if a vCPU thread ended by itself (its vCPU failed).
    pub(crate) fn check(&mut self) -> Result<()> {
        if let Some(i) = self.threads.iter().position(|(_, t)| t.is_finished()) {
            let (index, failed) = self.threads.remove(i);
            return match failed.join() {
                Ok(Err(e)) => Err(e.context(format!("vCPU {index}"))),
                Ok(Ok(_)) => bail!("vCPU {index} stopped"),
                Err(_) => bail!("vCPU {index} panicked"),
            };
        }
        Ok(())
    }

    /// Stops every vCPU (a signal each, again until they stopped: one that lands outside
    /// KVM_RUN is lost) and returns them in order.
    pub(crate) fn stop(mut self) -> Result<Vec<Vcpu>> {
        self.halt();
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|(index, t)| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("vCPU {index} panicked"))?
                    .with_context(|| format!("vCPU {index}"))
            })
            .collect()
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        while !self.threads.iter().all(|(_, t)| t.is_finished()) {
            interrupt_vcpu();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Secondaries {
    fn drop(&mut self) {
        // An early return: the vCPUs must not run on after guest RAM and the uffd are gone.
        self.halt();
        for (_, t) in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
