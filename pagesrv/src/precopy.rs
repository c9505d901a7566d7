//! Precopy before the switch: the source VM still runs while its pages are pushed in rounds;
//! each round sends what the guest wrote since it was sent, until the convergence rules say
//! switch. Then the source VMM pauses, the destination drops what went stale (hybrid) or gets
//! it again (precopy), and the guest resumes on the destination.
//!
//! ```text
//!  round 1: every page ─► ask the VMM what it wrote (dirty bitmap) ─► converged? ─no─► round 2:
//!  Discard(written ∧ sent) + those pages again ─► ... ─yes─► pause ─► last bitmap ─►
//!    hybrid:  Discard(written ∧ sent), Switchover, postcopy sends them (or they are requested)
//!    precopy: Discard(written ∧ sent), those pages again, Switchover: nothing is missing
//! ```
//!
//! Rules (KVM's classic migration): switch when what is left fits the downtime budget at the
//! last round's bandwidth, after 2 rounds without progress, after 30 rounds, or when an
//! orchestrator forces it (`start-postcopy`). A page's dirty state is taken *before* it is
//! read for sending (the bitmap is read, then the pages), so a write racing with the read is
//! in the next bitmap. What is stale (`common::source_core::stale`) outlives sessions: after a cut, pages the
//! destination holds but the source wrote since are dropped first.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use common::pagemap::PageMap;
use common::source_core::stale::{StaleMaps, fold_bitmap};
use common::source_link::{Outcome, SourceLinkError, SourceVmm};
use serde::Serialize;

/// What pagesrv does before the destination resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// No precopy: the source is paused first; every page moves after the guest resumed.
    Postcopy,
    /// Rounds until converged, then stop-and-copy: the guest resumes with every page.
    Precopy,
    /// Rounds until converged, then postcopy for what changed since.
    Hybrid,
}

/// Why precopy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvergedBy {
    /// What is left fits the downtime budget.
    Budget,
    /// Two rounds in a row did not shrink what is left.
    NoProgress,
    /// The round limit.
    MaxRounds,
    /// An orchestrator asked (`start-postcopy`).
    Forced,
}

/// How long the source VMM may take to acknowledge the outcome.
const OUTCOME_ACK_WAIT: Duration = Duration::from_secs(5);
/// Most precopy rounds.
pub const MAX_ROUNDS: u32 = 30;
/// Rounds in a row without progress before giving up on converging.
pub const NO_PROGRESS_ROUNDS: usize = 2;

/// One finished round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Round {
    /// 1 for the first.
    pub round: u32,
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Bytes sent in the round.
    pub bytes: u64,
    /// How long it took.
    pub seconds: f64,
    /// Pages sent (in this or an earlier round) that the guest wrote since: what is left.
    pub dirty_pages: u64,
}

impl Round {
    /// Expected downtime to send what is left at this round's bandwidth, in milliseconds.
    pub fn expected_downtime_ms(&self, page_size: u64) -> f64 {
        if self.dirty_pages == 0 {
            return 0.0;
        }
        let bytes_per_s = self.bytes as f64 / self.seconds.max(1e-6);
        if bytes_per_s <= 0.0 {
            return f64::INFINITY;
        }
        (self.dirty_pages * page_size) as f64 / bytes_per_s * 1000.0
    }
}

/// Whether to switch after the rounds so far (`None`: another round).
pub fn converged(
    rounds: &[Round],
    page_size: u64,
    max_downtime: Duration,
    forced: bool,
) -> Option<ConvergedBy> {
    let last = rounds.last()?;
    if forced {
        return Some(ConvergedBy::Forced);
    }
    if last.expected_downtime_ms(page_size) <= max_downtime.as_secs_f64() * 1000.0 {
        return Some(ConvergedBy::Budget);
    }
    if rounds.len() > NO_PROGRESS_ROUNDS {
        let tail = &rounds[rounds.len() - NO_PROGRESS_ROUNDS - 1..];
        if tail
            .windows(2)
            .all(|w| w[1].dirty_pages >= w[0].dirty_pages)
        {
            return Some(ConvergedBy::NoProgress);
        }
    }
    if last.round >= MAX_ROUNDS {
        return Some(ConvergedBy::MaxRounds);
    }
    None
}

/// Where precopy stands (shared by every session).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrecopyState {
    /// Rounds finished.
    pub rounds: Vec<Round>,
    /// Set once the source is paused and the switch was decided.
    pub switched: bool,
    /// Why precopy ended.
    pub converged_by: Option<ConvergedBy>,
    /// Pages the destination had to drop or get again at the switch.
    pub pages_stale_at_switch: u64,
    /// Whether the dirty tracking was started.
    pub tracking: bool,
}

/// The control socket's view of precopy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrecopyStatus {
    /// How the migration runs.
    pub strategy: Strategy,
    /// `precopy` until the switch, then `postcopy`.
    pub phase: &'static str,
    /// Rounds finished.
    pub round: usize,
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// Pages sent in precopy rounds so far.
    pub transferred_pages: u64,
    /// Pages sent and written since, after the last round (all of them before the first).
    pub remaining_pages: u64,
    /// Pages the guest wrote per second during the last round.
    pub dirty_pages_rate: f64,
    /// Time to send what remains at the last round's bandwidth.
    pub expected_downtime_ms: Option<f64>,
    /// Bytes of the unit `remaining_pages` and `dirty_pages_rate` count: the page size, or
    /// 4 KiB pieces for destinations on huge pages (their written pieces are patched).
    pub dirty_unit_bytes: u64,
    /// The downtime budget.
    pub max_downtime_ms: u64,
    /// Why precopy ended, once it did.
    pub converged_by: Option<ConvergedBy>,
    /// The last round.
    pub last_round: Option<Round>,
}

/// The precopy engine: the source VMM link, what is stale, and the rounds.
pub struct Precopy {
    /// How the migration runs.
    pub strategy: Strategy,
    /// The downtime budget.
    pub max_downtime: Duration,
    /// The VMM's page size (what its dirty and free bitmaps count).
    pub vmm_page_size: u64,
    /// The guest's RAM in bytes.
    ram_bytes: u64,
    vmm: Mutex<SourceVmm>,
    /// The pages destinations hold and which of them are stale.
    tracked: RwLock<Tracked>,
    /// Set by `start-postcopy`.
    pub forced: AtomicBool,
    /// Rounds and outcome.
    pub state: Mutex<PrecopyState>,
    /// Set when the source VMM link failed.
    failure: Mutex<Option<String>>,
}

/// What the destinations hold is tracked in their pages (the first destination's size: the
/// VMM's, or 2 MiB for a destination on huge pages, which takes a huge page written when any
/// 4 KiB of it was).
#[derive(Debug)]
struct Tracked {
    page_size: u64,
    /// What the destination may hold at an older version: pages written since sent,
    /// discards a cut link may have lost, what was stale at the switch (outlives sessions).
    stale: Arc<StaleMaps>,
    /// Tracking pages larger than the VMM's: which of its pages (pieces) the guest wrote
    /// since their page was sent or patched, so a written huge page is patched, not sent
    /// again whole.
    pieces: Option<Arc<PageMap>>,
}

impl std::fmt::Debug for Precopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precopy")
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl Precopy {
    /// An engine over a connected source VMM.
    pub fn new(vmm: SourceVmm, strategy: Strategy, max_downtime: Duration) -> Self {
        let pages = vmm.hello.pages();
        let page_size = vmm.hello.page_size;
        Precopy {
            strategy,
            max_downtime,
            vmm_page_size: page_size,
            ram_bytes: pages * page_size,
            vmm: Mutex::new(vmm),
            tracked: RwLock::new(Tracked {
                page_size,
                stale: Arc::new(StaleMaps::new(pages)),
                pieces: None,
            }),
            forced: AtomicBool::new(false),
            state: Mutex::new(PrecopyState {
                rounds: Vec::new(),
                switched: false,
                converged_by: None,
                pages_stale_at_switch: 0,
                tracking: false,
            }),
            failure: Mutex::new(None),
        }
    }

    /// The stale-page maps, in pages of [`Precopy::page_size`].
    pub fn stale(&self) -> Arc<StaleMaps> {
        Arc::clone(&self.tracked.read().unwrap_or_else(|p| p.into_inner()).stale)
    }

    /// The size of the pages tracked (the destinations').
    pub fn page_size(&self) -> u64 {
        self.tracked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .page_size
    }

    /// Tracks what destinations hold in pages of `page_size` (a destination's): the VMM's
    /// size, or a multiple of it while nothing was sent or tracked yet (the first
    /// destination decides).
    ///
    /// # Errors
    /// Another size was decided already, or `page_size` is not a multiple of the VMM's.
    pub fn track_in(&self, page_size: u64) -> Result<(), String> {
        // The state's lock before the maps' (as `decide_switch` takes them, in that order).
        let state = self.snapshot();
        let mut tracked = self.tracked.write().unwrap_or_else(|p| p.into_inner());
        if tracked.page_size == page_size {
            return Ok(());
        }
        let started = state.tracking || !state.rounds.is_empty();
        if started {
            return Err(format!(
                "precopy tracks {}-byte pages already; a destination in {page_size}-byte pages cannot follow its discards",
                tracked.page_size
            ));
        }
        if page_size < self.vmm_page_size
            || !page_size.is_multiple_of(self.vmm_page_size)
            || !self.ram_bytes.is_multiple_of(page_size)
        {
            return Err(format!(
                "precopy tracks the source VMM's {}-byte pages; {page_size}-byte pages are not made of them",
                self.vmm_page_size
            ));
        }
        *tracked = Tracked {
            page_size,
            stale: Arc::new(StaleMaps::new(self.ram_bytes / page_size)),
            pieces: (page_size > self.vmm_page_size)
                .then(|| Arc::new(PageMap::new(self.ram_bytes / self.vmm_page_size))),
        };
        Ok(())
    }

    /// Whether written pages are patched (their written pieces sent) rather than dropped
    /// and sent again whole: pages larger than the VMM's.
    pub fn patches(&self) -> bool {
        self.pieces().is_some()
    }

    fn pieces(&self) -> Option<Arc<PageMap>> {
        self.tracked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pieces
            .clone()
    }

    /// Pages `first..first+count` (tracked pages) are about to be read and sent whole: a
    /// write after this is pending again.
    pub fn sending(&self, first: u64, count: u64) {
        self.stale().sending(first, count);
        if let Some(pieces) = self.pieces() {
            let per = self.page_size() / self.vmm_page_size;
            pieces.clear_range(first * per, count * per);
        }
    }

    /// Takes the bitmap of the pieces of `page` written since it was sent or patched (one
    /// bit per VMM page) and clears them, before the pieces are read: a write racing with
    /// the read is in the next dirty bitmap. Empty without pieces.
    pub fn take_pieces(&self, page: u64) -> Vec<u8> {
        let Some(pieces) = self.pieces() else {
            return Vec::new();
        };
        let per = self.page_size() / self.vmm_page_size;
        let bitmap = pieces.bitmap(page * per, per);
        pieces.clear_range(page * per, per);
        bitmap
    }

    /// The unit of dirty counts for the convergence rules: the size of what is sent again
    /// for a write (a piece when patching, else a page).
    pub fn dirty_unit(&self) -> u64 {
        if self.patches() {
            self.vmm_page_size
        } else {
            self.page_size()
        }
    }

    /// How many pieces written since their page was sent are at the destination (`sent`):
    /// what the next round patches (0 without pieces).
    pub fn dirty_pieces(&self, sent: &PageMap) -> u64 {
        let Some(pieces) = self.pieces() else {
            return 0;
        };
        let stale = self.stale();
        let pending = stale.pending();
        let per = self.page_size() / self.vmm_page_size;
        let mut n = 0;
        PageMap::bitmap_runs(0, &pending.bitmap(0, pending.total_pages()), |p, c| {
            for q in (p..p + c).filter(|&q| sent.is_set(q)) {
                n += pieces
                    .bitmap(q * per, per)
                    .iter()
                    .map(|b| u64::from(b.count_ones()))
                    .sum::<u64>();
            }
        });
        n
    }

    /// A bitmap from the VMM (its pages) in tracked pages: set where `any` of a tracked
    /// page's VMM pages is (written), or else where all are (free).
    pub fn fold<'a>(&self, bitmap: &'a [u8], any: bool) -> Cow<'a, [u8]> {
        let page_size = self.page_size();
        if page_size == self.vmm_page_size {
            return Cow::Borrowed(bitmap);
        }
        Cow::Owned(fold_bitmap(
            bitmap,
            page_size / self.vmm_page_size,
            self.ram_bytes / page_size,
            any,
        ))
    }

    /// The guest wrote the VMM pages of `bitmap`: their pages are pending, and their pieces
    /// recorded; returns how many pages became pending.
    fn record_written(&self, bitmap: &[u8]) -> u64 {
        if let Some(pieces) = self.pieces() {
            pieces.set_from_bitmap(0, pieces.total_pages(), bitmap);
        }
        self.stale().written(&self.fold(bitmap, true))
    }

    /// A snapshot of where precopy stands.
    pub fn snapshot(&self) -> PrecopyState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where precopy stands, for the control socket's `status` (names after QEMU's
    /// `query-migrate`).
    pub fn status(&self) -> PrecopyStatus {
        let state = self.snapshot();
        let total_pages = self.stale().pending().total_pages();
        let last = state.rounds.last();
        PrecopyStatus {
            strategy: self.strategy,
            phase: if state.switched {
                "postcopy"
            } else {
                "precopy"
            },
            round: state.rounds.len(),
            total_pages,
            transferred_pages: state.rounds.iter().map(|r| r.pages_sent).sum(),
            remaining_pages: last.map_or(total_pages, |r| r.dirty_pages),
            dirty_pages_rate: last.map_or(0.0, |r| r.dirty_pages as f64 / r.seconds.max(1e-6)),
            expected_downtime_ms: last.map(|r| r.expected_downtime_ms(self.dirty_unit())),
            dirty_unit_bytes: self.dirty_unit(),
            max_downtime_ms: self.max_downtime.as_millis() as u64,
            converged_by: state.converged_by,
            last_round: last.copied(),
        }
    }

    /// Whether the switch happened (sessions from now on are postcopy).
    pub fn switched(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .switched
    }

    /// Asks the VMM what the guest wrote since the last bitmap and adds it to `pending`;
    /// returns the bitmap.
    ///
    /// # Errors
    /// The VMM link failed.
    pub fn collect_dirty(&self) -> Result<Vec<u8>, SourceLinkError> {
        let bitmap = self.vmm.lock().unwrap_or_else(|p| p.into_inner()).dirty()?;
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tracking = true;
        self.record_written(&bitmap);
        Ok(bitmap)
    }

    /// Pauses the source guest and adds its last writes to `pending`.
    ///
    /// # Errors
    /// The VMM link failed.
    pub fn pause(&self) -> Result<u64, SourceLinkError> {
        let bitmap = self.vmm.lock().unwrap_or_else(|p| p.into_inner()).pause()?;
        Ok(self.record_written(&bitmap))
    }

    /// Pauses the source guest without precopy (`--strategy postcopy` with `--vmm-uds`).
    ///
    /// # Errors
    /// The VMM link failed.
    pub fn pause_now(&self) -> Result<(), SourceLinkError> {
        self.pause()?;
        // Nothing was sent before the pause: nothing can be stale at a destination.
        self.stale().nothing_sent_yet();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.switched = true;
        Ok(())
    }

    /// The source is paused: everything written since it was sent is stale at the switch
    /// (`stale_at_switch`), and sessions from now on finish the switch instead of running
    /// rounds.
    pub fn decide_switch(&self, by: ConvergedBy) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.stale().decide_switch();
        state.switched = true;
        state.converged_by = Some(by);
    }

    /// Records that the source VMM link failed (the migration cannot go on) and returns
    /// `why`.
    pub fn fail(&self, why: String) -> String {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert_with(|| why.clone());
        why
    }

    /// Why the migration cannot go on, if the source VMM link failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The paused guest's free pages, if its VMM gives hints.
    ///
    /// # Errors
    /// The VMM link failed.
    pub fn free_pages(&self) -> Result<Option<Vec<u8>>, SourceLinkError> {
        self.vmm.lock().unwrap_or_else(|p| p.into_inner()).free()
    }

    /// Tells the source VMM how the migration ended (its last message; pagesrv closes the
    /// link after it) and waits for its acknowledgement.
    ///
    /// # Errors
    /// The link failed or the VMM did not acknowledge in time.
    pub fn release(&self, outcome: &Outcome) -> Result<(), SourceLinkError> {
        self.vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_outcome(outcome, OUTCOME_ACK_WAIT)
    }

    /// Forces the switch at the end of the current round.
    pub fn force(&self) {
        self.forced.store(true, Ordering::Release);
    }

    /// Whether the switch was forced.
    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(round: u32, dirty_pages: u64) -> Round {
        Round {
            round,
            pages_sent: 1000,
            bytes: 100 << 20,
            seconds: 0.1, // 1000 MiB/s
            dirty_pages,
        }
    }

    const BUDGET: Duration = Duration::from_millis(20);

    #[test]
    fn test_switches_when_what_is_left_fits_the_budget() {
        // 20 ms at 1000 MiB/s is 20 MiB: 5120 pages of 4 KiB.
        assert_eq!(converged(&[round(1, 6000)], 4096, BUDGET, false), None);
        assert_eq!(
            converged(&[round(1, 6000), round(2, 5000)], 4096, BUDGET, false),
            Some(ConvergedBy::Budget)
        );
        assert!((round(1, 5120).expected_downtime_ms(4096) - 20.0).abs() < 0.01);
    }

    #[test]
    fn test_gives_up_after_two_rounds_without_progress() {
        let rounds = [round(1, 90_000), round(2, 60_000), round(3, 61_000)];
        assert_eq!(
            converged(&rounds, 4096, BUDGET, false),
            None,
            "one round without"
        );
        let rounds = [rounds[0], rounds[1], rounds[2], round(4, 61_000)];
        assert_eq!(
            converged(&rounds, 4096, BUDGET, false),
            Some(ConvergedBy::NoProgress)
        );
    }

    #[test]
    fn test_stops_at_the_round_limit_and_when_forced() {
        let rounds: Vec<Round> = (1..=MAX_ROUNDS)
            .map(|r| round(r, 100_000 - u64::from(r)))
            .collect();
        assert_eq!(
            converged(&rounds[..29], 4096, BUDGET, false),
            None,
            "still shrinking"
        );
        assert_eq!(
            converged(&rounds, 4096, BUDGET, false),
            Some(ConvergedBy::MaxRounds)
        );
        assert_eq!(
            converged(&[round(1, 90_000)], 4096, BUDGET, true),
            Some(ConvergedBy::Forced)
        );
        assert_eq!(converged(&[], 4096, BUDGET, true), None, "no round yet");
    }
}
