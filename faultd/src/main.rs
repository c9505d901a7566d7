//! faultd: the destination half of a postcopy migration. Receives a VMM's guest RAM
//! (userfaultfd and region layout) over a Unix socket, serves its missing-page faults from
//! pagesrv, installs the background stream, checks every page against the source, and exits
//! 0 once every page is present and verified.
//!
//! Exit codes: 0 every page present and verified (or `--no-verify`); 1 the migration failed
//! or a page differs from the source (the message says why; pagesrv is told, so the source
//! keeps the VM); 2 bad usage.
#![forbid(unsafe_code)]

mod base;
mod core;
mod event_loop;
mod metrics;
mod stats;
mod status;
mod upstream;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use common::auth::Psk;
use common::control::{ControlServer, Handler};
use common::netopt::{Liveness, parse_seconds};
use common::sched::FastPath;
use serde_json::json;
use tracing::info;

use crate::base::BaseImage;
use crate::core::vm::Vm;
use crate::event_loop::{Report, Verdict};
use crate::upstream::connect::Target;
use crate::upstream::link::LinkConfig;
use crate::vmm::{PlaceMode, accept_vmm, bind_uds};

/// Serve a VMM's missing guest pages from pagesrv (postcopy destination).
///
/// Listens on a Unix socket for one VMM speaking Firecracker's UFFD handshake (a JSON region
/// list with the userfaultfd, and optionally the memfd, attached), connects to pagesrv
/// (waiting for it if it is not up yet), resolves every missing-page fault with the
/// requested page and installs the pushed stream until every page is present. Then it
/// unregisters the memory, compares a digest of every page with the source's, tells pagesrv
/// the verdict, writes the stats and exits (0: verified).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// pagesrv's address.
    #[arg(long, value_name = "ADDR:PORT")]
    connect: String,
    /// The VM to migrate, by the name pagesrv serves it under (`pagesrv --vm-mem NAME=PATH`
    /// or `--vm-dir`). Needed when pagesrv serves several VMs; with one, it is checked. A VM
    /// key file names its VM already.
    #[arg(long, value_name = "NAME")]
    vm: Option<common::wire::VmName>,
    /// Bulk connections to pagesrv: the first carries everything; N-1 more share the
    /// background push (each with a thread here placing what it brings). For a link one
    /// connection cannot fill, or a host where one thread cannot place fast enough.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(common::wire::MAX_STREAMS)))]
    streams: u32,
    /// Unix socket to accept the VMM on (created; a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// Write migration statistics (pages by kind, bytes, fault latency) as JSON here.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// How to place pages: `copy` (UFFDIO_COPY), or `memfd` (write into the memfd the VMM
    /// passed and map in place with UFFDIO_CONTINUE; needs MISSING|MINOR registration for
    /// the mapping step, else the next touch maps the page). `memfd` falls back to `copy`
    /// when the VMM passes no memfd.
    #[arg(long, value_enum, default_value = "copy")]
    placement: PlaceMode,
    /// The VMM's guest RAM file (with `--placement memfd`) is shared by clones of one
    /// template on this host, each VMM mapping it private: a page any of their faultds
    /// placed is mapped into the others without a fault, and not fetched again. The file
    /// must be linked in a tmpfs directory without large pages for writes, pages 4 KiB; it
    /// is tied to the first image written into it (another is refused); no precopy.
    #[arg(long)]
    shared_ram: bool,
    /// Key file: pagesrv's master key (`pagesrv --gen-psk FILE`), or the key of this VM only
    /// (`pagesrv --psk-file MASTER --derive-vm-key NAME=FILE`); it must belong to this user
    /// and be readable by its owner only. faultd and pagesrv prove to each other that they
    /// hold the VM's key before any page moves, and every frame after the handshake is
    /// encrypted and authenticated.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// INSECURE: connect without a key (pagesrv needs the same flag). Pages and the verdict
    /// travel unauthenticated: anyone who can take pagesrv's port can feed this guest. Only
    /// to a loopback address.
    #[arg(long, conflicts_with = "psk_file")]
    insecure_no_key: bool,
    /// Give up when pagesrv stays unreachable this many seconds, at the start or after a
    /// cut (default: wait; the guest's faults wait, pages already here keep being served,
    /// and each attempt is logged every few seconds).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    reconnect_timeout: Option<Duration>,
    /// A link with no frame from pagesrv for this many seconds is dead (reconnect). Both
    /// sides send heartbeats on idle connections.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_seconds)]
    link_timeout: Duration,
    /// Do not compare digests with the source at the end (exit 0 once every page is
    /// present). Without it, a check that cannot run is a failure.
    #[arg(long)]
    no_verify: bool,
    /// Control socket for orchestrators: newline-delimited JSON; `{"cmd":"status"}`, and
    /// the events `switched` (precopy is over: resume the guest now), `completed`, `failed`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// A memory image this host already holds (an older copy of this VM, or the template it
    /// was cloned from), as large as the guest's RAM: pages whose hash matches the source's
    /// are placed from it instead of crossing the wire.
    #[arg(long, value_name = "FILE")]
    base: Option<PathBuf>,
    /// Serve metrics (OpenMetrics text: phase, pages by kind, bytes, fault latency
    /// histogram, reconnects, digest verdict) on `GET /metrics` at this address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Record the pages the guest faults on, in the order it first touches them, into FILE
    /// at the end (`pagesrv --prefetch FILE` pushes them first next time this image is
    /// migrated or restored).
    #[arg(long, value_name = "FILE")]
    record_working_set: Option<PathBuf>,
    /// Pin the fault thread (the one that reads faults and requests pages) to this CPU;
    /// best on the CPU of the vCPUs that fault, so no wake-up crosses CPUs.
    #[arg(long, value_name = "CPU")]
    fault_cpu: Option<usize>,
    /// Pin the bulk threads (placing the background stream) to these CPUs, e.g. `1` or
    /// `2-3` (default: every CPU faultd may use).
    #[arg(long, value_name = "LIST", value_parser = common::sched::parse_cpu_list)]
    bulk_cpus: Option<common::sched::CpuList>,
    /// While a requested page is on its way, the fault thread polls for it this many
    /// microseconds before sleeping (0: sleep at once). Costs CPU; helps where waking a
    /// sleeping thread is slow. At most 1000.
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=common::sched::MAX_BUSY_POLL_US))]
    busy_poll_us: u64,
}

/// The VM's key and name: from a master key and `--vm`, from a VM key file (which names its
/// VM), or the public stand-in of `--insecure-no-key`.
fn vm_key(cli: &Cli) -> Result<(Psk, common::wire::VmName)> {
    let Some(path) = &cli.psk_file else {
        let vm = cli.vm.unwrap_or_default();
        tracing::warn!("--insecure-no-key: pages and the verdict travel unauthenticated");
        return Ok((Psk::unkeyed().for_vm(&vm), vm));
    };
    let file = Psk::load(path)?;
    match (file.vm, cli.vm) {
        (None, vm) => {
            let vm = vm.unwrap_or_default();
            Ok((file.psk.for_vm(&vm), vm))
        }
        (Some(theirs), Some(ours)) if theirs != ours => anyhow::bail!(
            "{} holds the key of VM {theirs}, not of --vm {ours}",
            path.display()
        ),
        (Some(vm), _) => Ok((file.psk, vm)),
    }
}

fn run(cli: &Cli) -> Result<Report> {
    let (key, vm_name) = vm_key(cli)?;
    if let Some(path) = &cli.stats_json {
        // Checked before any page moves: a failure to write it at the end is only a warning.
        common::atomic_file::check_writable(path)
            .with_context(|| format!("cannot write --stats-json {}", path.display()))?;
    }
    if let Some(path) = &cli.record_working_set {
        common::atomic_file::check_writable(path)
            .with_context(|| format!("cannot write --record-working-set {}", path.display()))?;
    }
    if !key.is_keyed() {
        // Checked again on every connection (the name may resolve elsewhere later).
        use std::net::ToSocketAddrs;
        if let Some(remote) = cli
            .connect
            .to_socket_addrs()
            .into_iter()
            .flatten()
            .find(|a| !a.ip().is_loopback())
        {
            anyhow::bail!(
                "refusing to connect to {remote} without a key: --insecure-no-key is for loopback only (give --psk-file)"
            );
        }
    }
    // An unreadable base image is refused before anything starts.
    let base = cli.base.as_deref().map(BaseImage::open).transpose()?;
    let fast_path = FastPath::new(
        cli.fault_cpu,
        cli.bulk_cpus.clone(),
        Duration::from_micros(cli.busy_poll_us),
    )
    .context("bad --fault-cpu or --bulk-cpus")?;
    // The control socket is up before the VMM may look for it.
    let status = Arc::new(Mutex::new(json!({"status": {"phase": "starting"}})));
    let control = cli
        .control
        .as_deref()
        .map(|path| {
            let status = status.clone();
            let handler: Arc<Handler> = Arc::new(move |name, _| match name {
                "status" => status.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                other => {
                    json!({"error": format!("unknown command {other:?} (faultd knows: status)")})
                }
            });
            ControlServer::bind(path, handler)
        })
        .transpose()?;
    // Up before the VMM connects, like the control socket: fleet tooling sees "starting".
    let metrics = cli
        .metrics_listen
        .map(|addr| {
            let status = status.clone();
            common::metrics::MetricsServer::start(
                addr,
                Arc::new(move || {
                    // Copied under the lock, turned into metrics outside it: a scrape never
                    // holds up the fault thread's next publication.
                    let now = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    metrics::snapshot(&now)
                }),
            )
        })
        .transpose()?;
    if let Some(m) = &metrics {
        info!(addr = %m.addr(), "serving metrics");
    }
    let listener = bind_uds(&cli.uds)?;
    // One line on stdout for scripts and tests: the socket is ready.
    println!("faultd waiting for the VMM on {}", cli.uds.display());
    info!(uds = %cli.uds.display(), "waiting for the VMM");
    let accepted = accept_vmm(&listener, cli.placement, cli.shared_ram);
    let _ = std::fs::remove_file(&cli.uds);
    let (vmm, kernel) = accepted?;
    let started = Instant::now();
    if let Some(base) = &base {
        // Before any page moves.
        base.check_size(kernel.layout().total_pages() * kernel.layout().page_size())?;
    }
    let target = Target {
        addr: cli.connect.clone(),
        key,
        page_size: u32::try_from(kernel.layout().page_size()).context("page size")?,
        total_pages: kernel.layout().total_pages(),
        base: base.is_some(),
        shared_ram: cli.shared_ram,
        vm: vm_name,
        streams: cli.streams,
    };
    let vm = Vm::new(kernel).context("cannot serve this VM")?;
    let config = LinkConfig {
        target,
        reconnect_timeout: cli.reconnect_timeout,
        liveness: Liveness::new(cli.link_timeout),
        base,
        fast_path,
    };
    let options = event_loop::Options {
        verify: !cli.no_verify,
        control,
        status,
        record_working_set: cli.record_working_set.clone(),
        publish_status: cli.metrics_listen.is_some(),
    };
    let report = event_loop::run(&vm, &config, options, vmm, started);
    // The VMM's socket is closed now (dropped by run): it learns the migration is over.
    let report =
        report.context("migration failed; VMM threads waiting on missing pages stay blocked")?;
    if let Some(path) = &cli.stats_json
        && let Err(e) = report.stats.write(path)
    {
        // The migration's outcome is settled (pagesrv was told): a report that cannot be
        // written must not turn it into a failure.
        tracing::warn!(path = %path.display(), error = %e, "cannot write the stats");
    }
    Ok(report)
}

fn print_summary(s: &stats::Stats) {
    let mib = s.bytes_received as f64 / f64::from(1 << 20);
    // One write, so the line does not interleave with other processes' output.
    let line = format!(
        "faultd: complete in {:.1} ms: {} pages ({} requested, {} pushed, {} zero, {} removed, {} from the base image), {:.1} MiB received ({:.0} MiB/s); {} faults, latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {} reconnects; digests: {}\n",
        s.duration_ms,
        s.total_pages,
        s.pages_requested,
        s.pages_pushed,
        s.pages_zero,
        s.pages_removed,
        s.pages_reused,
        mib,
        mib / (s.duration_ms / 1000.0).max(1e-9),
        s.faults,
        s.fault_latency_us.p50,
        s.fault_latency_us.p99,
        s.fault_latency_us.max,
        s.reconnects,
        s.digest_check,
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.psk_file.is_none() && !cli.insecure_no_key {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "no key: give --psk-file FILE (pagesrv's key, or this VM's key), or --insecure-no-key to take pages unauthenticated (loopback only)",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(report) => {
            print_summary(&report.stats);
            match report.verdict {
                Verdict::Mismatch(ranges) => {
                    eprintln!(
                        "faultd: error: guest memory differs from the source in pages {ranges:?}; pagesrv was told to keep the source"
                    );
                    ExitCode::FAILURE
                }
                Verdict::Verified | Verdict::NotVerified => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("faultd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::{CommandFactory, Parser};

    const ARGS: &[&str] = &[
        "faultd",
        "--connect",
        "h:1",
        "--insecure-no-key",
        "--uds",
        "/x",
        "--fault-cpu",
        "0",
        "--bulk-cpus",
        "1-3",
        "--busy-poll-us",
        "30",
    ];

    #[test]
    fn the_command_line_is_consistent_and_takes_the_fast_path_flags() {
        super::Cli::command().debug_assert();
        let cli = super::Cli::try_parse_from(ARGS).unwrap();
        assert_eq!(cli.busy_poll_us, 30);
        assert_eq!(cli.bulk_cpus.unwrap().0, vec![1, 2, 3]);
        let bad: Vec<&str> = ARGS
            .iter()
            .map(|a| if *a == "1-3" { "3-1" } else { a })
            .collect();
        assert!(super::Cli::try_parse_from(bad).is_err());
    }
}
