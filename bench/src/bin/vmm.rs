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

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bench::guest::{Counters, GuestParams, PageSize, Workload};
use bench::kvm_vm::{KvmVm, RunExit, Vcpu, VcpuState};
use clap::{Parser, Subcommand, ValueEnum};
use common::source_link::Outcome;
use common::uffd::{MODE_MINOR, MODE_MISSING, Uffd};

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

#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// Guest RAM file (created or truncated), e.g. /dev/shm/vm1.
    #[arg(long)]
    mem_file: PathBuf,
    /// Guest RAM in MiB (multiple of 2, at least 4).
    #[arg(long)]
    size_mib: u64,
    /// Where to write the saved vCPUs.
    #[arg(long)]
    state_file: PathBuf,
    /// vCPUs: each patterns, touches and verifies its own share of the data pages.
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// The guest's access pattern.
    #[arg(long, value_enum, default_value = "random")]
    workload: Workload,
    /// Pattern seed.
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// The guest rewrites one touched page in 2^N.
    #[arg(long, default_value_t = 4)]
    write_shift: u64,
    /// Instead: the guest rewrites the page it touches this many times per second at most
    /// (a dirty rate in pages/s, independent of how fast it touches).
    #[arg(long, value_name = "PAGES_PER_S")]
    dirty_rate: Option<u64>,
    /// Percent of its data pages the guest leaves free (old bytes, never touched); their list
    /// goes to pagesrv at the pause (`free` on the link, or `--free-out`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=90))]
    free_pct: u64,
    /// At the pause, write the free pages as pagesrv's `--free-pages` bitmap here.
    #[arg(long, value_name = "FILE")]
    free_out: Option<PathBuf>,
    /// pagesrv's `--vmm-uds`: on `migrate`, hand the running guest's RAM to pagesrv
    /// (precopy); pagesrv then pauses the guest.
    #[arg(long, value_name = "PATH")]
    pagesrv_uds: Option<PathBuf>,
}

fn run_source(a: SourceArgs) -> Result<()> {
    let size_bytes = a.size_mib << 20;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.mem_file)
        .with_context(|| format!("cannot create {}", a.mem_file.display()))?;
    file.set_len(size_bytes)?;
    let ram_for_pagesrv = file.try_clone()?;
    bench::guest::check_vcpus(a.vcpus, a.free_pct)?;
    let mut vm = KvmVm::create_with(file, size_bytes, a.pagesrv_uds.is_some(), a.vcpus)?;
    let tsc_per_us = vm.tsc_per_us();
    vm.boot(&GuestParams {
        size_bytes,
        seed: a.seed,
        workload: a.workload,
        write_shift: a.write_shift,
        write_interval_tsc: a
            .dirty_rate
            .map_or(0, |rate| (tsc_per_us * 1e6 / rate.max(1) as f64) as u64),
        free_pct: a.free_pct,
        report_interval_tsc: (50_000.0 * tsc_per_us) as u64,
        stall_tsc: (10.0 * tsc_per_us) as u64,
        vcpus: a.vcpus,
    })?;
    install_stop_signal();
    let mut vcpus = vm.take_vcpus();
    let mut first = vcpus.remove(0);
    let mut others = Secondaries::start(vcpus);
    let commands = stdin_lines();
    let pause = Arc::new(AtomicBool::new(false));
    let mut link: Option<std::thread::JoinHandle<Result<LinkEnd>>> = None;
    let mut saved_tx: Option<mpsc::Sender<()>> = None;
    loop {
        if first.run_until_report()? == RunExit::Report {
            let counters = vm.counters()?;
            report(&counters, tsc_per_us);
            let c = counters.0;
            if c.mismatches > 0 {
                bail!(
                    "the guest found {} wrong pages on the source (last: page {})",
                    c.mismatches,
                    c.bad_page
                );
            }
        }
        others.check()?;
        if link.as_ref().is_some_and(|l| l.is_finished()) && !pause.load(Ordering::Acquire) {
            // The link ended while the guest runs (precopy failed): it goes on here.
            let end = join_link(link.take(), saved_tx.take())?;
            emit(
                serde_json::json!({"event": "migration-ended", "t_us": now_us(), "end": end.describe()}),
            );
        }
        while let Ok(line) = commands.try_recv() {
            match (line.as_deref(), &a.pagesrv_uds) {
                (Some("migrate"), Some(uds)) if link.is_none() => {
                    let (tx, rx) = mpsc::channel();
                    saved_tx = Some(tx);
                    let handover = Handover {
                        uds: uds.clone(),
                        ram: ram_for_pagesrv.try_clone()?,
                        size_bytes,
                        free_pct: a.free_pct,
                        dirty: vm.dirty_log(),
                        pause: pause.clone(),
                        saved: rx,
                    };
                    link = Some(std::thread::spawn(move || serve_pagesrv(handover)));
                }
                (Some("pause") | None, _) => pause.store(true, Ordering::Release),
                _ => {}
            }
        }
        if pause.load(Ordering::Acquire) {
            let stopped_us = now_us();
            let mut all = vec![first];
            all.extend(others.stop()?);
            let state = all.iter().map(Vcpu::save).collect::<Result<Vec<_>, _>>()?;
            std::fs::write(&a.state_file, serde_json::to_vec(&state)?)
                .with_context(|| format!("cannot write {}", a.state_file.display()))?;
            if let Some(path) = &a.free_out {
                let bitmap =
                    bench::guest::free_page_bitmap(&ram_for_pagesrv, size_bytes, a.free_pct)
                        .context("cannot read the guest's free bitmap")?;
                std::fs::write(path, bitmap)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            // The guest keeps its counters in its RAM: as they were when it stopped.
            let (c, vcpu_touches) = vm.counters()?;
            emit(serde_json::json!({
                "event": "paused",
                "t_us": stopped_us,
                "tsc_per_us": tsc_per_us,
                "counters": c,
                "vcpu_touches": vcpu_touches,
                "hist": c.hist.to_vec(),
            }));
            if link.is_none() {
                // Paused by a command (postcopy from the RAM file): pagesrv serves the file.
                return Ok(());
            }
            // Handed to pagesrv: the paused guest is kept until the migration's outcome.
            let end = join_link(link.take(), saved_tx.take())?;
            emit(serde_json::json!({"event": "outcome", "t_us": now_us(), "end": end.describe()}));
            match end {
                LinkEnd::Outcome(Outcome::Completed { verified: true }) => return Ok(()),
                LinkEnd::Outcome(Outcome::Failed { .. }) => {}
                LinkEnd::Outcome(Outcome::Completed { verified: false }) | LinkEnd::Lost => {
                    // pagesrv crashed or was killed (the destination may run the guest), or
                    // nothing proves the destination holds every page right (faultd
                    // --no-verify): neither resume nor let go without an operator.
                    eprintln!(
                        "vmm: the migration ended without a verified outcome; the guest stays paused (RAM in {}, vCPUs in {}): `resume` or `release` on stdin",
                        a.mem_file.display(),
                        a.state_file.display()
                    );
                    match wait_for_operator(&commands) {
                        Some(Operator::Resume) => {}
                        Some(Operator::Release) => return Ok(()),
                        None => bail!("stdin closed while the guest was kept paused"),
                    }
                }
            }
            // The destination does not hold the VM: the guest runs on here.
            pause.store(false, Ordering::Release);
            first = all.remove(0);
            others = Secondaries::start(all);
            emit(serde_json::json!({"event": "resumed", "t_us": now_us()}));
        }
    }
}

/// How the link to pagesrv ended.
#[derive(Debug)]
enum LinkEnd {
    /// pagesrv said how the migration ended.
    Outcome(Outcome),
    /// pagesrv closed the link without an outcome (it crashed or was killed).
    Lost,
}

impl LinkEnd {
    fn describe(&self) -> serde_json::Value {
        match self {
            LinkEnd::Outcome(Outcome::Completed { verified }) => {
                serde_json::json!({"outcome": "completed", "verified": verified})
            }
            LinkEnd::Outcome(Outcome::Failed { reason }) => {
                serde_json::json!({"outcome": "failed", "reason": reason})
            }
            LinkEnd::Lost => serde_json::json!({"outcome": null}),
        }
    }
}

/// Lets the link thread go on past the pause (the vCPUs are saved) and waits for it.
fn join_link(
    link: Option<std::thread::JoinHandle<Result<LinkEnd>>>,
    saved: Option<mpsc::Sender<()>>,
) -> Result<LinkEnd> {
    if let Some(saved) = saved {
        let _ = saved.send(());
    }
    link.context("no link to pagesrv")?
        .join()
        .map_err(|_| anyhow::anyhow!("the pagesrv link thread panicked"))?
}

/// What an operator decides for a guest kept paused.
enum Operator {
    Resume,
    Release,
}

fn wait_for_operator(commands: &mpsc::Receiver<Option<String>>) -> Option<Operator> {
    loop {
        match commands.recv().ok()?.as_deref()? {
            "resume" => return Some(Operator::Resume),
            "release" => return Some(Operator::Release),
            _ => {}
        }
    }
}

/// What the pagesrv link thread needs.
struct Handover {
    uds: PathBuf,
    ram: std::fs::File,
    size_bytes: u64,
    free_pct: u64,
    dirty: bench::kvm_vm::DirtyLog,
    pause: Arc<AtomicBool>,
    saved: mpsc::Receiver<()>,
}

/// Hands the running guest's RAM to pagesrv and answers its requests: dirty bitmaps from
/// KVM's log; `pause` stops the vCPU (a signal makes KVM_RUN return), waits until it is
/// saved, and answers with the last bitmap; then free pages, until the outcome.
fn serve_pagesrv(h: Handover) -> Result<LinkEnd> {
    use common::source_link::{
        CommandKind, FromPagesrv, SOURCE_LINK_VERSION, SourceHello, SourceVmmClient,
    };
    let hello = SourceHello {
        version: SOURCE_LINK_VERSION,
        size_bytes: h.size_bytes,
        page_size: 4096,
        free_hints: h.free_pct > 0,
    };
    let mut link = SourceVmmClient::connect(&h.uds, &hello, h.ram.as_fd())
        .with_context(|| format!("cannot reach pagesrv at {}", h.uds.display()))?;
    emit(serde_json::json!({"event": "migrating", "t_us": now_us()}));
    let mut paused = false;
    // Whatever goes wrong on the link (pagesrv died mid-line, a malformed line) is a link
    // that ended without an outcome: the guest is kept, never let go.
    let lost = |e: &dyn std::fmt::Display| {
        eprintln!("vmm: the link to pagesrv failed: {e}");
        Ok(LinkEnd::Lost)
    };
    loop {
        let message = match link.next_message() {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(LinkEnd::Lost),
            Err(e) => return lost(&e),
        };
        let cmd = match message {
            FromPagesrv::Outcome(outcome) => {
                // Acted on even if the acknowledgement does not get through.
                let _ = link.ack_outcome();
                return Ok(LinkEnd::Outcome(outcome));
            }
            FromPagesrv::Command(cmd) => cmd,
        };
        let answered = match cmd {
            CommandKind::Free => link.send_bitmap(
                CommandKind::Free,
                &bench::guest::free_page_bitmap(&h.ram, h.size_bytes, h.free_pct)?,
            ),
            CommandKind::Dirty | CommandKind::Pause if paused => {
                return lost(&format!("pagesrv asked for {cmd:?} after the pause"));
            }
            CommandKind::Dirty => link.send_bitmap(CommandKind::Dirty, &h.dirty.take()?),
            CommandKind::Pause => {
                h.pause.store(true, Ordering::Release);
                // Again until it stopped: a signal that lands outside KVM_RUN is lost.
                loop {
                    interrupt_vcpu();
                    match h.saved.recv_timeout(Duration::from_millis(1)) {
                        Ok(()) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            bail!("the vCPU thread ended before it was saved")
                        }
                    }
                }
                // The paused VM is kept until pagesrv says how the migration ended: the
                // source resumes it if the destination failed.
                paused = true;
                link.send_bitmap(CommandKind::Pause, &h.dirty.take()?)
            }
        };
        if let Err(e) = answered {
            return lost(&e);
        }
    }
}

/// The running vCPU threads, for signals that make a blocked KVM_RUN return. A thread is
/// taken off before it ends (under this lock), so no signal goes to a thread that is gone.
static VCPU_THREADS: std::sync::Mutex<Vec<libc::pthread_t>> = std::sync::Mutex::new(Vec::new());

/// Installs a SIGUSR1 handler that does nothing (without SA_RESTART, so the signal makes a
/// blocked KVM_RUN return EINTR instead of killing the process) and registers the calling
/// thread as a vCPU thread.
fn install_stop_signal() {
    // SAFETY: installs a handler that does nothing; `action` is fully initialised.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop_signal as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
    register_vcpu_thread();
}

fn register_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(me);
}

fn unregister_vcpu_thread() {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&t| t != me);
}

/// Makes every vCPU thread's KVM_RUN return now.
fn interrupt_vcpu() {
    for &thread in VCPU_THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        // SAFETY: a registered thread is alive (it unregisters under this lock before it
        // ends) and handles SIGUSR1 with a no-op handler.
        unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
    }
}

/// Keeps the calling thread registered as a vCPU thread until dropped (also when the thread
/// panics).
struct Registered;

impl Registered {
    fn new() -> Self {
        register_vcpu_thread();
        Registered
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        unregister_vcpu_thread();
    }
}

/// vCPUs 1.. on threads of their own: they run until [`Secondaries::stop`] (or the drop:
/// declared after the VM and the uffd, they stop before either goes), reporting into guest
/// RAM (vCPU 0's thread reads every vCPU's counters when it reports).
struct Secondaries {
    stop: Arc<AtomicBool>,
    threads: Vec<(u64, std::thread::JoinHandle<Result<Vcpu>>)>,
}

impl Secondaries {
    fn start(vcpus: Vec<Vcpu>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vcpus
            .into_iter()
            .zip(1..)
            .map(|(mut vcpu, index)| {
                let stop = stop.clone();
                let thread = std::thread::spawn(move || {
                    let _registered = Registered::new();
                    while !stop.load(Ordering::Acquire) {
                        vcpu.run_until_report()?;
                    }
                    Ok(vcpu)
                });
                (index, thread)
            })
            .collect();
        Secondaries { stop, threads }
    }

    /// Fails if a vCPU thread ended by itself (its vCPU failed).
    fn check(&mut self) -> Result<()> {
        if let Some(i) = self.threads.iter().position(|(_, t)| t.is_finished()) {
            let (index, failed) = self.threads.remove(i);
            return match failed.join() {
                Ok(Err(e)) => Err(e.context(format!("vCPU {index}"))),
                Ok(Ok(_)) => bail!("vCPU {index} stopped"),
                Err(_) => bail!("vCPU {index} panicked"),
            };
        }
        Ok(())
    }

    /// Stops every vCPU (a signal each, again until they stopped: one that lands outside
    /// KVM_RUN is lost) and returns them in order.
    fn stop(mut self) -> Result<Vec<Vcpu>> {
        self.halt();
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|(index, t)| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("vCPU {index} panicked"))?
                    .with_context(|| format!("vCPU {index}"))
            })
            .collect()
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        while !self.threads.iter().all(|(_, t)| t.is_finished()) {
            interrupt_vcpu();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Secondaries {
    fn drop(&mut self) {
        // An early return: the vCPUs must not run on after guest RAM and the uffd are gone.
        self.halt();
        for (_, t) in self.threads.drain(..) {
            let _ = t.join();
        }
    }
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

/// Whether the mapping at `addr` is still registered with a userfaultfd (smaps flags `um`,
/// `ui`): after faultd completes it has unregistered our RAM.
fn still_registered(addr: u64) -> bool {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return true;
    };
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if inside {
                return flags.split_whitespace().any(|f| f == "um" || f == "ui");
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
        }
    }
    false
}

extern "C" fn on_stop_signal(_: libc::c_int) {}

fn create_memfd(size_bytes: u64, page_size: PageSize) -> Result<std::fs::File> {
    let flags = match page_size {
        PageSize::Small => libc::MFD_CLOEXEC,
        PageSize::Huge => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
    };
    // SAFETY: creates a new anonymous file; the name is a valid C string.
    let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "memfd_create failed{}",
                if page_size == PageSize::Huge {
                    " (no 2 MiB huge pages reserved?)"
                } else {
                    ""
                }
            )
        });
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(size_bytes)?;
    Ok(file)
}

/// Watches faultd's socket: at EOF, reports completion, or (RAM still registered: faultd
/// died) sets `failed` and signals the vCPU thread until it has stopped.
fn watch_faultd(
    mut sock: UnixStream,
    base: u64,
    failed: Arc<AtomicBool>,
    vcpu_done: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
        if !still_registered(base) {
            emit(serde_json::json!({"event": "complete", "t_us": now_us()}));
            return;
        }
        failed.store(true, Ordering::Release);
        while !vcpu_done.load(Ordering::Acquire) {
            interrupt_vcpu();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

fn run_dest(
    uds: PathBuf,
    (size_mib, page_size): (u64, PageSize),
    (state_file, vcpus): (PathBuf, u64),
    mode: Mode,
    wait_switch: Option<PathBuf>,
) -> Result<()> {
    let size_bytes = size_mib << 20;
    let memfd = create_memfd(size_bytes, page_size)?;
    let memfd_for_faultd = memfd.try_clone()?;
    let mut vm = KvmVm::create(memfd, size_bytes, vcpus)?;
    let base = vm.host_base();
    let minor_feature = match page_size {
        PageSize::Small => common::uffd::FEATURE_MINOR_SHMEM,
        PageSize::Huge => common::uffd::FEATURE_MINOR_HUGETLBFS,
    };
    let (features, reg_mode) = match mode {
        Mode::Copy => (common::uffd::FEATURES_FOR_VMM, MODE_MISSING),
        Mode::Minor => (
            common::uffd::FEATURES_FOR_VMM | minor_feature,
            MODE_MISSING | MODE_MINOR,
        ),
    };
    let uffd = Uffd::create(features).context("cannot create the userfaultfd")?;
    uffd.register(base, size_bytes, reg_mode)?;
    let sock = UnixStream::connect(&uds)
        .with_context(|| format!("cannot reach faultd at {}", uds.display()))?;
    let page = page_size.bytes();
    let layout = format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size_bytes},"offset":0,"page_size":{page},"page_size_kib":{page}}}]"#
    );
    common::vmm_link::send_handshake(
        &sock,
        layout.as_bytes(),
        &[uffd.as_fd(), memfd_for_faultd.as_fd()],
    )?;
    if let Some(control) = &wait_switch {
        // Precopy: the source still runs; resume when faultd says the switch happened.
        let mut client = common::control::ControlClient::connect(control).with_context(|| {
            format!("cannot reach faultd's control socket {}", control.display())
        })?;
        let event = client
            .wait_for(|e| e["event"] == "switched" || e["event"] == "failed")?
            .context("faultd closed its control socket before the switch")?;
        if event["event"] == "failed" {
            bail!("faultd failed before the switch: {event}");
        }
    }
    // The source saved the vCPUs when it paused, before the switch.
    let states: Vec<VcpuState> = serde_json::from_slice(
        &std::fs::read(&state_file)
            .with_context(|| format!("cannot read {}", state_file.display()))?,
    )?;
    if states.len() as u64 != vcpus {
        bail!(
            "{} holds {} saved vCPUs; this VM has {vcpus} (--vcpus)",
            state_file.display(),
            states.len()
        );
    }
    let mut vcpus = vm.take_vcpus();
    for (vcpu, state) in vcpus.iter_mut().zip(&states) {
        vcpu.restore(state)?;
    }
    let tsc_per_us = vm.tsc_per_us();
    install_stop_signal();
    let mut first = vcpus.remove(0);
    let mut others = Secondaries::start(vcpus);
    let failed = Arc::new(AtomicBool::new(false));
    let vcpu_done = Arc::new(AtomicBool::new(false));
    // Said before the watcher starts: faultd may be done already (stop-and-copy precopy), and
    // `complete` must not come before `resumed`.
    emit(serde_json::json!({"event": "resumed", "t_us": now_us()}));
    watch_faultd(sock.try_clone()?, base, failed.clone(), vcpu_done.clone());
    let stop = watch_stdin("stop");
    let result = loop {
        if failed.load(Ordering::Acquire) {
            break Err(anyhow::anyhow!(
                "faultd closed its socket before every page was present; vCPU stopped"
            ));
        }
        match first.run_until_report() {
            Ok(RunExit::Report) => match vm.counters() {
                Ok(c) => report(&c, tsc_per_us),
                Err(e) => break Err(e.into()),
            },
            Ok(RunExit::Interrupted) => {}
            Err(e) => break Err(e.into()),
        }
        if let Err(e) = others.check() {
            break Err(e);
        }
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
    };
    // Every vCPU stops before the uffd closes (below).
    let stopped = others.stop();
    vcpu_done.store(true, Ordering::Release);
    let result = result.and(stopped.map(drop));
    // The uffd stays open until the vCPU has stopped: closing it earlier would let the
    // guest read silent zero pages.
    drop(uffd);
    drop(sock);
    result
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
        } => run_dest(
            uds,
            (size_mib, page_size),
            (state_file, vcpus),
            mode,
            wait_switch,
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
