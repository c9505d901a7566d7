//! The connector's rules for opening a new link after a cut, as plain functions: the
//! connector thread (`upstream/link.rs`) applies them, and so does the simulation (so a
//! change to them is a change it tests). Together with `BulkRx`'s stop check they keep a
//! `Switchover` (or a `Discard`) read from a cut link from acting on the next one.

/// Whether a new link may be opened: no bulk thread of an old link still runs. What such a
/// thread still applies (a switch, a discard) must come before the maps the new link sends,
/// and its events (the switch) reach the pump before the new link's (one channel, in order).
pub fn may_open(old_bulk_threads: usize) -> bool {
    old_bulk_threads == 0
}

/// What a new link's `Hello` says of the guest here: it runs if it ran already or its VMM
/// was told to resume it (the switch was announced). The source must then not run precopy
/// with it again: its discards would drop pages the guest wrote.
pub fn resumed(pinned: bool, switch_announced: bool) -> bool {
    pinned || switch_announced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_new_link_waits_for_old_bulk_threads_and_says_the_guest_runs() {
        assert!(may_open(0));
        assert!(!may_open(1) && !may_open(3));
        assert!(!resumed(false, false));
        assert!(resumed(false, true), "announced: the guest runs");
        assert!(resumed(true, false), "a pin is never taken back");
    }
}
