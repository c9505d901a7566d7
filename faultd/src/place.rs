//! Placing arriving pages into the VMM: one ioctl per host-contiguous run of pages that are
//! neither done nor zero, under the placement gate.

use common::uffd::{Placement, UffdError};

use crate::vm::{Counters, Vm};

/// Where pages came from, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An urgent reply to a fault.
    Requested,
    /// The background push.
    Pushed,
}

/// What to do with pages marked zero (known zero, or removed by the VMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Leave them unplaced (nobody waits on them).
    Skip,
    /// Map zero pages there: a thread faulted on them and waits.
    Fill,
}

/// Result of a placement attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every page of the range is handled.
    Done,
    /// The mapping is changing (an unread REMOVE/UNMAP): pages from `resume_at` on were not
    /// handled. Read the uffd's events, then call again from there.
    Again {
        /// First page not yet handled.
        resume_at: u64,
    },
}

impl Vm {
    /// Places pages `first..first+count` (under the placement gate where needed, see the
    /// body): `data` holds their bytes,
    /// or `None` when pagesrv reported them as zero. Pages already done are skipped; pages
    /// marked zero are skipped or filled as `zero_pages` says.
    ///
    /// # Errors
    /// The VMM is gone, or the kernel refused the placement.
    pub fn place(
        &self,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        origin: Origin,
        zero_pages: ZeroPages,
    ) -> Result<Placed, UffdError> {
        // The gate orders placements against the event reader. The fault thread *is* the
        // event reader, so its own UFFDIO_COPYs need no gate (a race with the bulk thread
        // ends in EEXIST); memfd placement writes the page cache first, which only the
        // done bits under the gate keep from overwriting a page the guest already uses.
        let _gate = (origin == Origin::Pushed || self.memfd().is_some()).then(|| self.gate());
        if data.is_none() {
            Counters::add(&self.counters.pages_zero, self.mark_zero(first, count));
        }
        let page_size = self.page_size();
        let end = first + count;
        let mut at = first;
        while at < end {
            let zero_run = self.zero.set_run(at, end - at);
            if zero_run > 0 {
                if zero_pages == ZeroPages::Fill {
                    let placed = self.place_pieces(at, zero_run, None)?;
                    let resume_at = match placed {
                        Placed::Done => at + zero_run,
                        Placed::Again { resume_at } => resume_at,
                    };
                    Counters::add(&self.counters.zero_fills, resume_at - at);
                    if resume_at < at + zero_run {
                        return Ok(Placed::Again { resume_at });
                    }
                }
                at += zero_run;
                continue;
            }
            let run = self.zero.clear_run(at, end - at);
            for (page, n) in self.done.clear_runs(at, run) {
                let bytes = data.map(|d| {
                    let offset = ((page - first) * page_size) as usize;
                    &d[offset..offset + (n * page_size) as usize]
                });
                let placed = self.place_pieces(page, n, bytes)?;
                let resume_at = match placed {
                    Placed::Done => page + n,
                    Placed::Again { resume_at } => resume_at,
                };
                // Count (and digest) only the pages this call completed: without the gate,
                // the other thread may have placed some of them (EEXIST) at the same time.
                let mut newly = 0;
                for p in page..resume_at {
                    if self.done.set(p) {
                        newly += 1;
                        if let Some(b) = bytes {
                            let at = ((p - page) * page_size) as usize;
                            self.add_digests(p, &b[at..at + page_size as usize]);
                        }
                    }
                }
                let counter = match origin {
                    Origin::Requested => &self.counters.pages_requested,
                    Origin::Pushed => &self.counters.pages_pushed,
                };
                Counters::add(counter, newly);
                if resume_at < page + n {
                    return Ok(Placed::Again { resume_at });
                }
            }
            at += run;
        }
        Ok(Placed::Done)
    }

    /// Places `count` pages from `first`, split at region boundaries, with COPY (or a zero
    /// page for `bytes == None`).
    fn place_pieces(
        &self,
        first: u64,
        count: u64,
        bytes: Option<&[u8]>,
    ) -> Result<Placed, UffdError> {
        let page_size = self.page_size();
        for (addr, page, n) in self.layout.host_pieces(first, count) {
            let len = n * page_size;
            let outcome = match bytes {
                Some(b) => {
                    let at = ((page - first) * page_size) as usize;
                    let src = &b[at..at + len as usize];
                    match self.memfd() {
                        Some(file) => self.write_and_map(file, addr.0, page, src)?,
                        None => self.uffd.copy(addr.0, src, page_size)?,
                    }
                }
                None if self.is_hugetlb() => self.copy_zero_pages(addr.0, n)?,
                None => self.uffd.zeropage(addr.0, len, page_size)?,
            };
            if let Placement::Again { placed_bytes } = outcome {
                return Ok(Placed::Again {
                    resume_at: page + placed_bytes / page_size,
                });
            }
        }
        Ok(Placed::Done)
    }

    /// Memfd placement: writes the pages into the guest RAM file (the page cache the VMM
    /// maps), then maps them into the VMM with UFFDIO_CONTINUE (MINOR registration), or just
    /// wakes the waiters where RAM is registered MISSING only (the next touch finds the page
    /// in the page cache). Only pages not yet done reach here, so no guest write is ever
    /// overwritten.
    fn write_and_map(
        &self,
        file: &std::fs::File,
        addr: u64,
        page: u64,
        src: &[u8],
    ) -> Result<Placement, UffdError> {
        use std::os::unix::fs::FileExt;
        let page_size = self.page_size();
        let len = src.len() as u64;
        file.write_all_at(src, page * page_size)
            .map_err(|source| UffdError::Place {
                op: "pwrite to the guest memfd",
                addr,
                len,
                source,
            })?;
        if !self.continue_refused() {
            match self.uffd.continue_range(addr, len, page_size) {
                Err(UffdError::Place { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    self.refuse_continue();
                }
                other => return other,
            }
        }
        self.uffd.wake(addr, len)?;
        Ok(Placement::Done { existing_pages: 0 })
    }

    /// A MINOR fault: the page is in the page cache but not mapped in the VMM (written by us
    /// but not yet mapped, or zapped by the VMM): map it.
    ///
    /// # Errors
    /// As [`Vm::place`].
    pub fn map_cached_page(&self, page: u64) -> Result<Placed, UffdError> {
        let _gate = self.gate();
        let (addr, _) = self.layout.host_run(page).expect("page inside the layout");
        match self
            .uffd
            .continue_range(addr.0, self.page_size(), self.page_size())?
        {
            Placement::Done { .. } => {
                self.done.set(page);
                Ok(Placed::Done)
            }
            Placement::Again { .. } => Ok(Placed::Again { resume_at: page }),
        }
    }

    /// hugetlbfs has no UFFDIO_ZEROPAGE: copy a zero page into each huge page.
    fn copy_zero_pages(&self, addr: u64, pages: u64) -> Result<Placement, UffdError> {
        let page_size = self.page_size();
        for i in 0..pages {
            if let Placement::Again { placed_bytes } =
                self.uffd
                    .copy(addr + i * page_size, self.zero_page_bytes(), page_size)?
            {
                return Ok(Placement::Again {
                    placed_bytes: i * page_size + placed_bytes,
                });
            }
        }
        Ok(Placement::Done { existing_pages: 0 })
    }
}
