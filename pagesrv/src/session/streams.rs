//! Extra bulk connections of a session (`faultd --streams N`): each takes a share of the
//! background push from the same push order once the first bulk connection has begun it
//! (after the maps, the free pages, the page hashes and any precopy rounds, which only the
//! first carries).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;

use common::framed::{FrameEncoder, FramedConn};
use common::wire::{MAX_STREAMS, Message};
use tracing::warn;

use super::errors::BulkError;
use super::{BULK_RUN_BYTES, Session};

impl Session<'_> {
    /// Counts another bulk connection in; `false` once the session has [`MAX_STREAMS`].
    pub fn admit_stream(&self) -> bool {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .is_ok()
    }

    /// Serves an extra bulk connection (`faultd --streams`): once the first bulk connection
    /// has begun the push, takes a share of it (the same push order, so no page goes twice),
    /// then `BulkDone`; heartbeats while it waits. Any failure aborts the whole session: a
    /// page taken for a connection that broke would otherwise never arrive (the destination
    /// reconnects and says what it holds).
    pub fn push_extra(&self, conn: FramedConn) {
        let FramedConn {
            stream: mut conn,
            mut tx,
            ..
        } = conn;
        // Registered, so the session's end shuts it down (else its last read could wait).
        let Ok(handle) = conn.try_clone() else {
            warn!("cannot keep a handle on an extra bulk connection: not using it");
            return;
        };
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
        self.config.fast_path.enter_bulk_thread();
        if let Err(why) = self.push_extra_stream(&mut conn, &mut tx)
            && !self.is_stopped()
        {
            warn!(why = %super::error_chain(&why), "an extra bulk connection failed: ending the session");
            self.abort();
        }
    }

    fn push_extra_stream(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
    ) -> Result<(), BulkError> {
        let heartbeat = self.config.liveness.heartbeat;
        conn.set_write_timeout(Some(self.config.liveness.timeout))
            .map_err(BulkError::writing("set up the socket"))?;
        let mut pushing = self.pushing.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*pushing && !self.is_stopped() {
            drop(pushing);
            tx.write_frame(conn, &Message::Heartbeat, &[])
                .map_err(BulkError::writing("send a heartbeat"))?;
            pushing = self.pushing.0.lock().unwrap_or_else(|p| p.into_inner());
            pushing = self
                .pushing
                .1
                .wait_timeout(pushing, heartbeat)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(pushing);
        let run_pages = (BULK_RUN_BYTES / self.source.page_size()).max(1);
        let pushed = self.push_runs(conn, tx, None, run_pages)?;
        self.stats
            .extra_stream_pages
            .fetch_add(pushed, Ordering::Relaxed);
        if self.is_stopped() {
            return Ok(());
        }
        tx.write_frame(conn, &Message::BulkDone, &[])
            .map_err(BulkError::writing("send BulkDone"))?;
        conn.flush().map_err(BulkError::writing("send BulkDone"))?;
        // Open until the session ends: the destination closes it.
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(conn, &mut sink), Ok(n) if n > 0) {}
        Ok(())
    }
}
