//! `vmm dest`: guest RAM in a memfd registered with a userfaultfd, handed to faultd;
//! the vCPUs run at once while faultd fills RAM in.

use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bench::guest::PageSize;
use bench::kvm_vm::{KvmVm, RunExit, VcpuState};
use common::uffd::{MODE_MINOR, MODE_MISSING, Uffd};

use crate::vcpus::{Secondaries, install_stop_signal, interrupt_vcpu};
use crate::{Mode, emit, now_us, report, watch_stdin};

/// Whether the mapping at `addr` is still registered with a userfaultfd (smaps flags `um`,
/// `ui`): after faultd completes it has unregistered our RAM.
pub(crate) fn still_registered(addr: u64) -> bool {
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

pub(crate) fn create_memfd(size_bytes: u64, page_size: PageSize) -> Result<std::fs::File> {
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
pub(crate) fn watch_faultd(
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

/// Connects to faultd's socket; a destination prepared ahead (`waits`) waits for it to
/// appear (faultd starts once the migration does).
fn connect_faultd(uds: &std::path::Path, waits: bool) -> Result<UnixStream> {
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match UnixStream::connect(uds) {
            Ok(sock) => return Ok(sock),
            Err(e)
                if waits
                    && std::time::Instant::now() < limit
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot reach faultd at {}", uds.display()));
            }
        }
    }
}

pub(crate) fn run_dest(
    uds: PathBuf,
    (size_mib, page_size): (u64, PageSize),
    (state_file, vcpus): (PathBuf, u64),
    mode: Mode,
    (wait_switch, prealloc): (Option<PathBuf>, bool),
) -> Result<()> {
    let size_bytes = size_mib << 20;
    let memfd = create_memfd(size_bytes, page_size)?;
    // Huge pages are placed by UFFDIO_COPY, which needs them absent: only shmem is
    // allocated ahead (the bench warms the huge page pool instead).
    if prealloc && matches!(page_size, PageSize::Small) {
        let began = std::time::Instant::now();
        nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&memfd),
            nix::fcntl::FallocateFlags::empty(),
            0,
            i64::try_from(size_bytes)?,
        )
        .context("cannot allocate guest RAM (--prealloc)")?;
        emit(serde_json::json!({
            "event": "allocated",
            "ms": began.elapsed().as_secs_f64() * 1000.0,
        }));
    } else if prealloc {
        emit(serde_json::json!({"event": "allocated", "ms": 0.0}));
    }
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
    let sock = connect_faultd(&uds, prealloc)?;
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
