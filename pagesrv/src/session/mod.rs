//! One destination session: the urgent thread answers requests (and watches the link's
//! liveness), the bulk thread pushes every page the destination has not got, and both count
//! what they send.
//!
//! The two connections are separate sockets, so a requested page never waits behind bulk
//! bytes; the bulk connection has a bounded send buffer so pre-paging decisions take effect
//! quickly. The urgent conversation follows [`common::wire::phase::SourceUrgent`]: maps, then requests, then the
//! verdict. A session ends `Completed` only on a `Goodbye` once every page was sent or
//! declared held or skipped by the destination; an `Error` from the destination
//! (`VerifyFailed`, `DestinationFailed`) or a premature `Goodbye` is `Failed`: the source
//! must keep the VM. A silent or broken link is `Aborted`: the destination reconnects.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use common::error_chain;
use common::framed::{FrameEncoder, FramedConn};
use common::netopt::Liveness;
use common::pagemap::PageMap;
use common::pi_mutex::PiMutex;
use common::wire::VmName;
use common::working_set::WorkingSet;
use tracing::{debug, warn};

use crate::precopy::Precopy;
use crate::prepage::{Policy, Prepager};
use crate::push_order::PushScheduler;
use crate::source::PageSource;

mod base;
mod bulk_thread;
mod errors;
mod page_frames;
mod rounds;
mod streams;
mod urgent_thread;

pub use common::source_core::Outcome;
pub use errors::BulkError;

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
    /// Pieces sent in patches (huge pages in precopy: what the guest wrote since a page was
    /// sent, written in place at the destination).
    pub patched_pieces: AtomicU64,
    /// Pages the destination's base image held (placed from it, never sent).
    pub base_pages: AtomicU64,
    /// Pages the guest holds free (hinted), sent as zero ranges before anything else.
    pub free_pages: AtomicU64,
    /// Pages pushed on extra bulk connections (`faultd --streams`).
    pub extra_stream_pages: AtomicU64,
    /// Pages pushed first from the recorded working set, as of the pusher's last pick.
    pub prefetched_pages: AtomicU64,
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
    /// Where the pages come from (a memory file today).
    source: Box<dyn PageSource + 'a>,
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
        source: Box<dyn PageSource + 'a>,
        (vm, id): (VmName, u64),
        config: SessionConfig,
        switch: Switch,
        events: std::sync::Arc<dyn EventSink>,
    ) -> Self {
        let (total_pages, page_size) = (source.total_pages(), source.page_size());
        Session {
            source,
            vm,
            id,
            sent: PageMap::new(total_pages),
            sent_zero: PageMap::new(total_pages),
            skipped: PageMap::new(total_pages),
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
                        .min((PREPAGE_MAX_BYTES / page_size).max(1)),
                ),
                prefetch_for(config.prefetch.as_ref(), page_size),
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

    /// The background push starts at `page` and wraps around (see
    /// [`PushScheduler::start_at`]); call before the session runs.
    pub fn start_push_at(&self, page: u64) {
        self.push_order.lock().start_at(page);
    }

    /// The recorded working set is pushed from `at` (0..1) of the way through it on,
    /// wrapping around (see [`PushScheduler::start_prefetch_at`]); call before the session
    /// runs.
    pub fn start_prefetch_at(&self, at: f64) {
        self.push_order.lock().start_prefetch_at(at);
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
    /// connection fails (each with anything already read past its handshake).
    pub fn run(&self, urgent: FramedConn, bulk: FramedConn) -> Outcome {
        let FramedConn {
            stream: urgent,
            reader,
            tx: urgent_tx,
        } = urgent;
        *self.urgent_tx.lock().unwrap_or_else(|p| p.into_inner()) = urgent_tx;
        {
            let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
            sockets.extend(urgent.try_clone().ok());
            sockets.extend(bulk.stream.try_clone().ok());
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
                let pushed = self.push_background(bulk, push_conn);
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
                    Outcome::Aborted(format!("{why}; bulk: {}", error_chain(&bulk_why)))
                }
                (outcome, _) => outcome,
            }
        })
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
