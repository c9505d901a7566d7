//! A bulk thread: receives pushed pages and places them in runs, until pagesrv says every
//! page has been pushed, the link is cut (`stop`), or the connection stays silent for the
//! link timeout.

use std::io::ErrorKind;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::framed::{FramedConn, ReadError};
use common::uffd::UffdError;
use common::wire::Message;
use thiserror::Error;
use tracing::trace;

use crate::base::BaseImage;
use crate::core::bulk_rx::{BulkAction, BulkFrameError, BulkRx};
use crate::core::kernel::Kernel;
use crate::core::push::{Pushed, place_pushed};
use crate::core::vm::Vm;

/// Why a bulk thread stopped early.
#[derive(Debug, Error)]
pub enum BulkError {
    /// The connection failed, carried a bad frame, or went silent.
    #[error("bulk connection failed")]
    Receive(#[from] ReadError),
    /// No frame for the link timeout.
    #[error("no frame on the bulk connection for {0:?}")]
    Silent(Duration),
    /// A frame out of its phase, pagesrv's error, or a failed discard.
    #[error(transparent)]
    Frame(#[from] BulkFrameError),
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
            BulkError::Place(_)
                | BulkError::Base(_)
                | BulkError::Frame(
                    BulkFrameError::Remote { .. }
                        | BulkFrameError::Discard(_)
                        | BulkFrameError::Patch { .. }
                )
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
    conn: FramedConn,
    cx: &BulkContext<'_>,
) -> Result<BulkEnd, BulkError> {
    let (stop, silence, precopy) = (cx.stop, cx.silence, cx.precopy);
    let FramedConn {
        stream: mut conn,
        mut reader,
        mut tx,
    } = conn;
    conn.set_read_timeout(Some(silence))
        .and_then(|()| conn.set_write_timeout(Some(silence)))
        .map_err(ReadError::Io)?;
    // Room for several maximal frames, so each read takes whatever the socket holds.
    reader.reserve(4 * (common::wire::HEADER_LEN + common::wire::MAX_BODY_BYTES));
    let mut frames = BulkRx::new(precopy, cx.base.is_some());
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
        let (range, data) = match frames.on_frame(vm, (message, reader.payload(payload)), stop)? {
            BulkAction::Place { range, data } => (range, data),
            BulkAction::Nothing => continue,
            BulkAction::Sync => {
                tx.write_frame(&mut conn, &Message::Synced, &[])
                    .map_err(ReadError::Io)?;
                (cx.on_sync)();
                continue;
            }
            BulkAction::Switchover => {
                (cx.on_switchover)();
                continue;
            }
            BulkAction::Hashes { range, hashes } => {
                let (base, seed) = cx.base.expect("BulkRx takes hashes only with a base");
                let Some(held) = base.place_matching(vm, seed, range, hashes, stop)? else {
                    return Ok(BulkEnd::Stopped);
                };
                tx.write_frame(&mut conn, &Message::DoneMap(range), &held)
                    .map_err(ReadError::Io)?;
                continue;
            }
            BulkAction::Done => return Ok(BulkEnd::Complete),
            BulkAction::Stopped => return Ok(BulkEnd::Stopped),
        };
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
