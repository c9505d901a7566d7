//! pagesrv's metrics (`--metrics-listen`): per VM (label `vm`), the running session's
//! counters, published by its progress thread every 100 ms, and the sessions so far by
//! outcome, as OpenMetrics. Names start with `pagesrv_`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use common::metrics::{Kind, Snapshot};
use common::wire::VmName;

use crate::session::{Outcome, Session};

/// What the metrics endpoint shows, shared by the sessions and the manager.
#[derive(Debug)]
pub struct Published {
    /// One per served VM, in the order served.
    vms: Vec<(VmName, VmFigures)>,
}

/// One VM's figures.
#[derive(Debug, Default)]
struct VmFigures {
    /// The running session's last published counters (`None`: no session running), and the
    /// bytes of the VM's sessions that ended (one lock: a scrape never sees a session's
    /// bytes in neither).
    current: Mutex<(Option<SessionFigures>, u64)>,
    completed: AtomicU64,
    verified: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
}

/// One session's counters at a moment.
#[derive(Debug, Clone, Copy, Default)]
struct SessionFigures {
    total: u64,
    settled: u64,
    requested: u64,
    urgent_data: u64,
    urgent_zero: u64,
    pushed_data: u64,
    pushed_zero: u64,
    precopy: u64,
    skipped: u64,
    held: u64,
    base: u64,
    free: u64,
    prefetched: u64,
    bytes_sent: u64,
}

impl Published {
    /// Figures for these VMs (each shown from the start, with no session running).
    pub fn new(vms: &[VmName]) -> Self {
        Published {
            vms: vms.iter().map(|&vm| (vm, VmFigures::default())).collect(),
        }
    }

    fn vm(&self, vm: VmName) -> Option<&VmFigures> {
        self.vms
            .iter()
            .find(|(name, _)| *name == vm)
            .map(|(_, f)| f)
    }

    /// Publishes `session`'s counters now.
    pub fn session(&self, session: &Session<'_>) {
        let Some(vm) = self.vm(session.vm) else {
            return;
        };
        let s = &session.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let figures = SessionFigures {
            total: session.total_pages(),
            settled: session.pages_settled(),
            requested: get(&s.requested_pages),
            urgent_data: get(&s.urgent_data_pages),
            urgent_zero: get(&s.urgent_zero_pages),
            pushed_data: get(&s.pushed_data_pages),
            pushed_zero: get(&s.pushed_zero_pages),
            precopy: get(&s.precopy_pages),
            skipped: get(&s.skipped_pages),
            held: get(&s.held_pages),
            base: get(&s.base_pages),
            free: get(&s.free_pages),
            prefetched: session.prefetched_pages(),
            bytes_sent: get(&s.bytes_sent),
        };
        vm.current.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(figures);
    }

    /// A session of `vm` ended with `outcome`, having sent `bytes`.
    pub fn ended(&self, vm: VmName, outcome: &Outcome, verified: bool, bytes: u64) {
        let Some(vm) = self.vm(vm) else {
            return;
        };
        {
            let mut current = vm.current.lock().unwrap_or_else(|p| p.into_inner());
            current.0 = None;
            current.1 += bytes;
        }
        let counter = match outcome {
            Outcome::Completed if verified => &vm.verified,
            Outcome::Completed => &vm.completed,
            Outcome::Failed(_) => &vm.failed,
            Outcome::Aborted(_) => &vm.aborted,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The metrics now.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        s.one(
            "pagesrv_vms",
            "VMs this pagesrv serves.",
            Kind::Gauge,
            self.vms.len() as f64,
        );
        for (name, vm) in &self.vms {
            vm.render(name.as_str(), &mut s);
        }
        s
    }
}

impl VmFigures {
    fn render(&self, name: &str, s: &mut Snapshot) {
        let label = |extra: Option<(&str, &str)>| {
            let mut labels = vec![("vm".to_string(), name.to_string())];
            labels.extend(extra.map(|(k, v)| (k.to_string(), v.to_string())));
            labels
        };
        let (current, ended_bytes) = *self.current.lock().unwrap_or_else(|p| p.into_inner());
        let running_bytes = current.map_or(0, |f| f.bytes_sent);
        s.labelled(
            "pagesrv_vm_sent_bytes",
            "Bytes sent for the VM over all its sessions (its share of the link).",
            Kind::Counter,
            label(None),
            (ended_bytes + running_bytes) as f64,
        );
        s.labelled(
            "pagesrv_session_running",
            "1 while a destination session runs.",
            Kind::Gauge,
            label(None),
            f64::from(u8::from(current.is_some())),
        );
        for (outcome, counter) in [
            ("verified", &self.verified),
            ("completed_unverified", &self.completed),
            ("failed", &self.failed),
            ("broke_off", &self.aborted),
        ] {
            s.labelled(
                "pagesrv_sessions",
                "Sessions ended, by outcome (failed: keep the source VM; broke off: the destination reconnects).",
                Kind::Counter,
                label(Some(("outcome", outcome))),
                counter.load(Ordering::Relaxed) as f64,
            );
        }
        let Some(f) = current else { return };
        s.labelled(
            "pagesrv_pages",
            "Pages of the memory image.",
            Kind::Gauge,
            label(None),
            f.total as f64,
        );
        s.labelled(
            "pagesrv_pages_settled",
            "Pages of the running session sent or no longer needed.",
            Kind::Gauge,
            label(None),
            f.settled as f64,
        );
        s.labelled(
            "pagesrv_requested_pages",
            "Pages named in urgent requests (the running session).",
            Kind::Counter,
            label(None),
            f.requested as f64,
        );
        for (how, n) in [
            ("urgent_data", f.urgent_data),
            ("urgent_zero", f.urgent_zero),
            ("pushed_data", f.pushed_data),
            ("pushed_zero", f.pushed_zero),
            ("precopy", f.precopy),
            ("skipped", f.skipped),
            ("held", f.held),
            ("base", f.base),
            ("free", f.free),
            ("prefetched", f.prefetched),
        ] {
            s.labelled(
                "pagesrv_session_pages",
                "Pages of the running session by how they were settled.",
                Kind::Counter,
                label(Some(("how", how))),
                n as f64,
            );
        }
        s.labelled(
            "pagesrv_sent_bytes",
            "Bytes sent to the destination (the running session).",
            Kind::Counter,
            label(None),
            f.bytes_sent as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_counted_by_outcome() {
        let (a, b) = (VmName::new("a").unwrap(), VmName::new("b").unwrap());
        let p = Published::new(&[a, b]);
        p.ended(a, &Outcome::Completed, true, 100);
        p.ended(b, &Outcome::Aborted("cut".into()), false, 5);
        p.ended(b, &Outcome::Aborted("cut".into()), false, 7);
        let text = p.snapshot().render();
        for line in [
            "pagesrv_vms 2",
            "pagesrv_vm_sent_bytes_total{vm=\"a\"} 100",
            "pagesrv_vm_sent_bytes_total{vm=\"b\"} 12",
            "pagesrv_session_running{vm=\"a\"} 0",
            "pagesrv_session_running{vm=\"b\"} 0",
            "pagesrv_sessions_total{vm=\"a\",outcome=\"verified\"} 1",
            "pagesrv_sessions_total{vm=\"b\",outcome=\"broke_off\"} 2",
            "pagesrv_sessions_total{vm=\"a\",outcome=\"broke_off\"} 0",
            "pagesrv_sessions_total{vm=\"b\",outcome=\"failed\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("pagesrv_sent_bytes"),
            "no session, no session figures"
        );
    }
}
