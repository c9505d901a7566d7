//! The main loop: one mio poll over the uffd, the urgent connection, the VMM's socket and a
//! waker for the bulk thread, until every page is present; then the orderly finish.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use common::framed::{FrameReader, ReadError, write_frame};
use common::wire::Message;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::bulk::{BulkError, receive_pushed_pages};
use crate::fault::FaultPath;
use crate::stats::Stats;
use crate::upstream::Upstream;
use crate::vm::Vm;

const UFFD: Token = Token(0);
const URGENT: Token = Token(1);
const VMM: Token = Token(2);
const BULK_DONE: Token = Token(3);

/// Runs the migration of `vm` to completion.
///
/// # Errors
/// The VMM going away, pagesrv failing, or a uffd failure; each with its context.
pub fn run(vm: &Vm, upstream: Upstream, vmm: UnixStream, started: Instant) -> Result<Stats> {
    let mut poll = Poll::new().context("failed to create the poll")?;
    let waker = Waker::new(poll.registry(), BULK_DONE).context("failed to create a waker")?;
    let Upstream {
        urgent,
        urgent_reader,
        bulk,
        bulk_reader,
        ..
    } = upstream;
    let bulk_handle = bulk
        .try_clone()
        .context("failed to clone the bulk socket")?;
    let bulk_result: Mutex<Option<Result<(), BulkError>>> = Mutex::new(None);
    std::thread::scope(|s| {
        s.spawn(|| {
            let result = receive_pushed_pages(vm, bulk, bulk_reader);
            *bulk_result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            let _ = waker.wake();
        });
        let result = serve_until_complete(vm, &mut poll, urgent, urgent_reader, &vmm, &bulk_result);
        // Whatever happened, stop the bulk thread before leaving the scope.
        let _ = bulk_handle.shutdown(Shutdown::Both);
        let mut fault_path = result?;
        fault_path.resolve_all();
        Ok(Stats::collect(
            vm,
            fault_path.faults,
            &fault_path.latencies,
            started.elapsed(),
        ))
    })
}

fn serve_until_complete<'a>(
    vm: &'a Vm,
    poll: &mut Poll,
    urgent: TcpStream,
    mut reader: FrameReader,
    vmm: &UnixStream,
    bulk_result: &Mutex<Option<Result<(), BulkError>>>,
) -> Result<FaultPath<'a>> {
    if let Err(e) = common::sched::realtime_priority() {
        debug!(error = %e, "fault thread runs at normal priority");
    }
    urgent.set_nonblocking(true)?;
    vmm.set_nonblocking(true)?;
    let mut urgent = mio::net::TcpStream::from_std(urgent);
    let uffd_fd = vm.uffd.as_fd().as_raw_fd();
    let vmm_fd = vmm.as_raw_fd();
    let registry = poll.registry();
    registry.register(&mut SourceFd(&uffd_fd), UFFD, Interest::READABLE)?;
    registry.register(&mut urgent, URGENT, Interest::READABLE)?;
    registry.register(&mut SourceFd(&vmm_fd), VMM, Interest::READABLE)?;
    let mut fault_path = FaultPath::new(vm);
    let mut events = Events::with_capacity(16);
    let mut writable_armed = false;
    // Faults may be queued from before we started polling (the VMM faults during restore).
    fault_path
        .drain_events()
        .context("failed to serve faults")?;
    while !vm.done.is_full() {
        flush_outbox(&mut urgent, &mut fault_path.outbox)
            .context("failed to send requests to pagesrv")?;
        let want_writable = !fault_path.outbox.is_empty();
        if want_writable != writable_armed {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            poll.registry().reregister(&mut urgent, URGENT, interest)?;
            writable_armed = want_writable;
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
                    read_urgent(&mut urgent, &mut reader)?;
                    fault_path
                        .handle_replies(&mut reader)
                        .context("failed to place requested pages")?;
                }
                VMM => check_vmm(vmm)?,
                BULK_DONE => {
                    let result = bulk_result.lock().unwrap_or_else(|p| p.into_inner()).take();
                    match result {
                        Some(Ok(())) => info!("background push complete"),
                        Some(Err(e)) if !vm.done.is_full() => {
                            return Err(anyhow!(e).context("background push failed"));
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
    finish(vm, poll, &mut urgent, &mut fault_path)?;
    Ok(fault_path)
}

fn read_urgent(urgent: &mut mio::net::TcpStream, reader: &mut FrameReader) -> Result<()> {
    loop {
        match reader.fill(urgent) {
            Ok(0) => {
                return Err(anyhow!(ReadError::Closed {
                    mid_frame: reader.has_partial()
                }))
                .context("pagesrv closed the urgent connection");
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e).context("failed to read from pagesrv"),
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

/// Every page is present: tell pagesrv, unregister the VMM's ranges (it runs free of us from
/// here), and read any event that raced with the unregister so no VMM thread stays blocked.
fn finish(
    vm: &Vm,
    poll: &mut Poll,
    urgent: &mut mio::net::TcpStream,
    fault_path: &mut FaultPath<'_>,
) -> Result<()> {
    for region in vm.layout.regions() {
        if let Err(e) = vm.uffd.unregister(region.host_base.0, region.size_bytes) {
            warn!(error = %e, "failed to unregister a region after completion");
        }
        // Unregistering wakes waiting threads itself; wake the whole range once more so no
        // thread can stay parked on a fault nobody will read.
        if let Err(e) = vm.uffd.wake(region.host_base.0, region.size_bytes) {
            warn!(error = %e, "failed to wake a region after completion");
        }
    }
    // Unregistering woke every waiting thread (their pages are present, or read as zero
    // without us); only events that raced with it remain, and a REMOVE among them blocks
    // the VMM's madvise until read.
    fault_path
        .discard_events()
        .context("failed to read the last events")?;
    poll.registry().deregister(urgent)?;
    socket2::SockRef::from(&*urgent).set_nonblocking(false)?;
    if let Err(e) = write_frame(urgent, &Message::Goodbye, &[]) {
        warn!(error = %e, "failed to say goodbye to pagesrv (every page is present)");
    } else {
        // pagesrv may still be answering requests sent before the goodbye: read (and drop)
        // until it closes, so it never writes into a closed socket and takes a completed
        // session for a broken one.
        let mut sink = vec![0u8; 64 << 10];
        let stream = socket2::SockRef::from(&*urgent);
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        while matches!(urgent.read(&mut sink), Ok(n) if n > 0) {}
    }
    info!("every page is present");
    Ok(())
}
