//! Thread scheduling for the latency-critical threads (faultd's fault thread, pagesrv's
//! urgent thread): a woken fault server must not wait behind the bulk threads for a CPU.
//! [`FastPath`] also pins them and their bulk threads to CPUs and sets how long they spin
//! before sleeping (`--fault-cpu`/`--urgent-cpu`, `--bulk-cpus`, `--busy-poll-us`).

use std::time::Duration;

/// The longest busy-poll the daemons accept (`--busy-poll-us`): a spinning real-time thread
/// keeps ordinary threads on its CPU waiting, and must still see heartbeats and stop flags.
pub const MAX_BUSY_POLL_US: u64 = 1000;

/// Where the latency-critical thread and the bulk threads of a daemon run, and how long the
/// latency-critical thread spins (busy-polls) before it sleeps.
#[derive(Debug, Clone, Default)]
pub struct FastPath {
    /// Pin the latency-critical thread to this CPU.
    pub cpu: Option<usize>,
    /// Pin the bulk threads to these CPUs (unset: every CPU the process started with).
    pub bulk_cpus: Option<Vec<usize>>,
    /// Spin this long waiting for the next frame or fault before sleeping (zero: never).
    pub busy_poll: Duration,
    /// The CPUs the process may use, taken before any thread was pinned.
    allowed: Vec<usize>,
}

impl FastPath {
    /// Settings for this process; remembers the CPUs it may use now, so bulk threads
    /// spawned by a pinned thread can be given them back.
    ///
    /// # Errors
    /// A CPU we may not use.
    pub fn new(
        cpu: Option<usize>,
        bulk_cpus: Option<CpuList>,
        busy_poll: Duration,
    ) -> std::io::Result<Self> {
        let bulk_cpus = bulk_cpus.map(|l| l.0);
        let allowed = allowed_cpus()?;
        let outside = cpu
            .iter()
            .chain(bulk_cpus.iter().flatten())
            .find(|c| !allowed.contains(c));
        if let Some(c) = outside {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("CPU {c} is not one this process may use (allowed: {allowed:?})"),
            ));
        }
        Ok(Self {
            cpu,
            bulk_cpus,
            busy_poll,
            allowed,
        })
    }

    /// Makes the calling thread the latency-critical one: SCHED_FIFO (when permitted) and
    /// pinned to `cpu` (when set). Returns what could not be done, for the caller to log.
    pub fn enter_latency_thread(&self) -> Vec<String> {
        let mut failed = Vec::new();
        if let Err(e) = realtime_priority() {
            failed.push(format!("real-time priority: {e}"));
        }
        if let Some(cpu) = self.cpu
            && let Err(e) = pin_current_thread(&[cpu])
        {
            failed.push(format!("pinning to CPU {cpu}: {e}"));
        }
        failed
    }

    /// Makes the calling thread a bulk one: the ordinary scheduler, on `bulk_cpus` (or on
    /// every CPU the process started with, undoing a pin inherited from its spawner).
    pub fn enter_bulk_thread(&self) {
        let _ = normal_priority();
        let cpus = self.bulk_cpus.as_deref().unwrap_or(&self.allowed);
        if !cpus.is_empty() {
            let _ = pin_current_thread(cpus);
        }
    }
}

/// The CPUs the calling thread may run on, in order.
///
/// # Errors
/// The kernel's refusal.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, filled in by the kernel.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size we pass.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: `c` is below the set's capacity.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Spins until `ready()` says yes or `budget` has passed, yielding the CPU to threads of
/// the same priority between checks; returns whether `ready()` said yes.
pub fn spin_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < budget {
        if ready() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// Runs the calling thread under SCHED_FIFO at the lowest real-time priority, so it preempts
/// ordinary threads the moment it wakes. Threads it spawns afterwards inherit the policy:
/// spawn them first, or call [`normal_priority`] in them.
///
/// # Errors
/// EPERM without CAP_SYS_NICE (callers log it and carry on).
pub fn realtime_priority() -> std::io::Result<()> {
    set_policy(libc::SCHED_FIFO, 1)
}

/// Runs the calling thread under SCHED_FIFO at `priority` (1..=99), above the daemons'
/// latency-critical threads when it is above 1: for what stands in for hardware in a test
/// or benchmark (an emulated link must not wait behind the endpoints for a CPU).
///
/// # Errors
/// EPERM without CAP_SYS_NICE, EINVAL for a priority out of range.
pub fn realtime_priority_at(priority: i32) -> std::io::Result<()> {
    set_policy(libc::SCHED_FIFO, priority)
}

/// Sets the calling thread's nice value (threads it spawns afterwards inherit it).
///
/// # Errors
/// The kernel's refusal (EACCES lowering it without CAP_SYS_NICE).
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: PRIO_PROCESS with a thread id addresses that one thread; no pointers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread back under the ordinary scheduler.
///
/// # Errors
/// The kernel's refusal.
pub fn normal_priority() -> std::io::Result<()> {
    set_policy(libc::SCHED_OTHER, 0)
}

/// While held, the calling thread runs under the ordinary scheduler; on drop it gets back
/// the real-time priority it had (long work, such as hashing a whole guest, must not hold a
/// CPU from every ordinary thread).
#[derive(Debug)]
pub struct OrdinaryPriority {
    restore: Option<libc::c_int>,
}

impl OrdinaryPriority {
    /// Drops the calling thread to the ordinary scheduler if it runs real-time.
    pub fn enter() -> Self {
        // SAFETY: sched_getscheduler(0) asks about the calling thread; no pointers.
        let policy = unsafe { libc::sched_getscheduler(0) };
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param the call fills in.
        let got = unsafe { libc::sched_getparam(0, &mut param) };
        let realtime = policy == libc::SCHED_FIFO || policy == libc::SCHED_RR;
        if realtime && got == 0 && normal_priority().is_ok() {
            return OrdinaryPriority {
                restore: Some(param.sched_priority),
            };
        }
        OrdinaryPriority { restore: None }
    }

    /// Whether the thread was real-time (and runs ordinary until this drops).
    pub fn lowered(&self) -> bool {
        self.restore.is_some()
    }
}

impl Drop for OrdinaryPriority {
    fn drop(&mut self) {
        if let Some(priority) = self.restore {
            let _ = realtime_priority_at(priority);
        }
    }
}

fn set_policy(policy: libc::c_int, priority: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param on our stack.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpus` (CPU numbers as the kernel counts them).
///
/// # Errors
/// An empty set, a CPU number past the kernel's set size, or the kernel's refusal (a CPU
/// that is offline or outside our cgroup's set).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if cpus.is_empty() || cpus.iter().any(|&c| c >= max) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("CPU list {cpus:?} is empty or names a CPU past {}", max - 1),
        ));
    }
    for &cpu in cpus {
        // SAFETY: `cpu` is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size we pass.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A list of CPUs, as given on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses a CPU list as the kernel writes them (`0`, `0,2`, `1-3`, `0,4-5`).
///
/// # Errors
/// A malformed list or an empty one.
pub fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |e: std::num::ParseIntError| format!("bad CPU list {text:?}: {part}: {e}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
                if a > b || b - a > 4096 {
                    return Err(format!("bad CPU range {part:?} in {text:?}"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(bad)?),
        }
    }
    if cpus.is_empty() {
        return Err(format!("empty CPU list {text:?}"));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
}

/// Spins until `fd` is readable (or has hung up) or `budget` has passed; see [`spin_until`].
pub fn spin_until_readable(fd: std::os::fd::BorrowedFd<'_>, budget: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    spin_until(budget, || {
        // SAFETY: polls one valid pollfd (the fd is borrowed for this call), without waiting.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) != 0 }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ordinary_priority_lowers_a_realtime_thread_and_restores_it() {
        std::thread::spawn(|| {
            if realtime_priority_at(3).is_err() {
                eprintln!("SKIPPED: real-time priority is not permitted here");
                return;
            }
            // SAFETY: asks about the calling thread; no pointers.
            let policy = || unsafe { libc::sched_getscheduler(0) };
            {
                let lowered = OrdinaryPriority::enter();
                assert!(lowered.lowered());
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
            assert_eq!(policy(), libc::SCHED_FIFO, "restored");
            let mut param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param the call fills in.
            assert_eq!(unsafe { libc::sched_getparam(0, &mut param) }, 0);
            assert_eq!(param.sched_priority, 3, "at its old priority");
            normal_priority().unwrap();
            assert!(
                !OrdinaryPriority::enter().lowered(),
                "an ordinary thread stays"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0").unwrap().0, vec![0]);
        assert_eq!(parse_cpu_list("0,4-5, 2").unwrap().0, vec![0, 2, 4, 5]);
        assert_eq!(parse_cpu_list("1-1,1").unwrap().0, vec![1]);
        for bad in ["", ",", "a", "3-1", "1-", "-2", "0-99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pinning_takes_effect_and_refuses_nonsense() {
        let first = allowed_cpus().unwrap()[0];
        let handle = std::thread::spawn(move || {
            pin_current_thread(&[first]).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = unsafe { libc::sched_getcpu() };
            let refused =
                pin_current_thread(&[1 << 20]).is_err() && pin_current_thread(&[]).is_err();
            (cpu, refused)
        });
        assert_eq!(handle.join().unwrap(), (first as i32, true));
    }

    #[test]
    fn spinning_sees_readable_sockets_and_gives_up_on_silent_ones() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!spin_until_readable(b.as_fd(), Duration::from_micros(200)));
        assert!(!spin_until_readable(b.as_fd(), Duration::ZERO));
        a.write_all(b"x").unwrap();
        assert!(spin_until_readable(b.as_fd(), Duration::from_millis(100)));
    }
}
