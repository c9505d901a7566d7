//! The live link to pagesrv, and getting it, first and again after a cut.
//!
//! ```text
//!   Down ──connector thread: connect with backoff, handshake, send the maps──► Up(link)
//!     ▲                                                                         │
//!     └──── cut: urgent or bulk failed, or silent for the link timeout ◄────────┘
//!   while Down: faults are read and recorded, REMOVE events handled, zero pages filled
//!   locally; opening a link: the connector sends the done map (pages here) and the skip map
//!   (pages removed before they arrived) + MapEnd, the fault core re-sends every request
//!   still in flight and every skip since the cut, and a bulk thread starts for the link
//! ```
//!
//! A cut never waits for the bulk thread: it sets the thread's stop flag, wakes it if it
//! waits for the event reader, and shuts its socket; the thread ends on its own (the scope
//! joins it at the end). The connector never touches the uffd, and the fault thread never
//! writes a blocking socket.

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use std::io::Write;

use common::framed::FramedConn;
use common::netopt::Liveness;
use common::wire::Message;
use mio::{Interest, Registry, Token, Waker};
use tracing::{debug, info, warn};

use super::bulk::{BulkContext, BulkEnd, BulkError, receive_pushed_pages};
use super::connect::{self, Pins, Target, Upstream};
use crate::core::kernel::Kernel;
use crate::core::reconnect;
use crate::core::session::{LinkState, encode_maps};
use crate::core::vm::Vm;

/// How often the connector says it is still waiting.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(3);

/// Where pagesrv is and how patient to be with it.
#[derive(Debug)]
pub struct LinkConfig {
    /// pagesrv and what to ask it for.
    pub target: Target,
    /// Give up after this long without a link (None: never).
    pub reconnect_timeout: Option<Duration>,
    /// Heartbeats and the link timeout.
    pub liveness: Liveness,
    /// The base image (`--base`): pages pagesrv offers by hash are placed from it.
    pub base: Option<crate::base::BaseImage>,
    /// CPU pinning and busy-polling of the fault thread and the bulk threads.
    pub fast_path: common::sched::FastPath,
}

/// What the helper threads report to the main loop (with a wake-up).
pub enum LinkEvent {
    /// A bulk thread ended.
    BulkEnded {
        /// Which link it belonged to.
        generation: u64,
        /// Why.
        result: Result<BulkEnd, BulkError>,
    },
    /// The connector got a link (maps sent), or gave up for good.
    Connected(Result<Box<Upstream>>),
    /// The source switched from precopy to postcopy (its guest is paused).
    Switched {
        /// Which link said so.
        generation: u64,
    },
    /// A bulk thread answered a `Sync`: everything before it (e.g. the free pages) is in.
    Synced {
        /// Which link.
        generation: u64,
    },
}

/// An open link's sockets (its protocol state is the session's: `core::session::LinkState`).
pub struct Link {
    /// Requests out, requested pages in (non-blocking, registered with the poll).
    pub urgent: mio::net::TcpStream,
    /// Which link this is (1 for the first).
    pub generation: u64,
    /// Whether the poll also waits for `urgent` to become writable.
    pub writable_armed: bool,
    bulk: TcpStream,
    /// Extra bulk connections (`--streams`), shut down with the first.
    extra_bulk: Vec<TcpStream>,
    bulk_stop: Arc<AtomicBool>,
}

impl Link {
    /// Writes `frames` on the urgent connection, blocking up to `timeout` (the last words of
    /// a destination that failed); a failure is logged.
    pub fn send_blocking(&mut self, frames: &[u8], timeout: Duration) {
        let sock = socket2::SockRef::from(&self.urgent);
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(timeout));
        if let Err(e) = self.urgent.write_all(frames) {
            debug!(error = %e, "could not tell pagesrv that this destination failed");
        }
    }
}

/// Helper-thread plumbing shared by every link.
pub struct Links<'scope, 'env, K> {
    scope: &'scope Scope<'scope, 'env>,
    vm: &'env Vm<K>,
    events_tx: Sender<LinkEvent>,
    /// Events from the bulk and connector threads.
    pub events: Receiver<LinkEvent>,
    waker: Arc<Waker>,
    config: &'env LinkConfig,
    connector_stop: Option<Sender<()>>,
    generations: u64,
    /// Links lost so far.
    pub cuts: u64,
    /// The session and image the next connection resumes.
    pub pins: Pins,
    /// Tells the VMM the guest may resume; called by the bulk thread that got `Switchover`,
    /// the moment it did (no hand-off to the main loop first).
    announce_switch: SwitchAnnouncer<'env>,
    /// Set once the VMM was told: from then on every connection says the guest resumed.
    switch_announced: Arc<AtomicBool>,
    /// Bulk threads still running: a new link waits for the old one's to end, so nothing
    /// it read before the cut lands after the new link's maps.
    bulk_threads: Arc<AtomicUsize>,
}

/// Says that the guest may resume.
pub type SwitchAnnouncer<'env> = Arc<dyn Fn() + Send + Sync + 'env>;

impl<'scope, 'env, K: Kernel> Links<'scope, 'env, K> {
    /// Plumbing for links of `vm`, waking the main loop through `waker`.
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        vm: &'env Vm<K>,
        waker: Waker,
        config: &'env LinkConfig,
        announce_switch: SwitchAnnouncer<'env>,
    ) -> Self {
        let (events_tx, events) = mpsc::channel();
        Links {
            scope,
            vm,
            events_tx,
            events,
            waker: Arc::new(waker),
            config,
            connector_stop: None,
            generations: 0,
            cuts: 0,
            pins: Pins::default(),
            announce_switch,
            switch_announced: Arc::new(AtomicBool::new(false)),
            bulk_threads: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Puts a connected session to use: registers the urgent connection with `token` and
    /// starts the bulk thread; returns the sockets and the urgent connection's protocol
    /// state (for the session).
    ///
    /// # Errors
    /// Registering the socket failed.
    pub fn open(
        &mut self,
        up: Box<Upstream>,
        registry: &Registry,
        token: Token,
    ) -> Result<(Link, LinkState)> {
        let Upstream {
            urgent:
                FramedConn {
                    stream: urgent,
                    reader: urgent_reader,
                    tx: urgent_tx,
                },
            bulk,
            extra_bulk,
            pins,
            precopy,
            free_first,
        } = *up;
        self.pins = pins.clone();
        urgent.set_nonblocking(true)?;
        let mut urgent = mio::net::TcpStream::from_std(urgent);
        registry.register(&mut urgent, token, Interest::READABLE)?;
        self.generations += 1;
        let generation = self.generations;
        let bulk_handle = bulk
            .stream
            .try_clone()
            .context("failed to clone the bulk socket")?;
        let bulk_stop = Arc::new(AtomicBool::new(false));
        let (vm, tx, waker, stop) = (
            self.vm,
            self.events_tx.clone(),
            self.waker.clone(),
            bulk_stop.clone(),
        );
        let silence = self.config.liveness.timeout;
        let (announce_switch, announced) =
            (self.announce_switch.clone(), self.switch_announced.clone());
        let bulk_threads = self.bulk_threads.clone();
        bulk_threads.fetch_add(1, Ordering::AcqRel);
        let (base, session_id) = (self.config.base.as_ref(), pins.session_id);
        let fast_path = &self.config.fast_path;
        self.scope.spawn(move || {
            fast_path.enter_bulk_thread();
            let on_switchover = || {
                if !announced.swap(true, Ordering::AcqRel) {
                    announce_switch();
                }
                let _ = tx.send(LinkEvent::Switched { generation });
                let _ = waker.wake();
            };
            let on_sync = || {
                let _ = tx.send(LinkEvent::Synced { generation });
                let _ = waker.wake();
            };
            let cx = BulkContext {
                stop: &stop,
                silence,
                precopy,
                on_switchover: &on_switchover,
                on_sync: &on_sync,
                base: base.map(|b| (b, session_id)),
            };
            let result = receive_pushed_pages(vm, bulk, &cx);
            let _ = tx.send(LinkEvent::BulkEnded { generation, result });
            let _ = waker.wake();
            bulk_threads.fetch_sub(1, Ordering::AcqRel);
        });
        // Extra streams: pushed pages only, under the same stop flag and generation (one
        // failing cuts the link, as the first one's does).
        let extra_handles = extra_bulk
            .iter()
            .map(|conn| conn.stream.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .context("failed to clone an extra bulk socket")?;
        for conn in extra_bulk {
            let (vm, events, waker, stop) = (
                self.vm,
                self.events_tx.clone(),
                self.waker.clone(),
                bulk_stop.clone(),
            );
            let bulk_threads = self.bulk_threads.clone();
            bulk_threads.fetch_add(1, Ordering::AcqRel);
            let fast_path = &self.config.fast_path;
            self.scope.spawn(move || {
                fast_path.enter_bulk_thread();
                let cx = BulkContext {
                    stop: &stop,
                    silence,
                    precopy: false,
                    on_switchover: &|| {},
                    on_sync: &|| {},
                    base: None,
                };
                let result = receive_pushed_pages(vm, conn, &cx);
                let _ = events.send(LinkEvent::BulkEnded { generation, result });
                let _ = waker.wake();
                bulk_threads.fetch_sub(1, Ordering::AcqRel);
            });
        }
        debug!(
            generation,
            session = format_args!("{:016x}", pins.session_id),
            image = format_args!("{:016x}", pins.image_id),
            streams = 1 + extra_handles.len(),
            "link open"
        );
        let state = LinkState::new(
            generation,
            urgent_reader,
            urgent_tx,
            precopy,
            free_first,
            Instant::now(),
        );
        let link = Link {
            urgent,
            generation,
            writable_armed: false,
            bulk: bulk_handle,
            extra_bulk: extra_handles,
            bulk_stop,
        };
        Ok((link, state))
    }

    /// Drops a broken link (its bulk thread stops on its own) and starts reconnecting.
    pub fn cut(&mut self, link: Link, registry: &Registry, why: &str) {
        self.cuts += 1;
        warn!(
            generation = link.generation,
            cuts = self.cuts,
            error = %why,
            "lost the link to pagesrv; faults wait while it reconnects"
        );
        self.close(link, registry);
        self.start_connector();
    }

    /// Closes a link without reconnecting: the bulk thread is told to stop (and woken if it
    /// waits for the event reader); nothing here waits for it.
    pub fn close(&mut self, mut link: Link, registry: &Registry) {
        let _ = registry.deregister(&mut link.urgent);
        let _ = link.urgent.shutdown(Shutdown::Both);
        link.bulk_stop.store(true, Ordering::Release);
        self.vm.wake_waiting_placements();
        let _ = link.bulk.shutdown(Shutdown::Both);
        for extra in &link.extra_bulk {
            let _ = extra.shutdown(Shutdown::Both);
        }
    }

    /// Whether the VMM was told that its guest may resume.
    pub fn switch_announced(&self) -> bool {
        self.switch_announced.load(Ordering::Acquire)
    }

    /// Stops a running connector.
    pub fn stop_connector(&mut self) {
        self.connector_stop = None;
    }

    /// Starts (or restarts) the connector thread.
    pub fn start_connector(&mut self) {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        self.connector_stop = Some(stop_tx);
        let (tx, waker, config, vm) = (
            self.events_tx.clone(),
            self.waker.clone(),
            self.config,
            self.vm,
        );
        let (mut pins, first_contact) = (self.pins.clone(), self.generations == 0);
        let (announced, bulk_threads) = (self.switch_announced.clone(), self.bulk_threads.clone());
        self.scope.spawn(move || {
            config.fast_path.enter_bulk_thread();
            // The old link's bulk thread was told to stop; whatever it still applies (a
            // switch, a discard) must come before the maps the new link sends.
            while !reconnect::may_open(bulk_threads.load(Ordering::Acquire)) {
                if stop_rx.try_recv() != Err(mpsc::TryRecvError::Empty) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // Once the guest was told to resume, the source must not run precopy with us again.
            pins.resumed = reconnect::resumed(pins.resumed, announced.load(Ordering::Acquire));
            if let Some(result) =
                connect_with_backoff(config, vm, &mut pins, first_contact, &stop_rx)
            {
                let _ = tx.send(LinkEvent::Connected(result.map(Box::new)));
                let _ = waker.wake();
            }
        });
    }
}

/// Tries to reach pagesrv until it answers (and takes the maps), a final refusal, the
/// reconnect timeout, or `stop` (None).
fn connect_with_backoff<K: Kernel>(
    config: &LinkConfig,
    vm: &Vm<K>,
    pins: &mut Pins,
    first_contact: bool,
    stop: &Receiver<()>,
) -> Option<Result<Upstream>> {
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    let mut backoff = Duration::from_millis(10);
    let mut attempts = 0u64;
    let addr = &config.target.addr;
    loop {
        attempts += 1;
        let attempt = connect::connect(&config.target, pins, config.liveness.timeout)
            .map_err(|e| {
                let fatal = e.is_fatal(first_contact);
                (anyhow!(e), fatal)
            })
            .and_then(|mut up| {
                send_maps(vm, &mut up.urgent, config.liveness.timeout)
                    .map(|()| up)
                    .map_err(|e| (anyhow!(e).context("failed to send the page maps"), false))
            });
        match attempt {
            Ok(up) => {
                let after_ms = started.elapsed().as_millis() as u64;
                if first_contact {
                    info!(attempts, after_ms, %addr, "connected to pagesrv");
                } else {
                    info!(attempts, after_ms, "reconnected to pagesrv");
                }
                return Some(Ok(up));
            }
            Err((e, true)) => {
                let what = if first_contact {
                    "pagesrv refused the migration"
                } else {
                    "pagesrv refused to resume"
                };
                return Some(Err(e.context(what)));
            }
            Err((e, false)) => {
                if last_log.is_none_or(|t| t.elapsed() >= WAITING_LOG_EVERY) {
                    info!(
                        attempts,
                        waited_s = started.elapsed().as_secs(),
                        error = %format!("{e:#}"),
                        "waiting for pagesrv at {addr}; retrying"
                    );
                    last_log = Some(Instant::now());
                } else {
                    debug!(attempts, error = %format!("{e:#}"), "connection attempt failed");
                }
            }
        }
        if let Some(limit) = config.reconnect_timeout
            && started.elapsed() >= limit
        {
            return Some(Err(anyhow!(
                "pagesrv at {addr} unreachable for {:.1} s (--reconnect-timeout); giving up after {attempts} attempts",
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

/// Sends the maps of the pages here ([`encode_maps`]), then MapEnd. Runs on the connector
/// thread, with a write timeout, before the fault thread takes the socket.
fn send_maps<K: Kernel>(
    vm: &Vm<K>,
    urgent: &mut FramedConn,
    timeout: Duration,
) -> std::io::Result<()> {
    urgent.stream.set_write_timeout(Some(timeout))?;
    let mut frames = Vec::new();
    encode_maps(vm, &mut urgent.tx, &mut frames);
    urgent.tx.encode(&Message::MapEnd, &[], &mut frames);
    urgent.stream.write_all(&frames)?;
    urgent.stream.set_write_timeout(None)
}
