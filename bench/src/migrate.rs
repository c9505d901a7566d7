//! `bench migrate`: a complete loopback live migration of a running KVM guest.
//!
//! ```text
//!  postcopy:  vmm source ──(guest fills RAM, touches pages)── pause ── state file
//!                 │ RAM file /dev/shm/…                                   │
//!             pagesrv ◄── urgent + bulk ──► faultd ◄── uffd+layout+memfd ── vmm dest
//!  hybrid, precopy: vmm source ──migrate──► pagesrv --vmm-uds (rounds while the guest runs,
//!             KVM's dirty log) ── pause ── Switchover ──► faultd ──switched──► vmm dest resumes
//! ```
//!
//! Downtime is from the source vCPU stopping to the destination vCPU running; total time from
//! the start of the migration (the pause for postcopy, the handover for precopy and hybrid)
//! until every page is present. The guest's own counters (touch rate, stalls, verification)
//! come from its reports before, during and after.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use bench::guest::Workload;

use crate::procs::{Guard, sibling, start_faultd, start_pagesrv};

/// How faultd places pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// UFFDIO_COPY into MISSING-registered RAM.
    Copy,
    /// Write into the shared memfd and UFFDIO_CONTINUE (MISSING|MINOR registration).
    Minor,
}

/// What happens before the destination resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Pause first; every page moves after the guest resumed on the destination.
    Postcopy,
    /// Rounds while the guest runs, then stop-and-copy.
    Precopy,
    /// Rounds while the guest runs, then postcopy for what changed since.
    Hybrid,
}

/// Options of `bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// What happens before the destination resumes (hybrid and precopy place pages through
    /// the shared memfd: `--mode minor`).
    #[arg(long, value_enum, default_value = "hybrid")]
    pub strategy: Strategy,
    /// Downtime budget of the precopy convergence rule, in ms.
    #[arg(long, default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// The guest's access pattern.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: Workload,
    /// The guest's write rate in pages/s (default: it rewrites one page in 16 it touches,
    /// ≈ 50 000 pages/s on this machine's random workload).
    #[arg(long, value_name = "PAGES_PER_S")]
    pub dirty_rate: Option<u64>,
    /// How faultd places pages.
    #[arg(long, value_enum, default_value = "copy")]
    pub mode: Mode,
    /// How long the guest runs on the source after filling RAM, before the pause.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
    /// How long the guest keeps running on the destination after every page arrived; its
    /// speed "after" is measured over the last second of this window (its first touch of
    /// each page on the destination still costs a shadow-paging fault in KVM).
    #[arg(long, default_value_t = 2000)]
    pub after_ms: u64,
    /// Directory for the source RAM file (tmpfs is best).
    #[arg(long, default_value = "/dev/shm")]
    pub ram_dir: PathBuf,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// A child process with its JSON-lines stdout on a channel; killed on drop.
struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
}

impl Vmm {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the VMM")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Vmm {
            child,
            stdin,
            events,
        })
    }

    fn send(&mut self, command: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("VMM stdin closed")?;
        writeln!(stdin, "{command}").context("the VMM is gone")?;
        Ok(())
    }

    /// Next event, or an error naming the VMM's exit status if it ended.
    fn next(&mut self, timeout: Duration) -> Result<Value> {
        match self.events.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the VMM sent nothing for {timeout:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                bail!("the VMM exited ({status})")
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn event_is(v: &Value, name: &str) -> bool {
    v["event"] == name
}

fn t_us(v: &Value) -> u64 {
    v["t_us"].as_u64().unwrap_or(0)
}

fn counter(v: &Value, name: &str) -> u64 {
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

/// Runs one migration and prints its summary.
///
/// # Errors
/// Any step failing, or a guest that saw a wrong byte.
pub fn run(args: &MigrateArgs) -> Result<()> {
    ensure!(
        args.size_mib >= 4 && args.size_mib.is_multiple_of(2),
        "--size-mib must be even and at least 4"
    );
    let tag = format!("pagemig-{}", std::process::id());
    let mem = args.ram_dir.join(format!("{tag}.mem"));
    let work = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&work)?;
    let result = migrate(args, &mem, &work);
    let _ = std::fs::remove_file(&mem);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn progress(text: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{text}");
    } else {
        eprintln!("{text}");
    }
}

fn migrate(args: &MigrateArgs, mem: &Path, work: &Path) -> Result<()> {
    let (state, uds, stats_path) = (
        work.join("vcpu.json"),
        work.join("faultd.sock"),
        work.join("faultd.json"),
    );
    let size = args.size_mib.to_string();
    let vmm = sibling("vmm")?;
    let workload = args
        .workload
        .to_possible_value()
        .expect("value")
        .get_name()
        .to_owned();
    let hybrid = args.strategy != Strategy::Postcopy;
    let pagesrv_vmm_uds = work.join("pagesrv-vmm.sock");
    let mut source_cmd = Command::new(&vmm);
    source_cmd
        .arg("source")
        .arg("--mem-file")
        .arg(mem)
        .args(["--size-mib", &size, "--workload", &workload])
        .arg("--state-file")
        .arg(&state);
    if hybrid {
        source_cmd.arg("--pagesrv-uds").arg(&pagesrv_vmm_uds);
    }
    if let Some(rate) = args.dirty_rate {
        source_cmd.args(["--dirty-rate", &rate.to_string()]);
    }
    let mut source = Vmm::spawn(&mut source_cmd)?;
    // Wait for the fill, then let the guest run for the warm-up.
    let data_pages = ((args.size_mib << 20) - bench::guest::DATA_START_GPA) >> 12;
    let limit = Duration::from_secs(600);
    let first_touching = loop {
        let e = source.next(limit)?;
        if counter(&e, "phase") == 1 {
            break e;
        }
        let filled = counter(&e, "filled");
        progress(&format!(
            "source guest filling RAM: {}%",
            filled * 100 / data_pages.max(1)
        ));
    };
    let mut last_source = first_touching.clone();
    while t_us(&last_source) < t_us(&first_touching) + args.warmup_ms * 1000 {
        last_source = source.next(limit)?;
    }
    progress("source guest running; starting pagesrv and faultd\n");
    let mode = if hybrid { Mode::Minor } else { args.mode };
    let placement = if mode == Mode::Minor { "memfd" } else { "copy" };
    let faultd_ctl = work.join("faultd.ctl");
    let mode = match mode {
        Mode::Copy => "copy",
        Mode::Minor => "minor",
    };
    let strategy = args
        .strategy
        .to_possible_value()
        .expect("value")
        .get_name()
        .to_owned();
    let mut dest_cmd = Command::new(&vmm);
    dest_cmd
        .arg("dest")
        .arg("--uds")
        .arg(&uds)
        .args(["--size-mib", &size, "--mode", mode])
        .arg("--state-file")
        .arg(&state);
    let mut pagesrv_events = None;
    // `warm`: the guest's last report before the migration started.
    let (mut pagesrv, mut faultd, start, paused, mut dest, warm) = if hybrid {
        // pagesrv takes the running guest's RAM from the source VMM and runs precopy rounds.
        let ctl = work.join("pagesrv.ctl");
        let mut cmd = Command::new(sibling("pagesrv")?);
        cmd.arg("--vmm-uds")
            .arg(&pagesrv_vmm_uds)
            .args(["--strategy", &strategy])
            .args(["--max-downtime-ms", &args.max_downtime_ms.to_string()])
            .arg("--control")
            .arg(&ctl)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped());
        let mut pagesrv = Guard(cmd.spawn().context("cannot start pagesrv")?);
        let mut lines = BufReader::new(pagesrv.0.stdout.take().context("no stdout")?).lines();
        let mut line = || -> Result<String> { Ok(lines.next().context("pagesrv ended")??) };
        ensure!(
            line()?.starts_with("pagesrv waiting for the source VMM"),
            "pagesrv did not start"
        );
        source.send("migrate")?;
        let addr = line()?
            .strip_prefix("pagesrv listening on ")
            .context("pagesrv did not take the source VMM's RAM")?
            .to_owned();
        std::thread::spawn(move || lines.for_each(drop));
        pagesrv_events = Some(collect_events(&ctl)?);
        let faultd = start_faultd(
            &addr,
            &uds,
            &stats_path,
            &[
                "--placement",
                placement,
                "--control",
                faultd_ctl.to_str().context("path")?,
            ],
            false,
        )?;
        let dest = Vmm::spawn(dest_cmd.arg("--wait-switch").arg(&faultd_ctl))?;
        let mut start = None;
        let warm = last_source.clone();
        let paused = loop {
            let e = source.next(limit)?;
            if event_is(&e, "paused") {
                break e;
            }
            if event_is(&e, "migrating") {
                start = Some(e);
                progress("precopy: pagesrv sends the guest's pages while it runs\n");
            }
        };
        let start = start.context("the source VMM never handed over its RAM")?;
        (pagesrv, faultd, start, paused, dest, warm)
    } else {
        let (pagesrv, addr) = start_pagesrv(mem, &[], false)?;
        let faultd = start_faultd(&addr, &uds, &stats_path, &["--placement", placement], false)?;
        source.send("pause")?;
        let warm = last_source.clone();
        let paused = loop {
            let e = source.next(limit)?;
            if event_is(&e, "paused") {
                break e;
            }
        };
        let dest = Vmm::spawn(&mut dest_cmd)?;
        (pagesrv, faultd, paused.clone(), paused, dest, warm)
    };
    let resumed = dest.next(limit)?;
    ensure!(
        event_is(&resumed, "resumed"),
        "unexpected first event from the destination: {resumed}"
    );
    let mut during = Vec::new();
    let complete = loop {
        let e = dest.next(limit)?;
        if event_is(&e, "complete") {
            break e;
        }
        during.push(e);
    };
    let mut after = Vec::new();
    loop {
        let e = dest.next(limit)?;
        let done = t_us(&e) >= t_us(&complete) + args.after_ms * 1000;
        after.push(e);
        if done {
            break;
        }
    }
    dest.send("stop")?;
    let dest_status = dest.child.wait()?;
    let faultd_status = faultd.0.wait()?;
    let pagesrv_status = pagesrv.0.wait()?;
    // The paused source VM lives until pagesrv lets it go.
    let source_status = source.child.wait()?;
    ensure!(
        source_status.success(),
        "the source VMM failed ({source_status})"
    );
    ensure!(faultd_status.success(), "faultd failed ({faultd_status})");
    ensure!(
        pagesrv_status.success(),
        "pagesrv failed ({pagesrv_status})"
    );
    ensure!(
        dest_status.success(),
        "the destination VMM failed ({dest_status})"
    );
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&stats_path)?)?;
    let source_digest = file_digest(mem)?;

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
    // From the guest's counters as it stopped. Its TSC is restored on the destination, so
    // the downtime is not a stall to it: blocktime is the time it spent stalled after it
    // resumed (QEMU's postcopy blocktime).
    let blocktime_ms = (counter(post_end, "stall_tsc_sum") - counter(&paused, "stall_tsc_sum"))
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
    let postcopy_rate = counter(postcopy_last, "touches")
        .saturating_sub(counter(&paused, "touches")) as f64
        / (t_us(postcopy_last).saturating_sub(t_us(&resumed)).max(1) as f64 / 1e6);
    let events: Vec<Value> = pagesrv_events
        .map(|rx| rx.try_iter().collect())
        .unwrap_or_default();
    let rounds: Vec<&Value> = events.iter().filter(|e| event_is(e, "round")).collect();
    let converged_by = events
        .iter()
        .find(|e| event_is(e, "converged"))
        .map_or(Value::Null, |e| e["by"].clone());
    let bytes_precopy = stats["bytes_precopy"].as_u64().unwrap_or(0);
    let bytes_received = stats["bytes_received"].as_u64().unwrap_or(0);
    let summary = json!({
        "size_mib": args.size_mib,
        "workload": workload,
        "dirty_rate": args.dirty_rate,
        "strategy": strategy,
        "mode": mode,
        "downtime_ms": t_us(&resumed).saturating_sub(t_us(&paused)) as f64 / 1000.0,
        "total_ms": completed_us.saturating_sub(t_us(&start)) as f64 / 1000.0,
        "pause_to_complete_ms": completed_us.saturating_sub(t_us(&paused)) as f64 / 1000.0,
        "precopy_ms": t_us(&paused).saturating_sub(t_us(&start)) as f64 / 1000.0,
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
            "ran_on_destination": counter(last, "touches") > counter(&paused, "touches"),
            "touches_per_s_before": touch_rate(&first_touching, &warm),
            "touches_per_s_during_precopy": if hybrid { touch_rate(&warm, &paused) } else { 0.0 },
            "touches_per_s_during_postcopy": postcopy_rate,
            "touches_per_s_after": touch_rate(first_after, last),
            "max_stall_us": window_max_tsc as f64 / tsc_per_us,
            "fault_latency_us": guest_fault_percentiles(&paused, post_end, 10.0 * tsc_per_us, tsc_per_us),
            "before": paused["counters"],
            "after": last["counters"],
        },
        "faultd": stats,
    });
    print_summary(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    ensure!(
        summary["guest"]["mismatches"] == 0,
        "the guest found wrong pages"
    );
    ensure!(
        summary["guest"]["ran_on_destination"] == true,
        "the guest made no progress on the destination"
    );
    ensure!(
        summary["digest_match"] == true,
        "the received pages' digest differs from the source's"
    );
    Ok(())
}

/// Events from a daemon's control socket, on a channel, until it closes.
fn collect_events(path: &Path) -> Result<mpsc::Receiver<Value>> {
    let mut client = common::control::ControlClient::connect(path)
        .with_context(|| format!("cannot reach {}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = client.next_line() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn file_digest(path: &Path) -> Result<u64> {
    use std::io::Read;
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
        sum = sum.wrapping_add(common::digest::run_digest(page, &buf[..filled], 4096));
        page += (filled / 4096) as u64;
    }
}

fn print_summary(s: &Value) {
    let g = &s["guest"];
    let f = &s["faultd"];
    let fl = &f["fault_latency_us"];
    let gl = &g["fault_latency_us"];
    println!();
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "live migration of a {} MiB KVM guest over loopback ({}, {} workload, {} mode)",
        s["size_mib"],
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
