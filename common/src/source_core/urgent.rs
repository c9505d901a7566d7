//! The urgent conversation's decisions, sans IO: each frame from the destination in, what
//! to do out. pagesrv's urgent thread (`Session::serve_urgent`) reads frames, calls
//! [`UrgentCore::on_frame`] and carries the action out on the socket.
//!
//! ```text
//!  Maps ─(DoneMap, SkipMap)─ MapEnd ─► Serving ─(Request, Skip, Heartbeat)─ DigestQuery ─►
//!  Verifying ─ Goodbye ─► Completed (every page sent, held or skipped; else Failed)
//!  Error{VerifyFailed|DestinationFailed} ─► Failed (keep the source VM); any other Error,
//!  a frame out of its phase, or over a limit ─► Aborted (the destination reconnects)
//! ```

use crate::pagemap::PageMap;
use crate::wire::phase::{Phase, SourceUrgent};
use crate::wire::{ErrorCode, MAX_PAYLOAD_BYTES, MAX_REQUEST_BYTES, Message, PageRange};

use super::Outcome;

/// What the urgent thread does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrgentAction {
    /// Nothing to send (maps applied, a heartbeat).
    Nothing,
    /// Send these pages now.
    Answer(PageRange),
    /// The destination's maps are complete: the push may start.
    StartPush,
    /// Compute and send the digests of every chunk of `chunk_pages` pages.
    Digests {
        /// Pages per chunk.
        chunk_pages: u64,
    },
    /// Tell the destination why (an `Error` frame), then end the session with `outcome`.
    Refuse {
        /// The error code sent.
        code: ErrorCode,
        /// Why (also the outcome's text).
        text: String,
        /// How the session ends.
        outcome: Outcome,
    },
    /// End the session (nothing to send).
    End(Outcome),
}

/// The pages a session has settled (sent, held or skipped) and those the destination will
/// never need.
#[derive(Debug, Clone, Copy)]
pub struct Maps<'m> {
    /// Sent, or held or skipped by the destination.
    pub sent: &'m PageMap,
    /// Removed at the destination before they arrived (not verified).
    pub skipped: &'m PageMap,
}

/// What the urgent frames changed in the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Pages named in requests.
    pub requested: u64,
    /// Pages newly skipped.
    pub skipped: u64,
    /// Pages the destination held (its done map).
    pub held: u64,
}

/// The urgent conversation's state.
#[derive(Debug)]
pub struct UrgentCore {
    phase: SourceUrgent,
    page_size: u64,
    total_pages: u64,
    /// Counts since the last look.
    pub counted: Counted,
}

impl UrgentCore {
    /// A conversation about `total_pages` pages of `page_size` bytes.
    pub fn new(page_size: u64, total_pages: u64) -> Self {
        UrgentCore {
            phase: SourceUrgent::Maps,
            page_size,
            total_pages,
            counted: Counted::default(),
        }
    }

    /// Decides what `message` (with its `payload`) calls for; applies the maps it carries.
    pub fn on_frame(&mut self, message: Message, payload: &[u8], maps: Maps<'_>) -> UrgentAction {
        if let Err(e) = self.phase.receive(message.kind()) {
            return refuse_abort(format!("the destination broke the protocol: {e}"));
        }
        match message {
            Message::Request(range)
                if range.count.saturating_mul(self.page_size) > MAX_REQUEST_BYTES =>
            {
                refuse_abort(format!(
                    "a request for {} pages is over the limit of {} MiB",
                    range.count,
                    MAX_REQUEST_BYTES >> 20
                ))
            }
            Message::Request(range) => {
                self.counted.requested += range.count;
                UrgentAction::Answer(range)
            }
            Message::Skip(range) => {
                maps.skipped.set_range(range.first, range.count);
                self.counted.skipped += maps.sent.set_range(range.first, range.count);
                UrgentAction::Nothing
            }
            Message::DoneMap(range) => {
                self.counted.held += maps.sent.set_from_bitmap(range.first, range.count, payload);
                UrgentAction::Nothing
            }
            Message::SkipMap(range) => {
                maps.skipped
                    .set_from_bitmap(range.first, range.count, payload);
                self.counted.skipped +=
                    maps.sent.set_from_bitmap(range.first, range.count, payload);
                UrgentAction::Nothing
            }
            Message::MapEnd => UrgentAction::StartPush,
            Message::DigestQuery { chunk_pages }
                if self.total_pages.div_ceil(chunk_pages) * 8 > MAX_PAYLOAD_BYTES as u64 =>
            {
                refuse_abort(format!(
                    "{chunk_pages}-page digest chunks need a reply over the frame limit"
                ))
            }
            Message::DigestQuery { chunk_pages } => UrgentAction::Digests { chunk_pages },
            Message::Goodbye => {
                let unsent = self.total_pages - maps.sent.set_pages();
                if unsent > 0 {
                    let text = format!(
                        "the destination said goodbye with {unsent} pages it never received nor declared held"
                    );
                    return UrgentAction::Refuse {
                        code: ErrorCode::Protocol,
                        text: text.clone(),
                        outcome: Outcome::Failed(text),
                    };
                }
                UrgentAction::End(Outcome::Completed)
            }
            Message::Error { code, text } => {
                let text = crate::wire::printable(&text);
                let why = format!("the destination reported {code:?}: {text}");
                UrgentAction::End(match code {
                    ErrorCode::VerifyFailed | ErrorCode::DestinationFailed => Outcome::Failed(why),
                    _ => Outcome::Aborted(why),
                })
            }
            Message::Heartbeat => UrgentAction::Nothing,
            other => refuse_abort(format!(
                "unexpected {:?} frame on the urgent connection",
                other.kind()
            )),
        }
    }
}

fn refuse_abort(text: String) -> UrgentAction {
    UrgentAction::Refuse {
        code: ErrorCode::Protocol,
        text: text.clone(),
        outcome: Outcome::Aborted(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: u64 = 40;

    fn range(first: u64, count: u64) -> PageRange {
        PageRange { first, count }
    }

    #[test]
    fn test_maps_then_requests_then_the_verdict() {
        let (sent, skipped) = (PageMap::new(PAGES), PageMap::new(PAGES));
        let maps = Maps {
            sent: &sent,
            skipped: &skipped,
        };
        let mut core = UrgentCore::new(4096, PAGES);
        // A request before the maps are complete is out of its phase.
        let mut early = UrgentCore::new(4096, PAGES);
        assert!(matches!(
            early.on_frame(Message::Request(range(0, 1)), &[], maps),
            UrgentAction::Refuse {
                outcome: Outcome::Aborted(_),
                ..
            }
        ));
        assert_eq!(
            core.on_frame(Message::DoneMap(range(0, 16)), &[0xFF, 0x0F], maps),
            UrgentAction::Nothing
        );
        assert_eq!(core.counted.held, 12);
        assert_eq!(
            core.on_frame(Message::SkipMap(range(16, 8)), &[0b11], maps),
            UrgentAction::Nothing
        );
        assert!(skipped.is_set(16) && skipped.is_set(17) && sent.is_set(17));
        assert_eq!(
            core.on_frame(Message::MapEnd, &[], maps),
            UrgentAction::StartPush
        );
        assert_eq!(
            core.on_frame(Message::Request(range(30, 2)), &[], maps),
            UrgentAction::Answer(range(30, 2))
        );
        assert_eq!(core.counted.requested, 2);
        assert_eq!(
            core.on_frame(Message::Skip(range(38, 2)), &[], maps),
            UrgentAction::Nothing
        );
        assert_eq!(core.counted.skipped, 4);
        assert_eq!(
            core.on_frame(Message::DigestQuery { chunk_pages: 8 }, &[], maps),
            UrgentAction::Digests { chunk_pages: 8 }
        );
        // Goodbye before every page is settled: refused, and the source keeps the VM.
        let mut early_bye = UrgentCore::new(4096, PAGES);
        early_bye.phase = SourceUrgent::Verifying;
        assert!(matches!(
            early_bye.on_frame(Message::Goodbye, &[], maps),
            UrgentAction::Refuse {
                outcome: Outcome::Failed(_),
                ..
            }
        ));
        sent.set_range(0, PAGES);
        assert_eq!(
            core.on_frame(Message::Goodbye, &[], maps),
            UrgentAction::End(Outcome::Completed)
        );
    }

    #[test]
    fn test_limits_errors_and_strangers_end_the_session() {
        let (sent, skipped) = (PageMap::new(1 << 20), PageMap::new(1 << 20));
        let maps = Maps {
            sent: &sent,
            skipped: &skipped,
        };
        let serving = || {
            let mut core = UrgentCore::new(4096, 1 << 20);
            core.phase = SourceUrgent::Serving;
            core
        };
        let whole = Message::Request(range(0, 1 << 20));
        assert!(matches!(
            serving().on_frame(whole, &[], maps),
            UrgentAction::Refuse {
                code: ErrorCode::Protocol,
                outcome: Outcome::Aborted(_),
                ..
            }
        ));
        assert!(matches!(
            serving().on_frame(Message::DigestQuery { chunk_pages: 1 }, &[], maps),
            UrgentAction::Refuse { .. }
        ));
        for (code, failed) in [
            (ErrorCode::VerifyFailed, true),
            (ErrorCode::DestinationFailed, true),
            (ErrorCode::Internal, false),
        ] {
            let error = Message::Error {
                code,
                text: "bad\nline".into(),
            };
            match serving().on_frame(error, &[], maps) {
                UrgentAction::End(Outcome::Failed(why)) if failed => {
                    assert!(!why.contains('\n'), "escaped: {why}")
                }
                UrgentAction::End(Outcome::Aborted(_)) if !failed => {}
                other => panic!("{code:?}: {other:?}"),
            }
        }
        assert!(matches!(
            serving().on_frame(Message::BulkDone, &[], maps),
            UrgentAction::Refuse { .. }
        ));
        assert_eq!(
            serving().on_frame(Message::Heartbeat, &[], maps),
            UrgentAction::Nothing
        );
    }
}
