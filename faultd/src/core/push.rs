//! Placing pushed pages (the bulk threads' half of placement): in gate-sized chunks, and on
//! EAGAIN waiting for the event reader instead of spinning, until done or told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::uffd::UffdError;

use super::kernel::Kernel;
use super::vm::{Origin, Placed, Vm, ZeroPages};

/// Pages placed per hold of the placement gate, so a fault never waits long for the gate.
const GATE_HOLD_BYTES: u64 = 128 << 10;
/// Longest wait for the event reader after EAGAIN before trying again (the kernel keeps
/// answering EAGAIN until the VMM's thread resumes after its event was read).
const EAGAIN_WAIT: Duration = Duration::from_millis(1);

/// How a pushed run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Every page of the run is handled.
    Done,
    /// `stop` was set first (the link was cut, or the migration ended).
    Stopped,
}

/// Places a pushed run (`data` its bytes, `None` for zero pages).
///
/// # Errors
/// The VMM is gone or the kernel refused a placement.
pub fn place_pushed<K: Kernel>(
    vm: &Vm<K>,
    first: u64,
    count: u64,
    data: Option<&[u8]>,
    stop: &AtomicBool,
) -> Result<Pushed, UffdError> {
    place_run(vm, first, count, data, Origin::Pushed, stop)
}

/// Places a run from the bulk thread (pushed, or from the base image), in chunks that hold
/// the gate briefly, waiting for the event reader where the kernel says EAGAIN.
///
/// # Errors
/// As [`place_pushed`].
pub fn place_run<K: Kernel>(
    vm: &Vm<K>,
    first: u64,
    count: u64,
    data: Option<&[u8]>,
    origin: Origin,
    stop: &AtomicBool,
) -> Result<Pushed, UffdError> {
    let page_size = vm.page_size() as usize;
    let end = first + count;
    let chunk_pages = (GATE_HOLD_BYTES / vm.page_size()).max(1);
    let mut at = first;
    while at < end {
        if stop.load(Ordering::Acquire) {
            return Ok(Pushed::Stopped);
        }
        // Taken before placing, so an event read after the EAGAIN is not missed.
        let epoch = vm.events_epoch();
        let n = chunk_pages.min(end - at);
        let bytes = data.map(|d| &d[(at - first) as usize * page_size..][..n as usize * page_size]);
        match vm.place(at, n, bytes, origin, ZeroPages::Skip)? {
            Placed::Done => at += n,
            Placed::Again { resume_at } => {
                at = resume_at;
                vm.wait_for_events(epoch, stop, EAGAIN_WAIT);
            }
        }
    }
    Ok(Pushed::Done)
}
