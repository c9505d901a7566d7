//! Why a session's bulk side stopped: typed, so the session's end can tell a dead link
//! from a destination that failed or a source VMM that went away. Shown with
//! [`super::error_chain`] (causes are sources, not repeated in the messages).

use common::framed::ReadError;
use common::wire::{ErrorCode, WireError};

use super::error_chain;

/// Why the bulk connection (or an extra stream) stopped before its work was done.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// Writing to the destination (or setting up the socket) failed.
    #[error("failed to {doing}")]
    Write {
        /// What was being sent ("send free pages", "push pages").
        doing: &'static str,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the destination's answer to a `Sync` failed.
    #[error("no answer to a sync: {}", error_chain(.0))]
    Read(ReadError),
    /// The destination sent nothing, not even a heartbeat, for the link timeout.
    #[error("the destination sent nothing for {seconds:.1} s while applying")]
    Silent {
        /// How long it was silent.
        seconds: f64,
    },
    /// A frame out of its phase on the bulk connection.
    #[error("the destination broke the protocol")]
    Protocol(#[source] WireError),
    /// The destination said it failed.
    #[error("the destination failed ({code:?}): {text}")]
    Destination {
        /// Its code.
        code: ErrorCode,
        /// Its text, made printable.
        text: String,
    },
    /// The source VMM's link failed (the precopy engine keeps the first such failure).
    #[error("{0}")]
    SourceVmm(String),
    /// Welcomed with precopy but the server has no engine (a bug, not an input).
    #[error("a precopy session without the precopy engine")]
    NoEngine,
    /// A precopy step came out of its order (a bug, not an input).
    #[error("precopy out of order: {0}")]
    OutOfOrder(&'static str),
    /// The session ended (a reconnect replaced it, or its urgent side ended) meanwhile.
    #[error("the session ended")]
    Stopped,
    /// The bulk thread panicked.
    #[error("the bulk thread panicked")]
    Panicked,
}

impl BulkError {
    /// A write (or socket setup) failure while doing `doing`, for `map_err`.
    pub fn writing(doing: &'static str) -> impl FnOnce(std::io::Error) -> BulkError {
        move |source| BulkError::Write { doing, source }
    }
}
