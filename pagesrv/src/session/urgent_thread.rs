//! The urgent thread: reads the destination's frames, lets [`UrgentCore`]
//! decide, and carries the decision out (answers, digests, errors); it also watches the
//! link's liveness and the memory file.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::framed::{FrameReader, ReadError};
use common::wire::{Decoder, ErrorCode, Message, PageRange};
use tracing::debug;

use super::{DIGEST_RUN_PAGES, Outcome, Session, error_chain};
use crate::source::Piece;
use common::source_core::urgent::{self, UrgentAction, UrgentCore};

impl Session<'_> {
    pub(super) fn serve_urgent(&self, mut conn: TcpStream, mut reader: FrameReader) -> Outcome {
        let page_size = self.source.page_size();
        let liveness = self.config.liveness;
        reader.set_decoder(Decoder::session(page_size, self.source.total_pages()));
        let setup = conn
            .set_read_timeout(Some(liveness.heartbeat))
            .and_then(|()| conn.set_write_timeout(Some(liveness.timeout)));
        if let Err(e) = setup {
            return Outcome::Aborted(format!("socket setup failed: {e}"));
        }
        let mut core = UrgentCore::new(page_size, self.source.total_pages());
        let mut pieces = Vec::new();
        let (mut last_rx, mut last_tx) = (Instant::now(), Instant::now());
        let mut last_source_check = Instant::now();
        loop {
            if self.is_stopped() {
                return Outcome::Aborted("replaced by a reconnect of the same session".into());
            }
            if !self.source.pages_intact() || last_source_check.elapsed() >= liveness.heartbeat {
                if let Some(outcome) = self.broken_source(&mut conn) {
                    return outcome;
                }
                last_source_check = Instant::now();
            }
            if last_tx.elapsed() >= liveness.heartbeat {
                if let Err(e) = self.write_urgent(&mut conn, &Message::Heartbeat, &[]) {
                    return Outcome::Aborted(format!("failed to send a heartbeat: {e}"));
                }
                last_tx = Instant::now();
            }
            if !reader.has_partial() {
                // With `--busy-poll-us`: a request soon after the last finds us awake.
                common::sched::spin_until_readable(conn.as_fd(), self.config.fast_path.busy_poll);
            }
            let (message, payload) = match reader.read_frame(&mut conn) {
                Ok(frame) => frame,
                Err(_) if self.is_stopped() => {
                    return Outcome::Aborted("replaced by a reconnect of the same session".into());
                }
                Err(ReadError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if last_rx.elapsed() > liveness.timeout {
                        return Outcome::Aborted(format!(
                            "no frame from the destination for {:.1} s (link timeout)",
                            last_rx.elapsed().as_secs_f64()
                        ));
                    }
                    continue;
                }
                Err(ReadError::Closed { mid_frame }) => {
                    return Outcome::Aborted(format!(
                        "destination closed the urgent connection{}",
                        if mid_frame { " mid-frame" } else { "" }
                    ));
                }
                Err(e @ ReadError::Wire(_)) => {
                    let text = error_chain(&e);
                    self.urgent_error(&mut conn, ErrorCode::Protocol, &text);
                    return Outcome::Aborted(text);
                }
                Err(e) => return Outcome::Aborted(error_chain(&e)),
            };
            last_rx = Instant::now();
            let maps = urgent::Maps {
                sent: &self.sent,
                skipped: &self.skipped,
            };
            let action = core.on_frame(message, reader.payload(payload), maps);
            self.count_urgent(std::mem::take(&mut core.counted));
            let answers = matches!(
                action,
                UrgentAction::Answer(_) | UrgentAction::Digests { .. }
            );
            let step = self.act_on_urgent(&mut conn, action, &mut pieces);
            match step {
                Ok(None) if answers => last_tx = Instant::now(),
                Ok(None) => {}
                Ok(Some(outcome)) => return outcome,
                Err(e) => {
                    return self.broken_source(&mut conn).unwrap_or_else(|| {
                        Outcome::Aborted(format!("failed to answer the destination: {e}"))
                    });
                }
            }
        }
    }

    /// Carries out what the urgent core decided about a frame; `Some` ends the session.
    fn act_on_urgent(
        &self,
        conn: &mut TcpStream,
        action: UrgentAction,
        pieces: &mut Vec<Piece>,
    ) -> std::io::Result<Option<Outcome>> {
        match action {
            UrgentAction::Nothing => {}
            UrgentAction::Answer(range) => self.answer_request(conn, range, pieces)?,
            UrgentAction::StartPush => self.start_push(),
            UrgentAction::Digests { chunk_pages } => {
                // Hashing the whole guest takes seconds: not at real-time priority.
                let digests = {
                    let _ordinary = common::sched::OrdinaryPriority::enter();
                    self.digests(conn, chunk_pages)?
                };
                if !self.source.pages_intact() {
                    return Err(std::io::Error::other(
                        "the memory file shrank while it was read",
                    ));
                }
                self.write_urgent(conn, &Message::Digests { chunk_pages }, &digests)?;
                self.digests_sent.store(true, Ordering::Release);
            }
            UrgentAction::Refuse {
                code,
                text,
                outcome,
            } => {
                self.urgent_error(conn, code, &text);
                return Ok(Some(outcome));
            }
            UrgentAction::End(outcome) => return Ok(Some(outcome)),
        }
        Ok(None)
    }

    /// Adds what the urgent core counted to the session's counters.
    fn count_urgent(&self, counted: urgent::Counted) {
        let stats = &self.stats;
        stats
            .requested_pages
            .fetch_add(counted.requested, Ordering::Relaxed);
        stats
            .skipped_pages
            .fetch_add(counted.skipped, Ordering::Relaxed);
        stats.held_pages.fetch_add(counted.held, Ordering::Relaxed);
    }

    /// `Failed` (and the destination told) if the memory file shrank: what was read from it
    /// cannot be trusted, and its missing pages cannot be served by anyone.
    fn broken_source(&self, conn: &mut TcpStream) -> Option<Outcome> {
        let e = self.source.check_intact().err()?;
        let text = error_chain(&e);
        self.urgent_error(conn, ErrorCode::Internal, &text);
        Some(Outcome::Failed(text))
    }

    /// Writes a frame on the urgent connection, under the write lock (the naive baseline
    /// shares the socket with the pusher).
    fn write_urgent(
        &self,
        conn: &mut TcpStream,
        message: &Message,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut tx = self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.write_frame(conn, message, payload)
    }

    /// Sends an `Error` frame on the urgent connection before giving up on it.
    fn urgent_error(&self, conn: &mut TcpStream, code: ErrorCode, text: &str) {
        let mut tx = self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send_error(conn, code, text);
    }

    /// Lets the pusher start (the destination's done map is complete).
    fn start_push(&self) {
        *self.push_ready.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.push_ready.1.notify_all();
    }

    /// The digest of every chunk of `chunk_pages` pages of the memory file, little-endian;
    /// pages the destination skipped count as zero (they are not verified). Hashing a large
    /// guest takes seconds: between runs of [`DIGEST_RUN_PAGES`] it sends heartbeats on
    /// `conn` (the link stays alive) and stops if the session ended.
    fn digests(&self, conn: &mut TcpStream, chunk_pages: u64) -> std::io::Result<Vec<u8>> {
        let total = self.source.total_pages();
        let mut out = Vec::with_capacity((total.div_ceil(chunk_pages) * 8) as usize);
        let mut last_tx = Instant::now();
        let mut first = 0;
        while first < total {
            let end = first + chunk_pages.min(total - first);
            let mut digest = 0u64;
            let mut page = first;
            while page < end {
                if self.is_stopped() {
                    return Err(std::io::Error::other("the session ended while hashing"));
                }
                if last_tx.elapsed() >= self.config.liveness.heartbeat {
                    self.write_urgent(conn, &Message::Heartbeat, &[])?;
                    last_tx = Instant::now();
                }
                page += self.skipped.set_run(page, end - page);
                let run = self
                    .skipped
                    .clear_run(page, (end - page).min(DIGEST_RUN_PAGES));
                // Free pages (hinted) are zero at the destination: they count as zero.
                for p in (page..page + run).filter(|&p| !self.source.is_free(p)) {
                    digest = digest.wrapping_add(self.source.digest(p));
                }
                page += run;
            }
            out.extend_from_slice(&digest.to_le_bytes());
            first = end;
        }
        Ok(out)
    }

    fn answer_request(
        &self,
        conn: &mut TcpStream,
        range: PageRange,
        pieces: &mut Vec<Piece>,
    ) -> std::io::Result<()> {
        debug!(first = range.first, count = range.count, "urgent request");
        if let Some(engine) = &self.switch.engine {
            // Read now: whatever the guest wrote before is in this answer.
            engine.sending(range.first, range.count);
        }
        self.sent.set_range(range.first, range.count);
        pieces.clear();
        self.source.classify(range.first, range.count, pieces);
        let (zero, data) = {
            let mut tx = self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner());
            self.send_pieces(conn, &mut tx, pieces)?
        };
        self.stats
            .urgent_zero_pages
            .fetch_add(zero, Ordering::Relaxed);
        self.stats
            .urgent_data_pages
            .fetch_add(data, Ordering::Relaxed);
        // After the reply: the pusher holds this lock at times, and a pusher preempted while
        // holding it (many VMs' threads on few CPUs) must not delay the answer.
        let wake_pusher = {
            let mut order = self.push_order.lock();
            order.on_request(range.end(), self.source.total_pages());
            !self.config.push && order.has_prepaging()
        };
        if wake_pusher {
            // Without the background push, the pusher sleeps between requests.
            *self
                .request_count
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner()) += 1;
            self.request_count.1.notify_all();
        }
        Ok(())
    }
}
