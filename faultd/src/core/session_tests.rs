//! Unit tests of the destination's session (`session.rs`) over the fake kernel: frames in
//! and out as bytes, no socket, no thread, the clock passed in.

use std::time::{Duration, Instant};

use common::framed::{FrameEncoder, FrameReader};
use common::netopt::Liveness;
use common::wire::{Decoder, ErrorCode, Message, PageRange};

use super::fake::{FakeKernel, PAGE, PAGES};
use super::session::{
    AfterCut, DestSession, FrameError, LinkFault, LinkState, SessionError, Verdict,
};
use super::vm::{Origin, Vm, ZeroPages};

fn vm() -> Vm<FakeKernel> {
    Vm::new(FakeKernel::new()).unwrap()
}

fn liveness() -> Liveness {
    Liveness::new(Duration::from_secs(2))
}

fn link(generation: u64, precopy: bool, awaiting_free: bool, now: Instant) -> LinkState {
    LinkState::new(
        generation,
        FrameReader::new(Decoder::session(PAGE, PAGES)),
        FrameEncoder::plain(),
        precopy,
        awaiting_free,
        now,
    )
}

/// What the session would write now, decoded (and taken out of the outbox).
fn sent<K: super::kernel::Kernel>(s: &mut DestSession<'_, K>, now: Instant) -> Vec<Message> {
    s.prepare_transmit();
    let bytes = s.outbox().to_vec();
    s.sent(bytes.len(), now);
    let mut reader = FrameReader::new(Decoder::session(PAGE, PAGES));
    let mut src = bytes.as_slice();
    let mut out = Vec::new();
    while let Ok((m, _)) = reader.read_frame(&mut src) {
        out.push(m);
    }
    out
}

/// pagesrv's frames arriving on the urgent connection.
fn receive<K: super::kernel::Kernel>(
    s: &mut DestSession<'_, K>,
    frames: &[(Message, &[u8])],
    now: Instant,
) -> Result<(), FrameError> {
    let mut bytes = Vec::new();
    let mut tx = FrameEncoder::plain();
    for (m, payload) in frames {
        tx.encode(m, payload, &mut bytes);
    }
    s.urgent_reader()
        .expect("a link")
        .fill(&mut bytes.as_slice())
        .unwrap();
    s.on_urgent_bytes(now)
}

fn request(page: u64) -> Message {
    Message::Request(PageRange {
        first: page,
        count: 1,
    })
}

/// Every page arrives (pushed).
fn push_everything<K: super::kernel::Kernel>(vm: &Vm<K>) {
    let data: Vec<u8> = (0..PAGES * PAGE).map(|i| (i % 251) as u8 + 1).collect();
    vm.place(0, PAGES, Some(&data), Origin::Pushed, ZeroPages::Fill)
        .unwrap();
}

/// pagesrv's digests of what the fake holds now.
fn digests_of<K: super::kernel::Kernel>(vm: &Vm<K>) -> Vec<u8> {
    vm.chunk_digests()
        .into_iter()
        .flat_map(u64::to_le_bytes)
        .collect()
}

#[test]
fn test_faults_in_precopy_wait_for_the_switch() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    assert!(
        !s.link_up(link(1, true, false, t0), false, true).unwrap(),
        "the guest waits"
    );
    assert_eq!(s.stage_name(), "precopy");
    vm.kernel.fault(3);
    s.on_uffd().unwrap();
    assert!(
        sent(&mut s, t0).is_empty(),
        "no request in precopy: a reply could race a discard"
    );
    assert!(s.on_switched(1, t0 + Duration::from_millis(5)));
    assert_eq!(s.stage_name(), "postcopy");
    assert_eq!(sent(&mut s, t0), vec![request(3)]);
    assert_eq!(s.switched_in(), Some(Duration::from_millis(5)));
    assert!(!s.on_switched(1, t0), "a repeated switch changes nothing");
}

#[test]
fn test_nothing_is_requested_before_the_free_pages_are_in() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    assert!(s.link_up(link(1, false, true, t0), false, true).unwrap());
    vm.kernel.fault(9);
    s.on_uffd().unwrap();
    assert!(sent(&mut s, t0).is_empty());
    assert!(!s.awaits_replies());
    s.on_synced(2); // another link's: nothing
    assert!(sent(&mut s, t0).is_empty());
    s.on_synced(1);
    assert_eq!(sent(&mut s, t0), vec![request(9)]);
    assert!(s.awaits_replies());
}

#[test]
fn test_a_complete_vm_is_unregistered_verified_and_closed() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    push_everything(&vm);
    s.advance(t0 + Duration::from_millis(7));
    assert!(vm.kernel.st().unregistered, "the guest runs free of faultd");
    assert_eq!(s.completed_in(), Some(Duration::from_millis(7)));
    let out = sent(&mut s, t0);
    assert!(matches!(out[0], Message::DoneMap(_)), "{out:?}");
    assert_eq!(
        out.last(),
        Some(&Message::DigestQuery {
            chunk_pages: vm.digest_chunk_pages()
        })
    );
    let theirs = digests_of(&vm);
    let chunk_pages = vm.digest_chunk_pages();
    receive(&mut s, &[(Message::Digests { chunk_pages }, &theirs)], t0).unwrap();
    assert_eq!(s.verdict(), Some(&Verdict::Verified));
    assert_eq!(sent(&mut s, t0), vec![Message::Goodbye]);
    assert!(
        s.on_urgent_closed().is_none(),
        "closed after the verdict: the end"
    );
    assert_eq!(s.done(), Some(&Verdict::Verified));
}

#[test]
fn test_a_cut_while_closing_ends_only_once_the_verdict_is_out() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    push_everything(&vm);
    s.advance(t0);
    sent(&mut s, t0);
    let chunk_pages = vm.digest_chunk_pages();
    receive(
        &mut s,
        &[(Message::Digests { chunk_pages }, &digests_of(&vm))],
        t0,
    )
    .unwrap();
    // The Goodbye is queued, not written: a cut means verifying again on the next link.
    assert_eq!(s.link_lost(&"reset"), AfterCut::Reconnect);
    assert_eq!(s.stage_name(), "verifying");
    s.link_up(link(2, false, false, t0), false, true).unwrap();
    s.advance(t0);
    let out = sent(&mut s, t0);
    assert!(
        matches!(out.last(), Some(Message::DigestQuery { .. })),
        "asked again on the new link: {out:?}"
    );
    receive(
        &mut s,
        &[(Message::Digests { chunk_pages }, &digests_of(&vm))],
        t0,
    )
    .unwrap();
    assert_eq!(sent(&mut s, t0), vec![Message::Goodbye]);
    // Written in full: a cut now is the end.
    assert_eq!(s.link_lost(&"reset"), AfterCut::Close);
    assert_eq!(s.done(), Some(&Verdict::Verified));
}

#[test]
fn test_a_mismatch_is_final_even_if_it_was_not_written() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    push_everything(&vm);
    s.advance(t0);
    sent(&mut s, t0);
    let mut theirs = digests_of(&vm);
    theirs[0] ^= 1;
    let chunk_pages = vm.digest_chunk_pages();
    receive(&mut s, &[(Message::Digests { chunk_pages }, &theirs)], t0).unwrap();
    assert!(matches!(s.verdict(), Some(Verdict::Mismatch(_))));
    assert_eq!(
        s.link_lost(&"reset"),
        AfterCut::Close,
        "the source keeps the VM either way"
    );
    assert!(matches!(s.done(), Some(Verdict::Mismatch(r)) if r[0].start == 0));
}

#[test]
fn test_nothing_but_the_verdict_follows_the_digest_query() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    push_everything(&vm);
    s.advance(t0);
    sent(&mut s, t0);
    // A request queued by the fault path after the query (a fault that raced the
    // unregistration) is dropped, not sent.
    s.core.pending.push(request(4));
    assert!(sent(&mut s, t0).is_empty());
}

#[test]
fn test_precopy_on_a_new_link_is_refused_when_it_cannot_be_followed() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    assert!(matches!(
        s.link_up(link(1, true, false, t0), true, true),
        Err(SessionError::PrecopyAfterSwitch)
    ));
    assert!(matches!(
        s.link_up(link(1, true, false, t0), false, false),
        Err(SessionError::PrecopyWithoutMemfd)
    ));
    s.link_up(link(1, true, false, t0), false, true).unwrap();
    assert_eq!(s.link_lost(&"cut"), AfterCut::Reconnect);
    assert!(matches!(
        s.link_up(link(2, false, false, t0), false, true),
        Err(SessionError::PrecopyGone)
    ));
}

#[test]
fn test_an_idle_link_gets_heartbeats_and_a_silent_one_is_cut() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    assert!(s.on_tick(t0 + Duration::from_millis(100)).is_none());
    assert!(sent(&mut s, t0).is_empty(), "not idle long enough");
    let later = t0 + Duration::from_millis(250);
    assert!(s.on_tick(later).is_none());
    assert_eq!(sent(&mut s, later), vec![Message::Heartbeat]);
    // A frame keeps it alive; silence past the timeout cuts it.
    receive(
        &mut s,
        &[(Message::Heartbeat, &[])],
        t0 + Duration::from_secs(1),
    )
    .unwrap();
    assert!(s.on_tick(t0 + Duration::from_millis(2900)).is_none());
    assert!(matches!(
        s.on_tick(t0 + Duration::from_millis(3100)),
        Some(LinkFault::Silent { .. })
    ));
}

#[test]
fn test_frames_out_of_place_cut_the_link_and_an_error_ends_the_session() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    // Digests nobody asked for.
    let err = receive(
        &mut s,
        &[(
            Message::Digests { chunk_pages: 1 },
            &[0; 8 * PAGES as usize],
        )],
        t0,
    );
    assert!(
        matches!(err, Err(FrameError::Link(LinkFault::Protocol(_)))),
        "{err:?}"
    );
    assert_eq!(s.link_lost(&"protocol"), AfterCut::Reconnect);
    s.link_up(link(2, false, false, t0), false, true).unwrap();
    let refusal = Message::Error {
        code: ErrorCode::Internal,
        text: "the memory file shrank\nFAKE LOG LINE".into(),
    };
    match receive(&mut s, &[(refusal, &[])], t0) {
        Err(FrameError::Fatal(SessionError::Ended { code, text })) => {
            assert_eq!(code, ErrorCode::Internal);
            assert!(!text.contains('\n'), "escaped: {text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_a_requested_page_arrives_and_its_fault_is_resolved() {
    let vm = vm();
    let t0 = Instant::now();
    let mut s = DestSession::new(&vm, true, liveness(), t0);
    s.link_up(link(1, false, false, t0), false, true).unwrap();
    vm.kernel.fault(2);
    s.on_uffd().unwrap();
    assert_eq!(sent(&mut s, t0), vec![request(2)]);
    let page = vec![7u8; PAGE as usize];
    let run = Message::PageRun(PageRange { first: 2, count: 1 });
    receive(&mut s, &[(run, &page)], t0).unwrap();
    assert_eq!(vm.kernel.page(2), Some(page));
    assert_eq!(s.core.pages_in_flight(), 0);
    assert_eq!(s.core.latencies.summary().count, 1);
    // Without a link the fault waits, and is asked for again on the next one.
    assert_eq!(s.link_lost(&"cut"), AfterCut::Reconnect);
    vm.kernel.fault(5);
    s.on_uffd().unwrap();
    assert!(sent(&mut s, t0).is_empty());
    s.link_up(link(2, false, false, t0), false, true).unwrap();
    assert_eq!(sent(&mut s, t0), vec![request(5)]);
}
