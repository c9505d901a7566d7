//! The live link to pagesrv, and getting it back after a cut.
//!
//! ```text
//!   Up(link) ──urgent/bulk fails──► Down ──connector thread: connect with backoff──► Up(link')
//!                                    │  faults keep being read and recorded, REMOVE events
//!                                    │  handled; zero pages still filled locally
//!   opening a link: send the done map (pages already here) + MapEnd, re-send every request
//!   still in flight, start a bulk thread for the new generation
//! ```

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use common::auth::Psk;
use common::framed::{FrameReader, write_frame};
use common::wire::{MAX_PAYLOAD_BYTES, Message, PageRange};
use mio::{Interest, Registry, Token, Waker};
use tracing::{debug, info, warn};

use crate::bulk::{BulkError, receive_pushed_pages};
use crate::upstream::{self, Upstream};
use crate::vm::Vm;

/// Where and how to reach pagesrv again.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// pagesrv's address.
    pub addr: String,
    /// The pre-shared key, if any.
    pub psk: Option<Psk>,
    /// Give up after this long without a link (None: never).
    pub timeout: Option<Duration>,
}

/// What the helper threads report to the main loop (with a wake-up).
pub enum LinkEvent {
    /// A bulk thread ended.
    BulkEnded {
        /// Which link it belonged to.
        generation: u64,
        /// Why.
        result: Result<(), BulkError>,
    },
    /// The connector got a new link, or gave up.
    Connected(Result<Upstream>),
}

/// An open link.
pub struct Link<'scope> {
    /// Requests out, requested pages in (non-blocking, registered with the poll).
    pub urgent: mio::net::TcpStream,
    /// Frames read from `urgent`.
    pub reader: FrameReader,
    /// Which link this is (1 for the first).
    pub generation: u64,
    bulk: TcpStream,
    bulk_thread: ScopedJoinHandle<'scope, ()>,
}

/// Helper-thread plumbing shared by every link.
pub struct Links<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    vm: &'env Vm,
    events_tx: Sender<LinkEvent>,
    /// Events from the bulk and connector threads.
    pub events: Receiver<LinkEvent>,
    waker: Arc<Waker>,
    reconnect: &'env Reconnect,
    connector_stop: Option<Sender<()>>,
    generations: u64,
    /// Links lost so far.
    pub cuts: u64,
}

impl<'scope, 'env> Links<'scope, 'env> {
    /// Plumbing for links of `vm`, waking the main loop through `waker`.
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        vm: &'env Vm,
        waker: Waker,
        reconnect: &'env Reconnect,
    ) -> Self {
        let (events_tx, events) = mpsc::channel();
        Links {
            scope,
            vm,
            events_tx,
            events,
            waker: Arc::new(waker),
            reconnect,
            connector_stop: None,
            generations: 0,
            cuts: 0,
        }
    }

    /// Puts a new connection to use: tells pagesrv which pages are here, re-sends the
    /// requests in flight (`requests`, encoded), registers the urgent connection with `token`
    /// and starts the bulk thread.
    ///
    /// # Errors
    /// Sending the map or requests failed (the caller treats it as a cut).
    pub fn open(
        &mut self,
        up: Upstream,
        requests: &[u8],
        registry: &Registry,
        token: Token,
    ) -> Result<Link<'scope>> {
        let Upstream {
            mut urgent,
            urgent_reader,
            bulk,
            bulk_reader,
            session_id,
        } = up;
        send_done_map(self.vm, &mut urgent).context("failed to send the done map")?;
        std::io::Write::write_all(&mut urgent, requests).context("failed to re-send requests")?;
        urgent.set_nonblocking(true)?;
        let mut urgent = mio::net::TcpStream::from_std(urgent);
        registry.register(&mut urgent, token, Interest::READABLE)?;
        self.generations += 1;
        let generation = self.generations;
        let bulk_handle = bulk
            .try_clone()
            .context("failed to clone the bulk socket")?;
        let (vm, tx, waker) = (self.vm, self.events_tx.clone(), self.waker.clone());
        let bulk_thread = self.scope.spawn(move || {
            let _ = common::sched::normal_priority();
            let result = receive_pushed_pages(vm, bulk, bulk_reader);
            let _ = tx.send(LinkEvent::BulkEnded { generation, result });
            let _ = waker.wake();
        });
        debug!(
            generation,
            session = format_args!("{session_id:016x}"),
            "link open"
        );
        Ok(Link {
            urgent,
            reader: urgent_reader,
            generation,
            bulk: bulk_handle,
            bulk_thread,
        })
    }

    /// Closes a broken link (its bulk thread stops) and starts reconnecting.
    pub fn cut(&mut self, mut link: Link<'scope>, registry: &Registry, why: &anyhow::Error) {
        self.cuts += 1;
        warn!(
            generation = link.generation,
            cuts = self.cuts,
            error = %format!("{why:#}"),
            "lost the link to pagesrv; faults wait while it reconnects"
        );
        let _ = registry.deregister(&mut link.urgent);
        let _ = link.urgent.shutdown(Shutdown::Both);
        let _ = link.bulk.shutdown(Shutdown::Both);
        let _ = link.bulk_thread.join();
        self.restart_connector();
    }

    /// Closes a link at the end (no reconnect).
    pub fn close(&mut self, mut link: Link<'scope>, registry: &Registry) {
        let _ = registry.deregister(&mut link.urgent);
        let _ = link.bulk.shutdown(Shutdown::Both);
        let _ = link.bulk_thread.join();
    }

    /// Stops a running connector (the migration ended).
    pub fn stop_connector(&mut self) {
        self.connector_stop = None;
    }

    /// Starts (or restarts) the connector thread.
    pub fn restart_connector(&mut self) {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        self.connector_stop = Some(stop_tx);
        let (tx, waker, reconnect, vm) = (
            self.events_tx.clone(),
            self.waker.clone(),
            self.reconnect,
            self.vm,
        );
        self.scope.spawn(move || {
            let _ = common::sched::normal_priority();
            if let Some(result) = connect_with_backoff(reconnect, vm, &stop_rx) {
                let _ = tx.send(LinkEvent::Connected(result));
                let _ = waker.wake();
            }
        });
    }
}

/// Tries to reach pagesrv until it answers, a fatal refusal, the timeout, or `stop` (None).
fn connect_with_backoff(
    reconnect: &Reconnect,
    vm: &Vm,
    stop: &Receiver<()>,
) -> Option<Result<Upstream>> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        match upstream::connect(
            &reconnect.addr,
            reconnect.psk.as_ref(),
            vm.page_size() as u32,
            vm.layout.total_pages(),
        ) {
            Ok(up) => {
                info!(
                    attempts,
                    after_ms = started.elapsed().as_millis() as u64,
                    "reconnected to pagesrv"
                );
                return Some(Ok(up));
            }
            Err(e) if e.is_fatal() => {
                return Some(Err(anyhow!(e).context("pagesrv refused to resume")));
            }
            Err(e) => debug!(attempts, error = %e, "reconnect attempt failed"),
        }
        if let Some(limit) = reconnect.timeout
            && started.elapsed() >= limit
        {
            return Some(Err(anyhow!(
                "pagesrv unreachable for {:.1} s (--reconnect-timeout); giving up after {attempts} attempts",
                started.elapsed().as_secs_f64()
            )));
        }
        match stop.recv_timeout(backoff) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Sends a bitmap of the pages already here (skipping empty stretches), then MapEnd.
fn send_done_map(vm: &Vm, urgent: &mut TcpStream) -> std::io::Result<()> {
    let total = vm.layout.total_pages();
    let chunk_pages = (MAX_PAYLOAD_BYTES as u64) * 8;
    let mut first = 0;
    while first < total {
        let count = chunk_pages.min(total - first);
        let bitmap = vm.done.bitmap(first, count);
        if bitmap.iter().any(|&b| b != 0) {
            write_frame(
                urgent,
                &Message::DoneMap(PageRange { first, count }),
                &bitmap,
            )?;
        }
        first += count;
    }
    write_frame(urgent, &Message::MapEnd, &[])
}
