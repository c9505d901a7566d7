//! The fault core: the decisions of the destination as plain code over a [`kernel::Kernel`]
//! trait, so they can be unit-tested with a fake that injects EAGAIN, EEXIST, REMOVE events
//! and cuts. `vm` holds the shared state and placement, `fault` the fault path's decisions,
//! `push` the bulk threads' placement, `bulk_rx` what each bulk frame asks for, `session` the
//! destination's session over all of it.
//!
//! # Threads, what each owns, and every lock
//!
//! | thread | owns | blocks on |
//! | --- | --- | --- |
//! | fault thread (`event_loop`, SCHED_FIFO) | the uffd's events (the only reader), the [`fault::FaultCore`] (requests in flight, deferred work, the outbox), the urgent socket (non-blocking), the VMM's socket | `poll` only (uffd, urgent socket, VMM socket, waker; with a timeout for heartbeats and deferred work) |
//! | bulk thread, one per link | its bulk socket | reading its socket (timeout: the link timeout); the placement gate; after EAGAIN, the event epoch for at most 1 ms or until its stop flag |
//! | connector | a new link until it is handed over (handshake, done and skip maps, with timeouts) | connect/handshake (5 s deadline), backoff sleeps (its stop channel) |
//!
//! Locks and shared state:
//! - the **placement gate** (`Vm::gate`, a `Mutex<()>`): held by the fault thread while it
//!   reads events and marks removals, by bulk threads for each ≤ 128 KiB placement, and by
//!   every placement in memfd mode. Nobody holding it waits for anything but the kernel.
//! - the **event epoch** (`Vm::wait_for_events`: an atomic counter, a mutex and a condvar):
//!   the fault thread bumps it after every read of the events; a placement that met EAGAIN
//!   waits on it, bounded, and a cut wakes it.
//! - the **page maps** (`done`, `zero`, `skipped`) and counters: atomics, no lock.
//! - the channel from the helper threads to the fault thread (with a mio waker).
//!
//! No thread waits for something only a blocked thread can do: the fault thread never waits
//! for a bulk thread or a socket; a bulk thread that needs events read waits on the epoch
//! with a bound and a stop flag; a cut sets the stop flag and shuts the sockets without
//! joining (the threads end on their own, the scope joins them at exit).

pub mod bulk_rx;
pub mod fault;
pub mod guest_file;
pub mod kernel;
pub mod latency;
pub mod push;
pub mod reconnect;
pub mod session;
pub mod shared_ram;
pub mod vm;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
