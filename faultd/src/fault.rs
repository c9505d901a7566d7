//! The fault path: drain uffd events (one handler per kind), turn missing-page faults into
//! urgent requests (deduplicated, pipelined), and place the replies.

use std::collections::HashMap;
use std::time::Instant;

use common::framed::{FrameReader, ReadError};
use common::uffd::{Event, UffdError};
use common::wire::{Message, PageRange, RANGE_FRAME_BYTES, encode};
use thiserror::Error;
use tracing::{debug, trace, warn};

use crate::place::{Origin, Placed, ZeroPages};
use crate::stats::LatencyRecorder;
use crate::vm::{Counters, Vm};

/// Fatal errors of the fault path.
#[derive(Debug, Error)]
pub enum FaultError {
    /// A uffd call failed (including the VMM exiting).
    #[error("userfaultfd failed")]
    Uffd(#[from] UffdError),
    /// The urgent connection failed or carried a bad frame.
    #[error("urgent connection to pagesrv failed")]
    Upstream(#[from] ReadError),
    /// pagesrv reported an error.
    #[error("pagesrv reported {code:?}: {text}")]
    Remote {
        /// Its code.
        code: common::wire::ErrorCode,
        /// Its text.
        text: String,
    },
    /// A frame that does not belong on the urgent connection.
    #[error("unexpected {0:?} frame on the urgent connection")]
    Unexpected(common::wire::Kind),
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

impl FaultError {
    /// Whether the error is the link's (reconnect) rather than the VM's (fatal).
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            FaultError::Upstream(_) | FaultError::Remote { .. } | FaultError::Unexpected(_)
        )
    }
}

/// A reply that could not be placed yet because the mapping was changing.
struct DeferredReply {
    range: PageRange,
    data: Option<Vec<u8>>,
}

/// State of the fault path: requests in flight, deferred work, and fault latencies.
pub struct FaultPath<'a> {
    vm: &'a Vm,
    /// Requests in flight: page → when each waiting fault was read.
    in_flight: HashMap<u64, Vec<Instant>>,
    /// Faults to retry after the next drain (their placement met EAGAIN).
    deferred_faults: Vec<(u64, Instant)>,
    /// MINOR faults to retry after the next drain.
    deferred_minor: Vec<(u64, Instant)>,
    deferred_replies: Vec<DeferredReply>,
    events: Vec<Event>,
    /// Encoded requests waiting to be written on the urgent connection.
    pub outbox: Vec<u8>,
    /// Fault latencies.
    pub latencies: LatencyRecorder,
    /// Fault events read.
    pub faults: u64,
    unknown_fault_warned: bool,
}

impl<'a> FaultPath<'a> {
    /// A fault path for `vm`.
    pub fn new(vm: &'a Vm) -> Self {
        FaultPath {
            vm,
            in_flight: HashMap::new(),
            deferred_faults: Vec::new(),
            deferred_minor: Vec::new(),
            deferred_replies: Vec::new(),
            events: Vec::with_capacity(64),
            outbox: Vec::new(),
            latencies: LatencyRecorder::default(),
            faults: 0,
            unknown_fault_warned: false,
        }
    }

    /// Reads every pending uffd event and handles it: removals first (under the placement
    /// gate, before any placement can run), then faults, then the work deferred by EAGAIN.
    ///
    /// # Errors
    /// uffd failures (the VMM is gone) and remaps.
    pub fn drain_events(&mut self) -> Result<(), FaultError> {
        loop {
            let now = Instant::now();
            self.events.clear();
            {
                let _gate = self.vm.gate();
                self.vm.uffd.read_events(&mut self.events)?;
                for event in &self.events {
                    self.handle_layout_event(*event)?;
                }
            }
            let events = std::mem::take(&mut self.events);
            for event in &events {
                if let Event::PageFault {
                    addr,
                    thread_id,
                    minor,
                    ..
                } = *event
                {
                    self.faults += 1;
                    self.handle_page_fault(addr, minor, thread_id, now)?;
                }
            }
            self.events = events;
            if !self.retry_deferred()? {
                return Ok(());
            }
        }
    }

    /// Reads and drops every pending event (after the memory was unregistered).
    ///
    /// # Errors
    /// uffd read failures.
    pub fn discard_events(&mut self) -> Result<(), FaultError> {
        let _gate = self.vm.gate();
        self.events.clear();
        self.vm.uffd.read_events(&mut self.events)?;
        self.events.clear();
        Ok(())
    }

    /// REMOVE/UNMAP mark pages removed (zero from now on, never fetched); other non-fault
    /// events are logged or fatal.
    fn handle_layout_event(&self, event: Event) -> Result<(), FaultError> {
        match event {
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                for (first, count) in self.vm.layout.pages_in_host_range(start, end) {
                    debug!(
                        first,
                        count,
                        unmap = matches!(event, Event::Unmap { .. }),
                        "pages removed by the VMM"
                    );
                    let newly = self.vm.mark_removed(first, count);
                    Counters::add(&self.vm.counters.pages_removed, newly);
                }
            }
            Event::Remap { from, to, len } => return Err(FaultError::Remapped { from, to, len }),
            Event::Fork => warn!("the VMM forked; faultd does not serve the child's memory"),
            Event::Unknown(kind) => warn!(kind, "ignoring an unknown userfaultfd event"),
            Event::PageFault { .. } => {}
        }
        Ok(())
    }

    /// A thread touched a missing page: zero-fill a removed page, wake a present one, or
    /// request it (once, however many threads wait on it).
    fn handle_page_fault(
        &mut self,
        addr: u64,
        minor: bool,
        thread_id: u32,
        read_at: Instant,
    ) -> Result<(), FaultError> {
        let Some(page) = self.vm.layout.locate(common::layout::HostAddr(addr)) else {
            if !self.unknown_fault_warned {
                warn!(
                    addr = format_args!("{addr:#x}"),
                    "fault outside every region the VMM declared; it cannot be served"
                );
                self.unknown_fault_warned = true;
            }
            return Ok(());
        };
        trace!(page, thread_id, minor, "fault");
        if minor {
            return self.map_fault_cached(page, read_at);
        }
        if self.vm.zero.is_set(page) {
            return self.place_fault_zero(page, read_at);
        }
        if self.vm.done.is_set(page) {
            let (host, _) = self
                .vm
                .layout
                .host_run(page)
                .expect("located page has a host address");
            self.vm.uffd.wake(host.0, self.vm.page_size())?;
            self.latencies.record(read_at.elapsed());
            return Ok(());
        }
        match self.in_flight.get_mut(&page) {
            Some(waiters) => waiters.push(read_at),
            None => {
                self.in_flight.insert(page, vec![read_at]);
                encode(
                    &Message::Request(PageRange {
                        first: page,
                        count: 1,
                    }),
                    0,
                    &mut self.outbox,
                );
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

    fn place_fault_zero(&mut self, page: u64, read_at: Instant) -> Result<(), FaultError> {
        match self
            .vm
            .place(page, 1, None, Origin::Requested, ZeroPages::Fill)?
        {
            Placed::Done => self.latencies.record(read_at.elapsed()),
            Placed::Again { .. } => self.deferred_faults.push((page, read_at)),
        }
        Ok(())
    }

    /// Handles every whole frame buffered on the urgent connection.
    ///
    /// # Errors
    /// Bad frames, remote errors, placement failures.
    pub fn handle_replies(&mut self, reader: &mut FrameReader) -> Result<(), FaultError> {
        while let Some((message, payload)) = reader.next_buffered().map_err(ReadError::from)? {
            let (range, data) = match message {
                Message::PageRun(range) => (range, Some(reader.payload(payload))),
                Message::ZeroRun(range) => (range, None),
                Message::Error { code, text } => return Err(FaultError::Remote { code, text }),
                other => return Err(FaultError::Unexpected(other.kind())),
            };
            let frame_bytes = RANGE_FRAME_BYTES + data.map_or(0, <[u8]>::len);
            Counters::add(&self.vm.counters.bytes_received, frame_bytes as u64);
            self.place_reply(range, data)?;
        }
        Ok(())
    }

    fn place_reply(&mut self, range: PageRange, data: Option<&[u8]>) -> Result<(), FaultError> {
        match self.vm.place(
            range.first,
            range.count,
            data,
            Origin::Requested,
            ZeroPages::Fill,
        )? {
            Placed::Done => {
                self.resolve(range.first, range.end());
            }
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

    /// Retries work deferred by EAGAIN; returns true if some of it met EAGAIN again (events
    /// must be read first).
    fn retry_deferred(&mut self) -> Result<bool, FaultError> {
        for (page, read_at) in std::mem::take(&mut self.deferred_faults) {
            self.place_fault_zero(page, read_at)?;
        }
        for (page, read_at) in std::mem::take(&mut self.deferred_minor) {
            self.map_fault_cached(page, read_at)?;
        }
        for reply in std::mem::take(&mut self.deferred_replies) {
            self.place_reply(reply.range, reply.data.as_deref())?;
        }
        Ok(!self.deferred_faults.is_empty()
            || !self.deferred_minor.is_empty()
            || !self.deferred_replies.is_empty())
    }

    /// Requests for every page still awaited, encoded (for a new link); the outbox of the
    /// old link is dropped.
    pub fn requests_in_flight(&mut self) -> Vec<u8> {
        self.outbox.clear();
        let mut out = Vec::new();
        for &page in self.in_flight.keys() {
            encode(
                &Message::Request(PageRange {
                    first: page,
                    count: 1,
                }),
                0,
                &mut out,
            );
        }
        out
    }

    /// Records every fault still waiting (their pages arrived on the bulk connection).
    pub fn resolve_all(&mut self) {
        let pages: Vec<u64> = self.in_flight.keys().copied().collect();
        for page in pages {
            self.resolve_page(page);
        }
    }
}
