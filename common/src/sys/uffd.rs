//! The only userfaultfd code: create, register, read events, and place pages (copy, zero,
//! continue, wake), with the kernel's partial-result rules folded into [`Placement`].
//!
//! We call the ioctls directly with the kernel's own definitions (`linux-raw-sys`) rather than
//! through the `userfaultfd` crate: no bindgen/libclang at build time, `EAGAIN` and partial
//! copies reported as they are, MINOR/CONTINUE available, and no `user_mode_only` default that
//! silently breaks KVM faults.
//!
//! Kernel rules encoded here: a placement that copies some bytes and then stops returns
//! `EAGAIN` with the byte count; `EEXIST` means the page is already there (another placer won:
//! done, wake it); `EAGAIN` with nothing placed means the mapping is changing (an unread
//! REMOVE/UNMAP event): read events, then retry; `ESRCH` means the VMM's mm is gone.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as ioc;
use thiserror::Error;

/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// Size of one `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;
const _: () = assert!(size_of::<uapi::uffd_msg>() == MSG_BYTES);

/// Register mode: resolve faults on pages that are not mapped.
pub const MODE_MISSING: u64 = uapi::UFFDIO_REGISTER_MODE_MISSING as u64;
/// Register mode: resolve faults on shared pages present in the page cache but not mapped.
pub const MODE_MINOR: u64 = uapi::UFFDIO_REGISTER_MODE_MINOR as u64;

/// Features a VMM enables for faultd: REMOVE/UNMAP events, thread ids, shmem support.
pub const FEATURES_FOR_VMM: u64 = (uapi::UFFD_FEATURE_EVENT_REMOVE
    | uapi::UFFD_FEATURE_EVENT_UNMAP
    | uapi::UFFD_FEATURE_THREAD_ID
    | uapi::UFFD_FEATURE_MISSING_SHMEM
    | uapi::UFFD_FEATURE_MISSING_HUGETLBFS) as u64;

/// Feature needed to register shared memory in MINOR mode.
pub const FEATURE_MINOR_SHMEM: u64 = uapi::UFFD_FEATURE_MINOR_SHMEM as u64;
/// MINOR faults on hugetlbfs, for a VMM whose huge-page memfd faultd places pages into.
pub const FEATURE_MINOR_HUGETLBFS: u64 = uapi::UFFD_FEATURE_MINOR_HUGETLBFS as u64;

/// Errors from userfaultfd calls; each names the step.
#[derive(Debug, Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the syscall produced a userfaultfd.
    #[error("failed to create a userfaultfd")]
    Create(#[source] std::io::Error),
    /// `UFFDIO_API` refused the requested features.
    #[error("UFFDIO_API refused features {features:#x}")]
    Api {
        /// Requested features.
        features: u64,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// A handed-over userfaultfd could not be made non-blocking.
    #[error("failed to make the userfaultfd non-blocking")]
    NonBlocking(#[source] std::io::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("failed to register {addr:#x}+{len:#x}")]
    Register {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("failed to unregister {addr:#x}+{len:#x}")]
    Unregister {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Reading events failed.
    #[error("failed to read userfaultfd events")]
    Read(#[source] std::io::Error),
    /// The process that owns the registered memory has exited.
    #[error("the VMM's address space is gone")]
    ProcessGone,
    /// A placement ioctl failed for another reason.
    #[error("{op} of {addr:#x}+{len:#x} failed")]
    Place {
        /// Which ioctl.
        op: &'static str,
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a page that is missing (or, with `minor`, present but unmapped).
    PageFault {
        /// Faulting address (page-aligned by the kernel unless EXACT_ADDRESS).
        addr: u64,
        /// A write fault.
        write: bool,
        /// A MINOR fault (page in the page cache, not mapped).
        minor: bool,
        /// Faulting thread id (0 without UFFD_FEATURE_THREAD_ID).
        thread_id: u32,
    },
    /// `madvise(DONTNEED/REMOVE)`: the range reads zero from now on.
    Remove {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// `munmap`: the range is gone.
    Unmap {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// `mremap`: the range moved.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The process forked (a new uffd for the child, which faultd does not serve).
    Fork,
    /// An event this build does not know.
    Unknown(u8),
}

/// What a placement achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Every page of the range is present now (placed here or already there).
    Done {
        /// Byte offsets (from the start of the range) of the pages that were already present
        /// (`EEXIST`): another placement won the race, and its bytes are the ones that landed.
        existing: Vec<u64>,
    },
    /// The mapping is changing: pages before `placed_bytes` are present; read the pending
    /// events, then retry the rest.
    Again {
        /// Bytes at the start of the range that are present.
        placed_bytes: u64,
        /// As for `Done`, within the first `placed_bytes`.
        existing: Vec<u64>,
    },
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Uffd {
    /// Wraps a userfaultfd set up elsewhere (API done, as a VMM hands it over).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Uffd { fd }
    }

    /// Wraps a userfaultfd a VMM handed over and makes it non-blocking if it is not (the
    /// event reader must never block: it runs under the placement gate, and without
    /// readiness at start and on retries). The flag lives in the open file, shared with the
    /// VMM, which does not read the uffd itself. Returns whether it was blocking.
    ///
    /// # Errors
    /// [`UffdError::NonBlocking`]: the flags could not be read or set.
    pub fn adopt(fd: OwnedFd) -> Result<(Self, bool), UffdError> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let flags = fcntl(raw, FcntlArg::F_GETFL)
            .map(OFlag::from_bits_truncate)
            .map_err(|e| UffdError::NonBlocking(e.into()))?;
        let blocking = !flags.contains(OFlag::O_NONBLOCK);
        if blocking {
            fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))
                .map_err(|e| UffdError::NonBlocking(e.into()))?;
        }
        Ok((Uffd { fd }, blocking))
    }

    /// Creates a non-blocking userfaultfd that also sees kernel-mode faults (KVM), via
    /// `/dev/userfaultfd` or the syscall, and enables `features`.
    ///
    /// # Errors
    /// Creation or `UFFDIO_API` failure.
    pub fn create(features: u64) -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = Self::open_dev(flags).or_else(|_| {
            // SAFETY: plain syscall with integer flags; returns a new fd or -1.
            let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if raw < 0 {
                return Err(UffdError::Create(std::io::Error::last_os_error()));
            }
            // SAFETY: the syscall returned a fresh fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
        })?;
        let mut api = uapi::uffdio_api {
            api: u64::from(uapi::UFFD_API),
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api that lives on our stack.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), ioc::UFFDIO_API.into(), &mut api) };
        if rc < 0 {
            return Err(UffdError::Api {
                features,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Uffd { fd })
    }

    fn open_dev(flags: i32) -> Result<OwnedFd, UffdError> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(UffdError::Create)?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a
        // new fd.
        let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if raw < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Registers `addr..addr+len` with `mode` ([`MODE_MISSING`], optionally `| MODE_MINOR`).
    ///
    /// # Errors
    /// The kernel's refusal (unaligned range, unsupported memory type or mode).
    pub fn register(&self, addr: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range { start: addr, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register on our stack; it only
        // changes how faults in the VMM's range are handled, not our memory.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioc::UFFDIO_REGISTER.into(), &mut reg) };
        if rc < 0 {
            return Err(UffdError::Register {
                addr,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Unregisters `addr..addr+len`: faults there no longer come to us. Then wakes the range:
    /// the kernel's own wake on unregister was seen to miss a thread parked on a shmem fault
    /// (about 1 run in 40 here), and a thread left parked on a fault nobody reads hangs.
    ///
    /// # Errors
    /// The kernel's refusal; [`UffdError::ProcessGone`] when the VMM has exited.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uapi::uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range on our stack.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                ioc::UFFDIO_UNREGISTER.into(),
                &mut range,
            )
        };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ESRCH) {
                return Err(UffdError::ProcessGone);
            }
            return Err(UffdError::Unregister { addr, len, source });
        }
        self.wake(addr, len)
    }

    /// Reads every pending event (non-blocking) into `out`; returns how many were read.
    ///
    /// # Errors
    /// A read failure other than "nothing pending".
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        let mut buf = [0u8; MSG_BYTES * BATCH];
        let mut total = 0;
        loop {
            // SAFETY: reads at most buf.len() bytes into a buffer we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(total),
                    Some(libc::EINTR) => continue,
                    _ => return Err(UffdError::Read(e)),
                }
            }
            let n = n as usize;
            if n == 0 {
                return Ok(total);
            }
            for msg in buf[..n].chunks_exact(MSG_BYTES) {
                out.push(decode_msg(msg));
                total += 1;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    /// Copies `src` to the VMM's `dst` (page-aligned, whole pages), waking waiters. Pages that
    /// are already present are skipped (and woken).
    ///
    /// # Errors
    /// [`UffdError::ProcessGone`], or any other failure of the ioctl.
    pub fn copy(&self, dst: u64, src: &[u8], page_size: u64) -> Result<Placement, UffdError> {
        self.place_loop(
            "UFFDIO_COPY",
            dst,
            src.len() as u64,
            page_size,
            |at, len| {
                let mut arg = uapi::uffdio_copy {
                    dst: dst + at,
                    src: src[at as usize..].as_ptr() as u64,
                    len,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: the kernel reads `len` bytes from `src[at..]`, which is in bounds
                // (at + len <= src.len()), and writes only the VMM's registered range and `arg`.
                let rc =
                    unsafe { libc::ioctl(self.fd.as_raw_fd(), ioc::UFFDIO_COPY.into(), &mut arg) };
                (rc, arg.copy)
            },
        )
    }

    /// Maps zero pages at `dst..dst+len` (not for hugetlbfs), waking waiters.
    ///
    /// # Errors
    /// As [`Uffd::copy`].
    pub fn zeropage(&self, dst: u64, len: u64, page_size: u64) -> Result<Placement, UffdError> {
        self.place_loop("UFFDIO_ZEROPAGE", dst, len, page_size, |at, len| {
            let mut arg = uapi::uffdio_zeropage {
                range: uapi::uffdio_range {
                    start: dst + at,
                    len,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage on our stack.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), ioc::UFFDIO_ZEROPAGE.into(), &mut arg) };
            (rc, arg.zeropage)
        })
    }

    /// Maps the page-cache pages already at `dst..dst+len` (MINOR mode), waking waiters.
    ///
    /// # Errors
    /// As [`Uffd::copy`].
    pub fn continue_range(
        &self,
        dst: u64,
        len: u64,
        page_size: u64,
    ) -> Result<Placement, UffdError> {
        self.place_loop("UFFDIO_CONTINUE", dst, len, page_size, |at, len| {
            let mut arg = uapi::uffdio_continue {
                range: uapi::uffdio_range {
                    start: dst + at,
                    len,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE reads and writes one uffdio_continue on our stack.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), ioc::UFFDIO_CONTINUE.into(), &mut arg) };
            (rc, arg.mapped)
        })
    }

    /// Wakes threads waiting on `addr..addr+len`.
    ///
    /// # Errors
    /// [`UffdError::ProcessGone`] or another ioctl failure.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uapi::uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range on our stack.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioc::UFFDIO_WAKE.into(), &mut range) };
        if rc < 0 {
            return Err(classify(
                "UFFDIO_WAKE",
                addr,
                len,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Runs one placement ioctl over `dst..dst+len`, continuing after partial results and
    /// skipping pages that already exist, until done or the mapping is changing.
    fn place_loop(
        &self,
        op: &'static str,
        dst: u64,
        len: u64,
        page_size: u64,
        mut ioctl: impl FnMut(u64, u64) -> (libc::c_int, i64),
    ) -> Result<Placement, UffdError> {
        let mut at = 0;
        let mut existing = Vec::new();
        while at < len {
            let (rc, result) = ioctl(at, len - at);
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if result > 0 {
                at += result as u64;
                continue;
            }
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst + at, page_size)?;
                    existing.push(at);
                    at += page_size;
                }
                Some(libc::EAGAIN) => {
                    return Ok(Placement::Again {
                        placed_bytes: at,
                        existing,
                    });
                }
                _ => return Err(classify(op, dst + at, len - at, e)),
            }
        }
        Ok(Placement::Done { existing })
    }
}

fn classify(op: &'static str, addr: u64, len: u64, source: std::io::Error) -> UffdError {
    if source.raw_os_error() == Some(libc::ESRCH) {
        UffdError::ProcessGone
    } else {
        UffdError::Place {
            op,
            addr,
            len,
            source,
        }
    }
}

fn decode_msg(msg: &[u8]) -> Event {
    let u64_at = |off: usize| u64::from_ne_bytes(msg[off..off + 8].try_into().expect("8 bytes"));
    match u32::from(msg[0]) {
        uapi::UFFD_EVENT_PAGEFAULT => {
            let flags = u64_at(8);
            Event::PageFault {
                addr: u64_at(16),
                write: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                minor: flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                thread_id: u32::from_ne_bytes(msg[24..28].try_into().expect("4 bytes")),
            }
        }
        uapi::UFFD_EVENT_REMOVE => Event::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        uapi::UFFD_EVENT_UNMAP => Event::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        uapi::UFFD_EVENT_REMAP => Event::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        uapi::UFFD_EVENT_FORK => Event::Fork,
        _ => Event::Unknown(msg[0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mapping;

    fn uffd_or_skip() -> Option<Uffd> {
        match Uffd::create(FEATURES_FOR_VMM) {
            Ok(u) => Some(u),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED: userfaultfd unavailable: {e}");
                None
            }
            Err(e) => panic!("userfaultfd is required in CI: {e}"),
        }
    }

    #[test]
    fn test_decode_pagefault_and_remove() {
        let mut msg = [0u8; MSG_BYTES];
        msg[0] = uapi::UFFD_EVENT_PAGEFAULT as u8;
        msg[8..16].copy_from_slice(&u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE).to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7000u64.to_ne_bytes());
        msg[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(
            decode_msg(&msg),
            Event::PageFault {
                addr: 0x7000,
                write: true,
                minor: false,
                thread_id: 42
            }
        );
        msg[0] = uapi::UFFD_EVENT_REMOVE as u8;
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            decode_msg(&msg),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        msg[0] = 0xEE;
        assert_eq!(decode_msg(&msg), Event::Unknown(0xEE));
    }

    #[test]
    fn test_copy_skips_existing_pages_and_zeropage_fills() {
        let Some(uffd) = uffd_or_skip() else { return };
        let page = 4096u64;
        let map = Mapping::anonymous(8 * page as usize).unwrap();
        let base = map.addr();
        uffd.register(base, 8 * page, MODE_MISSING).unwrap();
        let src = vec![7u8; 2 * page as usize];
        assert_eq!(
            uffd.copy(base + page, &src[..page as usize], page).unwrap(),
            Placement::Done { existing: vec![] }
        );
        // Pages 0..2: page 1 exists already, so the copy stops there and goes on after it.
        assert_eq!(
            uffd.copy(
                base,
                &[src.as_slice(), &src[..page as usize]].concat(),
                page
            )
            .unwrap(),
            Placement::Done {
                existing: vec![page]
            }
        );
        assert_eq!(
            uffd.zeropage(base + 3 * page, 5 * page, page).unwrap(),
            Placement::Done { existing: vec![] }
        );
        let bytes = map.as_slice();
        assert!(bytes[..3 * page as usize].iter().all(|&b| b == 7));
        assert!(bytes[3 * page as usize..].iter().all(|&b| b == 0));
        uffd.unregister(base, 8 * page).unwrap();
    }

    #[test]
    fn test_fault_event_is_read_and_resolved() {
        let Some(uffd) = uffd_or_skip() else { return };
        let page = 4096u64;
        let map = Mapping::anonymous(page as usize).unwrap();
        let base = map.addr();
        uffd.register(base, page, MODE_MISSING).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below) and one byte is in range.
            unsafe { std::ptr::read_volatile(base as *const u8) }
        });
        let mut events = Vec::new();
        let mut fds = [libc::pollfd {
            fd: uffd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        while events.is_empty() {
            // SAFETY: polls one pollfd we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
            uffd.read_events(&mut events).unwrap();
        }
        assert!(matches!(events[0], Event::PageFault { addr, write: false, .. } if addr == base));
        uffd.copy(base, &vec![9u8; page as usize], page).unwrap();
        assert_eq!(reader.join().unwrap(), 9);
        // Unregister before the mapping drops: an unread UNMAP event would block munmap.
        uffd.unregister(base, page).unwrap();
    }
}
