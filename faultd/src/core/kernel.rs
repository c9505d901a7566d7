//! The kernel operations the fault core needs, in page-index terms, behind a trait: reading
//! the VMM's userfaultfd events, placing pages, waking waiting threads. [`UffdKernel`] is the
//! real one (the VMM's uffd and region layout, and its memfd for memfd placement); the unit
//! tests of the core use a fake that injects EAGAIN, EEXIST and REMOVE events.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::guest_file::GuestFile;
use super::shared_ram::{self, SharedRamError};
use common::layout::{HostAddr, Layout};
use common::uffd::{Event, Placement, Uffd, UffdError};

/// A uffd event in page terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// A thread touched a missing page (or, `minor`, a page in the page cache not yet
    /// mapped).
    Fault {
        /// The page.
        page: u64,
        /// A MINOR fault.
        minor: bool,
        /// The faulting thread.
        thread_id: u32,
    },
    /// The VMM removed (balloon, `madvise(DONTNEED)`) or unmapped these pages: they read as
    /// zero from now on.
    Removed {
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
    },
    /// A fault at an address no region declares.
    Outside {
        /// The address.
        addr: u64,
    },
    /// The VMM moved guest memory (mremap), which faultd cannot follow.
    Remapped {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Another event (fork, unknown kinds): logged and ignored.
    Other(&'static str),
}

/// What one placement call achieved on a run of pages starting at `first`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Pages from the start of the run that are present now.
    pub present_pages: u64,
    /// Of those, the pages whose bytes did not come from this call (`EEXIST`: another
    /// placement won the race, and its bytes are the ones that landed).
    pub existing: Vec<u64>,
    /// The mapping is changing (`EAGAIN`: a REMOVE/UNMAP event is unread): read the events,
    /// then place the rest of the run.
    pub again: bool,
}

impl Installed {
    /// Every page of a `count`-page run is present.
    pub fn all(count: u64) -> Self {
        Installed {
            present_pages: count,
            ..Installed::default()
        }
    }
}

/// Page placement and events, as the fault core sees them.
pub trait Kernel: Sync {
    /// Page size in bytes.
    fn page_size(&self) -> u64;
    /// Pages of guest RAM.
    fn total_pages(&self) -> u64;
    /// Appends every pending event to `out` without blocking.
    ///
    /// # Errors
    /// The uffd failed (the VMM is gone).
    fn read_events(&self, out: &mut Vec<VmEvent>) -> Result<(), UffdError>;
    /// Places `data` (whole pages) at pages `first..`, waking their waiters.
    ///
    /// # Errors
    /// The VMM is gone or the kernel refused the placement.
    fn install(&self, first: u64, data: &[u8]) -> Result<Installed, UffdError>;
    /// Places zero pages at `first..first+count`, waking their waiters.
    ///
    /// # Errors
    /// As [`Kernel::install`].
    fn install_zero(&self, first: u64, count: u64) -> Result<Installed, UffdError>;
    /// Maps a page that is in the page cache but not mapped (a MINOR fault).
    ///
    /// # Errors
    /// As [`Kernel::install`].
    fn map_cached(&self, page: u64) -> Result<Installed, UffdError>;
    /// Wakes threads waiting on pages `first..first+count`.
    ///
    /// # Errors
    /// The VMM is gone.
    fn wake(&self, first: u64, count: u64) -> Result<(), UffdError>;
    /// Whether placement writes a shared page cache before mapping (memfd placement): then
    /// every placement must hold the placement gate, the fault thread's too.
    fn writes_page_cache(&self) -> bool;
    /// Drops pages `first..first+count` so the next touch faults (MISSING) again.
    ///
    /// # Errors
    /// Pages cannot be dropped (no memfd) or the kernel refused.
    fn drop_pages(&self, first: u64, count: u64) -> Result<(), UffdError>;
    /// Reads `buf.len()` bytes of placed page `page` from byte `offset`.
    ///
    /// # Errors
    /// Pages cannot be read back (no memfd) or the read failed.
    fn read_in_place(&self, page: u64, offset: u64, buf: &mut [u8]) -> Result<(), UffdError>;
    /// Reads the current contents of a placed page into `buf` (one page).
    ///
    /// # Errors
    /// As [`Kernel::read_in_place`].
    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), UffdError> {
        self.read_in_place(page, 0, buf)
    }
    /// Writes `bytes` into present page `page` at byte `offset`, in place (the page stays
    /// mapped: precopy's patches, before the guest runs here).
    ///
    /// # Errors
    /// Pages cannot be written in place (no memfd) or the write failed.
    fn write_in_place(&self, page: u64, offset: u64, bytes: &[u8]) -> Result<(), UffdError>;
    /// Whether pages can be read back and dropped (memfd placement): what precopy needs.
    fn can_drop_pages(&self) -> bool;
    /// Where guest RAM is a file other VMs share (see `shared_ram`): appends the runs of
    /// the pages `pages` that are in the file (placed by any of them, this one included);
    /// `false` where RAM is not shared.
    ///
    /// # Errors
    /// The kernel refused to say.
    fn filled_runs(
        &self,
        pages: std::ops::Range<u64>,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<bool, UffdError> {
        let _ = (pages, out);
        Ok(false)
    }
    /// Every page is present: unregisters guest RAM (the VMM runs free of faultd from here;
    /// threads that raced with it are woken).
    ///
    /// # Errors
    /// The first region that could not be unregistered (the others are tried anyway).
    fn unregister_all(&self) -> Result<(), UffdError>;
}

/// The real kernel: the VMM's userfaultfd and regions.
pub struct UffdKernel {
    layout: Layout,
    uffd: Uffd,
    /// With memfd placement: the VMM's guest RAM file. Pages are written into it and mapped
    /// with UFFDIO_CONTINUE (or woken, where the VMM registered MISSING only).
    memfd: Option<GuestFile>,
    /// Set when UFFDIO_CONTINUE is refused (RAM not registered in MINOR mode).
    continue_refused: AtomicBool,
    /// Zero bytes to copy from where UFFDIO_ZEROPAGE does not exist (hugetlbfs).
    zero_source: Vec<u8>,
    /// Scratch for raw events (only the fault thread reads events).
    raw_events: Mutex<Vec<Event>>,
}

impl UffdKernel {
    /// The kernel side of a VM: pages are placed by UFFDIO_COPY, or, with `memfd`, written
    /// into the memory file and mapped in place.
    pub fn new(layout: Layout, uffd: Uffd, memfd: Option<GuestFile>) -> Self {
        let zero_source = if layout.page_size() > 4096 {
            vec![0; layout.page_size() as usize]
        } else {
            Vec::new()
        };
        UffdKernel {
            layout,
            uffd,
            memfd,
            continue_refused: AtomicBool::new(false),
            zero_source,
            raw_events: Mutex::new(Vec::with_capacity(64)),
        }
    }

    /// The VMM's regions.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The VMM's userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    fn is_hugetlb(&self) -> bool {
        self.layout.page_size() > 4096
    }

    /// The file pages are placed by writing it (then mapped with UFFDIO_CONTINUE): shmem.
    /// Huge pages are placed by UFFDIO_COPY even with a memfd: a copy through a mapping is
    /// not atomic, and where the VMM registered MISSING only a running guest would map a
    /// half-written huge page (the kernel's copy fills it before mapping it). The file is
    /// still written in place for precopy's patches, before the guest runs here.
    fn written_file(&self) -> Option<&GuestFile> {
        self.memfd.as_ref().filter(|_| !self.is_hugetlb())
    }

    /// Runs `place` on every host-contiguous piece of `first..first+count`, converting the
    /// outcome to pages; stops at the first piece that meets EAGAIN.
    fn per_piece(
        &self,
        first: u64,
        count: u64,
        mut place: impl FnMut(HostAddr, u64, u64) -> Result<Placement, UffdError>,
    ) -> Result<Installed, UffdError> {
        let page_size = self.page_size();
        let mut installed = Installed::default();
        for (addr, page, n) in self.layout.host_pieces(first, count) {
            let (placed_bytes, existing, again) = match place(addr, page, n)? {
                Placement::Done { existing } => (n * page_size, existing, false),
                Placement::Again {
                    placed_bytes,
                    existing,
                } => (placed_bytes, existing, true),
            };
            installed
                .existing
                .extend(existing.iter().map(|offset| page + offset / page_size));
            installed.present_pages = page - first + placed_bytes / page_size;
            if again {
                installed.again = true;
                return Ok(installed);
            }
        }
        Ok(installed)
    }

    /// Memfd placement: writes the pages into the guest RAM file (the page cache the VMM
    /// maps) with `write` (a copy through the window, or zeros), then maps them into the VMM
    /// with UFFDIO_CONTINUE (MINOR registration), or just wakes the waiters where RAM is
    /// registered MISSING only (the next touch finds the page in the page cache). The bytes
    /// land by the write, so no page counts as existing.
    fn write_and_map(
        &self,
        file: &GuestFile,
        addr: HostAddr,
        page: u64,
        len: u64,
        write: impl FnOnce(&GuestFile, u64) -> Result<(), UffdError>,
    ) -> Result<Placement, UffdError> {
        let page_size = self.page_size();
        write(file, page * page_size)?;
        file.check_intact(page * page_size, len)?;
        if !self.continue_refused.load(Ordering::Relaxed) {
            match self.uffd.continue_range(addr.0, len, page_size) {
                Err(UffdError::Place { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    self.continue_refused.store(true, Ordering::Relaxed);
                }
                Ok(Placement::Done { .. }) => return Ok(Placement::Done { existing: vec![] }),
                Ok(Placement::Again { .. }) => {
                    // The mapping is changing (an unread REMOVE), but the bytes are in the
                    // page cache already: the pages are placed. Wake the waiters; their next
                    // touch is a MINOR fault that maps the page (or, if the REMOVE punches
                    // it, a MISSING fault on a page marked zero).
                }
                Err(e) => return Err(e),
            }
        }
        self.uffd.wake(addr.0, len)?;
        Ok(Placement::Done { existing: vec![] })
    }

    /// hugetlbfs has no UFFDIO_ZEROPAGE: copy a zero page into each huge page.
    fn copy_zero_pages(&self, addr: HostAddr, pages: u64) -> Result<Placement, UffdError> {
        let page_size = self.page_size();
        let mut existing = Vec::new();
        for i in 0..pages {
            match self
                .uffd
                .copy(addr.0 + i * page_size, &self.zero_source, page_size)?
            {
                Placement::Done { existing: e } if !e.is_empty() => existing.push(i * page_size),
                Placement::Done { .. } => {}
                Placement::Again { placed_bytes, .. } => {
                    return Ok(Placement::Again {
                        placed_bytes: i * page_size + placed_bytes,
                        existing,
                    });
                }
            }
        }
        Ok(Placement::Done { existing })
    }
}

impl Kernel for UffdKernel {
    fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    fn total_pages(&self) -> u64 {
        self.layout.total_pages()
    }

    fn read_events(&self, out: &mut Vec<VmEvent>) -> Result<(), UffdError> {
        let mut raw = self.raw_events.lock().unwrap_or_else(|p| p.into_inner());
        raw.clear();
        self.uffd.read_events(&mut raw)?;
        for event in raw.drain(..) {
            match event {
                Event::PageFault {
                    addr,
                    thread_id,
                    minor,
                    ..
                } => out.push(match self.layout.locate(HostAddr(addr)) {
                    Some(page) => VmEvent::Fault {
                        page,
                        minor,
                        thread_id,
                    },
                    None => VmEvent::Outside { addr },
                }),
                // In a private mapping of a file other VMs share, a page given back reads
                // the file's page again (the template's) on its next touch: nothing placed
                // is lost, and it must not be marked zero (a zero-fill would write zeros
                // into the file every clone maps).
                Event::Remove { .. } if self.shares_ram() => {}
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    for (first, count) in self.layout.pages_in_host_range(start, end) {
                        out.push(VmEvent::Removed { first, count });
                    }
                }
                Event::Remap { from, to, len } => out.push(VmEvent::Remapped { from, to, len }),
                Event::Fork => out.push(VmEvent::Other("fork")),
                Event::Unknown(_) => out.push(VmEvent::Other("unknown")),
            }
        }
        Ok(())
    }

    fn install(&self, first: u64, data: &[u8]) -> Result<Installed, UffdError> {
        let page_size = self.page_size();
        let count = data.len() as u64 / page_size;
        self.per_piece(first, count, |addr, page, n| {
            let at = ((page - first) * page_size) as usize;
            let src = &data[at..at + (n * page_size) as usize];
            match self.written_file() {
                Some(file) => self.write_and_map(file, addr, page, src.len() as u64, |f, at| {
                    f.write(at, src, page_size)
                }),
                None => self.uffd.copy(addr.0, src, page_size),
            }
        })
    }

    fn install_zero(&self, first: u64, count: u64) -> Result<Installed, UffdError> {
        let page_size = self.page_size();
        self.per_piece(first, count, |addr, page, n| {
            if let Some(file) = self.written_file() {
                // Zeros written, not UFFDIO_ZEROPAGE: the file may hold this page already
                // (allocated ahead, or a base image's bytes), and hugetlbfs has no ZEROPAGE.
                let len = n * page_size;
                self.write_and_map(file, addr, page, len, |f, at| f.zero(at, len, page_size))
            } else if self.is_hugetlb() {
                self.copy_zero_pages(addr, n)
            } else {
                self.uffd.zeropage(addr.0, n * page_size, page_size)
            }
        })
    }

    fn map_cached(&self, page: u64) -> Result<Installed, UffdError> {
        let page_size = self.page_size();
        self.per_piece(page, 1, |addr, _, _| {
            self.uffd.continue_range(addr.0, page_size, page_size)
        })
    }

    fn wake(&self, first: u64, count: u64) -> Result<(), UffdError> {
        let page_size = self.page_size();
        for (addr, _, n) in self.layout.host_pieces(first, count) {
            self.uffd.wake(addr.0, n * page_size)?;
        }
        Ok(())
    }

    fn writes_page_cache(&self) -> bool {
        self.memfd.is_some()
    }

    fn drop_pages(&self, first: u64, count: u64) -> Result<(), UffdError> {
        use std::os::fd::AsRawFd;
        let page_size = self.page_size();
        let file = self.memfd_for("drop pages", first, count)?.file();
        // Punching the hole unmaps the pages from the VMM too: its next touch is a MISSING
        // fault (memory registered with the uffd), never stale bytes.
        nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (first * page_size) as i64,
            (count * page_size) as i64,
        )
        .map_err(|e| UffdError::Place {
            op: "punch a hole in the guest memfd",
            addr: first * page_size,
            len: count * page_size,
            source: e.into(),
        })
    }

    fn read_in_place(&self, page: u64, offset: u64, buf: &mut [u8]) -> Result<(), UffdError> {
        let page_size = self.page_size();
        let file = self.memfd_for("read a piece of a page", page, 1)?;
        file.read(page * page_size + offset, buf, page_size)
    }

    fn write_in_place(&self, page: u64, offset: u64, bytes: &[u8]) -> Result<(), UffdError> {
        let page_size = self.page_size();
        let file = self.memfd_for("patch a page", page, 1)?;
        let at = page * page_size + offset;
        file.write(at, bytes, page_size)?;
        file.check_intact(at, bytes.len() as u64)
    }

    fn can_drop_pages(&self) -> bool {
        // Not in a file other VMs share: the hole would reach them too.
        self.memfd.is_some() && !self.shares_ram()
    }

    fn filled_runs(
        &self,
        pages: std::ops::Range<u64>,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<bool, UffdError> {
        let Some(file) = self.memfd.as_ref().filter(|f| f.is_shared()) else {
            return Ok(false);
        };
        let page_size = self.page_size();
        let (at, len) = (
            pages.start * page_size,
            (pages.end - pages.start) * page_size,
        );
        file.filled_runs(pages, page_size, out)
            .map(|()| true)
            .map_err(|source| UffdError::Place {
                op: "find the pages in the shared guest RAM file",
                addr: at,
                len,
                source,
            })
    }

    fn unregister_all(&self) -> Result<(), UffdError> {
        let mut first_error = None;
        for region in self.layout.regions() {
            if let Err(e) = self.uffd.unregister(region.host_base.0, region.size_bytes) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl UffdKernel {
    /// When the VMM's guest RAM file is shared with other VMs (clones of one template on
    /// this host), ties it to image `image_id` or checks it is tied to it (`shared_ram`);
    /// nothing to do for a memfd or copy placement.
    ///
    /// # Errors
    /// The file holds another image's pages, or pages of none, or `precopy`.
    pub fn bind_shared_ram(&self, image_id: u64, precopy: bool) -> Result<(), SharedRamError> {
        match &self.memfd {
            Some(file) if file.is_shared() => {
                shared_ram::bind(file.file(), image_id, precopy)?;
                tracing::info!(
                    image = format_args!("{image_id:016x}"),
                    "the guest RAM file is shared with this image's other restores on this host: pages any of them placed are mapped without a fault"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether guest RAM is a file other VMs map too (see `shared_ram`).
    pub fn shares_ram(&self) -> bool {
        self.memfd.as_ref().is_some_and(GuestFile::is_shared)
    }

    /// The memfd, or an error naming `what` needed it.
    fn memfd_for(
        &self,
        what: &'static str,
        first: u64,
        count: u64,
    ) -> Result<&GuestFile, UffdError> {
        self.memfd.as_ref().ok_or_else(|| UffdError::Place {
            op: what,
            addr: first * self.page_size(),
            len: count * self.page_size(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "precopy needs the VMM's memfd and --placement memfd",
            ),
        })
    }
}
