//! `bench migrate`: a complete loopback live migration of a running KVM guest.
//!
//! ```text
//!  vmm source ──(guest fills RAM, touches pages)── pause ── state file
//!      │ RAM file /dev/shm/…                                   │
//!  pagesrv ◄── urgent + bulk ──► faultd ◄── uffd+layout+memfd ── vmm dest (resumes at once)
//! ```
//!
//! Downtime is from the source vCPU stopping to the destination vCPU running; total time from
//! the pause until every page is present. The guest's own counters (touch rate, stalls,
//! verification) come from its reports before, during and after postcopy.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use bench::guest::Workload;

use crate::procs::{sibling, start_faultd, start_pagesrv};

/// How faultd places pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// UFFDIO_COPY into MISSING-registered RAM.
    Copy,
    /// Write into the shared memfd and UFFDIO_CONTINUE (MISSING|MINOR registration).
    Minor,
}

/// Options of `bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// The guest's access pattern.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: Workload,
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
    let mut source = Vmm::spawn(
        Command::new(&vmm)
            .arg("source")
            .arg("--mem-file")
            .arg(mem)
            .args(["--size-mib", &size, "--workload", &workload])
            .arg("--state-file")
            .arg(&state),
    )?;
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

    let (mut pagesrv, addr) = start_pagesrv(mem, &[], false)?;
    let placement = if args.mode == Mode::Minor {
        "memfd"
    } else {
        "copy"
    };
    let mut faultd = start_faultd(&addr, &uds, &stats_path, &["--placement", placement], false)?;

    source.send("pause")?;
    let paused = loop {
        let e = source.next(limit)?;
        if event_is(&e, "paused") {
            break e;
        }
        last_source = e;
    };
    let before = last_source;
    let mode = match args.mode {
        Mode::Copy => "copy",
        Mode::Minor => "minor",
    };
    let mut dest = Vmm::spawn(
        Command::new(&vmm)
            .arg("dest")
            .arg("--uds")
            .arg(&uds)
            .args(["--size-mib", &size, "--mode", mode])
            .arg("--state-file")
            .arg(&state),
    )?;
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

    let tsc_per_us = before["tsc_per_us"].as_f64().unwrap_or(2000.0);
    let last = after.last().expect("at least one report after completion");
    // The first report after completion closes the postcopy window.
    let post_end = after.first().expect("a report after completion");
    let postcopy_reports: Vec<&Value> = during.iter().chain(std::iter::once(post_end)).collect();
    let window_max_tsc = postcopy_reports
        .iter()
        .map(|r| counter(r, "window_max_tsc"))
        .max()
        .unwrap_or(0);
    let blocktime_ms = (counter(post_end, "stall_tsc_sum") - counter(&before, "stall_tsc_sum"))
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
    let postcopy_last = during.last().unwrap_or(post_end);
    let postcopy_rate = counter(postcopy_last, "touches")
        .saturating_sub(counter(&before, "touches")) as f64
        / (t_us(postcopy_last).saturating_sub(t_us(&resumed)).max(1) as f64 / 1e6);
    let summary = json!({
        "size_mib": args.size_mib,
        "workload": workload,
        "mode": mode,
        "downtime_ms": t_us(&resumed).saturating_sub(t_us(&paused)) as f64 / 1000.0,
        "total_ms": t_us(&complete).saturating_sub(t_us(&paused)) as f64 / 1000.0,
        "blocktime_ms": blocktime_ms,
        "digest_match": stats["received_digest"] == format!("{source_digest:016x}"),
        "source_digest": format!("{source_digest:016x}"),
        "guest": {
            "pages_verified": counter(last, "pages_verified"),
            "mismatches": counter(last, "mismatches"),
            "ran_on_destination": counter(last, "touches") > counter(&before, "touches"),
            "touches_per_s_before": touch_rate(&first_touching, &before),
            "touches_per_s_during_postcopy": postcopy_rate,
            "touches_per_s_after": touch_rate(first_after, last),
            "max_stall_us": window_max_tsc as f64 / tsc_per_us,
            "fault_latency_us": guest_fault_percentiles(&before, post_end, 10.0 * tsc_per_us, tsc_per_us),
            "before": before["counters"],
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
    println!(
        "live migration of a {} MiB KVM guest over loopback ({} workload, {} mode)",
        s["size_mib"],
        s["workload"].as_str().unwrap_or(""),
        s["mode"].as_str().unwrap_or("")
    );
    println!(
        "  downtime (pause to resume)      {:>10.1} ms",
        s["downtime_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  total (pause to every page)     {:>10.1} ms",
        s["total_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  vCPU blocktime (stalls ≥ 10 µs) {:>10.1} ms",
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
    println!(
        "  bytes received                  {:>10.1} MiB",
        f["bytes_received"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  guest touches/s                 before {:.0}, during postcopy {:.0}, after {:.0}",
        g["touches_per_s_before"].as_f64().unwrap_or(0.0),
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
