//! A session's precopy: rounds on the bulk connection while the source runs, the switch, and
//! the catch-up for a destination that missed it (see `crate::precopy`).

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::framed::{FrameEncoder, FrameReader};
use common::pagemap::PageMap;
use common::wire::{MAX_PAYLOAD_BYTES, Message, PageRange};
use serde_json::json;
use tracing::{debug, info, warn};

use super::errors::BulkError;
use super::{BULK_RUN_BYTES, Session};
use crate::precopy::{ConvergedBy, Precopy, Round, Strategy, converged};
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
        let page_size = self.source.page_size();
        // A destination that reconnected may hold pages the guest wrote since they were sent,
        // or pages a discard its last link lost was to drop (sent again since, so no longer
        // pending).
        engine.stale.session_begins();
        let stale = self.discard(conn, tx, engine, Stale::Written)?;
        if stale > 0 {
            info!(
                pages = stale,
                "the destination dropped pages written since it got them"
            );
        }
        if engine.switched() {
            // The source paused already; this destination missed (the end of) the switch.
            return self.finish_switch(engine, conn, tx).map(drop);
        }
        if !engine.snapshot().tracking {
            self.collect_dirty(engine)?;
        }
        let converged_by = loop {
            self.refresh_free_hints(engine)?;
            let round = self.send_round(engine, conn, tx)?;
            let Some(mut round) = round else {
                return Ok(()); // the session ended
            };
            self.collect_dirty(engine)?;
            round.dirty_pages = count_both(engine.stale.pending(), &self.sent);
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
                "round": round.round,
                "pages_sent": round.pages_sent,
                "bytes": round.bytes,
                "seconds": round.seconds,
                "dirty_pages": round.dirty_pages,
                "expected_downtime_ms": round.expected_downtime_ms(page_size),
            }));
            if let Some(by) = converged(&rounds, page_size, engine.max_downtime, engine.is_forced())
            {
                break by;
            }
            // The next round sends them again: drop them at the destination first.
            self.discard(conn, tx, engine, Stale::Written)?;
        };
        self.events
            .emit_sticky(json!({"event": "converged", "by": converged_by}));
        if matches!(
            converged_by,
            ConvergedBy::NoProgress | ConvergedBy::MaxRounds
        ) {
            let left = count_both(engine.stale.pending(), &self.sent);
            warn!(
                ?converged_by,
                pages_left = left,
                "precopy did not converge: the guest writes faster than the link sends; {}",
                match engine.strategy {
                    Strategy::Precopy => "stop-and-copy of what is left (a long downtime)",
                    _ => "postcopy moves what is left",
                }
            );
        }
        let catch_up = Instant::now();
        let dropped_early = if engine.strategy == Strategy::Hybrid {
            // What the guest wrote during the last round is dropped at the destination while
            // the guest still runs: only what it writes from now on waits on the pause.
            self.discard(conn, tx, engine, Stale::Written)?
        } else {
            0
        };
        // The destination applies everything sent so far before the source stops.
        self.sync(conn, tx, rx, &mut |_, _| {})?;
        debug!(
            dropped_early,
            ms = catch_up.elapsed().as_secs_f64() * 1000.0,
            "the destination caught up"
        );
        let paused_at = Instant::now();
        engine.pause().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM did not pause: {e:#}")))
        })?;
        self.source.file().paused();
        let free = engine.free_pages().map_err(|e| {
            BulkError::SourceVmm(engine.fail(format!("the source VMM link failed: {e:#}")))
        })?;
        if let Some(mut free) = free {
            // Served as zero from now on; the destination drops those it holds with old
            // bytes (not those it got as zero ranges).
            let pages = self.source.file().hint_free(&free);
            let zero = self.sent_zero.bitmap(0, self.source.total_pages());
            for (f, z) in free.iter_mut().zip(zero) {
                *f &= !z;
            }
            engine.stale.written(&free);
            self.stats.free_pages.fetch_add(pages, Ordering::Relaxed);
        }
        let pause_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        // From here on the switch is decided: a destination that reconnects before it got
        // all of it gets the rest (the VMM answers nothing more).
        engine.decide_switch(converged_by);
        let stale = self.finish_switch(engine, conn, tx)?;
        info!(
            ?converged_by,
            stale_pages = stale,
            pause_ms,
            pause_to_switch_ms = paused_at.elapsed().as_secs_f64() * 1000.0,
            "the source is paused: switched"
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
        self.source.file().written(&written);
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
            self.source.file().hint_free(&free);
        }
        Ok(())
    }

    /// The source is paused: drops at the destination what went stale after it was sent,
    /// sends what is left first for stop-and-copy, and switches; returns how many pages were
    /// dropped.
    ///
    /// # Errors
    /// The bulk connection failed.
    fn finish_switch(
        &self,
        engine: &Precopy,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
    ) -> Result<u64, BulkError> {
        let stale = self.discard(conn, tx, engine, Stale::AtSwitch)?;
        // Free pages the destination lacks now go as zero before the guest resumes: a fault
        // on one is a local zero fill.
        self.send_free_pages(conn, tx)?;
        if engine.strategy == Strategy::Precopy {
            // Stop-and-copy: the rest now, before the guest resumes.
            self.send_unsent(conn, tx)?;
        }
        // Postcopy pushes what is left from the first page on.
        self.push_order.lock().rewind();
        engine
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pages_stale_at_switch = stale;
        self.switchover(conn, tx)?;
        Ok(stale)
    }

    /// Sends every page not sent yet (a round); `None` if the session ended meanwhile.
    fn send_round(
        &self,
        engine: &Precopy,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
    ) -> Result<Option<Round>, BulkError> {
        let number = engine.snapshot().rounds.len() as u32 + 1;
        let started = Instant::now();
        let bytes_before = self.stats.bytes_sent.load(Ordering::Relaxed);
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
                engine.stale.sending(first, count);
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
        for frame in engine.stale.discards(which, &self.sent) {
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
