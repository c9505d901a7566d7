//! The bulk thread: walks the session's [`BulkPlan`] on the bulk
//! connection and pushes runs as the scheduler picks them.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::framed::{FrameEncoder, FramedConn};
use common::wire::{Decoder, Message};
use tracing::{info, warn};

use super::errors::BulkError;
use super::{BULK_RUN_BYTES, MAX_RUNS_PER_WRITE, PREPAGE_IDLE_WAIT, Session};
use common::source_core::bulk_plan::{BulkPlan, BulkStep};

impl Session<'_> {
    /// Waits until the push may start, with a heartbeat on `conn` every interval; false if
    /// the session ended first.
    fn wait_for_push(&self, conn: &mut TcpStream, tx: &mut FrameEncoder) -> bool {
        let mut ready = self.push_ready.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*ready && !self.is_stopped() {
            let (guard, waited) = self
                .push_ready
                .1
                .wait_timeout(ready, self.config.liveness.heartbeat)
                .unwrap_or_else(|p| p.into_inner());
            ready = guard;
            if waited.timed_out() && !*ready {
                drop(ready);
                if tx.write_frame(conn, &Message::Heartbeat, &[]).is_err() {
                    return false;
                }
                ready = self.push_ready.0.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
        *ready && !self.is_stopped()
    }

    /// Pushes runs as the scheduler picks them until every page is sent (or the session
    /// ends). Without the background push (`--no-push`) only pre-paging and the prefetched
    /// working set are pushed: between requests it waits, with heartbeats.
    pub(super) fn push_runs(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        mut push_conn: Option<&mut TcpStream>,
        run_pages: u64,
    ) -> Result<u64, BulkError> {
        let mut pieces = Vec::new();
        let mut runs = Vec::new();
        let mut last_tx = Instant::now();
        let mut pushed = 0;
        while !self.is_stopped() {
            // Several short runs (a prefetched working set, strided pre-paging) go out in
            // one write: up to `run_pages` pages, picked under the lock, read outside it.
            runs.clear();
            // Only the pusher without the background push sleeps on requests.
            let requests_seen = if self.config.push {
                0
            } else {
                self.requests_seen()
            };
            {
                let mut order = self.push_order.lock();
                let mut pages = 0;
                while pages < run_pages && runs.len() < MAX_RUNS_PER_WRITE {
                    let left = run_pages - pages;
                    let next = if self.config.push {
                        order.next_run(&self.sent, left)
                    } else {
                        order.next_prepaged(&self.sent, left)
                    };
                    let Some((first, count)) = next else {
                        break;
                    };
                    runs.push((first, count));
                    pages += count;
                }
                self.stats
                    .prefetched_pages
                    .store(order.prefetched_pages(), Ordering::Relaxed);
            }
            if runs.is_empty() {
                if self.config.push || self.sent.is_full() {
                    return Ok(pushed);
                }
                if last_tx.elapsed() >= self.config.liveness.heartbeat {
                    tx.write_frame(conn, &Message::Heartbeat, &[])
                        .map_err(BulkError::writing("send a heartbeat"))?;
                    last_tx = Instant::now();
                }
                self.wait_for_request(requests_seen, PREPAGE_IDLE_WAIT);
                continue;
            }
            pieces.clear();
            for &(first, count) in &runs {
                self.source.classify(first, count, &mut pieces);
            }
            let sent = match push_conn.as_deref_mut() {
                // The naive baseline shares the urgent connection (and its encoder).
                Some(urgent) => {
                    let mut urgent_tx = self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner());
                    self.send_pieces(urgent, &mut urgent_tx, &pieces)
                }
                None => self.send_pieces(conn, tx, &pieces),
            };
            let (zero, data) = sent.map_err(BulkError::writing("push pages"))?;
            pushed += zero + data;
            last_tx = Instant::now();
            self.stats
                .pushed_zero_pages
                .fetch_add(zero, Ordering::Relaxed);
            self.stats
                .pushed_data_pages
                .fetch_add(data, Ordering::Relaxed);
        }
        Ok(pushed)
    }

    /// Requests answered so far (the pusher sleeps on it without the background push).
    fn requests_seen(&self) -> u64 {
        *self
            .request_count
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until a request after the `seen`-th arrives (it may give the pre-pager work)
    /// or `limit` passes.
    fn wait_for_request(&self, seen: u64, limit: Duration) {
        let count = self
            .request_count
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = self
            .request_count
            .1
            .wait_timeout_while(count, limit, |c| *c == seen);
    }

    pub(super) fn push_background(
        &self,
        bulk: FramedConn,
        mut push_conn: Option<TcpStream>,
    ) -> Result<(), BulkError> {
        let FramedConn {
            stream: mut conn,
            reader: mut rx,
            mut tx,
        } = bulk;
        let run_pages = (BULK_RUN_BYTES / self.source.page_size()).max(1);
        if let Some(engine) = &self.switch.engine {
            // A new session: discards a cut link may have lost are pending again, before any
            // `Sync` of this session (free pages, hashes) confirms anything.
            engine.stale().session_begins();
        }
        for &step in
            BulkPlan::new(self.switch.free_first, self.switch.base, self.switch.first).steps()
        {
            if self.is_stopped() {
                return Ok(());
            }
            match step {
                // The destination first says what it already holds (after a reconnect).
                BulkStep::AwaitMaps => {
                    if !self.wait_for_push(&mut conn, &mut tx) {
                        return Ok(());
                    }
                    rx.set_decoder(Decoder::session(
                        self.source.page_size(),
                        self.source.total_pages(),
                    ));
                }
                BulkStep::FreePages => self.send_free_pages(&mut conn, &mut tx)?,
                BulkStep::SyncFree | BulkStep::SyncSwitch => {
                    self.sync(&mut conn, &mut tx, &mut rx, &mut |_, _| {})?
                }
                BulkStep::OfferHashes => {
                    self.offer_hashes(&mut conn, &mut tx, &mut rx)?;
                }
                BulkStep::Precopy => {
                    let engine = self.switch.engine.clone().ok_or(BulkError::NoEngine)?;
                    self.run_precopy(&engine, &mut conn, &mut tx, &mut rx)?;
                }
                BulkStep::Push => {
                    *self.pushing.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
                    self.pushing.1.notify_all();
                    self.push_runs(&mut conn, &mut tx, push_conn.as_mut(), run_pages)?;
                }
                BulkStep::BulkDone => {
                    info!(
                        elapsed_ms = self.elapsed().as_millis() as u64,
                        "every page is sent"
                    );
                    tx.write_frame(&mut conn, &Message::BulkDone, &[])
                        .and_then(|()| conn.flush())
                        .map_err(BulkError::writing("send BulkDone"))?;
                }
            }
        }
        // Keep the connection open until the session ends: the destination closes it.
        let mut sink = [0u8; 64];
        loop {
            match std::io::Read::read(&mut conn, &mut sink) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => warn!("ignoring bytes from the destination on the bulk connection"),
            }
        }
    }
}
