//! How a session ends: its outcome concluded for its VM (finished, or waiting for its
//! destination to resume), the VM's totals, the source VMM told the outcome, and pagesrv's
//! own verdict once every VM is finished.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Result, bail};
use common::source_link::Outcome as SourceOutcome;
use serde_json::json;
use tracing::{error, info, warn};

use super::{Finished, Manager, Slot, Verdict};
use crate::fleet::ServedVm;
use crate::precopy::Precopy;
use crate::report::print_summary;
use crate::session::{EventSink, Outcome, Session, error_chain};

impl<'scope, 'env> Manager<'scope, 'env> {
    /// Tells admission which sessions exist (their `Hello`s are the last evicted).
    pub(super) fn publish_live_sessions(&self) {
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

    /// Ends slot `index`'s running session, if any: aborts it first with `abort` (a reconnect
    /// replaces it, or pagesrv ends), then joins and concludes it.
    pub(super) fn end_session(&mut self, index: usize, abort: bool) {
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
            published.ended(
                (session.vm, session.id),
                &outcome,
                session.verified(),
                bytes,
            );
        }
        let slot = &mut self.slots[index];
        slot.bytes_sent += bytes;
        slot.last_end = Some(Instant::now());
        let served = &self.vms[slot.vm];
        let vm = served.name.to_string();
        let session_id = format!("{:016x}", session.id);
        match &outcome {
            // A template's restores end all the time: each says which it was, and none is
            // kept for later clients (a migration's end is, once).
            Outcome::Completed if served.template => self.events.emit(json!({
                "event": "completed", "vm": vm, "session": session_id, "verified": session.verified(),
            })),
            Outcome::Failed(why) if served.template => self.events.emit(json!({
                "event": "failed", "vm": vm, "session": session_id, "error": why,
            })),
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
            Outcome::Failed(why) if served.template => {
                error!(%vm, session = %session_id, %why, "a restore of the template failed");
                Finished::Failed(why)
            }
            Outcome::Failed(why) => {
                error!(%vm, %why, "the migration failed: the source must keep the VM");
                Finished::Failed(why)
            }
            Outcome::Aborted(why) => {
                warn!(%vm, %why, "session broke off (its destination resumes it when it reconnects)");
                return;
            }
        };
        if self.config.serve_forever || served.template {
            // Each migration's own totals: the next one of this VM starts from zero (a
            // template's restore is over: its slot goes).
            let slot = &mut self.slots[index];
            print_vm_totals(served, slot, &finished);
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

    /// A session thread ended (one replaced by a reconnect was concluded already).
    pub(super) fn on_session_ended(&mut self, serial: u64) {
        if let Some(index) = self
            .slots
            .iter()
            .position(|slot| slot.running.as_ref().is_some_and(|r| r.serial == serial))
        {
            self.end_session(index, false);
        }
    }

    /// What VM `vm`'s source VMM is told (`--vmm-uds`), once its migration ended.
    pub(super) fn source_outcome(&self, vm: usize) -> Option<SourceOutcome> {
        let slot = self.slots.iter().find(|slot| slot.vm == vm)?;
        match slot.finished.as_ref()? {
            Finished::Completed { verified } => Some(SourceOutcome::Completed {
                verified: *verified,
            }),
            Finished::Failed(why) => Some(SourceOutcome::Failed {
                reason: why.clone(),
            }),
        }
    }

    /// Every VM's migration ended: one line per VM, and an error naming those that failed.
    fn verdict(&self) -> Result<Verdict> {
        let mut failed = Vec::new();
        for slot in &self.slots {
            let vm = &self.vms[slot.vm];
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

/// Tells the source VMM how the migration ended (`None`: not known, so nothing is said and
/// the VMM keeps its paused guest, see `common::source_link`).
pub(super) fn release_source(engine: &Precopy, outcome: Option<SourceOutcome>) {
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
    let cache = match &vm.source {
        crate::vm_memory::VmMemory::Store(store) => {
            let c = store.cache_counts();
            format!(
                "; store cache: {} frames fetched in {} GETs ({} round trips), {} evicted, {} MiB held",
                c.frames_fetched, c.gets, c.batches, c.frames_evicted, c.mib_held
            )
        }
        crate::vm_memory::VmMemory::File(_) => String::new(),
    };
    eprintln!(
        "pagesrv: VM {}: {how}, {} session(s), {mib:.1} MiB sent in {secs:.3} s ({:.0} MiB/s){cache}",
        vm.name,
        slot.sessions,
        mib / secs.max(1e-9)
    );
}
