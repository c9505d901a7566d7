//! This machine's floor, measured in the same run as the scenarios:
//! (a) an in-process uffd fault round trip, (b) a loopback TCP request/response of one 4 KiB
//! page, (c) the remote fault floor (fault → fetch over loopback TCP from a trivial server →
//! UFFDIO_COPY → wake), (d) the bulk floor (a plain loopback TCP stream placed with
//! UFFDIO_COPY in 2 MiB runs into memory never touched before).
//!
//! Each is measured under a [`Placement`] of its threads, because a wake-up across this
//! machine's vCPUs costs more than everything else in a fault: all on one CPU (the
//! same-vCPU floor), the faulting thread on one CPU and the handler and server on another
//! (the cross-vCPU floor, which the targets use), and wherever the scheduler puts them.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use common::mmap::Mapping;

use crate::link::{DelayLine, FLOOR_PORT, Link};
use common::uffd::{Event, MODE_MISSING, Uffd};
use serde_json::{Value, json};

const PAGE: usize = 4096;

/// Where a floor's threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every thread on the first CPU we may use.
    SameCpu,
    /// The faulting (or placing) thread on the first CPU, the handler and the server (or
    /// the sender) on the second.
    CrossCpu,
    /// No pinning: wherever the scheduler puts them.
    Scheduler,
}

impl Placement {
    /// The CPUs of (the faulting or placing thread, the handler and server threads), or
    /// `None` where the thread is left to the scheduler; `Err` when the placement needs two
    /// CPUs and we may use one.
    fn cpus(self) -> Result<(Option<usize>, Option<usize>)> {
        let ours = allowed_cpus()?;
        Ok(match self {
            Placement::Scheduler => (None, None),
            Placement::SameCpu => (Some(ours[0]), Some(ours[0])),
            Placement::CrossCpu => {
                anyhow::ensure!(ours.len() >= 2, "a cross-vCPU floor needs two CPUs");
                (Some(ours[0]), Some(ours[1]))
            }
        })
    }
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let cpus = common::sched::allowed_cpus().context("sched_getaffinity")?;
    anyhow::ensure!(!cpus.is_empty(), "no CPU in our affinity mask");
    Ok(cpus)
}

fn pin(cpu: Option<usize>) -> Result<()> {
    if let Some(cpu) = cpu {
        common::sched::pin_current_thread(&[cpu]).with_context(|| format!("pin to CPU {cpu}"))?;
    }
    Ok(())
}

/// Runs `f` on a thread pinned to `cpu` (or unpinned), returning its result.
fn on_cpu<T: Send>(cpu: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            pin(cpu)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("floor thread panicked"))?
    })
}

/// Percentiles (µs) of samples in ns, with CDF samples for the plot.
pub fn summarize(mut ns: Vec<u64>) -> Value {
    ns.sort_unstable();
    let pick = |q: f64| -> f64 {
        if ns.is_empty() {
            return 0.0;
        }
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        ns[rank - 1] as f64 / 1000.0
    };
    let samples: Vec<f64> = ns
        .iter()
        .step_by((ns.len() / 2000).max(1))
        .map(|n| *n as f64 / 1000.0)
        .collect();
    json!({
        "count": ns.len(), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
        "p999": pick(0.999), "max": ns.last().map_or(0.0, |n| *n as f64 / 1000.0),
        "cdf_samples_us": samples,
    })
}

/// Serves `place` on every fault until `faults` faults are handled; stops at its first
/// error.
fn serve_faults(
    uffd: &Uffd,
    faults: usize,
    mut place: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut events = Vec::new();
    let mut served = 0;
    let mut fds = [libc::pollfd {
        fd: uffd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    while served < faults {
        // SAFETY: polls one pollfd we own.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
        events.clear();
        uffd.read_events(&mut events)?;
        for e in &events {
            if let Event::PageFault { addr, .. } = *e {
                place(addr & !(PAGE as u64 - 1))?;
                served += 1;
            }
        }
    }
    Ok(())
}

/// Touches `pages` pages of a registered mapping, timing each first touch, while `handler`
/// serves the faults on another thread.
fn timed_faults(
    pages: usize,
    (fault_cpu, handler_cpu): (Option<usize>, Option<usize>),
    handler: impl FnOnce(Arc<Uffd>) -> Result<()> + Send,
) -> Result<Vec<u64>> {
    let uffd = Arc::new(Uffd::create(0).context("userfaultfd")?);
    let map = Mapping::anonymous(pages * PAGE)?;
    uffd.register(map.addr(), (pages * PAGE) as u64, MODE_MISSING)?;
    let (base, len) = (map.addr(), (pages * PAGE) as u64);
    // The faulting thread is pinned before the handler exists, so a failed pin leaves no
    // handler waiting for faults that never come.
    let samples = on_cpu(fault_cpu, || {
        std::thread::scope(|s| -> Result<Vec<u64>> {
            let u = uffd.clone();
            let h = s.spawn(move || {
                let served = pin(handler_cpu).and_then(|()| handler(u.clone()));
                if served.is_err() {
                    // Wakes the faulting thread: its remaining touches fill zero pages.
                    let _ = u.unregister(base, len);
                }
                served
            });
            let mut ns = Vec::with_capacity(pages);
            for p in 0..pages {
                let t = Instant::now();
                // SAFETY: reads one byte of our own registered mapping; the handler places it.
                let _ = unsafe { std::ptr::read_volatile((base + (p * PAGE) as u64) as *const u8) };
                ns.push(t.elapsed().as_nanos() as u64);
            }
            h.join().expect("handler thread")?;
            Ok(ns)
        })
    })?;
    uffd.unregister(base, len)?;
    Ok(samples)
}

/// (a) fault → read event → UFFDIO_COPY 4 KiB → wake, all in one process.
pub fn uffd_fault(pages: usize, placement: Placement) -> Result<Value> {
    let ns = timed_faults(pages, placement.cpus()?, |uffd| {
        let page = vec![7u8; PAGE];
        serve_faults(&uffd, pages, |addr| {
            uffd.copy(addr, &page, PAGE as u64)?;
            Ok(())
        })
    })?;
    Ok(summarize(ns))
}

/// A trivial page server: answers each 24-byte request with a 24-byte header and a page.
/// On loopback, or inside a link's namespace behind a delay line (then the address is the
/// delay line's, and the line lives as long as the returned guard).
fn page_server(
    cpu: Option<usize>,
    via: Option<&Link>,
) -> Result<(String, std::thread::JoinHandle<()>, Option<DelayLine>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let netns = via.map(|l| (l.netns().to_owned(), l.source_addr(FLOOR_PORT)));
    let h = std::thread::spawn(move || {
        let bound = (|| -> Result<TcpListener> {
            pin(cpu)?;
            match &netns {
                None => Ok(TcpListener::bind("127.0.0.1:0")?),
                Some((name, addr)) => {
                    crate::link::enter(name)?;
                    Ok(TcpListener::bind(addr)?)
                }
            }
        })();
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let _ = conn.set_nodelay(true);
        let mut req = [0u8; 24];
        let reply = vec![1u8; 24 + PAGE];
        while conn.read_exact(&mut req).is_ok() {
            if conn.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let addr = rx.recv().context("page server thread")??;
    match via {
        None => Ok((addr.to_string(), h, None)),
        Some(link) => {
            let line = DelayLine::start(addr, link.profile)?;
            Ok((line.addr().to_string(), h, Some(line)))
        }
    }
}

fn fetch(conn: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    conn.write_all(&[0u8; 24])?;
    conn.read_exact(buf)
}

/// (b) TCP request/response of one 4 KiB page (loopback, or through `via`).
pub fn rtt_4k(rounds: usize, placement: Placement, via: Option<&Link>) -> Result<Value> {
    let (client_cpu, server_cpu) = placement.cpus()?;
    let (addr, server, _line) = page_server(server_cpu, via)?;
    let ns = on_cpu(client_cpu, move || rtt_rounds(&addr, rounds))?;
    let _ = server.join();
    Ok(summarize(ns))
}

fn rtt_rounds(addr: &str, rounds: usize) -> Result<Vec<u64>> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 24 + PAGE];
    let mut ns = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        fetch(&mut conn, &mut buf)?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    Ok(ns)
}

/// (c) fault → handler fetches the page over TCP (loopback, or through `via`) →
/// UFFDIO_COPY → wake.
pub fn remote_fault(pages: usize, placement: Placement, via: Option<&Link>) -> Result<Value> {
    let cpus = placement.cpus()?;
    let (addr, server, _line) = page_server(cpus.1, via)?;
    let ns = timed_faults(pages, cpus, move |uffd| {
        let mut conn = TcpStream::connect(&addr)?;
        conn.set_nodelay(true)?;
        let mut buf = vec![0u8; 24 + PAGE];
        serve_faults(&uffd, pages, |page_addr| {
            fetch(&mut conn, &mut buf).context("fetch from the page server")?;
            uffd.copy(page_addr, &buf[24..], PAGE as u64)?;
            Ok(())
        })
    })?;
    let _ = server.join();
    Ok(summarize(ns))
}

/// (d) a loopback TCP stream of `bytes` received in 2 MiB runs and placed with UFFDIO_COPY
/// into memory never touched before (a new mapping): MiB/s.
pub fn bulk(bytes: usize, placement: Placement) -> Result<f64> {
    let (placer_cpu, sender_cpu) = placement.cpus()?;
    on_cpu(placer_cpu, move || bulk_placed(bytes, sender_cpu, None))
}

/// (e) for information: as (d), but the sender reads what it sends from a memory file (the
/// image), looking at every page for zeros as a source must: MiB/s. What a source that
/// reads its memory on one thread can feed; the gap between (d) and (e) is the source's.
pub fn bulk_from_file(image: &Path, placement: Placement) -> Result<f64> {
    let file = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let bytes = usize::try_from(file.metadata()?.len())?.min(1 << 30);
    let (placer_cpu, sender_cpu) = placement.cpus()?;
    on_cpu(placer_cpu, move || {
        bulk_placed(bytes, sender_cpu, Some(file))
    })
}

fn bulk_placed(bytes: usize, sender_cpu: Option<usize>, source: Option<File>) -> Result<f64> {
    const RUN: usize = 2 << 20;
    let bytes = bytes / RUN * RUN;
    anyhow::ensure!(bytes > 0, "the bulk floor needs at least 2 MiB");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        pin(sender_cpu).map_err(std::io::Error::other)?;
        let (mut conn, _) = listener.accept()?;
        let Some(file) = source else {
            let chunk = vec![3u8; RUN];
            for _ in 0..bytes / RUN {
                conn.write_all(&chunk)?;
            }
            return Ok(());
        };
        let map = Mapping::file_readonly(file.as_fd(), bytes).map_err(std::io::Error::other)?;
        let mut zero = 0usize;
        for run in map.as_slice().chunks(RUN) {
            zero += run
                .chunks(PAGE)
                .filter(|p| common::digest::is_zero(p))
                .count();
            conn.write_all(run)?;
        }
        std::hint::black_box(zero);
        Ok(())
    });
    let uffd = Uffd::create(0)?;
    let map = Mapping::anonymous(bytes)?;
    uffd.register(map.addr(), bytes as u64, MODE_MISSING)?;
    let mut conn = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; RUN];
    let started = Instant::now();
    for run in 0..bytes / RUN {
        conn.read_exact(&mut buf)?;
        uffd.copy(map.addr() + (run * RUN) as u64, &buf, PAGE as u64)?;
    }
    let secs = started.elapsed().as_secs_f64();
    sender.join().expect("sender thread")?;
    uffd.unregister(map.addr(), bytes as u64)?;
    Ok(bytes as f64 / f64::from(1 << 20) / secs)
}
