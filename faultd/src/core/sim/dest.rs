//! The simulation's destination: the real session ([`DestSession`]), fault core and bulk
//! frame core ([`BulkRx`]) over the fake kernel, driven as `event_loop.rs`, the connector
//! and the bulk threads drive them, one step at a time: the pump moves the stages on and
//! writes (part of) its outbox; the connector waits for every old bulk thread, says whether
//! the guest runs, sends the maps; a bulk thread applies what it read unless its link was
//! cut, and tells the pump of a switch or a sync through an event queue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicBool;

use common::framed::{FrameEncoder, FrameReader};
use common::netopt::Liveness;
use common::wire::{Decoder, Message, PageRange};

use super::Rng;
use crate::core::bulk_rx::{BulkAction, BulkRx};
use crate::core::fake::{FakeKernel, PAGE, PAGES};
use crate::core::reconnect;
use crate::core::session::{AfterCut, DestSession, LinkState, Verdict, encode_maps};
use crate::core::vm::{Origin, Placed, Vm, ZeroPages};

/// Pages placed per hold of the gate by a bulk thread (as `push::place_run` chunks).
const PLACE_CHUNK: u64 = 2;

/// What a bulk thread tells the pump.
#[derive(Debug)]
enum LinkEvent {
    Switched(u64),
    Synced(u64),
}

/// A run a bulk thread is placing.
struct Placing {
    range: PageRange,
    at: u64,
    data: Option<Vec<u8>>,
}

/// One link's bulk thread.
struct BulkThread {
    generation: u64,
    rx: BulkRx,
    reader: FrameReader,
    /// Frames received on its socket, not yet read.
    inbox: VecDeque<Vec<u8>>,
    /// The link was cut: apply nothing more.
    stop: bool,
    placing: Option<Placing>,
    ended: bool,
}

/// The destination host.
pub struct SimDest<'v> {
    vm: &'v Vm<FakeKernel>,
    session: DestSession<'v, FakeKernel>,
    generation: u64,
    want_link: bool,
    /// The VMM was told the guest may run (by a bulk thread, at a `Switchover`).
    announced: bool,
    /// The pin every later Hello carries: the guest runs.
    resumed: bool,
    bulk: Vec<BulkThread>,
    events: VecDeque<LinkEvent>,
    /// Each fault taken: its page and how many wake-ups the kernel had done before.
    faults: Vec<(u64, usize)>,
    /// What the guest here wrote last, per page.
    writes: BTreeMap<u64, Vec<u8>>,
    /// Protocol violations and failures seen (each a failed run).
    pub violations: Vec<String>,
}

impl<'v> SimDest<'v> {
    pub fn new(vm: &'v Vm<FakeKernel>, liveness: Liveness, start: std::time::Instant) -> Self {
        SimDest {
            vm,
            session: DestSession::new(vm, true, liveness, start),
            generation: 0,
            want_link: true,
            announced: false,
            resumed: false,
            bulk: Vec::new(),
            events: VecDeque::new(),
            faults: Vec::new(),
            writes: BTreeMap::new(),
            violations: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} link {:?} (want {}), {} pages here [{}], {} faults waiting, bulk threads alive {:?}",
            self.session.stage_name(),
            self.session.link_generation(),
            self.want_link,
            self.vm.done.set_pages(),
            (0..PAGES)
                .map(|p| match (self.vm.done.is_set(p), self.vm.zero.is_set(p)) {
                    (true, true) => '0',
                    (true, false) => '#',
                    _ => '.',
                })
                .collect::<String>(),
            self.session.core.pages_in_flight(),
            self.bulk
                .iter()
                .filter(|b| !b.ended)
                .map(|b| (b.generation, b.inbox.len(), b.stop))
                .collect::<Vec<_>>(),
        )
    }

    pub fn is_done(&self) -> bool {
        self.session.done().is_some()
    }

    pub fn is_closing(&self) -> bool {
        self.session.stage_name() == "closing"
    }

    pub fn verdict(&self) -> Option<&Verdict> {
        self.session.done()
    }

    pub fn link_generation(&self) -> Option<u64> {
        self.session.link_generation()
    }

    pub fn announced(&self) -> bool {
        self.resumed || self.announced
    }

    pub fn written(&self, page: u64) -> Option<&Vec<u8>> {
        self.writes.get(&page)
    }

    pub fn uffd_ready(&self) -> bool {
        self.vm.kernel.has_events() || self.session.has_deferred_work()
    }

    pub fn events_pending(&self) -> bool {
        !self.events.is_empty()
    }

    /// The pump may take a new link: one is wanted, every old bulk thread ended (the
    /// connector waits for them) and the pump handled their events (they precede the
    /// connector's in the channel).
    pub fn may_connect(&self) -> bool {
        let alive = self.bulk.iter().filter(|b| !b.ended).count();
        self.want_link && reconnect::may_open(alive) && self.events.is_empty()
    }

    pub fn may_fault(&self) -> bool {
        let unregistered = self.vm.kernel.st().unregistered;
        self.session.serving()
            && !unregistered
            && (0..PAGES).any(|p| self.vm.kernel.page(p).is_none())
    }

    pub fn may_write(&self) -> bool {
        self.announced() && (0..PAGES).any(|p| self.vm.kernel.page(p).is_some())
    }

    /// The running guest may give pages back while faultd still serves it.
    pub fn may_remove(&self) -> bool {
        let unregistered = self.vm.kernel.st().unregistered;
        self.announced() && self.session.serving() && !unregistered
    }

    /// A VMM thread waits for its removal to be read and then resumes.
    pub fn vmm_blocked(&self) -> bool {
        self.vm.kernel.has_unresumed()
    }

    /// The zap happens now: the removed pages read zero from here on (until written).
    pub fn vmm_resumes(&mut self) {
        for (first, count) in self.vm.kernel.resume_vmm() {
            for page in first..first + count {
                self.writes.insert(page, vec![0; PAGE as usize]);
            }
        }
    }

    pub fn has_unsent_bytes(&self) -> bool {
        !self.is_done() && !self.session.outbox().is_empty()
    }

    pub fn bulk_threads_ready(&self) -> Vec<usize> {
        (0..self.bulk.len())
            .filter(|&i| {
                let b = &self.bulk[i];
                !b.ended && (b.stop || b.placing.is_some() || !b.inbox.is_empty())
            })
            .collect()
    }

    /// The pump's turn: stages move on; part (or all) of the outbox is written; returns
    /// the bytes written.
    pub fn pump(&mut self, now: std::time::Instant, rng: &mut Rng) -> Vec<u8> {
        self.session.advance(now);
        if self.is_done() {
            return Vec::new();
        }
        self.session.prepare_transmit();
        let out = self.session.outbox();
        let n = if rng.chance(70) {
            out.len()
        } else {
            rng.below(out.len() as u64 + 1) as usize
        };
        let bytes = out[..n].to_vec();
        self.session.sent(n, now);
        bytes
    }

    pub fn on_uffd(&mut self) {
        if let Err(e) = self.session.on_uffd() {
            self.violations.push(format!("destination: uffd: {e}"));
        }
    }

    pub fn on_urgent_frame(&mut self, frame: &[u8], now: std::time::Instant) {
        trace_frame("urgent to dest", frame);
        let Some(reader) = self.session.urgent_reader() else {
            return;
        };
        reader.fill(&mut &frame[..]).expect("a slice reads");
        if let Err(e) = self.session.on_urgent_bytes(now) {
            self.violations
                .push(format!("destination: urgent frame: {e:?}"));
        }
    }

    /// A frame arrives on the current link's bulk socket.
    pub fn on_bulk_bytes(&mut self, frame: Vec<u8>) {
        let generation = self.generation;
        if let Some(thread) = self
            .bulk
            .iter_mut()
            .find(|b| b.generation == generation && !b.ended)
        {
            thread.inbox.push_back(frame);
        }
    }

    /// Bulk thread `i` does one thing; returns a frame it writes back (`Synced`).
    pub fn bulk_step(&mut self, i: usize) -> Option<Vec<u8>> {
        let vm = self.vm;
        let thread = &mut self.bulk[i];
        if thread.stop && thread.placing.is_some() {
            // A cut stops a placement between chunks (as `push::place_run` does).
            thread.ended = true;
            return None;
        }
        if let Some(placing) = &mut thread.placing {
            let end = placing.range.end();
            let n = PLACE_CHUNK.min(end - placing.at);
            let offset = ((placing.at - placing.range.first) * PAGE) as usize;
            let data = placing
                .data
                .as_ref()
                .map(|d| &d[offset..offset + (n * PAGE) as usize]);
            match vm.place(placing.at, n, data, Origin::Pushed, ZeroPages::Skip) {
                Ok(Placed::Done) => placing.at += n,
                Ok(Placed::Again { resume_at }) => placing.at = resume_at,
                Err(e) => self.violations.push(format!("destination: place: {e}")),
            }
            if placing.at >= end {
                thread.placing = None;
            }
            return None;
        }
        let Some(frame) = thread.inbox.pop_front() else {
            // Cut, nothing buffered: the read fails and the thread ends.
            thread.ended |= thread.stop;
            return None;
        };
        thread.reader.fill(&mut &frame[..]).expect("a slice reads");
        let (message, payload) = match thread.reader.next_buffered() {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(e) => {
                self.violations
                    .push(format!("destination: bulk frame: {e}"));
                return None;
            }
        };
        let payload = thread.reader.payload(payload).to_vec();
        let generation = thread.generation;
        trace_frame(&format!("bulk {generation} applies"), &frame);
        let stop = AtomicBool::new(thread.stop);
        match thread.rx.on_frame(vm, (message, &payload), &stop) {
            Ok(BulkAction::Place { range, data }) => {
                thread.placing = Some(Placing {
                    range,
                    at: range.first,
                    data: data.map(<[u8]>::to_vec),
                });
            }
            Ok(BulkAction::Nothing) => {}
            Ok(BulkAction::Sync) => {
                self.events.push_back(LinkEvent::Synced(generation));
                let mut bytes = Vec::new();
                FrameEncoder::plain().encode(&Message::Synced, &[], &mut bytes);
                return Some(bytes);
            }
            Ok(BulkAction::Switchover) => {
                self.announced = true;
                self.events.push_back(LinkEvent::Switched(generation));
            }
            Ok(BulkAction::Hashes { .. }) => {
                self.violations
                    .push("destination: page hashes without a base".into());
            }
            Ok(BulkAction::Done | BulkAction::Stopped) => thread.ended = true,
            Err(e) => self
                .violations
                .push(format!("destination: bulk frame: {e:?}")),
        }
        None
    }

    pub fn on_link_event(&mut self, now: std::time::Instant) {
        let held = !self.session.faults_released();
        match self.events.pop_front() {
            Some(LinkEvent::Switched(generation)) if self.session.on_switched(generation, now) => {
                self.resumed = true;
            }
            Some(LinkEvent::Switched(_)) => {}
            Some(LinkEvent::Synced(generation)) => self.session.on_synced(generation),
            None => {}
        }
        self.check_released_faults(held);
    }

    /// pagesrv closed the urgent connection: whether it is a cut (else the session ends).
    pub fn on_urgent_closed(&mut self) -> bool {
        self.session.on_urgent_closed().is_some()
    }

    /// The clock: whether the link went silent (a cut).
    pub fn on_tick(&mut self, now: std::time::Instant) -> bool {
        self.session.advance(now);
        self.session.on_tick(now).is_some()
    }

    pub fn next_generation(&self) -> u64 {
        self.generation + 1
    }

    /// The connector's link is handed over: the maps it sent (then `MapEnd`), returned as
    /// the bytes the source reads first.
    pub fn connect(
        &mut self,
        generation: u64,
        (precopy, free_first): (bool, bool),
        now: std::time::Instant,
    ) -> Vec<u8> {
        self.resumed = reconnect::resumed(self.resumed, self.announced);
        self.generation = generation;
        self.want_link = false;
        // As the pump does: asked before the bulk threads start.
        let held = !self.session.faults_released();
        if let Err(e) = self.session.accepts_link(precopy, self.announced, true) {
            self.violations
                .push(format!("destination: link refused: {e}"));
            return Vec::new();
        }
        self.bulk.push(BulkThread {
            generation,
            rx: BulkRx::new(precopy, false),
            reader: FrameReader::new(Decoder::session(PAGE, PAGES)),
            inbox: VecDeque::new(),
            stop: false,
            placing: None,
            ended: false,
        });
        let mut tx = FrameEncoder::plain();
        let mut maps = Vec::new();
        encode_maps(self.vm, &mut tx, &mut maps);
        tx.encode(&Message::MapEnd, &[], &mut maps);
        let link = LinkState::new(
            generation,
            FrameReader::new(Decoder::session(PAGE, PAGES)),
            tx,
            precopy,
            free_first,
            now,
        );
        match self.session.link_up(link, self.announced, true) {
            Ok(true) => self.resumed = true,
            Ok(false) => {}
            Err(e) => self.violations.push(format!("destination: link up: {e}")),
        }
        self.check_released_faults(held);
        maps
    }

    /// The link is gone: the session lets go of it, its bulk thread is told to stop.
    pub fn cut(&mut self) {
        if self.session.link_generation().is_some() {
            self.want_link = self.session.link_lost(&"cut") == AfterCut::Reconnect;
        }
        for thread in &mut self.bulk {
            thread.stop = true;
        }
    }

    /// A vCPU touches a missing page.
    pub fn fault(&mut self, rng: &mut Rng) {
        let missing: Vec<u64> = (0..PAGES)
            .filter(|&p| self.vm.kernel.page(p).is_none())
            .collect();
        let page = missing[rng.below(missing.len() as u64) as usize];
        let woken_before = self.vm.kernel.st().woken.len();
        self.faults.push((page, woken_before));
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("      fault on page {page}");
        }
        self.vm.kernel.fault(page);
    }

    /// The running guest writes a present page.
    pub fn write(&mut self, rng: &mut Rng) {
        let present: Vec<u64> = (0..PAGES)
            .filter(|&p| self.vm.kernel.page(p).is_some())
            .collect();
        let page = present[rng.below(present.len() as u64) as usize];
        let bytes = rng.page_bytes();
        self.vm.kernel.write(page, bytes.clone());
        self.writes.insert(page, bytes);
    }

    /// The running guest gives a few pages back (they read zero once its VMM thread
    /// resumes, see [`SimDest::vmm_resumes`]).
    pub fn remove(&mut self, rng: &mut Rng) {
        let first = rng.below(PAGES);
        let count = 1 + rng.below(3.min(PAGES - first));
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("      remove pages {first}..{}", first + count);
        }
        self.vm.kernel.remove(first, count);
    }

    /// Right after faults are released (a link up, the switch, the free pages in): every
    /// fault read and not woken has its request queued or its zero fill due; none is left
    /// asleep (a page that arrived was placed and woke it).
    fn check_released_faults(&mut self, held_before: bool) {
        if !held_before || !self.session.faults_released() || !self.session.serving() {
            return;
        }
        let st = self.vm.kernel.st();
        for &(page, before) in self.faults.iter().take(st.faults_read) {
            let woken = st.woken[before..].contains(&page);
            let requested =
                self.session.core.pending.iter().any(
                    |m| matches!(m, Message::Request(r) if (r.first..r.end()).contains(&page)),
                );
            let filling = self.session.core.zero_fill_waits(page);
            if !woken && !requested && !filling {
                self.violations.push(format!(
                    "a fault on page {page} is left asleep when faults are released (done {}, zero {})",
                    self.vm.done.is_set(page),
                    self.vm.zero.is_set(page)
                ));
                return;
            }
        }
    }
}

/// With `SIM_TRACE`: the frame in `bytes`, decoded.
pub fn trace_frame(what: &str, bytes: &[u8]) {
    if std::env::var_os("SIM_TRACE").is_none() {
        return;
    }
    let mut reader = FrameReader::new(Decoder::session(PAGE, PAGES));
    let _ = reader.fill(&mut &bytes[..]);
    while let Ok(Some((message, _))) = reader.next_buffered() {
        eprintln!("      {what}: {message:?}");
    }
}
