//! pagesrv's metrics (`--metrics-listen`): per VM (label `vm`), the running session's
//! counters, published by its progress thread every 100 ms, and the sessions so far by
//! outcome, as OpenMetrics. Names start with `pagesrv_`. A template's restores run side by
//! side: each running one's figures carry a `session` label too.

use std::collections::BTreeMap;
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

/// A VM to publish figures of, and whether it is a template (many sessions at once).
pub type PublishedVm = (VmName, bool);

/// One VM's figures.
#[derive(Debug, Default)]
struct VmFigures {
    /// Its sessions' figures carry a `session` label (a template's restores).
    template: bool,
    /// The running sessions' last published counters by session id (a migrated VM has at
    /// most one), and the bytes of the VM's sessions that ended (one lock: a scrape never
    /// sees a session's bytes in neither).
    current: Mutex<(BTreeMap<u64, SessionFigures>, u64)>,
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
    pub fn new(vms: &[PublishedVm]) -> Self {
        Published {
            vms: vms
                .iter()
                .map(|&(vm, template)| {
                    let figures = VmFigures {
                        template,
                        ..VmFigures::default()
                    };
                    (vm, figures)
                })
                .collect(),
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
        self.publish((session.vm, session.id), figures);
    }

    fn publish(&self, (vm, id): (VmName, u64), figures: SessionFigures) {
        let Some(vm) = self.vm(vm) else {
            return;
        };
        let mut current = vm.current.lock().unwrap_or_else(|p| p.into_inner());
        current.0.insert(id, figures);
    }

    /// Session `id` of `vm` ended with `outcome`, having sent `bytes`.
    pub fn ended(&self, (vm, id): (VmName, u64), outcome: &Outcome, verified: bool, bytes: u64) {
        let Some(vm) = self.vm(vm) else {
            return;
        };
        {
            let mut current = vm.current.lock().unwrap_or_else(|p| p.into_inner());
            current.0.remove(&id);
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
        let (current, ended_bytes) = {
            let guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
            (guard.0.clone(), guard.1)
        };
        let running_bytes: u64 = current.values().map(|f| f.bytes_sent).sum();
        s.labelled(
            "pagesrv_vm_sent_bytes",
            "Bytes sent for the VM over all its sessions (its share of the link).",
            Kind::Counter,
            label(None),
            (ended_bytes + running_bytes) as f64,
        );
        s.labelled(
            "pagesrv_session_running",
            "Destination sessions running (1 or 0; a template's restores each count).",
            Kind::Gauge,
            label(None),
            current.len() as f64,
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
        for (id, figures) in &current {
            let session = format!("{id:016x}");
            let extra = self.template.then_some(("session", session.as_str()));
            render_session(
                figures,
                &|more| {
                    let mut labels = label(extra);
                    labels.extend(more.map(|(k, v)| (k.to_string(), v.to_string())));
                    labels
                },
                s,
            );
        }
    }
}

/// A figure's labels, given the figure's own label if it has one.
type Labeller<'a> = &'a dyn Fn(Option<(&str, &str)>) -> Vec<(String, String)>;

/// One running session's figures, labelled by `label`.
fn render_session(f: &SessionFigures, label: Labeller<'_>, s: &mut Snapshot) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_counted_by_outcome() {
        let (a, b) = (VmName::new("a").unwrap(), VmName::new("b").unwrap());
        let p = Published::new(&[(a, false), (b, true)]);
        p.ended((a, 1), &Outcome::Completed, true, 100);
        p.ended((b, 2), &Outcome::Aborted("cut".into()), false, 5);
        p.ended((b, 3), &Outcome::Aborted("cut".into()), false, 7);
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

    #[test]
    fn a_templates_restores_are_shown_side_by_side_and_a_vms_session_alone() {
        let (vm, tpl) = (VmName::new("vm").unwrap(), VmName::new("tpl").unwrap());
        let p = Published::new(&[(vm, false), (tpl, true)]);
        let figures = |bytes_sent| SessionFigures {
            total: 8,
            bytes_sent,
            ..SessionFigures::default()
        };
        p.publish((vm, 9), figures(1));
        p.publish((tpl, 0xa), figures(10));
        p.publish((tpl, 0xb), figures(20));
        p.publish((tpl, 0xb), figures(30));
        p.ended((tpl, 0xc), &Outcome::Completed, true, 100);
        let text = p.snapshot().render();
        for line in [
            "pagesrv_session_running{vm=\"vm\"} 1",
            "pagesrv_sent_bytes_total{vm=\"vm\"} 1",
            "pagesrv_session_running{vm=\"tpl\"} 2",
            "pagesrv_sent_bytes_total{vm=\"tpl\",session=\"000000000000000a\"} 10",
            "pagesrv_sent_bytes_total{vm=\"tpl\",session=\"000000000000000b\"} 30",
            "pagesrv_vm_sent_bytes_total{vm=\"tpl\"} 140",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // One restore ends: the other goes on being shown.
        p.ended((tpl, 0xa), &Outcome::Completed, true, 10);
        let text = p.snapshot().render();
        assert!(
            text.contains("pagesrv_session_running{vm=\"tpl\"} 1"),
            "{text}"
        );
        assert!(!text.contains("session=\"000000000000000a\""), "{text}");
        assert!(text.contains("session=\"000000000000000b\""), "{text}");
    }
}
