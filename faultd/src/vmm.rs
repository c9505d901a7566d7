//! Accepting the VMM: the Unix socket, Firecracker's handshake (regions, uffd, optional
//! memfd), and the checks made before any memory is allocated for it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::uffd::Uffd;
use common::vmm_link::receive_handshake;
use tracing::info;

use crate::core::guest_file::GuestFile;
use crate::core::kernel::UffdKernel;

/// How long a connected VMM may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How pages are placed (`--placement`): not to be confused with a placement's result
/// (`uffd::Placement`, `kernel::Installed`, `vm::Placed`, `push::Pushed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaceMode {
    /// UFFDIO_COPY.
    Copy,
    /// Write into the VMM's memfd and map with UFFDIO_CONTINUE.
    Memfd,
}

/// Listens on `path` (mode 0600), replacing a stale socket; never another kind of file or a
/// socket another process listens on.
///
/// # Errors
/// The path is taken, or binding failed.
pub fn bind_uds(path: &Path) -> Result<UnixListener> {
    Ok(common::uds::bind_private(path)?)
}

/// Accepts one VMM and checks its guest fits this host: every page will be present at the
/// end, so guest RAM larger than this host's memory and swap cannot be migrated here.
///
/// # Errors
/// A failed accept, a malformed handshake, or a guest too large for this host.
pub fn accept_vmm(
    listener: &UnixListener,
    placement: PlaceMode,
    shared_ram: bool,
) -> Result<(UnixStream, UffdKernel)> {
    let (vmm, _) = listener.accept().context("failed to accept the VMM")?;
    vmm.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let handshake = receive_handshake(&vmm).context("malformed VMM handshake")?;
    vmm.set_read_timeout(None)?;
    let layout = handshake.layout;
    info!(
        pid = handshake.peer_pid,
        regions = layout.regions().len(),
        pages = layout.total_pages(),
        page_size = layout.page_size(),
        memfd = handshake.memfd.is_some(),
        "VMM connected"
    );
    if let Some(limit) = host_memory_bytes()
        && layout.total_bytes() > limit
    {
        bail!(
            "the VMM declares {} MiB of guest RAM, more than this host's memory and swap ({} MiB)",
            layout.total_bytes() >> 20,
            limit >> 20
        );
    }
    let memfd = match (placement, handshake.memfd) {
        (PlaceMode::Memfd, Some(fd)) if shared_ram => {
            let file = std::fs::File::from(fd);
            check_shared_ram(&file, &layout, handshake.peer_pid)?;
            Some(
                GuestFile::new(file, layout.total_bytes(), layout.page_size(), true)
                    .context("memfd placement")?,
            )
        }
        (_, _) if shared_ram => {
            bail!("--shared-ram needs --placement memfd and a VMM that passes its guest RAM file")
        }
        (PlaceMode::Memfd, Some(fd)) => {
            let file = std::fs::File::from(fd);
            let large = (layout.page_size() == 4096)
                .then(|| crate::core::shared_ram::writes_may_use_large_pages(&file))
                .flatten();
            if let Some(why) = large {
                // UFFDIO_COPY places a 4 KiB page of its own.
                info!(%why, "the VMM's guest RAM file may put a write into a larger page (its other parts zero and present: the guest would read them without a fault): placing pages with UFFDIO_COPY");
                None
            } else {
                if layout.page_size() > 4096 {
                    info!(
                        "hugetlbfs memory: pages are placed with UFFDIO_COPY, the memfd is written in place only for precopy's patches"
                    );
                }
                Some(
                    GuestFile::new(file, layout.total_bytes(), layout.page_size(), false)
                        .context("memfd placement")?,
                )
            }
        }
        (PlaceMode::Memfd, None) => {
            info!("the VMM passed no memfd: placing pages with UFFDIO_COPY");
            None
        }
        (PlaceMode::Copy, _) => None,
    };
    let (uffd, was_blocking) = Uffd::adopt(handshake.uffd)?;
    if was_blocking {
        info!("the VMM's userfaultfd was blocking: made non-blocking (faultd never waits on it)");
    }
    Ok((vmm, UffdKernel::new(layout, uffd, memfd)))
}

/// `--shared-ram`: the VMM's file can be shared safely (a tmpfs file linked in a directory,
/// 4 KiB pages, no large pages for writes) and the VMM maps it private.
fn check_shared_ram(file: &std::fs::File, layout: &common::layout::Layout, pid: i32) -> Result<()> {
    use crate::core::shared_ram::{self, SharedRamError};
    if !shared_ram::is_linked(file).context("cannot examine the VMM's guest RAM file")? {
        return Err(SharedRamError::NotLinked.into());
    }
    shared_ram::check_host(file, layout.page_size())?;
    let ranges: Vec<(u64, u64)> = layout
        .regions()
        .iter()
        .map(|r| (r.host_base.0, r.size_bytes))
        .collect();
    shared_ram::check_private(pid, &ranges)?;
    Ok(())
}

/// Reads what the VMM's socket (non-blocking) holds: the VMM sends nothing after its
/// handshake, so only its end matters. Returns whether it closed; an error if it closed
/// while the guest still depends on faultd (`serving`).
///
/// # Errors
/// The VMM went away mid-migration, or its socket failed.
pub fn read_vmm_socket(vmm: &UnixStream, serving: bool) -> Result<bool> {
    use std::io::{ErrorKind, Read};
    let mut buf = [0u8; 256];
    loop {
        match (&*vmm).read(&mut buf) {
            Ok(0) if serving => bail!("the VMM closed its socket before the migration completed"),
            Ok(0) => return Ok(true),
            Ok(n) => tracing::warn!(bytes = n, "ignoring unexpected bytes from the VMM"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("the VMM's socket failed"),
        }
    }
}

/// This host's memory plus swap (`/proc/meminfo`), if it can be read.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) << 10)
}
