//! A deterministic two-sided simulation of a migration: the destination's session
//! ([`DestSession`] over the fault core and the fake kernel, the bulk frames through
//! [`BulkRx`]) against the source's decisions (`common::source_core`, in
//! [`source::SimSource`]), with frames in queues instead of sockets, and a seeded
//! scheduler that picks, at every step, one of whatever can happen next: a frame delivered
//! on either connection in either direction, the destination's pump writing part of its
//! outbox, a bulk thread applying a frame, a vCPU fault, a guest write on either side, a
//! balloon at the destination (REMOVE events; the fake kernel answers EAGAIN until they are
//! read and the VMM resumes, EEXIST where a page is already placed), the clock, or a cut of
//! the link (what is in flight is lost; a new link follows).
//!
//! Checked on every run:
//! - both sides end: no party waits on one that waits on it (a run with no possible step,
//!   one that never ends, or a link silent for its timeout fails);
//! - the destination's verdict is `Verified` and the source `Completed` (unless the cut
//!   came after the verdict was sent);
//! - no frame outside its phase, in either direction;
//! - every page at the destination equals the source's (or what the guest wrote or
//!   ballooned there since it resumed);
//! - when faults are released (a link up, the switch, the free pages in) every fault read
//!   is woken, requested or has its zero fill due.
//!
//! A failing seed is printed; `SIM_SEED=n cargo test -p faultd test_simulated` replays it
//! alone, step by step in the log with `SIM_TRACE=1`.

mod dest;
mod source;

use std::time::{Duration, Instant};

use common::netopt::Liveness;
use common::source_core::Outcome;

use super::fake::{FakeKernel, PAGE, PAGES};
use super::session::Verdict;
use super::vm::Vm;
use dest::SimDest;
use source::SimSource;

/// A small, fast, seedable generator (splitmix64): the same seed, the same run.
pub struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn page_bytes(&mut self) -> Vec<u8> {
        let b = (self.below(255) + 1) as u8;
        vec![b; PAGE as usize]
    }
}

/// What can happen next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The destination's pump: moves the stages on, writes part of its outbox.
    DestPump,
    /// The uffd is readable (or deferred work is due).
    DestUffd,
    /// A frame from the source arrives on the urgent connection.
    UrgentToDest,
    /// A frame from the source arrives on bulk thread `usize`'s socket.
    BulkToDest,
    /// A bulk thread applies one frame (or ends).
    DestBulk(usize),
    /// The pump handles one event from a bulk thread.
    DestLinkEvent,
    /// The source closed the urgent connection and the pump notices.
    DestUrgentClosed,
    /// The connector brings a link up (after every old bulk thread ended).
    Connect,
    /// A vCPU at the destination touches a missing page.
    DestFault,
    /// The guest at the destination (running) writes a present page.
    DestWrite,
    /// The guest at the destination gives pages back (a balloon: madvise(DONTNEED), a
    /// REMOVE event; its VMM thread blocks until the event is read).
    DestRemove,
    /// The VMM thread whose removal was read resumes (placements stop meeting EAGAIN).
    VmmResumes,
    /// The source handles an urgent frame.
    SourceUrgent,
    /// The source's bulk thread does its next step.
    SourceBulk,
    /// The guest at the source (still running, precopy) writes a page.
    SourceWrite,
    /// The source's urgent thread sends a heartbeat.
    SourceHeartbeat,
    /// Time passes.
    Tick,
    /// The link is cut.
    Cut,
}

/// How a run is set up.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Precopy rounds before the switch (None: postcopy only).
    pub rounds: Option<u32>,
    /// Precopy's strategy is stop-and-copy (else hybrid).
    pub stop_and_copy: bool,
    /// The free pages come first (a `Sync` opens every bulk connection).
    pub free_first: bool,
    /// Most cuts in the run.
    pub cuts: u32,
}

impl Scenario {
    fn from_rng(rng: &mut Rng) -> Self {
        Scenario {
            rounds: match rng.below(3) {
                0 => None,
                n => Some(n as u32),
            },
            stop_and_copy: rng.chance(30),
            free_first: rng.chance(30),
            cuts: rng.below(3) as u32,
        }
    }
}

/// Steps after which a run that has not ended is stuck.
const MAX_STEPS: u32 = 20_000;

/// Runs the simulation for `seed`; `Err` says which property failed, and how.
pub fn run(seed: u64) -> Result<RunStats, String> {
    let mut rng = Rng::new(seed);
    let scenario = Scenario::from_rng(&mut rng);
    let trace = std::env::var_os("SIM_TRACE").is_some();
    let memory: Vec<Vec<u8>> = (0..PAGES)
        .map(|_| {
            if rng.chance(30) {
                vec![0; PAGE as usize]
            } else {
                rng.page_bytes()
            }
        })
        .collect();
    let vm = Vm::new(FakeKernel::new()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let liveness = Liveness::new(Duration::from_secs(2));
    let mut world = World {
        source: SimSource::new(
            memory,
            scenario.rounds,
            (scenario.stop_and_copy, scenario.free_first),
        ),
        dest: SimDest::new(&vm, liveness, start),
        now: start,
        source_last_tx: start,
        liveness,
        cuts_left: scenario.cuts,
        cut_while_closing: false,
        stats: RunStats::default(),
    };
    for step_number in 0..MAX_STEPS {
        if let Some(v) = world.violation() {
            return Err(format!("step {step_number}: {v} ({scenario:?})"));
        }
        if world.finished() {
            return world
                .check_end(&vm)
                .map_err(|e| format!("{e} ({scenario:?})"));
        }
        let steps = world.enabled(&mut rng);
        if steps.is_empty() {
            return Err(format!(
                "step {step_number}: stuck, nothing can happen: {} ({scenario:?})",
                world.describe()
            ));
        }
        let step = steps[rng.below(steps.len() as u64) as usize];
        if trace {
            eprintln!("{step_number:5} {step:?}  {}", world.describe());
        }
        world.take(step, &mut rng);
        world.stats.steps += 1;
    }
    Err(format!(
        "no end after {MAX_STEPS} steps: {} ({scenario:?})",
        world.describe()
    ))
}

/// What a run did, for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunStats {
    /// Steps taken.
    pub steps: u32,
    /// Links cut.
    pub cuts: u32,
    /// Faults taken at the destination.
    pub faults: u32,
    /// Balloon removals at the destination.
    pub removes: u32,
    /// Links the destination cut because pagesrv went silent.
    pub silences: u32,
    /// `Discard` frames the source sent.
    pub discards: u32,
}

struct World<'v> {
    source: SimSource,
    dest: SimDest<'v>,
    now: Instant,
    source_last_tx: Instant,
    liveness: Liveness,
    cuts_left: u32,
    /// A cut came while the destination's verdict was on its way: the source may never
    /// see it (it keeps the VM, which is safe).
    cut_while_closing: bool,
    stats: RunStats,
}

impl World<'_> {
    fn finished(&self) -> bool {
        self.dest.is_done() && self.source.session.is_none()
    }

    fn violation(&self) -> Option<String> {
        self.source
            .violations
            .first()
            .or(self.dest.violations.first())
            .cloned()
    }

    fn describe(&self) -> String {
        let s = self.source.session.as_ref();
        format!(
            "dest: {}; source session: {}, to urgent {}, to bulk {}",
            self.dest.describe(),
            s.map_or("none".into(), |s| format!("gen {}", s.generation)),
            s.map_or(0, |s| s.to_urgent.len()),
            s.map_or(0, |s| s.to_bulk.len()),
        )
    }

    /// Every step that can happen now.
    fn enabled(&mut self, rng: &mut Rng) -> Vec<Step> {
        let mut steps = Vec::new();
        let d = &self.dest;
        let session = self.source.session.as_ref();
        let linked = session.is_some() && d.link_generation().is_some();
        if !d.is_done() {
            steps.push(Step::DestPump);
            steps.push(Step::Tick);
            if d.uffd_ready() {
                steps.push(Step::DestUffd);
            }
            if d.events_pending() {
                steps.push(Step::DestLinkEvent);
            }
            if d.may_connect() {
                steps.push(Step::Connect);
            }
            if d.may_fault() {
                steps.push(Step::DestFault);
            }
            if d.may_write() {
                steps.push(Step::DestWrite);
            }
            if d.may_remove() && rng.chance(30) {
                steps.push(Step::DestRemove);
            }
            if d.vmm_blocked() {
                steps.push(Step::VmmResumes);
            }
            for i in d.bulk_threads_ready() {
                steps.push(Step::DestBulk(i));
            }
        }
        if let Some(s) = session {
            if linked && !s.to_urgent.is_empty() {
                steps.push(Step::UrgentToDest);
            }
            if linked && !s.to_bulk.is_empty() {
                steps.push(Step::BulkToDest);
            }
            if linked && s.outcome.is_some() && s.to_urgent.is_empty() {
                steps.push(Step::DestUrgentClosed);
            }
            if s.outcome.is_none()
                && self.now.duration_since(self.source_last_tx) >= self.liveness.heartbeat
            {
                steps.push(Step::SourceHeartbeat);
            }
        }
        if self.source.urgent_ready() {
            steps.push(Step::SourceUrgent);
        }
        if self.source.bulk_ready() {
            steps.push(Step::SourceBulk);
        }
        if self.source.guest_runs() {
            steps.push(Step::SourceWrite);
        }
        // A finished source session (or a destination gone) closes its end.
        if let Some(s) = session
            && (s.outcome.is_some() || d.is_done())
            && s.urgent_in.buffered() == 0
            && !d.has_unsent_bytes()
        {
            steps.clear();
            steps.push(Step::Cut);
            return steps;
        }
        if linked && self.cuts_left > 0 && rng.chance(2) {
            steps.push(Step::Cut);
        }
        steps
    }

    fn take(&mut self, step: Step, rng: &mut Rng) {
        let now = self.now;
        match step {
            Step::DestPump => {
                let bytes = self.dest.pump(now, rng);
                dest::trace_frame("dest writes", &bytes);
                if let Some(s) = self.source.session.as_mut()
                    && !bytes.is_empty()
                {
                    s.urgent_in
                        .fill(&mut bytes.as_slice())
                        .expect("a vector reads");
                }
            }
            Step::DestUffd => self.dest.on_uffd(),
            Step::UrgentToDest => {
                let s = self.source.session.as_mut().expect("enabled");
                let frame = s.to_urgent.pop_front().expect("enabled");
                self.dest.on_urgent_frame(&frame, now);
            }
            Step::BulkToDest => {
                let s = self.source.session.as_mut().expect("enabled");
                let frame = s.to_bulk.pop_front().expect("enabled");
                self.dest.on_bulk_bytes(frame);
            }
            Step::DestBulk(i) => {
                if let Some(reply) = self.dest.bulk_step(i)
                    && let Some(s) = self.source.session.as_mut()
                    && Some(s.generation) == self.dest.link_generation()
                {
                    s.bulk_in.push_back(reply);
                }
            }
            Step::DestLinkEvent => self.dest.on_link_event(now),
            Step::DestUrgentClosed => {
                if self.dest.on_urgent_closed() {
                    self.cut_link(false);
                }
            }
            Step::Connect => {
                let generation = self.dest.next_generation();
                match self.source.welcome(generation, self.dest.announced()) {
                    Ok(precopy) => {
                        let free_first = self.source.free_first;
                        let maps = self.dest.connect(generation, (precopy, free_first), now);
                        let s = self.source.session.as_mut().expect("welcomed");
                        s.urgent_in
                            .fill(&mut maps.as_slice())
                            .expect("a vector reads");
                        self.source_last_tx = now;
                    }
                    Err(why) => self.source.violations.push(format!("refused: {why}")),
                }
            }
            Step::DestFault => {
                self.dest.fault(rng);
                self.stats.faults += 1;
            }
            Step::DestWrite => self.dest.write(rng),
            Step::DestRemove => {
                self.dest.remove(rng);
                self.stats.removes += 1;
            }
            Step::VmmResumes => self.dest.vmm_resumes(),
            Step::SourceUrgent => self.source.on_urgent(),
            Step::SourceBulk => self.source.on_bulk(),
            Step::SourceWrite => {
                let page = rng.below(PAGES);
                let bytes = if rng.chance(20) {
                    vec![0; PAGE as usize]
                } else {
                    rng.page_bytes()
                };
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!("      source writes page {page}: {}", bytes[0]);
                }
                self.source.write(page, bytes);
            }
            Step::SourceHeartbeat => {
                let s = self.source.session.as_mut().expect("enabled");
                let mut bytes = Vec::new();
                common::framed::FrameEncoder::plain().encode(
                    &common::wire::Message::Heartbeat,
                    &[],
                    &mut bytes,
                );
                s.to_urgent.push_back(bytes);
                self.source_last_tx = now;
            }
            Step::Tick => {
                self.now += Duration::from_millis(1 + rng.below(20));
                if self.dest.on_tick(self.now) {
                    // Both sides send heartbeats and the scheduler delivers them long before
                    // the link timeout: a silent link is a party stalled on another.
                    self.stats.silences += 1;
                    self.source.violations.push(format!(
                        "the destination heard nothing for the link timeout: a stall ({})",
                        self.describe()
                    ));
                    self.cut_link(true);
                }
            }
            Step::Cut => {
                let planned = self
                    .source
                    .session
                    .as_ref()
                    .is_some_and(|s| s.outcome.is_none() && !self.dest.is_done());
                if planned {
                    self.cuts_left -= 1;
                    self.stats.cuts += 1;
                }
                self.cut_link(planned);
            }
        }
    }

    /// Both ends let go of the link; what was in flight is lost.
    fn cut_link(&mut self, by_fault: bool) {
        if by_fault && self.dest.is_closing() {
            self.cut_while_closing = true;
        }
        self.dest.cut();
        self.source.cut();
        self.source_last_tx = self.now;
    }

    /// The end's properties.
    fn check_end(&mut self, vm: &Vm<FakeKernel>) -> Result<RunStats, String> {
        self.stats.discards = self.source.discards;
        if !vm.is_complete() {
            return Err("the destination ended with pages missing".into());
        }
        for page in 0..PAGES {
            let expected = self
                .dest
                .written(page)
                .unwrap_or(&self.source.memory[page as usize]);
            let here = vm.kernel.page(page).unwrap_or(vec![0; PAGE as usize]);
            if &here != expected {
                return Err(format!(
                    "page {page} differs: {:?}… at the destination, {:?}… expected",
                    &here[..4],
                    &expected[..4]
                ));
            }
        }
        match self.dest.verdict() {
            Some(Verdict::Verified) => {}
            other => return Err(format!("the destination ended with {other:?}")),
        }
        match &self.source.last_outcome {
            Some(Outcome::Completed) => {}
            _ if self.cut_while_closing => {}
            other => return Err(format!("the source ended with {other:?}")),
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded runs per `cargo test` (each a few hundred steps).
    const RUNS: u64 = 10_000;

    #[test]
    fn test_simulated_migrations_end_verified_with_every_page_right() {
        if let Some(seed) = std::env::var("SIM_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            if let Err(e) = run(seed) {
                panic!("seed {seed}: {e}");
            }
            return;
        }
        let (mut steps, mut cuts, mut faults, mut removes, mut silences) = (0u64, 0, 0, 0, 0);
        let mut discards = 0u64;
        for seed in 0..RUNS {
            match run(seed) {
                Ok(stats) => {
                    steps += u64::from(stats.steps);
                    cuts += u64::from(stats.cuts);
                    faults += u64::from(stats.faults);
                    removes += u64::from(stats.removes);
                    silences += u64::from(stats.silences);
                    discards += u64::from(stats.discards);
                }
                Err(e) => panic!(
                    "seed {seed}: {e}\nreplay: SIM_SEED={seed} SIM_TRACE=1 cargo test -p faultd test_simulated"
                ),
            }
        }
        eprintln!(
            "{RUNS} simulated migrations: {steps} steps, {cuts} cuts, {faults} faults, {removes} removals, {discards} discards, {silences} silences"
        );
        // The scheduler reaches what the properties are about.
        assert!(cuts > RUNS / 4, "cuts happen: {cuts}");
        assert!(faults > RUNS, "faults happen: {faults}");
        assert!(removes > RUNS / 4, "removals happen: {removes}");
        assert!(discards > RUNS / 4, "discards happen: {discards}");
    }

    #[test]
    fn test_a_seed_replays_exactly() {
        for seed in [1, 77, 4242] {
            let a = run(seed).map(|s| (s.steps, s.cuts, s.faults, s.removes));
            let b = run(seed).map(|s| (s.steps, s.cuts, s.faults, s.removes));
            assert_eq!(a, b, "seed {seed}");
        }
    }
}
