//! Shared pieces of pagesrv and faultd: the wire protocol, the guest RAM layout, the page
//! map, and the few modules that talk to the kernel unsafely (userfaultfd, mmap, SCM_RIGHTS,
//! the SIGBUS guard).
#![deny(missing_docs)]

pub mod atomic_file;
pub mod auth;
pub mod control;
pub mod digest;
pub mod framed;
pub mod free_hints;
pub mod handshake;
pub mod layout;
pub mod metrics;
pub mod mmap;
pub mod netns;
pub mod netopt;
pub mod pagemap;
pub mod pi_mutex;
pub mod sched;
pub mod seal;
pub mod sigbus;
pub mod source_link;
pub mod uds;
pub mod uffd;
pub mod vmm_link;
pub mod wire;
pub mod working_set;
