//! One destination session: the urgent thread answers requests (and watches the link's
//! liveness), the bulk thread pushes every page the destination has not got, and both count
//! what they send.
//!
//! The two connections are separate sockets, so a requested page never waits behind bulk
//! bytes; the bulk connection has a bounded send buffer so pre-paging decisions take effect
//! quickly. The urgent conversation follows [`SourceUrgent`]: maps, then requests, then the
//! verdict. A session ends `Completed` only on a `Goodbye` once every page was sent or
//! declared held or skipped by the destination; an `Error` from the destination
//! (`VerifyFailed`, `DestinationFailed`) or a premature `Goodbye` is `Failed`: the source
//! must keep the VM. A silent or broken link is `Aborted`: the destination reconnects.

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::framed::{FrameEncoder, FrameReader, ReadError};
use common::netopt::Liveness;
use common::pagemap::PageMap;
use common::pi_mutex::PiMutex;
use common::wire::{
    Decoder, ErrorCode, MAX_PAYLOAD_BYTES, Message, PageRange, RANGE_FRAME_BYTES, VmName,
};
use common::working_set::WorkingSet;
use tracing::{debug, info, warn};

use crate::precopy::Precopy;
use crate::prepage::{Policy, Prepager};
use crate::push_order::PushScheduler;
use crate::source::{Paged, Piece};

mod base;
mod bulk_plan;
mod errors;
mod rounds;
mod streams;
mod urgent;

use bulk_plan::{BulkPlan, BulkStep};
pub use errors::BulkError;
use urgent::{UrgentAction, UrgentCore};

/// Pages hashed between two looks at the link while computing digests (32 MiB of 4 KiB
/// pages: a few milliseconds).
const DIGEST_RUN_PAGES: u64 = 8192;

/// Most bytes pre-paged after one request (2048 pages of 4 KiB; 2 MiB pages are capped
/// at 4).
const PREPAGE_MAX_BYTES: u64 = 8 << 20;
/// Most runs gathered into one write of the push.
const MAX_RUNS_PER_WRITE: usize = 256;
/// Longest sleep of the pusher between requests without the background push.
const PREPAGE_IDLE_WAIT: Duration = Duration::from_millis(50);
/// Pages the adaptive pre-pager pushes after a request that follows no pattern.
const PREPAGE_MIN_PAGES: u64 = 8;

/// Pages per bulk frame: 512 KiB of 4 KiB pages, or one 2 MiB page.
const BULK_RUN_BYTES: u64 = 512 << 10;

/// Counters of one session, updated by both threads.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Pages named in urgent requests.
    pub requested_pages: AtomicU64,
    /// Data pages sent on the urgent connection.
    pub urgent_data_pages: AtomicU64,
    /// Zero pages answered on the urgent connection.
    pub urgent_zero_pages: AtomicU64,
    /// Data pages pushed on the bulk connection.
    pub pushed_data_pages: AtomicU64,
    /// Zero pages pushed (as ranges, no payload) on the bulk connection.
    pub pushed_zero_pages: AtomicU64,
    /// Pages the destination said it no longer needs (removed before they arrived).
    pub skipped_pages: AtomicU64,
    /// Pages the destination already held when the session began (after a reconnect).
    pub held_pages: AtomicU64,
    /// Bytes written to both connections.
    pub bytes_sent: AtomicU64,
    /// Pages sent in precopy rounds (before the switch).
    pub precopy_pages: AtomicU64,
    /// Pages the destination was told to drop (written after they were sent).
    pub discarded_pages: AtomicU64,
    /// Pages the destination's base image held (placed from it, never sent).
    pub base_pages: AtomicU64,
    /// Pages the guest holds free (hinted), sent as zero ranges before anything else.
    pub free_pages: AtomicU64,
    /// Pages pushed on extra bulk connections (`faultd --streams`).
    pub extra_stream_pages: AtomicU64,
    /// Pages pushed first from the recorded working set, as of the pusher's last pick.
    pub prefetched_pages: AtomicU64,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination verified every page and said goodbye: the source's job is done.
    Completed,
    /// The destination failed or its pages differ from the source: keep the source VM.
    Failed(String),
    /// The session broke off (or was replaced by a reconnect); the text says why.
    Aborted(String),
}

/// Tuning of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most pages pre-paged after an urgent request (every time, with the fixed policy).
    pub prepage_window_pages: u64,
    /// Fixed or adaptive pre-paging.
    pub prepage: Policy,
    /// Whether to push in the background at all (off: pure demand paging).
    pub push: bool,
    /// Test-only fault injection: send this page with one byte flipped.
    pub corrupt_page: Option<u64>,
    /// Benchmark baseline: push on the urgent connection (replies queue behind bulk).
    pub naive_single_connection: bool,
    /// Heartbeats and the link timeout.
    pub liveness: Liveness,
    /// CPU pinning of the urgent and push threads, busy-polling of the urgent thread.
    pub fast_path: common::sched::FastPath,
    /// A recorded working set of this image (`--prefetch`): pushed first.
    pub prefetch: Option<Arc<WorkingSet>>,
}

/// What a session does before postcopy.
#[derive(Debug, Clone, Default)]
pub struct Switch {
    /// The precopy engine, when the source VM was handed over running (`--vmm-uds`).
    pub engine: Option<Arc<Precopy>>,
    /// The destination was welcomed with `FLAG_PRECOPY`: precopy rounds (or the discards it
    /// missed) and `Switchover` come first on the bulk connection.
    pub first: bool,
    /// The destination holds a base image (`FLAG_BASE`): page hashes go before anything
    /// else on the bulk connection.
    pub base: bool,
    /// Welcomed with `FLAG_FREE`: the free pages, then a `Sync`, open the bulk connection.
    pub free_first: bool,
}

/// State shared by the session's threads.
pub struct Session<'a> {
    source: Paged<'a>,
    /// The VM served.
    pub vm: VmName,
    /// The session's id (kept across a takeover).
    pub id: u64,
    /// Pages sent, or held or skipped by the destination.
    sent: PageMap,
    /// Pages last sent as zero (a zero range): the destination holds zeros there. Kept only
    /// with the precopy engine (its pause reads it).
    sent_zero: PageMap,
    /// Pages the destination will never need (removed before they arrived): left out of the
    /// digests.
    skipped: PageMap,
    /// Clones of the session's sockets, shut down by [`Session::abort`].
    sockets: Mutex<Vec<TcpStream>>,
    /// Set once the destination was sent the digests (it verifies every page).
    digests_sent: AtomicBool,
    /// Precopy, if any.
    switch: Switch,
    /// Where the session's events go (the control socket's clients).
    events: std::sync::Arc<dyn EventSink>,
    /// Priority-inheriting: the urgent thread (SCHED_FIFO) takes it after each reply.
    push_order: PiMutex<PushScheduler>,
    stop: AtomicBool,
    /// Held while writing a batch of frames (the naive baseline shares one socket).
    urgent_tx: Mutex<FrameEncoder>,
    /// Set when the destination's done map is complete; the pusher waits for it.
    push_ready: (Mutex<bool>, Condvar),
    /// Requests answered, for the pusher without the background push to sleep on.
    request_count: (Mutex<u64>, Condvar),
    /// Set when the first bulk connection begins the push (after maps, free pages, hashes
    /// and precopy): extra streams wait for it.
    pushing: (Mutex<bool>, Condvar),
    /// Bulk connections of the session so far (at most [`MAX_STREAMS`]).
    streams: std::sync::atomic::AtomicU32,
    /// Counters, read by the progress reporter.
    pub stats: SessionStats,
    config: SessionConfig,
    started: Instant,
}

/// Where a session's events go (for orchestrators: precopy rounds, the switch); a narrow
/// seam, so the session knows nothing of the control socket or the metrics.
pub trait EventSink: Send + Sync {
    /// An event that passes.
    fn emit(&self, event: serde_json::Value);
    /// An event that marks a state: clients that come later get it too.
    fn emit_sticky(&self, event: serde_json::Value);
}

impl<'a> Session<'a> {
    /// A new session over `source`, VM `vm`'s memory, with session id `id`.
    pub fn new(
        source: Paged<'a>,
        (vm, id): (VmName, u64),
        config: SessionConfig,
        switch: Switch,
        events: std::sync::Arc<dyn EventSink>,
    ) -> Self {
        Session {
            source,
            vm,
            id,
            sent: PageMap::new(source.total_pages()),
            sent_zero: PageMap::new(source.total_pages()),
            skipped: PageMap::new(source.total_pages()),
            sockets: Mutex::new(Vec::new()),
            digests_sent: AtomicBool::new(false),
            switch,
            events,
            push_order: PiMutex::new(PushScheduler::new(
                Prepager::new(
                    config.prepage,
                    PREPAGE_MIN_PAGES,
                    config
                        .prepage_window_pages
                        .min((PREPAGE_MAX_BYTES / source.page_size()).max(1)),
                ),
                prefetch_for(config.prefetch.as_ref(), source.page_size()),
            )),
            stop: AtomicBool::new(false),
            push_ready: (Mutex::new(false), Condvar::new()),
            request_count: (Mutex::new(0), Condvar::new()),
            pushing: (Mutex::new(false), Condvar::new()),
            streams: std::sync::atomic::AtomicU32::new(1),
            urgent_tx: Mutex::new(FrameEncoder::plain()),
            stats: SessionStats::default(),
            config,
            started: Instant::now(),
        }
    }

    /// Pages pushed first from the recorded working set (`--prefetch`): as of the pusher's
    /// last pick (read without the push-order lock the urgent thread takes).
    pub fn prefetched_pages(&self) -> u64 {
        self.stats.prefetched_pages.load(Ordering::Relaxed)
    }

    /// Pages sent or no longer needed, for progress.
    pub fn pages_settled(&self) -> u64 {
        self.sent.set_pages()
    }

    /// Pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.source.total_pages()
    }

    /// Time since the session began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether the destination was sent the digests (so a `Goodbye` means it verified).
    pub fn verified(&self) -> bool {
        self.digests_sent.load(Ordering::Acquire)
    }

    /// True once either thread has ended the session.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the session at once (a reconnect replaces it): both threads stop, both sockets
    /// are shut down.
    pub fn abort(&self) {
        self.stop.store(true, Ordering::Release);
        self.push_ready.1.notify_all();
        self.pushing.1.notify_all();
        for sock in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }

    /// Runs the session on its two connections until the destination's verdict or a
    /// connection fails. `reader` holds anything already read from `urgent`; `bulk` is the
    /// bulk connection with its reader and encoder.
    pub fn run(
        &self,
        urgent: TcpStream,
        reader: FrameReader,
        urgent_tx: FrameEncoder,
        (bulk, bulk_rx, bulk_tx): (TcpStream, FrameReader, FrameEncoder),
    ) -> Outcome {
        *self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner()) = urgent_tx;
        {
            let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
            sockets.extend(urgent.try_clone().ok());
            sockets.extend(bulk.try_clone().ok());
        }
        if self.is_stopped() {
            return Outcome::Aborted("replaced before it started".into());
        }
        std::thread::scope(|s| {
            // The naive baseline pushes on the urgent connection, so replies queue behind
            // bulk bytes (what the separate urgent path avoids).
            let push_conn = if self.config.naive_single_connection {
                urgent.try_clone().ok()
            } else {
                None
            };
            let pusher = s.spawn(move || {
                self.config.fast_path.enter_bulk_thread();
                let pushed = self.push_background(bulk, (bulk_rx, bulk_tx), push_conn);
                if pushed.is_err() {
                    // The session cannot go on without its bulk connection: end it now (the
                    // destination reconnects) rather than serve requests until a timeout.
                    self.abort();
                }
                pushed
            });
            // Requests preempt the pusher the moment they arrive.
            for failed in self.config.fast_path.enter_latency_thread() {
                debug!(what = %failed, "urgent thread placement");
            }
            let outcome = self.serve_urgent(urgent, reader);
            self.config.fast_path.enter_bulk_thread();
            self.abort();
            let push_result = pusher.join().unwrap_or(Err(BulkError::Panicked));
            let vmm_failure = self.switch.engine.as_ref().and_then(|e| e.failure());
            match (outcome, push_result) {
                (_, Err(_)) if vmm_failure.is_some() => {
                    Outcome::Failed(vmm_failure.expect("checked"))
                }
                (Outcome::Aborted(why), Err(bulk_why)) => {
                    Outcome::Aborted(format!("{why}; bulk: {bulk_why}"))
                }
                (outcome, _) => outcome,
            }
        })
    }

    fn serve_urgent(&self, mut conn: TcpStream, mut reader: FrameReader) -> Outcome {
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
            if !self.source.file().pages_intact()
                || last_source_check.elapsed() >= liveness.heartbeat
            {
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
                if !self.source.file().pages_intact() {
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
        let e = self.source.file().check_intact().err()?;
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

    /// The digest of every chunk of `chunk_pages` pages of the memory file, little-endian;
    /// pages the destination skipped count as zero (they are not verified). Hashing a large
    /// guest takes seconds: between runs of [`DIGEST_RUN_PAGES`] it sends heartbeats on
    /// `conn` (the link stays alive) and stops if the session ended.
    fn digests(&self, conn: &mut TcpStream, chunk_pages: u64) -> std::io::Result<Vec<u8>> {
        let total = self.source.total_pages();
        let page_size = self.source.page_size() as usize;
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
                    let bytes = self.source.bytes(p, 1);
                    digest = digest.wrapping_add(common::digest::run_digest(p, bytes, page_size));
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
            engine.pending.clear_range(range.first, range.count);
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

    /// Sends pieces as ZeroRun/PageRun frames, batched into few writes; returns (zero
    /// pages, data pages).
    fn send_pieces(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        pieces: &[Piece],
    ) -> std::io::Result<(u64, u64)> {
        let page_size = self.source.page_size();
        let max_pages = (MAX_PAYLOAD_BYTES as u64 / page_size).max(1);
        let (mut zero, mut data) = (0, 0);
        let corrupted = self.corrupted_copy(pieces);
        // Only the precopy pause reads which pages went as zero.
        let track_zero = self.switch.engine.is_some();
        let mut frames: Vec<(Message, &[u8])> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match *piece {
                Piece::Zero { first, count } => {
                    frames.push((Message::ZeroRun(PageRange { first, count }), &[]));
                    if track_zero {
                        self.sent_zero.set_range(first, count);
                    }
                    zero += count;
                }
                Piece::Data { first, count } => {
                    if track_zero {
                        self.sent_zero.clear_range(first, count);
                    }
                    let mut at = first;
                    while at < first + count {
                        let n = (first + count - at).min(max_pages);
                        let range = PageRange {
                            first: at,
                            count: n,
                        };
                        let bytes = match &corrupted {
                            Some((page, copy)) if (at..at + n).contains(page) => {
                                // Send the corrupt page on its own (test-only path).
                                let before = page - at;
                                if before > 0 {
                                    let r = PageRange {
                                        first: at,
                                        count: before,
                                    };
                                    frames
                                        .push((Message::PageRun(r), self.source.bytes(at, before)));
                                }
                                frames.push((
                                    Message::PageRun(PageRange {
                                        first: *page,
                                        count: 1,
                                    }),
                                    copy,
                                ));
                                at = page + 1;
                                continue;
                            }
                            _ => self.source.bytes(at, n),
                        };
                        frames.push((Message::PageRun(range), bytes));
                        at += n;
                    }
                    data += count;
                }
            }
        }
        if !self.source.file().pages_intact() {
            // A read went past the end of a shrunk file: the pieces may be wrong.
            return Err(std::io::Error::other(
                "the memory file shrank while it was read",
            ));
        }
        tx.write_frames(conn, &frames)?;
        let bytes: usize = frames
            .iter()
            .map(|(_, p)| RANGE_FRAME_BYTES + p.len())
            .sum();
        self.stats
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok((zero, data))
    }

    /// With fault injection on and the chosen page among `pieces`' data: that page's bytes
    /// with the first one flipped.
    fn corrupted_copy(&self, pieces: &[Piece]) -> Option<(u64, Vec<u8>)> {
        let page = self.config.corrupt_page?;
        let inside = pieces.iter().any(|p| matches!(*p, Piece::Data { first, count } if (first..first + count).contains(&page)));
        if !inside {
            return None;
        }
        let mut copy = self.source.bytes(page, 1).to_vec();
        copy[0] ^= 0xFF;
        Some((page, copy))
    }

    /// Pushes runs as the scheduler picks them until every page is sent (or the session
    /// ends). Without the background push (`--no-push`) only pre-paging and the prefetched
    /// working set are pushed: between requests it waits, with heartbeats.
    fn push_runs(
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

    fn push_background(
        &self,
        mut conn: TcpStream,
        (mut rx, mut tx): (FrameReader, FrameEncoder),
        mut push_conn: Option<TcpStream>,
    ) -> Result<(), BulkError> {
        let run_pages = (BULK_RUN_BYTES / self.source.page_size()).max(1);
        for &step in BulkPlan::for_switch(&self.switch).steps() {
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

/// The working set's pages for a session of `page_size` pages (a set recorded with another
/// page size is left out, and said so).
fn prefetch_for(set: Option<&Arc<WorkingSet>>, page_size: u64) -> Vec<u64> {
    match set {
        Some(set) if u64::from(set.page_size) == page_size => set.pages.clone(),
        Some(set) => {
            warn!(
                recorded = set.page_size,
                session = page_size,
                "the --prefetch working set was recorded with another page size: not used"
            );
            Vec::new()
        }
        None => Vec::new(),
    }
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
