//! `bench latency --link dc|wan|stall|all`: the pair through shaped links (see
//! [`crate::link`]), each against that profile's own floor, measured through the same path
//! (delay line included) in the same run.
//!
//! Per profile: demand faults (random, push off), faults under a full-rate push and the
//! migration's throughput against the link rate (random, push on), and a sequential
//! workload with the adaptive pre-paging against pre-paging off (demand faults).

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::floor::{self, Placement};
use crate::link::{Link, Profile};
use crate::scenario::{LatencyArgs, Scenario, run_median};

/// Touches of a demand run, so that one takes seconds, not minutes, on slow links.
fn demand_touches(profile: &Profile, asked: u64) -> u64 {
    let round_trip_us = 2 * profile.one_way.as_micros() as u64 + 100;
    asked.min((4_000_000 / round_trip_us).max(100))
}

/// Runs the shaped profiles on `image`; returns one JSON record per profile.
///
/// # Errors
/// A link that cannot be built, or a run failing.
pub fn run(
    args: &LatencyArgs,
    profiles: &[Profile],
    image: &Path,
    image_mib: u64,
    work: &Path,
) -> Result<Value> {
    let placement = match args.tuning.matching_floor() {
        "same_vcpu" => Placement::SameCpu,
        "cross_vcpu" => Placement::CrossCpu,
        _ => Placement::Scheduler,
    };
    let mut out = Vec::new();
    for &profile in profiles.iter().filter(|p| p.is_shaped()) {
        eprintln!("bench: link profile {}: building it", profile.name);
        let link = Link::up(profile)?;
        let round_trips = demand_touches(&profile, 2000) as usize;
        eprintln!("bench: link profile {}: measuring its floor", profile.name);
        let floor = json!({
            "placement": args.tuning.matching_floor(),
            "rtt_4k_us": floor::rtt_4k(round_trips, placement, Some(&link))?,
            "remote_fault_floor_us": floor::remote_fault(round_trips, placement, Some(&link))?,
            "link_rate_mib_s": profile.rate_mib_s(),
        });
        let touches = demand_touches(&profile, args.demand_touches);
        // Sequential, no background push: pre-paging alone decides how many touches wait.
        let seq_touches = (touches * 4).min(image_mib << 8);
        let on = |workload, pagesrv_extra: &[&str]| Scenario {
            pagesrv_extra: pagesrv_extra.iter().map(|a| a.to_string()).collect(),
            link: Some(&link),
            ..Scenario::plain(workload, true, false)
        };
        let demand = Scenario {
            push: false,
            touches: Some(touches),
            ..on("random", &["--prepage-window", "0"])
        };
        let mut runs = Vec::new();
        for (name, sc) in [
            ("demand", demand),
            ("push", on("random", &[])),
            (
                "seq_adaptive",
                Scenario {
                    push: false,
                    touches: Some(seq_touches),
                    ..on("seq", &[])
                },
            ),
            (
                "seq_no_prepage",
                Scenario {
                    push: false,
                    touches: Some(seq_touches),
                    ..on("seq", &["--prepage-window", "0"])
                },
            ),
        ] {
            eprintln!("bench: link profile {}: {name}", profile.name);
            let mut record = run_median(&sc, image, work, args, args.tuning)?;
            record["profile_scenario"] = json!(name);
            runs.push(record);
        }
        // A touch of at least about half the path's fault floor waited for the network (the
        // histogram's buckets are powers of two: the cut falls at a quarter, see
        // `slow_touches`).
        let slow = floor["remote_fault_floor_us"]["p50"]
            .as_f64()
            .unwrap_or(0.0)
            / 2.0;
        for run in &mut runs[2..] {
            run["demand_faults"] = json!(slow_touches(&run["fault_latency_us"], slow));
        }
        let us = |run: usize, q: &str| runs[run]["fault_latency_us"][q].as_f64();
        let floor_us = |q: &str| floor["remote_fault_floor_us"][q].as_f64();
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let requested = |run: usize| runs[run]["demand_faults"].as_f64();
        let ratios = json!({
            "fault_p50_vs_floor": ratio(us(0, "p50"), floor_us("p50")),
            "fault_p99_vs_floor": ratio(us(0, "p99"), floor_us("p99")),
            "fault_p99_push_vs_floor": ratio(us(1, "p99"), floor_us("p99")),
            "throughput_vs_link_rate": ratio(runs[1]["throughput_mib_s"].as_f64(), profile.rate_mib_s()),
            "seq_demand_faults_prepage_off_vs_adaptive": ratio(requested(3), requested(2).map(|r| r.max(1.0))),
        });
        out.push(json!({
            "profile": profile.name,
            "rate_bit_s": profile.rate_bit_s,
            "one_way_us": profile.one_way.as_micros() as u64,
            "stall": profile.stall.map(|(every, stall)| json!({"every_ms": every.as_millis() as u64, "stall_ms": stall.as_millis() as u64})),
            "image_mib": image_mib,
            "demand_touches": touches,
            "floor": floor,
            "runs": runs,
            "ratios": ratios,
        }));
        drop(link);
    }
    Ok(Value::Array(out))
}

/// Touches of at least about `threshold_us` in a workload's power-of-two histogram (a bucket
/// counts when its lower bound is at least half the threshold).
fn slow_touches(latency: &Value, threshold_us: f64) -> u64 {
    latency["dist_us"]
        .as_array()
        .map(|buckets| {
            buckets
                .iter()
                .enumerate()
                .filter(|(i, _)| (1u64 << i) as f64 >= threshold_us / 2.0)
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Prints the profiles' table.
pub fn print(profiles: &Value) {
    let Some(list) = profiles.as_array().filter(|l| !l.is_empty()) else {
        return;
    };
    println!();
    println!(
        "link profiles (floor = a 4 KiB remote fault through the same path)   floor p50/p99 µs   demand p50/p99 µs   push p99 µs   MiB/s (link)   seq demand faults adaptive/off"
    );
    for p in list {
        let f = &p["floor"]["remote_fault_floor_us"];
        let run = |name: &str| {
            p["runs"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["profile_scenario"] == name))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let (demand, push, seq, seq_off) = (
            run("demand"),
            run("push"),
            run("seq_adaptive"),
            run("seq_no_prepage"),
        );
        let g = |v: &Value, q: &str| v["fault_latency_us"][q].as_f64().unwrap_or(0.0);
        println!(
            "  {:<8} {:>57.1} / {:<8.1} {:>8.1} / {:<8.1} {:>10.1} {:>9.0} ({:.0}) {:>12} / {}",
            p["profile"].as_str().unwrap_or(""),
            f["p50"].as_f64().unwrap_or(0.0),
            f["p99"].as_f64().unwrap_or(0.0),
            g(&demand, "p50"),
            g(&demand, "p99"),
            g(&push, "p99"),
            push["throughput_mib_s"].as_f64().unwrap_or(0.0),
            p["floor"]["link_rate_mib_s"].as_f64().unwrap_or(0.0),
            seq["demand_faults"],
            seq_off["demand_faults"],
        );
        println!("           ratios: {}", p["ratios"]);
    }
}
