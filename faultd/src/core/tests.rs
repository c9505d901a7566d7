//! Unit tests of the fault core over the fake kernel (`fake.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::digest::page_digest;
use common::wire::{Message, PageRange};

use super::fake::{FakeKernel, PAGE};
use super::fault::FaultCore;
use super::push::{Pushed, place_pushed};
use super::vm::{Counters, Origin, Placed, Vm, ZeroPages};

fn vm() -> Vm<FakeKernel> {
    Vm::new(FakeKernel::new()).unwrap()
}

fn bytes_of(page: u64) -> Vec<u8> {
    vec![page as u8 + 1; PAGE as usize]
}

fn request(page: u64) -> Message {
    Message::Request(PageRange {
        first: page,
        count: 1,
    })
}

fn range(first: u64, count: u64) -> PageRange {
    PageRange { first, count }
}

#[test]
fn test_faults_on_one_page_send_one_request_and_the_reply_wakes_them() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(3);
    vm.kernel.fault(3);
    core.drain_events().unwrap();
    assert_eq!(core.pending.clone(), vec![request(3)]);
    core.on_reply(range(3, 1), Some(&bytes_of(3))).unwrap();
    assert_eq!(vm.kernel.page(3), Some(bytes_of(3)));
    assert_eq!(core.latencies.summary().count, 2, "both waiters resolved");
    assert!(vm.done.is_set(3));
    assert_eq!(Counters::get(&vm.counters.pages_requested), 1);
    assert_eq!(
        Counters::get(&vm.counters.demand_faults),
        1,
        "one page awaited"
    );
}

#[test]
fn test_fault_on_a_zero_page_is_served_locally() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.place(4, 2, None, Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    assert_eq!(
        vm.kernel.page(4),
        None,
        "zero pages are not placed until touched"
    );
    vm.kernel.fault(5);
    core.drain_events().unwrap();
    assert!(core.pending.is_empty(), "no request for a zero page");
    assert_eq!(vm.kernel.page(5), Some(vec![0; PAGE as usize]));
}

#[test]
fn test_remove_before_the_reply_skips_the_page_and_it_reads_zero() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(7);
    core.drain_events().unwrap();
    core.pending.clear();
    // The balloon takes page 7 while its request is in flight.
    vm.kernel.remove(6, 3);
    core.drain_events().unwrap();
    assert_eq!(core.pending.clone(), vec![Message::Skip(range(6, 3))]);
    assert!(vm.skipped.is_set(7) && vm.zero.is_set(7));
    // The waiter's zero page met EAGAIN (the VMM's thread has not resumed): deferred, and
    // nothing spins on it.
    assert!(core.has_deferred());
    vm.kernel.resume_vmm();
    core.drain_events().unwrap();
    assert!(!core.has_deferred());
    assert_eq!(vm.kernel.page(7), Some(vec![0; PAGE as usize]));
    assert_eq!(core.latencies.summary().count, 1);
    // The reply arrives late: it must not bring the old bytes back.
    core.on_reply(range(7, 1), Some(&bytes_of(7))).unwrap();
    assert_eq!(vm.kernel.page(7), Some(vec![0; PAGE as usize]));
    assert_eq!(
        vm.chunk_digests(),
        vec![0],
        "a skipped page is not digested"
    );
    assert_eq!(Counters::get(&vm.counters.pages_removed), 3);
}

#[test]
fn test_remove_after_the_reply_keeps_the_digest_and_refaults_locally() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(2);
    core.drain_events().unwrap();
    core.on_reply(range(2, 1), Some(&bytes_of(2))).unwrap();
    core.pending.clear();
    vm.kernel.remove(2, 1);
    core.drain_events().unwrap();
    vm.kernel.resume_vmm();
    assert!(core.pending.is_empty(), "the page arrived: nothing to skip");
    assert!(!vm.skipped.is_set(2));
    assert_eq!(vm.kernel.page(2), None, "the VMM zapped it");
    vm.kernel.fault(2);
    core.drain_events().unwrap();
    assert!(
        core.pending.is_empty(),
        "a removed page is never fetched again"
    );
    assert_eq!(vm.kernel.page(2), Some(vec![0; PAGE as usize]));
    assert_eq!(vm.chunk_digests(), vec![page_digest(2, &bytes_of(2))]);
}

#[test]
fn test_a_fault_read_in_the_same_batch_as_an_earlier_remove_is_not_fetched() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.remove(9, 1);
    vm.kernel.fault(9);
    core.drain_events().unwrap();
    assert_eq!(core.pending.clone(), vec![Message::Skip(range(9, 1))]);
    vm.kernel.resume_vmm();
    core.drain_events().unwrap();
    assert_eq!(vm.kernel.page(9), Some(vec![0; PAGE as usize]));
}

#[test]
fn test_eexist_race_digests_only_the_bytes_that_landed() {
    let vm = vm();
    // Another placement's copy landed first but has not marked the page done yet.
    vm.kernel.st().memory[11] = Some(bytes_of(100));
    let placed = vm
        .place(
            10,
            3,
            Some(&[bytes_of(10), bytes_of(11), bytes_of(12)].concat()),
            Origin::Pushed,
            ZeroPages::Skip,
        )
        .unwrap();
    assert_eq!(placed, Placed::Done);
    assert!(vm.done.is_set(11));
    assert_eq!(
        vm.kernel.page(11),
        Some(bytes_of(100)),
        "EEXIST keeps the first bytes"
    );
    let expected = page_digest(10, &bytes_of(10)).wrapping_add(page_digest(12, &bytes_of(12)));
    assert_eq!(
        vm.chunk_digests(),
        vec![expected],
        "page 11 is the other placement's to digest"
    );
    assert_eq!(Counters::get(&vm.counters.pages_pushed), 2);
}

#[test]
fn test_eagain_during_a_cut_stops_the_bulk_placement_without_spinning() {
    let vm = vm();
    // A REMOVE nobody reads: the event reader is busy elsewhere (or cutting the link).
    vm.kernel.remove(0, 1);
    let stop = AtomicBool::new(false);
    let data = [bytes_of(20), bytes_of(21)].concat();
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        let bulk = s.spawn(|| place_pushed(&vm, 20, 2, Some(&data), &stop));
        std::thread::sleep(Duration::from_millis(30));
        // The cut: set the stop flag and wake the waiting placement; never join first.
        stop.store(true, Ordering::Release);
        vm.wake_waiting_placements();
        bulk.join().unwrap()
    });
    assert_eq!(result.unwrap(), Pushed::Stopped);
    assert!(started.elapsed() < Duration::from_secs(5));
    let calls = vm.kernel.st().install_calls;
    assert!(
        (1..=200).contains(&calls),
        "{calls} placement attempts in ~30 ms: retries wait for the event reader"
    );
    assert_eq!(vm.kernel.page(20), None);
}

#[test]
fn test_eagain_is_retried_once_the_events_are_read() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    vm.kernel.remove(0, 1);
    let stop = AtomicBool::new(false);
    let data = [bytes_of(20), bytes_of(21)].concat();
    let result = std::thread::scope(|s| {
        let bulk = s.spawn(|| place_pushed(&vm, 20, 2, Some(&data), &stop));
        std::thread::sleep(Duration::from_millis(5));
        core.drain_events().unwrap();
        vm.kernel.resume_vmm();
        bulk.join().unwrap()
    });
    assert_eq!(result.unwrap(), Pushed::Done);
    assert_eq!(vm.kernel.page(21), Some(bytes_of(21)));
    assert!(Counters::get(&vm.counters.placement_retries) >= 1);
}

#[test]
fn test_a_reply_deferred_by_eagain_is_placed_after_a_cut() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(12);
    core.drain_events().unwrap();
    vm.kernel.remove(30, 1);
    // The reply arrives while the REMOVE is unread: deferred with its bytes.
    core.on_reply(range(12, 1), Some(&bytes_of(12))).unwrap();
    assert!(core.has_deferred());
    core.link_down();
    core.drain_events().unwrap();
    vm.kernel.resume_vmm();
    core.drain_events().unwrap();
    assert!(!core.has_deferred());
    assert_eq!(vm.kernel.page(12), Some(bytes_of(12)));
    core.link_up();
    assert!(
        !core.pending.clone().contains(&request(12)),
        "a page placed from a deferred reply is not requested again"
    );
}

#[test]
fn test_requests_and_skips_go_out_again_on_a_new_link() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(1);
    core.drain_events().unwrap();
    core.link_down();
    assert!(core.pending.is_empty());
    vm.kernel.fault(2);
    vm.kernel.remove(25, 2);
    core.drain_events().unwrap();
    assert!(
        core.pending.is_empty(),
        "nothing is queued while the link is down"
    );
    vm.kernel.resume_vmm();
    core.link_up();
    let mut sent = core.pending.clone();
    sent.sort_by_key(|m| format!("{m:?}"));
    assert_eq!(
        sent,
        vec![request(1), request(2), Message::Skip(range(25, 2))]
    );
}

#[test]
fn test_a_fault_held_while_its_page_turned_zero_is_filled_on_the_next_link() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    // Held: the link is down (or waits for the free pages); the fault is only recorded.
    vm.kernel.fault(7);
    core.drain_events().unwrap();
    // The bulk connection says page 7 is zero (a free page, a zero range): nothing placed.
    vm.place(7, 1, None, Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    assert_eq!(vm.kernel.page(7), None);
    core.link_up();
    assert!(core.pending.is_empty(), "a zero page is never requested");
    core.drain_events().unwrap();
    assert_eq!(
        vm.kernel.page(7),
        Some(vec![0; PAGE as usize]),
        "the waiting thread gets its zero page (else it sleeps until completion)"
    );
    assert_eq!(core.latencies.summary().count, 1);
}

#[test]
fn test_a_discard_drops_pages_takes_back_their_digests_and_they_arrive_again() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    // Precopy round 1: pages 0..4 with data, 4..6 zero.
    let old: Vec<u8> = (0..4).flat_map(bytes_of).collect();
    vm.place(0, 4, Some(&old), Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    vm.place(4, 2, None, Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    // The source wrote pages 1 and 4 after sending them, and page 9 it never sent.
    let dropped = vm.discard(0, 16, &[0b0001_0010, 0b10]).unwrap();
    assert_eq!(dropped, 2);
    assert_eq!(vm.kernel.page(1), None, "dropped: the next touch faults");
    assert!(!vm.done.is_set(1) && !vm.done.is_set(4) && !vm.zero.is_set(4));
    assert_eq!(vm.kernel.page(0), Some(bytes_of(0)), "the others stay");
    // Round 2 sends their new contents; the digest is of what is there now.
    let new = vec![0xEE; PAGE as usize];
    vm.place(1, 1, Some(&new), Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    vm.place(4, 1, Some(&new), Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    let expected = [
        page_digest(0, &bytes_of(0)),
        page_digest(1, &new),
        page_digest(2, &bytes_of(2)),
        page_digest(3, &bytes_of(3)),
        page_digest(4, &new),
    ]
    .iter()
    .fold(0u64, |a, d| a.wrapping_add(*d));
    assert_eq!(vm.chunk_digests(), vec![expected]);
    // A fault on a dropped page that was not sent again is requested.
    vm.discard(0, 8, &[0b1]).unwrap();
    vm.kernel.fault(0);
    core.drain_events().unwrap();
    assert_eq!(core.pending, vec![request(0)]);
}

#[test]
fn test_completion_drops_unsent_requests_and_keeps_skips() {
    // A fault read while its page was missing queues a request; the bulk stream brings the
    // page (and every other) before the request is written. Once every page is present
    // the request must not go out: pagesrv waits for the verdict after the digests.
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    core.link_up();
    vm.kernel.fault(9);
    vm.kernel.remove(30, 2);
    core.drain_events().unwrap();
    assert_eq!(
        core.pending.clone(),
        vec![Message::Skip(range(30, 2)), request(9)]
    );
    let data: Vec<u8> = (0..30).flat_map(bytes_of).collect();
    vm.kernel.resume_vmm();
    let stop = AtomicBool::new(false);
    assert_eq!(
        place_pushed(&vm, 0, 30, Some(&data), &stop).unwrap(),
        Pushed::Done
    );
    assert!(vm.is_complete());
    core.resolve_all();
    assert_eq!(core.pending.clone(), vec![Message::Skip(range(30, 2))]);
    assert_eq!(core.pages_in_flight(), 0);
    assert_eq!(core.latencies.summary().count, 1, "the waiter was resolved");
}

#[test]
fn test_a_patch_writes_its_pieces_in_place_and_keeps_the_digest_true() {
    let vm = vm();
    let digest_of = |pages: &[(u64, Vec<u8>)]| {
        pages
            .iter()
            .fold(0u64, |d, (p, b)| d.wrapping_add(page_digest(*p, b)))
    };
    // Page 2 with data, page 5 placed as zero; 16-byte pieces (4 to a page).
    vm.place(2, 1, Some(&bytes_of(2)), Origin::Pushed, ZeroPages::Fill)
        .unwrap();
    vm.place(5, 1, None, Origin::Pushed, ZeroPages::Fill)
        .unwrap();
    let piece = |b: u8| vec![b; 16];
    // Pieces 1 and 3 of page 2.
    let pieces = [piece(0xA1), piece(0xA3)].concat();
    assert!(vm.patch(2, 16, &[0b1010], &pieces).unwrap());
    let mut want2 = bytes_of(2);
    want2[16..32].copy_from_slice(&piece(0xA1));
    want2[48..64].copy_from_slice(&piece(0xA3));
    assert_eq!(vm.kernel.page(2).unwrap(), want2);
    // Piece 0 of the zero page: it holds data from now on.
    assert!(vm.patch(5, 16, &[0b0001], &piece(0x55)).unwrap());
    let mut want5 = vec![0u8; PAGE as usize];
    want5[..16].copy_from_slice(&piece(0x55));
    assert_eq!(vm.kernel.page(5).unwrap(), want5);
    assert!(!vm.zero.is_set(5));
    assert_eq!(
        vm.chunk_digests()[0],
        digest_of(&[(2, want2), (5, want5)]),
        "the digests are those of the patched bytes"
    );
    // A page that is not here is left alone.
    assert!(!vm.patch(7, 16, &[1], &piece(1)).unwrap());
    assert!(vm.kernel.page(7).is_none());
}

#[test]
fn test_a_zero_page_is_filled_once_so_a_late_fill_never_writes_over_the_guest() {
    let vm = vm();
    let calls = || vm.kernel.st().install_calls;
    vm.place(5, 1, None, Origin::Requested, ZeroPages::Fill)
        .unwrap();
    assert_eq!(calls(), 1);
    // The guest writes the page; a request's answer (zero too) arrives after the push's.
    vm.kernel.write(5, vec![9; PAGE as usize]);
    vm.place(5, 1, None, Origin::Requested, ZeroPages::Fill)
        .unwrap();
    assert_eq!(calls(), 1, "no second fill");
    assert_eq!(vm.kernel.page(5).unwrap(), vec![9; PAGE as usize]);
    // A discard takes the page away: the next fill fills it again.
    vm.discard(5, 1, &[1]).unwrap();
    vm.place(5, 1, None, Origin::Requested, ZeroPages::Fill)
        .unwrap();
    assert_eq!(calls(), 2);
}

#[test]
fn test_pages_another_restore_placed_in_a_shared_file_are_taken_over_skipped_and_woken() {
    let unshared = vm();
    let mut core = FaultCore::new(&unshared);
    core.link_up();
    assert_eq!(core.adopt_shared(64).unwrap(), None, "RAM not shared");
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    let mut file = vec![false; super::fake::PAGES as usize];
    for p in [4, 5, 6, 7, 20] {
        file[p] = true;
    }
    vm.kernel.st().shared_file = Some(file);
    assert_eq!(
        core.adopt_shared(64).unwrap(),
        Some(0),
        "nothing is taken while the link is down (a skip belongs to a serving session)"
    );
    core.link_up();
    vm.kernel.fault(5);
    core.drain_events().unwrap();
    assert_eq!(core.pending.clone(), vec![request(5)]);
    core.pending.clear();
    // Page 6 is placed here too (it is this restore's, not taken over).
    vm.place(6, 1, Some(&bytes_of(6)), Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    assert_eq!(core.adopt_shared(64).unwrap(), Some(4));
    assert_eq!(
        core.pending.clone(),
        vec![
            Message::Skip(range(4, 2)),
            Message::Skip(range(7, 1)),
            Message::Skip(range(20, 1))
        ]
    );
    assert!(vm.kernel.st().woken.contains(&5), "the fault on 5 is woken");
    assert_eq!(core.latencies.summary().count, 1);
    for p in [4, 5, 7, 20] {
        assert!(vm.done.is_set(p) && vm.skipped.is_set(p), "page {p}");
    }
    assert!(!vm.skipped.is_set(6));
    assert_eq!(Counters::get(&vm.counters.pages_shared), 4);
    // The page arriving after all is not placed again (the file holds it).
    let calls = vm.kernel.st().install_calls;
    vm.place(7, 1, Some(&bytes_of(7)), Origin::Pushed, ZeroPages::Skip)
        .unwrap();
    assert_eq!(vm.kernel.st().install_calls, calls);
    // A second look finds nothing new.
    core.pending.clear();
    assert_eq!(core.adopt_shared(64).unwrap(), Some(0));
    assert!(core.pending.is_empty());
}

#[test]
fn test_a_look_at_a_shared_file_covers_at_most_its_pages_and_goes_on_from_there() {
    let vm = vm();
    let mut core = FaultCore::new(&vm);
    vm.kernel.st().shared_file = Some(vec![true; super::fake::PAGES as usize]);
    core.link_up();
    assert_eq!(core.adopt_shared(10).unwrap(), Some(10));
    assert_eq!(core.adopt_shared(10).unwrap(), Some(10));
    assert_eq!(core.adopt_shared(100).unwrap(), Some(12));
    assert!(vm.is_complete());
}
