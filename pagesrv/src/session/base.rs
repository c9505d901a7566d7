//! What a session sends on the bulk connection before the push so that less crosses the
//! wire — the guest's free pages as zero ranges, and, for a destination that holds a base
//! image (an older copy of this VM, or its template), the hashes of the pages not sent yet
//! (it places those its base holds and says which) — and the `Sync` it then waits for
//! (everything sent so far applied; precopy also waits for one before the pause).

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::framed::{FrameEncoder, FrameReader, ReadError};
use common::wire::phase::{Phase, SourceBulk};
use common::wire::{MAX_PAYLOAD_BYTES, Message, PAGE_HASH_BYTES, PageRange};
use tracing::info;

use super::Session;
use super::errors::BulkError;
use crate::source::Piece;

/// Pages hashed per `PageHashes` frame (1 MiB of hashes).
const HASH_RUN_PAGES: u64 = (1 << 20) / PAGE_HASH_BYTES as u64;

impl Session<'_> {
    /// Sends the free pages (`--free-pages`) not sent yet as zero ranges, before anything
    /// else: a fault on one is then resolved at the destination without a request.
    ///
    /// # Errors
    /// The bulk connection failed.
    pub(super) fn send_free_pages(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
    ) -> Result<(), BulkError> {
        let total = self.source.total_pages();
        let mut page = 0;
        while page < total {
            if !self.source.is_free(page) || self.sent.is_set(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < total && self.source.is_free(page) && !self.sent.is_set(page) {
                page += 1;
            }
            let range = PageRange {
                first,
                count: page - first,
            };
            tx.write_frame(conn, &Message::ZeroRun(range), &[])
                .map_err(BulkError::writing("send free pages"))?;
            let newly = self.sent.set_range(range.first, range.count);
            self.sent_zero.set_range(range.first, range.count);
            self.stats.free_pages.fetch_add(newly, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Offers the hash of every data page not sent yet, then waits until the destination
    /// placed those its base image holds; they count as sent (never pushed). Returns how
    /// many.
    ///
    /// # Errors
    /// As [`Session::sync`].
    pub(super) fn offer_hashes(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        rx: &mut FrameReader,
    ) -> Result<u64, BulkError> {
        let started = Instant::now();
        let (total, page_size) = (self.source.total_pages(), self.source.page_size() as usize);
        let run_pages = HASH_RUN_PAGES.min((MAX_PAYLOAD_BYTES / PAGE_HASH_BYTES) as u64);
        // A running source (precopy): track its writes from before the pages are read, so a
        // page written after it was hashed is dropped at the destination and sent again.
        let engine = (self.switch.first)
            .then_some(self.switch.engine.as_deref())
            .flatten()
            .filter(|e| !e.switched());
        if let Some(engine) = engine
            && !engine.snapshot().tracking
        {
            self.collect_dirty(engine)?;
        }
        let (mut pieces, mut hashes) = (Vec::new(), Vec::new());
        let mut offered = 0;
        for (first, count) in self.sent.clear_runs(0, total) {
            let mut at = first;
            while at < first + count && !self.is_stopped() {
                let n = (first + count - at).min(run_pages);
                if let Some(engine) = engine {
                    // Cleared before the pages are read: a racing write is in the next bitmap.
                    engine.sending(at, n);
                }
                pieces.clear();
                self.source.classify(at, n, &mut pieces);
                // Zero pages are offered as zero hashes (nothing): they cost nothing to send.
                hashes.clear();
                hashes.resize(n as usize * PAGE_HASH_BYTES, 0);
                let mut data_pages = 0;
                for piece in &pieces {
                    let Piece::Data { first, count } = *piece else {
                        continue;
                    };
                    let slots = hashes[(first - at) as usize * PAGE_HASH_BYTES..]
                        .chunks_exact_mut(PAGE_HASH_BYTES);
                    let bytes = self.source.bytes(first, count);
                    for (slot, page) in slots.zip(bytes.chunks(page_size)) {
                        slot.copy_from_slice(&common::digest::page_hash(self.id, page));
                    }
                    data_pages += count;
                }
                if data_pages > 0 {
                    let range = PageRange {
                        first: at,
                        count: n,
                    };
                    tx.write_frame(conn, &Message::PageHashes(range), &hashes)
                        .map_err(BulkError::writing("send page hashes"))?;
                    self.stats
                        .bytes_sent
                        .fetch_add(hashes.len() as u64, Ordering::Relaxed);
                    offered += data_pages;
                }
                at += n;
            }
        }
        let mut held = 0;
        self.sync(conn, tx, rx, &mut |range, bitmap| {
            held += self.sent.set_from_bitmap(range.first, range.count, bitmap);
        })?;
        self.stats.base_pages.fetch_add(held, Ordering::Relaxed);
        info!(
            offered,
            held,
            ms = started.elapsed().as_millis() as u64,
            "the destination's base image holds pages: they are not sent"
        );
        Ok(held)
    }

    /// Returns once the destination applied everything sent so far (`Sync`, `Synced`),
    /// handing `on_map` each map of pages its base image holds that arrives meanwhile.
    ///
    /// # Errors
    /// The bulk connection failed, went silent for the link timeout, or the destination
    /// broke the protocol or reported an error.
    pub(super) fn sync(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        rx: &mut FrameReader,
        on_map: &mut dyn FnMut(PageRange, &[u8]),
    ) -> Result<(), BulkError> {
        let liveness = self.config.liveness;
        tx.write_frame(conn, &Message::Sync, &[])
            .and_then(|()| conn.set_read_timeout(Some(liveness.heartbeat)))
            .map_err(BulkError::writing("send a sync"))?;
        let mut phase = SourceBulk::Open;
        let mut heard = Instant::now();
        loop {
            let (message, payload) = match rx.read_frame(conn) {
                Ok(frame) => frame,
                Err(ReadError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if self.is_stopped() {
                        return Err(BulkError::Stopped);
                    }
                    if heard.elapsed() > liveness.timeout {
                        return Err(BulkError::Silent {
                            seconds: heard.elapsed().as_secs_f64(),
                        });
                    }
                    // It is busy applying; keep the link alive meanwhile.
                    tx.write_frame(conn, &Message::Heartbeat, &[])
                        .map_err(BulkError::writing("send a heartbeat"))?;
                    continue;
                }
                Err(e) => return Err(BulkError::Read(e)),
            };
            heard = Instant::now();
            phase.receive(message.kind()).map_err(BulkError::Protocol)?;
            match message {
                Message::DoneMap(range) => on_map(range, rx.payload(payload)),
                Message::Synced => {
                    if let Some(engine) = &self.switch.engine {
                        engine.stale().confirmed();
                    }
                    return conn
                        .set_read_timeout(None)
                        .map_err(BulkError::writing("set up the socket"));
                }
                Message::Error { code, text } => {
                    let text = common::wire::printable(&text);
                    return Err(BulkError::Destination { code, text });
                }
                _ => {}
            }
        }
    }
}
