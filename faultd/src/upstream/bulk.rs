//! A bulk thread: receives pushed pages and places them in runs, until pagesrv says every
//! page has been pushed, the link is cut (`stop`), or the connection stays silent for the
//! link timeout.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::framed::{FrameEncoder, FrameReader, ReadError};
use common::uffd::UffdError;
use common::wire::phase::{DestBulk, Phase};
use common::wire::{Kind, Message, RANGE_FRAME_BYTES};
use thiserror::Error;
use tracing::{debug, trace};

use crate::base::BaseImage;
use crate::core::kernel::Kernel;
use crate::core::push::{Pushed, place_pushed};
use crate::core::vm::{Counters, Vm};

/// Why a bulk thread stopped early.
#[derive(Debug, Error)]
pub enum BulkError {
    /// The connection failed, carried a bad frame, or went silent.
    #[error("bulk connection failed")]
    Receive(#[from] ReadError),
    /// No frame for the link timeout.
    #[error("no frame on the bulk connection for {0:?}")]
    Silent(Duration),
    /// pagesrv reported an error.
    #[error("pagesrv reported {code:?}: {text}")]
    Remote {
        /// Its code.
        code: common::wire::ErrorCode,
        /// Its text.
        text: String,
    },
    /// Placing pages failed.
    #[error("placing pushed pages failed")]
    Place(#[from] UffdError),
    /// Placing pages from the base image failed.
    #[error("placing pages from the base image failed")]
    Base(#[from] crate::base::BaseError),
}

impl BulkError {
    /// Whether the error is the link's (reconnect) rather than final: placement failures are
    /// the VM's, and pagesrv ends a session with an error only for good.
    pub fn is_link_failure(&self) -> bool {
        !matches!(
            self,
            BulkError::Place(_) | BulkError::Base(_) | BulkError::Remote { .. }
        )
    }
}

/// How a bulk thread ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkEnd {
    /// pagesrv pushed every page.
    Complete,
    /// Told to stop.
    Stopped,
}

/// What a bulk thread works with besides the VM and its connection.
pub struct BulkContext<'a> {
    /// Set when the link is cut or closed: apply nothing more.
    pub stop: &'a AtomicBool,
    /// A read that waits this long is a dead link.
    pub silence: Duration,
    /// Precopy rounds come first.
    pub precopy: bool,
    /// Called when `Switchover` arrives.
    pub on_switchover: &'a dyn Fn(),
    /// Called after each `Sync` is answered.
    pub on_sync: &'a dyn Fn(),
    /// The base image and the hash seed (the session id), with `--base`.
    pub base: Option<(&'a BaseImage, u64)>,
}

/// Receives and places pushed pages until `BulkDone`, `stop`, or an error, answering each
/// `Sync` once everything before it is applied, and each `PageHashes` with the map of the
/// pages the base image held (placed from it).
///
/// # Errors
/// Any [`BulkError`].
pub fn receive_pushed_pages<K: Kernel>(
    vm: &Vm<K>,
    mut conn: TcpStream,
    (mut reader, mut tx): (FrameReader, FrameEncoder),
    cx: &BulkContext<'_>,
) -> Result<BulkEnd, BulkError> {
    let (stop, silence, precopy) = (cx.stop, cx.silence, cx.precopy);
    conn.set_read_timeout(Some(silence))
        .and_then(|()| conn.set_write_timeout(Some(silence)))
        .map_err(ReadError::Io)?;
    // Room for several maximal frames, so each read takes whatever the socket holds.
    reader.reserve(4 * (common::wire::HEADER_LEN + common::wire::MAX_BODY_BYTES));
    let mut phase = if precopy {
        DestBulk::Precopy
    } else {
        DestBulk::Pushing
    };
    loop {
        let (message, payload) = match reader.read_frame(&mut conn) {
            Ok(frame) => frame,
            Err(ReadError::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Err(BulkError::Silent(silence));
            }
            Err(_) if stop.load(std::sync::atomic::Ordering::Acquire) => {
                return Ok(BulkEnd::Stopped);
            }
            Err(e) => return Err(e.into()),
        };
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            // Cut: nothing read before it may land after the next link's maps.
            return Ok(BulkEnd::Stopped);
        }
        phase
            .receive(message.kind())
            .map_err(|e| BulkError::Receive(e.into()))?;
        let (range, data) = match message {
            Message::PageRun(range) => (range, Some(reader.payload(payload))),
            Message::ZeroRun(range) => (range, None),
            Message::Heartbeat => continue,
            Message::Discard(range) => {
                let bitmap = reader.payload(payload);
                let started = std::time::Instant::now();
                let dropped = vm.discard(range.first, range.count, bitmap)?;
                debug!(
                    first = range.first,
                    count = range.count,
                    dropped,
                    us = started.elapsed().as_micros() as u64,
                    "discarded"
                );
                continue;
            }
            Message::Sync => {
                tx.write_frame(&mut conn, &Message::Synced, &[])
                    .map_err(ReadError::Io)?;
                (cx.on_sync)();
                continue;
            }
            Message::Switchover => {
                debug!("the source switched to postcopy");
                (cx.on_switchover)();
                continue;
            }
            Message::PageHashes(range) => {
                let Some((base, seed)) = cx.base else {
                    let e = common::wire::WireError::Unexpected(Kind::PageHashes);
                    return Err(BulkError::Receive(e.into()));
                };
                let hashes = reader.payload(payload);
                let frame_bytes = (RANGE_FRAME_BYTES + hashes.len()) as u64;
                Counters::add(&vm.counters.bytes_hashes, frame_bytes);
                Counters::add(&vm.counters.bytes_received, frame_bytes);
                let Some(held) = base.place_matching(vm, seed, range, hashes, stop)? else {
                    return Ok(BulkEnd::Stopped);
                };
                tx.write_frame(&mut conn, &Message::DoneMap(range), &held)
                    .map_err(ReadError::Io)?;
                continue;
            }
            Message::BulkDone => {
                debug!("pagesrv pushed every page");
                return Ok(BulkEnd::Complete);
            }
            Message::Error { code, text } => {
                let text = common::wire::printable(&text);
                return Err(BulkError::Remote { code, text });
            }
            other => {
                let e = common::wire::WireError::Unexpected(other.kind());
                return Err(BulkError::Receive(e.into()));
            }
        };
        let frame_bytes = RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len);
        Counters::add(&vm.counters.bytes_received, frame_bytes as u64);
        if phase == DestBulk::Precopy {
            Counters::add(&vm.counters.bytes_precopy, frame_bytes as u64);
        }
        trace!(
            first = range.first,
            count = range.count,
            zero = data.is_none(),
            "pushed"
        );
        if place_pushed(vm, range.first, range.count, data, stop)? == Pushed::Stopped {
            return Ok(BulkEnd::Stopped);
        }
    }
}
