//! `bench fleet`: a host evacuation in small. N VMs migrate at once through one pagesrv,
//! against one VM alone in the same run: every byte checked in each, the sum of their
//! throughputs against the one's, and the p99 of the guests' faults with N pushes running
//! against the one's.
//!
//! Each VM: a patterned image of its own (a destination served another VM's pages fails its
//! digests), faultd naming its VM, test-vmm touching `--touches` random pages while the push
//! runs and checking every page it touches and, at the end, every page.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde_json::{Value, json};

use crate::procs::{
    Guard, log_tail, remove_on_interrupt, sibling, start_faultd, start_pagesrv_fleet,
};
use crate::scenario::write_image_seeded;

/// Longest a run may take before it is reported stuck.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Options of `bench fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// VMs migrated at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub vms: u32,
    /// Each VM's memory in MiB (every 4th page zero).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..))]
    pub size_mib: u64,
    /// Random pages each guest touches (and times) while its push runs.
    #[arg(long, default_value_t = 5000)]
    pub touches: u64,
    /// Rounds (one VM alone, then the fleet, each round); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Directory for the images (tmpfs is best).
    #[arg(long, default_value = "/dev/shm")]
    pub ram_dir: PathBuf,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// One VM's migration, as its faultd and guest saw it.
#[derive(Debug, Clone)]
pub(crate) struct VmRun {
    /// faultd's duration: from its VMM's connection to its last page.
    pub total_ms: f64,
    /// The guest's pass over its touches (first to last), ms.
    pub pass_ms: f64,
    /// Data pages received (requested and pushed), bytes.
    pub data_bytes: u64,
    /// The guest's fault latencies (µs), sampled evenly over its sorted faults.
    samples_us: Vec<f64>,
    faults: u64,
    p99_us: f64,
    /// faultd's p99 of its faults' service (fault read to page placed): the pair's part,
    /// without the guest's wait for a CPU once woken.
    service_p99_us: f64,
}

impl VmRun {
    fn throughput_mib_s(&self) -> f64 {
        self.data_bytes as f64 / f64::from(1 << 20) / (self.total_ms / 1000.0).max(1e-9)
    }
}

/// One round's result for `n` VMs at once.
#[derive(Debug, Clone)]
struct Round {
    vms: Vec<VmRun>,
    makespan_ms: f64,
}

impl Round {
    fn sum_throughput(&self) -> f64 {
        self.vms.iter().map(VmRun::throughput_mib_s).sum()
    }

    /// The median over the VMs of faultd's p99 service time.
    fn service_p99(&self) -> f64 {
        median(self.vms.iter().map(|v| v.service_p99_us).collect())
    }

    /// Every VM's data over the time until the last VM had all its pages: faultd's
    /// duration runs from its VMM's connection (the guests start together) to its last page,
    /// so this span is the migration's, without process start-up or the guests' final
    /// checks; for one VM it is its own throughput.
    fn aggregate_throughput(&self) -> f64 {
        let bytes: u64 = self.vms.iter().map(|v| v.data_bytes).sum();
        let span_ms = self.vms.iter().map(|v| v.total_ms).fold(0.0, f64::max);
        bytes as f64 / f64::from(1 << 20) / (span_ms / 1000.0).max(1e-9)
    }

    /// The p99 over every VM's faults together (each sample weighs the faults it stands
    /// for).
    fn pooled_p99(&self) -> f64 {
        let mut weighted: Vec<(f64, f64)> = self
            .vms
            .iter()
            .filter(|v| !v.samples_us.is_empty())
            .flat_map(|v| {
                let weight = v.faults as f64 / v.samples_us.len() as f64;
                v.samples_us.iter().map(move |&s| (s, weight))
            })
            .collect();
        weighted_quantile(&mut weighted, 0.99)
    }
}

fn weighted_quantile(values: &mut [(f64, f64)], q: f64) -> f64 {
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = values.iter().map(|v| v.1).sum();
    let mut seen = 0.0;
    for &(value, weight) in values.iter() {
        seen += weight;
        if seen >= q * total {
            return value;
        }
    }
    values.last().map_or(0.0, |v| v.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    crate::scenario::median(&mut values)
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Any step failing (a VM whose bytes or digests were wrong fails it).
pub fn run(args: &FleetArgs) -> Result<()> {
    crate::link::clean_up_on_interrupt()?;
    let tag = format!("pagemig-fleet-{}", std::process::id());
    let work = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&work)?;
    remove_on_interrupt(&work);
    let images: Vec<(String, PathBuf)> = (0..args.vms)
        .map(|i| {
            let name = format!("vm{i}");
            let path = args.ram_dir.join(format!("{tag}-{name}.mem"));
            remove_on_interrupt(&path);
            (name, path)
        })
        .collect();
    let result = bench(args, &images, &work);
    for (_, path) in &images {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn bench(args: &FleetArgs, images: &[(String, PathBuf)], work: &Path) -> Result<()> {
    eprintln!(
        "bench: writing {} images of {} MiB",
        images.len(),
        args.size_mib
    );
    for (i, (_, path)) in images.iter().enumerate() {
        write_image_seeded(path, args.size_mib << 8, i as u64 + 1)?;
    }
    let (mut alone, mut fleet) = (Vec::new(), Vec::new());
    for round in 1..=args.runs.max(1) {
        eprintln!("bench: round {round}: one VM alone");
        alone.push(migrate_at_once(&images[..1], args, work)?);
        eprintln!("bench: round {round}: {} VMs at once", images.len());
        fleet.push(migrate_at_once(images, args, work)?);
    }
    let report = summarize(args, &alone, &fleet);
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

fn summarize(args: &FleetArgs, alone: &[Round], fleet: &[Round]) -> Value {
    let med = |rounds: &[Round], f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let alone_tput = med(alone, Round::aggregate_throughput);
    let alone_p99 = med(alone, Round::pooled_p99);
    let sum_tput = med(fleet, Round::sum_throughput);
    let aggregate = med(fleet, Round::aggregate_throughput);
    let fleet_p99 = med(fleet, Round::pooled_p99);
    let (alone_service, fleet_service) = (
        med(alone, Round::service_p99),
        med(fleet, Round::service_p99),
    );
    let per_vm: Vec<Value> = fleet
        .iter()
        .map(|r| {
            let t: Vec<f64> = r.vms.iter().map(VmRun::throughput_mib_s).collect();
            let (lo, hi) = t
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            json!({
                "throughput_mib_s": t,
                "p99_us": r.vms.iter().map(|v| v.p99_us).collect::<Vec<_>>(),
                "service_p99_us": r.vms.iter().map(|v| v.service_p99_us).collect::<Vec<_>>(),
                "total_ms": r.vms.iter().map(|v| v.total_ms).collect::<Vec<_>>(),
                "slowest_over_fastest": lo / hi.max(1e-9),
                "makespan_ms": r.makespan_ms,
            })
        })
        .collect();
    json!({
        "vms": args.vms,
        "size_mib_each": args.size_mib,
        "touches_per_guest": args.touches,
        "rounds": args.runs,
        "one_vm": {
            "throughput_mib_s": alone_tput,
            "fault_p99_us": alone_p99,
            "service_p99_us": alone_service,
            "total_ms": med(alone, |r| r.makespan_ms),
        },
        "fleet": {
            "aggregate_throughput_mib_s": aggregate,
            "sum_of_throughputs_mib_s": sum_tput,
            "fault_p99_us": fleet_p99,
            "service_p99_us_median_vm": fleet_service,
            "makespan_ms": med(fleet, |r| r.makespan_ms),
            "rounds": per_vm,
        },
        "ratios": {
            "aggregate_throughput_over_one": aggregate / alone_tput.max(1e-9),
            "sum_throughput_over_one": sum_tput / alone_tput.max(1e-9),
            "fault_p99_over_one": fleet_p99 / alone_p99.max(1e-9),
            "service_p99_over_one": fleet_service / alone_service.max(1e-9),
        },
        "targets": {
            "aggregate_throughput_over_one_at_least": 0.85,
            "fault_p99_over_one_at_most": 3.0,
        },
        "method": "one pagesrv serving every VM; per VM faultd (copy placement) and test-vmm (random touches while the push runs, then every page checked); nothing pinned; aggregate throughput = every VM's data pages / the longest faultd duration (from its VMM's connection to its last page; one VM alone: its own); the sum of each VM's own throughput is shown beside it; guest fault p99 over all guests' faults pooled; faultd's service p99 = median over the VMs",
    })
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    eprintln!(
        "\n{} VMs of {} MiB through one pagesrv (medians of {} rounds)",
        r["vms"], r["size_mib_each"], r["rounds"]
    );
    eprintln!(
        "  one VM alone:  {:>7.0} MiB/s, fault p99 {:>8.0} µs, {:.0} ms",
        f(&r["one_vm"]["throughput_mib_s"]),
        f(&r["one_vm"]["fault_p99_us"]),
        f(&r["one_vm"]["total_ms"])
    );
    eprintln!(
        "  all at once:   {:>7.0} MiB/s in all ({:.0} MiB/s summed per VM), fault p99 {:>8.0} µs, {:.0} ms",
        f(&r["fleet"]["aggregate_throughput_mib_s"]),
        f(&r["fleet"]["sum_of_throughputs_mib_s"]),
        f(&r["fleet"]["fault_p99_us"]),
        f(&r["fleet"]["makespan_ms"])
    );
    eprintln!(
        "  faultd's service p99 (fault read to page placed): one {:.0} µs, median VM at once {:.0} µs",
        f(&r["one_vm"]["service_p99_us"]),
        f(&r["fleet"]["service_p99_us_median_vm"])
    );
    eprintln!(
        "  ratios:        throughput {:.2}× (target ≥ 0.85×; summed per VM {:.2}×), guest fault p99 {:.2}× (target ≤ 3×), service p99 {:.2}×",
        f(&r["ratios"]["aggregate_throughput_over_one"]),
        f(&r["ratios"]["sum_throughput_over_one"]),
        f(&r["ratios"]["fault_p99_over_one"]),
        f(&r["ratios"]["service_p99_over_one"])
    );
}

/// One destination's processes.
pub(crate) struct Destination {
    pub name: String,
    pub faultd: Guard,
    pub vmm: Guard,
    pub stats: PathBuf,
    pub report: PathBuf,
    pub latency: PathBuf,
    pub faultd_log: PathBuf,
}

/// A destination whose faultd is started and waits for its VMM.
pub(crate) struct Ready {
    name: String,
    uds: PathBuf,
    stats: PathBuf,
    faultd_log: PathBuf,
    faultd: Guard,
    /// The host file the guest's RAM maps private (clones of a template sharing a fill).
    shared_ram: Option<PathBuf>,
}

/// Starts destination `name`'s faultd for pagesrv's VM `vm` at `addr`, its files in `work`;
/// with `shared_ram`, the guest's RAM is that host file mapped private and faultd places
/// pages into it (memfd placement), so clones sharing the file share what any of them
/// placed.
pub(crate) fn ready_destination(
    addr: &str,
    name: &str,
    vm: &str,
    work: &Path,
    shared_ram: Option<&Path>,
) -> Result<Ready> {
    let file = |what: &str| work.join(format!("{name}.{what}"));
    let (uds, stats, faultd_log) = (file("sock"), file("stats.json"), file("faultd.log"));
    let _ = std::fs::remove_file(&stats);
    let mut faultd_args = vec!["--vm", vm];
    if shared_ram.is_some() {
        faultd_args.extend(["--placement", "memfd", "--shared-ram"]);
    }
    let faultd = start_faultd(addr, &uds, &stats, &faultd_args, Some(&faultd_log))?;
    Ok(Ready {
        name: name.to_owned(),
        uds,
        stats,
        faultd_log,
        faultd,
        shared_ram: shared_ram.map(Path::to_path_buf),
    })
}

/// Starts `ready`'s test VMM over `image` (touching `touches` pages in `order` while the
/// push runs, then checking every page).
pub(crate) fn start_guest(
    ready: Ready,
    image: &Path,
    order: &str,
    touches: u64,
    work: &Path,
) -> Result<Destination> {
    let Ready {
        name,
        uds,
        stats,
        faultd_log,
        faultd,
        shared_ram,
    } = ready;
    let (report, latency) = (
        work.join(format!("{name}.report.json")),
        work.join(format!("{name}.lat.json")),
    );
    let mut vmm = Command::new(sibling("test-vmm")?);
    if let Some(file) = &shared_ram {
        vmm.arg("--shared-ram").arg(file);
    }
    let vmm = vmm
        .arg("--uds")
        .arg(&uds)
        .arg("--source")
        .arg(image)
        .args(["--order", order, "--touches", &touches.to_string()])
        .arg("--latency-out")
        .arg(&latency)
        .stdout(std::fs::File::create(&report)?)
        .stderr(std::fs::File::create(work.join(format!("{name}.vmm.log")))?)
        .spawn()
        .context("cannot start test-vmm")?;
    Ok(Destination {
        name,
        faultd,
        vmm: Guard::new(vmm),
        stats,
        report,
        latency,
        faultd_log,
    })
}

/// Migrates `vms` at once through one pagesrv; checks every VM's bytes and digests.
fn migrate_at_once(vms: &[(String, PathBuf)], args: &FleetArgs, work: &Path) -> Result<Round> {
    let pagesrv_log = work.join("pagesrv.log");
    let (mut pagesrv, addr) = start_pagesrv_fleet(vms, &[], Some(&pagesrv_log))?;
    let ready = vms
        .iter()
        .map(|(name, _)| ready_destination(&addr, name, name, work, None))
        .collect::<Result<Vec<_>>>()?;
    // Every destination is ready: the guests start together.
    let started = Instant::now();
    let mut running = Vec::new();
    for (ready, (_, image)) in ready.into_iter().zip(vms) {
        running.push(start_guest(ready, image, "random", args.touches, work)?);
    }
    let mut results = Vec::new();
    for d in &mut running {
        results.push(finish(d).with_context(|| {
            format!(
                "VM {}; the end of faultd's log:\n{}\npagesrv's:\n{}",
                d.name,
                log_tail(&d.faultd_log, 10),
                log_tail(&pagesrv_log, 10)
            )
        })?);
    }
    let makespan_ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = pagesrv
        .wait_at_most(Duration::from_secs(10))?
        .context("pagesrv did not end after every VM completed")?;
    ensure!(
        status.success(),
        "pagesrv failed ({status}):\n{}",
        log_tail(&pagesrv_log, 15)
    );
    Ok(Round {
        vms: results,
        makespan_ms,
    })
}

/// Waits for one destination; its guest must have found every byte right and its faultd
/// the digests equal.
pub(crate) fn finish(d: &mut Destination) -> Result<VmRun> {
    let vmm = d
        .vmm
        .wait_at_most(RUN_LIMIT)?
        .context("the guest did not finish")?;
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&d.report)?).context("the guest's report")?;
    ensure!(vmm.success(), "the guest failed ({vmm}): {report}");
    for key in ["mismatches_during", "mismatches_after"] {
        ensure!(report[key] == 0, "the guest saw wrong bytes: {report}");
    }
    let faultd = d
        .faultd
        .wait_at_most(RUN_LIMIT)?
        .context("faultd did not finish")?;
    ensure!(faultd.success(), "faultd failed ({faultd})");
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&d.stats)?)?;
    ensure!(
        stats["digest_check"] == "match",
        "digests differ: {}",
        stats["digest_check"]
    );
    let latency: Value = serde_json::from_str(&std::fs::read_to_string(&d.latency)?)?;
    Ok(VmRun {
        total_ms: stats["duration_ms"].as_f64().unwrap_or(0.0),
        pass_ms: latency["pass_ms"].as_f64().unwrap_or(0.0),
        data_bytes: crate::scenario::data_bytes(&stats),
        samples_us: latency["cdf_samples_us"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
        faults: latency["count"].as_u64().unwrap_or(0),
        p99_us: latency["p99"].as_f64().unwrap_or(0.0),
        service_p99_us: stats["fault_latency_us"]["p99"].as_f64().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooled_quantile_weighs_each_sample_by_the_faults_it_stands_for() {
        let vm = |samples: Vec<f64>, faults| VmRun {
            total_ms: 1000.0,
            pass_ms: 100.0,
            data_bytes: 1 << 20,
            samples_us: samples,
            faults,
            p99_us: 0.0,
            service_p99_us: 0.0,
        };
        // 100 fast faults in one VM, 1 slow in another: the slow one is the top 1%.
        let round = Round {
            vms: vec![vm(vec![10.0; 100], 100), vm(vec![500.0], 1)],
            makespan_ms: 1000.0,
        };
        assert_eq!(round.pooled_p99(), 10.0);
        // Ten samples that stand for 1000 slow faults outweigh 100 fast ones.
        let round = Round {
            vms: vec![vm(vec![10.0; 100], 100), vm(vec![500.0; 10], 1000)],
            makespan_ms: 1000.0,
        };
        assert_eq!(round.pooled_p99(), 500.0);
        assert!((round.sum_throughput() - 2.0).abs() < 1e-9);
        assert!((round.aggregate_throughput() - 2.0).abs() < 1e-9);
    }
}
