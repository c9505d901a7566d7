//! The fault thread's loop, a pump around the session (`core::session::DestSession`, which
//! makes every decision): one mio poll over the uffd, the urgent connection, the VMM's
//! socket and a waker for the helper threads (connector, bulk), ticking for heartbeats, the
//! link timeout and deferred work; until the session is done. Here: registration, reads,
//! writes, the waker, and what the session's answers mean for the sockets and threads.
//!
//! In precopy the guest here waits: faultd says when it may resume (a line on stdout, the
//! `switched` event on the control socket), once the source is paused and the pages it wrote
//! after sending them are dropped.
//!
//! A lost or silent link is not fatal in any stage: the connector gets a new one while the
//! loop goes on reading faults. Only the VMM going away, a uffd failure, a placement the
//! kernel refuses, a final refusal by pagesrv or `--reconnect-timeout` end the migration
//! early; pagesrv is then told (`Error{DestinationFailed}`) so the source keeps the VM.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use common::control::ControlServer;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::core::kernel::{Kernel, UffdKernel};
pub use crate::core::session::Verdict;
use crate::core::session::{AfterCut, DestSession, FrameError, error_chain as chain};
use crate::core::vm::Vm;
use crate::stats::Stats;
use crate::status::{LinkStatus, StatusBoard};
use crate::upstream::link::{Link, LinkConfig, LinkEvent, Links};

const UFFD: Token = Token(0);
const URGENT: Token = Token(1);
const VMM: Token = Token(2);
const LINK_EVENT: Token = Token(3);

/// How a migration ended (without a fatal error).
pub struct Report {
    /// The stats JSON.
    pub stats: Stats,
    /// The check against the source.
    pub verdict: Verdict,
}

/// Runs the migration of `vm` to its end.
///
/// # Errors
/// The VMM going away, a uffd or placement failure, pagesrv refusing for good, or the
/// reconnect timeout; each with its context.
pub fn run(
    vm: &Vm<UffdKernel>,
    config: &LinkConfig,
    options: Options,
    vmm: UnixStream,
    started: Instant,
) -> Result<Report> {
    let mut poll = Poll::new().context("failed to create the poll")?;
    let waker = Waker::new(poll.registry(), LINK_EVENT).context("failed to create a waker")?;
    std::thread::scope(|s| {
        let mut fl = FaultLoop {
            vm,
            links: Links::new(
                s,
                vm,
                waker,
                config,
                crate::status::switch_announcer(vm, &options.control),
            ),
            session: DestSession::new(vm, options.verify, config.liveness, started),
            link: None,
            config,
            status: StatusBoard::new(
                options.status,
                options.control.is_some() || options.publish_status,
                started,
            ),
            control: options.control,
            vmm: &vmm,
            vmm_watched: true,
            shared_looked: vm.kernel.shares_ram().then(Instant::now),
        };
        if options.record_working_set.is_some() {
            fl.session.core.record_working_set();
        }
        let result = fl.run(&mut poll);
        let link = fl.link_status();
        fl.status.publish(vm, &fl.session, link, result.is_err());
        if let Some(path) = &options.record_working_set {
            let pages = fl.session.core.working_set();
            crate::stats::save_working_set(vm, pages, fl.links.pins.image_id, path);
        }
        crate::status::emit_end(&fl.control, &result);
        fl.links.stop_connector();
        if let Err(e) = &result {
            fl.tell_source_we_failed(e);
        }
        if let Some(link) = fl.link.take() {
            fl.links.close(link, poll.registry());
        }
        let verdict = result?;
        fl.session.core.resolve_all();
        let stats = Stats::of_session(vm, &fl.session, &verdict, fl.links.cuts, started);
        Ok(Report { stats, verdict })
    })
}

/// How the loop runs, beyond the link.
pub struct Options {
    /// Compare digests with the source at the end.
    pub verify: bool,
    /// The control socket, for events.
    pub control: Option<Arc<ControlServer>>,
    /// What the control socket's `status` answers (and the metrics show), refreshed by the
    /// loop.
    pub status: Arc<Mutex<Value>>,
    /// Refresh `status` even without a control socket (the metrics endpoint reads it).
    pub publish_status: bool,
    /// Record the pages the guest faults on, in first-fault order, into this file when the
    /// loop ends (also when it fails: the guest's accesses are worth keeping either way).
    pub record_working_set: Option<PathBuf>,
}

struct FaultLoop<'s, 'e> {
    vm: &'e Vm<UffdKernel>,
    links: Links<'s, 'e, UffdKernel>,
    session: DestSession<'e, UffdKernel>,
    /// The open link's sockets (its protocol state is the session's).
    link: Option<Link>,
    config: &'e LinkConfig,
    control: Option<Arc<ControlServer>>,
    /// What `status` answers, kept fresh.
    status: StatusBoard,
    vmm: &'e UnixStream,
    vmm_watched: bool,
    /// When pages other restores placed in a shared guest RAM file were last looked for
    /// (`None`: RAM is not shared).
    shared_looked: Option<Instant>,
}

/// How often faultd looks for pages other restores placed in a shared guest RAM file, and
/// at how many pages from the next it misses (one `mincore`; looks at 16 Ki pages a run
/// every 10 ms in each of 16 clones took both cores of this machine).
const SHARED_LOOK_EVERY: Duration = Duration::from_millis(50);
const SHARED_LOOK_PAGES: u64 = 4096;

impl FaultLoop<'_, '_> {
    fn run(&mut self, poll: &mut Poll) -> Result<Verdict> {
        for failed in self.config.fast_path.enter_latency_thread() {
            debug!(what = %failed, "fault thread placement");
        }
        self.vmm.set_nonblocking(true)?;
        let uffd_fd = self.vm.kernel.uffd().as_fd().as_raw_fd();
        let vmm_fd = self.vmm.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&uffd_fd), UFFD, Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&vmm_fd), VMM, Interest::READABLE)?;
        // Faults may be queued from before we started polling (the VMM faults during restore).
        self.session.on_uffd()?;
        self.links.start_connector();
        let mut events = Events::with_capacity(16);
        loop {
            self.session.advance(Instant::now());
            if let Some(verdict) = self.session.done() {
                return Ok(verdict.clone());
            }
            self.flush(poll);
            let mut timeout = self.session.poll_timeout();
            if self.shared_looked.is_some() {
                timeout = timeout.min(SHARED_LOOK_EVERY);
            }
            if !self.busy_poll(poll, &mut events) {
                match poll.poll(&mut events, Some(timeout)) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => other.context("poll failed")?,
                }
            }
            let mut drained = false;
            for event in &events {
                match event.token() {
                    UFFD => {
                        self.session.on_uffd()?;
                        drained = true;
                    }
                    URGENT => self.on_urgent(poll)?,
                    VMM => self.on_vmm(poll)?,
                    LINK_EVENT => self.on_link_events(poll)?,
                    _ => {}
                }
            }
            if !drained && self.session.has_deferred_work() {
                self.session.on_uffd()?;
            }
            self.look_at_shared_ram()?;
            if let Some(fault) = self.session.on_tick(Instant::now()) {
                self.cut(poll, &chain(&fault));
            }
            let link = self.link_status();
            self.status.refresh(self.vm, &self.session, link);
        }
    }

    /// Every [`SHARED_LOOK_EVERY`] while pages are missing: takes over the pages other
    /// restores placed in the shared guest RAM file (see `FaultCore::adopt_shared`).
    fn look_at_shared_ram(&mut self) -> Result<()> {
        let Some(last) = self.shared_looked else {
            return Ok(());
        };
        if last.elapsed() < SHARED_LOOK_EVERY || self.vm.is_complete() {
            return Ok(());
        }
        self.shared_looked = Some(Instant::now());
        if let Err(e) = self.session.core.adopt_shared(SHARED_LOOK_PAGES) {
            // Taking pages over only saves traffic: without it every page still comes.
            warn!(error = %chain(&e), "cannot look at the shared guest RAM file; no more pages are taken over from it");
            self.shared_looked = None;
        }
        Ok(())
    }

    /// With `--busy-poll-us`, while a requested page is on its way: polls without sleeping
    /// until something is ready or the budget is spent. Returns whether `events` is filled.
    fn busy_poll(&self, poll: &mut Poll, events: &mut Events) -> bool {
        let budget = self.config.fast_path.busy_poll;
        // Only while requests go out: no reply comes for a fault that is held.
        if budget.is_zero() || !self.session.awaits_replies() {
            return false;
        }
        common::sched::spin_until(budget, || {
            poll.poll(events, Some(Duration::ZERO)).is_ok() && !events.is_empty()
        })
    }

    /// What the status says of the link.
    fn link_status(&self) -> LinkStatus {
        LinkStatus {
            reconnects: self.links.cuts,
            up: self.link.is_some(),
        }
    }

    /// Writes what the session's outbox holds without blocking; arms WRITABLE for the rest.
    fn flush(&mut self, poll: &Poll) {
        self.session.prepare_transmit();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let outbox = self.session.outbox();
        let mut sent = 0;
        let mut failure = None;
        while sent < outbox.len() {
            match link.urgent.write(&outbox[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        self.session.sent(sent, Instant::now());
        if let Some(e) = failure {
            self.cut(poll, &format!("failed to send to pagesrv: {e}"));
            return;
        }
        let want = !self.session.outbox().is_empty();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if want != link.writable_armed {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if let Err(e) = poll
                .registry()
                .reregister(&mut link.urgent, URGENT, interest)
            {
                self.cut(poll, &format!("failed to re-arm the urgent socket: {e}"));
                return;
            }
            link.writable_armed = want;
        }
    }

    /// Lets the link go as the session says: replaced (reconnect), or closed for good.
    fn cut(&mut self, poll: &Poll, why: &str) {
        let Some(link) = self.link.take() else {
            return;
        };
        match self.session.link_lost(&why) {
            AfterCut::Reconnect => self.links.cut(link, poll.registry(), why),
            AfterCut::Close => self.links.close(link, poll.registry()),
        }
    }

    fn on_urgent(&mut self, poll: &Poll) -> Result<()> {
        loop {
            let (Some(link), Some(reader)) = (self.link.as_mut(), self.session.urgent_reader())
            else {
                return Ok(());
            };
            match reader.fill(&mut link.urgent) {
                Ok(0) => {
                    match self.session.on_urgent_closed() {
                        Some(fault) => self.cut(poll, &chain(&fault)),
                        None => {
                            // The session is done: the link goes with the loop's end.
                        }
                    }
                    return Ok(());
                }
                Ok(_) => match self.session.on_urgent_bytes(Instant::now()) {
                    Ok(()) => {}
                    Err(FrameError::Link(fault)) => {
                        self.cut(poll, &chain(&fault));
                        return Ok(());
                    }
                    Err(FrameError::Fatal(e)) => return Err(e.into()),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.cut(poll, &format!("failed to read from pagesrv: {e}"));
                    return Ok(());
                }
            }
        }
    }

    fn on_vmm(&mut self, poll: &Poll) -> Result<()> {
        if !self.vmm_watched {
            return Ok(());
        }
        if crate::vmm::read_vmm_socket(self.vmm, self.session.serving())? {
            // The guest no longer needs us; the verdict still goes to the source.
            let fd = self.vmm.as_raw_fd();
            let _ = poll.registry().deregister(&mut SourceFd(&fd));
            self.vmm_watched = false;
        }
        Ok(())
    }

    fn on_link_events(&mut self, poll: &Poll) -> Result<()> {
        while let Ok(event) = self.links.events.try_recv() {
            match event {
                LinkEvent::BulkEnded { generation, result } => match result {
                    Ok(end) => debug!(generation, ?end, "bulk thread ended"),
                    Err(e) if !e.is_link_failure() => {
                        return Err(anyhow!(e).context("failed to place pushed pages"));
                    }
                    Err(e) if self.session.bulk_link_failed(generation) => {
                        self.cut(poll, &chain(&e));
                    }
                    Err(e) => debug!(generation, error = %e, "bulk thread ended"),
                },
                LinkEvent::Connected(Ok(up)) => {
                    // Before any page goes into a guest RAM file other VMs share.
                    self.vm
                        .kernel
                        .bind_shared_ram(up.pins.image_id, up.precopy)?;
                    let told = self.links.switch_announced();
                    let can_drop = self.vm.kernel.can_drop_pages();
                    // Before its bulk threads start: they apply what they read at once.
                    self.session.accepts_link(up.precopy, told, can_drop)?;
                    let (link, state) = self.links.open(up, poll.registry(), URGENT)?;
                    let (generation, sealed) = (state.generation, state.is_sealed());
                    self.link = Some(link);
                    if self.session.link_up(state, told, can_drop)? {
                        // The guest runs: say so on every later connection.
                        self.links.pins.resumed = true;
                    }
                    // One line on stdout per link, for scripts and tests.
                    println!(
                        "faultd link to pagesrv up (session {:016x}, generation {generation})",
                        self.links.pins.session_id
                    );
                    info!(
                        generation,
                        waiting_faults = self.session.core.pages_in_flight(),
                        sealed,
                        "link to pagesrv up"
                    );
                }
                LinkEvent::Connected(Err(e)) => return Err(e),
                LinkEvent::Switched { generation } => {
                    if self.session.on_switched(generation, Instant::now()) {
                        self.links.pins.resumed = true;
                    }
                }
                LinkEvent::Synced { generation } => self.session.on_synced(generation),
            }
        }
        Ok(())
    }

    /// After a fatal error: tell pagesrv, if it can be told at once, that this destination
    /// failed, so the source keeps the VM.
    fn tell_source_we_failed(&mut self, why: &anyhow::Error) {
        let frames = self.session.failure_frames(&format!("{why:#}"));
        if let (Some(link), Some(frames)) = (self.link.as_mut(), frames) {
            link.send_blocking(&frames, self.config.liveness.timeout);
        }
    }
}
