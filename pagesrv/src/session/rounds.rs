//! A session's precopy: rounds on the bulk connection while the source runs, the switch, and
//! the catch-up for a destination that missed it (see `crate::precopy`).

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::framed::{FrameEncoder, FrameReader};
use common::pagemap::PageMap;
use common::wire::{MAX_PAYLOAD_BYTES, Message, PATCH_BYTES, PageRange, RANGE_FRAME_BYTES};
use serde_json::json;
use tracing::{debug, info, warn};

use super::errors::BulkError;
use super::{BULK_RUN_BYTES, Session};
use crate::precopy::{ConvergedBy, Precopy, Round, Strategy, converged};
use common::source_core::precopy_plan::{PrecopyPlan, PrecopyStep};
use common::source_core::stale::Stale;

impl Session<'_> {
    /// Runs precopy until the switch (or the session ends); on return the bulk connection
    /// carries postcopy.
    ///
    /// # Errors
    /// The bulk connection or the source VMM link failed.
    pub(super) fn run_precopy(
        &self,
        engine: &Precopy,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        rx: &mut FrameReader,
    ) -> Result<(), BulkError> {
        let snapshot = engine.snapshot();
        let mut plan = PrecopyPlan::new(
            snapshot.switched,
            snapshot.tracking,
            engine.strategy == Strategy::Precopy,
        );
        let mut round = None;
        let mut converged_by = None;
        let mut paused_at = None;
        // Patching (huge pages): a round's patches go before its `SendRound`, and count in it.
        let mut round_began = None;
        loop {
            if self.is_stopped() {
                return Ok(());
            }
            match plan.next_step() {
                PrecopyStep::Begin => {
                    // A destination that reconnected may hold pages the guest wrote since they
                    // were sent, or pages a discard its last link lost was to drop (made
                    // pending when the session began, `push_background`).
                    let stale = self.discard(conn, tx, engine, Stale::Written)?;
                    if stale > 0 {
                        info!(
                            pages = stale,
                            "the destination dropped pages written since it got them"
                        );
                    }
                }
                PrecopyStep::StartTracking | PrecopyStep::CollectDirty => {
                    self.collect_dirty(engine)?
                }
                PrecopyStep::RefreshFreeHints => self.refresh_free_hints(engine)?,
                PrecopyStep::SendRound => {
                    match self.send_round(engine, conn, tx, round_began.take())? {
                        Some(sent) => round = Some(sent),
                        None => return Ok(()), // the session ended
                    }
                }
                PrecopyStep::CheckConvergence => {
                    let by = self.record_round(engine, round.take())?;
                    if let Some(by) = by {
                        self.converged(engine, by);
                    }
                    plan.converged(by.is_some());
                    converged_by = by;
                }
                PrecopyStep::DropWritten if engine.patches() => {
                    // Huge pages: what the guest wrote goes now, as pieces, and the pages
                    // stay at the destination; before a round, as part of it.
                    round_began = Some((
                        Instant::now(),
                        self.stats.bytes_sent.load(Ordering::Relaxed),
                    ));
                    let patched = self.patch(conn, tx, engine, Stale::Written)?;
                    debug!(patched, "patched pages written since sent");
                }
                PrecopyStep::DropWritten => {
                    // Before a round: the round sends them again. Before the catch-up
                    // (hybrid): only what the guest writes from now on waits on the pause.
                    let dropped = self.discard(conn, tx, engine, Stale::Written)?;
                    debug!(dropped, "dropped pages written since sent");
                }
                PrecopyStep::CatchUp => {
                    let catch_up = Instant::now();
                    self.sync(conn, tx, rx, &mut |_, _| {})?;
                    debug!(
                        ms = catch_up.elapsed().as_secs_f64() * 1000.0,
                        "the destination caught up"
                    );
                }
                PrecopyStep::Pause => {
                    paused_at = Some(Instant::now());
                    self.pause_source(engine)?;
                    // From here on the switch is decided: a destination that reconnects
                    // before it got all of it gets the rest (the VMM answers nothing more).
                    engine.decide_switch(
                        converged_by.ok_or(BulkError::OutOfOrder("a pause before convergence"))?,
                    );
                }
                PrecopyStep::DropStaleAtSwitch => {
                    // Huge pages: the source is paused, so the pieces written since the
                    // catch-up are final: they go before the switch, no page is dropped.
                    let stale = if engine.patches() {
                        self.patch(conn, tx, engine, Stale::AtSwitch)?
                    } else {
                        self.discard(conn, tx, engine, Stale::AtSwitch)?
                    };
                    engine
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pages_stale_at_switch = stale;
                }
                // Free pages the destination lacks go as zero before the guest resumes: a
                // fault on one is a local zero fill.
                PrecopyStep::SendFreePages => self.send_free_pages(conn, tx)?,
                // Stop-and-copy: the rest now, before the guest resumes.
                PrecopyStep::SendUnsent => drop(self.send_unsent(conn, tx)?),
                PrecopyStep::Switchover => {
                    // Postcopy pushes what is left from the first page on.
                    self.push_order.lock().rewind();
                    self.switchover(conn, tx)?;
                    if let Some(paused_at) = paused_at {
                        info!(
                            ?converged_by,
                            stale_pages = engine.snapshot().pages_stale_at_switch,
                            pause_to_switch_ms = paused_at.elapsed().as_secs_f64() * 1000.0,
                            "the source is paused: switched"
                        );
                    }
                }
                PrecopyStep::Done => return Ok(()),
            }
        }
    }

    /// Records a round that was sent (its dirty pages counted after `CollectDirty`) and
    /// applies the convergence rules.
    ///
    /// # Errors
    /// A round that was never sent (a bug of the plan's).
    fn record_round(
        &self,
        engine: &Precopy,
        round: Option<Round>,
    ) -> Result<Option<ConvergedBy>, BulkError> {
        let mut round = round.ok_or(BulkError::OutOfOrder("a round checked but not sent"))?;
        // In the units a write costs: pieces when patching, else pages.
        let page_size = engine.dirty_unit();
        round.dirty_pages = if engine.patches() {
            engine.dirty_pieces(&self.sent)
        } else {
            count_both(engine.stale().pending(), &self.sent)
        };
        let rounds = {
            let mut state = engine.state.lock().unwrap_or_else(|p| p.into_inner());
            state.rounds.push(round);
            state.rounds.clone()
        };
        info!(
            round = round.round,
            pages_sent = round.pages_sent,
            mib_per_s = (round.bytes as f64 / round.seconds.max(1e-6)) as u64 >> 20,
            dirty_pages = round.dirty_pages,
            expected_downtime_ms = round.expected_downtime_ms(page_size),
            "precopy round"
        );
        self.events.emit(json!({
            "event": "round",
            "vm": self.vm.to_string(),
            "round": round.round,
            "pages_sent": round.pages_sent,
            "bytes": round.bytes,
            "seconds": round.seconds,
            "dirty_pages": round.dirty_pages,
            "dirty_unit_bytes": page_size,
            "expected_downtime_ms": round.expected_downtime_ms(page_size),
        }));
        Ok(converged(
            &rounds,
            page_size,
            engine.max_downtime,
            engine.is_forced(),
        ))
    }

    /// Says the rounds converged (an event for orchestrators; a warning when they did not
    /// really).
    fn converged(&self, engine: &Precopy, by: ConvergedBy) {
        self.events
            .emit_sticky(json!({"event": "converged", "vm": self.vm.to_string(), "by": by}));
        if matches!(by, ConvergedBy::NoProgress | ConvergedBy::MaxRounds) {
            let left = count_both(engine.stale().pending(), &self.sent);
            warn!(
                converged_by = ?by,
                pages_left = left,
                "precopy did not converge: the guest writes faster than the link sends; {}",
                match engine.strategy {
                    Strategy::Precopy => "stop-and-copy of what is left (a long downtime)",
                    _ => "postcopy moves what is left",
                }
            );
        }
    }

    /// Pauses the source guest; its free pages are served as zero from now on, and the
    /// destination drops those it holds with old bytes (not those it got as zero ranges).
    ///
    /// # Errors
    /// The source VMM link failed.
    fn pause_source(&self, engine: &Precopy) -> Result<(), BulkError> {
        let paused_at = Instant::now();
        engine.pause().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM did not pause: {e:#}")))
        })?;
        self.source.paused();
        let free = engine.free_pages().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM link failed: {e:#}")))
        })?;
        if let Some(free) = free {
            let pages = self.source.hint_free(&free);
            // In the destination's pages: a huge page is free when all of it is.
            let mut free = engine.fold(&free, false).into_owned();
            let zero = self.sent_zero.bitmap(0, self.source.total_pages());
            for (f, z) in free.iter_mut().zip(zero) {
                *f &= !z;
            }
            engine.stale().written(&free);
            self.stats.free_pages.fetch_add(pages, Ordering::Relaxed);
        }
        debug!(
            pause_ms = paused_at.elapsed().as_secs_f64() * 1000.0,
            "the source is paused"
        );
        Ok(())
    }

    /// Asks the source VMM what the guest wrote since the last bitmap: those pages are stale
    /// at the destination, and no longer free whatever a hint said.
    ///
    /// # Errors
    /// The VMM link failed (the migration cannot go on).
    pub(super) fn collect_dirty(&self, engine: &Precopy) -> Result<(), BulkError> {
        let written = engine.collect_dirty().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM link failed: {e:#}")))
        })?;
        self.source.written(&written);
        Ok(())
    }

    /// Takes the guest's free-page hints, if its VMM gives them, before a round: free pages
    /// go as zero ranges (a page written after the hint was taken is in the next dirty
    /// bitmap, which takes the hint back).
    ///
    /// # Errors
    /// The VMM link failed.
    fn refresh_free_hints(&self, engine: &Precopy) -> Result<(), BulkError> {
        let free = engine.free_pages().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM link failed: {e:#}")))
        })?;
        if let Some(free) = free {
            self.source.hint_free(&free);
        }
        Ok(())
    }

    /// Sends every page not sent yet (a round); `None` if the session ended meanwhile.
    fn send_round(
        &self,
        engine: &Precopy,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        began: Option<(Instant, u64)>,
    ) -> Result<Option<Round>, BulkError> {
        let number = engine.snapshot().rounds.len() as u32 + 1;
        let (started, bytes_before) = began.unwrap_or_else(|| {
            (
                Instant::now(),
                self.stats.bytes_sent.load(Ordering::Relaxed),
            )
        });
        let pages = self.send_unsent_with(conn, tx, Some(engine))?;
        if self.is_stopped() {
            return Ok(None);
        }
        Ok(Some(Round {
            round: number,
            pages_sent: pages,
            bytes: self.stats.bytes_sent.load(Ordering::Relaxed) - bytes_before,
            seconds: started.elapsed().as_secs_f64(),
            dirty_pages: 0,
        }))
    }

    /// Sends every page not sent yet.
    fn send_unsent(&self, conn: &mut TcpStream, tx: &mut FrameEncoder) -> Result<u64, BulkError> {
        self.send_unsent_with(conn, tx, None)
    }

    fn send_unsent_with(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        engine: Option<&Precopy>,
    ) -> Result<u64, BulkError> {
        let run_pages = (BULK_RUN_BYTES / self.source.page_size()).max(1);
        self.push_order.lock().rewind();
        let mut pieces = Vec::new();
        let mut pages = 0;
        while !self.is_stopped() {
            let next = self.push_order.lock().next_run(&self.sent, run_pages);
            let Some((first, count)) = next else { break };
            if let Some(engine) = engine {
                // Cleared before the pages are read: a write racing with the read is in the
                // next bitmap.
                engine.sending(first, count);
            }
            pieces.clear();
            self.source.classify(first, count, &mut pieces);
            let (zero, data) = self
                .send_pieces(conn, tx, &pieces)
                .map_err(BulkError::writing("push pages"))?;
            self.stats
                .precopy_pages
                .fetch_add(zero + data, Ordering::Relaxed);
            pages += count;
        }
        Ok(pages)
    }

    /// For a destination on huge pages: sends, for each page it got that `which` names, the
    /// pieces the guest wrote since (a `Patch`: the page stays there); a page that is free
    /// now (served as zero from here on) or has no pieces recorded (patched on a link since
    /// cut) is left stale and dropped by [`Session::discard`], to be sent again. Returns how
    /// many pages were patched or dropped.
    fn patch(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        engine: &Precopy,
        which: Stale,
    ) -> Result<u64, BulkError> {
        let piece = PATCH_BYTES as usize;
        let stale = engine.stale();
        let mut payload = Vec::new();
        let mut patched = 0;
        for page in stale.patches(which, &self.sent) {
            let bitmap = engine.take_pieces(page);
            let set: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
            if set == 0
                || bitmap.len() + set * piece > MAX_PAYLOAD_BYTES
                || self.source.is_free(page)
            {
                continue;
            }
            let bytes = self.source.bytes(page, 1);
            payload.clear();
            payload.extend_from_slice(&bitmap);
            PageMap::bitmap_runs(0, &bitmap, |first, n| {
                let at = first as usize * piece;
                payload.extend_from_slice(&bytes[at..at + n as usize * piece]);
            });
            if !self.source.pages_intact() {
                // A read went past the end of a shrunk file: the pieces may be wrong.
                return Err(BulkError::Write {
                    doing: "send a patch",
                    source: std::io::Error::other("the memory file shrank while it was read"),
                });
            }
            let range = PageRange {
                first: page,
                count: 1,
            };
            tx.write_frame(conn, &Message::Patch(range), &payload)
                .map_err(BulkError::writing("send a patch"))?;
            stale.patched(which, page);
            patched += 1;
            // It holds data now, whatever it was sent as.
            self.sent_zero.clear_range(page, 1);
            self.stats.bytes_sent.fetch_add(
                (RANGE_FRAME_BYTES + payload.len()) as u64,
                Ordering::Relaxed,
            );
            self.stats
                .patched_pieces
                .fetch_add(set as u64, Ordering::Relaxed);
        }
        Ok(patched + self.discard(conn, tx, engine, which)?)
    }

    /// Tells the destination to drop the pages it got that `which` names (they are sent
    /// again); returns how many.
    fn discard(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        engine: &Precopy,
        which: Stale,
    ) -> Result<u64, BulkError> {
        let mut dropped = 0;
        for frame in engine.stale().discards(which, &self.sent) {
            let range = PageRange {
                first: frame.first,
                count: frame.count,
            };
            tx.write_frame(conn, &Message::Discard(range), &frame.bitmap)
                .map_err(BulkError::writing("send a discard"))?;
            dropped += frame
                .bitmap
                .iter()
                .map(|b| u64::from(b.count_ones()))
                .sum::<u64>();
        }
        self.stats
            .discarded_pages
            .fetch_add(dropped, Ordering::Relaxed);
        Ok(dropped)
    }

    fn switchover(&self, conn: &mut TcpStream, tx: &mut FrameEncoder) -> Result<(), BulkError> {
        tx.write_frame(conn, &Message::Switchover, &[])
            .map_err(BulkError::writing("send the switchover"))?;
        self.events.emit_sticky(json!({
            "event": "switched",
            "vm": self.vm.to_string(),
            "session": format!("{:016x}", self.id),
            "pages_unsent": self.total_pages() - self.sent.set_pages(),
        }));
        Ok(())
    }
}

/// Pages set in both maps.
fn count_both(a: &PageMap, b: &PageMap) -> u64 {
    let total = a.total_pages();
    let chunk = MAX_PAYLOAD_BYTES as u64 * 8;
    let mut n = 0;
    let mut first = 0;
    while first < total {
        let count = chunk.min(total - first);
        n += a
            .bitmap(first, count)
            .iter()
            .zip(b.bitmap(first, count))
            .map(|(x, y)| u64::from((x & y).count_ones()))
            .sum::<u64>();
        first += count;
    }
    n
}
