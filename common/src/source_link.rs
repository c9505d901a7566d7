//! pagesrv ⇄ the source VMM, over a Unix socket (`pagesrv --vmm-uds PATH`): the running
//! guest's RAM, the pages it dirties, and the pause. Any VMM can speak it: a few lines of
//! JSON and raw bitmaps, no library needed.
//!
//! ```text
//!  VMM ──{"version":2,"size_bytes":N,"page_size":4096[,"free_hints":true]}\n + the RAM fd ──► pagesrv
//!        (SCM_RIGHTS: a memfd or file holding guest RAM, shared: pagesrv maps it read-only)
//!  pagesrv ──{"cmd":"dirty"}\n──►
//!          ◄──{"bitmap":"dirty","bytes":B}\n + B bytes ──   pages written since the last bitmap
//!  pagesrv ──{"cmd":"pause"}\n──►                            stop the guest (vCPUs, devices)
//!          ◄──{"bitmap":"pause","bytes":B}\n + B bytes ──   the last writes; the guest stays paused
//!  pagesrv ──{"cmd":"free"}\n──►   (to a VMM that said "free_hints"; 4 KiB pages; any time)
//!          ◄──{"bitmap":"free","bytes":B}\n + B bytes ──    pages the guest's allocator holds free
//!  pagesrv ──{"outcome":"completed","verified":true}\n──►  the last message: how it ended
//!       or ──{"outcome":"failed","reason":"..."}\n──►
//!          ◄──{"ack":"outcome"}\n ──                       then pagesrv closes the link
//! ```
//!
//! **The source VM's fate** (pagesrv keeps the link open, in every strategy, until it knows):
//!
//! | the VMM receives | the destination | the VMM |
//! | --- | --- | --- |
//! | `completed` | holds every page (digests compared unless `"verified":false`, `faultd --no-verify`) | may destroy the source VM |
//! | `failed` (with the reason) | does not hold the VM (it failed, or a digest differed) | resumes the source guest (paused or not) |
//! | end of the link without an outcome | unknown: pagesrv crashed or was killed, the destination may run the guest | keeps the guest paused and its RAM; an operator decides |
//!
//! Free pages are never sent as data: the destination reads them as zero. A hint taken while
//! the guest runs is advisory (a page written after it is in the next dirty bitmap, which
//! wins); the one taken after the pause is exact.
//!
//! A bitmap has one bit per page, bit `i % 8` of byte `i / 8` for page `i` (B = pages / 8
//! rounded up). The VMM must clear its dirty log when it answers, so each bitmap holds the
//! pages written since the previous one (KVM's `KVM_GET_DIRTY_LOG` does exactly that); the
//! first `dirty` answer starts the tracking and may name every page. After `pause` the VMM
//! keeps the guest stopped and its state saved until the outcome (table above); pagesrv's
//! exit code says the same to an orchestrator.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vmm_link::{LinkError, check_peer, receive_chunk, send_handshake};

/// The protocol version this build speaks (2: the outcome message).
pub const SOURCE_LINK_VERSION: u32 = 2;
/// Longest failure reason sent in an outcome, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest JSON line accepted.
pub const MAX_LINE_BYTES: usize = 4096;

/// Errors of the source link; each names the step.
#[derive(Debug, Error)]
pub enum SourceLinkError {
    /// The socket failed, or the VMM's credentials or fds were refused.
    #[error("source VMM link failed")]
    Link(#[from] LinkError),
    /// Reading or writing failed.
    #[error("source VMM link failed")]
    Io(#[from] std::io::Error),
    /// The VMM closed the socket.
    #[error("the source VMM closed its socket")]
    Closed,
    /// A line is too long or not the expected JSON.
    #[error("the source VMM sent a malformed message: {0}")]
    Malformed(String),
    /// The hello names another version, a bad size or page size, or no RAM fd came with it.
    #[error("the source VMM's hello is refused: {0}")]
    Refused(String),
}

/// The VMM's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceHello {
    /// [`SOURCE_LINK_VERSION`].
    pub version: u32,
    /// Bytes of guest RAM (the fd's size).
    pub size_bytes: u64,
    /// The page size dirty bitmaps count in (4096 or 2097152).
    pub page_size: u64,
    /// Whether the VMM answers `free` (the guest's free-page list; 4 KiB pages only).
    #[serde(default)]
    pub free_hints: bool,
}

impl SourceHello {
    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.size_bytes / self.page_size
    }

    /// Bytes of one dirty bitmap.
    pub fn bitmap_bytes(&self) -> usize {
        self.pages().div_ceil(8) as usize
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    cmd: CommandKind,
}

/// What pagesrv asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// The pages written since the previous bitmap.
    Dirty,
    /// Pause the guest; answer with the last bitmap.
    Pause,
    /// The pages the paused guest's allocator holds free.
    Free,
}

/// How the migration ended: pagesrv's last message to the source VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination holds every page (`verified`: the digests of every page were
    /// compared): the source VM may be destroyed.
    Completed {
        /// Whether the destination compared digests (false after `faultd --no-verify`).
        verified: bool,
    },
    /// The migration failed and the destination does not hold the VM: resume the source.
    Failed {
        /// Why (at most [`MAX_REASON_BYTES`]).
        reason: String,
    },
}

/// An outcome on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeLine {
    outcome: OutcomeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verified: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OutcomeKind {
    Completed,
    Failed,
}

impl OutcomeLine {
    fn from_outcome(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Completed { verified } => OutcomeLine {
                outcome: OutcomeKind::Completed,
                verified: Some(*verified),
                reason: None,
            },
            Outcome::Failed { reason } => OutcomeLine {
                outcome: OutcomeKind::Failed,
                verified: None,
                reason: Some(crate::wire::truncate_utf8(reason, MAX_REASON_BYTES).to_owned()),
            },
        }
    }

    fn into_outcome(self) -> Result<Outcome, SourceLinkError> {
        match (self.outcome, self.verified, self.reason) {
            (OutcomeKind::Completed, Some(verified), None) => Ok(Outcome::Completed { verified }),
            (OutcomeKind::Failed, None, Some(reason)) if reason.len() <= MAX_REASON_BYTES => {
                Ok(Outcome::Failed { reason })
            }
            _ => Err(SourceLinkError::Malformed(
                "an outcome is completed with verified, or failed with a reason of at most 1024 bytes"
                    .into(),
            )),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ack {
    ack: AckKind,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AckKind {
    Outcome,
}

/// What the VMM gets from pagesrv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromPagesrv {
    /// A request to answer with a bitmap.
    Command(CommandKind),
    /// How the migration ended (answer with [`SourceVmmClient::ack_outcome`]); nothing
    /// follows.
    Outcome(Outcome),
}

/// Parses one line from pagesrv: a command or the outcome.
///
/// # Errors
/// Neither, or a malformed one.
pub fn parse_from_pagesrv(line: &[u8]) -> Result<FromPagesrv, SourceLinkError> {
    if let Ok(command) = serde_json::from_slice::<Command>(line) {
        return Ok(FromPagesrv::Command(command.cmd));
    }
    parse::<OutcomeLine>(line)?
        .into_outcome()
        .map(FromPagesrv::Outcome)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BitmapHeader {
    bitmap: CommandKind,
    bytes: usize,
}

/// Line and byte reading over the socket, bounded.
struct Lines {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Lines {
    fn line(&mut self) -> Result<Vec<u8>, SourceLinkError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(line[..line.len() - 1].to_vec());
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(SourceLinkError::Malformed(format!(
                    "a line longer than {MAX_LINE_BYTES} bytes"
                )));
            }
            let mut chunk = [0u8; 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(SourceLinkError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, SourceLinkError> {
        let mut out = Vec::new();
        out.try_reserve_exact(len)
            .map_err(|_| SourceLinkError::Malformed(format!("a {len}-byte bitmap")))?;
        let take = len.min(self.buf.len());
        out.extend(self.buf.drain(..take));
        out.resize(len, 0);
        let mut at = take;
        while at < len {
            let n = self.stream.read(&mut out[at..])?;
            if n == 0 {
                return Err(SourceLinkError::Closed);
            }
            at += n;
        }
        Ok(out)
    }

    fn send_json(&mut self, value: &impl Serialize) -> Result<(), SourceLinkError> {
        let mut line = serde_json::to_vec(value).expect("plain structs serialize");
        line.push(b'\n');
        self.stream.write_all(&line)?;
        Ok(())
    }
}

fn parse<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, SourceLinkError> {
    serde_json::from_slice(line).map_err(|e| {
        SourceLinkError::Malformed(format!("{e}: {:?}", String::from_utf8_lossy(line)))
    })
}

/// Parses and checks a VMM's hello line (everything but the RAM fd that comes with it).
///
/// # Errors
/// Malformed JSON, or a refused version, size or page size.
pub fn parse_hello(line: &[u8]) -> Result<SourceHello, SourceLinkError> {
    let hello: SourceHello = parse(line)?;
    let refuse = |why: String| Err(SourceLinkError::Refused(why));
    if hello.version != SOURCE_LINK_VERSION {
        return refuse(format!(
            "version {} (this pagesrv speaks {SOURCE_LINK_VERSION})",
            hello.version
        ));
    }
    if !crate::layout::SUPPORTED_PAGE_SIZES.contains(&hello.page_size)
        || hello.size_bytes == 0
        || !hello.size_bytes.is_multiple_of(hello.page_size)
    {
        return refuse(format!(
            "{} bytes of RAM in {}-byte pages",
            hello.size_bytes, hello.page_size
        ));
    }
    if hello.free_hints && hello.page_size != 4096 {
        return refuse("free-page hints in pages of other than 4 KiB".into());
    }
    Ok(hello)
}

/// Checks the VMM's header line of a `kind` bitmap: the kind asked for, exactly
/// `expected_bytes` long.
///
/// # Errors
/// Malformed JSON, another kind, or another length.
pub fn check_bitmap_header(
    line: &[u8],
    kind: CommandKind,
    expected_bytes: usize,
) -> Result<(), SourceLinkError> {
    let header: BitmapHeader = parse(line)?;
    if header.bitmap != kind || header.bytes != expected_bytes {
        return Err(SourceLinkError::Malformed(format!(
            "asked for a {kind:?} bitmap of {expected_bytes} bytes, got {:?} of {}",
            header.bitmap, header.bytes
        )));
    }
    Ok(())
}

/// pagesrv's end of the link.
pub struct SourceVmm {
    lines: Lines,
    /// What the VMM declared.
    pub hello: SourceHello,
    /// The VMM's process id.
    pub peer_pid: i32,
}

impl std::fmt::Debug for SourceVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceVmm")
            .field("hello", &self.hello)
            .field("peer_pid", &self.peer_pid)
            .finish()
    }
}

impl SourceVmm {
    /// Takes a VMM's hello and RAM fd. The caller sets any read timeout on `stream`.
    ///
    /// # Errors
    /// Credentials, a malformed or refused hello, or a RAM fd that is not a regular file of
    /// `size_bytes`.
    pub fn accept(stream: UnixStream) -> Result<(SourceVmm, OwnedFd), SourceLinkError> {
        let creds = check_peer(&stream)?;
        let mut fds = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; MAX_LINE_BYTES + 1];
        while !buf.contains(&b'\n') {
            let n = receive_chunk(&stream, &mut chunk, &mut fds)?;
            if n == 0 {
                return Err(SourceLinkError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_LINE_BYTES {
                return Err(SourceLinkError::Malformed(
                    "the hello line is too long".into(),
                ));
            }
        }
        let mut lines = Lines { stream, buf };
        let hello = parse_hello(&lines.line()?)?;
        let refuse = |why: String| Err(SourceLinkError::Refused(why));
        if fds.len() != 1 {
            return refuse(format!(
                "{} fds attached; send exactly the RAM fd",
                fds.len()
            ));
        }
        let fd = fds.pop().expect("one fd");
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| SourceLinkError::Io(e.into()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 != hello.size_bytes {
            return refuse(format!(
                "the RAM fd is not a regular file of {} bytes",
                hello.size_bytes
            ));
        }
        Ok((
            SourceVmm {
                lines,
                hello,
                peer_pid: creds.pid(),
            },
            fd,
        ))
    }

    fn bitmap(&mut self, kind: CommandKind) -> Result<Vec<u8>, SourceLinkError> {
        self.lines.send_json(&Command { cmd: kind })?;
        let expected = self.hello.bitmap_bytes();
        check_bitmap_header(&self.lines.line()?, kind, expected)?;
        self.lines.bytes(expected)
    }

    /// The pages written since the previous bitmap.
    ///
    /// # Errors
    /// The link failed or the answer is malformed.
    pub fn dirty(&mut self) -> Result<Vec<u8>, SourceLinkError> {
        self.bitmap(CommandKind::Dirty)
    }

    /// Pauses the guest; returns the pages written since the previous bitmap.
    ///
    /// # Errors
    /// The link failed or the answer is malformed.
    pub fn pause(&mut self) -> Result<Vec<u8>, SourceLinkError> {
        self.bitmap(CommandKind::Pause)
    }

    /// The pages the paused guest holds free (`None`: the VMM gives no hints).
    ///
    /// # Errors
    /// The link failed or the answer is malformed.
    pub fn free(&mut self) -> Result<Option<Vec<u8>>, SourceLinkError> {
        if !self.hello.free_hints {
            return Ok(None);
        }
        self.bitmap(CommandKind::Free).map(Some)
    }

    /// Tells the VMM how the migration ended and waits (at most `wait`) for its
    /// acknowledgement; the link is done afterwards.
    ///
    /// # Errors
    /// The link failed, or the VMM did not acknowledge in time.
    pub fn send_outcome(
        &mut self,
        outcome: &Outcome,
        wait: std::time::Duration,
    ) -> Result<(), SourceLinkError> {
        self.lines.stream.set_read_timeout(Some(wait))?;
        self.lines.send_json(&OutcomeLine::from_outcome(outcome))?;
        let _: Ack = parse(&self.lines.line()?)?;
        Ok(())
    }
}

/// The VMM's end of the link.
pub struct SourceVmmClient {
    lines: Lines,
}

impl SourceVmmClient {
    /// Connects to pagesrv's `--vmm-uds` and hands over guest RAM.
    ///
    /// # Errors
    /// Connecting or sending failed.
    pub fn connect(
        path: &std::path::Path,
        hello: &SourceHello,
        ram: impl AsFd,
    ) -> Result<Self, SourceLinkError> {
        let stream = UnixStream::connect(path)?;
        let mut line = serde_json::to_vec(hello).expect("plain struct serializes");
        line.push(b'\n');
        send_handshake(&stream, &line, &[ram])?;
        Ok(SourceVmmClient {
            lines: Lines {
                stream,
                buf: Vec::new(),
            },
        })
    }

    /// Waits for pagesrv's next message (`None` when it closed the link: without an outcome,
    /// keep the guest paused, module docs).
    ///
    /// # Errors
    /// The link failed or the message is malformed.
    pub fn next_message(&mut self) -> Result<Option<FromPagesrv>, SourceLinkError> {
        match self.lines.line() {
            Ok(line) => parse_from_pagesrv(&line).map(Some),
            Err(SourceLinkError::Closed) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Acknowledges the outcome (pagesrv then closes the link).
    ///
    /// # Errors
    /// The link failed.
    pub fn ack_outcome(&mut self) -> Result<(), SourceLinkError> {
        self.lines.send_json(&Ack {
            ack: AckKind::Outcome,
        })
    }

    /// Answers a command with its bitmap.
    ///
    /// # Errors
    /// The link failed.
    pub fn send_bitmap(&mut self, kind: CommandKind, bitmap: &[u8]) -> Result<(), SourceLinkError> {
        self.lines.send_json(&BitmapHeader {
            bitmap: kind,
            bytes: bitmap.len(),
        })?;
        self.lines.stream.write_all(bitmap)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(len: u64) -> OwnedFd {
        use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
        let fd = memfd_create(c"source-link-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        std::fs::File::from(fd.try_clone().unwrap())
            .set_len(len)
            .unwrap();
        fd
    }

    #[test]
    fn test_hello_dirty_and_pause_round_trip() {
        let dir = std::env::temp_dir().join(format!("srclink-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let hello = SourceHello {
            version: SOURCE_LINK_VERSION,
            size_bytes: 100 * 4096,
            page_size: 4096,
            free_hints: true,
        };
        let vmm = std::thread::spawn({
            let dir = dir.clone();
            move || {
                let command = |k| Some(FromPagesrv::Command(k));
                let mut c = SourceVmmClient::connect(&dir, &hello, ram(100 * 4096)).unwrap();
                assert_eq!(c.next_message().unwrap(), command(CommandKind::Dirty));
                c.send_bitmap(CommandKind::Dirty, &[0xFF; 13]).unwrap();
                assert_eq!(c.next_message().unwrap(), command(CommandKind::Pause));
                let mut last = [0u8; 13];
                last[12] = 0b1000;
                c.send_bitmap(CommandKind::Pause, &last).unwrap();
                assert_eq!(c.next_message().unwrap(), command(CommandKind::Free));
                c.send_bitmap(CommandKind::Free, &[0x0F; 13]).unwrap();
                assert_eq!(
                    c.next_message().unwrap(),
                    Some(FromPagesrv::Outcome(Outcome::Failed {
                        reason: "digest mismatch".into()
                    }))
                );
                c.ack_outcome().unwrap();
                assert_eq!(c.next_message().unwrap(), None, "pagesrv closed");
            }
        });
        let (stream, _) = listener.accept().unwrap();
        let (mut link, fd) = SourceVmm::accept(stream).unwrap();
        assert_eq!(link.hello, hello);
        assert_eq!(
            std::fs::File::from(fd).metadata().unwrap().len(),
            100 * 4096
        );
        assert_eq!(link.dirty().unwrap(), vec![0xFF; 13]);
        let last = link.pause().unwrap();
        assert_eq!(last[12], 0b1000);
        assert_eq!(link.free().unwrap(), Some(vec![0x0F; 13]));
        let failed = Outcome::Failed {
            reason: "digest mismatch".into(),
        };
        link.send_outcome(&failed, std::time::Duration::from_secs(5))
            .unwrap();
        drop(link);
        vmm.join().unwrap();
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn test_outcomes_parse_and_bad_ones_are_refused() {
        for outcome in [
            Outcome::Completed { verified: true },
            Outcome::Completed { verified: false },
            Outcome::Failed {
                reason: "the destination failed".into(),
            },
        ] {
            let line = serde_json::to_vec(&OutcomeLine::from_outcome(&outcome)).unwrap();
            assert_eq!(
                parse_from_pagesrv(&line).unwrap(),
                FromPagesrv::Outcome(outcome)
            );
        }
        for bad in [
            r#"{"outcome":"completed"}"#,
            r#"{"outcome":"failed"}"#,
            r#"{"outcome":"completed","verified":true,"reason":"x"}"#,
            r#"{"outcome":"destroyed","verified":true}"#,
            r#"{"outcome":"completed","verified":true,"extra":1}"#,
            r#"{"cmd":"outcome"}"#,
        ] {
            assert!(parse_from_pagesrv(bad.as_bytes()).is_err(), "{bad}");
        }
        let long = Outcome::Failed {
            reason: "é".repeat(MAX_REASON_BYTES),
        };
        let line = serde_json::to_vec(&OutcomeLine::from_outcome(&long)).unwrap();
        let Ok(FromPagesrv::Outcome(Outcome::Failed { reason })) = parse_from_pagesrv(&line) else {
            panic!("a long reason is cut, not refused")
        };
        assert!(reason.len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn test_refuses_bad_hellos() {
        for (json, size, why) in [
            (
                r#"{"version":1,"size_bytes":4096,"page_size":4096}"#,
                4096,
                "version",
            ),
            (
                r#"{"version":2,"size_bytes":4097,"page_size":4096}"#,
                4097,
                "pages",
            ),
            (
                r#"{"version":2,"size_bytes":8192,"page_size":4096}"#,
                4096,
                "regular file",
            ),
            (r#"{"version":2,"size_bytes":4096}"#, 4096, "malformed"),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let mut line = json.as_bytes().to_vec();
            line.push(b'\n');
            send_handshake(&a, &line, &[ram(size)]).unwrap();
            let err = SourceVmm::accept(b).unwrap_err().to_string();
            let expected = match why {
                "version" => "version 1",
                "pages" => "4097 bytes",
                "regular file" => "regular file of 8192",
                _ => "malformed",
            };
            assert!(err.contains(expected), "{why}: {err}");
        }
    }
}
