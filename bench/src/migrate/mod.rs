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

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use serde_json::Value;

use bench::guest::{PageSize, Workload};

use crate::procs::sibling;

mod handover;
mod summary;
mod vmm;

use handover::{Postcopy, follow_destination, hand_over_postcopy, hand_over_precopy};
use summary::{Labels, Timeline, counter, file_digest, print_summary, t_us};
use vmm::Vmm;

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
    /// Run the pair without a key (`--insecure-no-key` on both: frames travel plain), to
    /// measure what the key costs. By default a key is made for the run.
    #[arg(long)]
    pub insecure_no_key: bool,
    /// Downtime budget of the precopy convergence rule, in ms.
    #[arg(long, default_value_t = 20)]
    pub max_downtime_ms: u64,
    /// The guest leaves this percentage of its data pages free (old bytes, never touched);
    /// its free list reaches pagesrv as free-page hints (before each precopy round and at
    /// the pause; for postcopy, as `--free-pages` written at the pause).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=90))]
    pub free_pct: Option<u8>,
    /// Give faultd a base image (`--base`) that holds this percentage of the guest's pages as
    /// they are when the migration starts (the others differ).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub base_similarity: Option<u8>,
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// The destination's guest RAM: `4k` (a shmem memfd) or `2m` (a hugetlbfs memfd; the
    /// huge pages are reserved for the run and given back, also when interrupted; needs
    /// root). Precopy tracks the source's 4 KiB writes and resends a huge page when any of
    /// it was written; a huge page is free when all of it is.
    #[arg(long, value_enum, default_value = "4k")]
    pub page_size: PageSize,
    /// Cut the link once, when this many MiB went from pagesrv to faultd (through the
    /// tests' `cut-proxy`): faultd reconnects and the migration goes on.
    #[arg(long, value_name = "MIB")]
    pub cut_after_mib: Option<u64>,
    /// Bulk connections between the pair (`faultd --streams`).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(common::wire::MAX_STREAMS)))]
    pub streams: u32,
    /// The guest's vCPUs (each touches its own share of the pages; not with --free-pct).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=bench::guest::MAX_VCPUS))]
    pub vcpus: u64,
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

/// Runs one migration and prints its summary.
///
/// # Errors
/// Any step failing, or a guest that saw a wrong byte.
pub fn run(args: &MigrateArgs) -> Result<()> {
    if args.insecure_no_key {
        crate::procs::run_without_key();
    }
    ensure!(
        args.size_mib >= 4 && args.size_mib.is_multiple_of(2),
        "--size-mib must be even and at least 4"
    );
    bench::guest::check_vcpus(args.vcpus, args.free_pct.map_or(0, u64::from))?;
    let _huge_pages = if args.page_size == PageSize::Huge {
        crate::link::clean_up_on_interrupt()?;
        let pages = args.size_mib / 2 + 8;
        let reserved = crate::hugetlb::Reserved::pages(pages)?;
        reserved.warm(pages);
        Some(reserved)
    } else {
        None
    };
    let tag = format!("pagemig-{}", std::process::id());
    let mem = args.ram_dir.join(format!("{tag}.mem"));
    let work = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&work)?;
    // Removed by the interrupt handler too, where one runs (--page-size 2m).
    crate::procs::remove_on_interrupt(&mem);
    crate::procs::remove_on_interrupt(&work);
    let result = migrate(args, &mem, &work);
    let _ = std::fs::remove_file(&mem);
    let _ = std::fs::remove_file(base_image_path(&mem));
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

/// Where one run keeps its files.
struct Paths {
    state: PathBuf,
    faultd_uds: PathBuf,
    faultd_stats: PathBuf,
    faultd_ctl: PathBuf,
    pagesrv_ctl: PathBuf,
    pagesrv_vmm_uds: PathBuf,
    free_hints: PathBuf,
}

impl Paths {
    fn in_dir(work: &Path) -> Self {
        Paths {
            state: work.join("vcpu.json"),
            faultd_uds: work.join("faultd.sock"),
            faultd_stats: work.join("faultd.json"),
            faultd_ctl: work.join("faultd.ctl"),
            pagesrv_ctl: work.join("pagesrv.ctl"),
            pagesrv_vmm_uds: work.join("pagesrv-vmm.sock"),
            free_hints: work.join("free.bitmap"),
        }
    }
}

/// How long any one step may take.
const STEP_LIMIT: Duration = Duration::from_secs(600);

fn value_name(v: &impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_owned()
}

fn migrate(args: &MigrateArgs, mem: &Path, work: &Path) -> Result<()> {
    let paths = Paths::in_dir(work);
    let precopy_first = args.strategy != Strategy::Postcopy;
    // Precopy needs faultd to write into the VMM's memfd (it drops pages written again).
    let mode = if precopy_first {
        Mode::Minor
    } else {
        args.mode
    };
    let (workload, strategy, mode_name) = (
        value_name(&args.workload),
        value_name(&args.strategy),
        value_name(&mode),
    );
    let (mut source, first_touching, warm) = boot_source(args, mem, &paths, &workload)?;
    progress("source guest running; starting pagesrv and faultd\n");
    let mut dest_cmd = Command::new(sibling("vmm")?);
    dest_cmd
        .arg("dest")
        .arg("--uds")
        .arg(&paths.faultd_uds)
        .args([
            "--size-mib",
            &args.size_mib.to_string(),
            "--mode",
            &mode_name,
            "--vcpus",
            &args.vcpus.to_string(),
            "--page-size",
            &value_name(&args.page_size),
        ])
        .arg("--state-file")
        .arg(&paths.state);
    let mut faultd_args = vec![
        "--placement".to_owned(),
        if mode == Mode::Minor { "memfd" } else { "copy" }.to_owned(),
        "--streams".to_owned(),
        args.streams.to_string(),
    ];
    // Beside the guest's RAM (tmpfs by default), allocated before the migration starts.
    let base = args.base_similarity.map(|pct| (base_image_path(mem), pct));
    if let Some((path, _)) = &base {
        crate::procs::remove_on_interrupt(path);
        allocate_base_image(path, args.size_mib << 20)?;
        faultd_args.push("--base".to_owned());
        faultd_args.push(path.to_str().context("path")?.to_owned());
    }
    let mut h = if precopy_first {
        hand_over_precopy(
            args,
            &paths,
            &mut source,
            &mut dest_cmd,
            (&strategy, mem),
            &faultd_args,
            base.as_ref().map(|(path, pct)| (path.as_path(), *pct)),
        )?
    } else {
        let handover = Postcopy {
            mem,
            paths: &paths,
            faultd_args: &faultd_args,
            base: base.as_ref().map(|(path, pct)| (path.as_path(), *pct)),
            free_hints: args.free_pct.map(|_| paths.free_hints.as_path()),
            cut_after_mib: args.cut_after_mib,
        };
        hand_over_postcopy(&handover, &mut source, &mut dest_cmd)?
    };
    let (resumed, during, after) = follow_destination(&mut h.dest, args.after_ms)?;
    h.dest.send("stop")?;
    let dest_status = h.dest.wait()?;
    let faultd_status = h.faultd.wait()?;
    let pagesrv_status = h.pagesrv.wait()?;
    // The paused source VM lives until pagesrv lets it go.
    let source_status = source.wait()?;
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
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&paths.faultd_stats)?)?;
    let timeline = Timeline {
        first_touching,
        warm,
        start: h.start,
        paused: h.paused,
        resumed,
        during,
        after,
        pagesrv_events: h
            .pagesrv_events
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default(),
    };
    let labels = Labels {
        workload: &workload,
        strategy: &strategy,
        mode: &mode_name,
    };
    // The guest's free pages (as it paused) are zero at the destination.
    let free = match args.free_pct {
        Some(pct) => Some(bench::guest::free_page_bitmap(
            &std::fs::File::open(mem)?,
            args.size_mib << 20,
            u64::from(pct),
        )?),
        None => None,
    };
    let digest = file_digest(mem, free.as_deref(), args.page_size.bytes() as usize)?;
    let summary = summary::summarize(args, &labels, &timeline, stats, digest);
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

/// Starts the source VMM and lets its guest fill RAM and run for the warm-up; returns it
/// with the guest's first report while touching pages and its last one before the handover.
fn boot_source(
    args: &MigrateArgs,
    mem: &Path,
    paths: &Paths,
    workload: &str,
) -> Result<(Vmm, Value, Value)> {
    let mut cmd = Command::new(sibling("vmm")?);
    cmd.arg("source")
        .arg("--mem-file")
        .arg(mem)
        .args([
            "--size-mib",
            &args.size_mib.to_string(),
            "--workload",
            workload,
            "--vcpus",
            &args.vcpus.to_string(),
        ])
        .arg("--state-file")
        .arg(&paths.state);
    if args.strategy != Strategy::Postcopy {
        cmd.arg("--pagesrv-uds").arg(&paths.pagesrv_vmm_uds);
    }
    if let Some(rate) = args.dirty_rate {
        cmd.args(["--dirty-rate", &rate.to_string()]);
    }
    if let Some(pct) = args.free_pct {
        cmd.args(["--free-pct", &pct.to_string()]);
        if args.strategy == Strategy::Postcopy {
            cmd.arg("--free-out").arg(&paths.free_hints);
        }
    }
    let mut source = Vmm::spawn(&mut cmd)?;
    let data_pages = ((args.size_mib << 20) - bench::guest::DATA_START_GPA) >> 12;
    let first_touching = loop {
        let e = source.next(STEP_LIMIT)?;
        if counter(&e, "phase") == 1 {
            break e;
        }
        let filled = counter(&e, "filled");
        progress(&format!(
            "source guest filling RAM: {}%",
            filled * 100 / data_pages.max(1)
        ));
    };
    let mut last = first_touching.clone();
    while t_us(&last) < t_us(&first_touching) + args.warmup_ms * 1000 {
        last = source.next(STEP_LIMIT)?;
    }
    Ok((source, first_touching, last))
}

/// Where `--base-similarity` puts the base image: beside the guest's RAM file.
fn base_image_path(mem: &Path) -> PathBuf {
    mem.with_extension("base.mem")
}

/// Creates the base image file at `base` with room for `size` bytes, allocated now (before
/// the migration starts, like the destination's RAM), so that [`write_base_image`] only
/// copies.
fn allocate_base_image(base: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::create(base).with_context(|| format!("cannot create {}", base.display()))?;
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        i64::try_from(size)?,
    )
    .with_context(|| format!("cannot allocate {}", base.display()))?;
    Ok(())
}

/// Copies the guest's RAM file to `base`, changing one byte of every page not among the
/// `pct` % kept (chosen by a hash of the page index, so they are spread out). The guest
/// runs meanwhile, so the copy is kept short: `base` is allocated ahead
/// ([`allocate_base_image`]) and only written here. Prints how long it took.
fn write_base_image(mem: &Path, base: &Path, pct: u8) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let started = std::time::Instant::now();
    let from = std::fs::File::open(mem)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .with_context(|| format!("cannot open {}", base.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut offset, mut page) = (0u64, 0u64);
    loop {
        let mut n = 0;
        while n < buf.len() {
            match from.read_at(&mut buf[n..], offset + n as u64)? {
                0 => break,
                got => n += got,
            }
        }
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks_mut(4096) {
            if page.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 100 >= u64::from(pct) {
                chunk[0] ^= 0x5A;
            }
            page += 1;
        }
        to.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
    }
    to.set_len(offset)?;
    progress(&format!(
        "base image ({pct}% of the pages as they are now) written in {:.0} ms\n",
        started.elapsed().as_secs_f64() * 1000.0
    ));
    Ok(())
}
