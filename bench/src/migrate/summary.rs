//! What one `bench migrate` run measured: the summary JSON, from the events of both VMMs,
//! pagesrv's rounds and faultd's stats, and its printout.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use super::MigrateArgs;

/// The events that frame one migration.
pub(super) struct Timeline {
    /// The guest's first report while touching pages: the warm-up starts.
    pub first_touching: Value,
    /// Its last report before the migration started.
    pub warm: Value,
    /// The start: the source VMM's `migrating` (precopy) or `paused` (postcopy).
    pub start: Value,
    /// The source VMM's `paused`, with the guest's counters as it stopped.
    pub paused: Value,
    /// The destination VMM's `resumed`.
    pub resumed: Value,
    /// The destination guest's reports before its VMM said `complete`.
    pub during: Vec<Value>,
    /// Its reports after, for `--after-ms`.
    pub after: Vec<Value>,
    /// pagesrv's control events (precopy and hybrid).
    pub pagesrv_events: Vec<Value>,
}

/// The run's names: workload, strategy, placement mode.
pub(super) struct Labels<'a> {
    pub workload: &'a str,
    pub strategy: &'a str,
    pub mode: &'a str,
}

/// The summary JSON of a run (`--json`), from its timeline, faultd's stats and the digest of
/// the source's RAM file.
pub(super) fn summarize(
    args: &MigrateArgs,
    labels: &Labels<'_>,
    t: &Timeline,
    stats: Value,
    source_digest: u64,
) -> Value {
    let (first_touching, warm, start, paused, resumed) =
        (&t.first_touching, &t.warm, &t.start, &t.paused, &t.resumed);
    let (during, after) = (&t.during, &t.after);
    let (workload, strategy, mode) = (labels.workload, labels.strategy, labels.mode);
    let precopy_first = strategy != "postcopy";
    let tsc_per_us = paused["tsc_per_us"].as_f64().unwrap_or(2000.0);
    let last = after.last().expect("at least one report after completion");
    // When faultd placed the last page (the VMM's `complete` comes after the digest check).
    let completed_us = (stats["completed_unix_ms"].as_f64().unwrap_or(0.0) * 1000.0) as u64;
    // The guest's reports since it resumed; the first one after the last page closes the
    // postcopy window.
    let reports: Vec<&Value> = during.iter().chain(after.iter()).collect();
    let end = reports
        .iter()
        .position(|r| t_us(r) >= completed_us)
        .unwrap_or(reports.len() - 1);
    let post_end = reports[end];
    let window_max_tsc = reports[..=end]
        .iter()
        .map(|r| counter(r, "window_max_tsc"))
        .max()
        .unwrap_or(0);
    // From the guest's counters as it stopped: the time it spent stalled after it resumed
    // (QEMU's postcopy blocktime). Whether the pause itself counts depends on kvm-pvm's
    // handling of the restored TSC: the guest sees it when its destination VM was created
    // just before the restore (postcopy), not when the VM waited, created, for the switch
    // (precopy, hybrid). The pause is milliseconds either way, except with
    // --base-similarity in postcopy, where it includes writing the base image.
    let blocktime_ms = (counter(post_end, "stall_tsc_sum") - counter(paused, "stall_tsc_sum"))
        as f64
        / tsc_per_us
        / 1000.0;
    // The last second of the window (or all of it, if shorter).
    let first_after = after
        .iter()
        .find(|r| t_us(r) + 1_000_000 >= t_us(last))
        .unwrap_or(&after[0]);
    // The guest does not run between pause and resume: rate over the time since resume, up
    // to the last report before completion (or the first after it, if none came before).
    let postcopy_last = if end > 0 { reports[end - 1] } else { post_end };
    let postcopy_rate = counter(postcopy_last, "touches").saturating_sub(counter(paused, "touches"))
        as f64
        / (t_us(postcopy_last).saturating_sub(t_us(resumed)).max(1) as f64 / 1e6);
    let events = &t.pagesrv_events;
    let rounds: Vec<&Value> = events.iter().filter(|e| event_is(e, "round")).collect();
    let converged_by = events
        .iter()
        .find(|e| event_is(e, "converged"))
        .map_or(Value::Null, |e| e["by"].clone());
    let bytes_precopy = stats["bytes_precopy"].as_u64().unwrap_or(0);
    let bytes_received = stats["bytes_received"].as_u64().unwrap_or(0);
    json!({
        "size_mib": args.size_mib,
        "vcpus": args.vcpus,
        "streams": args.streams,
        "cut_after_mib": args.cut_after_mib,
        "page_size": args.page_size,
        "workload": workload,
        "dirty_rate": args.dirty_rate,
        "base_similarity": args.base_similarity,
        "free_pct": args.free_pct,
        "strategy": strategy,
        "mode": mode,
        "downtime_ms": t_us(resumed).saturating_sub(t_us(paused)) as f64 / 1000.0,
        "total_ms": completed_us.saturating_sub(t_us(start)) as f64 / 1000.0,
        "pause_to_complete_ms": completed_us.saturating_sub(t_us(paused)) as f64 / 1000.0,
        "precopy_ms": t_us(paused).saturating_sub(t_us(start)) as f64 / 1000.0,
        "precopy_rounds": rounds.len(),
        "rounds": rounds,
        "converged_by": converged_by,
        "bytes_precopy": bytes_precopy,
        "bytes_postcopy": bytes_received - bytes_precopy,
        "pages_discarded": stats["pages_discarded"],
        "blocktime_ms": blocktime_ms,
        "digest_match": stats["received_digest"] == format!("{source_digest:016x}"),
        "source_digest": format!("{source_digest:016x}"),
        "guest": {
            "pages_verified": counter(last, "pages_verified"),
            "mismatches": counter(last, "mismatches"),
            "ran_on_destination": counter(last, "touches") > counter(paused, "touches"),
            "touches_per_s_before": touch_rate(first_touching, warm),
            "touches_per_s_during_precopy": if precopy_first { touch_rate(warm, paused) } else { 0.0 },
            "touches_per_s_during_postcopy": postcopy_rate,
            "touches_per_s_after": touch_rate(first_after, last),
            "max_stall_us": window_max_tsc as f64 / tsc_per_us,
            "fault_latency_us": guest_fault_percentiles(paused, post_end, 10.0 * tsc_per_us, tsc_per_us),
            "before": paused["counters"],
            "after": last["counters"],
            "vcpu_touches_before": paused["vcpu_touches"],
            "vcpu_touches_after": last["vcpu_touches"],
        },
        "faultd": stats,
    })
}

pub(super) fn event_is(v: &Value, name: &str) -> bool {
    v["event"] == name
}

pub(super) fn t_us(v: &Value) -> u64 {
    v["t_us"].as_u64().unwrap_or(0)
}

pub(super) fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

/// Touches per second between two reports.
fn touch_rate(a: &Value, b: &Value) -> f64 {
    let dt = t_us(b).saturating_sub(t_us(a)) as f64 / 1e6;
    if dt <= 0.0 {
        return 0.0;
    }
    counter(b, "touches").saturating_sub(counter(a, "touches")) as f64 / dt
}

/// Percentiles of the guest's touch histogram difference between two reports, counting only
/// touches of at least `min_tsc` ticks (faults), as bucket upper bounds in µs.
fn guest_fault_percentiles(a: &Value, b: &Value, min_tsc: f64, tsc_per_us: f64) -> Value {
    let hist = |v: &Value| -> Vec<u64> {
        v["hist"]
            .as_array()
            .map(|h| h.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    let (ha, hb) = (hist(a), hist(b));
    let delta: Vec<(usize, u64)> = hb
        .iter()
        .enumerate()
        .map(|(i, &n)| (i, n.saturating_sub(*ha.get(i).unwrap_or(&0))))
        .filter(|&(i, n)| n > 0 && (2f64.powi(i as i32 + 1)) > min_tsc)
        .collect();
    let total: u64 = delta.iter().map(|&(_, n)| n).sum();
    let pick = |q: f64| -> f64 {
        let target = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for &(i, n) in &delta {
            seen += n;
            if seen >= target.max(1) {
                return 2f64.powi(i as i32 + 1) / tsc_per_us;
            }
        }
        0.0
    };
    json!({"count": total, "p50_le": pick(0.5), "p99_le": pick(0.99)})
}

/// The digest of a RAM file in `page_size` pages, as faultd's stats report it (pages set in
/// `free`, a bitmap of the same pages, count as zero: the destination holds zeros there).
pub(super) fn file_digest(path: &Path, free: Option<&[u8]>, page_size: usize) -> Result<u64> {
    use std::io::Read;
    let is_free = |p: u64| {
        free.is_some_and(|f| {
            f.get((p / 8) as usize)
                .is_some_and(|b| b & (1 << (p % 8)) != 0)
        })
    };
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut page, mut sum) = (0u64, 0u64);
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(sum);
        }
        for (i, bytes) in buf[..filled].chunks(page_size).enumerate() {
            let p = page + i as u64;
            if !is_free(p) {
                sum = sum.wrapping_add(common::digest::page_digest(p, bytes));
            }
        }
        page += (filled / page_size) as u64;
    }
}

/// Prints the summary for a person.
pub(super) fn print_summary(s: &Value) {
    let g = &s["guest"];
    let f = &s["faultd"];
    let fl = &f["fault_latency_us"];
    let gl = &g["fault_latency_us"];
    println!();
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "live migration of a {} MiB KVM guest with {} vCPU(s) on {} pages over loopback ({}, {} workload, {} mode)",
        s["size_mib"],
        s["vcpus"],
        s["page_size"].as_str().unwrap_or("4k"),
        s["strategy"].as_str().unwrap_or(""),
        s["workload"].as_str().unwrap_or(""),
        s["mode"].as_str().unwrap_or("")
    );
    if s["strategy"] != "postcopy" {
        println!(
            "  timeline                        precopy {:.1} ms ({} rounds, {}) → pause → resumed {:.1} ms later → every page {:.1} ms after the pause",
            ms(&s["precopy_ms"]),
            s["precopy_rounds"],
            match s["converged_by"].as_str().unwrap_or("?") {
                by @ ("budget" | "forced") => format!("converged by {by}"),
                by => format!("did not converge: {by}"),
            },
            ms(&s["downtime_ms"]),
            ms(&s["pause_to_complete_ms"])
        );
        let rounds: Vec<String> = s["rounds"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|r| {
                        format!(
                            "{} in {:.0} ms",
                            r["pages_sent"],
                            r["seconds"].as_f64().unwrap_or(0.0) * 1000.0
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("  pages sent per round            {}", rounds.join(", "));
    }
    println!(
        "  downtime (pause to resume)      {:>10.1} ms",
        ms(&s["downtime_ms"])
    );
    println!(
        "  total (start to every page)     {:>10.1} ms",
        ms(&s["total_ms"])
    );
    println!(
        "  vCPU blocktime (stalls ≥ 10 µs) {:>10.1} ms   (after the resume, to the last page)",
        s["blocktime_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  faults served by faultd         {:>10}   p50 {:.1} µs, p99 {:.1} µs (read → wake)",
        fl["count"],
        fl["p50"].as_f64().unwrap_or(0.0),
        fl["p99"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  faults seen by the guest        {:>10}   p50 ≤ {:.0} µs, p99 ≤ {:.0} µs (power-of-two buckets)",
        gl["count"],
        gl["p50_le"].as_f64().unwrap_or(0.0),
        gl["p99_le"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  pages                           {} requested, {} pushed, {} zero, {} removed",
        f["pages_requested"], f["pages_pushed"], f["pages_zero"], f["pages_removed"]
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
    println!(
        "  bytes received                  {:>10.1} MiB ({:.2} × RAM): {:.1} MiB before the pause, {:.1} MiB after; {} pages dropped as written again",
        mib(&f["bytes_received"]),
        mib(&f["bytes_received"]) / s["size_mib"].as_f64().unwrap_or(1.0),
        mib(&s["bytes_precopy"]),
        mib(&s["bytes_postcopy"]),
        s["pages_discarded"]
    );
    if f["pages_reused"].as_u64().unwrap_or(0) > 0 || s["base_similarity"].is_number() {
        println!(
            "  base image ({}% similar)        {} pages placed from it: {:.1} MiB not sent, {:.1} MiB of hashes",
            s["base_similarity"],
            f["pages_reused"],
            mib(&f["bytes_saved_base"]),
            mib(&f["bytes_hashes"])
        );
    }
    println!(
        "  guest touches/s                 before {:.0}, during precopy {:.0}, during postcopy {:.0}, after {:.0}",
        g["touches_per_s_before"].as_f64().unwrap_or(0.0),
        g["touches_per_s_during_precopy"].as_f64().unwrap_or(0.0),
        g["touches_per_s_during_postcopy"].as_f64().unwrap_or(0.0),
        g["touches_per_s_after"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  guest max stall                 {:>10.1} µs",
        g["max_stall_us"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  guest verification              {} pages verified, {} mismatches (before pause: {} verified)",
        g["pages_verified"], g["mismatches"], g["before"]["pages_verified"]
    );
    println!(
        "  digest of every page            {}",
        if s["digest_match"] == true {
            "match"
        } else {
            "MISMATCH"
        }
    );
}
