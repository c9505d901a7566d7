//! The fault path's decisions as plain code: uffd events in, frames (requests, skips) and
//! placements out. The event loop moves bytes and calls it; the unit tests drive it with a
//! fake kernel.
//!
//! - A fault on a page that is present is woken; on a page that reads as zero (reported zero,
//!   or removed by the VMM) a zero page is placed at once, locally; on any other page one
//!   `Request` is sent, however many threads wait on it.
//! - A removal is marked under the placement gate as the events are read (see `vm.rs`); pages
//!   removed before they arrived are reported to pagesrv with `Skip`, and threads waiting on
//!   them get a zero page without waiting for the reply.
//! - Work that meets EAGAIN (an unread REMOVE) is deferred and retried after the next read of
//!   the events, never in a loop: [`FaultCore::has_deferred`] tells the event loop to come
//!   back soon.
//! - While the link is down, faults are recorded and skips logged; when a new link is up,
//!   every request still waiting and every skip since the cut go out on it
//!   ([`FaultCore::link_up`]). A reply already received is placed whatever happens to the
//!   link.

use std::collections::BTreeMap;
use std::time::Instant;

use common::uffd::UffdError;
use common::wire::{Message, PageRange};
use common::working_set::Recorder;
use thiserror::Error;
use tracing::{trace, warn};

use super::kernel::{Kernel, VmEvent};
use super::latency::LatencyRecorder;
use super::vm::{Counters, Origin, Placed, Vm, ZeroPages};

/// Fatal errors of the fault path: the VM cannot be served any more.
#[derive(Debug, Error)]
pub enum FaultError {
    /// A uffd call failed (including the VMM exiting).
    #[error("userfaultfd failed")]
    Uffd(#[from] UffdError),
    /// The VMM remapped guest memory, which this version cannot follow.
    #[error(
        "the VMM remapped {len:#x} bytes from {from:#x} to {to:#x}; faultd cannot follow a remap"
    )]
    Remapped {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
}

/// A reply that could not be placed yet because the mapping was changing.
struct DeferredReply {
    range: PageRange,
    data: Option<Vec<u8>>,
}

/// State of the fault path: requests in flight, deferred work, frames to send.
pub struct FaultCore<'v, K> {
    vm: &'v Vm<K>,
    /// Requests in flight: page → when each waiting fault was read. Ordered: a new link
    /// asks again in page order (and the simulation replays a seed exactly).
    in_flight: BTreeMap<u64, Vec<Instant>>,
    /// Zero fills to retry after the next read of the events (they met EAGAIN).
    deferred_zero: Vec<(u64, Instant)>,
    /// MINOR faults to retry likewise.
    deferred_minor: Vec<(u64, Instant)>,
    deferred_replies: Vec<DeferredReply>,
    events: Vec<VmEvent>,
    newly_skipped: Vec<(u64, u64)>,
    /// Skips recorded while the link is down, sent when it is up again.
    skips_while_down: Vec<(u64, u64)>,
    /// Where the next look at a shared guest RAM file goes on ([`FaultCore::adopt_shared`]).
    shared_cursor: u64,
    link_up: bool,
    /// Frames (requests, skips) waiting to be encoded and written on the urgent connection.
    pub pending: Vec<Message>,
    /// Fault latencies (read → placed or woken).
    pub latencies: LatencyRecorder,
    /// Fault events read.
    pub faults: u64,
    outside_warned: bool,
    /// With `--record-working-set`: the pages faulted on, in first-fault order.
    recorder: Option<Recorder>,
}

impl<'v, K: Kernel> FaultCore<'v, K> {
    /// A fault path for `vm`, with no link yet.
    pub fn new(vm: &'v Vm<K>) -> Self {
        FaultCore {
            vm,
            in_flight: BTreeMap::new(),
            deferred_zero: Vec::new(),
            deferred_minor: Vec::new(),
            deferred_replies: Vec::new(),
            events: Vec::with_capacity(64),
            newly_skipped: Vec::new(),
            skips_while_down: Vec::new(),
            shared_cursor: 0,
            link_up: false,
            pending: Vec::new(),
            latencies: LatencyRecorder::default(),
            faults: 0,
            outside_warned: false,
            recorder: None,
        }
    }

    /// Records from now on the pages the guest faults on, in first-fault order.
    pub fn record_working_set(&mut self) {
        self.recorder = Some(Recorder::new(self.vm.total_pages()));
    }

    /// The pages recorded (with [`FaultCore::record_working_set`]), in first-fault order.
    pub fn working_set(&self) -> Option<&[u64]> {
        self.recorder.as_ref().map(Recorder::pages)
    }

    /// Reads every pending uffd event and handles it (removals are marked as they are read,
    /// see [`Vm::read_events`]), then retries deferred work once.
    ///
    /// # Errors
    /// uffd failures (the VMM is gone) and remaps.
    pub fn drain_events(&mut self) -> Result<(), FaultError> {
        let now = Instant::now();
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.newly_skipped.clear();
        let read = self.vm.read_events(&mut events, &mut self.newly_skipped);
        // Removals were marked even if the read then failed; report what was marked.
        for i in 0..self.newly_skipped.len() {
            let (first, count) = self.newly_skipped[i];
            self.skip(first, count)?;
        }
        read?;
        for event in &events {
            match *event {
                VmEvent::Fault {
                    page,
                    minor,
                    thread_id,
                } => {
                    self.faults += 1;
                    trace!(page, thread_id, minor, "fault");
                    if let Some(recorder) = &mut self.recorder {
                        recorder.fault(page);
                    }
                    self.handle_page_fault(page, minor, now)?;
                }
                VmEvent::Removed { count, .. } if !self.link_up => {
                    Counters::add(&self.vm.counters.removed_while_link_down, count);
                }
                VmEvent::Removed { .. } => {}
                VmEvent::Outside { addr } => {
                    if !self.outside_warned {
                        warn!(
                            addr = format_args!("{addr:#x}"),
                            "fault outside every region the VMM declared; it cannot be served"
                        );
                        self.outside_warned = true;
                    }
                }
                VmEvent::Remapped { from, to, len } => {
                    return Err(FaultError::Remapped { from, to, len });
                }
                VmEvent::Other(what) => warn!(event = what, "ignoring a userfaultfd event"),
            }
        }
        self.events = events;
        self.retry_deferred()
    }

    /// Pages removed before they arrived: tell pagesrv (now, or when the link is back), and
    /// give the threads waiting on them a zero page now.
    fn skip(&mut self, first: u64, count: u64) -> Result<(), FaultError> {
        trace!(first, count, "pages removed before they arrived");
        if self.link_up {
            self.pending.push(Message::Skip(PageRange { first, count }));
        } else {
            self.skips_while_down.push((first, count));
        }
        for page in self.waiting_in(first, count) {
            let waiters = self.in_flight.remove(&page).unwrap_or_default();
            for read_at in waiters {
                self.place_zero_for_fault(page, read_at)?;
            }
        }
        Ok(())
    }

    /// The pages of `first..first+count` that faults wait on.
    fn waiting_in(&self, first: u64, count: u64) -> Vec<u64> {
        if count > self.in_flight.len() as u64 {
            let range = first..first + count;
            self.in_flight
                .keys()
                .copied()
                .filter(|p| range.contains(p))
                .collect()
        } else {
            (first..first + count)
                .filter(|p| self.in_flight.contains_key(p))
                .collect()
        }
    }

    /// Where guest RAM is a file shared with other restores of the image: takes over the
    /// pages they placed in it (looking at up to `max_pages` of those it misses) (from where the last call stopped, see
    /// [`Vm::adopt_shared`]), tells pagesrv to skip them, and wakes the faults waiting on
    /// them (the page is in the file now). Returns the pages taken over; `None` where RAM is
    /// not shared. Only while the link is up (a skip belongs to a session's serving phase).
    ///
    /// # Errors
    /// The kernel refused to say what the file holds, or a wake failed (the VMM is gone).
    pub fn adopt_shared(&mut self, max_pages: u64) -> Result<Option<u64>, FaultError> {
        if !self.link_up {
            return Ok(Some(0));
        }
        let mut taken = Vec::new();
        let adopted = self
            .vm
            .adopt_shared(&mut self.shared_cursor, max_pages, &mut taken)?;
        for (first, count) in taken {
            trace!(
                first,
                count, "pages another restore placed in the shared file"
            );
            self.pending.push(Message::Skip(PageRange { first, count }));
            for page in self.waiting_in(first, count) {
                self.vm.kernel.wake(page, 1)?;
                self.resolve_page(page);
            }
        }
        Ok(adopted)
    }

    /// A thread touched a missing page: zero-fill a page that reads as zero, wake a present
    /// one (map it, for a MINOR fault), or request it (once, however many threads wait on
    /// it).
    fn handle_page_fault(
        &mut self,
        page: u64,
        minor: bool,
        read_at: Instant,
    ) -> Result<(), FaultError> {
        if minor && self.vm.done.is_set(page) {
            return self.map_fault_cached(page, read_at);
        }
        // A MINOR fault on a page not placed yet: the file holds bytes faultd did not put
        // there (allocated ahead, a copy under way): as missing as a hole.

        if self.vm.zero.is_set(page) {
            return self.place_zero_for_fault(page, read_at);
        }
        if self.vm.done.is_set(page) {
            self.vm.kernel.wake(page, 1)?;
            self.latencies.record(read_at.elapsed());
            return Ok(());
        }
        match self.in_flight.get_mut(&page) {
            Some(waiters) => waiters.push(read_at),
            None => {
                self.in_flight.insert(page, vec![read_at]);
                Counters::add(&self.vm.counters.demand_faults, 1);
                if self.link_up {
                    self.pending.push(request(page));
                }
            }
        }
        Ok(())
    }

    fn map_fault_cached(&mut self, page: u64, read_at: Instant) -> Result<(), FaultError> {
        match self.vm.map_cached_page(page)? {
            Placed::Done => self.latencies.record(read_at.elapsed()),
            Placed::Again { .. } => self.deferred_minor.push((page, read_at)),
        }
        Ok(())
    }

    fn place_zero_for_fault(&mut self, page: u64, read_at: Instant) -> Result<(), FaultError> {
        match self
            .vm
            .place(page, 1, None, Origin::Requested, ZeroPages::Fill)?
        {
            Placed::Done => self.latencies.record(read_at.elapsed()),
            Placed::Again { .. } => self.deferred_zero.push((page, read_at)),
        }
        Ok(())
    }

    /// A reply on the urgent connection: pages with their bytes, or (`data == None`) zero.
    ///
    /// # Errors
    /// Placement failures.
    pub fn on_reply(&mut self, range: PageRange, data: Option<&[u8]>) -> Result<(), FaultError> {
        match self.vm.place(
            range.first,
            range.count,
            data,
            Origin::Requested,
            ZeroPages::Fill,
        )? {
            Placed::Done => self.resolve(range.first, range.end()),
            Placed::Again { resume_at } => {
                self.resolve(range.first, resume_at);
                let skip = ((resume_at - range.first) * self.vm.page_size()) as usize;
                self.deferred_replies.push(DeferredReply {
                    range: PageRange {
                        first: resume_at,
                        count: range.end() - resume_at,
                    },
                    data: data.map(|d| d[skip..].to_vec()),
                });
            }
        }
        Ok(())
    }

    /// Records the latency of every fault waiting on pages `first..end`.
    fn resolve(&mut self, first: u64, end: u64) {
        if end - first > self.in_flight.len() as u64 {
            let done: Vec<u64> = self
                .in_flight
                .keys()
                .copied()
                .filter(|p| (first..end).contains(p))
                .collect();
            for page in done {
                self.resolve_page(page);
            }
        } else {
            for page in first..end {
                self.resolve_page(page);
            }
        }
    }

    fn resolve_page(&mut self, page: u64) {
        if let Some(waiters) = self.in_flight.remove(&page) {
            for read_at in waiters {
                self.latencies.record(read_at.elapsed());
            }
        }
    }

    /// Retries work deferred by EAGAIN, once; whatever meets EAGAIN again stays deferred.
    fn retry_deferred(&mut self) -> Result<(), FaultError> {
        for (page, read_at) in std::mem::take(&mut self.deferred_zero) {
            self.place_zero_for_fault(page, read_at)?;
        }
        for (page, read_at) in std::mem::take(&mut self.deferred_minor) {
            self.map_fault_cached(page, read_at)?;
        }
        for reply in std::mem::take(&mut self.deferred_replies) {
            self.on_reply(reply.range, reply.data.as_deref())?;
        }
        Ok(())
    }

    /// Whether a zero fill of `page` waits for the next retry (it wakes the page's faults).
    #[cfg(test)]
    pub fn zero_fill_waits(&self, page: u64) -> bool {
        self.deferred_zero.iter().any(|&(p, _)| p == page)
    }

    /// Whether some work met EAGAIN and waits for a retry: the event loop must call
    /// [`FaultCore::drain_events`] again soon even if no event arrives.
    pub fn has_deferred(&self) -> bool {
        !self.deferred_zero.is_empty()
            || !self.deferred_minor.is_empty()
            || !self.deferred_replies.is_empty()
    }

    /// The link to pagesrv is gone: frames not yet written are dropped (the next link
    /// re-sends what matters), skips are logged until it is back.
    pub fn link_down(&mut self) {
        self.link_up = false;
        self.pending.clear();
    }

    /// A new link is up (its done and skip maps were sent): queue a request for every page
    /// still awaited and a skip for every removal since the cut.
    pub fn link_up(&mut self) {
        self.link_up = true;
        self.pending.clear();
        // Each awaited page as a fault on it now would be handled: one that turned out zero
        // (free pages, zero ranges, a removal) while the link was down or held is filled
        // here (nothing was placed there, so nothing woke its threads); one that arrived was
        // placed and woke them; the rest are requested.
        let pages: Vec<u64> = self.in_flight.keys().copied().collect();
        for page in pages {
            if self.vm.zero.is_set(page) {
                for read_at in self.in_flight.remove(&page).unwrap_or_default() {
                    self.deferred_zero.push((page, read_at));
                }
            } else if self.vm.done.is_set(page) {
                self.resolve_page(page);
            } else {
                self.pending.push(request(page));
            }
        }
        for (first, count) in self.skips_while_down.drain(..) {
            self.pending.push(Message::Skip(PageRange { first, count }));
        }
    }

    /// Pages awaited by faulting threads.
    pub fn pages_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Records every fault still waiting (their pages arrived on the bulk connection).
    ///
    /// Requests not yet written are dropped: no page is missing, and a request written
    /// after the verification began would break the protocol (pagesrv waits for the
    /// verdict). Skips stay queued: they go out before the maps and the digest query.
    pub fn resolve_all(&mut self) {
        let pages: Vec<u64> = self.in_flight.keys().copied().collect();
        for page in pages {
            self.resolve_page(page);
        }
        self.pending.retain(|m| !matches!(m, Message::Request(_)));
    }
}

fn request(page: u64) -> Message {
    Message::Request(PageRange {
        first: page,
        count: 1,
    })
}
