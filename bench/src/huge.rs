//! `bench latency --hugepages`: the same image served to a guest on 2 MiB hugetlb pages (as
//! Firecracker's huge-page guests are), against the 4 KiB guest in the same run: the latency
//! of a demand fault on a 2 MiB page, and the total time with the push on.

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::hugetlb::Reserved;
use crate::scenario::{LatencyArgs, Scenario, run_median};

/// Runs the huge-page scenarios on `image` (an ordinary file: pagesrv serves it in 2 MiB
/// pages to a destination that asks for them); `small_push` is the 4 KiB push-on run of the
/// same image and workload, for the ratio.
///
/// # Errors
/// Huge pages that cannot be reserved, or a run failing.
pub fn run(
    args: &LatencyArgs,
    image: &Path,
    work: &Path,
    small_push: Option<&Value>,
) -> Result<Value> {
    check_size(args.size_mib)?;
    let _reserved = Reserved::pages(args.size_mib / 2 + 8)?;
    let huge = |push: bool| Scenario {
        workload_extra: vec!["--hugepages".into()],
        // A 2 MiB page per fault: fewer touches keep the demand run short.
        touches: (!push).then_some(args.demand_touches.min(args.size_mib / 2)),
        ..Scenario::plain("random", push, false)
    };
    eprintln!("bench: 2 MiB pages, push off");
    let demand = run_median(&huge(false), image, work, args, args.tuning)?;
    eprintln!("bench: 2 MiB pages, push on");
    let push = run_median(&huge(true), image, work, args, args.tuning)?;
    let ratio = small_push
        .and_then(|small| small["total_ms"].as_f64())
        .zip(push["total_ms"].as_f64())
        .map(|(small, huge)| huge / small);
    Ok(json!({
        "demand": demand,
        "push": push,
        "total_vs_4k": ratio,
    }))
}

/// `--size-mib` must be whole 2 MiB pages (checked before anything runs).
///
/// # Errors
/// An odd size.
pub fn check_size(size_mib: u64) -> Result<()> {
    if !size_mib.is_multiple_of(2) {
        bail!("--hugepages needs --size-mib to be a whole number of 2 MiB pages");
    }
    Ok(())
}

/// Prints the huge-page lines.
pub fn print(r: &Value) {
    if r.is_null() {
        return;
    }
    let l = &r["demand"]["fault_latency_us"];
    println!();
    println!(
        "2 MiB pages: demand fault p50 {:.0} µs, p99 {:.0} µs ({} faults); push on: total {:.0} ms ({:.2}× the 4 KiB guest)",
        l["p50"].as_f64().unwrap_or(0.0),
        l["p99"].as_f64().unwrap_or(0.0),
        l["count"],
        r["push"]["total_ms"].as_f64().unwrap_or(0.0),
        r["total_vs_4k"].as_f64().unwrap_or(f64::NAN),
    );
}
