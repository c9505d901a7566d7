//! What fetch failures lost: a count that sessions compare with the one they started at,
//! the last reason, and the first damage (final: fetching again cannot mend it).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Fetches that failed and lost pages a reader waited for.
#[derive(Debug, Default)]
pub(super) struct Losses {
    /// How many: a session whose reads began at another count may have lent zeros.
    count: AtomicU64,
    reasons: Mutex<Reasons>,
}

#[derive(Debug, Default)]
struct Reasons {
    last: Option<String>,
    damage: Option<String>,
}

impl Losses {
    /// Losses so far.
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Records a loss, for reason `why`; `damaged`: the store's bytes were not what their
    /// hash says (the first such reason is kept for good).
    pub(super) fn record(&self, why: String, damaged: bool) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        if damaged && reasons.damage.is_none() {
            reasons.damage = Some(why.clone());
        }
        reasons.last = Some(why);
        drop(reasons);
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// The first damage found, if any: no new session can be served.
    pub(super) fn damage(&self) -> Option<String> {
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .damage
            .clone()
    }

    /// The last loss's reason, if any loss happened since the count was `at_start`.
    pub(super) fn since(&self, at_start: u64) -> Option<String> {
        if self.count() == at_start {
            return None;
        }
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        Some(reasons.last.clone().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::Losses;

    #[test]
    fn a_session_sees_the_losses_after_its_start_and_damage_stays_final() {
        let losses = Losses::default();
        let early = losses.count();
        assert_eq!(losses.since(early), None);
        assert_eq!(losses.damage(), None);

        losses.record("the store is away".into(), false);
        assert_eq!(losses.since(early).as_deref(), Some("the store is away"));
        assert_eq!(losses.damage(), None, "an outage is not final");
        // A session that starts now has lost nothing.
        let later = losses.count();
        assert_eq!(losses.since(later), None);

        losses.record("frame 3 is damaged".into(), true);
        losses.record("the store is away again".into(), false);
        assert_eq!(losses.damage().as_deref(), Some("frame 3 is damaged"));
        assert_eq!(
            losses.since(later).as_deref(),
            Some("the store is away again")
        );
    }
}
