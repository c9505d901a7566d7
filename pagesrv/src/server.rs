//! The listener and the session manager: handshakes run concurrently, so no stale session
//! and no silent or hostile client delays a real destination by more than the handshake
//! deadline.
//!
//! ```text
//!  acceptor thread ──accept──► handshake thread per new connection (≤ MAX_HANDSHAKES at once,
//!                               one deadline each) ──admitted──► manager (this thread)
//!  manager: urgent Hello ─► check layout/image; resumes the running session? abort it, take
//!           over; another session running? Busy; else pending ─► AuthOk + Welcome
//!           bulk Hello{pending id} ─► AuthOk + Welcome ─► session threads (urgent, pusher,
//!           progress) ─► outcome: Completed → exit 0 | Failed → exit 1 | Aborted → wait
//! ```
//!
//! With `--serve-forever` neither a completed nor a failed session ends pagesrv.
//!
//! # Threads, what each owns, and every lock
//!
//! | thread | owns | blocks on |
//! | --- | --- | --- |
//! | acceptor | the listening socket | `accept` |
//! | handshake, one per new connection (≤ 64) | that connection until admitted | its reads, within one 5 s deadline |
//! | manager (main thread) | the running session's handle, the urgent connection waiting for its bulk connection | its event channel (500 ms ticks); joining a replaced session, which ends at once (its sockets are shut down) |
//! | urgent, one per session (SCHED_FIFO) | the urgent socket (writes under the session's write lock) | reads with a 200 ms timeout (heartbeats, link timeout, source checks); writes time out after the link timeout |
//! | pusher, one per session | the bulk socket | writes (flow control; shut down by the session's end); the push-ready condvar (200 ms ticks, heartbeats) |
//! | progress, one per session | nothing | a channel, 100 ms or 2 s ticks |
//!
//! Locks: a session's push order (`Mutex<PushScheduler>`, held for one pick), its write lock
//! (only shared with the pusher in the naive baseline), its push-ready flag and condvar, and
//! the list of its sockets (for abort). Page maps and counters are atomics.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::auth::Psk;
use common::framed::{FrameEncoder, FrameReader};
use common::wire::{ErrorCode, FLAG_FREE, FLAG_PRECOPY, PROTOCOL_VERSION, Role, SessionParams};
use serde_json::json;
use socket2::SockRef;
use tracing::{debug, error, info, info_span, warn};

use crate::handshake::{Admitted, HANDSHAKE_DEADLINE, admit};
use crate::precopy::Precopy;
use crate::report::Events;
use crate::report::{print_summary, report_progress};
use crate::session::{Outcome, Session, SessionConfig, Switch, error_chain};
use crate::source::MemorySource;

/// Send buffer of the bulk connection: small enough that pre-paging takes effect quickly.
const BULK_SNDBUF_BYTES: usize = 1 << 20;
/// Most connections in their handshake at once; further ones are closed at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Server settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Keep serving sessions after one completed or failed.
    pub serve_forever: bool,
    /// Per-session tuning.
    pub session: SessionConfig,
    /// Pre-shared key: destinations must prove they hold it (and so must we).
    pub psk: Option<Psk>,
    /// Serve a non-loopback address without a key.
    pub insecure_listen: bool,
    /// Serve only destinations with this page size (`--page-size`); any otherwise.
    pub page_size: Option<u64>,
}

enum Event {
    Admitted(Box<Admitted>),
    SessionEnded { serial: u64 },
}

/// Serves sessions until one completes (or forever, with `serve_forever`). A session that
/// breaks off is not an error: the destination reconnects and resumes in a new session.
///
/// # Errors
/// Refusing an unsafe address, failing to bind it, or a failed session (the destination
/// reported a failure or a digest mismatch: the source must keep the VM).
pub fn serve(
    source: &MemorySource,
    config: &ServerConfig,
    precopy: Option<Arc<Precopy>>,
    events: Events,
) -> Result<()> {
    if !config.listen.ip().is_loopback() && config.psk.is_none() && !config.insecure_listen {
        bail!(
            "refusing to serve VM memory on {} without authentication: give --psk-file (or --insecure-listen)",
            config.listen
        );
    }
    let listener = TcpListener::bind(config.listen)
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // One line on stdout for scripts and tests: where to connect.
    println!("pagesrv listening on {addr}");
    info!(
        %addr,
        bytes = source.size_bytes(),
        image = format_args!("{:016x}", source.image_id()),
        "serving memory"
    );
    let (tx, rx) = mpsc::channel();
    spawn_acceptor(listener, config.psk.clone(), tx.clone());
    std::thread::scope(|scope| {
        let mut manager = Manager {
            scope,
            source,
            config,
            notify: tx,
            running: None,
            pending: None,
            serials: 0,
            precopy,
            events,
        };
        let result = manager.run(&rx);
        if let Some(running) = manager.running.take() {
            running.session.abort();
            let _ = running.handle.join();
        }
        result
    })
}

/// Accepts connections and runs each handshake on its own thread, at most
/// [`MAX_HANDSHAKES`] at once. Ends with the process.
fn spawn_acceptor(listener: TcpListener, psk: Option<Psk>, tx: Sender<Event>) {
    let psk = Arc::new(psk);
    let in_handshake = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        let mut last_refusal_log: Option<Instant> = None;
        loop {
            let (conn, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if in_handshake.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    warn!(%peer, "{MAX_HANDSHAKES} connections are in their handshake; closing new ones at once");
                    last_refusal_log = Some(Instant::now());
                }
                drop(conn);
                continue;
            }
            in_handshake.fetch_add(1, Ordering::AcqRel);
            let (psk, tx, counter) = (psk.clone(), tx.clone(), in_handshake.clone());
            let spawned = std::thread::Builder::new()
                .name("handshake".into())
                .spawn(move || {
                    let result = admit(conn, peer, psk.as_ref().as_ref());
                    counter.fetch_sub(1, Ordering::AcqRel);
                    match result {
                        Ok(admitted) => {
                            let _ = tx.send(Event::Admitted(Box::new(admitted)));
                        }
                        Err(rejected) => {
                            // Log first, then tell the peer: the log is never behind the wire.
                            warn!(%peer, error = %error_chain(&rejected.reason), "rejected a connection");
                            rejected.reply();
                        }
                    }
                });
            if spawned.is_err() {
                in_handshake.fetch_sub(1, Ordering::AcqRel);
                warn!(%peer, "cannot start a handshake thread; closing the connection");
            }
        }
    });
}

/// A session's threads.
struct Running<'scope, 'env> {
    serial: u64,
    session: Arc<Session<'env>>,
    handle: ScopedJoinHandle<'scope, Outcome>,
}

/// An urgent connection welcomed, waiting for its bulk connection.
struct Pending {
    admitted: Box<Admitted>,
    /// What it was welcomed with (session id, page size).
    welcome: SessionParams,
    since: Instant,
}

struct Manager<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    source: &'env MemorySource,
    config: &'env ServerConfig,
    notify: Sender<Event>,
    /// The precopy engine (`--vmm-uds` with `--strategy precopy|hybrid`).
    precopy: Option<Arc<Precopy>>,
    /// Control-socket events.
    events: Events,
    running: Option<Running<'scope, 'env>>,
    pending: Option<Pending>,
    serials: u64,
}

impl<'scope, 'env> Manager<'scope, 'env> {
    fn run(&mut self, events: &Receiver<Event>) -> Result<()> {
        loop {
            let event = match events.recv_timeout(Duration::from_millis(500)) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => bail!("the acceptor stopped"),
            };
            if self
                .pending
                .as_ref()
                .is_some_and(|p| p.since.elapsed() > HANDSHAKE_DEADLINE)
            {
                let p = self.pending.take().expect("checked");
                warn!(peer = %p.admitted.peer, "the destination never opened its bulk connection");
            }
            match event {
                Some(Event::Admitted(admitted)) => match admitted.role {
                    Role::Urgent => self.on_urgent(admitted),
                    Role::Bulk => self.on_bulk(admitted),
                },
                Some(Event::SessionEnded { serial }) => {
                    if let Some(done) = self.on_session_ended(serial) {
                        return done;
                    }
                }
                None => {}
            }
        }
    }

    fn refuse(&self, mut admitted: Box<Admitted>, code: ErrorCode, text: &str) {
        warn!(peer = %admitted.peer, role = ?admitted.role, %text, "refused a destination");
        admitted.refuse(self.config.psk.as_ref(), code, text);
    }

    fn on_urgent(&mut self, admitted: Box<Admitted>) {
        let ours = match check_params(&admitted.hello, self.source, self.config.page_size) {
            Ok(ours) => ours,
            Err((code, text)) => return self.refuse(admitted, code, &text),
        };
        if let Err(e) = self.source.check_intact() {
            return self.refuse(admitted, ErrorCode::Internal, &error_chain(&e));
        }
        let wanted = admitted.hello.session_id;
        if let Some(running) = &self.running {
            if wanted != running.session.id {
                let text = format!(
                    "serving session {:016x} to another destination; try again when it ends",
                    running.session.id
                );
                return self.refuse(admitted, ErrorCode::Busy, &text);
            }
            let running = self.running.take().expect("checked above");
            info!(
                session = format_args!("{wanted:016x}"),
                peer = %admitted.peer,
                "the destination reconnected: replacing its old session"
            );
            running.session.abort();
            let outcome = running
                .handle
                .join()
                .unwrap_or_else(|_| Outcome::Aborted("session thread panicked".into()));
            print_summary(&running.session, &outcome);
            if let Some(published) = running.session.published() {
                published.ended(&outcome, running.session.verified());
            }
        }
        let resumed = admitted.hello.resumed();
        let flags = match &self.precopy {
            None => 0,
            Some(engine) if engine.failure().is_some() => {
                let text = format!(
                    "the migration failed at the source: {}",
                    engine.failure().unwrap_or_default()
                );
                return self.refuse(admitted, ErrorCode::Internal, &text);
            }
            Some(engine) if u64::from(admitted.hello.page_size) != engine.page_size => {
                let text = format!(
                    "precopy tracks the source VMM's {}-byte pages; a destination in {}-byte pages cannot follow its discards",
                    engine.page_size, admitted.hello.page_size
                );
                return self.refuse(admitted, ErrorCode::LayoutMismatch, &text);
            }
            Some(engine) if !engine.switched() && resumed => {
                let text = "the source still runs (precopy): a destination whose guest runs already cannot be served";
                return self.refuse(admitted, ErrorCode::Protocol, text);
            }
            // Precopy rounds, or the discards and the switch this destination missed.
            Some(_) if !resumed => FLAG_PRECOPY,
            Some(_) => 0,
        } | if self.source.has_free_hints() {
            FLAG_FREE
        } else {
            0
        };
        let session_id = if wanted != 0 {
            wanted
        } else {
            rand::random::<u64>() | 1
        };
        let mut admitted = admitted;
        let welcome = SessionParams {
            session_id,
            flags,
            ..ours
        };
        if let Err(e) = prepare_socket(&admitted.conn, Role::Urgent, self.config)
            .and_then(|()| Ok(admitted.welcome(self.config.psk.as_ref(), welcome)?))
        {
            warn!(peer = %admitted.peer, error = %format!("{e:#}"), "failed to welcome a destination");
            return;
        }
        info!(peer = %admitted.peer, role = "urgent", session = format_args!("{session_id:016x}"), sealed = admitted.encoder.is_sealed(), "destination connected");
        self.pending = Some(Pending {
            admitted,
            welcome,
            since: Instant::now(),
        });
    }

    fn on_bulk(&mut self, mut admitted: Box<Admitted>) {
        let id = admitted.hello.session_id;
        let matches = self.pending.as_ref().is_some_and(|p| {
            p.welcome.session_id == id
                && p.welcome.page_size == admitted.hello.page_size
                && p.welcome.total_pages == admitted.hello.total_pages
        });
        if !matches {
            let text = format!("no pending session {id:#x} with this layout");
            return self.refuse(admitted, ErrorCode::UnknownSession, &text);
        }
        let pending = self.pending.take().expect("checked above");
        let welcome = pending.welcome;
        if let Err(e) = prepare_socket(&admitted.conn, Role::Bulk, self.config)
            .and_then(|()| Ok(admitted.welcome(self.config.psk.as_ref(), welcome)?))
        {
            warn!(peer = %admitted.peer, error = %format!("{e:#}"), "failed to welcome a destination");
            return;
        }
        info!(peer = %admitted.peer, role = "bulk", session = format_args!("{id:016x}"), sealed = admitted.encoder.is_sealed(), "destination connected");
        let Admitted {
            conn,
            reader,
            encoder,
            ..
        } = *admitted;
        self.start_session(pending, (conn, reader, encoder));
    }

    fn start_session(&mut self, pending: Pending, bulk: (TcpStream, FrameReader, FrameEncoder)) {
        self.serials += 1;
        let serial = self.serials;
        self.source.refresh_holes();
        let paged = self
            .source
            .paged(u64::from(pending.welcome.page_size))
            .expect("the page size was checked when the destination was welcomed");
        let switch = Switch {
            engine: self.precopy.clone(),
            first: pending.welcome.precopy(),
            free_first: pending.welcome.free_first(),
            base: pending.admitted.hello.has_base(),
        };
        let session = Arc::new(Session::new(
            paged,
            pending.welcome.session_id,
            self.config.session.clone(),
            switch,
            self.events.clone(),
        ));
        let (tx, session_for_thread) = (self.notify.clone(), session.clone());
        let Admitted {
            conn,
            reader,
            encoder: urgent_tx,
            ..
        } = *pending.admitted;
        let handle = self.scope.spawn(move || {
            let session = session_for_thread;
            let _span = info_span!("session", id = format_args!("{:016x}", session.id)).entered();
            let outcome = std::thread::scope(|s| {
                let (done_tx, done_rx) = mpsc::channel::<()>();
                let reporter = s.spawn(|| report_progress(&session, done_rx));
                let outcome = session.run(conn, reader, urgent_tx, bulk);
                drop(done_tx);
                let _ = reporter.join();
                outcome
            });
            let _ = tx.send(Event::SessionEnded { serial });
            outcome
        });
        self.running = Some(Running {
            serial,
            session,
            handle,
        });
    }

    /// A session thread ended; `Some` ends the server.
    fn on_session_ended(&mut self, serial: u64) -> Option<Result<()>> {
        if self.running.as_ref().is_none_or(|r| r.serial != serial) {
            return None; // one that was replaced (and reported) already
        }
        let running = self.running.take().expect("checked above");
        let outcome = running
            .handle
            .join()
            .unwrap_or_else(|_| Outcome::Aborted("session thread panicked".into()));
        print_summary(&running.session, &outcome);
        if let Some(published) = running.session.published() {
            published.ended(&outcome, running.session.verified());
        }
        match &outcome {
            Outcome::Completed => self.events.emit_sticky(json!({
                "event": "completed",
                "verified": running.session.verified(),
            })),
            Outcome::Failed(why) => self
                .events
                .emit_sticky(json!({"event": "failed", "error": why})),
            Outcome::Aborted(why) => self
                .events
                .emit(json!({"event": "session-broke-off", "why": why})),
        }
        match (outcome, self.config.serve_forever) {
            (Outcome::Completed, false) => Some(Ok(())),
            (Outcome::Completed, true) => None,
            (Outcome::Failed(why), serve_forever) => {
                error!(%why, "the migration failed: the source must keep the VM");
                (!serve_forever).then(|| {
                    Err(anyhow::anyhow!(
                        "the migration failed: {why}; keep the source VM (do not destroy it)"
                    ))
                })
            }
            (Outcome::Aborted(why), _) => {
                warn!(%why, "session broke off; waiting for the destination to reconnect");
                None
            }
        }
    }
}

/// Checks a destination's `Hello` against the memory file: the same protocol, a page size
/// the file is a whole number of (and the one `--page-size` requires, if given), the same
/// number of bytes, and the image it pinned. Returns the parameters to welcome it with
/// (session id still 0).
fn check_params(
    theirs: &SessionParams,
    source: &MemorySource,
    required_page_size: Option<u64>,
) -> Result<SessionParams, (ErrorCode, String)> {
    if theirs.version != PROTOCOL_VERSION {
        return Err((
            ErrorCode::VersionMismatch,
            format!(
                "destination speaks protocol version {}, source speaks {PROTOCOL_VERSION}",
                theirs.version
            ),
        ));
    }
    let page_size = u64::from(theirs.page_size);
    let theirs_bytes = theirs.total_pages.saturating_mul(page_size);
    let layout_err = |why: String| {
        Err((
            ErrorCode::LayoutMismatch,
            format!(
                "destination expects {} pages of {} bytes ({} MiB): {why}",
                theirs.total_pages,
                page_size,
                theirs_bytes >> 20
            ),
        ))
    };
    if !common::layout::SUPPORTED_PAGE_SIZES.contains(&page_size) {
        return layout_err("page size not supported (4096 or 2097152)".into());
    }
    if let Some(required) = required_page_size.filter(|&r| r != page_size) {
        return layout_err(format!(
            "this source serves {required}-byte pages only (--page-size)"
        ));
    }
    let paged = match source.paged(page_size) {
        Ok(paged) => paged,
        Err(e) => return layout_err(e.to_string()),
    };
    if theirs_bytes != source.size_bytes() {
        return layout_err(format!(
            "the source memory file has {} pages of {page_size} bytes ({} MiB)",
            paged.total_pages(),
            source.size_bytes() >> 20
        ));
    }
    if theirs.image_id != 0 && theirs.image_id != source.image_id() {
        return Err((
            ErrorCode::ImageMismatch,
            format!(
                "the destination's session started from memory image {:016x}; this source serves image {:016x} (another memory file, or one that changed)",
                theirs.image_id,
                source.image_id()
            ),
        ));
    }
    Ok(SessionParams {
        version: PROTOCOL_VERSION,
        page_size: theirs.page_size,
        total_pages: paged.total_pages(),
        session_id: 0,
        image_id: source.image_id(),
        flags: 0,
    })
}

fn prepare_socket(conn: &TcpStream, role: Role, config: &ServerConfig) -> Result<()> {
    common::netopt::detect_dead_peer(conn, config.session.liveness.timeout)?;
    if let Err(e) = common::netopt::mark_traffic(conn, role == Role::Urgent) {
        debug!(error = %e, "cannot mark the connection's traffic class");
    }
    if role == Role::Bulk {
        SockRef::from(conn).set_send_buffer_size(BULK_SNDBUF_BYTES)?;
    }
    Ok(())
}
