//! `bench migrate`: writes a patterned memory image, starts pagesrv on it, faultd, and a VMM
//! that touches pages from several threads while the rest streams in, then reports what each
//! side saw.
//!
//! The VMM is `test-vmm` (Firecracker's handshake, anonymous or memfd RAM); the KVM VMM
//! replaces it as the default workload when it lands.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

/// Options of `bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// One page in N is all zeros (0: none).
    #[arg(long, default_value_t = 4)]
    zero_every: u64,
    /// Back guest RAM with a memfd passed to faultd (shared memory) instead of anonymous RAM.
    #[arg(long)]
    memfd: bool,
    /// Guest threads touching pages in random order.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Where to write the memory image (removed afterwards).
    #[arg(long, default_value = "/dev/shm/pagemig-bench.mem")]
    image: PathBuf,
    /// Write the run's results as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Kills a child process if the run fails before waiting for it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace --bins`, as scripts/migrate.sh does)",
        path.display()
    );
    Ok(path)
}

fn write_image(path: &Path, pages: u64, zero_every: u64) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        if zero_every > 0 && p % zero_every == 0 {
            page.fill(0);
        } else {
            for (i, word) in page.chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&((p << 20) ^ i as u64 ^ 0x9E37_79B9_7F4A_7C15).to_le_bytes());
            }
        }
        w.write_all(&page)?;
    }
    w.flush()?;
    Ok(())
}

/// Runs one migration.
///
/// # Errors
/// Any step failing, or a VMM that saw a wrong byte.
pub fn run(args: &MigrateArgs) -> Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be positive");
    let pages = args.size_mib << 8;
    eprintln!(
        "bench: writing a {} MiB image to {}",
        args.size_mib,
        args.image.display()
    );
    write_image(&args.image, pages, args.zero_every)?;
    let result = migrate(args);
    let _ = std::fs::remove_file(&args.image);
    result
}

fn migrate(args: &MigrateArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("pagemig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (uds, stats_path) = (dir.join("faultd.sock"), dir.join("faultd-stats.json"));

    let mut pagesrv = Guard(
        Command::new(sibling("pagesrv")?)
            .arg("--vm-mem")
            .arg(&args.image)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start pagesrv")?,
    );
    let addr = first_line(&mut pagesrv.0)?
        .strip_prefix("pagesrv listening on ")
        .context("pagesrv did not start")?
        .to_owned();
    let mut faultd = Guard(
        Command::new(sibling("faultd")?)
            .args(["--connect", &addr])
            .arg("--uds")
            .arg(&uds)
            .arg("--stats-json")
            .arg(&stats_path)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start faultd")?,
    );
    first_line(&mut faultd.0)?;
    let started = Instant::now();
    let mut vmm_cmd = Command::new(sibling("test-vmm")?);
    vmm_cmd
        .arg("--uds")
        .arg(&uds)
        .arg("--source")
        .arg(&args.image)
        .args(["--threads", &args.threads.to_string()]);
    if args.memfd {
        vmm_cmd.arg("--memfd");
    }
    let vmm = vmm_cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the VMM")?;
    let vmm_out = vmm.wait_with_output().context("the VMM failed")?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let faultd_status = faultd.0.wait()?;
    let pagesrv_status = pagesrv.0.wait()?;
    let report: serde_json::Value = serde_json::from_slice(&vmm_out.stdout)
        .with_context(|| format!("the VMM printed no report ({})", vmm_out.status))?;
    ensure!(faultd_status.success(), "faultd failed ({faultd_status})");
    ensure!(
        pagesrv_status.success(),
        "pagesrv failed ({pagesrv_status})"
    );
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats_path)?)?;
    let _ = std::fs::remove_dir_all(&dir);

    let lat = &stats["fault_latency_us"];
    println!("migration of {} MiB over loopback", args.size_mib);
    println!("  total time            {total_ms:.1} ms (VMM start to every page present)");
    println!(
        "  faultd duration       {:.1} ms",
        stats["duration_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  faults served         {} (latency p50 {} µs, p99 {} µs, max {} µs)",
        lat["count"], lat["p50"], lat["p99"], lat["max"]
    );
    println!(
        "  pages                 {} requested, {} pushed, {} zero, {} removed",
        stats["pages_requested"],
        stats["pages_pushed"],
        stats["pages_zero"],
        stats["pages_removed"]
    );
    println!(
        "  bytes received        {:.1} MiB",
        stats["bytes_received"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  VMM check             {} pages, {} mismatches while touching, {} after completion",
        report["pages"], report["mismatches_during"], report["mismatches_after"]
    );
    let ok = vmm_out.status.success();
    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "size_mib": args.size_mib,
            "total_ms": total_ms,
            "vmm": report,
            "faultd": stats,
            "ok": ok,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    if !ok {
        bail!("the VMM saw wrong bytes or no completion: {report}");
    }
    Ok(())
}

fn first_line(child: &mut Child) -> Result<String> {
    let out = child.stdout.take().context("no stdout")?;
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    Ok(line.trim_end().to_owned())
}
