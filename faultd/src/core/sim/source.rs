//! The simulation's source: pagesrv's decisions ([`UrgentCore`] for every urgent frame,
//! [`BulkPlan`] for the bulk script, [`StaleMaps`] for what a discard drops) over a guest
//! that may still run (precopy rounds, the
//! pages it writes discarded at the destination, the pause, the switch), with frames as
//! bytes in queues instead of sockets. What pagesrv's threads do with sockets and a memory
//! file, this does with vectors, one step at a time, so the scheduler can interleave it
//! with the destination at every frame.

use std::collections::VecDeque;

use common::digest::run_digest;
use common::framed::{FrameEncoder, FrameReader};
use common::pagemap::PageMap;
use common::source_core::Outcome;
use common::source_core::bulk_plan::{BulkPlan, BulkStep};
use common::source_core::precopy_plan::{PrecopyPlan, PrecopyStep};
use common::source_core::stale::{Stale, StaleMaps};
use common::source_core::urgent::{Maps, UrgentAction, UrgentCore};
use common::wire::phase::{Phase, SourceBulk};
use common::wire::{Decoder, Message, PageRange};

use crate::core::fake::{PAGE, PAGES};

/// Most pages in one pushed frame (small, so a cut can fall between many frames).
const RUN_PAGES: u64 = 3;

/// The source VM's precopy state, which outlives a link.
#[derive(Debug)]
pub struct Engine {
    /// Rounds before the switch.
    pub rounds_left: u32,
    /// The guest was paused and the switch decided: it writes nothing more.
    pub switched: bool,
    /// What the destination may hold at an older version (pagesrv's rules).
    pub stale: StaleMaps,
}

/// Where the precopy step is: pagesrv's plan, and what the current step still does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Precopy {
    plan: PrecopyPlan,
    doing: Doing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doing {
    /// Take the plan's next step.
    Next,
    /// Sending every page not sent yet (a round, or stop-and-copy), from `next`.
    Sending { next: u64 },
    /// Waiting for the `Synced` before the pause.
    CatchingUp,
}

/// Where the bulk connection is within its current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    /// At the start of the step.
    Ready,
    /// Sent a `Sync`; waiting for `Synced`.
    AwaitSynced,
    Precopy(Precopy),
    Pushing {
        next: u64,
    },
    /// Every step done.
    Finished,
}

/// One link's session at the source.
pub struct SourceSession {
    /// The link's generation.
    pub generation: u64,
    sent: PageMap,
    skipped: PageMap,
    urgent: UrgentCore,
    /// Bytes from the destination's urgent writes, whole frames handled one at a time.
    pub urgent_in: FrameReader,
    /// Frames from the destination's bulk thread (each whole).
    pub bulk_in: VecDeque<Vec<u8>>,
    bulk_reader: FrameReader,
    /// Frames for the destination's urgent connection, oldest first.
    pub to_urgent: VecDeque<Vec<u8>>,
    /// Frames for the destination's bulk connection, oldest first.
    pub to_bulk: VecDeque<Vec<u8>>,
    tx: FrameEncoder,
    steps: Vec<BulkStep>,
    step: usize,
    bulk: Bulk,
    bulk_phase: SourceBulk,
    maps_done: bool,
    /// How the session ended (then the source closes both connections).
    pub outcome: Option<Outcome>,
}

/// The source host: its guest's pages and its sessions.
pub struct SimSource {
    /// The guest's pages now.
    pub memory: Vec<Vec<u8>>,
    /// Precopy, when the guest was handed over running.
    pub engine: Option<Engine>,
    /// The current link's session.
    pub session: Option<SourceSession>,
    /// Protocol violations seen (each a failed run).
    pub violations: Vec<String>,
    /// How the last session ended.
    pub last_outcome: Option<Outcome>,
    /// Precopy's strategy: stop-and-copy (else hybrid).
    stop_and_copy: bool,
    /// `Discard` frames sent (all sessions).
    pub discards: u32,
    /// Welcome destinations with free pages first (pagesrv does when the VM gives hints):
    /// the bulk connection opens with a `Sync`, and the destination asks for nothing before.
    pub free_first: bool,
}

impl SimSource {
    /// A guest of [`PAGES`] pages with the given bytes; `rounds`: precopy rounds before the
    /// switch (None: the guest is paused from the start, pure postcopy).
    pub fn new(
        memory: Vec<Vec<u8>>,
        rounds: Option<u32>,
        (stop_and_copy, free_first): (bool, bool),
    ) -> Self {
        SimSource {
            memory,
            engine: rounds.map(|rounds_left| Engine {
                rounds_left,
                switched: false,
                stale: StaleMaps::new(PAGES),
            }),
            session: None,
            violations: Vec::new(),
            last_outcome: None,
            stop_and_copy,
            free_first,
            discards: 0,
        }
    }

    /// Whether the guest at the source still runs (and may write).
    pub fn guest_runs(&self) -> bool {
        self.engine.as_ref().is_some_and(|e| !e.switched)
    }

    /// The guest writes `bytes` to `page` (only while it runs).
    pub fn write(&mut self, page: u64, bytes: Vec<u8>) {
        let engine = self.engine.as_mut().expect("a running guest");
        assert!(!engine.switched, "a paused guest writes nothing");
        self.memory[page as usize] = bytes;
        engine.stale.written_range(page, 1);
    }

    /// A destination says hello (`resumed`: its guest runs): the welcome's precopy flag, or
    /// why it is refused (pagesrv's rule: a running destination cannot follow precopy).
    pub fn welcome(&mut self, generation: u64, resumed: bool) -> Result<bool, String> {
        let precopy = match &self.engine {
            None => false,
            Some(e) if !e.switched && resumed => {
                return Err(
                    "the source still runs (precopy): a destination whose guest runs already cannot be served"
                        .into(),
                );
            }
            Some(_) => !resumed,
        };
        self.session = Some(SourceSession {
            generation,
            sent: PageMap::new(PAGES),
            skipped: PageMap::new(PAGES),
            urgent: UrgentCore::new(PAGE, PAGES),
            urgent_in: FrameReader::new(Decoder::session(PAGE, PAGES)),
            bulk_in: VecDeque::new(),
            bulk_reader: FrameReader::new(Decoder::session(PAGE, PAGES)),
            to_urgent: VecDeque::new(),
            to_bulk: VecDeque::new(),
            tx: FrameEncoder::plain(),
            steps: BulkPlan::new(self.free_first, false, precopy)
                .steps()
                .to_vec(),
            step: 0,
            bulk: Bulk::Ready,
            bulk_phase: SourceBulk::Open,
            maps_done: false,
            outcome: None,
        });
        Ok(precopy)
    }

    /// The link is cut: the session ends (a reconnect starts another).
    pub fn cut(&mut self) {
        if let Some(s) = self.session.take() {
            self.last_outcome = Some(
                s.outcome
                    .unwrap_or_else(|| Outcome::Aborted("the link was cut".into())),
            );
        }
    }

    /// Whether the session has an urgent frame buffered to handle.
    pub fn urgent_ready(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.outcome.is_none() && s.urgent_in.buffered() > 0)
    }

    /// Handles the next whole urgent frame, if any.
    pub fn on_urgent(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let frame = match s.urgent_in.next_buffered() {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                self.violations
                    .push(format!("source: a bad urgent frame: {e}"));
                return;
            }
        };
        let (message, payload) = frame;
        let payload = s.urgent_in.payload(payload).to_vec();
        let maps = Maps {
            sent: &s.sent,
            skipped: &s.skipped,
        };
        match s.urgent.on_frame(message, &payload, maps) {
            UrgentAction::Nothing => {}
            UrgentAction::Answer(range) => {
                let frames = frames_of(&self.memory, range, &s.sent, self.engine.as_mut());
                s.encode_all(frames, true);
            }
            UrgentAction::StartPush => s.maps_done = true,
            UrgentAction::Digests { chunk_pages } => {
                let digests = digests(&self.memory, &s.skipped, chunk_pages);
                s.encode_all(vec![(Message::Digests { chunk_pages }, digests)], true);
            }
            UrgentAction::Refuse { text, outcome, .. } => {
                self.violations.push(format!("source refused: {text}"));
                s.outcome = Some(outcome);
            }
            UrgentAction::End(outcome) => s.outcome = Some(outcome),
        }
    }

    /// Whether the bulk side can do something now.
    pub fn bulk_ready(&self) -> bool {
        let Some(s) = &self.session else {
            return false;
        };
        if s.outcome.is_some() {
            return false;
        }
        match s.bulk {
            Bulk::Finished => false,
            Bulk::AwaitSynced
            | Bulk::Precopy(Precopy {
                doing: Doing::CatchingUp,
                ..
            }) => !s.bulk_in.is_empty(),
            _ if s.steps.get(s.step) == Some(&BulkStep::AwaitMaps) => s.maps_done,
            _ => true,
        }
    }

    /// One step of the bulk script (a frame or two, or an answer read).
    pub fn on_bulk(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if matches!(
            s.bulk,
            Bulk::AwaitSynced
                | Bulk::Precopy(Precopy {
                    doing: Doing::CatchingUp,
                    ..
                })
        ) {
            match s.read_bulk() {
                Ok(true) => {
                    // Every discard before the Sync was applied.
                    if let Some(engine) = &self.engine {
                        engine.stale.confirmed();
                    }
                    s.bulk = match s.bulk {
                        Bulk::Precopy(p) => Bulk::Precopy(Precopy {
                            doing: Doing::Next,
                            ..p
                        }),
                        _ => {
                            s.step += 1;
                            Bulk::Ready
                        }
                    };
                }
                Ok(false) => {}
                Err(e) => {
                    self.violations.push(e);
                    s.outcome = Some(Outcome::Aborted("bulk".into()));
                }
            }
            return;
        }
        let Some(&step) = s.steps.get(s.step) else {
            s.bulk = Bulk::Finished;
            return;
        };
        match (step, s.bulk) {
            (BulkStep::AwaitMaps, _) => {
                // As pagesrv's bulk thread begins (before any Sync of this session).
                if let Some(engine) = &self.engine {
                    engine.stale.session_begins();
                }
                s.step += 1;
            }
            // The model's guest has no free pages; the destination holds no base image.
            (BulkStep::FreePages | BulkStep::OfferHashes, _) => s.step += 1,
            (BulkStep::SyncFree | BulkStep::SyncSwitch, _) => {
                s.encode_all(vec![(Message::Sync, Vec::new())], false);
                s.bulk = Bulk::AwaitSynced;
            }
            (BulkStep::Precopy, Bulk::Ready) => {
                let engine = self.engine.as_ref().expect("precopy");
                s.bulk = Bulk::Precopy(Precopy {
                    plan: PrecopyPlan::new(engine.switched, true, self.stop_and_copy),
                    doing: Doing::Next,
                });
            }
            (BulkStep::Precopy, Bulk::Precopy(p)) => self.precopy_step(p),
            (BulkStep::Push, Bulk::Ready) => s.bulk = Bulk::Pushing { next: 0 },
            (BulkStep::Push, Bulk::Pushing { next }) => {
                match next_unsent(&s.sent, next) {
                    Some(first) => {
                        let count = run_len(&s.sent, first);
                        let frames = frames_of(
                            &self.memory,
                            PageRange { first, count },
                            &s.sent,
                            self.engine.as_mut(),
                        );
                        s.encode_all(frames, false);
                        s.bulk = Bulk::Pushing {
                            next: first + count,
                        };
                    }
                    None if s.sent.is_full() => {
                        s.step += 1;
                        s.bulk = Bulk::Ready;
                    }
                    // Pages unsent before `next` (dropped by a discard): from the start.
                    None => s.bulk = Bulk::Pushing { next: 0 },
                }
            }
            (BulkStep::BulkDone, _) => {
                s.encode_all(vec![(Message::BulkDone, Vec::new())], false);
                s.step += 1;
                s.bulk = Bulk::Finished;
            }
            (step, bulk) => {
                self.violations
                    .push(format!("source: bulk step {step:?} in state {bulk:?}"));
            }
        }
    }

    /// One step of pagesrv's precopy plan (or one run of pages of a step that sends).
    fn precopy_step(&mut self, mut at: Precopy) {
        let s = self.session.as_mut().expect("a session");
        let engine = self.engine.as_mut().expect("precopy");
        if let Doing::Sending { next } = at.doing {
            at.doing = match next_unsent(&s.sent, next) {
                Some(first) => {
                    let count = run_len(&s.sent, first);
                    let range = PageRange { first, count };
                    let frames = frames_of(&self.memory, range, &s.sent, Some(engine));
                    s.encode_all(frames, false);
                    Doing::Sending {
                        next: first + count,
                    }
                }
                None => Doing::Next,
            };
            s.bulk = Bulk::Precopy(at);
            return;
        }
        match at.plan.next_step() {
            PrecopyStep::Begin => self.discards += s.discard(engine, Stale::Written),
            // The model's guest writes are pending at once; it has no free-page hints.
            PrecopyStep::StartTracking
            | PrecopyStep::CollectDirty
            | PrecopyStep::RefreshFreeHints
            | PrecopyStep::SendFreePages => {}
            PrecopyStep::SendRound | PrecopyStep::SendUnsent => {
                at.doing = Doing::Sending { next: 0 };
            }
            PrecopyStep::CheckConvergence => {
                engine.rounds_left = engine.rounds_left.saturating_sub(1);
                at.plan.converged(engine.rounds_left == 0);
            }
            PrecopyStep::DropWritten => self.discards += s.discard(engine, Stale::Written),
            PrecopyStep::CatchUp => {
                s.encode_all(vec![(Message::Sync, Vec::new())], false);
                at.doing = Doing::CatchingUp;
            }
            PrecopyStep::Pause => {
                engine.switched = true;
                engine.stale.decide_switch();
            }
            PrecopyStep::DropStaleAtSwitch => self.discards += s.discard(engine, Stale::AtSwitch),
            PrecopyStep::Switchover => {
                s.encode_all(vec![(Message::Switchover, Vec::new())], false);
            }
            PrecopyStep::Done => {
                s.step += 1;
                s.bulk = Bulk::Ready;
                return;
            }
        }
        s.bulk = Bulk::Precopy(at);
    }
}

impl SourceSession {
    fn encode_all(&mut self, frames: Vec<(Message, Vec<u8>)>, urgent: bool) {
        for (message, payload) in frames {
            let mut bytes = Vec::new();
            self.tx.encode(&message, &payload, &mut bytes);
            if urgent {
                self.to_urgent.push_back(bytes);
            } else {
                self.to_bulk.push_back(bytes);
            }
        }
    }

    /// Reads the next answer on the bulk connection: whether it was the `Synced`.
    fn read_bulk(&mut self) -> Result<bool, String> {
        let Some(bytes) = self.bulk_in.pop_front() else {
            return Ok(false);
        };
        self.bulk_reader
            .fill(&mut bytes.as_slice())
            .map_err(|e| e.to_string())?;
        let Some((message, _)) = self
            .bulk_reader
            .next_buffered()
            .map_err(|e| format!("source: a bad bulk frame: {e}"))?
        else {
            return Ok(false);
        };
        self.bulk_phase
            .receive(message.kind())
            .map_err(|e| format!("source: bulk frame out of phase: {e}"))?;
        Ok(matches!(message, Message::Synced))
    }

    /// Drops at the destination the pages it got that `which` names (they are sent again);
    /// returns how many frames that took.
    fn discard(&mut self, engine: &Engine, which: Stale) -> u32 {
        let frames = engine.stale.discards(which, &self.sent);
        let count = frames.len() as u32;
        for frame in frames {
            let range = PageRange {
                first: frame.first,
                count: frame.count,
            };
            self.encode_all(vec![(Message::Discard(range), frame.bitmap)], false);
        }
        count
    }
}

/// The first page at or after `from` not sent yet.
fn next_unsent(sent: &PageMap, from: u64) -> Option<u64> {
    (from..PAGES).find(|&p| !sent.is_set(p))
}

/// How many unsent pages follow `first` (at most [`RUN_PAGES`]).
fn run_len(sent: &PageMap, first: u64) -> u64 {
    (first..PAGES.min(first + RUN_PAGES))
        .take_while(|&p| !sent.is_set(p))
        .count() as u64
}

/// `range`'s pages as `ZeroRun`/`PageRun` frames (as pagesrv classifies them), marked sent
/// and no longer stale.
fn frames_of(
    memory: &[Vec<u8>],
    range: PageRange,
    sent: &PageMap,
    engine: Option<&mut Engine>,
) -> Vec<(Message, Vec<u8>)> {
    sent.set_range(range.first, range.count);
    if let Some(engine) = engine {
        engine.stale.sending(range.first, range.count);
    }
    let zero = |p: u64| memory[p as usize].iter().all(|&b| b == 0);
    let mut frames = Vec::new();
    let mut p = range.first;
    while p < range.end() {
        let first = p;
        let is_zero = zero(p);
        while p < range.end() && zero(p) == is_zero {
            p += 1;
        }
        let run = PageRange {
            first,
            count: p - first,
        };
        if is_zero {
            frames.push((Message::ZeroRun(run), Vec::new()));
        } else {
            let bytes = (first..p)
                .flat_map(|q| memory[q as usize].clone())
                .collect();
            frames.push((Message::PageRun(run), bytes));
        }
    }
    frames
}

/// The digests pagesrv sends: per chunk, every page's digest but the skipped ones'.
fn digests(memory: &[Vec<u8>], skipped: &PageMap, chunk_pages: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut first = 0;
    while first < PAGES {
        let end = (first + chunk_pages).min(PAGES);
        let digest = (first..end)
            .filter(|&p| !skipped.is_set(p))
            .fold(0u64, |d, p| {
                d.wrapping_add(run_digest(p, &memory[p as usize], PAGE as usize))
            });
        out.extend_from_slice(&digest.to_le_bytes());
        first = end;
    }
    out
}
