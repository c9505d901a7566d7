//! What the manager does with an admitted connection: refuse it (rate-limited lines), or
//! welcome it into a new, resumed or joined session (the claim rules are `claim.rs`'s), and
//! start the session's threads once its bulk connection is in.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Result;
use common::framed::FramedConn;
use common::wire::{ErrorCode, MAX_STREAMS, Role, SessionParams, VmName, WelcomeFlags};
use socket2::SockRef;
use tracing::{debug, info, info_span, warn};

use super::{
    BULK_SNDBUF_BYTES, Event, Finished, Manager, Pending, Running, ServerConfig, TAKEOVER_LOG_EVERY,
};
use crate::claim::{self, Claim, Known, busy_text, joins};
use crate::fleet::{self, ServedVm};
use crate::handshake::Admitted;
use crate::report::report_progress;
use crate::session::{Session, Switch, error_chain};

impl<'scope, 'env> Manager<'scope, 'env> {
    /// Refuses a connection after its handshake; one line per [`REFUSAL_LOG_EVERY`] (then
    /// how many followed): anyone with a key, or anyone without `--insecure-no-key`'s, can
    /// make refusals.
    fn refuse(&self, mut admitted: Box<Admitted>, code: ErrorCode, text: &str) {
        if let Some(before) = self.refusals.borrow_mut().admit() {
            warn!(peer = %admitted.peer, role = ?admitted.role(), vm = %admitted.hello().vm, %text, refused_since_last_line = before, "refused a destination");
        }
        admitted.refuse(code, text);
    }

    /// Refuses a connection that named slot `index`'s session without proving its secret:
    /// nothing changes, and one line per [`TAKEOVER_LOG_EVERY`] says so.
    fn refuse_takeover(&mut self, index: usize, mut admitted: Box<Admitted>) {
        let slot = &mut self.slots[index];
        let vm = self.vms[slot.vm].name;
        if slot
            .takeover_logged
            .is_none_or(|t| t.elapsed() >= TAKEOVER_LOG_EVERY)
        {
            slot.takeover_logged = Some(Instant::now());
            warn!(peer = %admitted.peer, role = ?admitted.role(), vm = %vm, "refused a connection that names this VM's session without proving its secret (a takeover attempt, or a destination from another run); the session goes on");
        }
        admitted.refuse(ErrorCode::Busy, &busy_text(vm));
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

    pub(super) fn on_urgent(&mut self, admitted: Box<Admitted>) {
        let vm_index = match fleet::find(self.vms, &admitted.hello().vm) {
            Ok(index) => index,
            Err(text) => return self.refuse(admitted, ErrorCode::UnknownVm, &text),
        };
        let vm = &self.vms[vm_index];
        let finished = self
            .slots
            .iter()
            .find(|slot| slot.vm == vm_index)
            .and_then(|slot| slot.finished.as_ref());
        if let Some(finished) = finished {
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
            // A memory file that shrank, or a store whose bytes were damaged, is final:
            // the destination fails at once instead of waiting for pages that will not
            // come. (A store that was only away is fetched from anew by a new session.)
            let code = match e {
                crate::source::SourceError::Lost { .. } => ErrorCode::ImageMismatch,
                _ => ErrorCode::Internal,
            };
            return self.refuse(admitted, code, &error_chain(&e));
        }
        let Some((index, claim)) = self.claim(vm_index, &admitted) else {
            let text = format!(
                "template {} is being restored by {} destinations, the most at once (--max-restores); try again when one ends",
                vm.name, self.config.max_restores
            );
            return self.refuse(admitted, ErrorCode::Busy, &text);
        };
        let (session_id, secret, proven) = match claim {
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
            if self.slots[index].finished.is_some() || self.slots[index].established.is_none() {
                // It had ended before we stopped it: nothing to resume.
                let text = format!("the migration of VM {} has ended", self.vms[vm_index].name);
                return self.refuse(admitted, ErrorCode::UnknownVm, &text);
            }
        }
        let vm = &self.vms[vm_index];
        let flags = match self.welcome_flags(admitted.hello(), vm, proven) {
            Ok(flags) => flags,
            Err((code, text)) => return self.refuse(admitted, code, &text),
        };
        let mut admitted = admitted;
        let welcome = SessionParams {
            session_id,
            flags: flags.bits(),
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
    ) -> Result<WelcomeFlags, (ErrorCode, String)> {
        let resumed = hello.resumed();
        let precopy = match &vm.precopy() {
            None => false,
            Some(engine) if engine.failure().is_some() => {
                let why = engine.failure().unwrap_or_default();
                let text = format!("the migration failed at the source: {why}");
                return Err((ErrorCode::Internal, text));
            }
            Some(engine) if !engine.switched() && resumed => {
                let text = "the source still runs (precopy): a destination whose guest runs already cannot be served";
                return Err((ErrorCode::Protocol, text.into()));
            }
            Some(engine) if let Err(text) = engine.track_in(u64::from(hello.page_size)) => {
                return Err((ErrorCode::LayoutMismatch, text));
            }
            // Precopy rounds, or the discards and the switch this destination missed.
            Some(_) => !resumed,
        };
        Ok(WelcomeFlags {
            precopy,
            free_first: vm.source.has_free_hints(),
            proven,
        })
    }

    /// Which session an urgent connection to VM `vm` opens or resumes (`claim.rs`), and the
    /// slot that holds it: for a template, the restore it names, or a new slot for a new
    /// restore (`None`: the template has `--max-restores` already).
    fn claim(&mut self, vm: usize, admitted: &Admitted) -> Option<(usize, Claim)> {
        let wanted = admitted.hello().session_id;
        let of_vm: Vec<usize> = (0..self.slots.len())
            .filter(|&at| self.slots[at].vm == vm)
            .collect();
        let pendings: Vec<Option<Known>> = of_vm
            .iter()
            .map(|&at| self.slots[at].pending.as_ref().map(Pending::known))
            .collect();
        let index = if self.vms[vm].template {
            let sessions = of_vm
                .iter()
                .zip(&pendings)
                .map(|(&at, pending)| (pending.as_ref(), self.slots[at].established.as_ref()));
            match claim::template_session(wanted, sessions) {
                Some(nth) => of_vm[nth],
                None if of_vm.len() >= self.config.max_restores => return None,
                None => {
                    self.slots.push(super::Slot::of(vm));
                    return Some((
                        self.slots.len() - 1,
                        Claim::Open {
                            adopt: (wanted != 0).then_some(wanted),
                        },
                    ));
                }
            }
        } else {
            *of_vm
                .first()
                .expect("a VM that is no template has its slot")
        };
        let nth = of_vm.iter().position(|&at| at == index).expect("listed");
        let slot = &self.slots[index];
        Some((
            index,
            claim::claim(
                wanted,
                pendings[nth].as_ref(),
                slot.established.as_ref(),
                slot.running.is_some(),
                |secret| admitted.proves(secret),
            ),
        ))
    }

    pub(super) fn on_bulk(&mut self, mut admitted: Box<Admitted>) {
        let hello = *admitted.hello();
        if hello.extra_stream() {
            return self.on_extra_stream(admitted);
        }
        // The VM by name, as for the urgent connection; then that VM's pending session only
        // (a template's: the one it names), with the proof of its secret.
        let index = fleet::find(self.vms, &hello.vm).ok().and_then(|vm| {
            self.slots.iter().position(|slot| {
                slot.vm == vm
                    && slot
                        .pending
                        .as_ref()
                        .is_some_and(|p| joins(&p.welcome, &hello) && admitted.proves(&p.secret))
            })
        });
        let Some(index) = index else {
            let text = "no session of this VM waits for a bulk connection with this layout and this session's secret";
            return self.refuse(admitted, ErrorCode::UnknownSession, text);
        };
        let pending = self.slots[index].pending.take().expect("checked above");
        if !self.welcome(
            &mut admitted,
            pending.welcome,
            self.vms[self.slots[index].vm].name,
        ) {
            return;
        }
        self.start_session(index, pending, admitted.into_framed());
    }

    /// Another bulk connection of a running session (`faultd --streams`): it takes a share
    /// of the push on a thread of its own, at most [`MAX_STREAMS`] per session.
    fn on_extra_stream(&mut self, mut admitted: Box<Admitted>) {
        let hello = *admitted.hello();
        let running = fleet::find(self.vms, &hello.vm).ok().and_then(|vm| {
            self.slots.iter().find_map(|slot| {
                let proven = slot.vm == vm
                    && slot
                        .established
                        .as_ref()
                        .is_some_and(|e| admitted.proves(&e.secret));
                slot.running
                    .as_ref()
                    .filter(|r| proven && joins(&r.welcome, &hello))
            })
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
        let conn = admitted.into_framed();
        self.scope.spawn(move || {
            let _span = info_span!(
                "session",
                vm = %session.vm,
                id = format_args!("{:016x}", session.id)
            )
            .entered();
            session.push_extra(conn);
        });
    }

    fn start_session(&mut self, index: usize, pending: Pending, bulk: FramedConn) {
        self.serials += 1;
        let serial = self.serials;
        let vm = &self.vms[self.slots[index].vm];
        vm.source.refresh_holes();
        let pending_welcome = pending.welcome;
        let paged = vm
            .source
            .paged(u64::from(pending.welcome.page_size))
            .expect("the page size was checked when the destination was welcomed");
        let switch = Switch {
            engine: vm.precopy(),
            first: pending.welcome.precopy(),
            free_first: pending.welcome.free_first(),
            base: pending.admitted.hello().has_base(),
        };
        let total_pages = paged.total_pages();
        let session = Arc::new(Session::new(
            paged,
            (vm.name, pending.welcome.session_id),
            self.config.session.clone(),
            switch,
            Arc::new(self.events.clone()),
        ));
        // Restores sharing their RAM on a host: each pushes a different part of the
        // recorded working set first, and of the rest. Not the rest of a store's snapshot:
        // restores pushing different parts at once would have the cache fetch them all at
        // once, behind which the faults' fetches wait (the working set is fetched first,
        // as one, whatever the order of its pushes).
        let shares_ram = pending.admitted.hello().shares_ram();
        let stagger_index = (vm.template && shares_ram).then(|| {
            // The first place no running restore of this template holds: one alone starts
            // at the beginning, sixteen at once at sixteen places far apart.
            let held: Vec<u64> = self
                .slots
                .iter()
                .filter(|s| s.vm == self.slots[index].vm)
                .filter_map(|s| s.running.as_ref()?.stagger_index)
                .collect();
            (0..).find(|k| !held.contains(k)).unwrap_or(0)
        });
        if let Some(k) = stagger_index {
            let at = spread(k);
            session.start_prefetch_at(at);
            if matches!(vm.source, crate::vm_memory::VmMemory::File(_)) {
                let page_size = u64::from(pending_welcome.page_size);
                session.start_push_at(stagger(at, total_pages, page_size));
            }
        }
        let (tx, session_for_thread) = (self.notify.clone(), session.clone());
        let published = self.events.metrics.clone();
        let urgent = pending.admitted.into_framed();
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
                let outcome = session.run(urgent, bulk);
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
            stagger_index,
        });
    }
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

/// How far into what it pushes the restore at place `k` among those of a template running
/// at once starts (0..1): spread by the golden ratio, so that any number of restores at once
/// start far apart (the first at the beginning). Clones on one host
/// that share a guest RAM file then fill different parts of it first, and each tells
/// pagesrv (`Skip`) what the others placed.
fn spread(k: u64) -> f64 {
    const GOLDEN: f64 = 0.618_033_988_749_895;
    (k as f64 * GOLDEN).fract()
}

/// The page `at` (0..1) of the way through `total_pages` pages of `page_size` bytes, at a
/// 1 MiB boundary: where a staggered background push starts.
fn stagger(at: f64, total_pages: u64, page_size: u64) -> u64 {
    let align = ((1 << 20) / page_size.max(1)).max(1);
    let page = (at * total_pages as f64) as u64;
    (page / align * align).min(total_pages.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::{spread, stagger};

    #[test]
    fn test_restores_start_far_apart_at_mib_boundaries_inside_memory() {
        let starts: Vec<f64> = (0..16).map(spread).collect();
        assert_eq!(
            starts[0], 0.0,
            "a restore alone pushes its working set in order"
        );
        assert!(starts.iter().all(|s| (0.0..1.0).contains(s)));
        let mut sorted = starts.clone();
        sorted.sort_by(f64::total_cmp);
        // Sixteen golden-ratio points: no two closer than a fortieth.
        assert!(
            sorted.windows(2).all(|w| w[1] - w[0] > 1.0 / 40.0),
            "{sorted:?}"
        );
        for &at in &starts {
            let page = stagger(at, 65536, 4096);
            assert_eq!(page % 256, 0);
            assert!(page < 65536);
            assert!(stagger(at, 512, 2 << 20) < 512);
        }
        assert_eq!(
            stagger(0.999, 100, 4096),
            0,
            "less than 1 MiB of memory: from the start"
        );
        assert_eq!(stagger(0.5, 0, 4096), 0);
    }
}
