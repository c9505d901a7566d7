//! The listener and the session manager: handshakes run concurrently, so no stale session
//! and no silent or hostile client delays a real destination by more than the handshake
//! deadline; the sessions of different VMs run side by side.
//!
//! ```text
//!  admission thread (accept + every handshake, one deadline each; admission.rs)
//!                               ──admitted (proved the named VM's key)──► manager (this thread)
//!  manager: urgent Hello{vm} ─► which VM (unknown: UnknownVm); check layout/image; names that
//!           VM's session and proves its resume secret? (running: abort it) take over, keep
//!           the secret; names it without the proof? Busy, nothing changes; another session
//!           of that VM running or connecting? Busy; else a new session (or one this pagesrv
//!           does not know: adopted) with the secret of this handshake ─► AuthOk + Welcome{vm}
//!           bulk Hello{pending id} + its secret ─► AuthOk + Welcome ─► session threads
//!           (urgent, pusher, progress) ─► outcome: Completed or Failed → that VM is finished
//!           | Aborted → wait for its destination to resume it
//!  every VM finished ─► exit 0 if all completed, else 1 naming the VMs that failed
//! ```
//!
//! With `--serve-forever` neither a completed nor a failed session ends pagesrv.
//!
//! # Several VMs
//!
//! Each VM has at most one session, so pagesrv runs at most three threads per VM it serves
//! (urgent, pusher, progress), a number fixed at start, never one per page or per request.
//! Across VMs, requests go first the same way they do within one: every session's urgent
//! thread is SCHED_FIFO (where allowed) and preempts every pusher, and urgent traffic is
//! marked DSCP EF; the pushes share the link as their TCP connections do (one per VM, each
//! with the same bounded send buffer) and the CPU as equal-priority threads. Each session's
//! summary line and metrics carry its VM's name; at the end a line per VM gives its totals.
//!
//! # Threads, what each owns, and every lock
//!
//! | thread | owns | blocks on |
//! | --- | --- | --- |
//! | admission | the listening socket, every connection until admitted (≤ 1024) | its poll (each handshake has one 5 s deadline) |
//! | manager (main thread) | per VM: the running session's handle, the urgent connection waiting for its bulk connection, the totals | its event channel (500 ms ticks); joining a replaced session, which ends at once (its sockets are shut down) |
//! | urgent, one per session (SCHED_FIFO) | the urgent socket (writes under the session's write lock) | reads with a 200 ms timeout (heartbeats, link timeout, source checks); writes time out after the link timeout |
//! | pusher, one per session | the bulk socket | writes (flow control; shut down by the session's end); the push-ready condvar (200 ms ticks, heartbeats) |
//! | progress, one per session | nothing | a channel, 100 ms or 2 s ticks |
//!
//! Locks: a session's push order (`Mutex<PushScheduler>`, held for one pick), its write lock
//! (only shared with the pusher in the naive baseline), its push-ready flag and condvar, and
//! the list of its sockets (for abort). Page maps and counters are atomics.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::auth::{Psk, ResumeSecret};
use common::framed::{FrameEncoder, FrameReader};
use common::source_link::Outcome as SourceOutcome;
use common::wire::{
    ErrorCode, FLAG_FREE, FLAG_PRECOPY, FLAG_PROVEN, MAX_STREAMS, Role, SessionParams, VmName,
};
use serde_json::json;
use socket2::SockRef;
use tracing::{debug, error, info, info_span, warn};

use crate::claim::{self, Claim, Known, busy_text, joins};
use crate::fleet::{self, ServedVm};
use crate::handshake::{Admitted, HANDSHAKE_DEADLINE};
use crate::precopy::Precopy;
use crate::report::Events;
use crate::report::{print_summary, report_progress};
use crate::session::EventSink;
use crate::session::{Outcome, Session, SessionConfig, Switch, error_chain};

/// Send buffer of the bulk connection: small enough that pre-paging takes effect quickly.
const BULK_SNDBUF_BYTES: usize = 1 << 20;
/// How often a VM's refused takeover attempts are logged (one line per window).
const TAKEOVER_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often refusals after a handshake are logged (one line per window).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Server settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Keep serving sessions after one completed or failed.
    pub serve_forever: bool,
    /// Per-session tuning.
    pub session: SessionConfig,
    /// The master key (each VM's key derives from it; destinations must prove they hold
    /// theirs, and so must we), or [`Psk::unkeyed`] (`--insecure-no-key`).
    pub key: Psk,
    /// Most connections in their handshake at once (`admission.rs`).
    pub handshake_capacity: usize,
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
    vms: &[ServedVm],
    config: &ServerConfig,
    precopy: Option<Arc<Precopy>>,
    source_vmm: Option<Arc<Precopy>>,
    events: Events,
) -> Result<Verdict> {
    if !config.listen.ip().is_loopback() && !config.key.is_keyed() && !config.insecure_listen {
        bail!(
            "refusing to serve VM memory on {} without authentication: give --psk-file (or --insecure-listen)",
            config.listen
        );
    }
    let listener = TcpListener::bind(config.listen)
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    for vm in vms {
        info!(
            %addr,
            vm = %vm.name,
            bytes = vm.source.size_bytes(),
            image = format_args!("{:016x}", vm.source.image_id()),
            "serving memory"
        );
    }
    // One line on stdout for scripts and tests: where to connect (after the log says what).
    println!("pagesrv listening on {addr}");
    let (tx, rx) = mpsc::channel();
    let deliver = tx.clone();
    let live = Arc::new(crate::admission::LiveSessions::default());
    crate::admission::spawn(
        listener,
        config.key.clone(),
        config.handshake_capacity,
        live.clone(),
        Box::new(move |admitted| {
            let _ = deliver.send(Event::Admitted(admitted));
        }),
    )
    .context("cannot start the admission thread")?;
    std::thread::scope(|scope| {
        let mut manager = Manager {
            scope,
            vms,
            slots: vms.iter().map(|_| Slot::default()).collect(),
            config,
            notify: tx,
            serials: 0,
            precopy,
            events,
            done: None,
            refusals: std::cell::RefCell::new(LogWindow::new(REFUSAL_LOG_EVERY)),
            live,
        };
        let result = manager.run(&rx);
        for index in 0..vms.len() {
            manager.end_session(index, true);
        }
        if let Some(engine) = &source_vmm {
            release_source(engine, manager.source_outcome());
        }
        result
    })
}

/// How the migrations ended, when every one completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every destination compared the digests of every page.
    Verified,
    /// Every page arrived, but some destination compared no digests (`--no-verify`).
    Unverified,
}

/// Tells the source VMM how the migration ended (`None`: not known, so nothing is said and
/// the VMM keeps its paused guest, see `common::source_link`).
fn release_source(engine: &Precopy, outcome: Option<SourceOutcome>) {
    let Some(outcome) = outcome else {
        warn!(
            "the migration's outcome is not known: the source VMM is not told (it keeps the VM paused)"
        );
        return;
    };
    match engine.release(&outcome) {
        Ok(()) => info!(?outcome, "the source VMM was told the outcome"),
        Err(e) => {
            error!(?outcome, error = %error_chain(&e), "the source VMM was not told the outcome (it keeps the VM paused)")
        }
    }
}

/// A session's threads.
struct Running<'scope, 'env> {
    serial: u64,
    session: Arc<Session<'env>>,
    handle: ScopedJoinHandle<'scope, Outcome>,
    /// What its connections were welcomed with (extra streams get the same).
    welcome: SessionParams,
}

/// An urgent connection welcomed, waiting for its bulk connection.
struct Pending {
    admitted: Box<Admitted>,
    /// What it was welcomed with (session id, page size).
    welcome: SessionParams,
    /// The session's resume secret: its bulk connection proves it.
    secret: ResumeSecret,
    since: Instant,
}

/// How a VM's migration ended (without `--serve-forever`, it is served no more).
#[derive(Debug, Clone)]
enum Finished {
    Completed { verified: bool },
    Failed(String),
}

/// One served VM's state: at most one session running and one waiting for its bulk
/// connection, and the totals over its sessions.
#[derive(Default)]
struct Slot<'scope, 'env> {
    running: Option<Running<'scope, 'env>>,
    pending: Option<Pending>,
    /// The session its destination resumes after a cut (set once a session started), with
    /// the secret every later connection of it proves.
    established: Option<Known>,
    /// When a refused takeover attempt was last logged.
    takeover_logged: Option<Instant>,
    finished: Option<Finished>,
    sessions: u32,
    bytes_sent: u64,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

struct Manager<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    vms: &'env [ServedVm],
    /// One per VM, in the same order.
    slots: Vec<Slot<'scope, 'env>>,
    config: &'env ServerConfig,
    notify: Sender<Event>,
    /// The precopy engine (`--vmm-uds` with `--strategy precopy|hybrid`; one VM).
    precopy: Option<Arc<Precopy>>,
    /// Control-socket events.
    events: Events,
    serials: u64,
    /// Set when every VM's migration ended: what pagesrv exits with.
    done: Option<Result<Verdict>>,
    /// Refusals logged and counted.
    refusals: std::cell::RefCell<LogWindow>,
    /// The sessions admission keeps room for.
    live: Arc<crate::admission::LiveSessions>,
}

/// Lets one log line through per window and counts the others.
#[derive(Debug)]
struct LogWindow {
    every: Duration,
    started: Option<Instant>,
    held_back: u64,
}

impl LogWindow {
    fn new(every: Duration) -> Self {
        LogWindow {
            every,
            started: None,
            held_back: 0,
        }
    }

    /// `Some(lines held back since the last one)` if this one may be logged.
    fn admit(&mut self) -> Option<u64> {
        if self.started.is_some_and(|t| t.elapsed() < self.every) {
            self.held_back += 1;
            return None;
        }
        self.started = Some(Instant::now());
        Some(std::mem::take(&mut self.held_back))
    }
}

impl<'scope, 'env> Manager<'scope, 'env> {
    fn run(&mut self, events: &Receiver<Event>) -> Result<Verdict> {
        loop {
            let event = match events.recv_timeout(Duration::from_millis(500)) {
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => bail!("the acceptor stopped"),
            };
            for (slot, vm) in self.slots.iter_mut().zip(self.vms) {
                if slot
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.since.elapsed() > HANDSHAKE_DEADLINE)
                {
                    let p = slot.pending.take().expect("checked");
                    warn!(peer = %p.admitted.peer, vm = %vm.name, "the destination never opened its bulk connection");
                }
            }
            match event {
                Some(Event::Admitted(admitted)) => match admitted.role() {
                    Role::Urgent => self.on_urgent(admitted),
                    Role::Bulk => self.on_bulk(admitted),
                },
                Some(Event::SessionEnded { serial }) => self.on_session_ended(serial),
                None => {}
            }
            self.publish_live_sessions();
            if let Some(done) = self.done.take() {
                return done;
            }
        }
    }

    /// Refuses a connection after its handshake; one line per [`REFUSAL_LOG_EVERY`] (then
    /// how many followed): anyone with a key, or anyone without `--insecure-no-key`'s, can
    /// make refusals.
    fn refuse(&self, mut admitted: Box<Admitted>, code: ErrorCode, text: &str) {
        if let Some(before) = self.refusals.borrow_mut().admit() {
            warn!(peer = %admitted.peer, role = ?admitted.role(), vm = %admitted.hello().vm, %text, refused_since_last_line = before, "refused a destination");
        }
        admitted.refuse(code, text);
    }

    /// Refuses a connection that named VM `index`'s session without proving its secret:
    /// nothing changes, and one line per [`TAKEOVER_LOG_EVERY`] says so.
    fn refuse_takeover(&mut self, index: usize, mut admitted: Box<Admitted>) {
        let slot = &mut self.slots[index];
        if slot
            .takeover_logged
            .is_none_or(|t| t.elapsed() >= TAKEOVER_LOG_EVERY)
        {
            slot.takeover_logged = Some(Instant::now());
            warn!(peer = %admitted.peer, role = ?admitted.role(), vm = %self.vms[index].name, "refused a connection that names this VM's session without proving its secret (a takeover attempt, or a destination from another run); the session goes on");
        }
        admitted.refuse(ErrorCode::Busy, &busy_text(self.vms[index].name));
    }

    /// Tells admission which sessions exist (their `Hello`s are the last evicted).
    fn publish_live_sessions(&self) {
        let ids = self
            .slots
            .iter()
            .flat_map(|slot| {
                let pending = slot.pending.as_ref().map(|p| p.welcome.session_id);
                pending
                    .into_iter()
                    .chain(slot.established.as_ref().map(|e| e.id))
            })
            .collect();
        self.live.set(ids);
    }

    /// Ends VM `index`'s running session, if any: aborts it first with `abort` (a reconnect
    /// replaces it, or pagesrv ends), then joins and concludes it.
    fn end_session(&mut self, index: usize, abort: bool) {
        let Some(running) = self.slots[index].running.take() else {
            return;
        };
        if abort {
            running.session.abort();
        }
        let outcome = running
            .handle
            .join()
            .unwrap_or_else(|_| Outcome::Aborted("session thread panicked".into()));
        self.conclude(index, &running.session, outcome);
    }

    /// Prints, publishes and totals a session that ended; a completed or failed one finishes
    /// its VM (without `--serve-forever`), and the last VM to finish sets the verdict.
    fn conclude(&mut self, index: usize, session: &Session<'_>, outcome: Outcome) {
        print_summary(session, &outcome);
        let bytes = session.stats.bytes_sent.load(Ordering::Relaxed);
        if let Some(published) = &self.events.metrics {
            published.ended(session.vm, &outcome, session.verified(), bytes);
        }
        let slot = &mut self.slots[index];
        slot.bytes_sent += bytes;
        slot.last_end = Some(Instant::now());
        let vm = self.vms[index].name.to_string();
        match &outcome {
            Outcome::Completed => self.events.emit_sticky(json!({
                "event": "completed",
                "vm": vm,
                "verified": session.verified(),
            })),
            Outcome::Failed(why) => self
                .events
                .emit_sticky(json!({"event": "failed", "vm": vm, "error": why})),
            Outcome::Aborted(why) => self
                .events
                .emit(json!({"event": "session-broke-off", "vm": vm, "why": why})),
        }
        let finished = match outcome {
            Outcome::Completed => Finished::Completed {
                verified: session.verified(),
            },
            Outcome::Failed(why) => {
                error!(%vm, %why, "the migration failed: the source must keep the VM");
                Finished::Failed(why)
            }
            Outcome::Aborted(why) => {
                warn!(%vm, %why, "session broke off (its destination resumes it when it reconnects)");
                return;
            }
        };
        if self.config.serve_forever {
            // Each migration's own totals: the next one of this VM starts from zero.
            let slot = &mut self.slots[index];
            print_vm_totals(&self.vms[index], slot, &finished);
            (slot.sessions, slot.bytes_sent, slot.first_start) = (0, 0, None);
            // The next migration of this VM is a new session.
            slot.established = None;
            return;
        }
        self.slots[index].finished = Some(finished);
        if self.slots.iter().all(|slot| slot.finished.is_some()) {
            self.done = Some(self.verdict());
        }
    }

    /// Prepares the connection and answers with `welcome` (to VM `vm`); `false` (logged) if
    /// that failed.
    fn welcome(&self, admitted: &mut Admitted, welcome: SessionParams, vm: VmName) -> bool {
        let role = match (admitted.role(), admitted.hello().extra_stream()) {
            (Role::Urgent, _) => "urgent",
            (Role::Bulk, false) => "bulk",
            (Role::Bulk, true) => "bulk (extra stream)",
        };
        if let Err(e) = prepare_socket(&admitted.conn, admitted.role(), self.config)
            .and_then(|()| Ok(admitted.welcome(welcome)?))
        {
            warn!(peer = %admitted.peer, error = %format!("{e:#}"), "failed to welcome a destination");
            return false;
        }
        info!(peer = %admitted.peer, role, vm = %vm, session = format_args!("{:016x}", welcome.session_id), sealed = admitted.encoder.is_sealed(), "destination connected");
        true
    }

    fn on_urgent(&mut self, admitted: Box<Admitted>) {
        let index = match fleet::find(self.vms, &admitted.hello().vm) {
            Ok(index) => index,
            Err(text) => return self.refuse(admitted, ErrorCode::UnknownVm, &text),
        };
        let vm = &self.vms[index];
        if let Some(finished) = &self.slots[index].finished {
            let text = format!(
                "the migration of VM {} has ended ({}); it is served no more",
                vm.name,
                match finished {
                    Finished::Completed { .. } => "completed".to_string(),
                    Finished::Failed(why) => format!("failed: {why}"),
                }
            );
            return self.refuse(admitted, ErrorCode::UnknownVm, &text);
        }
        let ours =
            match fleet::check_destination(admitted.hello(), &vm.source, self.config.page_size) {
                Ok(ours) => ours,
                Err((code, text)) => return self.refuse(admitted, code, &text),
            };
        if let Err(e) = vm.source.check_intact() {
            return self.refuse(admitted, ErrorCode::Internal, &error_chain(&e));
        }
        let (session_id, secret, proven) = match self.claim(index, &admitted) {
            Claim::Resume { id, secret } => (id, secret, true),
            Claim::Open { adopt } => {
                let id = adopt.unwrap_or_else(|| rand::random::<u64>() | 1);
                (id, admitted.new_secret(id), false)
            }
            Claim::Busy => {
                let text = busy_text(vm.name);
                return self.refuse(admitted, ErrorCode::Busy, &text);
            }
            Claim::Unproven => return self.refuse_takeover(index, admitted),
        };
        if self.slots[index]
            .running
            .as_ref()
            .is_some_and(|r| r.session.id == session_id)
        {
            info!(
                session = format_args!("{session_id:016x}"),
                vm = %vm.name,
                peer = %admitted.peer,
                "the destination reconnected: replacing its old session"
            );
            self.end_session(index, true);
            if self.slots[index].finished.is_some() {
                // It had ended before we stopped it: nothing to resume.
                let text = format!("the migration of VM {} has ended", self.vms[index].name);
                return self.refuse(admitted, ErrorCode::UnknownVm, &text);
            }
        }
        let vm = &self.vms[index];
        let flags = match self.welcome_flags(admitted.hello(), vm, proven) {
            Ok(flags) => flags,
            Err((code, text)) => return self.refuse(admitted, code, &text),
        };
        let mut admitted = admitted;
        let welcome = SessionParams {
            session_id,
            flags,
            // Echoed only to a destination that named it (one that did not may predate
            // names and read only the fixed body).
            vm: admitted.hello().vm,
            ..ours
        };
        if !self.welcome(&mut admitted, welcome, vm.name) {
            return;
        }
        self.slots[index].pending = Some(Pending {
            admitted,
            welcome,
            secret,
            since: Instant::now(),
        });
    }

    /// The `Welcome` flags of an urgent connection to `vm` (`proven`: it resumes its session
    /// with the secret), or why it cannot be served now.
    fn welcome_flags(
        &self,
        hello: &SessionParams,
        vm: &ServedVm,
        proven: bool,
    ) -> Result<u32, (ErrorCode, String)> {
        let resumed = hello.resumed();
        let precopy = match &self.precopy {
            None => 0,
            Some(engine) if engine.failure().is_some() => {
                let why = engine.failure().unwrap_or_default();
                let text = format!("the migration failed at the source: {why}");
                return Err((ErrorCode::Internal, text));
            }
            Some(engine) if u64::from(hello.page_size) != engine.page_size => {
                let text = format!(
                    "precopy tracks the source VMM's {}-byte pages; a destination in {}-byte pages cannot follow its discards",
                    engine.page_size, hello.page_size
                );
                return Err((ErrorCode::LayoutMismatch, text));
            }
            Some(engine) if !engine.switched() && resumed => {
                let text = "the source still runs (precopy): a destination whose guest runs already cannot be served";
                return Err((ErrorCode::Protocol, text.into()));
            }
            // Precopy rounds, or the discards and the switch this destination missed.
            Some(_) if !resumed => FLAG_PRECOPY,
            Some(_) => 0,
        };
        let free = if vm.source.has_free_hints() {
            FLAG_FREE
        } else {
            0
        };
        Ok(precopy | free | if proven { FLAG_PROVEN } else { 0 })
    }

    /// Which session an urgent connection to VM `index` opens or resumes (`claim.rs`).
    fn claim(&self, index: usize, admitted: &Admitted) -> Claim {
        let slot = &self.slots[index];
        let pending = slot.pending.as_ref().map(|p| Known {
            id: p.welcome.session_id,
            secret: p.secret.clone(),
        });
        claim::claim(
            admitted.hello().session_id,
            pending.as_ref(),
            slot.established.as_ref(),
            slot.running.is_some(),
            |secret| admitted.proves(secret),
        )
    }

    fn on_bulk(&mut self, mut admitted: Box<Admitted>) {
        let hello = *admitted.hello();
        if hello.extra_stream() {
            return self.on_extra_stream(admitted);
        }
        // The VM by name, as for the urgent connection; then that VM's pending session only,
        // with the proof of its secret.
        let index = fleet::find(self.vms, &hello.vm).ok().filter(|&index| {
            self.slots[index]
                .pending
                .as_ref()
                .is_some_and(|p| joins(&p.welcome, &hello) && admitted.proves(&p.secret))
        });
        let Some(index) = index else {
            let text = "no session of this VM waits for a bulk connection with this layout and this session's secret";
            return self.refuse(admitted, ErrorCode::UnknownSession, text);
        };
        let pending = self.slots[index].pending.take().expect("checked above");
        if !self.welcome(&mut admitted, pending.welcome, self.vms[index].name) {
            return;
        }
        let Admitted {
            conn,
            greeted,
            encoder,
            ..
        } = *admitted;
        self.start_session(index, pending, (conn, greeted.reader, encoder));
    }

    /// Another bulk connection of a running session (`faultd --streams`): it takes a share
    /// of the push on a thread of its own, at most [`MAX_STREAMS`] per session.
    fn on_extra_stream(&mut self, mut admitted: Box<Admitted>) {
        let hello = *admitted.hello();
        let running = fleet::find(self.vms, &hello.vm).ok().and_then(|index| {
            let slot = &self.slots[index];
            let proven = slot
                .established
                .as_ref()
                .is_some_and(|e| admitted.proves(&e.secret));
            slot.running
                .as_ref()
                .filter(|r| proven && joins(&r.welcome, &hello))
        });
        let Some(running) = running else {
            let text = "no running session of this VM with this layout and this session's secret";
            return self.refuse(admitted, ErrorCode::UnknownSession, text);
        };
        let (session, welcome) = (running.session.clone(), running.welcome);
        if self.config.session.naive_single_connection {
            let text =
                "this pagesrv runs the single-connection baseline: no extra bulk connections";
            return self.refuse(admitted, ErrorCode::Protocol, text);
        }
        if !session.admit_stream() {
            let text = format!("a session has at most {MAX_STREAMS} bulk connections");
            return self.refuse(admitted, ErrorCode::Protocol, &text);
        }
        if !self.welcome(&mut admitted, welcome, session.vm) {
            return;
        }
        let Admitted { conn, encoder, .. } = *admitted;
        self.scope.spawn(move || {
            let _span = info_span!(
                "session",
                vm = %session.vm,
                id = format_args!("{:016x}", session.id)
            )
            .entered();
            session.push_extra(conn, encoder);
        });
    }

    fn start_session(
        &mut self,
        index: usize,
        pending: Pending,
        bulk: (TcpStream, FrameReader, FrameEncoder),
    ) {
        self.serials += 1;
        let serial = self.serials;
        let vm = &self.vms[index];
        vm.source.refresh_holes();
        let pending_welcome = pending.welcome;
        let paged = vm
            .source
            .paged(u64::from(pending.welcome.page_size))
            .expect("the page size was checked when the destination was welcomed");
        let switch = Switch {
            engine: self.precopy.clone(),
            first: pending.welcome.precopy(),
            free_first: pending.welcome.free_first(),
            base: pending.admitted.hello().has_base(),
        };
        let session = Arc::new(Session::new(
            paged,
            (vm.name, pending.welcome.session_id),
            self.config.session.clone(),
            switch,
            Arc::new(self.events.clone()),
        ));
        let (tx, session_for_thread) = (self.notify.clone(), session.clone());
        let published = self.events.metrics.clone();
        let Admitted {
            conn,
            greeted,
            encoder: urgent_tx,
            ..
        } = *pending.admitted;
        let reader = greeted.reader;
        let handle = self.scope.spawn(move || {
            let session = session_for_thread;
            let _span = info_span!(
                "session",
                vm = %session.vm,
                id = format_args!("{:016x}", session.id)
            )
            .entered();
            let outcome = std::thread::scope(|s| {
                let (done_tx, done_rx) = mpsc::channel::<()>();
                let reporter = s.spawn(|| report_progress(&session, published.as_deref(), done_rx));
                let outcome = session.run(conn, reader, urgent_tx, bulk);
                drop(done_tx);
                let _ = reporter.join();
                outcome
            });
            let _ = tx.send(Event::SessionEnded { serial });
            outcome
        });
        let slot = &mut self.slots[index];
        slot.established = Some(Known {
            id: pending_welcome.session_id,
            secret: pending.secret,
        });
        slot.sessions += 1;
        slot.first_start.get_or_insert_with(Instant::now);
        slot.running = Some(Running {
            serial,
            session,
            handle,
            welcome: pending_welcome,
        });
    }

    /// A session thread ended (one replaced by a reconnect was concluded already).
    fn on_session_ended(&mut self, serial: u64) {
        if let Some(index) = self
            .slots
            .iter()
            .position(|slot| slot.running.as_ref().is_some_and(|r| r.serial == serial))
        {
            self.end_session(index, false);
        }
    }

    /// Every VM's migration ended: one line per VM, and an error naming those that failed.
    /// What the source VMM is told (`--vmm-uds`: one VM), once its migration ended.
    fn source_outcome(&self) -> Option<SourceOutcome> {
        match self.slots.first()?.finished.as_ref()? {
            Finished::Completed { verified } => Some(SourceOutcome::Completed {
                verified: *verified,
            }),
            Finished::Failed(why) => Some(SourceOutcome::Failed {
                reason: why.clone(),
            }),
        }
    }

    fn verdict(&self) -> Result<Verdict> {
        let mut failed = Vec::new();
        for (vm, slot) in self.vms.iter().zip(&self.slots) {
            if let Some(finished) = &slot.finished {
                print_vm_totals(vm, slot, finished);
                if let Finished::Failed(why) = finished {
                    failed.push(format!("VM {}: {why}", vm.name));
                }
            }
        }
        if failed.is_empty() {
            let verified = self
                .slots
                .iter()
                .all(|slot| matches!(slot.finished, Some(Finished::Completed { verified: true })));
            return Ok(if verified {
                Verdict::Verified
            } else {
                Verdict::Unverified
            });
        }
        bail!(
            "the migration failed: {}; keep the source VM (do not destroy it)",
            failed.join("; ")
        )
    }
}

/// One line on stderr with a VM's totals over its sessions.
fn print_vm_totals(vm: &ServedVm, slot: &Slot<'_, '_>, finished: &Finished) {
    let secs = match (slot.first_start, slot.last_end) {
        (Some(start), Some(end)) => end.duration_since(start).as_secs_f64(),
        _ => 0.0,
    };
    let how = match finished {
        Finished::Completed { verified: true } => "completed (verified)".to_string(),
        Finished::Completed { verified: false } => "completed (NOT verified)".to_string(),
        Finished::Failed(why) => format!("FAILED ({why})"),
    };
    let mib = slot.bytes_sent as f64 / f64::from(1 << 20);
    eprintln!(
        "pagesrv: VM {}: {how}, {} session(s), {mib:.1} MiB sent in {secs:.3} s ({:.0} MiB/s)",
        vm.name,
        slot.sessions,
        mib / secs.max(1e-9)
    );
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
