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
//! Here: the manager's state and its loop; `connections.rs`: what it does with an admitted
//! connection (refuse, welcome, start a session); `endings.rs`: how a session ends.
//!
//! # Templates
//!
//! A template (a stored snapshot, or `--template`) is restored by many destinations at
//! once: each urgent `Hello` that names none of its sessions opens one more (at most
//! `--max-restores`; a `Hello` naming one is claimed against it alone, `claim.rs`). The
//! manager then holds one [`Slot`] per restore instead of one per VM, created by the
//! connection and dropped when the restore ends (completed, failed, or cut off and not
//! resumed within [`RESUME_WINDOW`]); the template itself never finishes.
//!
//! # Several VMs
//!
//! Each VM has at most one session (a template one per restore), so pagesrv runs at most
//! three threads per session (urgent, pusher, progress), never one per page or per request.
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

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::auth::{Psk, ResumeSecret};
use common::wire::{Role, SessionParams};
use tracing::{info, warn};

use crate::claim::Known;
use crate::fleet::ServedVm;
use crate::handshake::{Admitted, HANDSHAKE_DEADLINE};
use crate::report::Events;
use crate::session::{Outcome, Session, SessionConfig};

mod connections;
mod endings;

use endings::release_source;

/// Send buffer of the bulk connection: small enough that pre-paging takes effect quickly.
const BULK_SNDBUF_BYTES: usize = 1 << 20;
/// How often a VM's refused takeover attempts are logged (one line per window).
const TAKEOVER_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often refusals after a handshake are logged (one line per window).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long a template's restore that broke off waits for its destination to resume it
/// before it is forgotten (a migrated VM's session waits for ever: its guest exists once).
const RESUME_WINDOW: Duration = Duration::from_secs(120);

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
    /// Most restores of one template at once (`--max-restores`).
    pub max_restores: usize,
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
pub fn serve(vms: &[ServedVm], config: &ServerConfig, events: Events) -> Result<Verdict> {
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
            // A slot per VM; a template's come and go with its restores.
            slots: (0..vms.len())
                .filter(|&vm| !vms[vm].template)
                .map(Slot::of)
                .collect(),
            config,
            notify: tx,
            serials: 0,
            events,
            done: None,
            refusals: std::cell::RefCell::new(LogWindow::new(REFUSAL_LOG_EVERY)),
            live,
        };
        let result = manager.run(&rx);
        for index in 0..manager.slots.len() {
            manager.end_session(index, true);
        }
        for (index, vm) in vms.iter().enumerate() {
            if let Some(engine) = &vm.source_vmm {
                release_source(engine, manager.source_outcome(index));
            }
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

/// A session's threads.
struct Running<'scope, 'env> {
    serial: u64,
    session: Arc<Session<'env>>,
    handle: ScopedJoinHandle<'scope, Outcome>,
    /// What its connections were welcomed with (extra streams get the same).
    welcome: SessionParams,
    /// A restore of a template sharing a guest RAM file: its place among those running at
    /// once, which sets where its push starts ([`connections`]' `spread`).
    stagger_index: Option<u64>,
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

impl Pending {
    /// The session it opens, with its secret.
    fn known(&self) -> Known {
        Known {
            id: self.welcome.session_id,
            secret: self.secret.clone(),
        }
    }
}

/// How a VM's migration ended (without `--serve-forever`, it is served no more).
#[derive(Debug, Clone)]
enum Finished {
    Completed { verified: bool },
    Failed(String),
}

/// One served VM's state (or one restore's, for a template): at most one session running
/// and one waiting for its bulk connection, and the totals over its sessions.
#[derive(Default)]
struct Slot<'scope, 'env> {
    /// Which VM (index into the served VMs).
    vm: usize,
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
    /// One per VM that is no template, and one per restore of a template (each names its
    /// VM); indices hold within one event only (a template's slots come and go).
    slots: Vec<Slot<'scope, 'env>>,
    config: &'env ServerConfig,
    notify: Sender<Event>,
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

impl Slot<'_, '_> {
    fn of(vm: usize) -> Self {
        Slot {
            vm,
            ..Slot::default()
        }
    }

    /// Whether a template's restore is over: nothing running or connecting, and no session
    /// its destination may still resume.
    fn restore_over(&self) -> bool {
        self.running.is_none()
            && self.pending.is_none()
            && (self.established.is_none()
                || self.last_end.is_some_and(|t| t.elapsed() > RESUME_WINDOW))
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
            for slot in &mut self.slots {
                if slot
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.since.elapsed() > HANDSHAKE_DEADLINE)
                {
                    let p = slot.pending.take().expect("checked");
                    warn!(peer = %p.admitted.peer, vm = %self.vms[slot.vm].name, "the destination never opened its bulk connection");
                }
            }
            let vms = self.vms;
            self.slots
                .retain(|slot| !(vms[slot.vm].template && slot.restore_over()));
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
}
