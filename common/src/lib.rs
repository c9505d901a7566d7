//! Shared pieces of pagesrv and faultd: the wire protocol and the handshake, the source's
//! session decisions (`source_core`), data (the guest RAM layout, the page map, digests,
//! working sets), the operators' servers (`ops`: control socket, metrics), and in `sys` the
//! few modules that talk to the kernel unsafely (userfaultfd, mmap, SCM_RIGHTS, the SIGBUS
//! guard, scheduling).
#![deny(missing_docs)]
// All the unsafe code is in `sys` (which allows it); nothing else may have any.
#![deny(unsafe_code)]

pub mod atomic_file;
pub mod auth;
pub mod digest;
pub mod error_chain;
pub mod framed;
pub mod free_hints;
pub mod handshake;
pub mod layout;
pub mod netns;
pub mod netopt;
pub mod ops;
pub mod pagemap;
pub mod seal;
pub mod source_core;
pub mod source_link;
pub mod sys;
pub mod uds;
pub mod vmm_link;
pub mod wire;
pub mod working_set;

pub use error_chain::error_chain;
pub use ops::{control, metrics};
pub use sys::{mmap, pi_mutex, sched, sigbus, uffd, xattr};
