//! How a session's link or the session itself fails, and what the pump does about it.

pub use common::error_chain;
use common::uffd::UffdError;
use common::wire::{ErrorCode, Kind, WireError};
use thiserror::Error;

use crate::core::fault::FaultError;

/// Why a link must be cut (faultd reconnects).
#[derive(Debug, Error)]
pub enum LinkFault {
    /// A frame that does not decode (or does not open).
    #[error("pagesrv sent a bad frame")]
    BadFrame(#[source] WireError),
    /// A frame out of the conversation's order.
    #[error("pagesrv broke the protocol")]
    Protocol(#[source] WireError),
    /// A frame that has no business on the urgent connection.
    #[error("unexpected {0:?} frame on the urgent connection")]
    Unexpected(Kind),
    /// Digests in chunks other than the ones asked for.
    #[error("pagesrv sent digests of {theirs}-page chunks, not {ours}")]
    DigestChunks {
        /// Theirs.
        theirs: u64,
        /// Ours.
        ours: u64,
    },
    /// No frame for the link timeout.
    #[error("no frame from pagesrv for {secs:.1} s (--link-timeout)")]
    Silent {
        /// How long.
        secs: f64,
    },
    /// pagesrv closed the urgent connection.
    #[error("pagesrv closed the urgent connection")]
    Closed,
}

/// Why the session cannot go on: the migration fails (pagesrv is told, the source keeps
/// the VM).
#[derive(Debug, Error)]
pub enum SessionError {
    /// Reading or handling the guest's faults failed.
    #[error("failed to serve faults")]
    Faults(#[source] FaultError),
    /// The last events, read after unregistering, could not be read.
    #[error("failed to read the last events")]
    LastEvents(#[source] UffdError),
    /// A requested page could not be placed.
    #[error("failed to place requested pages")]
    Reply(#[source] FaultError),
    /// pagesrv ended the session for good.
    #[error("pagesrv ended the session ({code:?}): {text}")]
    Ended {
        /// Its code.
        code: ErrorCode,
        /// Its text (made safe to log).
        text: String,
    },
    /// A new link wants precopy after the guest was told to resume.
    #[error(
        "pagesrv wants to run precopy again after it switched and the guest here resumed: its discards would drop what the guest wrote"
    )]
    PrecopyAfterSwitch,
    /// A new link wants precopy and pages cannot be dropped here.
    #[error(
        "pagesrv runs precopy rounds first, which needs the VMM's memfd and --placement memfd (pages sent early must be dropped when the source writes them again)"
    )]
    PrecopyWithoutMemfd,
    /// The guest waits for a switch that a new link no longer offers.
    #[error(
        "pagesrv no longer runs the precopy this guest started with: pages sent early cannot be checked against what the source wrote since"
    )]
    PrecopyGone,
}

/// Why handling frames stopped.
#[derive(Debug)]
pub enum FrameError {
    /// The link is bad: cut it and reconnect.
    Link(LinkFault),
    /// The VM cannot be served.
    Fatal(SessionError),
}

/// What the pump does with a link the session let go of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCut {
    /// Reconnect: the session goes on.
    Reconnect,
    /// Close it and do not reconnect: the session is done.
    Close,
}
