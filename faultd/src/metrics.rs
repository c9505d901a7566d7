//! faultd's metrics (`--metrics-listen`): what the status the event loop publishes says,
//! as OpenMetrics. Names start with `faultd_`; one VM per faultd, so no VM label.

use common::metrics::{Histogram, Kind, Snapshot, pow2_us_buckets};
use serde_json::Value;

use crate::core::latency::LATENCY_BUCKETS;

/// The phases faultd reports (`faultd_phase{phase=...}` is 1 for the current one).
const PHASES: [&str; 7] = [
    "starting",
    "precopy",
    "postcopy",
    "verifying",
    "closing",
    "done",
    "failed",
];

/// The metrics of a status document (`{"status": {...}}` as the control socket answers).
pub fn snapshot(status: &Value) -> Snapshot {
    let st = &status["status"];
    let n = |k: &str| st[k].as_f64().unwrap_or(0.0);
    let mut s = Snapshot::default();
    let phase = st["phase"].as_str().unwrap_or("starting");
    for p in PHASES {
        s.labelled(
            "faultd_phase",
            "1 for the phase the migration is in.",
            Kind::Gauge,
            vec![("phase".into(), p.into())],
            f64::from(u8::from(p == phase)),
        );
    }
    s.one(
        "faultd_pages",
        "Pages of guest RAM.",
        Kind::Gauge,
        n("pages_total"),
    );
    s.one(
        "faultd_pages_present",
        "Pages present at the destination.",
        Kind::Gauge,
        n("pages_present"),
    );
    for (how, key) in [
        ("requested", "pages_requested"),
        ("pushed", "pages_pushed"),
        ("zero", "pages_zero"),
        ("removed", "pages_removed"),
        ("shared", "pages_shared"),
        ("base", "pages_reused"),
    ] {
        s.labelled(
            "faultd_pages_placed",
            "Pages settled, by how: requested on a fault, pushed, zero, removed by the guest before they came, placed by another restore in a shared guest RAM file, or from the base image.",
            Kind::Counter,
            vec![("how".into(), how.into())],
            n(key),
        );
    }
    s.one(
        "faultd_faults",
        "Fault events read from the userfaultfd.",
        Kind::Counter,
        n("faults"),
    );
    s.one(
        "faultd_demand_faults",
        "Faults that waited for pagesrv.",
        Kind::Counter,
        n("demand_faults"),
    );
    s.one(
        "faultd_faults_waiting",
        "Pages faulting threads wait for now.",
        Kind::Gauge,
        n("faults_waiting"),
    );
    s.one(
        "faultd_received_bytes",
        "Bytes received from pagesrv.",
        Kind::Counter,
        n("bytes_received"),
    );
    s.one(
        "faultd_reconnects",
        "Links to pagesrv lost and made again.",
        Kind::Counter,
        n("reconnects"),
    );
    s.one(
        "faultd_link_up",
        "1 while a link to pagesrv is up.",
        Kind::Gauge,
        f64::from(u8::from(st["link_up"] == true)),
    );
    let verdict = st["verdict"].as_str().unwrap_or("none").replace(' ', "_");
    for v in ["none", "match", "mismatch", "not_verified"] {
        s.labelled(
            "faultd_digest_verdict",
            "1 for the end-to-end check's verdict (none: not yet).",
            Kind::Gauge,
            vec![("verdict".into(), v.into())],
            f64::from(u8::from(v == verdict.as_str())),
        );
    }
    let mut counts: Vec<u64> = st["fault_latency_buckets_us"]
        .as_array()
        .map(|b| b.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    // Every bucket from the start, so no series appears in the middle of a run (faultd
    // publishes them all; a shorter list is padded).
    counts.resize(counts.len().max(LATENCY_BUCKETS), 0);
    s.histograms.push(Histogram {
        name: "faultd_fault_latency_seconds".into(),
        help: "From reading a fault to waking its thread.".into(),
        labels: Vec::new(),
        sum: n("fault_latency_sum_seconds"),
        count: counts.iter().sum(),
        buckets: pow2_us_buckets(&counts),
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_status_becomes_metrics() {
        let status = json!({"status": {
            "phase": "postcopy", "pages_total": 100, "pages_present": 40, "faults": 7,
            "demand_faults": 5, "pages_requested": 5, "pages_pushed": 30, "pages_zero": 5,
            "bytes_received": 143360, "reconnects": 1, "link_up": true,
            "fault_latency_buckets_us": [0, 0, 0, 0, 3, 4], "fault_latency_sum_seconds": 0.0002,
            "verdict": null,
        }});
        let text = snapshot(&status).render();
        for line in [
            "faultd_phase{phase=\"postcopy\"} 1",
            "faultd_phase{phase=\"done\"} 0",
            "faultd_pages_present 40",
            "faultd_pages_placed_total{how=\"pushed\"} 30",
            "faultd_demand_faults_total 5",
            "faultd_reconnects_total 1",
            "faultd_digest_verdict{verdict=\"none\"} 1",
            "faultd_fault_latency_seconds_count 7",
            "faultd_fault_latency_seconds_bucket{le=\"0.000032\"} 3",
            "faultd_fault_latency_seconds_bucket{le=\"8.388608\"} 7",
            "faultd_fault_latency_seconds_bucket{le=\"+Inf\"} 7",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
