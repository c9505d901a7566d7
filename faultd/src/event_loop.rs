//! The main loop: one mio poll over the uffd, the urgent connection, the VMM's socket and a
//! waker for the helper threads (bulk, reconnect), until every page is present; then the
//! orderly finish (unregister, digest check, goodbye).
//!
//! A lost link is not fatal: faults keep being read and recorded while the connector gets a
//! new one (see `link.rs`); only the VMM going away, a uffd failure, or a fatal refusal by
//! pagesrv ends the migration early.

use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::framed::{ReadError, write_frame};
use common::wire::Message;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, error, info, warn};

use crate::fault::FaultPath;
use crate::link::{Link, LinkEvent, Links, Reconnect};
use crate::stats::{DigestCheck, Stats};
use crate::upstream::Upstream;
use crate::vm::{DIGEST_CHUNK_PAGES, Vm};

const UFFD: Token = Token(0);
const URGENT: Token = Token(1);
const VMM: Token = Token(2);
const LINK_EVENT: Token = Token(3);

/// How long pagesrv may take to answer the digest query at the end.
const DIGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the migration of `vm` to completion.
///
/// # Errors
/// The VMM going away, a uffd failure, or pagesrv refusing for good; each with its context.
pub fn run(
    vm: &Vm,
    first: Upstream,
    reconnect: &Reconnect,
    vmm: UnixStream,
    started: Instant,
) -> Result<Stats> {
    let mut poll = Poll::new().context("failed to create the poll")?;
    let waker = Waker::new(poll.registry(), LINK_EVENT).context("failed to create a waker")?;
    std::thread::scope(|s| {
        let mut links = Links::new(s, vm, waker, reconnect);
        let result = serve(vm, &mut poll, &mut links, first, &vmm);
        links.stop_connector();
        let (mut fault_path, check) = result?;
        fault_path.resolve_all();
        Ok(Stats::collect(
            vm,
            fault_path.faults,
            &fault_path.latencies,
            started.elapsed(),
            &check,
            links.cuts,
        ))
    })
}

fn serve<'s, 'e>(
    vm: &'e Vm,
    poll: &mut Poll,
    links: &mut Links<'s, 'e>,
    first: Upstream,
    vmm: &UnixStream,
) -> Result<(FaultPath<'e>, DigestCheck)> {
    if let Err(e) = common::sched::realtime_priority() {
        debug!(error = %e, "fault thread runs at normal priority");
    }
    vmm.set_nonblocking(true)?;
    let uffd_fd = vm.uffd.as_fd().as_raw_fd();
    let vmm_fd = vmm.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&uffd_fd), UFFD, Interest::READABLE)?;
    poll.registry()
        .register(&mut SourceFd(&vmm_fd), VMM, Interest::READABLE)?;
    let mut fault_path = FaultPath::new(vm);
    // Faults may be queued from before we started polling (the VMM faults during restore).
    fault_path
        .drain_events()
        .context("failed to serve faults")?;
    let requests = fault_path.requests_in_flight();
    let mut link = Some(links.open(first, &requests, poll.registry(), URGENT)?);
    let mut events = Events::with_capacity(16);
    let mut writable_armed = false;
    while !vm.done.is_full() {
        if let Some(l) = link.as_mut() {
            match flush_outbox(&mut l.urgent, &mut fault_path.outbox) {
                Ok(()) => {
                    let want = !fault_path.outbox.is_empty();
                    if want != writable_armed {
                        let interest = if want {
                            Interest::READABLE | Interest::WRITABLE
                        } else {
                            Interest::READABLE
                        };
                        poll.registry()
                            .reregister(&mut l.urgent, URGENT, interest)?;
                        writable_armed = want;
                    }
                }
                Err(e) => {
                    let l = link.take().expect("link is up");
                    links.cut(
                        l,
                        poll.registry(),
                        &anyhow!(e).context("failed to send requests"),
                    );
                    writable_armed = false;
                }
            }
        }
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => other.context("poll failed")?,
        }
        for event in &events {
            match event.token() {
                UFFD => fault_path
                    .drain_events()
                    .context("failed to serve faults")?,
                URGENT => {
                    let Some(l) = link.as_mut() else { continue };
                    match serve_replies(l, &mut fault_path) {
                        Ok(()) => {}
                        Err(ReplyError::Fatal(e)) => {
                            return Err(anyhow!(e).context("failed to place requested pages"));
                        }
                        Err(ReplyError::Link(e)) => {
                            let l = link.take().expect("link is up");
                            links.cut(l, poll.registry(), &e);
                            writable_armed = false;
                        }
                    }
                }
                VMM => check_vmm(vmm)?,
                LINK_EVENT => {
                    while let Ok(ev) = links.events.try_recv() {
                        let before = link.as_ref().map(|l| l.generation);
                        handle_link_event(vm, poll, links, &mut link, &mut fault_path, ev)?;
                        // A new (or no) urgent socket starts registered for reading only.
                        if link.as_ref().map(|l| l.generation) != before {
                            writable_armed = false;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let check = finish(vm, poll, links, link, &mut fault_path)?;
    Ok((fault_path, check))
}

fn handle_link_event<'s, 'e>(
    vm: &Vm,
    poll: &mut Poll,
    links: &mut Links<'s, 'e>,
    link: &mut Option<Link<'s>>,
    fault_path: &mut FaultPath<'e>,
    event: LinkEvent,
) -> Result<()> {
    match event {
        LinkEvent::BulkEnded { generation, result } => {
            let current = link.as_ref().is_some_and(|l| l.generation == generation);
            match result {
                Ok(()) => info!(generation, "background push complete"),
                Err(e) if !e.is_link_failure() => {
                    return Err(anyhow!(e).context("failed to place pushed pages"));
                }
                Err(e) if current && !vm.done.is_full() => {
                    let l = link.take().expect("current link");
                    links.cut(l, poll.registry(), &anyhow!(e));
                }
                Err(_) => {}
            }
        }
        LinkEvent::Connected(Ok(up)) => {
            let requests = fault_path.requests_in_flight();
            match links.open(up, &requests, poll.registry(), URGENT) {
                Ok(l) => {
                    info!(
                        generation = l.generation,
                        in_flight = requests.len() / common::wire::RANGE_FRAME_BYTES,
                        "link to pagesrv resumed"
                    );
                    *link = Some(l);
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "the new link failed at once; reconnecting");
                    links.restart_connector();
                }
            }
        }
        LinkEvent::Connected(Err(e)) => return Err(e),
    }
    Ok(())
}

enum ReplyError {
    /// The link failed: reconnect.
    Link(anyhow::Error),
    /// Placing pages failed: the migration cannot go on.
    Fatal(crate::fault::FaultError),
}

/// Reads the urgent connection until it would block, placing each batch of replies as it
/// arrives (so the buffer never holds more than one frame in progress).
fn serve_replies(link: &mut Link<'_>, fault_path: &mut FaultPath<'_>) -> Result<(), ReplyError> {
    loop {
        match link.reader.fill(&mut link.urgent) {
            Ok(0) => {
                let closed = ReadError::Closed {
                    mid_frame: link.reader.has_partial(),
                };
                return Err(ReplyError::Link(
                    anyhow!(closed).context("pagesrv closed the urgent connection"),
                ));
            }
            Ok(_) => match fault_path.handle_replies(&mut link.reader) {
                Ok(()) => {}
                Err(e) if e.is_link_failure() => return Err(ReplyError::Link(anyhow!(e))),
                Err(e) => return Err(ReplyError::Fatal(e)),
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ReplyError::Link(
                    anyhow!(e).context("failed to read from pagesrv"),
                ));
            }
        }
    }
}

fn flush_outbox(urgent: &mut mio::net::TcpStream, outbox: &mut Vec<u8>) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < outbox.len() {
        match urgent.write(&outbox[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    outbox.drain(..sent);
    Ok(())
}

/// The VMM never writes after the handshake: readable means it closed (or broke) the socket.
fn check_vmm(vmm: &UnixStream) -> Result<()> {
    let mut buf = [0u8; 256];
    loop {
        match (&*vmm).read(&mut buf) {
            Ok(0) => bail!("the VMM closed its socket before the migration completed"),
            Ok(n) => warn!(bytes = n, "ignoring unexpected bytes from the VMM"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("the VMM's socket failed"),
        }
    }
}

/// Every page is present: unregister the VMM's ranges (it runs free of us from here), read
/// any event that raced with that, check the digests against pagesrv's and say goodbye.
fn finish<'s, 'e>(
    vm: &Vm,
    poll: &mut Poll,
    links: &mut Links<'s, 'e>,
    link: Option<Link<'s>>,
    fault_path: &mut FaultPath<'e>,
) -> Result<DigestCheck> {
    for region in vm.layout.regions() {
        if let Err(e) = vm.uffd.unregister(region.host_base.0, region.size_bytes) {
            warn!(error = %e, "failed to unregister a region after completion");
        }
    }
    // Unregistering woke every waiting thread (their pages are present, or read as zero
    // without us); only events that raced with it remain, and a REMOVE among them blocks
    // the VMM's madvise until read.
    fault_path
        .discard_events()
        .context("failed to read the last events")?;
    info!("every page is present");
    links.stop_connector();
    let Some(mut link) = link else {
        let why = "pagesrv was unreachable at completion".to_string();
        warn!("{why}: digests not compared");
        return Ok(DigestCheck::Skipped(why));
    };
    poll.registry().deregister(&mut link.urgent)?;
    let check = match verify_and_say_goodbye(vm, &mut link) {
        Ok(check) => check,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "digests not compared");
            DigestCheck::Skipped(format!("{e:#}"))
        }
    };
    links.close(link, poll.registry());
    Ok(check)
}

/// Asks pagesrv for its per-chunk digests, compares them with what arrived, and says goodbye.
fn verify_and_say_goodbye(vm: &Vm, link: &mut Link<'_>) -> Result<DigestCheck> {
    let set_blocking = |link: &Link<'_>, timeout: Duration| -> std::io::Result<()> {
        let sock = socket2::SockRef::from(&link.urgent);
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(timeout))
    };
    set_blocking(link, DIGEST_TIMEOUT)?;
    let query = Message::DigestQuery {
        chunk_pages: DIGEST_CHUNK_PAGES,
    };
    write_frame(&mut link.urgent, &query, &[])?;
    let theirs = loop {
        let (message, payload) = link.reader.read_frame(&mut link.urgent)?;
        match message {
            Message::Digests { chunk_pages } if chunk_pages == DIGEST_CHUNK_PAGES => {
                break link.reader.payload(payload).to_vec();
            }
            // Replies to requests sent before completion: the pages are here already.
            Message::PageRun(_) | Message::ZeroRun(_) => continue,
            Message::Error { code, text } => bail!("pagesrv reported {code:?}: {text}"),
            other => bail!("unexpected {:?} frame instead of digests", other.kind()),
        }
    };
    let check = compare_digests(vm, &theirs);
    write_frame(&mut link.urgent, &Message::Goodbye, &[])?;
    // pagesrv may still be answering requests sent before the goodbye: read (and drop)
    // until it closes, so it never writes into a closed socket and takes a completed
    // session for a broken one.
    set_blocking(link, Duration::from_secs(2))?;
    let mut sink = vec![0u8; 64 << 10];
    while matches!(link.urgent.read(&mut sink), Ok(n) if n > 0) {}
    Ok(check)
}

fn compare_digests(vm: &Vm, theirs: &[u8]) -> DigestCheck {
    let total = vm.layout.total_pages();
    let mut mismatched: Vec<Range<u64>> = Vec::new();
    let mut unverified = 0;
    for (i, ((ours, verifiable), theirs)) in vm
        .chunk_digests()
        .into_iter()
        .zip(theirs.chunks_exact(8))
        .enumerate()
    {
        let theirs = u64::from_le_bytes(theirs.try_into().expect("8-byte chunks"));
        if !verifiable {
            unverified += 1;
            continue;
        }
        if ours != theirs {
            let first = i as u64 * DIGEST_CHUNK_PAGES;
            let range = first..(first + DIGEST_CHUNK_PAGES).min(total);
            match mismatched.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => mismatched.push(range),
            }
        }
    }
    if mismatched.is_empty() {
        info!(
            unverified_chunks = unverified,
            "digests of every page match the source"
        );
        DigestCheck::Match { unverified }
    } else {
        for r in &mismatched {
            error!(
                first_page = r.start,
                end_page = r.end,
                "DIGEST MISMATCH: guest memory in these pages differs from the source"
            );
        }
        DigestCheck::Mismatch(mismatched)
    }
}
