//! The bulk thread: receives pushed pages and places them in runs, one ioctl per
//! host-contiguous run, until pagesrv says every page has been pushed.

use std::net::TcpStream;

use common::framed::{FrameReader, ReadError};
use common::uffd::UffdError;
use common::wire::{Message, RANGE_FRAME_BYTES};
use thiserror::Error;
use tracing::{debug, trace};

use crate::place::{Origin, Placed, ZeroPages};
use crate::vm::{Counters, Vm};

/// Why the bulk thread stopped early.
#[derive(Debug, Error)]
pub enum BulkError {
    /// The connection failed or carried a bad frame.
    #[error("bulk connection failed")]
    Receive(#[from] ReadError),
    /// pagesrv sent a frame that does not belong on the bulk connection.
    #[error("unexpected {0:?} frame on the bulk connection")]
    Unexpected(common::wire::Kind),
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
}

impl BulkError {
    /// Whether the error is the link's (reconnect) rather than the VM's (fatal).
    pub fn is_link_failure(&self) -> bool {
        !matches!(self, BulkError::Place(_))
    }
}

/// Receives and places pushed pages until `BulkDone`, the VM is complete, or an error.
///
/// # Errors
/// Any [`BulkError`].
pub fn receive_pushed_pages(
    vm: &Vm,
    mut conn: TcpStream,
    mut reader: FrameReader,
) -> Result<(), BulkError> {
    // Room for several maximal frames, so each read takes whatever the socket holds.
    reader.reserve(4 * (common::wire::HEADER_LEN + common::wire::MAX_BODY_BYTES));
    loop {
        let (message, payload) = reader.read_frame(&mut conn)?;
        let (range, data) = match message {
            Message::PageRun(range) => (range, Some(reader.payload(payload))),
            Message::ZeroRun(range) => (range, None),
            Message::BulkDone => {
                debug!("pagesrv pushed every page");
                return Ok(());
            }
            Message::Error { code, text } => return Err(BulkError::Remote { code, text }),
            other => return Err(BulkError::Unexpected(other.kind())),
        };
        let frame_bytes = RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len);
        Counters::add(&vm.counters.bytes_received, frame_bytes as u64);
        trace!(
            first = range.first,
            count = range.count,
            zero = data.is_none(),
            "pushed"
        );
        place_with_retry(vm, range.first, range.count, data)?;
    }
}

/// Pages placed per hold of the placement gate, so a fault never waits long for the gate.
const GATE_HOLD_BYTES: u64 = 128 << 10;

/// Places a pushed run in gate-sized chunks; on EAGAIN (an unread REMOVE/UNMAP) lets the fault thread read its
/// events, then retries from where the kernel stopped.
fn place_with_retry(vm: &Vm, first: u64, count: u64, data: Option<&[u8]>) -> Result<(), UffdError> {
    let page_size = vm.page_size() as usize;
    let end = first + count;
    let chunk_pages = (GATE_HOLD_BYTES / vm.page_size()).max(1);
    let mut at = first;
    while at < end {
        let n = chunk_pages.min(end - at);
        let bytes = data.map(|d| &d[(at - first) as usize * page_size..][..n as usize * page_size]);
        match vm.place(at, n, bytes, Origin::Pushed, ZeroPages::Skip)? {
            Placed::Done => at += n,
            Placed::Again { resume_at } => {
                at = resume_at;
                std::thread::yield_now();
            }
        }
    }
    Ok(())
}
