//! The only place in the workspace's libraries where `unsafe` is allowed (the crate root
//! denies it, the daemons forbid it): the kernel interfaces that need it, each block with a
//! `// SAFETY:` comment (clippy's `undocumented_unsafe_blocks`, denied workspace-wide).
//!
//! | module | what needs unsafe |
//! | --- | --- |
//! | [`uffd`] | userfaultfd: creation, ioctls, event reads |
//! | [`mmap`] | read-only and shared mappings of guest RAM |
//! | [`sigbus`] | the SIGBUS handler that survives a shrinking file |
//! | [`sched`] | scheduling policy, CPU affinity, busy-polling reads |
//! | [`pi_mutex`] | the priority-inheriting pthread mutex |
//! | [`scm`] | taking the fds a peer sends with SCM_RIGHTS |
//! | [`xattr`] | extended attributes of an open file |
#![allow(unsafe_code)]

pub mod mmap;
pub mod pi_mutex;
pub mod sched;
pub mod scm;
pub mod sigbus;
pub mod uffd;
pub mod xattr;
