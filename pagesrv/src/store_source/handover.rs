//! A fetch's word to the read that started it and left it running in the background: the
//! frames the read needs are in (pinned for it), or they will not come.

use std::sync::{Condvar, Mutex};

/// One answer, given once (later answers are ignored), awaited by one reader.
#[derive(Debug, Default)]
pub(super) struct Handover {
    outcome: Mutex<Option<bool>>,
    answered: Condvar,
}

impl Handover {
    /// Gives the answer, unless one was given.
    pub(super) fn answer(&self, ok: bool) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if outcome.is_none() {
            *outcome = Some(ok);
            self.answered.notify_all();
        }
    }

    /// The answer, if one was given.
    pub(super) fn given(&self) -> Option<bool> {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the answer.
    pub(super) fn wait(&self) -> bool {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ok) = *outcome {
                return ok;
            }
            outcome = self
                .answered
                .wait(outcome)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Handover;
    use std::sync::Arc;

    #[test]
    fn test_the_first_answer_stands_and_wakes_the_reader() {
        let handover = Arc::new(Handover::default());
        let reader = {
            let handover = handover.clone();
            std::thread::spawn(move || handover.wait())
        };
        handover.answer(true);
        handover.answer(false);
        assert!(reader.join().unwrap());
        assert!(handover.wait());
        assert_eq!(handover.given(), Some(true));
        assert_eq!(Handover::default().given(), None);
        let failed = Handover::default();
        failed.answer(false);
        failed.answer(true);
        assert!(!failed.wait());
    }
}
