//! pagesrv: serves a paused VM's memory file to a postcopy destination (faultd).
//!
//! Exit codes: 0 a destination verified every page and completed the migration; 1 a fatal
//! error, or the migration failed (the destination reported a digest mismatch or its own
//! failure: keep the source VM); 2 bad usage.
#![forbid(unsafe_code)]

mod handshake;
mod push_order;
mod report;
mod server;
mod session;
mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use crate::server::{ServerConfig, serve};
use crate::session::SessionConfig;
use crate::source::MemorySource;

/// Serve a paused VM's memory to a postcopy destination.
///
/// Maps the memory file read-only and serves its pages over TCP to faultd: requested pages at
/// once on the urgent connection, every other page pushed in the background on the bulk
/// connection (zero pages as ranges without payload). Serves until a destination has
/// verified every page and completed, then exits 0; a session that breaks off (or goes
/// silent) waits for the destination to reconnect and resume (a restarted pagesrv on the same
/// file works the same way). If the destination reports a failure or a digest mismatch,
/// pagesrv exits 1: the source must keep the VM.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// The guest memory file (e.g. /dev/shm/vm1, a Firecracker snapshot's memory file, or a
    /// hugetlbfs file).
    #[arg(long, value_name = "PATH", required_unless_present = "gen_psk")]
    vm_mem: Option<PathBuf>,
    /// Write a new random pre-shared key to FILE (mode 0600; an existing file is never
    /// replaced), then exit. Give the same file to pagesrv and faultd with --psk-file.
    #[arg(long, value_name = "FILE", conflicts_with = "vm_mem")]
    gen_psk: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Serve only destinations with this page size (4k or 2m). Without it, pagesrv serves the
    /// page size each destination asks for, if the file is a whole number of such pages (a
    /// Firecracker snapshot of a huge-page guest is an ordinary file served in 2 MiB pages).
    #[arg(long, value_parser = parse_page_size)]
    page_size: Option<u64>,
    /// Keep serving further sessions instead of exiting after the first that completed or
    /// failed.
    #[arg(long)]
    serve_forever: bool,
    /// A link with no frame from the destination for this many seconds is dead (the session
    /// waits for a reconnect). Both sides send heartbeats on idle connections.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = common::netopt::parse_seconds)]
    link_timeout: std::time::Duration,
    /// Pages pushed right after each requested page (pre-paging window; 0 disables; at most
    /// 8 MiB of pages, so 4 with 2 MiB pages).
    #[arg(long, value_name = "PAGES", default_value_t = 64)]
    prepage_window: u64,
    /// Do not push pages in the background: serve requested pages only.
    #[arg(long)]
    no_push: bool,
    /// Benchmark baseline: push pages on the urgent connection too, so requested pages queue
    /// behind background pages (what a single-connection design does).
    #[arg(long)]
    naive_single_connection: bool,
    /// Pre-shared key file (make one with --gen-psk; it must be readable by its owner only):
    /// destinations must prove they hold the key before any page moves, pagesrv proves it
    /// too, and every frame after the handshake is encrypted and authenticated.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Allow a non-loopback listen address without --psk-file (anyone who can connect gets
    /// the VM's memory).
    #[arg(long)]
    insecure_listen: bool,
    /// Test-only fault injection: send this page with one byte flipped (the destination's
    /// digest check must catch it).
    #[arg(long, hide = true, value_name = "PAGE")]
    corrupt_page: Option<u64>,
}

fn parse_page_size(text: &str) -> Result<u64, String> {
    match text.to_ascii_lowercase().as_str() {
        "4k" | "4096" => Ok(4096),
        "2m" | "2097152" => Ok(2 << 20),
        _ => Err(format!("unsupported page size {text:?}: use 4k or 2m")),
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(path) = &cli.gen_psk {
        common::auth::Psk::generate(path)?;
        println!(
            "pagesrv: wrote a new key to {} (mode 0600); give it to pagesrv and faultd with --psk-file",
            path.display()
        );
        return Ok(());
    }
    let vm_mem = cli.vm_mem.as_deref().context("--vm-mem is required")?;
    let source =
        MemorySource::open(vm_mem).with_context(|| format!("cannot serve {}", vm_mem.display()))?;
    // Every destination asks for 4 KiB or 2 MiB pages: a file that is not even a whole
    // number of 4 KiB pages (or of the --page-size pages) can serve none.
    source
        .paged(cli.page_size.unwrap_or(4096))
        .with_context(|| format!("cannot serve {}", vm_mem.display()))?;
    let psk = cli
        .psk_file
        .as_deref()
        .map(common::auth::Psk::load)
        .transpose()?;
    let config = ServerConfig {
        psk,
        insecure_listen: cli.insecure_listen,
        listen: cli.listen,
        serve_forever: cli.serve_forever,
        page_size: cli.page_size,
        session: SessionConfig {
            prepage_window_pages: cli.prepage_window,
            push: !cli.no_push,
            corrupt_page: cli.corrupt_page,
            naive_single_connection: cli.naive_single_connection,
            liveness: common::netopt::Liveness::new(cli.link_timeout),
        },
    };
    serve(&source, &config)
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagesrv: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
