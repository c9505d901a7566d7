//! `bench clones`: a clone storm. One snapshot (a template) is restored by N destinations
//! at once through one pagesrv, against one restore alone in the same run: from a memory
//! file (`pagesrv --template`), or cold from an object store (`--from-store`: a local
//! SeaweedFS behind a delay line of `--store-rtt-ms`, a fresh pagesrv and cache per round).
//!
//! Each destination: faultd naming the template, test-vmm touching `--touches` pages
//! (`--order`) while the push runs and checking every page. Reported: each restore's time
//! to its last page (faultd's duration) and its guest's pass, p50/p95 over the clones
//! against the one alone; the store's frames and GETs (from pagesrv's cache line); the
//! peak resident memory of each clone's VMM and faultd and of pagesrv.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde_json::{Value, json};

use crate::fleet::{VmRun, finish, ready_destination, start_guest};
use crate::link::{DelayLine, Profile};
use crate::procs::{
    Usage, log_tail, output_registered, remove_on_interrupt, sibling, start_faultd, start_pagesrv,
    start_pagesrv_env, watch_every,
};

/// How often each process's memory and CPU time are read (33 processes in a storm of 16).
const WATCH_EVERY: Duration = Duration::from_millis(100);
use crate::scenario::write_image_seeded;
use crate::store_server::{BUCKET, StoreServer};

/// The template's name at pagesrv.
const TEMPLATE: &str = "tpl";

/// Options of `bench clones`.
#[derive(Debug, Args)]
pub struct ClonesArgs {
    /// Restores of the template at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub clones: u32,
    /// The template's memory in MiB (every 4th page zero).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..))]
    pub size_mib: u64,
    /// Pages each guest touches while its push runs (test-vmm's --touches).
    #[arg(long, default_value_t = 5000)]
    pub touches: u64,
    /// What the guests touch: test-vmm's --order (random, clustered, hot, seq).
    #[arg(long, default_value = "random")]
    pub order: String,
    /// Rounds (one restore alone, then the storm, each round); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Serve the template from an object store (uploaded first, not timed), each round
    /// with a cold cache.
    #[arg(long)]
    pub from_store: bool,
    /// The store's round trip (first byte) for --from-store, in ms (0: no delay line).
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pub store_rtt_ms: u64,
    /// The clones of a round share one host file of the template, each mapping it private
    /// (test-vmm --shared-ram, faultd --placement memfd): a page one clone's faultd placed
    /// is mapped into the others by the kernel, without a fault (in --ram-dir, new each
    /// round; the restore alone gets one of its own).
    #[arg(long)]
    pub shared_ram: bool,
    /// With --from-store: record the guests' working set first (one demand-paged restore
    /// of the memory file, `faultd --record-working-set`, not timed) and upload the
    /// template with it (`store put --working-set`), so that pagesrv fetches it first and
    /// pushes it first to every restore (the guests all touch the same pages: the same
    /// seed).
    #[arg(long, requires = "from_store")]
    pub working_set: bool,
    /// Directory for the image and the shared RAM file (tmpfs is best).
    #[arg(long, default_value = "/dev/shm")]
    pub ram_dir: PathBuf,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What pagesrv serves and how.
struct Serving {
    /// `--vm-mem` (NAME=PATH or NAME=s3://...).
    vm_mem: String,
    env: Vec<(String, String)>,
    extra: Vec<String>,
}

/// One round: its restores, and what pagesrv did.
struct Round {
    restores: Vec<(VmRun, Usage, Usage)>,
    pagesrv: Usage,
    makespan_ms: f64,
    store_cache: Option<String>,
    /// What the shared RAM file held at the end (`--shared-ram`), bytes.
    shared_ram_bytes: u64,
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Any step failing (a restore whose bytes or digests were wrong fails it).
pub fn run(args: &ClonesArgs) -> Result<()> {
    crate::link::clean_up_on_interrupt()?;
    let tag = format!("pagemig-clones-{}", std::process::id());
    let work = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&work)?;
    remove_on_interrupt(&work);
    let image = args.ram_dir.join(format!("{tag}.mem"));
    remove_on_interrupt(&image);
    let result = bench(args, &image, &work);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn bench(args: &ClonesArgs, image: &Path, work: &Path) -> Result<()> {
    eprintln!("bench: writing a {} MiB template", args.size_mib);
    write_image_seeded(image, args.size_mib << 8, 1)?;
    // Kept for the whole run: the store and the delay line before it.
    let mut store_parts = None;
    let serving = if args.from_store {
        let server = StoreServer::start(&work.join("store"))?;
        let url = format!("s3://{BUCKET}/clone-template");
        let mut put = server.pagesrv(server.addr)?;
        put.args(["store", "put"]).arg(image).arg(&url);
        if args.working_set {
            eprintln!("bench: recording the guests' working set (one demand-paged restore)");
            put.arg("--working-set")
                .arg(record_working_set(image, args, work)?);
        }
        let out = put.output()?;
        ensure!(
            out.status.success(),
            "cannot upload the template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("bench: {}", String::from_utf8_lossy(&out.stdout).trim());
        let (line, endpoint) = if args.store_rtt_ms > 0 {
            let line = DelayLine::start(
                server.addr,
                Profile {
                    name: "store",
                    rate_bit_s: Some(1_000_000_000),
                    one_way: Duration::from_millis(args.store_rtt_ms) / 2,
                    stall: None,
                },
            )?;
            let endpoint = line.addr();
            (Some(line), endpoint)
        } else {
            (None, server.addr)
        };
        let cache = work.join("store-cache");
        std::fs::create_dir_all(&cache)?;
        store_parts = Some((server, line));
        Serving {
            vm_mem: format!("{TEMPLATE}={url}"),
            env: StoreServer::env(endpoint),
            extra: vec!["--store-cache".into(), cache.display().to_string()],
        }
    } else {
        Serving {
            vm_mem: format!("{TEMPLATE}={}", image.display()),
            env: Vec::new(),
            extra: vec!["--template".into()],
        }
    };
    let (mut alone, mut storm) = (Vec::new(), Vec::new());
    for round in 1..=args.runs.max(1) {
        eprintln!("bench: round {round}: one restore alone");
        alone.push(restore_at_once(1, image, &serving, args, work)?);
        eprintln!("bench: round {round}: {} restores at once", args.clones);
        storm.push(restore_at_once(args.clones, image, &serving, args, work)?);
    }
    drop(store_parts);
    let report = summarize(args, &alone, &storm);
    print_table(&report);
    let text = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// Restores `image` once by demand paging (no push, no pre-paging: every page the guest
/// touches faults) with faultd recording the order of its faults; returns the working set's
/// file.
fn record_working_set(image: &Path, args: &ClonesArgs, work: &Path) -> Result<PathBuf> {
    let ws = work.join("working-set");
    let _ = std::fs::remove_file(&ws);
    // Neither a push nor pre-paging: every page the guest touches faults, and is recorded.
    let (mut pagesrv, addr) = start_pagesrv(
        image,
        &["--no-push", "--prepage-window", "0"],
        Some(&work.join("record.pagesrv.log")),
    )?;
    let (uds, stats, faultd_log) = (
        work.join("record.sock"),
        work.join("record.stats.json"),
        work.join("record.faultd.log"),
    );
    let ws_arg = ws.display().to_string();
    let mut faultd = start_faultd(
        &addr,
        &uds,
        &stats,
        &["--record-working-set", &ws_arg],
        Some(&faultd_log),
    )?;
    let out = output_registered(
        std::process::Command::new(sibling("test-vmm")?)
            .arg("--uds")
            .arg(&uds)
            .arg("--source")
            .arg(image)
            .args([
                "--order",
                &args.order,
                "--touches",
                &args.touches.to_string(),
            ])
            .arg("--no-wait"),
    )?;
    ensure!(
        out.status.success(),
        "the recording restore's guest failed: {}\nthe end of faultd's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&faultd_log, 10)
    );
    // The guest left before the restore ended: faultd writes the set and ends by itself.
    let ended = faultd.wait_at_most(Duration::from_secs(10))?;
    let _ = pagesrv.0.kill();
    let _ = pagesrv.wait();
    ensure!(
        ended.is_some(),
        "the recording faultd did not end within 10 s; the end of its log:\n{}",
        log_tail(&faultd_log, 10)
    );
    ensure!(
        ws.exists(),
        "faultd wrote no working set; the end of its log:\n{}",
        log_tail(&faultd_log, 10)
    );
    Ok(ws)
}

/// `n` destinations restore the template at once through one (new) pagesrv.
fn restore_at_once(
    n: u32,
    image: &Path,
    serving: &Serving,
    args: &ClonesArgs,
    work: &Path,
) -> Result<Round> {
    let pagesrv_log = work.join("pagesrv.log");
    let extra: Vec<&str> = serving.extra.iter().map(String::as_str).collect();
    let (mut pagesrv, addr) =
        start_pagesrv_env(&serving.vm_mem, &serving.env, &extra, Some(&pagesrv_log))?;
    let pagesrv_usage = watch_every(pagesrv.0.id(), WATCH_EVERY);
    // A new shared file each round (none of its pages there yet), removed after it.
    let shared_ram = args.shared_ram.then(|| {
        let file = args
            .ram_dir
            .join(format!("pagemig-clones-{}.shared", std::process::id()));
        let _ = std::fs::remove_file(&file);
        remove_on_interrupt(&file);
        file
    });
    let ready = (0..n)
        .map(|i| {
            let name = format!("clone{i}");
            ready_destination(&addr, &name, TEMPLATE, work, shared_ram.as_deref())
        })
        .collect::<Result<Vec<_>>>()?;
    // Every destination is ready: the guests start together.
    let started = Instant::now();
    let mut running = Vec::new();
    for ready in ready {
        let destination = start_guest(ready, image, &args.order, args.touches, work)?;
        let usage = (
            watch_every(destination.vmm.0.id(), WATCH_EVERY),
            watch_every(destination.faultd.0.id(), WATCH_EVERY),
        );
        running.push((destination, usage.0, usage.1));
    }
    let mut restores = Vec::new();
    for (mut d, vmm_usage, faultd_usage) in running {
        let run = finish(&mut d).with_context(|| {
            format!(
                "restore {}; the end of faultd's log:\n{}\npagesrv's:\n{}",
                d.name,
                log_tail(&d.faultd_log, 10),
                log_tail(&pagesrv_log, 10)
            )
        })?;
        let joined = |h: std::thread::JoinHandle<Usage>| h.join().unwrap_or_default();
        restores.push((run, joined(vmm_usage), joined(faultd_usage)));
    }
    let makespan_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut shared_ram_bytes = 0;
    if let Some(file) = &shared_ram {
        use std::os::unix::fs::MetadataExt;
        shared_ram_bytes = std::fs::metadata(file).map_or(0, |m| m.blocks() * 512);
        let _ = std::fs::remove_file(file);
    }
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    let logged = || {
        let log = std::fs::read_to_string(&pagesrv_log).unwrap_or_default();
        log.matches("completed (").count() >= n as usize
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logged() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // A template is served until stopped.
    let _ = pagesrv.0.kill();
    let _ = pagesrv.wait();
    let log = std::fs::read_to_string(&pagesrv_log).unwrap_or_default();
    let completed = log.matches("completed (verified)").count();
    ensure!(
        completed == n as usize,
        "pagesrv saw {completed} verified restores of {n}:\n{}",
        log_tail(&pagesrv_log, 15)
    );
    let store_cache = log
        .lines()
        .rfind(|l| l.contains("store cache:"))
        .and_then(|l| l.split("store cache: ").nth(1))
        .map(str::to_owned);
    Ok(Round {
        restores,
        pagesrv: pagesrv_usage.join().unwrap_or_default(),
        makespan_ms,
        store_cache,
        shared_ram_bytes,
    })
}

/// The `q` quantile of `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

fn median(values: Vec<f64>) -> f64 {
    quantile(&values, 0.5)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn summarize(args: &ClonesArgs, alone: &[Round], storm: &[Round]) -> Value {
    let of = |r: &Round, f: fn(&VmRun) -> f64| {
        r.restores.iter().map(|(v, _, _)| f(v)).collect::<Vec<_>>()
    };
    let total = |v: &VmRun| v.total_ms;
    let pass = |v: &VmRun| v.pass_ms;
    let med = |rounds: &[Round], f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let alone_total = med(alone, &|r| quantile(&of(r, total), 0.5));
    let alone_pass = med(alone, &|r| quantile(&of(r, pass), 0.5));
    let storm_p50 = med(storm, &|r| quantile(&of(r, total), 0.5));
    let storm_p95 = med(storm, &|r| quantile(&of(r, total), 0.95));
    let pass_p95 = med(storm, &|r| quantile(&of(r, pass), 0.95));
    let per_clone = |f: fn(&(VmRun, Usage, Usage)) -> u64| {
        med(storm, &|r| {
            median(r.restores.iter().map(|x| mib(f(x))).collect())
        })
    };
    json!({
        "clones": args.clones,
        "size_mib": args.size_mib,
        "touches_per_guest": args.touches,
        "order": args.order,
        "rounds": args.runs,
        "served_from": if args.from_store { format!("object store, {} ms round trip, cold cache each round{}", args.store_rtt_ms, if args.working_set { ", the recorded working set first" } else { "" }) } else { "memory file (--template)".to_string() },
        "one_restore": {
            "restore_ms": alone_total,
            "guest_pass_ms": alone_pass,
            "store_cache": alone.iter().map(|r| r.store_cache.clone()).collect::<Vec<_>>(),
        },
        "storm": {
            "restore_ms_p50": storm_p50,
            "restore_ms_p95": storm_p95,
            "guest_pass_ms_p95": pass_p95,
            "makespan_ms": med(storm, &|r| r.makespan_ms),
            "store_cache": storm.iter().map(|r| r.store_cache.clone()).collect::<Vec<_>>(),
            "restore_ms_each": storm.iter().map(|r| of(r, total)).collect::<Vec<_>>(),
        },
        "received_mib": {
            "per_clone_p50": per_clone(|(run, _, _)| run.data_bytes),
            "all_clones": med(storm, &|r| {
                mib(r.restores.iter().map(|(run, _, _)| run.data_bytes).sum())
            }),
            "one_alone": med(alone, &|r| {
                mib(r.restores.iter().map(|(run, _, _)| run.data_bytes).sum())
            }),
        },
        "memory_mib": {
            "vmm_peak_rss_per_clone": per_clone(|(_, vmm, _)| vmm.peak_rss),
            "vmm_peak_private_rss_per_clone": per_clone(|(_, vmm, _)| vmm.peak_anon_rss),
            "shared_ram_file": med(storm, &|r| mib(r.shared_ram_bytes)),
            "faultd_peak_rss_per_clone": per_clone(|(_, _, faultd)| faultd.peak_rss),
            "pagesrv_peak_rss": med(storm, &|r| mib(r.pagesrv.peak_rss)),
            "pagesrv_peak_private_rss": med(storm, &|r| mib(r.pagesrv.peak_anon_rss)),
        },
        "ratios": {
            "restore_p95_over_one": storm_p95 / alone_total.max(1e-9),
            "guest_pass_p95_over_one": pass_p95 / alone_pass.max(1e-9),
        },
        "shared_ram": args.shared_ram,
        "working_set_first": args.working_set,
        "targets": {"guest_pass_p95_over_one_at_most": 2.0},
        "method": "one pagesrv serving one template to every destination (each its own session); per destination faultd and test-vmm (touches while the push runs, then every page checked); restore = faultd's duration from its VMM's connection to its last page; medians over rounds of each round's quantile",
    })
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    eprintln!(
        "\n{} restores of one {} MiB template through one pagesrv, served from {} (medians of {} rounds)",
        r["clones"],
        r["size_mib"],
        r["served_from"].as_str().unwrap_or("?"),
        r["rounds"]
    );
    eprintln!(
        "  one alone:  restore {:>7.0} ms, guest pass {:>7.0} ms",
        f(&r["one_restore"]["restore_ms"]),
        f(&r["one_restore"]["guest_pass_ms"])
    );
    eprintln!(
        "  all at once: restore p50 {:>7.0} ms, p95 {:>7.0} ms, guest pass p95 {:>7.0} ms, all done in {:.0} ms",
        f(&r["storm"]["restore_ms_p50"]),
        f(&r["storm"]["restore_ms_p95"]),
        f(&r["storm"]["guest_pass_ms_p95"]),
        f(&r["storm"]["makespan_ms"])
    );
    eprintln!(
        "  ratios: guest pass p95 {:.2}× one alone (target ≤ 2×), restore p95 {:.2}×",
        f(&r["ratios"]["guest_pass_p95_over_one"]),
        f(&r["ratios"]["restore_p95_over_one"])
    );
    eprintln!(
        "  data received: {:.0} MiB per clone (median), {:.0} MiB by all {} (one alone: {:.0} MiB)",
        f(&r["received_mib"]["per_clone_p50"]),
        f(&r["received_mib"]["all_clones"]),
        r["clones"],
        f(&r["received_mib"]["one_alone"])
    );
    if let Some(Some(line)) = r["storm"]["store_cache"]
        .as_array()
        .and_then(|a| a.last())
        .map(Value::as_str)
    {
        eprintln!("  store cache (last storm): {line}");
    }
    eprintln!(
        "  memory: {:.0} MiB per clone's VMM ({:.0} MiB private), {:.0} MiB per faultd, pagesrv {:.0} MiB ({:.0} MiB private){}",
        f(&r["memory_mib"]["vmm_peak_rss_per_clone"]),
        f(&r["memory_mib"]["vmm_peak_private_rss_per_clone"]),
        f(&r["memory_mib"]["faultd_peak_rss_per_clone"]),
        f(&r["memory_mib"]["pagesrv_peak_rss"]),
        f(&r["memory_mib"]["pagesrv_peak_private_rss"]),
        if r["shared_ram"].as_bool() == Some(true) {
            format!(
                "; the shared RAM file {:.0} MiB, once for the host",
                f(&r["memory_mib"]["shared_ram_file"])
            )
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), 19.0);
        assert_eq!(quantile(&v, 0.5), 10.0);
        assert_eq!(quantile(&[7.0], 0.95), 7.0);
        assert_eq!(quantile(&[], 0.95), 0.0);
    }
}
