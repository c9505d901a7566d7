//! `vmm source`: the guest booted in RAM backed by a file; paused for pagesrv, or handed
//! over running (`--pagesrv-uds`) and kept until pagesrv's outcome.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bench::guest::{GuestParams, Workload};
use bench::kvm_vm::{KvmVm, RunExit, Vcpu};
use common::source_link::Outcome;

use crate::vcpus::{Secondaries, install_stop_signal, interrupt_vcpu};
use crate::{emit, now_us, report, stdin_lines};

#[derive(Debug, clap::Args)]
pub(crate) struct SourceArgs {
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

pub(crate) fn run_source(a: SourceArgs) -> Result<()> {
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
pub(crate) enum LinkEnd {
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
pub(crate) fn join_link(
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
pub(crate) enum Operator {
    Resume,
    Release,
}

pub(crate) fn wait_for_operator(commands: &mpsc::Receiver<Option<String>>) -> Option<Operator> {
    loop {
        match commands.recv().ok()?.as_deref()? {
            "resume" => return Some(Operator::Resume),
            "release" => return Some(Operator::Release),
            _ => {}
        }
    }
}

/// What the pagesrv link thread needs.
pub(crate) struct Handover {
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
pub(crate) fn serve_pagesrv(h: Handover) -> Result<LinkEnd> {
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
