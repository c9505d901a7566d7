//! `bench latency --restore-twice`: the snapshot-restore case of a recorded working set.
//! The first restore is demand-paged (no push, no pre-paging: every page the guest touches
//! faults) and records the order of its faults (`faultd --record-working-set`); the second
//! restores the same image with the set pushed first (`pagesrv --prefetch`), the third
//! without it (push on) for reference. The guest touches the same pages each time. With
//! `--from-store` the cold restores from the store alternate with the second's runs (one of
//! each in turn, `--runs` times), so that the machine's drifts fall on both alike; their
//! first passes are compared as medians.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::link::{DelayLine, Profile};
use crate::scenario::{
    LatencyArgs, RestoreOrder, Scenario, median_p99_run, run_median, run_scenario,
};
use crate::store_server::{BUCKET, StoreServer};

/// Runs the three restores on `image`.
///
/// # Errors
/// A run failing.
pub fn run(args: &LatencyArgs, image: &Path, work: &Path) -> Result<Value> {
    let ws = work.join("working-set");
    let _ = std::fs::remove_file(&ws);
    // A clustered set is touched whole (at most every page of the image).
    let touches = match args.restore_order {
        RestoreOrder::Random => args.demand_touches,
        RestoreOrder::Clustered => std::fs::metadata(image)?.len() / 4096,
    };
    let base = |push: bool| Scenario {
        touches: Some(touches),
        ..Scenario::plain(args.restore_order.order(), push, false)
    };
    // Push off is pure demand paging (no pre-paging either): every touch is a fault.
    let record = Scenario {
        faultd_extra: vec!["--record-working-set".into(), ws.display().to_string()],
        ..base(false)
    };
    eprintln!("bench: restore 1 (demand paging, recording the working set)");
    let first = run_median(&record, image, work, args, args.tuning)?;
    anyhow::ensure!(ws.exists(), "faultd wrote no working set");
    let prefetch = Scenario {
        pagesrv_extra: vec!["--prefetch".into(), ws.display().to_string()],
        ..base(true)
    };
    let (second, stored) = if args.from_store {
        let (local, stored, upload) = interleaved(args, image, work, &ws, &prefetch, &base(true))?;
        (local, Some((stored, upload)))
    } else {
        eprintln!("bench: restore 2 (the working set pushed first)");
        (run_median(&prefetch, image, work, args, args.tuning)?, None)
    };
    eprintln!("bench: restore 3 (push on, no working set: reference)");
    let third = run_median(&base(true), image, work, args, args.tuning)?;
    // The median of the runs where they were kept (the interleaved ones), else the run's.
    let pass = |r: &Value| {
        r["pass_ms_median"]
            .as_f64()
            .or(r["fault_latency_us"]["pass_ms"].as_f64())
    };
    let store = stored.as_ref().map(|(r, upload)| {
        let (cold, warm) = (pass(r), pass(&second));
        json!({
            "restore": r,
            "upload": upload,
            "rtt_ms": args.store_rtt_ms,
            "first_pass_ms": cold,
            "first_pass_ms_runs": r["pass_ms_runs"],
            "local_prefetched_first_pass_ms_runs": second["pass_ms_runs"],
            "first_pass_vs_local_prefetched": cold.zip(warm).map(|(s, l)| s / l.max(1e-9)),
        })
    });
    let first_faults = first["fault_latency_us"]["first_touches"].as_f64();
    let demand = |r: &Value| r["demand_faults"].as_f64();
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b.max(1e-9));
    Ok(json!({
        "touches": touches,
        "order": args.restore_order.order(),
        "restores": [first, second, third],
        "from_store": store,
        "demand_faults": {"first": first_faults, "prefetched": demand(&second), "push_only": demand(&third)},
        "first_pass_ms": {"first": pass(&first), "prefetched": pass(&second), "push_only": pass(&third)},
        "ratios": {
            "demand_faults_saved": ratio(demand(&second), first_faults).map(|r| 1.0 - r),
            "first_pass_speedup": ratio(pass(&first), pass(&second)),
            "first_pass_speedup_vs_push_only": ratio(pass(&third), pass(&second)),
        },
    }))
}

/// Uploads `image` with the working set `ws` to a local store (not timed), then runs, in
/// turn, `local` (the restore from the memory file with the set pushed first) and a cold
/// restore from the store behind a delay line of `--store-rtt-ms` (`push`: the scenario it
/// is served like), `--runs` times each. Returns the local restores' median run, the cold
/// ones', and the upload's line; each run's first pass is kept (`pass_ms_runs`) with their
/// median (`pass_ms_median`).
fn interleaved(
    args: &LatencyArgs,
    image: &Path,
    work: &Path,
    ws: &Path,
    local: &Scenario<'_>,
    push: &Scenario<'_>,
) -> Result<(Value, Value, String)> {
    let server = StoreServer::start(&work.join("store"))?;
    let url = format!("s3://{BUCKET}/bench-image");
    let out = server
        .pagesrv(server.addr)?
        .args(["store", "put"])
        .arg(image)
        .arg(&url)
        .arg("--working-set")
        .arg(ws)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cannot upload the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upload = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!("bench: {upload}");
    // The store's first byte: half the round trip each way (the delay line does not limit
    // the rate).
    let line = DelayLine::start(
        server.addr,
        Profile {
            name: "store",
            rate_bit_s: Some(1_000_000_000),
            one_way: std::time::Duration::from_millis(args.store_rtt_ms) / 2,
            stall: None,
        },
    )?;
    let cache = work.join("store-cache");
    std::fs::create_dir_all(&cache)?;
    let mut pagesrv_extra = push.pagesrv_extra.clone();
    pagesrv_extra.extend(["--store-cache".to_owned(), cache.display().to_string()]);
    let cold = Scenario {
        serve: Some((url, StoreServer::env(line.addr()))),
        pagesrv_extra,
        faultd_extra: push.faultd_extra.clone(),
        workload_extra: push.workload_extra.clone(),
        touches: push.touches,
        ..Scenario::plain(push.workload, push.push, push.naive)
    };
    let (mut locals, mut colds) = (Vec::new(), Vec::new());
    for i in 0..args.runs.max(1) {
        eprintln!(
            "bench: restore 2 (the working set pushed first), run {}",
            i + 1
        );
        locals.push(run_scenario(local, image, work, args, args.tuning)?);
        eprintln!(
            "bench: restore 4 (cold, from the object store at {} ms round trip, its working set first), run {}",
            args.store_rtt_ms,
            i + 1
        );
        colds.push(run_scenario(&cold, image, work, args, args.tuning)?);
    }
    Ok((with_passes(locals), with_passes(colds), upload))
}

/// The run with the median p99 (like [`run_median`]), with every run's first pass
/// (`pass_ms_runs`) and their median (`pass_ms_median`).
fn with_passes(runs: Vec<Value>) -> Value {
    let mut passes: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["fault_latency_us"]["pass_ms"].as_f64())
        .collect();
    let all = passes.clone();
    let pass_median = crate::scenario::median(&mut passes);
    let mut chosen = median_p99_run(runs);
    chosen["pass_ms_runs"] = json!(all);
    chosen["pass_ms_median"] = json!(pass_median);
    chosen
}

/// Prints the restores' lines.
pub fn print(r: &Value) {
    if r.is_null() {
        return;
    }
    let f = |k: &str, w: &str| r[k][w].as_f64().unwrap_or(0.0);
    println!();
    println!(
        "restore twice ({} order, at most {} touches): demand faults {:.0} → {:.0} with the working set ({:.0} with the push alone); first pass {:.0} ms → {:.0} ms ({:.0} ms)",
        r["order"].as_str().unwrap_or("?"),
        r["touches"],
        f("demand_faults", "first"),
        f("demand_faults", "prefetched"),
        f("demand_faults", "push_only"),
        f("first_pass_ms", "first"),
        f("first_pass_ms", "prefetched"),
        f("first_pass_ms", "push_only"),
    );
    println!("  ratios: {}", r["ratios"]);
    let s = &r["from_store"];
    if !s.is_null() {
        println!(
            "  from the object store ({} ms round trip, cold cache, its working set first): first pass {:.0} ms = {:.2}× the restore from the local file with the set pushed first (medians)",
            s["rtt_ms"],
            s["first_pass_ms"].as_f64().unwrap_or(0.0),
            s["first_pass_vs_local_prefetched"].as_f64().unwrap_or(0.0),
        );
        println!(
            "  first passes, in turn (ms): local {}, from the store {}",
            s["local_prefetched_first_pass_ms_runs"], s["first_pass_ms_runs"]
        );
        if let Some(cache) = s["restore"]["store_cache"].as_str() {
            println!("  store cache: {cache}");
        }
    }
}
