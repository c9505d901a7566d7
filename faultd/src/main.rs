//! faultd: the destination half of a postcopy migration. Receives a VMM's guest RAM
//! (userfaultfd and region layout) over a Unix socket, serves its missing-page faults from
//! pagesrv, installs the background stream, and exits 0 once every page is present.
//!
//! Exit codes: 0 every page present; 1 the migration failed (the message says why); 2 bad
//! usage.

mod bulk;
mod event_loop;
mod fault;
mod link;
mod place;
mod stats;
mod upstream;
mod vm;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::auth::Psk;
use common::uffd::Uffd;
use common::vmm_link::receive_handshake;
use tracing::info;

use crate::link::Reconnect;
use crate::stats::Stats;
use crate::vm::Vm;

/// How long a connected VMM may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve a VMM's missing guest pages from pagesrv (postcopy destination).
///
/// Listens on a Unix socket for one VMM speaking Firecracker's UFFD handshake (a JSON region
/// list with the userfaultfd, and optionally the memfd, attached), connects to pagesrv,
/// resolves every missing-page fault with the requested page and installs the pushed stream
/// until every page is present. Then it unregisters the memory, closes the VMM's socket,
/// writes the stats and exits 0.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// pagesrv's address.
    #[arg(long, value_name = "ADDR:PORT")]
    connect: String,
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
    placement: Placement,
    /// Pre-shared key file: faultd and pagesrv prove to each other that they hold it
    /// before any page moves.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Give up when pagesrv stays unreachable this many seconds after a cut (default:
    /// never; the guest's faults wait, and pages already here keep being served).
    #[arg(long, value_name = "SECS")]
    reconnect_timeout: Option<f64>,
}

/// How pages are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Placement {
    Copy,
    Memfd,
}

fn bind_uds(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("failed to listen on {}", path.display()))
}

fn accept_vmm(listener: &UnixListener, placement: Placement) -> Result<(UnixStream, Vm)> {
    let (vmm, _) = listener.accept().context("failed to accept the VMM")?;
    vmm.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let handshake = receive_handshake(&vmm).context("malformed VMM handshake")?;
    vmm.set_read_timeout(None)?;
    info!(
        pid = handshake.peer_pid,
        regions = handshake.layout.regions().len(),
        pages = handshake.layout.total_pages(),
        page_size = handshake.layout.page_size(),
        memfd = handshake.memfd.is_some(),
        "VMM connected"
    );
    let memfd = match (placement, handshake.memfd) {
        (Placement::Memfd, Some(fd)) => Some(std::fs::File::from(fd)),
        (Placement::Memfd, None) => {
            info!("the VMM passed no memfd: placing pages with UFFDIO_COPY");
            None
        }
        (Placement::Copy, _) => None,
    };
    let vm = Vm::new(handshake.layout, Uffd::from_fd(handshake.uffd), memfd);
    Ok((vmm, vm))
}

fn run(cli: &Cli) -> Result<Stats> {
    let listener = bind_uds(&cli.uds)?;
    // One line on stdout for scripts and tests: the socket is ready.
    println!("faultd waiting for the VMM on {}", cli.uds.display());
    info!(uds = %cli.uds.display(), "waiting for the VMM");
    let accepted = accept_vmm(&listener, cli.placement);
    let _ = std::fs::remove_file(&cli.uds);
    let (vmm, vm) = accepted?;
    let started = Instant::now();
    let reconnect = Reconnect {
        addr: cli.connect.clone(),
        psk: cli.psk_file.as_deref().map(Psk::load).transpose()?,
        timeout: cli.reconnect_timeout.map(Duration::from_secs_f64),
    };
    let upstream = upstream::connect(
        &cli.connect,
        reconnect.psk.as_ref(),
        vm.page_size() as u32,
        vm.layout.total_pages(),
    )
    .with_context(|| format!("cannot start the migration from {}", cli.connect))?;
    info!(
        session = format_args!("{:016x}", upstream.session_id),
        "connected to pagesrv"
    );
    let stats = event_loop::run(&vm, upstream, &reconnect, vmm, started);
    // The VMM's socket is closed now (dropped by run): it learns the migration is over.
    let stats =
        stats.context("migration failed; VMM threads waiting on missing pages stay blocked")?;
    if let Some(path) = &cli.stats_json {
        stats
            .write(path)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(stats)
}

fn print_summary(s: &Stats) {
    let mib = s.bytes_received as f64 / (1 << 20) as f64;
    eprintln!(
        "faultd: complete in {:.1} ms: {} pages ({} requested, {} pushed, {} zero, {} removed), {:.1} MiB received ({:.0} MiB/s); {} faults, latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        s.duration_ms,
        s.total_pages,
        s.pages_requested,
        s.pages_pushed,
        s.pages_zero,
        s.pages_removed,
        mib,
        mib / (s.duration_ms / 1000.0).max(1e-9),
        s.faults,
        s.fault_latency_us.p50,
        s.fault_latency_us.p99,
        s.fault_latency_us.max,
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(stats) if stats.digest_check == "mismatch" => {
            print_summary(&stats);
            eprintln!(
                "faultd: error: guest memory differs from the source in pages {:?}",
                stats.digest_mismatch_pages
            );
            ExitCode::FAILURE
        }
        Ok(stats) => {
            print_summary(&stats);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("faultd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
