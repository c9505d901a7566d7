//! A fake kernel for the core's unit tests: guest memory in a vector, behaving as the kernel
//! does where it bites: a REMOVE is queued as an event and makes every placement answer
//! EAGAIN until it is read *and* the VMM's thread resumes; a page that is already present
//! answers EEXIST (its bytes stay).

use std::collections::VecDeque;
use std::sync::Mutex;

use common::uffd::UffdError;

use super::kernel::{Installed, Kernel, VmEvent};

/// Bytes per page of the fake.
pub(super) const PAGE: u64 = 64;
/// Pages of the fake's guest.
pub(super) const PAGES: u64 = 32;

#[derive(Default)]
pub(super) struct FakeState {
    /// Present pages and their bytes.
    pub(super) memory: Vec<Option<Vec<u8>>>,
    /// Events not yet read.
    queue: VecDeque<VmEvent>,
    /// Removals read whose VMM thread has not resumed: placements still get EAGAIN.
    unresumed: Vec<(u64, u64)>,
    /// Removals not yet read.
    unread: usize,
    pub(super) install_calls: u64,
    pub(super) woken: Vec<u64>,
    /// Fault events read so far.
    pub(super) faults_read: usize,
    /// Guest RAM was unregistered (every page present).
    pub(super) unregistered: bool,
    /// Guest RAM is a file shared with other restores: the pages in it (`None`: not shared).
    pub(super) shared_file: Option<Vec<bool>>,
}

pub(super) struct FakeKernel {
    state: Mutex<FakeState>,
}

impl FakeKernel {
    pub(super) fn new() -> Self {
        FakeKernel {
            state: Mutex::new(FakeState {
                memory: vec![None; PAGES as usize],
                ..FakeState::default()
            }),
        }
    }

    pub(super) fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// The VMM calls madvise(DONTNEED): the event is queued, the VMM's thread blocks.
    pub(super) fn remove(&self, first: u64, count: u64) {
        let mut st = self.st();
        st.queue.push_back(VmEvent::Removed { first, count });
        st.unread += 1;
    }

    /// A vCPU touches a page.
    pub(super) fn fault(&self, page: u64) {
        self.st().queue.push_back(VmEvent::Fault {
            page,
            minor: false,
            thread_id: 1,
        });
    }

    /// The VMM's threads whose events were read resume: the zap happens, EAGAIN ends.
    /// Returns the ranges zapped.
    pub(super) fn resume_vmm(&self) -> Vec<(u64, u64)> {
        let mut st = self.st();
        let zapped = std::mem::take(&mut st.unresumed);
        for &(first, count) in &zapped {
            for p in first..first + count {
                st.memory[p as usize] = None;
            }
        }
        zapped
    }

    /// Whether a removal was read but its VMM thread has not resumed yet.
    pub(super) fn has_unresumed(&self) -> bool {
        !self.st().unresumed.is_empty()
    }

    /// Whether events wait to be read (the uffd is readable).
    pub(super) fn has_events(&self) -> bool {
        !self.st().queue.is_empty()
    }

    /// The guest writes a present page (no fault).
    pub(super) fn write(&self, p: u64, bytes: Vec<u8>) {
        let mut st = self.st();
        assert!(st.memory[p as usize].is_some(), "page {p} is missing");
        st.memory[p as usize] = Some(bytes);
    }

    pub(super) fn page(&self, p: u64) -> Option<Vec<u8>> {
        self.st().memory[p as usize].clone()
    }

    pub(super) fn place_pages(
        &self,
        first: u64,
        pages: Vec<Vec<u8>>,
    ) -> Result<Installed, UffdError> {
        let mut st = self.st();
        st.install_calls += 1;
        if st.unread > 0 || !st.unresumed.is_empty() {
            return Ok(Installed {
                again: true,
                ..Installed::default()
            });
        }
        let mut installed = Installed::all(pages.len() as u64);
        for (p, bytes) in (first..).zip(pages) {
            match &st.memory[p as usize] {
                Some(_) => installed.existing.push(p),
                None => st.memory[p as usize] = Some(bytes),
            }
            st.woken.push(p);
        }
        Ok(installed)
    }
}

impl Kernel for FakeKernel {
    fn page_size(&self) -> u64 {
        PAGE
    }

    fn total_pages(&self) -> u64 {
        PAGES
    }

    fn read_events(&self, out: &mut Vec<VmEvent>) -> Result<(), UffdError> {
        let mut st = self.st();
        while let Some(event) = st.queue.pop_front() {
            match event {
                VmEvent::Removed { first, count } => {
                    st.unread -= 1;
                    st.unresumed.push((first, count));
                }
                VmEvent::Fault { .. } => st.faults_read += 1,
                _ => {}
            }
            out.push(event);
        }
        Ok(())
    }

    fn install(&self, first: u64, data: &[u8]) -> Result<Installed, UffdError> {
        let pages = data.chunks(PAGE as usize).map(<[u8]>::to_vec).collect();
        self.place_pages(first, pages)
    }

    fn install_zero(&self, first: u64, count: u64) -> Result<Installed, UffdError> {
        self.place_pages(first, vec![vec![0; PAGE as usize]; count as usize])
    }

    fn map_cached(&self, _page: u64) -> Result<Installed, UffdError> {
        Ok(Installed::all(1))
    }

    fn wake(&self, first: u64, count: u64) -> Result<(), UffdError> {
        self.st().woken.extend(first..first + count);
        Ok(())
    }

    fn writes_page_cache(&self) -> bool {
        false
    }

    fn drop_pages(&self, first: u64, count: u64) -> Result<(), UffdError> {
        let mut st = self.st();
        for p in first..first + count {
            st.memory[p as usize] = None;
        }
        Ok(())
    }

    fn read_in_place(&self, page: u64, offset: u64, buf: &mut [u8]) -> Result<(), UffdError> {
        let st = self.st();
        let bytes = st.memory[page as usize]
            .clone()
            .unwrap_or(vec![0; PAGE as usize]);
        buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_in_place(&self, page: u64, offset: u64, bytes: &[u8]) -> Result<(), UffdError> {
        let mut st = self.st();
        let present = st.memory[page as usize]
            .as_mut()
            .expect("patches only present pages");
        present[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn can_drop_pages(&self) -> bool {
        true
    }

    fn filled_runs(
        &self,
        pages: std::ops::Range<u64>,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<bool, UffdError> {
        let st = self.st();
        let Some(file) = &st.shared_file else {
            return Ok(false);
        };
        let mut page = pages.start;
        while page < pages.end {
            if !file[page as usize] {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages.end && file[page as usize] {
                page += 1;
            }
            out.push((first, page - first));
        }
        Ok(true)
    }

    fn unregister_all(&self) -> Result<(), UffdError> {
        self.st().unregistered = true;
        Ok(())
    }
}
