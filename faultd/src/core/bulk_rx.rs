//! The bulk connection's frames at the destination, sans IO: each frame in, what the bulk
//! thread does out. The thread (`upstream/bulk.rs`) reads frames and carries the actions
//! out (placing runs, answering a `Sync`, placing from the base image); the simulation
//! drives the same core over in-memory pipes.
//!
//! ```text
//!  [Precopy: PageRun, ZeroRun, Discard, Sync ─Switchover─►] Pushing: PageRun, ZeroRun,
//!  Discard, Sync, PageHashes ─BulkDone─► done        (Heartbeat anywhere; Error ends it)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use common::uffd::UffdError;
use common::wire::phase::{DestBulk, Phase};
use common::wire::{
    ErrorCode, Kind, Message, PATCH_BYTES, PageRange, RANGE_FRAME_BYTES, WireError,
};
use thiserror::Error;
use tracing::debug;

use super::kernel::Kernel;
use super::vm::{Counters, Vm};

/// What the bulk thread does with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum BulkAction<'p> {
    /// Nothing more (a heartbeat, a discard already applied).
    Nothing,
    /// Place this run: `data` its bytes, `None` for zero pages.
    Place {
        /// The pages.
        range: PageRange,
        /// Their bytes (`None`: zero).
        data: Option<&'p [u8]>,
    },
    /// Everything before it is applied: answer `Synced`, then tell the session.
    Sync,
    /// The source switched to postcopy: tell the session.
    Switchover,
    /// Place from the base image those of `range` whose hash it holds, and answer with the
    /// map of them.
    Hashes {
        /// The pages hashed.
        range: PageRange,
        /// Their hashes.
        hashes: &'p [u8],
    },
    /// pagesrv pushed every page.
    Done,
    /// The link was cut: nothing read from it is applied (it could land after the next
    /// link's maps, or switch a guest the next link holds in precopy).
    Stopped,
}

/// Why a bulk connection's frame ends it.
#[derive(Debug, Error)]
pub enum BulkFrameError {
    /// A frame out of its phase (or page hashes without a base image).
    #[error("pagesrv broke the bulk protocol")]
    Protocol(#[source] WireError),
    /// pagesrv reported an error (it ends a session with one only for good).
    #[error("pagesrv reported {code:?}: {text}")]
    Remote {
        /// Its code.
        code: ErrorCode,
        /// Its text, made printable.
        text: String,
    },
    /// Dropping discarded pages failed.
    #[error("dropping discarded pages failed")]
    Discard(#[source] UffdError),
    /// Writing a patch in place failed.
    #[error("patching page {page} failed")]
    Patch {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: UffdError,
    },
    /// pagesrv patched a page this destination does not hold (it should have sent it
    /// whole): the link is reset, and the maps sent on the next one put it right.
    #[error("pagesrv patched page {page}, which is not here")]
    PatchedAbsent {
        /// The page.
        page: u64,
    },
}

/// One bulk connection's protocol state at the destination.
#[derive(Debug)]
pub struct BulkRx {
    phase: DestBulk,
    has_base: bool,
}

impl BulkRx {
    /// A bulk connection whose precopy rounds (if `precopy`) come first; `has_base`: page
    /// hashes are expected.
    pub fn new(precopy: bool, has_base: bool) -> Self {
        BulkRx {
            phase: if precopy {
                DestBulk::Precopy
            } else {
                DestBulk::Pushing
            },
            has_base,
        }
    }

    /// Decides what `message` (with its `payload`) calls for; applies discards and counts
    /// the bytes received. `stop`: the link was cut since the frame was read.
    ///
    /// # Errors
    /// Any [`BulkFrameError`].
    pub fn on_frame<'p, K: Kernel>(
        &mut self,
        vm: &Vm<K>,
        (message, payload): (Message, &'p [u8]),
        stop: &AtomicBool,
    ) -> Result<BulkAction<'p>, BulkFrameError> {
        if stop.load(Ordering::Acquire) {
            return Ok(BulkAction::Stopped);
        }
        self.phase
            .receive(message.kind())
            .map_err(BulkFrameError::Protocol)?;
        let (range, data) = match message {
            Message::PageRun(range) => (range, Some(payload)),
            Message::ZeroRun(range) => (range, None),
            Message::Heartbeat => return Ok(BulkAction::Nothing),
            Message::Discard(range) => {
                let started = std::time::Instant::now();
                let dropped = vm
                    .discard(range.first, range.count, payload)
                    .map_err(BulkFrameError::Discard)?;
                debug!(
                    first = range.first,
                    count = range.count,
                    dropped,
                    us = started.elapsed().as_micros() as u64,
                    "discarded"
                );
                return Ok(BulkAction::Nothing);
            }
            Message::Patch(range) => {
                let page = range.first;
                let per = vm.page_size() / PATCH_BYTES;
                let Some((bitmap, pieces)) = payload.split_at_checked(per.div_ceil(8) as usize)
                else {
                    return Err(BulkFrameError::Protocol(WireError::Unexpected(Kind::Patch)));
                };
                let patched = vm
                    .patch(page, PATCH_BYTES, bitmap, pieces)
                    .map_err(|source| BulkFrameError::Patch { page, source })?;
                if !patched {
                    return Err(BulkFrameError::PatchedAbsent { page });
                }
                let frame_bytes = (RANGE_FRAME_BYTES + payload.len()) as u64;
                Counters::add(&vm.counters.bytes_received, frame_bytes);
                Counters::add(&vm.counters.bytes_precopy, frame_bytes);
                return Ok(BulkAction::Nothing);
            }
            Message::Sync => return Ok(BulkAction::Sync),
            Message::Switchover => {
                debug!("the source switched to postcopy");
                return Ok(BulkAction::Switchover);
            }
            Message::PageHashes(_) if !self.has_base => {
                return Err(BulkFrameError::Protocol(WireError::Unexpected(
                    Kind::PageHashes,
                )));
            }
            Message::PageHashes(range) => {
                let frame_bytes = (RANGE_FRAME_BYTES + payload.len()) as u64;
                Counters::add(&vm.counters.bytes_hashes, frame_bytes);
                Counters::add(&vm.counters.bytes_received, frame_bytes);
                return Ok(BulkAction::Hashes {
                    range,
                    hashes: payload,
                });
            }
            Message::BulkDone => {
                debug!("pagesrv pushed every page");
                return Ok(BulkAction::Done);
            }
            Message::Error { code, text } => {
                let text = common::wire::printable(&text);
                return Err(BulkFrameError::Remote { code, text });
            }
            other => {
                return Err(BulkFrameError::Protocol(WireError::Unexpected(
                    other.kind(),
                )));
            }
        };
        let frame_bytes = (RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len)) as u64;
        Counters::add(&vm.counters.bytes_received, frame_bytes);
        if self.phase == DestBulk::Precopy {
            Counters::add(&vm.counters.bytes_precopy, frame_bytes);
        }
        Ok(BulkAction::Place { range, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fake::{FakeKernel, PAGE};

    static GO: AtomicBool = AtomicBool::new(false);

    fn range(first: u64, count: u64) -> PageRange {
        PageRange { first, count }
    }

    #[test]
    fn test_precopy_frames_then_the_switch_then_the_push() {
        let vm = Vm::new(FakeKernel::new()).unwrap();
        let mut rx = BulkRx::new(true, false);
        let data = vec![7u8; PAGE as usize];
        assert_eq!(
            rx.on_frame(&vm, (Message::PageRun(range(2, 1)), &data), &GO)
                .unwrap(),
            BulkAction::Place {
                range: range(2, 1),
                data: Some(&data[..])
            }
        );
        assert_eq!(
            Counters::get(&vm.counters.bytes_precopy),
            (RANGE_FRAME_BYTES + data.len()) as u64
        );
        // BulkDone before the switch is out of its phase.
        let mut early = BulkRx::new(true, false);
        assert!(matches!(
            early.on_frame(&vm, (Message::BulkDone, &[]), &GO),
            Err(BulkFrameError::Protocol(_))
        ));
        assert_eq!(
            rx.on_frame(&vm, (Message::Sync, &[]), &GO).unwrap(),
            BulkAction::Sync
        );
        assert_eq!(
            rx.on_frame(&vm, (Message::Switchover, &[]), &GO).unwrap(),
            BulkAction::Switchover
        );
        assert_eq!(
            rx.on_frame(&vm, (Message::ZeroRun(range(3, 4)), &[]), &GO)
                .unwrap(),
            BulkAction::Place {
                range: range(3, 4),
                data: None
            }
        );
        // After the switch, pushed bytes are not precopy's.
        assert_eq!(
            Counters::get(&vm.counters.bytes_precopy),
            (RANGE_FRAME_BYTES + data.len()) as u64
        );
        // A cut: nothing more is applied, a switch included.
        let cut = AtomicBool::new(true);
        assert_eq!(
            rx.on_frame(&vm, (Message::Switchover, &[]), &cut).unwrap(),
            BulkAction::Stopped
        );
        assert_eq!(
            rx.on_frame(&vm, (Message::BulkDone, &[]), &GO).unwrap(),
            BulkAction::Done
        );
    }

    #[test]
    fn test_discards_drop_pages_and_strangers_end_the_connection() {
        let vm = Vm::new(FakeKernel::new()).unwrap();
        let data = vec![9u8; 2 * PAGE as usize];
        vm.place(
            4,
            2,
            Some(&data),
            crate::core::vm::Origin::Pushed,
            crate::core::vm::ZeroPages::Fill,
        )
        .unwrap();
        let mut rx = BulkRx::new(true, false);
        assert_eq!(
            rx.on_frame(&vm, (Message::Discard(range(4, 2)), &[0b10]), &GO)
                .unwrap(),
            BulkAction::Nothing
        );
        assert!(vm.done.is_set(4) && !vm.done.is_set(5));
        assert_eq!(vm.kernel.page(5), None);
        // Discards belong to precopy.
        let mut rx = BulkRx::new(false, false);
        assert!(matches!(
            rx.on_frame(&vm, (Message::Discard(range(4, 1)), &[1]), &GO),
            Err(BulkFrameError::Protocol(_))
        ));
        assert!(matches!(
            rx.on_frame(&vm, (Message::PageHashes(range(0, 1)), &[0; 16]), &GO),
            Err(BulkFrameError::Protocol(_))
        ));
        let mut with_base = BulkRx::new(false, true);
        assert!(matches!(
            with_base.on_frame(&vm, (Message::PageHashes(range(0, 1)), &[0; 16]), &GO),
            Ok(BulkAction::Hashes { .. })
        ));
        assert!(matches!(
            rx.on_frame(&vm, (Message::Request(range(0, 1)), &[]), &GO),
            Err(BulkFrameError::Protocol(_))
        ));
        let error = Message::Error {
            code: ErrorCode::Internal,
            text: "the memory file\nshrank".into(),
        };
        match rx.on_frame(&vm, (error, &[]), &GO) {
            Err(BulkFrameError::Remote { text, .. }) => assert!(!text.contains('\n')),
            other => panic!("{other:?}"),
        }
    }
}
