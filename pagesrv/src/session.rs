//! One destination session: the urgent thread answers requests, the bulk thread pushes every
//! page the destination has not got, and both count what they send.
//!
//! The two connections are separate sockets, so a requested page never waits behind bulk
//! bytes; the bulk connection has a bounded send buffer so pre-paging decisions take effect
//! quickly.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use common::framed::{FrameReader, ReadError, send_error, write_frame, write_frames};
use common::pagemap::PageMap;
use common::wire::{Decoder, ErrorCode, MAX_PAYLOAD_BYTES, Message, PageRange, RANGE_FRAME_BYTES};
use tracing::{debug, info, warn};

use crate::sched::PushScheduler;
use crate::source::{MemorySource, Piece};

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
    /// Pages the destination said it no longer needs.
    pub skipped_pages: AtomicU64,
    /// Bytes written to both connections.
    pub bytes_sent: AtomicU64,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination said every page is present.
    Completed,
    /// The session broke off; the text says why.
    Aborted(String),
}

/// Tuning of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Pages pre-paged after each urgent request.
    pub prepage_window_pages: u64,
    /// Whether to push in the background at all (off: pure demand paging).
    pub push: bool,
    /// Test-only fault injection: send this page with one byte flipped.
    pub corrupt_page: Option<u64>,
    /// Benchmark baseline: push on the urgent connection (replies queue behind bulk).
    pub naive_single_connection: bool,
}

/// State shared by the session's threads.
pub struct Session<'a> {
    source: &'a MemorySource,
    sent: PageMap,
    sched: Mutex<PushScheduler>,
    stop: AtomicBool,
    /// Held while writing a batch of frames (the naive baseline shares one socket).
    write_lock: Mutex<()>,
    /// Set when the destination's done map is complete; the pusher waits for it.
    push_ready: (Mutex<bool>, Condvar),
    /// Counters, read by the progress reporter.
    pub stats: SessionStats,
    config: SessionConfig,
    started: Instant,
}

impl<'a> Session<'a> {
    /// A new session over `source`.
    pub fn new(source: &'a MemorySource, config: SessionConfig) -> Self {
        Session {
            source,
            sent: PageMap::new(source.total_pages()),
            sched: Mutex::new(PushScheduler::new(config.prepage_window_pages)),
            stop: AtomicBool::new(false),
            push_ready: (Mutex::new(false), Condvar::new()),
            write_lock: Mutex::new(()),
            stats: SessionStats::default(),
            config,
            started: Instant::now(),
        }
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

    /// True once either thread has ended the session.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Runs the session on its two connections until the destination says goodbye or a
    /// connection fails. `reader` holds anything already read from `urgent`.
    pub fn run(&self, urgent: TcpStream, reader: FrameReader, bulk: TcpStream) -> Outcome {
        std::thread::scope(|s| {
            let bulk_for_stop = bulk.try_clone();
            // The naive baseline pushes on the urgent connection, so replies queue behind
            // bulk bytes (what the separate urgent path avoids).
            let push_conn = if self.config.naive_single_connection {
                urgent.try_clone().ok()
            } else {
                None
            };
            let pusher = s.spawn(move || self.push_background(bulk, push_conn));
            // Requests preempt the pusher the moment they arrive.
            if let Err(e) = common::sched::realtime_priority() {
                debug!(error = %e, "urgent thread runs at normal priority");
            }
            let outcome = self.serve_urgent(urgent, reader);
            let _ = common::sched::normal_priority();
            self.stop.store(true, Ordering::Release);
            self.push_ready.1.notify_all();
            if let Ok(b) = bulk_for_stop {
                let _ = b.shutdown(std::net::Shutdown::Both);
            }
            let push_result = pusher
                .join()
                .unwrap_or_else(|_| Err("bulk thread panicked".into()));
            match (outcome, push_result) {
                (Outcome::Completed, _) => Outcome::Completed,
                (Outcome::Aborted(why), Err(bulk_why)) => {
                    Outcome::Aborted(format!("{why}; bulk: {bulk_why}"))
                }
                (aborted, Ok(())) => aborted,
            }
        })
    }

    fn serve_urgent(&self, mut conn: TcpStream, mut reader: FrameReader) -> Outcome {
        let page_size = self.source.page_size();
        reader.set_decoder(Decoder::session(page_size, self.source.total_pages()));
        let mut pieces = Vec::new();
        loop {
            let (message, payload) = match reader.read_frame(&mut conn) {
                Ok(frame) => frame,
                Err(ReadError::Closed { mid_frame }) => {
                    return Outcome::Aborted(format!(
                        "destination closed the urgent connection{}",
                        if mid_frame { " mid-frame" } else { "" }
                    ));
                }
                Err(e @ ReadError::Wire(_)) => {
                    let text = error_chain(&e);
                    send_error(&mut conn, ErrorCode::Protocol, &text);
                    return Outcome::Aborted(text);
                }
                Err(e) => return Outcome::Aborted(error_chain(&e)),
            };
            match message {
                Message::Request(range) => {
                    self.stats
                        .requested_pages
                        .fetch_add(range.count, Ordering::Relaxed);
                    if let Err(e) = self.answer_request(&mut conn, range, &mut pieces) {
                        return Outcome::Aborted(format!("failed to answer a request: {e}"));
                    }
                }
                Message::Skip(range) => {
                    let newly = self.sent.set_range(range.first, range.count);
                    self.stats.skipped_pages.fetch_add(newly, Ordering::Relaxed);
                }
                Message::DoneMap(range) => {
                    let held = self.mark_held(range, reader.payload(payload));
                    self.stats.skipped_pages.fetch_add(held, Ordering::Relaxed);
                }
                Message::MapEnd => self.start_push(),
                Message::DigestQuery { chunk_pages }
                    if self.source.total_pages().div_ceil(chunk_pages) * 8
                        > MAX_PAYLOAD_BYTES as u64 =>
                {
                    let text = format!(
                        "{chunk_pages}-page digest chunks need a reply over the frame limit"
                    );
                    send_error(&mut conn, ErrorCode::Protocol, &text);
                    return Outcome::Aborted(text);
                }
                Message::DigestQuery { chunk_pages } => {
                    let digests = self.digests(chunk_pages);
                    let reply = Message::Digests { chunk_pages };
                    if let Err(e) = write_frame(&mut conn, &reply, &digests) {
                        return Outcome::Aborted(format!("failed to send digests: {e}"));
                    }
                }
                Message::Goodbye => return Outcome::Completed,
                Message::Error { code, text } => {
                    return Outcome::Aborted(format!("destination reported {code:?}: {text}"));
                }
                other => {
                    let text = format!(
                        "unexpected {:?} frame on the urgent connection",
                        other.kind()
                    );
                    return Outcome::Aborted(text);
                }
            }
        }
    }

    /// Marks the pages the destination holds (a bitmap for `range`) as sent; returns how
    /// many were not yet.
    fn mark_held(&self, range: PageRange, bitmap: &[u8]) -> u64 {
        let mut newly = 0;
        let mut run_start = None;
        for i in 0..=range.count {
            let held = i < range.count && bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
            match (held, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(start)) => {
                    newly += self.sent.set_range(range.first + start, i - start);
                    run_start = None;
                }
                _ => {}
            }
        }
        newly
    }

    /// Lets the pusher start (the destination's done map is complete).
    fn start_push(&self) {
        *self.push_ready.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.push_ready.1.notify_all();
    }

    /// Waits until the push may start; false if the session ended first.
    fn wait_for_push(&self) -> bool {
        let mut ready = self.push_ready.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*ready && !self.is_stopped() {
            ready = self
                .push_ready
                .1
                .wait(ready)
                .unwrap_or_else(|p| p.into_inner());
        }
        *ready && !self.is_stopped()
    }

    /// The digest of every chunk of `chunk_pages` pages of the memory file, little-endian.
    fn digests(&self, chunk_pages: u64) -> Vec<u8> {
        let total = self.source.total_pages();
        let page_size = self.source.page_size() as usize;
        let mut out = Vec::with_capacity((total.div_ceil(chunk_pages) * 8) as usize);
        let mut first = 0;
        while first < total {
            let count = chunk_pages.min(total - first);
            let digest =
                common::digest::run_digest(first, self.source.bytes(first, count), page_size);
            out.extend_from_slice(&digest.to_le_bytes());
            first += count;
        }
        out
    }

    fn answer_request(
        &self,
        conn: &mut TcpStream,
        range: PageRange,
        pieces: &mut Vec<Piece>,
    ) -> std::io::Result<()> {
        debug!(first = range.first, count = range.count, "urgent request");
        self.sent.set_range(range.first, range.count);
        self.sched
            .lock()
            .expect("scheduler lock poisoned")
            .on_request(range.end(), self.source.total_pages());
        pieces.clear();
        self.source.classify(range.first, range.count, pieces);
        let (zero, data) = self.send_pieces(conn, pieces)?;
        self.stats
            .urgent_zero_pages
            .fetch_add(zero, Ordering::Relaxed);
        self.stats
            .urgent_data_pages
            .fetch_add(data, Ordering::Relaxed);
        Ok(())
    }

    /// Sends pieces as ZeroRun/PageRun frames, batched into few writes; returns (zero
    /// pages, data pages).
    fn send_pieces(&self, conn: &mut TcpStream, pieces: &[Piece]) -> std::io::Result<(u64, u64)> {
        let page_size = self.source.page_size();
        let max_pages = (MAX_PAYLOAD_BYTES as u64 / page_size).max(1);
        let (mut zero, mut data) = (0, 0);
        let corrupted = self.corrupted_copy(pieces);
        let mut frames: Vec<(Message, &[u8])> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match *piece {
                Piece::Zero { first, count } => {
                    frames.push((Message::ZeroRun(PageRange { first, count }), &[]));
                    zero += count;
                }
                Piece::Data { first, count } => {
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
        {
            // Frames of one batch never interleave with another thread's on a shared socket.
            let _write = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            write_frames(conn, &frames)?;
        }
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

    fn push_background(
        &self,
        mut conn: TcpStream,
        mut push_conn: Option<TcpStream>,
    ) -> Result<(), String> {
        let run_pages = (BULK_RUN_BYTES / self.source.page_size()).max(1);
        let mut pieces = Vec::new();
        // The destination first says what it already holds (after a reconnect).
        if !self.wait_for_push() {
            return Ok(());
        }
        if self.config.push {
            while !self.is_stopped() {
                let next = self
                    .sched
                    .lock()
                    .expect("scheduler lock poisoned")
                    .next_run(&self.sent, run_pages);
                let Some((first, count)) = next else { break };
                pieces.clear();
                self.source.classify(first, count, &mut pieces);
                let out = push_conn.as_mut().unwrap_or(&mut conn);
                let (zero, data) = self
                    .send_pieces(out, &pieces)
                    .map_err(|e| format!("failed to push pages: {e}"))?;
                self.stats
                    .pushed_zero_pages
                    .fetch_add(zero, Ordering::Relaxed);
                self.stats
                    .pushed_data_pages
                    .fetch_add(data, Ordering::Relaxed);
            }
            if self.is_stopped() {
                return Ok(());
            }
            info!(
                elapsed_ms = self.elapsed().as_millis() as u64,
                "background push complete"
            );
        }
        write_frame(&mut conn, &Message::BulkDone, &[])
            .map_err(|e| format!("failed to send BulkDone: {e}"))?;
        conn.flush().map_err(|e| e.to_string())?;
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
