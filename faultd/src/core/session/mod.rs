//! The destination's session with pagesrv, as a sans-IO state machine over the fault core:
//! the stages, the urgent connection's protocol state, what a cut means in each stage, and
//! the verdict. The event loop (`event_loop.rs`) only moves bytes and calls it: it fills
//! [`DestSession::urgent_reader`] and writes [`DestSession::outbox`]; the unit tests drive
//! it with the fake kernel, no socket, no thread.
//!
//! ```text
//!  [Precopy ──Switchover──►] Migrating ──every page present: unregister──► Verifying
//!   (rounds, discards)        (faults, replies, pushes)      (DigestQuery on each new link)
//!        ──Digests──► Closing ──EOF, silence, or its deadline──► Done(verdict)
//!                     (Goodbye, or Error VerifyFailed)
//! ```
//!
//! Rules, each a test at the end of this file:
//! - in precopy no request goes out (a reply could race with a discard of the same page on
//!   the bulk connection): faults wait for the switch, and for the free pages if they come
//!   first (`awaiting_free`);
//! - frames the fault path queued go out only while pages are missing; once every page is
//!   here only the maps, the digest query and the verdict may follow;
//! - a cut while closing ends the session if the verdict was written in full (or is a
//!   mismatch: the source keeps the VM either way), else verification starts again on the
//!   next link; in any other stage the link is simply replaced;
//! - precopy on a new link is refused once the guest was told to resume, without a memfd
//!   to drop pages from, or when the source stopped running the precopy this guest began.

use std::time::{Duration, Instant};

use common::framed::{FrameEncoder, FrameReader};
use common::netopt::Liveness;
use common::wire::phase::{DestUrgent, Phase};
use common::wire::{ErrorCode, Message, RANGE_FRAME_BYTES};
use tracing::{debug, info, warn};

mod errors;
mod verify;

pub use errors::{AfterCut, FrameError, LinkFault, SessionError, error_chain};
pub use verify::{Verdict, encode_maps};

use super::fault::FaultCore;
use super::kernel::{Kernel, VmEvent};
use super::vm::{Counters, Vm};
use verify::compare_digests;

/// How soon work deferred by EAGAIN is retried when no event arrives.
pub const DEFERRED_RETRY: Duration = Duration::from_millis(1);

/// The urgent connection's protocol state on one link (the sockets are the pump's).
#[derive(Debug)]
pub struct LinkState {
    /// Which link this is (1 for the first).
    pub generation: u64,
    reader: FrameReader,
    tx: FrameEncoder,
    /// Encoded frames not yet written.
    outbox: Vec<u8>,
    phase: DestUrgent,
    last_rx: Instant,
    last_tx: Instant,
    /// Precopy rounds come first on this link.
    precopy: bool,
    /// The free pages come first on the bulk connection: no request before its `Sync`.
    awaiting_free: bool,
}

impl LinkState {
    /// A link just opened (its handshake and maps done), at `now`.
    pub fn new(
        generation: u64,
        reader: FrameReader,
        tx: FrameEncoder,
        precopy: bool,
        awaiting_free: bool,
        now: Instant,
    ) -> Self {
        LinkState {
            generation,
            reader,
            tx,
            outbox: Vec::new(),
            phase: DestUrgent::Serving,
            last_rx: now,
            last_tx: now,
            precopy,
            awaiting_free,
        }
    }

    /// Whether frames are sealed (a real key).
    pub fn is_sealed(&self) -> bool {
        self.tx.is_sealed()
    }
}

#[derive(Debug)]
enum Stage {
    /// The source still runs: precopy rounds arrive; the guest here waits for the switch.
    /// Faults its VMM takes meanwhile wait for it too (no request goes out: a reply could
    /// race with a discard of the same page on the bulk connection).
    Precopy,
    /// Pages still missing.
    Migrating,
    /// Every page is present; the source's digests are asked for on each new link.
    Verifying {
        /// The link generation the query went out on.
        asked_on: Option<u64>,
    },
    /// The verdict is queued; waiting for it to be written and the source to close.
    Closing {
        verdict: Verdict,
        /// Give up waiting for the source to close after this.
        until: Instant,
    },
    /// The source has the verdict.
    Done(Verdict),
}

/// The destination's session (module docs).
pub struct DestSession<'e, K> {
    vm: &'e Vm<K>,
    /// The fault path (requests in flight, deferred work, latencies).
    pub core: FaultCore<'e, K>,
    stage: Stage,
    link: Option<LinkState>,
    verify: bool,
    liveness: Liveness,
    started: Instant,
    completed_in: Option<Duration>,
    switched_in: Option<Duration>,
    events_sink: Vec<VmEvent>,
}

impl<'e, K: Kernel> DestSession<'e, K> {
    /// A session for `vm` that began at `started`; `verify`: compare digests at the end.
    pub fn new(vm: &'e Vm<K>, verify: bool, liveness: Liveness, started: Instant) -> Self {
        DestSession {
            vm,
            core: FaultCore::new(vm),
            stage: Stage::Migrating,
            link: None,
            verify,
            liveness,
            started,
            completed_in: None,
            switched_in: None,
            events_sink: Vec::new(),
        }
    }

    /// Whether the guest still depends on faultd (pages may be missing).
    pub fn serving(&self) -> bool {
        matches!(self.stage, Stage::Precopy | Stage::Migrating)
    }

    /// The stage, as the status names it.
    pub fn stage_name(&self) -> &'static str {
        match self.stage {
            Stage::Precopy => "precopy",
            Stage::Migrating => "postcopy",
            Stage::Verifying { .. } => "verifying",
            Stage::Closing { .. } => "closing",
            Stage::Done(_) => "done",
        }
    }

    /// The verdict, once there is one.
    pub fn verdict(&self) -> Option<&Verdict> {
        match &self.stage {
            Stage::Done(v) | Stage::Closing { verdict: v, .. } => Some(v),
            _ => None,
        }
    }

    /// The session's end: the verdict the source has.
    pub fn done(&self) -> Option<&Verdict> {
        match &self.stage {
            Stage::Done(v) => Some(v),
            _ => None,
        }
    }

    /// When every page was present, from the start.
    pub fn completed_in(&self) -> Option<Duration> {
        self.completed_in
    }

    /// When the guest was told to resume (precopy), from the start.
    pub fn switched_in(&self) -> Option<Duration> {
        self.switched_in
    }

    /// How long the loop may sleep without an event: soon while work deferred by EAGAIN
    /// waits, else half the heartbeat interval.
    pub fn poll_timeout(&self) -> Duration {
        if self.serving() && self.core.has_deferred() {
            DEFERRED_RETRY
        } else {
            self.liveness.heartbeat / 2
        }
    }

    /// Whether deferred work must be retried though no event arrived.
    pub fn has_deferred_work(&self) -> bool {
        self.serving() && self.core.has_deferred()
    }

    /// Whether faults may be requested: a link is up, its free pages are in (if they come
    /// first) and no precopy holds the guest.
    pub fn faults_released(&self) -> bool {
        !matches!(self.stage, Stage::Precopy)
            && self.link.as_ref().is_some_and(|l| !l.awaiting_free)
    }

    /// Whether a reply is awaited (busy-polling for it can pay).
    pub fn awaits_replies(&self) -> bool {
        self.core.pages_in_flight() > 0 && self.faults_released()
    }

    /// The uffd is readable: serves the faults and removals (or, once guest RAM is
    /// unregistered, reads the events that raced with it: a REMOVE among them blocks the
    /// VMM's `madvise` until read).
    ///
    /// # Errors
    /// The uffd failed (the VMM is gone) or a fault could not be handled.
    pub fn on_uffd(&mut self) -> Result<(), SessionError> {
        if self.serving() {
            self.core.drain_events().map_err(SessionError::Faults)
        } else {
            self.events_sink.clear();
            self.vm
                .kernel
                .read_events(&mut self.events_sink)
                .map_err(SessionError::LastEvents)
        }
    }

    /// Moves the stages on at `now`: completion (unregister, verify), asking for digests on
    /// a new link, the end of closing.
    pub fn advance(&mut self, now: Instant) {
        if matches!(self.stage, Stage::Migrating) && self.vm.is_complete() {
            self.complete(now);
        }
        let generation = self.link.as_ref().map(|l| l.generation);
        match &mut self.stage {
            Stage::Verifying { asked_on } if generation.is_some() && *asked_on != generation => {
                let link = self.link.as_mut().expect("checked above");
                // Frames the fault path queued (skips) go before the maps and the query:
                // nothing but the verdict may follow the query.
                for message in self.core.pending.drain(..) {
                    link.tx.encode(&message, &[], &mut link.outbox);
                }
                // Every page is here: say so in full (pagesrv accepts the end only when every
                // page is accounted for, and pages placed from an earlier link's data after
                // this link's maps were taken would be missing from its count).
                encode_maps(self.vm, &mut link.tx, &mut link.outbox);
                if self.verify {
                    let query = Message::DigestQuery {
                        chunk_pages: self.vm.digest_chunk_pages(),
                    };
                    // Serving → awaiting the digests: always allowed here.
                    let _ = link.phase.send(query.kind());
                    link.tx.encode(&query, &[], &mut link.outbox);
                    *asked_on = generation;
                } else {
                    link.tx.encode(&Message::Goodbye, &[], &mut link.outbox);
                    self.stage = Stage::Closing {
                        verdict: Verdict::NotVerified,
                        until: now + self.liveness.timeout,
                    };
                }
            }
            Stage::Closing { verdict, until } if now >= *until => {
                warn!("pagesrv did not close the session after the verdict; ending anyway");
                self.stage = Stage::Done(verdict.clone());
            }
            _ => {}
        }
    }

    /// Every page is present: unregister the VMM's ranges (it runs free of us from here) and
    /// move on to verification.
    fn complete(&mut self, now: Instant) {
        self.completed_in = Some(now.duration_since(self.started));
        if let Err(e) = self.vm.kernel.unregister_all() {
            warn!(error = %e, "failed to unregister guest memory after completion");
        }
        self.core.resolve_all();
        info!(
            ms = now.duration_since(self.started).as_millis() as u64,
            "every page is present; the guest no longer depends on faultd"
        );
        self.stage = Stage::Verifying { asked_on: None };
    }

    /// Whether a link welcomed with (or without) precopy can be followed: asked before its
    /// bulk threads start (they apply what they read at once), and again by
    /// [`DestSession::link_up`].
    ///
    /// # Errors
    /// The link's precopy cannot be followed (module docs).
    pub fn accepts_link(
        &self,
        precopy: bool,
        guest_told_to_resume: bool,
        can_drop_pages: bool,
    ) -> Result<(), SessionError> {
        if precopy && guest_told_to_resume {
            return Err(SessionError::PrecopyAfterSwitch);
        }
        if precopy && !can_drop_pages {
            return Err(SessionError::PrecopyWithoutMemfd);
        }
        if matches!(self.stage, Stage::Precopy) && !precopy {
            return Err(SessionError::PrecopyGone);
        }
        Ok(())
    }

    /// A new link is up (handshake and maps done). Returns whether the guest here runs
    /// (every later connection must say so).
    ///
    /// # Errors
    /// The link's precopy cannot be followed (module docs).
    pub fn link_up(
        &mut self,
        link: LinkState,
        guest_told_to_resume: bool,
        can_drop_pages: bool,
    ) -> Result<bool, SessionError> {
        self.accepts_link(link.precopy, guest_told_to_resume, can_drop_pages)?;
        let first_link = self.switched_in.is_none() && link.generation == 1;
        let mut guest_runs = false;
        if link.precopy && matches!(self.stage, Stage::Migrating) && first_link {
            info!("precopy: the source still runs; the guest here waits for the switch");
            self.stage = Stage::Precopy;
        } else if !link.precopy {
            // The guest runs (it never waited, or the switch came).
            guest_runs = true;
        }
        self.link = Some(link);
        self.release_held_faults();
        Ok(guest_runs)
    }

    /// The link failed (or is being given up): the session lets go of it and says what the
    /// pump does with it.
    pub fn link_lost(&mut self, why: &dyn std::fmt::Display) -> AfterCut {
        let Some(link) = self.link.take() else {
            return AfterCut::Close;
        };
        self.core.link_down();
        if let Stage::Closing { verdict, .. } = &self.stage {
            // Written in full, the verdict reached pagesrv's socket (which may close with a
            // reset once it has it); a mismatch is ours whether it arrived or not (the source
            // keeps waiting, which is safe). Either way, done.
            if link.outbox.is_empty() || matches!(verdict, Verdict::Mismatch(_)) {
                debug!(error = %why, "link closed after the verdict");
                self.stage = Stage::Done(verdict.clone());
                return AfterCut::Close;
            }
            self.stage = Stage::Verifying { asked_on: None };
        }
        AfterCut::Reconnect
    }

    /// The current link's generation, if one is up.
    #[cfg(test)]
    pub fn link_generation(&self) -> Option<u64> {
        self.link.as_ref().map(|l| l.generation)
    }

    /// Where the pump puts what it reads from the urgent connection.
    pub fn urgent_reader(&mut self) -> Option<&mut FrameReader> {
        self.link.as_mut().map(|l| &mut l.reader)
    }

    /// The pump read bytes at `now`: handles every whole frame buffered.
    ///
    /// # Errors
    /// [`FrameError::Link`]: cut the link; [`FrameError::Fatal`]: the migration fails.
    pub fn on_urgent_bytes(&mut self, now: Instant) -> Result<(), FrameError> {
        let link = self.link.as_mut().expect("bytes arrive on a link");
        link.last_rx = now;
        while let Some((message, payload)) = link
            .reader
            .next_buffered()
            .map_err(|e| FrameError::Link(LinkFault::BadFrame(e)))?
        {
            link.phase
                .receive(message.kind())
                .map_err(|e| FrameError::Link(LinkFault::Protocol(e)))?;
            match message {
                Message::PageRun(range) | Message::ZeroRun(range) => {
                    let data = matches!(message, Message::PageRun(_))
                        .then(|| link.reader.payload(payload.clone()));
                    let frame_bytes = RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len);
                    Counters::add(&self.vm.counters.bytes_received, frame_bytes as u64);
                    if matches!(self.stage, Stage::Precopy | Stage::Migrating) {
                        self.core
                            .on_reply(range, data)
                            .map_err(|e| FrameError::Fatal(SessionError::Reply(e)))?;
                    }
                }
                Message::Heartbeat => {}
                Message::Digests { chunk_pages } if chunk_pages != self.vm.digest_chunk_pages() => {
                    return Err(FrameError::Link(LinkFault::DigestChunks {
                        theirs: chunk_pages,
                        ours: self.vm.digest_chunk_pages(),
                    }));
                }
                Message::Digests { .. } => {
                    let verdict = compare_digests(self.vm, link.reader.payload(payload));
                    let reply = match &verdict {
                        Verdict::Mismatch(ranges) => Message::Error {
                            code: ErrorCode::VerifyFailed,
                            text: format!(
                                "the destination's pages differ from the source in page ranges {ranges:?}"
                            ),
                        },
                        _ => Message::Goodbye,
                    };
                    link.tx.encode(&reply, &[], &mut link.outbox);
                    self.stage = Stage::Closing {
                        verdict,
                        until: now + self.liveness.timeout,
                    };
                }
                Message::Error { code, text } => {
                    // pagesrv ends a session with an error only for good (a protocol
                    // violation, a memory file that shrank, a refused completion).
                    let text = common::wire::printable(&text);
                    return Err(FrameError::Fatal(SessionError::Ended { code, text }));
                }
                other => return Err(FrameError::Link(LinkFault::Unexpected(other.kind()))),
            }
        }
        Ok(())
    }

    /// pagesrv closed the urgent connection: the end, after a verdict written in full;
    /// else a cut (`Some`).
    pub fn on_urgent_closed(&mut self) -> Option<LinkFault> {
        let written = self.link.as_ref().is_some_and(|l| l.outbox.is_empty());
        if matches!(self.stage, Stage::Closing { .. }) && written {
            self.finish_closing("pagesrv closed the session");
            return None;
        }
        Some(LinkFault::Closed)
    }

    fn finish_closing(&mut self, why: &str) {
        if let Stage::Closing { verdict, .. } = &self.stage {
            debug!(why, "session closed");
            self.stage = Stage::Done(verdict.clone());
        }
    }

    /// The clock at `now`: the link timeout (a cut, `Some`; or the end of a session whose
    /// verdict is out) and a heartbeat on an idle link.
    pub fn on_tick(&mut self, now: Instant) -> Option<LinkFault> {
        let closing = matches!(self.stage, Stage::Closing { .. });
        let idle = self.core.pending.is_empty();
        let link = self.link.as_mut()?;
        let silent = now.saturating_duration_since(link.last_rx);
        if silent > self.liveness.timeout {
            if closing && link.outbox.is_empty() {
                self.finish_closing("the source went silent after the verdict");
                return None;
            }
            return Some(LinkFault::Silent {
                secs: silent.as_secs_f64(),
            });
        }
        if !closing
            && idle
            && link.outbox.is_empty()
            && now.saturating_duration_since(link.last_tx) >= self.liveness.heartbeat
        {
            link.tx.encode(&Message::Heartbeat, &[], &mut link.outbox);
        }
        None
    }

    /// Moves what the fault path queued into the outbox, while pages are missing; after
    /// that only the verdict may go (requests and skips are moot).
    pub fn prepare_transmit(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if matches!(self.stage, Stage::Precopy | Stage::Migrating) {
            for message in self.core.pending.drain(..) {
                link.tx.encode(&message, &[], &mut link.outbox);
            }
        } else if !self.core.pending.is_empty() {
            debug!(
                frames = self.core.pending.len(),
                "dropping fault-path frames queued after completion"
            );
            self.core.pending.clear();
        }
    }

    /// The bytes to write on the urgent connection.
    pub fn outbox(&self) -> &[u8] {
        self.link.as_ref().map_or(&[], |l| &l.outbox)
    }

    /// `n` bytes of the outbox were written at `now`.
    pub fn sent(&mut self, n: usize, now: Instant) {
        if let Some(link) = self.link.as_mut()
            && n > 0
        {
            link.outbox.drain(..n);
            link.last_tx = now;
        }
    }

    /// The source switched from precopy (its guest paused, the stale pages dropped here, in
    /// order, by the bulk thread) at `now`: the guest may resume. Returns whether this was
    /// the switch (not a late repeat).
    pub fn on_switched(&mut self, generation: u64, now: Instant) -> bool {
        if !matches!(self.stage, Stage::Precopy) {
            return false;
        }
        let switched = now.duration_since(self.started);
        self.switched_in = Some(switched);
        self.stage = Stage::Migrating;
        // Faults taken before the switch were held (a reply could race with a discard of the
        // same page on the other connection): ask for their pages now.
        self.release_held_faults();
        let c = &self.vm.counters;
        info!(
            generation,
            ms = switched.as_millis() as u64,
            pages_present = self.vm.done.set_pages(),
            pages_discarded = Counters::get(&c.pages_discarded),
            "switched to postcopy: the guest may resume"
        );
        true
    }

    /// The bulk thread of link `generation` answered the `Sync` that closes the free
    /// pages: faults on them fill locally from now on.
    pub fn on_synced(&mut self, generation: u64) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.generation == generation && link.awaiting_free {
            link.awaiting_free = false;
            self.release_held_faults();
        }
    }

    /// A bulk thread of link `generation` failed with a link error: whether to cut the
    /// link (the current one, while pages are missing).
    pub fn bulk_link_failed(&self, generation: u64) -> bool {
        self.serving()
            && self
                .link
                .as_ref()
                .is_some_and(|l| l.generation == generation)
    }

    /// Once faults are released, requests (or fills) what faults were held for.
    fn release_held_faults(&mut self) {
        if self.faults_released() {
            self.core.link_up();
        }
    }

    /// After a fatal error: the frames that tell pagesrv this destination failed (what was
    /// queued first), if a link is up.
    pub fn failure_frames(&mut self, why: &str) -> Option<Vec<u8>> {
        let link = self.link.as_mut()?;
        for message in self.core.pending.drain(..) {
            link.tx.encode(&message, &[], &mut link.outbox);
        }
        let mut frames = std::mem::take(&mut link.outbox);
        link.tx.encode(
            &Message::Error {
                code: ErrorCode::DestinationFailed,
                text: why.to_owned(),
            },
            &[],
            &mut frames,
        );
        Some(frames)
    }
}
