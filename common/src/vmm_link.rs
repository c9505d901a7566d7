//! The VMM handshake over a Unix socket (Firecracker's UFFD-handler contract).
//!
//! The VMM sends, in one message, a UTF-8 JSON array of regions with the userfaultfd attached
//! by SCM_RIGHTS, optionally followed by a second fd: the memfd backing guest RAM. The JSON is
//! read with a bounded, growing buffer (a stream socket may split a long list); fds are taken
//! into [`OwnedFd`]s at once so that none leaks on an error.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{
    ControlMessage, MsgFlags, UnixCredentials, getsockopt, sendmsg, sockopt::PeerCredentials,
};
use thiserror::Error;

use crate::layout::{Layout, LayoutError};

/// Largest handshake JSON accepted.
pub const MAX_HANDSHAKE_BYTES: usize = 256 << 10;
/// Most fds a VMM may attach: the uffd and the memfd.
pub const MAX_FDS: usize = 2;

/// Errors of the handshake; each names the step.
#[derive(Debug, Error)]
pub enum LinkError {
    /// Reading the socket failed (including the handshake timeout).
    #[error("failed to read the VMM handshake")]
    Receive(#[source] std::io::Error),
    /// The VMM closed the socket before a complete region list arrived.
    #[error(
        "the VMM closed the socket after {received_bytes} bytes, before a complete region list"
    )]
    PeerClosed {
        /// Bytes received.
        received_bytes: usize,
    },
    /// The JSON is longer than [`MAX_HANDSHAKE_BYTES`].
    #[error("the handshake exceeds {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    /// The text is not UTF-8 JSON.
    #[error("the handshake is not a JSON region list: {0}")]
    NotJson(String),
    /// The region list breaks a layout rule.
    #[error("the region list is invalid")]
    Layout(#[from] LayoutError),
    /// No fd was attached.
    #[error("no userfaultfd attached to the handshake")]
    NoUffd,
    /// Too many fds were attached.
    #[error("{count} fds attached, at most {MAX_FDS} (uffd, memfd) are accepted")]
    TooManyFds {
        /// Fds received.
        count: usize,
    },
    /// The first fd is not a userfaultfd.
    #[error("the first attached fd is not a userfaultfd (it is {kind})")]
    NotUffd {
        /// What /proc says the fd is.
        kind: String,
    },
    /// The second fd is not a memory file large enough for the layout.
    #[error("the memory fd is not a regular file of at least {needed_bytes} bytes")]
    BadMemfd {
        /// The layout's size.
        needed_bytes: u64,
    },
    /// SO_PEERCRED failed.
    #[error("failed to read the VMM's credentials")]
    Credentials(#[source] std::io::Error),
    /// The VMM runs as another, unprivileged user.
    #[error("VMM uid {uid} is neither root nor our uid {ours}")]
    Forbidden {
        /// The VMM's uid.
        uid: u32,
        /// faultd's uid.
        ours: u32,
    },
    /// Sending the handshake failed.
    #[error("failed to send the handshake")]
    Send(#[source] std::io::Error),
}

/// What a VMM handed over.
#[derive(Debug)]
pub struct Handshake {
    /// The checked region layout.
    pub layout: Layout,
    /// The userfaultfd, already set up by the VMM.
    pub uffd: OwnedFd,
    /// The memfd backing guest RAM, when the VMM shares it.
    pub memfd: Option<OwnedFd>,
    /// The VMM's process id.
    pub peer_pid: i32,
}

/// Receives and checks a handshake. The caller sets any read timeout on `stream`.
///
/// # Errors
/// Any [`LinkError`]; every fd received is closed on error.
pub fn receive_handshake(stream: &UnixStream) -> Result<Handshake, LinkError> {
    let creds = check_peer(stream)?;
    let mut json = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = receive_chunk(stream, &mut chunk, &mut fds)?;
        if fds.len() > MAX_FDS {
            return Err(LinkError::TooManyFds { count: fds.len() });
        }
        if n == 0 {
            return Err(LinkError::PeerClosed {
                received_bytes: json.len(),
            });
        }
        if json.len() + n > MAX_HANDSHAKE_BYTES {
            return Err(LinkError::TooLarge);
        }
        json.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
            Ok(_) => break,
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(LinkError::NotJson(e.to_string())),
        }
    }
    let layout = Layout::from_json(&json)?;
    let mut fds = fds.into_iter();
    let uffd = fds.next().ok_or(LinkError::NoUffd)?;
    let kind = fd_kind(uffd.as_raw_fd());
    if kind != "anon_inode:[userfaultfd]" {
        return Err(LinkError::NotUffd { kind });
    }
    let memfd = fds.next();
    if let Some(fd) = &memfd {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|_| LinkError::BadMemfd {
            needed_bytes: layout.total_bytes(),
        })?;
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if !regular || (st.st_size as u64) < layout.total_bytes() {
            return Err(LinkError::BadMemfd {
                needed_bytes: layout.total_bytes(),
            });
        }
    }
    Ok(Handshake {
        layout,
        uffd,
        memfd,
        peer_pid: creds.pid(),
    })
}

/// The peer's credentials, if it runs as root or as us.
pub(crate) fn check_peer(stream: &UnixStream) -> Result<UnixCredentials, LinkError> {
    let creds: UnixCredentials =
        getsockopt(stream, PeerCredentials).map_err(|e| LinkError::Credentials(e.into()))?;
    let ours = nix::unistd::geteuid().as_raw();
    if creds.uid() != 0 && creds.uid() != ours {
        return Err(LinkError::Forbidden {
            uid: creds.uid(),
            ours,
        });
    }
    Ok(creds)
}

/// One `recvmsg`: bytes into `buf`, attached fds appended to `fds` (close-on-exec).
pub(crate) fn receive_chunk(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, LinkError> {
    crate::sys::scm::receive_with_fds(stream, buf, fds).map_err(LinkError::Receive)
}

fn fd_kind(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// Sends a handshake as a VMM would: `json` with `fds` attached in one message.
///
/// # Errors
/// [`LinkError::Send`].
pub fn send_handshake(
    stream: &UnixStream,
    json: &[u8],
    fds: &[impl AsFd],
) -> Result<(), LinkError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let mut sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(json)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| LinkError::Send(e.into()))?;
    while sent < json.len() {
        sent += sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&json[sent..])],
            &[],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| LinkError::Send(e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_REGION: &[u8] =
        br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#;

    fn memfd(len: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        fd
    }

    #[test]
    fn test_rejects_a_non_uffd_fd_and_keeps_no_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, ONE_REGION, &[memfd(8192)]).unwrap();
        let err = receive_handshake(&b).unwrap_err();
        assert!(matches!(err, LinkError::NotUffd { .. }), "{err}");
    }

    #[test]
    fn test_reports_peer_closed_and_bad_json() {
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, &ONE_REGION[..20], &[memfd(1)]).unwrap();
        drop(a);
        assert!(matches!(
            receive_handshake(&b).unwrap_err(),
            LinkError::PeerClosed { received_bytes: 20 }
        ));
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, b"[}", &[memfd(1)]).unwrap();
        assert!(matches!(
            receive_handshake(&b).unwrap_err(),
            LinkError::NotJson(_)
        ));
    }

    #[test]
    fn test_rejects_too_many_fds_and_no_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, ONE_REGION, &[memfd(1), memfd(1), memfd(1)]).unwrap();
        assert!(matches!(
            receive_handshake(&b).unwrap_err(),
            LinkError::TooManyFds { count: 3 }
        ));
        let (a, b) = UnixStream::pair().unwrap();
        send_handshake(&a, ONE_REGION, &[] as &[OwnedFd]).unwrap();
        assert!(matches!(
            receive_handshake(&b).unwrap_err(),
            LinkError::NoUffd
        ));
    }

    #[test]
    fn test_accepts_a_long_region_list_split_across_reads() {
        let regions: Vec<String> = (0..1000u64)
            .map(|i| {
                format!(
                    r#"{{"base_host_virt_addr":{},"size":4096,"offset":{},"page_size":4096}}"#,
                    0x10_0000 + i * 8192,
                    i * 4096
                )
            })
            .collect();
        let json = format!("[{}]", regions.join(",   "));
        assert!(json.len() > 64 << 10);
        let Ok(uffd) = crate::uffd::Uffd::create(0) else {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "userfaultfd required in CI"
            );
            eprintln!("SKIPPED: userfaultfd unavailable");
            return;
        };
        let (a, b) = UnixStream::pair().unwrap();
        let writer =
            std::thread::spawn(move || send_handshake(&a, json.as_bytes(), &[uffd]).unwrap());
        let hs = receive_handshake(&b).unwrap();
        writer.join().unwrap();
        assert_eq!(hs.layout.regions().len(), 1000);
        assert!(hs.memfd.is_none());
    }

    #[test]
    fn test_rejects_oversized_handshake() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = vec![b' '; MAX_HANDSHAKE_BYTES + 10];
        let writer = std::thread::spawn(move || {
            let _ = send_handshake(&a, &big, &[memfd(1)]);
        });
        assert!(matches!(
            receive_handshake(&b).unwrap_err(),
            LinkError::TooLarge
        ));
        drop(b);
        writer.join().unwrap();
    }
}
