//! `bench latency`: the machine's floor and the real pair, measured in one run.
//!
//! Scenarios run the real pagesrv and faultd on loopback with `test-vmm` as the workload (it
//! times every first touch of a page, as the guest sees it): random, sequential and hot
//! (80% of touches to 10% of pages) access, with the background push off (pure demand:
//! fault latency) and on (fault latency under a full-rate stream, and total time until every
//! page is present), plus the naive baseline (one connection: replies queue behind pushed
//! pages). Results are reported as ratios to the floor.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::floor::{self, Placement};
use crate::huge;
use crate::link::{self, LinkChoice, Profile};
use crate::procs::remove_on_interrupt;
use crate::profiles;
use crate::restore;
use crate::scenario::{
    LatencyArgs, PushChoice, Scenario, WorkloadChoice, median, run_median, run_scenario,
    write_image_seeded,
};
use crate::svg;
use crate::tuning::Tuning;

/// Image size on shaped links (MiB).
const LINK_IMAGE_MIB: u64 = 512;

fn write_image(path: &Path, pages: u64) -> Result<()> {
    write_image_seeded(path, pages, 0)
}

/// `--fault-rate`: pure demand faults (random pages, no push, no pre-paging) from one
/// thread and from two at once, nothing pinned (pinning puts the workload on one CPU);
/// the rate is the faulting threads over the median fault latency. The median of `--runs`
/// each.
fn fault_rate(args: &LatencyArgs, image: &Path, work: &Path) -> Result<Value> {
    let mut rates = Vec::new();
    for threads in [1, 2] {
        let sc = Scenario {
            threads,
            ..Scenario::plain("random", false, false)
        };
        let mut per_run = Vec::new();
        for _ in 0..args.runs.max(1) {
            eprintln!("bench: fault rate, {threads} faulting thread(s)");
            let r = run_scenario(&sc, image, work, args, Tuning::DEFAULT)?;
            // Each thread is always waiting on a fault or checking a page; the fault path's
            // capacity is threads over the median fault latency (the checks, which also
            // split across the threads, left out).
            let p50_s = r["fault_latency_us"]["p50"].as_f64().unwrap_or(0.0) / 1e6;
            per_run.push(threads as f64 / p50_s.max(1e-9));
        }
        rates.push(median(&mut per_run));
    }
    Ok(json!({
        "one_thread_per_s": rates[0],
        "two_threads_per_s": rates[1],
        "ratio": rates[1] / rates[0].max(1e-9),
        "method": "faulting threads / median fault latency (nothing pinned)",
    }))
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Any step failing.
pub fn run(args: &LatencyArgs) -> Result<()> {
    ensure!(args.size_mib >= 4, "--size-mib must be at least 4");
    if args.insecure_no_key {
        crate::procs::run_without_key();
    }
    let shaped = Profile::chosen(args.link).iter().any(Profile::is_shaped);
    if shaped {
        link::check_available()?;
        link::remove_stale();
    }
    if args.hugepages {
        huge::check_size(args.size_mib)?;
    }
    if shaped || args.hugepages {
        link::clean_up_on_interrupt()?;
    }
    let tag = format!("pagemig-lat-{}", std::process::id());
    let image = args.ram_dir.join(format!("{tag}.mem"));
    let work = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&work)?;
    remove_on_interrupt(&work);
    remove_on_interrupt(&image);
    remove_on_interrupt(&image.with_extension("link.mem"));
    let result = bench(args, &image, &work);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The floors under each placement of their threads (see [`floor::Placement`]), and the
/// bulk floor of a source that reads `image`.
fn measure_floors(args: &LatencyArgs, image: &Path) -> Result<Value> {
    let bulk_bytes = (args.size_mib as usize).min(1024) << 20;
    let mut floors = serde_json::Map::new();
    for (name, placement) in [
        ("cross_vcpu", Placement::CrossCpu),
        ("same_vcpu", Placement::SameCpu),
        ("scheduler", Placement::Scheduler),
    ] {
        eprintln!("bench: measuring the floor ({name})");
        floors.insert(
            name.into(),
            json!({
                "uffd_fault_us": floor::uffd_fault(4000, placement)?,
                "rtt_4k_us": floor::rtt_4k(5000, placement, None)?,
                "remote_fault_floor_us": floor::remote_fault(4000, placement, None)?,
                "bulk_fresh_mib_s": floor::bulk(bulk_bytes, placement)?,
            }),
        );
    }
    floors["cross_vcpu"]["bulk_from_memory_file_mib_s"] =
        json!(floor::bulk_from_file(image, Placement::CrossCpu)?);
    Ok(Value::Object(floors))
}

/// The median throughput of the push-on scenarios (the naive baseline left out).
fn median_throughput(runs: &[Value]) -> Option<f64> {
    let mut tput: Vec<f64> = runs
        .iter()
        .filter(|r| r["naive_single_connection"] == false)
        .filter_map(|r| r["throughput_mib_s"].as_f64())
        .collect();
    (!tput.is_empty()).then(|| median(&mut tput))
}

/// The target ratios of the scenarios to one placement's floor.
fn ratios_to(floor: &Value, runs: &[Value], first: &str) -> Value {
    let floor_p = |q: &str| {
        floor["remote_fault_floor_us"][q]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let pick = |push: &str, naive: bool| {
        runs.iter().find(|r| {
            r["workload"] == first && r["push"] == push && r["naive_single_connection"] == naive
        })
    };
    let ratio = |r: Option<&Value>, q: &str| {
        r.and_then(|r| r["fault_latency_us"][q].as_f64())
            .map(|v| v / floor_p(q))
    };
    let tput = median_throughput(runs);
    json!({
        "fault_p50_vs_floor": ratio(pick("off", false), "p50"),
        "fault_p99_vs_floor": ratio(pick("off", false), "p99"),
        "fault_p99_push_vs_floor": ratio(pick("on", false), "p99"),
        "naive_fault_p99_vs_floor": ratio(pick("on", true), "p99"),
        "throughput_vs_floor": tput.map(|t| t / floor["bulk_fresh_mib_s"].as_f64().unwrap_or(f64::NAN)),
    })
}

/// `--compare-levers`: the first workload, with the push off and on, under each lever
/// setting, with its ratios to this run's floors and the daemons' CPU time.
fn compare_levers(
    args: &LatencyArgs,
    floor: &Value,
    workload: &'static str,
    pushes: &[bool],
    image: &Path,
    work: &Path,
) -> Result<Value> {
    let mut out = Vec::new();
    for &tuning in &args.compare_levers {
        let mut runs = Vec::new();
        for &push in pushes {
            let sc = Scenario::plain(workload, push, false);
            runs.push(run_median(&sc, image, work, args, tuning)?);
        }
        let pick = |push: &str, key: &str| {
            runs.iter()
                .find(|r| r["push"] == push)
                .map_or(Value::Null, |r| r[key].clone())
        };
        out.push(json!({
            "levers": tuning.name(),
            "targets": ratios_to(&floor["cross_vcpu"], &runs, workload),
            "same_vcpu_for_information": ratios_to(&floor["same_vcpu"], &runs, workload),
            "like_for_like": {
                "floor": tuning.matching_floor(),
                "ratios": ratios_to(&floor[tuning.matching_floor()], &runs, workload),
            },
            "push_off_fault_latency_us": pick("off", "fault_latency_us"),
            "push_on_fault_latency_us": pick("on", "fault_latency_us"),
            "push_off_cpu_ms": pick("off", "cpu_ms_during_workload"),
            "push_off_faults": pick("off", "faults"),
            "push_on_total_ms": pick("on", "total_ms"),
            "push_on_pages_requested": pick("on", "pages")["requested"].clone(),
            "push_on_throughput_mib_s": pick("on", "throughput_mib_s"),
        }));
    }
    Ok(Value::Array(out))
}

fn loopback_bench(args: &LatencyArgs, image: &Path, work: &Path) -> Result<Value> {
    let pages = args.size_mib << 8;
    eprintln!("bench: writing a {} MiB image", args.size_mib);
    write_image(image, pages)?;
    let floor = measure_floors(args, image)?;
    let workloads: &[&'static str] = match args.workload {
        WorkloadChoice::Random => &["random"],
        WorkloadChoice::Seq => &["seq"],
        WorkloadChoice::Hot => &["hot"],
        WorkloadChoice::All => &["random", "seq", "hot"],
    };
    let pushes: &[bool] = match args.push {
        PushChoice::On => &[true],
        PushChoice::Off => &[false],
        PushChoice::Both => &[false, true],
    };
    let mut scenarios: Vec<Scenario> = Vec::new();
    for &workload in workloads {
        for &push in pushes {
            scenarios.push(Scenario::plain(workload, push, false));
        }
    }
    if pushes.contains(&true) {
        scenarios.push(Scenario::plain(workloads[0], true, true));
    }
    let mut runs = Vec::new();
    for sc in &scenarios {
        runs.push(run_median(sc, image, work, args, args.tuning)?);
    }
    let ratios = json!({
        "floor": "cross_vcpu",
        "targets": ratios_to(&floor["cross_vcpu"], &runs, workloads[0]),
        "same_vcpu_for_information": ratios_to(&floor["same_vcpu"], &runs, workloads[0]),
        "like_for_like": {
            "floor": args.tuning.matching_floor(),
            "ratios": ratios_to(&floor[args.tuning.matching_floor()], &runs, workloads[0]),
        },
        "throughput_vs_memory_file_bulk_floor": median_throughput(&runs).map(|t| {
            t / floor["cross_vcpu"]["bulk_from_memory_file_mib_s"].as_f64().unwrap_or(f64::NAN)
        }),
    });
    let levers = compare_levers(args, &floor, workloads[0], pushes, image, work)?;
    let mut growth = Vec::new();
    for &size_mib in &args.growth_sizes {
        eprintln!("bench: growth run, {size_mib} MiB, random workload, push on");
        let sized = LatencyArgs {
            size_mib,
            growth_sizes: Vec::new(),
            json: None,
            svg: None,
            ram_dir: args.ram_dir.clone(),
            compare_levers: Vec::new(),
            link: LinkChoice::Loopback,
            restore_twice: false,
            from_store: false,
            fault_rate: false,
            hugepages: false,
            ..*args
        };
        let path = work.join(format!("growth-{size_mib}.mem"));
        write_image(&path, size_mib << 8)?;
        let sc = Scenario::plain("random", true, false);
        let record = run_scenario(&sc, &path, work, &sized, args.tuning);
        let _ = std::fs::remove_file(&path);
        growth.push(record?);
    }
    Ok(json!({
        "floor": floor, "runs": runs, "growth": growth, "ratios": ratios, "levers": levers,
        "tuning": args.tuning.name(),
    }))
}

/// The loopback benchmark (if `--link` includes it), then the shaped profiles; prints and
/// writes the results.
fn bench(args: &LatencyArgs, image: &Path, work: &Path) -> Result<()> {
    let profiles = Profile::chosen(args.link);
    let mut result = if profiles.iter().any(|p| !p.is_shaped()) {
        loopback_bench(args, image, work)?
    } else {
        json!({ "tuning": args.tuning.name() })
    };
    if profiles.iter().any(Profile::is_shaped) {
        // A smaller image on shaped links: a 1 Gbit/s push of 1 GiB alone takes 9 s.
        let mib = args.size_mib.min(LINK_IMAGE_MIB);
        let path = image.with_extension("link.mem");
        write_image(&path, mib << 8)?;
        let shaped = profiles::run(args, &profiles, &path, mib, work);
        let _ = std::fs::remove_file(&path);
        result["profiles"] = shaped?;
    }
    // The extra runs use the loopback image (written by the loopback bench, else here).
    let ensure_image = || -> Result<()> {
        if !image.exists() {
            write_image(image, args.size_mib << 8)?;
        }
        Ok(())
    };
    if args.hugepages {
        ensure_image()?;
        let small = result["runs"].as_array().and_then(|runs| {
            runs.iter()
                .find(|r| r["workload"] == "random" && r["push"] == "on")
                .cloned()
        });
        result["hugepages"] = huge::run(args, image, work, small.as_ref())?;
    }
    if args.fault_rate {
        ensure_image()?;
        result["fault_rate"] = fault_rate(args, image, work)?;
    }
    if args.restore_twice {
        ensure_image()?;
        let restored = restore::run(args, image, work);
        result["restore_twice"] = restored?;
    }
    if result.get("runs").is_some() {
        print_table(&result);
    }
    restore::print(&result["restore_twice"]);
    huge::print(&result["hugepages"]);
    if let Some(r) = result.get("fault_rate") {
        println!();
        println!(
            "demand faults per second, 1 thread {:.0}, 2 threads at once {:.0}: {:.2}×",
            r["one_thread_per_s"].as_f64().unwrap_or(0.0),
            r["two_threads_per_s"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
        );
    }
    profiles::print(&result["profiles"]);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg::latency_cdfs(&result))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    let us = |v: &Value, q: &str| v[q].as_f64().unwrap_or(0.0);
    let f = &r["floor"];
    let names = [
        ("cross_vcpu", "cross-vCPU"),
        ("same_vcpu", "same vCPU"),
        ("scheduler", "scheduler"),
    ];
    println!(
        "floor (this machine, this run), p50 / p99 µs     cross-vCPU       same vCPU       scheduler"
    );
    for (name, key) in [
        ("  in-process uffd fault + UFFDIO_COPY", "uffd_fault_us"),
        ("  loopback TCP 4 KiB request/response", "rtt_4k_us"),
        (
            "  remote fault (fault → TCP fetch → copy)",
            "remote_fault_floor_us",
        ),
    ] {
        let cells: Vec<String> = names
            .iter()
            .map(|(k, _)| {
                format!(
                    "{:>7.1} /{:>7.1}",
                    us(&f[*k][key], "p50"),
                    us(&f[*k][key], "p99")
                )
            })
            .collect();
        println!("{name:<48} {}", cells.join(" "));
    }
    let cells: Vec<String> = names
        .iter()
        .map(|(k, _)| {
            format!(
                "{:>10.0} MiB/s",
                f[*k]["bulk_fresh_mib_s"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    println!(
        "{:<48} {}",
        "  bulk: TCP stream → UFFDIO_COPY, fresh memory",
        cells.join(" ")
    );
    println!(
        "{:<48} {:>10.0} MiB/s  (information: a source that reads its memory)",
        "  bulk: memory file → TCP → UFFDIO_COPY",
        f["cross_vcpu"]["bulk_from_memory_file_mib_s"]
            .as_f64()
            .unwrap_or(0.0)
    );
    println!();
    println!(
        "scenarios run with the levers {} (`--tuning`)",
        r["tuning"].as_str().unwrap_or("")
    );
    println!(
        "scenario                      faults   p50 µs   p90 µs   p99 µs  p99.9 µs   max µs   total ms   MiB/s"
    );
    for run in r["runs"].as_array().into_iter().flatten() {
        let l = &run["fault_latency_us"];
        let name = format!(
            "{} push {}{}",
            run["workload"].as_str().unwrap_or(""),
            run["push"].as_str().unwrap_or(""),
            if run["naive_single_connection"] == true {
                " (naive)"
            } else {
                ""
            }
        );
        let total = run["total_ms"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.0}"));
        let tput = run["throughput_mib_s"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "  {name:<26} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>10} {:>7}",
            l["count"],
            us(l, "p50"),
            us(l, "p90"),
            us(l, "p99"),
            us(l, "p999"),
            us(l, "max"),
            total,
            tput
        );
    }
    for run in r["growth"].as_array().into_iter().flatten() {
        println!(
            "  growth {:>6} MiB: total {:>8.0} ms, {:>6.0} MiB/s, faultd private RSS {:.1} MiB",
            run["size_mib"],
            run["total_ms"].as_f64().unwrap_or(0.0),
            run["throughput_mib_s"].as_f64().unwrap_or(0.0),
            run["peak_private_rss_bytes"]["faultd"]
                .as_f64()
                .unwrap_or(0.0)
                / 1048576.0
        );
    }
    if let Some(run) = r["runs"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["peak_private_rss_bytes"].is_object()))
    {
        let m = &run["peak_private_rss_bytes"];
        println!(
            "  peak private RSS: faultd {:.1} MiB, pagesrv {:.1} MiB (limit {:.1} MiB)",
            m["faultd"].as_f64().unwrap_or(0.0) / 1048576.0,
            m["pagesrv"].as_f64().unwrap_or(0.0) / 1048576.0,
            m["limit_32mib_plus_1_bit_per_page"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    }
    println!();
    if let Some(levers) = r["levers"].as_array().filter(|l| !l.is_empty()) {
        println!();
        println!(
            "levers ({} workload)            off p50 µs  off p99 µs  on p99 µs  on MiB/s   off CPU ms (faultd/pagesrv)",
            r["runs"][0]["workload"].as_str().unwrap_or("")
        );
        for l in levers {
            let cpu = &l["push_off_cpu_ms"];
            println!(
                "  {:<30} {:>10.1} {:>11.1} {:>10.1} {:>9.0}   {:>6.0} / {:<6.0}",
                l["levers"].as_str().unwrap_or(""),
                us(&l["push_off_fault_latency_us"], "p50"),
                us(&l["push_off_fault_latency_us"], "p99"),
                us(&l["push_on_fault_latency_us"], "p99"),
                l["push_on_throughput_mib_s"].as_f64().unwrap_or(0.0),
                cpu["faultd"].as_f64().unwrap_or(0.0),
                cpu["pagesrv"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let t = &r["ratios"];
    println!("ratios to the cross-vCPU floor (targets): {}", t["targets"]);
    println!(
        "ratios to the same-vCPU floor (information): {}",
        t["same_vcpu_for_information"]
    );
    println!(
        "ratios to the floor of the same thread placement ({}; like for like): {}",
        t["like_for_like"]["floor"].as_str().unwrap_or(""),
        t["like_for_like"]["ratios"]
    );
    println!(
        "throughput vs the memory-file bulk floor (information): {}",
        t["throughput_vs_memory_file_bulk_floor"]
    );
}
