//! The order of a session's precopy, as data: what pagesrv's bulk thread does (and the
//! simulation's source does) on the bulk connection from the welcome to the `Switchover`.
//! The caller carries each step out and, after [`PrecopyStep::CheckConvergence`], says
//! whether the rounds converged.
//!
//! ```text
//!  Begin ─┬─ switched already ─────────────────────────────────────────► finish
//!         └─ [StartTracking] ─► round: RefreshFreeHints, SendRound, CollectDirty,
//!              CheckConvergence ─no─► DropWritten ─► round
//!                               ─yes─► [DropWritten (hybrid)] ─► CatchUp ─► Pause ─► finish
//!  finish: DropStaleAtSwitch ─► SendFreePages ─► [SendUnsent (stop-and-copy)] ─► Switchover
//! ```

/// One step of a session's precopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecopyStep {
    /// Drop at the destination what was written since it got it (and, made pending when
    /// the session began, what a cut link's discards may have missed:
    /// `StaleMaps::session_begins`, called before any step of the bulk plan, since a `Sync`
    /// of the new session confirms every discard before it).
    Begin,
    /// Ask the source VMM for its first dirty bitmap (tracking starts).
    StartTracking,
    /// Take the guest's free-page hints.
    RefreshFreeHints,
    /// Send every page not sent yet (a round).
    SendRound,
    /// Ask the source VMM what the guest wrote during the round.
    CollectDirty,
    /// Record the round and decide: call [`PrecopyPlan::converged`] before the next step.
    CheckConvergence,
    /// Drop at the destination what the guest wrote since it got it (sent again later).
    DropWritten,
    /// `Sync`: the destination applies everything sent so far before the source stops.
    CatchUp,
    /// Pause the source guest, take its last writes and free pages, decide the switch.
    Pause,
    /// Drop at the destination what was stale when the switch was decided.
    DropStaleAtSwitch,
    /// The free pages the destination lacks, as zero, before its guest resumes.
    SendFreePages,
    /// Stop-and-copy: every page not sent, before the guest resumes.
    SendUnsent,
    /// `Switchover`: the destination's guest may resume; postcopy moves the rest.
    Switchover,
    /// Precopy is over on this session.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Begin,
    Tracking,
    Round(PrecopyStep),
    Deciding,
    Converged(PrecopyStep),
    Finish(PrecopyStep),
    Done,
}

/// Where one session's precopy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecopyPlan {
    at: At,
    switched: bool,
    tracking: bool,
    /// Stop-and-copy (`--strategy precopy`): the rest goes before the guest resumes; else
    /// (hybrid) what was written during the last round is dropped before the catch-up.
    stop_and_copy: bool,
}

impl PrecopyPlan {
    /// A session's precopy: `switched`, the source paused already (this destination missed
    /// the end of the switch); `tracking`, dirty tracking runs already; `stop_and_copy`, the
    /// precopy strategy (else hybrid).
    pub fn new(switched: bool, tracking: bool, stop_and_copy: bool) -> Self {
        PrecopyPlan {
            at: At::Begin,
            switched,
            tracking,
            stop_and_copy,
        }
    }

    /// The next step.
    ///
    /// # Panics
    /// After [`PrecopyStep::CheckConvergence`] without [`PrecopyPlan::converged`] (a bug
    /// of the caller's, not an input).
    pub fn next_step(&mut self) -> PrecopyStep {
        use PrecopyStep::*;
        let (step, at) = match self.at {
            At::Begin => (
                Begin,
                if self.switched {
                    At::Finish(DropStaleAtSwitch)
                } else if self.tracking {
                    At::Round(RefreshFreeHints)
                } else {
                    At::Tracking
                },
            ),
            At::Tracking => (StartTracking, At::Round(RefreshFreeHints)),
            At::Round(step) => (
                step,
                match step {
                    RefreshFreeHints => At::Round(SendRound),
                    SendRound => At::Round(CollectDirty),
                    CollectDirty => At::Round(CheckConvergence),
                    CheckConvergence => At::Deciding,
                    DropWritten => At::Round(RefreshFreeHints),
                    other => unreachable!("{other:?} is not a round's step"),
                },
            ),
            At::Deciding => panic!("CheckConvergence needs PrecopyPlan::converged first"),
            At::Converged(step) => (
                step,
                match step {
                    DropWritten => At::Converged(CatchUp),
                    CatchUp => At::Converged(Pause),
                    Pause => At::Finish(DropStaleAtSwitch),
                    other => unreachable!("{other:?} is not a step after convergence"),
                },
            ),
            At::Finish(step) => (
                step,
                match step {
                    DropStaleAtSwitch => At::Finish(SendFreePages),
                    SendFreePages if self.stop_and_copy => At::Finish(SendUnsent),
                    SendFreePages | SendUnsent => At::Finish(Switchover),
                    Switchover => At::Done,
                    other => unreachable!("{other:?} is not a step of the switch"),
                },
            ),
            At::Done => (Done, At::Done),
        };
        self.at = at;
        step
    }

    /// The answer to [`PrecopyStep::CheckConvergence`]: `true`, the rounds converged (or
    /// the switch was forced); `false`, another round.
    pub fn converged(&mut self, converged: bool) {
        debug_assert_eq!(
            self.at,
            At::Deciding,
            "converged() answers CheckConvergence"
        );
        self.at = match (converged, self.stop_and_copy) {
            (false, _) => At::Round(PrecopyStep::DropWritten),
            (true, false) => At::Converged(PrecopyStep::DropWritten),
            (true, true) => At::Converged(PrecopyStep::CatchUp),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::PrecopyStep::*;
    use super::*;

    /// Every step of a plan, answering `rounds` convergence checks no, then yes.
    fn walk(mut plan: PrecopyPlan, rounds: usize) -> Vec<PrecopyStep> {
        let mut steps = Vec::new();
        let mut checks = 0;
        loop {
            let step = plan.next_step();
            steps.push(step);
            match step {
                CheckConvergence => {
                    checks += 1;
                    plan.converged(checks > rounds);
                }
                Done => return steps,
                _ => {}
            }
            assert!(steps.len() < 100, "no end: {steps:?}");
        }
    }

    #[test]
    fn test_hybrid_drops_what_was_written_before_each_round_and_before_the_catch_up() {
        let steps = walk(PrecopyPlan::new(false, false, false), 1);
        assert_eq!(
            steps,
            vec![
                Begin,
                StartTracking,
                RefreshFreeHints,
                SendRound,
                CollectDirty,
                CheckConvergence,
                DropWritten,
                RefreshFreeHints,
                SendRound,
                CollectDirty,
                CheckConvergence,
                DropWritten,
                CatchUp,
                Pause,
                DropStaleAtSwitch,
                SendFreePages,
                Switchover,
                Done
            ]
        );
    }

    #[test]
    fn test_stop_and_copy_sends_the_rest_before_the_switchover() {
        let steps = walk(PrecopyPlan::new(false, true, true), 0);
        assert_eq!(
            steps,
            vec![
                Begin,
                RefreshFreeHints,
                SendRound,
                CollectDirty,
                CheckConvergence,
                CatchUp,
                Pause,
                DropStaleAtSwitch,
                SendFreePages,
                SendUnsent,
                Switchover,
                Done
            ]
        );
    }

    #[test]
    fn test_a_destination_that_missed_the_switch_gets_only_its_end() {
        for stop_and_copy in [false, true] {
            let steps = walk(PrecopyPlan::new(true, true, stop_and_copy), 0);
            assert_eq!(steps[0], Begin);
            assert!(!steps.contains(&SendRound) && !steps.contains(&Pause));
            assert_eq!(steps[steps.len() - 2..], [Switchover, Done]);
            assert_eq!(steps.contains(&SendUnsent), stop_and_copy);
        }
    }

    #[test]
    fn test_the_order_rules_hold_for_any_number_of_rounds() {
        for rounds in 0..5 {
            for (tracking, stop_and_copy) in [(false, false), (true, false), (false, true)] {
                let steps = walk(PrecopyPlan::new(false, tracking, stop_and_copy), rounds);
                let at = |s| steps.iter().position(|&x| x == s).unwrap();
                // Everything sent is applied before the pause, and the stale pages are
                // dropped before the guest may resume.
                assert!(at(CatchUp) < at(Pause) && at(Pause) < at(DropStaleAtSwitch));
                assert!(at(DropStaleAtSwitch) < at(Switchover));
                assert_eq!(
                    steps.iter().filter(|&&s| s == SendRound).count(),
                    rounds + 1
                );
                // Between two rounds, what was written is dropped first.
                for w in steps.windows(6) {
                    if w[0] == CheckConvergence && w.contains(&SendRound) {
                        assert_eq!(w[1], DropWritten, "{steps:?}");
                    }
                }
            }
        }
    }
}
