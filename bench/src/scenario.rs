//! One scenario of `bench latency` and the arguments they share: the image, the real
//! pagesrv and faultd with `test-vmm` as the workload, and the median of several runs.
//! `latency.rs` (the command), `huge.rs`, `profiles.rs` and `restore.rs` run scenarios.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::link::{DelayLine, Link, LinkChoice, SOURCE_PORT};
use crate::procs::{
    cpu_ms, log_tail, output_registered, sibling, start_faultd, start_pagesrv, start_pagesrv_at,
    watch,
};
use crate::tuning::Tuning;

/// Which workloads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadChoice {
    /// Every page once, in random order.
    Random,
    /// Every page once, in order.
    Seq,
    /// 80% of touches to 10% of the pages.
    Hot,
    /// All three.
    All,
}

/// Background push on, off, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PushChoice {
    /// Push every page in the background.
    On,
    /// Demand paging only.
    Off,
    /// Both.
    Both,
}

/// Options of `bench latency`.
#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// Guest memory image size in MiB (every 4th page zero).
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Workloads to run.
    #[arg(long, value_enum, default_value = "all")]
    pub workload: WorkloadChoice,
    /// Background push.
    #[arg(long, value_enum, default_value = "both")]
    pub push: PushChoice,
    /// Runs per scenario (medians are reported).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Touches per demand-paging run (push off).
    #[arg(long, default_value_t = 20_000)]
    pub demand_touches: u64,
    /// Directory for the image (tmpfs is best).
    #[arg(long, default_value = "/dev/shm")]
    pub ram_dir: PathBuf,
    /// Extra image sizes (MiB, comma-separated) for the random push-on scenario, to show
    /// how cost grows with guest size (e.g. 512,2048,8192).
    #[arg(long, value_delimiter = ',', value_name = "MIB")]
    pub growth_sizes: Vec<u64>,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write latency CDFs (scenarios against the floor) as SVG here.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Run the pair without a key (`--insecure-no-key` on both: frames travel plain), to
    /// measure what the key costs. By default the bench makes a key for the run and both
    /// daemons use it: every frame after the handshake encrypted and authenticated.
    #[arg(long)]
    pub insecure_no_key: bool,
    /// Fault-path levers of the pair for every scenario: `default` (nothing pinned, no
    /// busy-polling, UFFDIO_COPY), `same-cpu` (the workload, faultd's fault thread and
    /// pagesrv's urgent thread on one CPU), `split-cpu` (the workload on one CPU, the fault
    /// path on the other), `bulk-apart` (with one of those: bulk threads on the CPU the fault
    /// path does not use), `busy-poll[=US]`, `memfd` (memfd placement), `fixed-prepage`
    /// (64 pages after each request instead of the adaptive window), joined by `+`.
    /// Default `same-cpu`: what an orchestrator that pins its vCPUs should do, and what
    /// won in `--compare-levers` here.
    #[arg(long, value_name = "LEVERS", default_value = "same-cpu", value_parser = Tuning::parse)]
    pub tuning: Tuning,
    /// Also run the first workload, push off and on, under each of these lever settings
    /// (comma-separated), and report their ratios to the same floor.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = Tuning::parse)]
    pub compare_levers: Vec<Tuning>,
    /// Link profile: `loopback`; `dc` (10 Gbit/s, 50 µs one way), `wan` (1 Gbit/s, 5 ms),
    /// `stall` (dc with a 20 ms stall every 500 ms): pagesrv in a network namespace behind a
    /// veth pair shaped by tbf and a delay line (needs root); `all`: each in turn.
    #[arg(long, value_enum, default_value = "loopback")]
    pub link: LinkChoice,
    /// Also serve the image to a guest on 2 MiB hugetlb pages (reserved for the run, given
    /// back after; root): demand-fault latency of a 2 MiB page, total time with the push.
    #[arg(long)]
    pub hugepages: bool,
    /// Also measure the aggregate demand-fault rate of 1 and 2 faulting threads (vCPUs) at
    /// once, nothing pinned.
    #[arg(long)]
    pub fault_rate: bool,
    /// Also restore the image three times on loopback: demand-paged while recording the
    /// working set, then with the set pushed first, then with the push alone
    /// (`--demand-touches` pages, the same each time).
    #[arg(long)]
    pub restore_twice: bool,
    /// With --restore-twice: also restore from an object store (a local SeaweedFS, `weed`,
    /// behind a delay line of `--store-rtt-ms`): the image is uploaded with the recorded
    /// working set (`pagesrv store put`, not timed), then restored cold through pagesrv's
    /// cache, and compared with the restore from the local file with the set pushed first.
    #[arg(long, requires = "restore_twice")]
    pub from_store: bool,
    /// What each restore of --restore-twice touches: `random` (`--demand-touches` random
    /// pages) or `clustered` (one 64 KiB block in 16, every page of them: a restored
    /// function's working set, ≈ 6% of the memory).
    #[arg(long, value_enum, default_value = "random", requires = "restore_twice")]
    pub restore_order: RestoreOrder,
    /// The store's round trip (first byte) for --from-store, in ms.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pub store_rtt_ms: u64,
}

/// A patterned image whose data pages differ with `seed` (every 4th page zero).
pub(crate) fn write_image_seeded(path: &Path, pages: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        if p % 4 == 0 {
            page.fill(0);
        } else {
            for (i, word) in page.chunks_exact_mut(8).enumerate() {
                let value = (p << 20) ^ i as u64 ^ 0x9E37_79B9_7F4A_7C15 ^ seed.rotate_left(40);
                word.copy_from_slice(&value.to_le_bytes());
            }
        }
        w.write_all(&page)?;
    }
    w.flush()?;
    Ok(())
}

/// What the restores of `--restore-twice` touch (test-vmm's `--order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreOrder {
    /// `--demand-touches` random pages.
    Random,
    /// Every page of one 64 KiB block in 16.
    Clustered,
}

impl RestoreOrder {
    /// test-vmm's `--order`.
    pub fn order(self) -> &'static str {
        match self {
            RestoreOrder::Random => "random",
            RestoreOrder::Clustered => "clustered",
        }
    }
}

/// One run of the pair.
pub(crate) struct Scenario<'a> {
    pub workload: &'static str,
    pub push: bool,
    pub naive: bool,
    /// More pagesrv arguments (e.g. `--prepage-window 0`).
    pub pagesrv_extra: Vec<String>,
    /// More faultd arguments.
    pub faultd_extra: Vec<String>,
    /// Touches of a push-off run (default `--demand-touches`).
    pub touches: Option<u64>,
    /// The workload's faulting threads (vCPUs).
    pub threads: usize,
    /// More workload (test-vmm) arguments.
    pub workload_extra: Vec<String>,
    /// Through a shaped link (else loopback).
    pub link: Option<&'a Link>,
    /// What pagesrv serves instead of the image (a stored snapshot, `s3://...`), and the
    /// environment it needs to reach it; the workload still checks against the image.
    pub serve: Option<(String, Vec<(String, String)>)>,
}

impl Scenario<'_> {
    /// A scenario on loopback; without the push it is pure demand paging (no pre-paging
    /// either: its faults measure the fault path alone).
    pub(crate) fn plain(workload: &'static str, push: bool, naive: bool) -> Self {
        let pure_demand = ["--prepage-window", "0"].map(String::from).to_vec();
        Scenario {
            workload,
            push,
            naive,
            pagesrv_extra: if push { Vec::new() } else { pure_demand },
            faultd_extra: Vec::new(),
            touches: None,
            threads: 1,
            workload_extra: Vec::new(),
            link: None,
            serve: None,
        }
    }
}

/// Runs one scenario; returns its JSON record.
pub(crate) fn run_scenario(
    sc: &Scenario<'_>,
    image: &Path,
    work: &Path,
    args: &LatencyArgs,
    tuning: Tuning,
) -> Result<Value> {
    let (uds, stats_path, lat_path) = (
        work.join("faultd.sock"),
        work.join("stats.json"),
        work.join("lat.json"),
    );
    let _ = std::fs::remove_file(&stats_path);
    let (pagesrv_tuning, faultd_tuning) = (tuning.pagesrv_args()?, tuning.faultd_args()?);
    let mut extra: Vec<&str> = pagesrv_tuning.iter().map(String::as_str).collect();
    extra.extend(sc.pagesrv_extra.iter().map(String::as_str));
    if !sc.push {
        extra.push("--no-push");
    }
    if sc.naive {
        extra.push("--naive-single-connection");
    }
    let (pagesrv_log, faultd_log) = (work.join("pagesrv.log"), work.join("faultd.log"));
    let (mut pagesrv, addr, _delay_line) = match (sc.link, &sc.serve) {
        (None, Some((what, env))) => {
            let (p, a) = crate::procs::start_pagesrv_env(what, env, &extra, Some(&pagesrv_log))?;
            (p, a, None)
        }
        (Some(_), Some(_)) => anyhow::bail!("a stored snapshot is served on loopback only"),
        (None, None) => {
            let (p, a) = start_pagesrv(image, &extra, Some(&pagesrv_log))?;
            (p, a, None)
        }
        (Some(link), None) => {
            let listen = link.source_addr(SOURCE_PORT).to_string();
            let (p, a) = start_pagesrv_at(
                image,
                &listen,
                Some(link.netns()),
                &extra,
                Some(&pagesrv_log),
            )?;
            let line = DelayLine::start(a.parse().context("pagesrv's address")?, link.profile)?;
            (p, line.addr().to_string(), Some(line))
        }
    };
    let mut faultd_extra: Vec<&str> = Vec::new();
    faultd_extra.extend(faultd_tuning.iter().map(String::as_str));
    faultd_extra.extend(sc.faultd_extra.iter().map(String::as_str));
    let mut faultd = start_faultd(&addr, &uds, &stats_path, &faultd_extra, Some(&faultd_log))?;
    let (faultd_pid, pagesrv_pid) = (faultd.0.id(), pagesrv.0.id());
    let (faultd_usage, pagesrv_usage) = (watch(faultd_pid), watch(pagesrv_pid));
    let mut vmm = Command::new(sibling("test-vmm")?);
    vmm.arg("--uds")
        .arg(&uds)
        .arg("--source")
        .arg(image)
        .args(["--order", sc.workload, "--threads", &sc.threads.to_string()])
        .arg("--latency-out")
        .arg(&lat_path);
    tuning.set_up_workload(&mut vmm)?;
    vmm.args(&sc.workload_extra);
    if !sc.push {
        let touches = sc.touches.unwrap_or(args.demand_touches);
        vmm.args(["--no-wait", "--touches", &touches.to_string()]);
    } else if let Some(touches) = sc.touches {
        vmm.args(["--touches", &touches.to_string()]);
    }
    let cpu_before = (cpu_ms(faultd_pid), cpu_ms(pagesrv_pid));
    let out = output_registered(&mut vmm).context("the workload failed")?;
    ensure!(
        out.status.success(),
        "the workload failed ({}): {}\nthe end of faultd's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        log_tail(&faultd_log, 15)
    );
    let latency: Value = serde_json::from_str(&std::fs::read_to_string(&lat_path)?)?;
    let mut record = json!({
        "workload": sc.workload,
        "push": if sc.push { "on" } else { "off" },
        "naive_single_connection": sc.naive,
        "levers": tuning.name(),
        "size_mib": args.size_mib,
        "fault_latency_us": latency,
        "faults": latency["count"],
        "cpu_ms_during_workload": {
            "faultd": cpu_delta(cpu_before.0, cpu_ms(faultd_pid)),
            "pagesrv": cpu_delta(cpu_before.1, cpu_ms(pagesrv_pid)),
        },
    });
    if !sc.push && sc.faultd_extra.iter().any(|a| a == "--record-working-set") {
        // The guest left before the migration ended: faultd ends by itself (status 1) and
        // writes the working set first; give it the time.
        let _ = faultd.wait_at_most(std::time::Duration::from_secs(10))?;
    }
    if sc.push {
        let status = faultd.wait()?;
        ensure!(
            status.success(),
            "faultd failed ({status}); the end of its log:\n{}\npagesrv's:\n{}",
            log_tail(&faultd_log, 15),
            log_tail(&pagesrv_log, 15)
        );
        if sc.serve.is_some() {
            // A stored snapshot is a template: pagesrv serves on until stopped.
            let _ = pagesrv.0.kill();
        }
        let _ = pagesrv.wait();
        if sc.serve.is_some() {
            // What the cache did for this restore (pagesrv's line at its end).
            let log = std::fs::read_to_string(&pagesrv_log).unwrap_or_default();
            record["store_cache"] = json!(
                log.lines()
                    .rfind(|l| l.contains("store cache:"))
                    .and_then(|l| l.split("store cache: ").nth(1))
            );
            // When the recorded working set was all in (pagesrv's own clock, from its start).
            record["working_set_in_cache_ms"] = json!(
                log.lines()
                    .find(|l| l.contains("the working set is in the cache"))
                    .and_then(|l| l
                        .split(" ms=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok())
            );
        }
        let stats: Value = serde_json::from_str(&std::fs::read_to_string(&stats_path)?)?;
        record["total_ms"] = json!(stats["duration_ms"].as_f64().unwrap_or(0.0));
        record["throughput_mib_s"] = json!(data_mib_per_s(&stats));
        record["bytes_on_wire"] = stats["bytes_received"].clone();
        record["demand_faults"] = stats["demand_faults"].clone();
        record["pages"] = json!({
            "requested": stats["pages_requested"], "pushed": stats["pages_pushed"],
            "zero": stats["pages_zero"], "removed": stats["pages_removed"],
        });
        record["faultd_latency_us"] = stats["fault_latency_us"].clone();
        let pages = args_pages(args);
        let limit = (32u64 << 20) + pages.div_ceil(8);
        let (f, p) = (
            faultd_usage.join().unwrap_or_default(),
            pagesrv_usage.join().unwrap_or_default(),
        );
        record["peak_private_rss_bytes"] = json!({
            "faultd": f.peak_anon_rss, "pagesrv": p.peak_anon_rss,
            "limit_32mib_plus_1_bit_per_page": limit,
        });
        record["cpu_ms"] = json!({"faultd": f.cpu_ms, "pagesrv": p.cpu_ms});
    }
    Ok(record)
}

/// CPU time between two readings (10 ms resolution); `None` if the process was gone.
fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

/// Runs a scenario `--runs` times; the run with the median p99 represents it.
pub(crate) fn run_median(
    sc: &Scenario<'_>,
    image: &Path,
    work: &Path,
    args: &LatencyArgs,
    tuning: Tuning,
) -> Result<Value> {
    let mut attempts = Vec::new();
    for i in 0..args.runs.max(1) {
        eprintln!(
            "bench: {} workload, push {}{}, levers {} (run {}/{})",
            sc.workload,
            if sc.push { "on" } else { "off" },
            if sc.naive {
                ", naive single connection"
            } else {
                ""
            },
            tuning.name(),
            i + 1,
            args.runs.max(1)
        );
        attempts.push(run_scenario(sc, image, work, args, tuning)?);
    }
    Ok(median_p99_run(attempts))
}

/// Of a scenario's runs (at least one), the one with the median p99 fault latency.
pub(crate) fn median_p99_run(mut runs: Vec<Value>) -> Value {
    runs.sort_by(|a, b| {
        let p = |r: &Value| r["fault_latency_us"]["p99"].as_f64().unwrap_or(0.0);
        p(a).total_cmp(&p(b))
    });
    runs.swap_remove(runs.len() / 2)
}

fn args_pages(args: &LatencyArgs) -> u64 {
    args.size_mib << 8
}

/// Bytes of data pages (requested and pushed, in the session's page size) over faultd's
/// duration, from faultd's stats.
pub(crate) fn data_bytes(stats: &Value) -> u64 {
    let pages = stats["pages_requested"].as_u64().unwrap_or(0)
        + stats["pages_pushed"].as_u64().unwrap_or(0);
    pages * stats["page_size"].as_u64().unwrap_or(4096)
}

/// [`data_bytes`] per second of faultd's duration, in MiB/s.
pub(crate) fn data_mib_per_s(stats: &Value) -> f64 {
    let secs = stats["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    data_bytes(stats) as f64 / f64::from(1 << 20) / secs.max(1e-9)
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
