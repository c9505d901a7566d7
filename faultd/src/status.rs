//! What faultd tells the world while it runs: the status the control socket answers and the
//! metrics endpoint reads, and the moment the guest may resume.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::control::ControlServer;
use serde_json::{Value, json};

use crate::core::kernel::{Kernel, UffdKernel};
use crate::core::session::DestSession;
use crate::core::vm::{Counters, Vm};
use crate::upstream::link::SwitchAnnouncer;

/// What the status says of the link.
#[derive(Debug, Clone, Copy)]
pub struct LinkStatus {
    /// Links lost so far.
    pub reconnects: u64,
    /// Whether a link is up.
    pub up: bool,
}

/// How often the status is refreshed at most.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// Keeps what the control socket's `status` answers (and the metrics endpoint shows) fresh.
pub struct StatusBoard {
    status: Arc<Mutex<Value>>,
    /// Whether anyone reads it (a control socket or the metrics endpoint).
    enabled: bool,
    at: Instant,
}

impl StatusBoard {
    /// A board writing into `status` (when `enabled`).
    pub fn new(status: Arc<Mutex<Value>>, enabled: bool, now: Instant) -> Self {
        StatusBoard {
            status,
            enabled,
            at: now,
        }
    }

    /// Refreshes the status if it is older than [`STATUS_EVERY`].
    pub fn refresh<K: Kernel>(
        &mut self,
        vm: &Vm<K>,
        session: &DestSession<'_, K>,
        link: LinkStatus,
    ) {
        if self.at.elapsed() >= STATUS_EVERY {
            self.publish(vm, session, link, false);
        }
    }

    /// Refreshes the status now (also the last time, `failed` if the loop ended with an
    /// error).
    pub fn publish<K: Kernel>(
        &mut self,
        vm: &Vm<K>,
        session: &DestSession<'_, K>,
        link: LinkStatus,
        failed: bool,
    ) {
        if !self.enabled {
            return;
        }
        self.at = Instant::now();
        let status = status_json(vm, session, link, failed);
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }
}

/// Tells the control socket's clients how the migration ended (a state: later clients get
/// it too).
pub fn emit_end<T>(control: &Option<Arc<ControlServer>>, result: &anyhow::Result<T>)
where
    T: std::borrow::Borrow<crate::core::session::Verdict>,
{
    if let Some(control) = control {
        let event = match result {
            Ok(verdict) => json!({"event": "completed", "verdict": verdict.borrow().name()}),
            Err(e) => json!({"event": "failed", "error": format!("{e:#}")}),
        };
        control.emit_sticky(&event);
    }
}

/// The status JSON (`{"status": {...}}`) of a session (`failed`: it ended with an error).
pub fn status_json<K: Kernel>(
    vm: &Vm<K>,
    session: &DestSession<'_, K>,
    link: LinkStatus,
    failed: bool,
) -> Value {
    let c = &vm.counters;
    let core = &session.core;
    let (latency_buckets, latency_sum) = core.latencies.live();
    json!({
        "status": {
            "phase": if failed { "failed" } else { session.stage_name() },
            "pages_total": vm.total_pages(),
            "pages_present": vm.done.set_pages(),
            "faults": core.faults,
            "faults_waiting": core.pages_in_flight(),
            "bytes_received": Counters::get(&c.bytes_received),
            "bytes_precopy": Counters::get(&c.bytes_precopy),
            "pages_discarded": Counters::get(&c.pages_discarded),
            "reconnects": link.reconnects,
            "link_up": link.up,
            "demand_faults": Counters::get(&c.demand_faults),
            "pages_requested": Counters::get(&c.pages_requested),
            "pages_pushed": Counters::get(&c.pages_pushed),
            "pages_zero": Counters::get(&c.pages_zero),
            "pages_removed": Counters::get(&c.pages_removed),
            "pages_shared": Counters::get(&c.pages_shared),
            "pages_reused": Counters::get(&c.pages_reused),
            "fault_latency_buckets_us": latency_buckets,
            "fault_latency_sum_seconds": latency_sum,
            "verdict": session.verdict().map_or(Value::Null, |v| Value::from(v.name())),
        }
    })
}

/// Tells the VMM that its guest may resume (the links do it once): one line on stdout for
/// scripts, and the `switched` event for orchestrators.
pub fn switch_announcer<'env>(
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
