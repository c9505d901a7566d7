//! Placing arriving pages into the VMM: one ioctl per host-contiguous run of pages that are
//! neither present nor removed, under the placement gate.

use common::uffd::{Placement, UffdError};

use crate::vm::{Counters, RemovedRanges, Vm};

/// Where pages came from, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An urgent reply to a fault.
    Requested,
    /// The background push.
    Pushed,
}

/// What to do with pages the VMM removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedPages {
    /// Leave them alone (nobody waits on them).
    Skip,
    /// Map zero pages there: a thread faulted on them and waits.
    ZeroFill,
}

/// Result of a placement attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every page of the range is present, removed, or was already there.
    Done,
    /// The mapping is changing (an unread REMOVE/UNMAP): pages from `resume_at` on were not
    /// placed. Read the uffd's events, then call again from there.
    Again {
        /// First page not yet handled.
        resume_at: u64,
    },
}

impl Vm {
    /// Places pages `first..first+count`: `data` holds their bytes, or `None` for zero pages.
    /// Takes the placement gate; see [`Vm::place_locked`].
    ///
    /// # Errors
    /// The VMM is gone, or the kernel refused the placement.
    pub fn place(
        &self,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        origin: Origin,
        removed_pages: RemovedPages,
    ) -> Result<Placed, UffdError> {
        let removed = self.gate();
        self.place_locked(&removed, first, count, data, origin, removed_pages)
    }

    /// Places pages with the gate already held by the caller (`removed` is its guard).
    ///
    /// # Errors
    /// As [`Vm::place`].
    pub fn place_locked(
        &self,
        removed: &RemovedRanges,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        origin: Origin,
        removed_pages: RemovedPages,
    ) -> Result<Placed, UffdError> {
        let page_size = self.page_size();
        for (run_first, run_count, is_removed) in removed.split(first, count) {
            if is_removed {
                if removed_pages == RemovedPages::ZeroFill {
                    let placed = self.place_pieces(run_first, run_count, None)?;
                    if let Placed::Again { .. } = placed {
                        return Ok(placed);
                    }
                }
                continue;
            }
            for (page, n) in self.done.clear_runs(run_first, run_count) {
                let bytes = data.map(|d| {
                    let at = ((page - first) * page_size) as usize;
                    &d[at..at + (n * page_size) as usize]
                });
                let placed = self.place_pieces(page, n, bytes)?;
                let resume_at = match placed {
                    Placed::Done => page + n,
                    Placed::Again { resume_at } => resume_at,
                };
                let newly = self.done.set_range(page, resume_at - page);
                let counter = match (data.is_some(), origin) {
                    (false, _) => &self.counters.pages_zero,
                    (true, Origin::Requested) => &self.counters.pages_requested,
                    (true, Origin::Pushed) => &self.counters.pages_pushed,
                };
                Counters::add(counter, newly);
                if let Placed::Again { .. } = placed {
                    return Ok(placed);
                }
            }
        }
        Ok(Placed::Done)
    }

    /// Places `count` pages from `first` (all of them clear in `done`), split at region
    /// boundaries, with COPY (or ZEROPAGE for `bytes == None`).
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
                    self.uffd
                        .copy(addr.0, &b[at..at + len as usize], page_size)?
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
