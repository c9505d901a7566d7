//! vmm: the reference KVM VMM (`--vcpus N`, ring-3 long-mode guest) for the main job and
//! the benchmarks. vCPU 0 runs on the main thread and reports; every other vCPU runs on a
//! thread of its own, and all of them stop (a signal each) to pause or when faultd dies.
//!
//! - `vmm source`: guest RAM in a file; boots the guest, which fills RAM and then touches,
//!   verifies and rewrites pages; on `pause` (a line on stdin) stops at the next report, saves
//!   the vCPU to the state file and exits, leaving RAM in the file for pagesrv. With
//!   `--pagesrv-uds`, `migrate` on stdin hands the running guest's RAM to pagesrv
//!   (`common::source_link`): KVM's dirty log answers pagesrv's `dirty` requests while the
//!   guest keeps running, and pagesrv's `pause` stops the vCPU at once (a signal), saves it
//!   and answers with the last dirty pages. The paused guest is kept until pagesrv's
//!   outcome (`outcome` event): `completed` and verified, it exits (the source is let go);
//!   `failed`, it resumes the guest (`resumed`) and runs on; an unverified completion, or a
//!   link that ends (or fails) without an outcome, keeps the guest paused until `resume` or
//!   `release` on stdin.
//! - `vmm dest`: guest RAM in a memfd registered with a userfaultfd, handed to faultd with
//!   Firecracker's handshake (plus the memfd); restores the vCPU and runs at once while
//!   faultd fills RAM in. If faultd dies before every page is present, the vCPU is stopped
//!   and the VMM exits with an error instead of hanging. `stop` on stdin ends it.
//!
//! Both print one JSON object per line on stdout: `report` (the guest's counters, every
//! 50 ms of guest time), `paused`, `outcome`, `resumed`, `complete`. Exit codes: 0 done; 1
//! failure.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use bench::guest::{Counters, PageSize};
use clap::{Parser, Subcommand, ValueEnum};

mod dest;
mod source;
mod vcpus;

use dest::run_dest;
use source::{SourceArgs, run_source};
use vcpus::interrupt_vcpu;

/// Reference KVM VMM for loopback live migration.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Run the guest with RAM in a file until `pause`, then save the vCPU.
    Source(SourceArgs),
    /// Resume a saved vCPU with RAM served by faultd.
    Dest {
        /// faultd's Unix socket.
        #[arg(long)]
        uds: PathBuf,
        /// Guest RAM in MiB (as on the source).
        #[arg(long)]
        size_mib: u64,
        /// The saved vCPUs.
        #[arg(long)]
        state_file: PathBuf,
        /// vCPUs (as on the source; the state file must hold as many).
        #[arg(long, default_value_t = 1)]
        vcpus: u64,
        /// Back guest RAM with 4 KiB pages (a shmem memfd) or 2 MiB pages (a hugetlbfs
        /// memfd: reserve huge pages first).
        #[arg(long, value_enum, default_value = "4k")]
        page_size: PageSize,
        /// Registration: `copy` (MISSING: faultd copies pages in) or `minor` (MISSING|MINOR:
        /// faultd writes into the shared memfd and maps pages in place).
        #[arg(long, value_enum, default_value = "copy")]
        mode: Mode,
        /// faultd's control socket: resume only once it says `switched` (precopy first).
        #[arg(long, value_name = "PATH")]
        wait_switch: Option<PathBuf>,
        /// Allocate all of guest RAM before handing it to faultd (as QEMU's `-mem-prealloc`
        /// for an incoming migration), emit `allocated`, then wait for faultd's socket: a
        /// destination prepared before the migration starts.
        #[arg(long)]
        prealloc: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Copy,
    Minor,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn emit(event: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

fn report((c, vcpu_touches): &(Counters, Vec<u64>), tsc_per_us: f64) {
    emit(serde_json::json!({
        "event": "report",
        "t_us": now_us(),
        "tsc_per_us": tsc_per_us,
        "counters": c,
        "vcpu_touches": vcpu_touches,
        "hist": c.hist.to_vec(),
    }));
}

/// Returns a flag set when `word` arrives on stdin, or stdin ends (the driver is gone).
fn watch_stdin(word: &'static str) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == word => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        set.store(true, Ordering::Release);
    });
    flag
}

/// Lines from stdin (`None` once it ends: the driver is gone).
fn stdin_lines() -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    let l = l.trim().to_owned();
                    let pause = l == "pause";
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                    if pause {
                        interrupt_vcpu();
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
        interrupt_vcpu();
    });
    rx
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.role {
        Role::Source(args) => run_source(args),
        Role::Dest {
            uds,
            size_mib,
            state_file,
            vcpus,
            page_size,
            mode,
            wait_switch,
            prealloc,
        } => run_dest(
            uds,
            (size_mib, page_size),
            (state_file, vcpus),
            mode,
            (wait_switch, prealloc),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
