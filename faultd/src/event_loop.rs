//! The fault thread's loop: one mio poll over the uffd, the urgent connection, the VMM's
//! socket and a waker for the helper threads (connector, bulk), ticking for heartbeats, the
//! link timeout and deferred work; until every page is present and the source has the
//! verdict.
//!
//! ```text
//!  [Precopy ──Switchover──►] Migrating ──every page present: unregister──► Verifying
//!   (rounds, discards)        (faults, replies, pushes)      (DigestQuery on each new link)
//!        ──Digests──► Closing ──EOF──► end
//!                     (Goodbye, or Error VerifyFailed)
//! ```
//!
//! In precopy the guest here waits: faultd says when it may resume (a line on stdout, the
//! `switched` event on the control socket), once the source is paused and the pages it wrote
//! after sending them are dropped.
//!
//! A lost or silent link is not fatal in any stage: the connector gets a new one while the
//! loop goes on reading faults. Only the VMM going away, a uffd failure, a placement the
//! kernel refuses, a final refusal by pagesrv or `--reconnect-timeout` end the migration
//! early; pagesrv is then told (`Error{DestinationFailed}`) so the source keeps the VM.

use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::control::ControlServer;
use common::wire::phase::Phase;
use common::wire::{ErrorCode, Message, RANGE_FRAME_BYTES};
use common::working_set::WorkingSet;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};

use crate::core::fault::FaultCore;
use crate::core::kernel::UffdKernel;
use crate::core::vm::{Counters, Vm};
use crate::stats::Stats;
use crate::upstream::link::{Link, LinkConfig, LinkEvent, Links, SwitchAnnouncer, encode_maps};

const UFFD: Token = Token(0);
const URGENT: Token = Token(1);
const VMM: Token = Token(2);
const LINK_EVENT: Token = Token(3);

/// How soon work deferred by EAGAIN is retried when no event arrives.
const DEFERRED_RETRY: Duration = Duration::from_millis(1);

/// The end-to-end check of every page against the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every page that arrived matches the source.
    Verified,
    /// These page ranges differ from the source.
    Mismatch(Vec<Range<u64>>),
    /// Not checked (`--no-verify`).
    NotVerified,
}

impl Verdict {
    /// As the stats and events name it.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Verified => "match",
            Verdict::Mismatch(_) => "mismatch",
            Verdict::NotVerified => "not verified",
        }
    }
}

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
            links: Links::new(s, vm, waker, config, switch_announcer(vm, &options.control)),
            core: FaultCore::new(vm),
            link: None,
            stage: Stage::Migrating,
            config,
            verify: options.verify,
            publish_status: options.control.is_some() || options.publish_status,
            failed: false,
            control: options.control,
            status: options.status,
            status_at: started,
            vmm: &vmm,
            vmm_watched: true,
            completed_in: None,
            switched_in: None,
            started,
        };
        if options.record_working_set.is_some() {
            fl.core.record_working_set();
        }
        let result = fl.run(&mut poll);
        fl.failed = result.is_err();
        fl.publish_status_now();
        if let Some(path) = &options.record_working_set {
            save_working_set(vm, &fl, path);
        }
        if let Some(control) = &fl.control {
            let event = match &result {
                Ok(verdict) => json!({"event": "completed", "verdict": verdict.name()}),
                Err(e) => json!({"event": "failed", "error": format!("{e:#}")}),
            };
            control.emit_sticky(&event);
        }
        fl.links.stop_connector();
        if let Err(e) = &result {
            fl.tell_source_we_failed(e);
        }
        if let Some(link) = fl.link.take() {
            fl.links.close(link, poll.registry());
        }
        let verdict = result?;
        fl.core.resolve_all();
        let duration = fl.completed_in.unwrap_or_else(|| started.elapsed());
        let mut stats = Stats::collect(
            vm,
            fl.core.faults,
            &fl.core.latencies,
            duration,
            &verdict,
            fl.links.cuts,
        );
        stats.switched_ms = fl.switched_in.map(|d| d.as_secs_f64() * 1000.0);
        let since_completed = started.elapsed().saturating_sub(duration);
        stats.completed_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(since_completed)
            .as_secs_f64()
            * 1000.0;
        Ok(Report { stats, verdict })
    })
}

/// Writes the pages the guest faulted on to `path` (a failure is logged: the migration's
/// outcome does not depend on it).
fn save_working_set(vm: &Vm<UffdKernel>, fl: &FaultLoop<'_, '_>, path: &Path) {
    let Some(pages) = fl.core.working_set() else {
        return;
    };
    if pages.is_empty() || fl.links.pins.image_id == 0 {
        // Nothing recorded, or never linked to pagesrv (no image to tie it to): an earlier
        // recording in that file is worth more than an empty one.
        warn!(file = %path.display(), "no working set recorded: the file is left as it was");
        return;
    }
    let set = WorkingSet {
        page_size: u32::try_from(vm.page_size()).unwrap_or(u32::MAX),
        total_pages: vm.total_pages(),
        image_id: fl.links.pins.image_id,
        pages: pages.to_vec(),
    };
    match set.write(path) {
        Ok(()) => info!(
            pages = set.pages.len(),
            file = %path.display(),
            "recorded the working set"
        ),
        Err(e) => warn!(error = %e, "failed to record the working set"),
    }
}

/// Tells the VMM that its guest may resume (the links do it once): one line on stdout for
/// scripts, and the `switched` event for orchestrators.
fn switch_announcer<'env>(
    vm: &'env Vm<UffdKernel>,
    control: &Option<Arc<ControlServer>>,
) -> SwitchAnnouncer<'env> {
    let control = control.clone();
    Arc::new(move || {
        println!("faultd switched to postcopy: resume the guest");
        if let Some(control) = &control {
            control.emit_sticky(&json!({
                "event": "switched",
                "pages_present": vm.done.set_pages(),
                "pages_discarded": Counters::get(&vm.counters.pages_discarded),
            }));
        }
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

enum Stage {
    /// The source still runs: precopy rounds arrive; the guest here waits for the switch.
    /// Faults its VMM takes meanwhile wait for it too (no request goes out: a reply could
    /// race with a discard of the same page on the bulk connection).
    Precopy,
    /// Pages still missing.
    Migrating,
    /// Every page is present; the source's digests are asked for on each new link.
    Verifying {
        /// The link generation the query went out on.
        asked_on: Option<u64>,
    },
    /// The verdict is queued; waiting for it to be written and the source to close.
    Closing {
        verdict: Verdict,
        /// Give up waiting for the source to close after this.
        until: Instant,
    },
    /// The source has the verdict.
    Done(Verdict),
}

struct FaultLoop<'s, 'e> {
    vm: &'e Vm<UffdKernel>,
    links: Links<'s, 'e, UffdKernel>,
    core: FaultCore<'e, UffdKernel>,
    link: Option<Link>,
    stage: Stage,
    config: &'e LinkConfig,
    verify: bool,
    control: Option<Arc<ControlServer>>,
    /// Keep `status` fresh (a control socket or the metrics endpoint reads it).
    publish_status: bool,
    /// The loop ended with an error.
    failed: bool,
    status: Arc<Mutex<Value>>,
    status_at: Instant,
    vmm: &'e UnixStream,
    vmm_watched: bool,
    completed_in: Option<Duration>,
    switched_in: Option<Duration>,
    started: Instant,
}

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
        self.core.drain_events().context("failed to serve faults")?;
        self.links.start_connector();
        let mut events = Events::with_capacity(16);
        loop {
            self.advance_stage()?;
            if let Stage::Done(verdict) = &self.stage {
                return Ok(verdict.clone());
            }
            self.flush(poll);
            let timeout = if self.serving() && self.core.has_deferred() {
                DEFERRED_RETRY
            } else {
                self.config.liveness.heartbeat / 2
            };
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
                        self.on_uffd()?;
                        drained = true;
                    }
                    URGENT => self.on_urgent(poll)?,
                    VMM => self.on_vmm(poll)?,
                    LINK_EVENT => self.on_link_events(poll)?,
                    _ => {}
                }
            }
            if !drained && self.serving() && self.core.has_deferred() {
                self.on_uffd()?;
            }
            self.check_liveness(poll);
            self.refresh_status();
        }
    }

    /// With `--busy-poll-us`, while a requested page is on its way: polls without sleeping
    /// until something is ready or the budget is spent. Returns whether `events` is filled.
    fn busy_poll(&self, poll: &mut Poll, events: &mut Events) -> bool {
        let budget = self.config.fast_path.busy_poll;
        // Only while requests go out: no reply comes for a fault that is held.
        if budget.is_zero() || self.core.pages_in_flight() == 0 || !self.faults_released() {
            return false;
        }
        common::sched::spin_until(budget, || {
            poll.poll(events, Some(Duration::ZERO)).is_ok() && !events.is_empty()
        })
    }

    /// Whether the guest still depends on faultd (pages may be missing).
    fn serving(&self) -> bool {
        matches!(self.stage, Stage::Precopy | Stage::Migrating)
    }

    fn stage_name(&self) -> &'static str {
        if self.failed {
            return "failed";
        }
        match self.stage {
            Stage::Precopy => "precopy",
            Stage::Migrating => "postcopy",
            Stage::Verifying { .. } => "verifying",
            Stage::Closing { .. } => "closing",
            Stage::Done(_) => "done",
        }
    }

    /// Refreshes what the control socket's `status` answers (every 100 ms at most).
    fn refresh_status(&mut self) {
        if self.status_at.elapsed() >= Duration::from_millis(100) {
            self.publish_status_now();
        }
    }

    /// Refreshes `status` now (also the last time, with the verdict).
    fn publish_status_now(&mut self) {
        if !self.publish_status {
            return;
        }
        self.status_at = Instant::now();
        let c = &self.vm.counters;
        let (latency_buckets, latency_sum) = self.core.latencies.live();
        let status = json!({
            "status": {
                "phase": self.stage_name(),
                "pages_total": self.vm.total_pages(),
                "pages_present": self.vm.done.set_pages(),
                "faults": self.core.faults,
                "faults_waiting": self.core.pages_in_flight(),
                "bytes_received": Counters::get(&c.bytes_received),
                "bytes_precopy": Counters::get(&c.bytes_precopy),
                "pages_discarded": Counters::get(&c.pages_discarded),
                "reconnects": self.links.cuts,
                "link_up": self.link.is_some(),
                "demand_faults": Counters::get(&c.demand_faults),
                "pages_requested": Counters::get(&c.pages_requested),
                "pages_pushed": Counters::get(&c.pages_pushed),
                "pages_zero": Counters::get(&c.pages_zero),
                "pages_removed": Counters::get(&c.pages_removed),
                "pages_reused": Counters::get(&c.pages_reused),
                "fault_latency_buckets_us": latency_buckets,
                "fault_latency_sum_seconds": latency_sum,
                "verdict": match &self.stage {
                    Stage::Done(v) | Stage::Closing { verdict: v, .. } => Value::from(v.name()),
                    _ => Value::Null,
                },
            }
        });
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    fn on_uffd(&mut self) -> Result<()> {
        if self.serving() {
            self.core.drain_events().context("failed to serve faults")
        } else {
            // Unregistered: only events that raced with it remain, and a REMOVE among them
            // blocks the VMM's madvise until read.
            let mut sink = Vec::new();
            self.vm
                .kernel
                .uffd()
                .read_events(&mut sink)
                .context("failed to read the last events")?;
            Ok(())
        }
    }

    /// Moves the stages on: completion, asking for digests on a new link, the end.
    fn advance_stage(&mut self) -> Result<()> {
        if matches!(self.stage, Stage::Migrating) && self.vm.is_complete() {
            self.complete();
        }
        let generation = self.link.as_ref().map(|l| l.generation);
        match &mut self.stage {
            Stage::Verifying { asked_on } if generation.is_some() && *asked_on != generation => {
                let link = self.link.as_mut().expect("checked above");
                // Frames the fault path queued (skips) go before the maps and the query:
                // nothing but the verdict may follow the query.
                for message in self.core.pending.drain(..) {
                    link.tx.encode(&message, &[], &mut link.outbox);
                }
                // Every page is here: say so in full (pagesrv accepts the end only when every
                // page is accounted for, and pages placed from an earlier link's data after
                // this link's maps were taken would be missing from its count).
                encode_maps(self.vm, &mut link.tx, &mut link.outbox);
                if self.verify {
                    let query = Message::DigestQuery {
                        chunk_pages: self.vm.digest_chunk_pages(),
                    };
                    link.phase.send(query.kind())?;
                    link.tx.encode(&query, &[], &mut link.outbox);
                    *asked_on = generation;
                } else {
                    link.tx.encode(&Message::Goodbye, &[], &mut link.outbox);
                    self.stage = Stage::Closing {
                        verdict: Verdict::NotVerified,
                        until: Instant::now() + self.config.liveness.timeout,
                    };
                }
            }
            Stage::Closing { verdict, until } if Instant::now() >= *until => {
                warn!("pagesrv did not close the session after the verdict; ending anyway");
                self.stage = Stage::Done(verdict.clone());
            }
            _ => {}
        }
        Ok(())
    }

    /// Every page is present: unregister the VMM's ranges (it runs free of us from here) and
    /// move on to verification.
    fn complete(&mut self) {
        self.completed_in = Some(self.started.elapsed());
        for region in self.vm.kernel.layout().regions() {
            if let Err(e) = self
                .vm
                .kernel
                .uffd()
                .unregister(region.host_base.0, region.size_bytes)
            {
                warn!(error = %e, "failed to unregister a region after completion");
            }
        }
        self.core.resolve_all();
        info!(
            ms = self.started.elapsed().as_millis() as u64,
            "every page is present; the guest no longer depends on faultd"
        );
        self.stage = Stage::Verifying { asked_on: None };
    }

    /// Writes what the outbox holds without blocking; arms WRITABLE for the rest.
    fn flush(&mut self, poll: &Poll) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if matches!(self.stage, Stage::Precopy | Stage::Migrating) {
            for message in self.core.pending.drain(..) {
                link.tx.encode(&message, &[], &mut link.outbox);
            }
        } else if !self.core.pending.is_empty() {
            // Every page is present and the maps and the query are out: only the verdict
            // may follow (requests and skips are moot now).
            debug!(
                frames = self.core.pending.len(),
                "dropping fault-path frames queued after completion"
            );
            self.core.pending.clear();
        }
        let outbox = &mut link.outbox;
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
        if sent > 0 {
            link.last_tx = Instant::now();
        }
        outbox.drain(..sent);
        if let Some(e) = failure {
            self.cut(poll, anyhow!(e).context("failed to send to pagesrv"));
            return;
        }
        let want = !link.outbox.is_empty();
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
                self.cut(
                    poll,
                    anyhow!(e).context("failed to re-arm the urgent socket"),
                );
                return;
            }
            link.writable_armed = want;
        }
    }

    /// Heartbeats on an idle link, and the link timeout.
    fn check_liveness(&mut self, poll: &Poll) {
        let liveness = self.config.liveness;
        let Some(link) = self.link.as_ref() else {
            return;
        };
        if link.last_rx.elapsed() > liveness.timeout {
            let silent = link.last_rx.elapsed();
            if matches!(self.stage, Stage::Closing { .. }) && link.outbox.is_empty() {
                self.finish_closing("the source went silent after the verdict");
                return;
            }
            self.cut(
                poll,
                anyhow!(
                    "no frame from pagesrv for {:.1} s (--link-timeout)",
                    silent.as_secs_f64()
                ),
            );
            return;
        }
        let closing = matches!(self.stage, Stage::Closing { .. });
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let idle = link.outbox.is_empty() && self.core.pending.is_empty();
        if !closing && idle && link.last_tx.elapsed() >= liveness.heartbeat {
            link.tx.encode(&Message::Heartbeat, &[], &mut link.outbox);
        }
    }

    fn cut(&mut self, poll: &Poll, why: anyhow::Error) {
        let Some(link) = self.link.take() else {
            return;
        };
        if let Stage::Closing { verdict, .. } = &self.stage {
            // Written in full, the verdict reached pagesrv's socket (which may close with a
            // reset once it has it); a mismatch is ours whether it arrived or not (the source
            // keeps waiting, which is safe). Either way, done.
            if link.outbox.is_empty() || matches!(verdict, Verdict::Mismatch(_)) {
                debug!(error = %format!("{why:#}"), "link closed after the verdict");
                self.stage = Stage::Done(verdict.clone());
                self.core.link_down();
                self.links.close(link, poll.registry());
                return;
            }
            self.stage = Stage::Verifying { asked_on: None };
        }
        self.core.link_down();
        self.links.cut(link, poll.registry(), &why);
    }

    fn finish_closing(&mut self, why: &str) {
        if let Stage::Closing { verdict, .. } = &self.stage {
            debug!(why, "session closed");
            self.stage = Stage::Done(verdict.clone());
        }
    }

    fn on_urgent(&mut self, poll: &Poll) -> Result<()> {
        loop {
            let Some(link) = self.link.as_mut() else {
                return Ok(());
            };
            match link.reader.fill(&mut link.urgent) {
                Ok(0) => {
                    if matches!(self.stage, Stage::Closing { .. }) && link.outbox.is_empty() {
                        self.finish_closing("pagesrv closed the session");
                    } else {
                        self.cut(poll, anyhow!("pagesrv closed the urgent connection"));
                    }
                    return Ok(());
                }
                Ok(_) => {
                    link.last_rx = Instant::now();
                    match self.handle_frames() {
                        Ok(()) => {}
                        Err(FrameError::Link(e)) => {
                            self.cut(poll, e);
                            return Ok(());
                        }
                        Err(FrameError::Fatal(e)) => return Err(e),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.cut(poll, anyhow!(e).context("failed to read from pagesrv"));
                    return Ok(());
                }
            }
        }
    }

    /// Handles every whole frame buffered on the urgent connection.
    fn handle_frames(&mut self) -> Result<(), FrameError> {
        let link = self.link.as_mut().expect("called with a link");
        while let Some((message, payload)) = link
            .reader
            .next_buffered()
            .map_err(|e| FrameError::Link(anyhow!(e).context("pagesrv sent a bad frame")))?
        {
            link.phase
                .receive(message.kind())
                .map_err(|e| FrameError::Link(anyhow!(e).context("pagesrv broke the protocol")))?;
            match message {
                Message::PageRun(range) | Message::ZeroRun(range) => {
                    let data = matches!(message, Message::PageRun(_))
                        .then(|| link.reader.payload(payload.clone()));
                    let frame_bytes = RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len);
                    Counters::add(&self.vm.counters.bytes_received, frame_bytes as u64);
                    if matches!(self.stage, Stage::Precopy | Stage::Migrating) {
                        self.core.on_reply(range, data).map_err(|e| {
                            FrameError::Fatal(anyhow!(e).context("failed to place requested pages"))
                        })?;
                    }
                }
                Message::Heartbeat => {}
                Message::Digests { chunk_pages } if chunk_pages != self.vm.digest_chunk_pages() => {
                    return Err(FrameError::Link(anyhow!(
                        "pagesrv sent digests of {chunk_pages}-page chunks, not {}",
                        self.vm.digest_chunk_pages()
                    )));
                }
                Message::Digests { .. } => {
                    let theirs = link.reader.payload(payload).to_vec();
                    let verdict = compare_digests(self.vm, &theirs);
                    let reply = match &verdict {
                        Verdict::Mismatch(ranges) => Message::Error {
                            code: ErrorCode::VerifyFailed,
                            text: format!(
                                "the destination's pages differ from the source in page ranges {ranges:?}"
                            ),
                        },
                        _ => Message::Goodbye,
                    };
                    link.tx.encode(&reply, &[], &mut link.outbox);
                    self.stage = Stage::Closing {
                        verdict,
                        until: Instant::now() + self.config.liveness.timeout,
                    };
                }
                Message::Error { code, text } => {
                    // pagesrv ends a session with an error only for good (a protocol
                    // violation, a memory file that shrank, a refused completion).
                    let text = common::wire::printable(&text);
                    return Err(FrameError::Fatal(anyhow!(
                        "pagesrv ended the session ({code:?}): {text}"
                    )));
                }
                other => {
                    return Err(FrameError::Link(anyhow!(
                        "unexpected {:?} frame on the urgent connection",
                        other.kind()
                    )));
                }
            }
        }
        Ok(())
    }

    fn on_vmm(&mut self, poll: &Poll) -> Result<()> {
        if !self.vmm_watched {
            return Ok(());
        }
        let mut buf = [0u8; 256];
        loop {
            match (&*self.vmm).read(&mut buf) {
                Ok(0) if self.serving() => {
                    bail!("the VMM closed its socket before the migration completed")
                }
                Ok(0) => {
                    // The guest no longer needs us; the verdict still goes to the source.
                    let fd = self.vmm.as_raw_fd();
                    let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    self.vmm_watched = false;
                    return Ok(());
                }
                Ok(n) => warn!(bytes = n, "ignoring unexpected bytes from the VMM"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("the VMM's socket failed"),
            }
        }
    }

    fn on_link_events(&mut self, poll: &Poll) -> Result<()> {
        while let Ok(event) = self.links.events.try_recv() {
            match event {
                LinkEvent::BulkEnded { generation, result } => {
                    let current = self
                        .link
                        .as_ref()
                        .is_some_and(|l| l.generation == generation);
                    match result {
                        Ok(end) => debug!(generation, ?end, "bulk thread ended"),
                        Err(e) if !e.is_link_failure() => {
                            return Err(anyhow!(e).context("failed to place pushed pages"));
                        }
                        Err(e) if current && self.serving() => self.cut(poll, anyhow!(e)),
                        Err(e) => debug!(generation, error = %e, "bulk thread ended"),
                    }
                }
                LinkEvent::Connected(Ok(up)) => {
                    if up.precopy && self.links.switch_announced() {
                        bail!(
                            "pagesrv wants to run precopy again after it switched and the guest here resumed: its discards would drop what the guest wrote"
                        );
                    }
                    if up.precopy && !self.vm.kernel.can_drop_pages() {
                        bail!(
                            "pagesrv runs precopy rounds first, which needs the VMM's memfd and --placement memfd (pages sent early must be dropped when the source writes them again)"
                        );
                    }
                    let in_precopy = matches!(self.stage, Stage::Precopy);
                    if in_precopy && !up.precopy {
                        bail!(
                            "pagesrv no longer runs the precopy this guest started with: pages sent early cannot be checked against what the source wrote since"
                        );
                    }
                    let link = self.links.open(up, poll.registry(), URGENT)?;
                    let first_link = self.switched_in.is_none() && link.generation == 1;
                    if link.precopy && matches!(self.stage, Stage::Migrating) && first_link {
                        info!(
                            "precopy: the source still runs; the guest here waits for the switch"
                        );
                        self.stage = Stage::Precopy;
                    } else if !link.precopy {
                        // The guest runs (it never waited, or the switch came): say so on
                        // every later connection.
                        self.links.pins.resumed = true;
                    }
                    // One line on stdout per link, for scripts and tests.
                    println!(
                        "faultd link to pagesrv up (session {:016x}, generation {})",
                        self.links.pins.session_id, link.generation
                    );
                    info!(
                        generation = link.generation,
                        waiting_faults = self.core.pages_in_flight(),
                        sealed = link.tx.is_sealed(),
                        "link to pagesrv up"
                    );
                    self.link = Some(link);
                    self.release_held_faults();
                }
                LinkEvent::Connected(Err(e)) => return Err(e),
                LinkEvent::Switched { generation } => self.on_switched(generation),
                LinkEvent::Synced { generation } => {
                    let Some(link) = self.link.as_mut() else {
                        continue;
                    };
                    if link.generation == generation && link.awaiting_free {
                        // The free pages are marked zero: faults on them fill locally.
                        link.awaiting_free = false;
                        self.release_held_faults();
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether faults may be requested: a link is up, its free pages are in (if they come
    /// first) and no precopy holds the guest.
    fn faults_released(&self) -> bool {
        !matches!(self.stage, Stage::Precopy)
            && self.link.as_ref().is_some_and(|l| !l.awaiting_free)
    }

    /// Once faults are released, requests (or fills) what faults were held for.
    fn release_held_faults(&mut self) {
        if self.faults_released() {
            self.core.link_up();
        }
    }

    /// The source paused and switched to postcopy: the guest here may resume (the pages
    /// written after they were sent are dropped already, in order, by the bulk thread).
    fn on_switched(&mut self, generation: u64) {
        if !matches!(self.stage, Stage::Precopy) {
            return;
        }
        let switched = self.started.elapsed();
        self.switched_in = Some(switched);
        self.stage = Stage::Migrating;
        self.links.pins.resumed = true;
        // Faults taken before the switch were held (a reply could race with a discard of the
        // same page on the other connection): ask for their pages now.
        self.release_held_faults();
        let c = &self.vm.counters;
        info!(
            generation,
            ms = switched.as_millis() as u64,
            pages_present = self.vm.done.set_pages(),
            pages_discarded = Counters::get(&c.pages_discarded),
            "switched to postcopy: the guest may resume"
        );
    }

    /// After a fatal error: tell pagesrv, if it can be told at once, that this destination
    /// failed, so the source keeps the VM.
    fn tell_source_we_failed(&mut self, why: &anyhow::Error) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        for message in self.core.pending.drain(..) {
            link.tx.encode(&message, &[], &mut link.outbox);
        }
        let mut frame = std::mem::take(&mut link.outbox);
        link.tx.encode(
            &Message::Error {
                code: ErrorCode::DestinationFailed,
                text: format!("{why:#}"),
            },
            &[],
            &mut frame,
        );
        let sock = socket2::SockRef::from(&link.urgent);
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(self.config.liveness.timeout));
        if let Err(e) = link.urgent.write_all(&frame) {
            debug!(error = %e, "could not tell pagesrv that this destination failed");
        }
    }
}

/// Why handling frames stopped.
enum FrameError {
    /// The link is bad: cut it and reconnect.
    Link(anyhow::Error),
    /// The VM cannot be served.
    Fatal(anyhow::Error),
}

/// Compares pagesrv's per-chunk digests with what was placed here.
fn compare_digests(vm: &Vm<UffdKernel>, theirs: &[u8]) -> Verdict {
    let total = vm.total_pages();
    let mut mismatched: Vec<Range<u64>> = Vec::new();
    for (i, (ours, theirs)) in vm
        .chunk_digests()
        .into_iter()
        .zip(theirs.chunks_exact(8))
        .enumerate()
    {
        let theirs = u64::from_le_bytes(theirs.try_into().expect("8-byte chunks"));
        if ours != theirs {
            let chunk_pages = vm.digest_chunk_pages();
            let first = i as u64 * chunk_pages;
            let range = first..(first + chunk_pages).min(total);
            match mismatched.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => mismatched.push(range),
            }
        }
    }
    if mismatched.is_empty() {
        info!(
            unverified_pages = vm.skipped.set_pages(),
            "digests of every page match the source"
        );
        Verdict::Verified
    } else {
        for r in &mismatched {
            error!(
                first_page = r.start,
                end_page = r.end,
                "DIGEST MISMATCH: guest memory in these pages differs from the source"
            );
        }
        Verdict::Mismatch(mismatched)
    }
}
