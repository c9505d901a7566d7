//! The bulk connection's script as data: which steps a session takes, in which order,
//! decided once from what the destination was welcomed with. pagesrv's bulk thread
//! (`Session::push_background`) walks it; the order's rules are unit tests here.
//!
//! ```text
//!  AwaitMaps ─► FreePages ─► [SyncFree] ─► [OfferHashes] ─► [Precopy ─► SyncSwitch] ─► Push ─► BulkDone
//! ```

/// One step of the bulk script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkStep {
    /// Wait for the destination's maps (what it holds after a reconnect), with heartbeats.
    AwaitMaps,
    /// The free pages not sent yet, as zero ranges.
    FreePages,
    /// A `Sync` after the free pages (`FLAG_FREE`): the destination asks for nothing until
    /// then, so no fault on a free page becomes a request.
    SyncFree,
    /// The hashes of the pages not sent yet, for a destination with a base image
    /// (`FLAG_BASE`); those it holds count as sent.
    OfferHashes,
    /// Precopy rounds, the pause and the switch (`FLAG_PRECOPY`), or the end of a switch a
    /// reconnecting destination missed.
    Precopy,
    /// A `Sync` after the switch: its discards are applied before an extra stream may
    /// resend a page they drop (else the resent page is skipped as present, then dropped).
    SyncSwitch,
    /// Open the extra streams and push every page not sent.
    Push,
    /// `BulkDone`, then hold the connection open until the destination closes it.
    BulkDone,
}

/// The steps of one session's bulk connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkPlan {
    steps: Vec<BulkStep>,
}

impl BulkPlan {
    /// The script for a destination welcomed with free pages first, a base image and
    /// precopy as given.
    pub fn new(free_first: bool, base: bool, precopy: bool) -> Self {
        let mut steps = vec![BulkStep::AwaitMaps, BulkStep::FreePages];
        if free_first {
            steps.push(BulkStep::SyncFree);
        }
        if base {
            steps.push(BulkStep::OfferHashes);
        }
        if precopy {
            steps.extend([BulkStep::Precopy, BulkStep::SyncSwitch]);
        }
        steps.extend([BulkStep::Push, BulkStep::BulkDone]);
        BulkPlan { steps }
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[BulkStep] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_plan() -> impl Iterator<Item = ((bool, bool, bool), BulkPlan)> {
        (0..8u8).map(|bits| {
            let flags = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            (flags, BulkPlan::new(flags.0, flags.1, flags.2))
        })
    }

    fn position(plan: &BulkPlan, step: BulkStep) -> Option<usize> {
        plan.steps().iter().position(|&s| s == step)
    }

    #[test]
    fn test_maps_first_push_and_done_last_each_step_once() {
        for (flags, plan) in every_plan() {
            let steps = plan.steps();
            assert_eq!(steps.first(), Some(&BulkStep::AwaitMaps), "{flags:?}");
            assert_eq!(
                &steps[steps.len() - 2..],
                &[BulkStep::Push, BulkStep::BulkDone],
                "{flags:?}"
            );
            for (i, step) in steps.iter().enumerate() {
                assert!(!steps[i + 1..].contains(step), "{step:?} twice: {flags:?}");
            }
        }
    }

    #[test]
    fn test_the_flags_choose_their_steps() {
        for ((free_first, base, precopy), plan) in every_plan() {
            assert_eq!(position(&plan, BulkStep::SyncFree).is_some(), free_first);
            assert_eq!(position(&plan, BulkStep::OfferHashes).is_some(), base);
            assert_eq!(position(&plan, BulkStep::Precopy).is_some(), precopy);
            assert_eq!(position(&plan, BulkStep::SyncSwitch).is_some(), precopy);
            // Free pages are always offered (there may be none).
            assert!(position(&plan, BulkStep::FreePages).is_some());
        }
    }

    #[test]
    fn test_the_order_rules_hold_in_every_combination() {
        let before = |plan: &BulkPlan, a, b| match (position(plan, a), position(plan, b)) {
            (Some(a), Some(b)) => a < b,
            _ => true,
        };
        for (flags, plan) in every_plan() {
            // Free pages go as zero ranges before their hashes could be offered or a round
            // could send them as data; the sync that releases the destination's faults
            // follows them at once.
            assert!(
                before(&plan, BulkStep::FreePages, BulkStep::SyncFree),
                "{flags:?}"
            );
            assert_eq!(
                position(&plan, BulkStep::SyncFree).map(|i| i - 1),
                position(&plan, BulkStep::FreePages).filter(|_| flags.0),
                "{flags:?}"
            );
            assert!(before(&plan, BulkStep::FreePages, BulkStep::OfferHashes));
            // The base's pages are placed before a precopy round would send them.
            assert!(before(&plan, BulkStep::OfferHashes, BulkStep::Precopy));
            // The switch's discards are applied before any push (and any extra stream).
            assert_eq!(
                position(&plan, BulkStep::SyncSwitch).map(|i| i + 1),
                position(&plan, BulkStep::Push).filter(|_| flags.2),
                "{flags:?}"
            );
            assert!(before(&plan, BulkStep::Precopy, BulkStep::SyncSwitch));
        }
    }
}
