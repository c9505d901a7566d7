//! Thread scheduling for the latency-critical threads (faultd's fault thread, pagesrv's
//! urgent thread): a woken fault server must not wait behind the bulk threads for a CPU.

/// Runs the calling thread under SCHED_FIFO at the lowest real-time priority, so it preempts
/// ordinary threads the moment it wakes. Threads it spawns afterwards inherit the policy:
/// spawn them first, or call [`normal_priority`] in them.
///
/// # Errors
/// EPERM without CAP_SYS_NICE (callers log it and carry on).
pub fn realtime_priority() -> std::io::Result<()> {
    set_policy(libc::SCHED_FIFO, 1)
}

/// Puts the calling thread back under the ordinary scheduler.
///
/// # Errors
/// The kernel's refusal.
pub fn normal_priority() -> std::io::Result<()> {
    set_policy(libc::SCHED_OTHER, 0)
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
