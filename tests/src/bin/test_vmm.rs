//! A stand-in VMM that speaks only Firecracker's UFFD handshake, written against the kernel
//! and the public contract (it shares no code with faultd or pagesrv).
//!
//! With `--wait-switch`, it waits after the handshake until faultd's control socket says
//! `switched` (precopy: the source paused) before it touches anything, as a VMM resuming a
//! guest after a hybrid migration does.
//!
//! It maps guest RAM (anonymous private memory, or a memfd shared mapping; with `--hugepages`
//! 2 MiB hugetlb pages, as Firecracker does for huge-page guests, and `page_size: 2097152` in
//! the handshake; ranges given in 4 KiB pages must then be 2 MiB aligned), registers it with
//! a userfaultfd that also sees kernel-mode faults, sends the region list with the uffd (and
//! the memfd, with `--memfd`) to faultd, then touches pages from several threads in random
//! order and checks every byte against the source memory file. With `--remove START:COUNT`
//! it gives those pages back (`madvise` DONTNEED, or REMOVE for a memfd) early in the
//! migration, like a balloon, and expects them to read zero; with `--balloon START:COUNT:CHUNK`
//! a balloon thread gives pages back `CHUNK` at a time (every `--balloon-interval-ms`, default
//! 5) while the touchers run: those pages are touched but not compared while it inflates,
//! and must all read zero at the end. With `--shared-ram FILE` (clones of one template on a
//! host) guest RAM is FILE mapped private (created, or grown to the RAM's size), sent as the
//! memfd: a page another clone's faultd wrote into FILE is mapped by the kernel without a
//! fault, and the guest's writes stay its own (`--remove` then gives pages back with
//! DONTNEED, and they read the template's bytes again). It waits for faultd to close the
//! socket (migration complete), checks every page again, prints a JSON report on stdout and
//! exits 0 only if every byte was right.
//!
//! ```text
//! test-vmm --uds PATH --source FILE [--regions N] [--memfd] [--threads N] [--seed N]
//!          [--remove START:COUNT] [--balloon START:COUNT:CHUNK] [--balloon-interval-ms N]
//!          [--ram-bytes N] [--no-touch] [--hugepages] [--wait-switch CONTROL] [--blocking-uffd]
//!          [--order random|seq|hot|clustered] [--touches N] [--latency-out FILE] [--no-wait]
//!          [--expect-zero BITMAP] [--shared-ram FILE]
//! ```

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

// Kernel ABI (include/uapi/linux/userfaultfd.h), spelled out so this VMM owes nothing to ours.
const UFFD_API: u64 = 0xAA;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

struct Args {
    uds: String,
    source: String,
    regions: usize,
    memfd: bool,
    /// Guest RAM is this file mapped private (shared by clones on a host).
    shared_ram: Option<String>,
    threads: usize,
    seed: u64,
    remove: Option<(usize, usize)>,
    balloon: Option<(usize, usize, usize)>,
    balloon_interval_ms: u64,
    ram_bytes: Option<usize>,
    touch: bool,
    order: String,
    touches: Option<usize>,
    latency_out: Option<String>,
    wait: bool,
    hugepages: bool,
    wait_switch: Option<String>,
    expect_zero: Option<String>,
    /// Create the userfaultfd without O_NONBLOCK (valid for the syscall; faultd must cope).
    blocking_uffd: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        uds: String::new(),
        source: String::new(),
        regions: 1,
        memfd: false,
        shared_ram: None,
        threads: 2,
        seed: 1,
        remove: None,
        balloon: None,
        balloon_interval_ms: 5,
        ram_bytes: None,
        touch: true,
        order: "random".into(),
        touches: None,
        latency_out: None,
        wait: true,
        hugepages: false,
        wait_switch: None,
        expect_zero: None,
        blocking_uffd: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--uds" => args.uds = value()?,
            "--source" => args.source = value()?,
            "--regions" => {
                args.regions = value()?.parse().map_err(|e| format!("--regions: {e}"))?
            }
            "--memfd" => args.memfd = true,
            "--shared-ram" => args.shared_ram = Some(value()?),
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--ram-bytes" => {
                args.ram_bytes = Some(value()?.parse().map_err(|e| format!("--ram-bytes: {e}"))?)
            }
            "--no-touch" => args.touch = false,
            "--order" => args.order = value()?,
            "--touches" => {
                args.touches = Some(value()?.parse().map_err(|e| format!("--touches: {e}"))?)
            }
            "--latency-out" => args.latency_out = Some(value()?),
            "--no-wait" => args.wait = false,
            "--hugepages" => args.hugepages = true,
            "--blocking-uffd" => args.blocking_uffd = true,
            "--wait-switch" => args.wait_switch = Some(value()?),
            "--expect-zero" => args.expect_zero = Some(value()?),
            "--remove" => {
                let v = value()?;
                let (a, b) = v.split_once(':').ok_or("--remove START:COUNT")?;
                args.remove = Some((
                    a.parse().map_err(|e| format!("--remove: {e}"))?,
                    b.parse().map_err(|e| format!("--remove: {e}"))?,
                ));
            }
            "--balloon" => {
                let v = value()?;
                let parts: Vec<usize> = v
                    .split(':')
                    .map(|x| x.parse().map_err(|e| format!("--balloon: {e}")))
                    .collect::<Result<_, _>>()?;
                let [start, count, chunk] = parts[..] else {
                    return Err("--balloon START:COUNT:CHUNK".into());
                };
                if chunk == 0 {
                    return Err("--balloon: CHUNK must be at least 1".into());
                }
                args.balloon = Some((start, count, chunk));
            }
            "--balloon-interval-ms" => {
                args.balloon_interval_ms = value()?
                    .parse()
                    .map_err(|e| format!("--balloon-interval-ms: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.uds.is_empty() || args.source.is_empty() {
        return Err("--uds and --source are required".into());
    }
    if args.shared_ram.is_some() {
        if args.hugepages || args.balloon.is_some() {
            return Err("--shared-ram takes 4 KiB pages and no --balloon".into());
        }
        args.memfd = true;
    }
    Ok(args)
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Size of a hugetlb page.
const HUGE_PAGE: usize = 2 << 20;

/// Guest RAM: one mapping per region, and the memfd behind them when shared.
struct GuestRam {
    /// (host address, size, file offset) in file order.
    regions: Vec<(usize, usize, usize)>,
    memfd: Option<OwnedFd>,
    /// The page size the handshake declares.
    page_size: usize,
}

impl GuestRam {
    fn map(
        total: usize,
        count: usize,
        memfd: bool,
        shared: Option<&str>,
        huge: bool,
    ) -> Result<Self, String> {
        let page_size = if huge { HUGE_PAGE } else { PAGE };
        if !total.is_multiple_of(page_size) {
            return Err(format!(
                "guest RAM of {total} bytes is not a whole number of {page_size}-byte pages"
            ));
        }
        let pages = total / page_size;
        let fd = if let Some(path) = shared {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("--shared-ram {path}: {e}"))?;
            let size = file.metadata().map_err(|e| e.to_string())?.len();
            if size < total as u64 {
                file.set_len(total as u64)
                    .map_err(|e| format!("--shared-ram {path}: {e}"))?;
            }
            Some(OwnedFd::from(file))
        } else if memfd {
            let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
            // SAFETY: creates a new anonymous file; the name is a valid C string.
            let raw = unsafe { libc::memfd_create(c"test-vmm-ram".as_ptr(), flags) };
            if raw < 0 {
                return Err(os_err("memfd_create"));
            }
            // SAFETY: memfd_create returned a fresh fd.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: resizes the file we just created.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), total as i64) } < 0 {
                return Err(os_err("ftruncate"));
            }
            Some(fd)
        } else {
            None
        };
        let mut regions = Vec::new();
        let mut offset = 0;
        for i in 0..count {
            let region_pages = pages / count + usize::from(i < pages % count);
            let size = region_pages * page_size;
            let (flags, raw_fd) = match &fd {
                Some(f) if shared.is_some() => (libc::MAP_PRIVATE, f.as_raw_fd()),
                Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
                None if huge => (
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                    -1,
                ),
                None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            };
            // SAFETY: a new mapping at a kernel-chosen address; it lives until the process exits.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_NORESERVE,
                    raw_fd,
                    if fd.is_some() { offset as i64 } else { 0 },
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(os_err("mmap"));
            }
            regions.push((addr as usize, size, offset));
            offset += size;
        }
        Ok(GuestRam {
            regions,
            memfd: fd,
            page_size,
        })
    }

    fn page_addr(&self, page: usize) -> usize {
        let off = page * PAGE;
        let (addr, _, start) = self
            .regions
            .iter()
            .rev()
            .find(|(_, _, start)| *start <= off)
            .expect("page inside guest RAM");
        addr + (off - start)
    }

    fn page(&self, page: usize) -> &[u8] {
        // SAFETY: page_addr points at a mapped page of guest RAM that outlives self; reading
        // it may fault, which faultd resolves.
        unsafe { std::slice::from_raw_parts(self.page_addr(page) as *const u8, PAGE) }
    }

    /// Firecracker's handshake body: regions in list order with cumulative offsets.
    fn layout_json(&self) -> String {
        let items: Vec<String> = self
            .regions
            .iter()
            .map(|(addr, size, offset)| {
                format!(
                    r#"{{"base_host_virt_addr":{addr},"size":{size},"offset":{offset},"page_size":{},"page_size_kib":{}}}"#,
                    self.page_size, self.page_size
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }
}

fn create_uffd(shared: bool, huge: bool, blocking: bool) -> Result<OwnedFd, String> {
    let flags = if blocking {
        libc::O_CLOEXEC
    } else {
        libc::O_CLOEXEC | libc::O_NONBLOCK
    };
    // SAFETY: open with a valid C string path.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let raw = if dev >= 0 {
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument.
        let raw = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
        // SAFETY: closes the fd opened above.
        unsafe { libc::close(dev) };
        raw
    } else {
        // SAFETY: plain syscall with integer flags (no UFFD_USER_MODE_ONLY: kernel faults too).
        unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as i32 }
    };
    if raw < 0 {
        return Err(os_err("userfaultfd"));
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut features =
        UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID;
    if shared {
        features |= UFFD_FEATURE_MISSING_SHMEM;
    }
    if huge {
        features |= UFFD_FEATURE_MISSING_HUGETLBFS;
    }
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the struct on our stack.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
        return Err(os_err("UFFDIO_API"));
    }
    Ok(fd)
}

fn register(uffd: &OwnedFd, addr: usize, len: usize) -> Result<(), String> {
    let mut reg = UffdioRegister {
        start: addr as u64,
        len: len as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes the struct on our stack.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } < 0 {
        return Err(os_err("UFFDIO_REGISTER"));
    }
    Ok(())
}

fn send_handshake(sock: &UnixStream, json: &str, fds: &[RawFd]) -> Result<(), String> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: json.as_ptr() as *mut _,
        iov_len: json.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes, enough for one header with the fds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 || n as usize != json.len() {
        return Err(os_err("sendmsg"));
    }
    Ok(())
}

/// What the pages should hold: the source's bytes, except zeros where the VMM gave pages
/// back.
#[derive(Clone, Copy)]
struct Expect {
    removed: Option<(usize, usize)>,
    balloon: Option<(usize, usize)>,
    /// The balloon has finished: its pages must read zero (before: not compared).
    balloon_done: bool,
    /// Pages that must read zero whatever the source holds (`--expect-zero`: a bitmap, bit
    /// `i % 8` of byte `i / 8` for page `i`, as pagesrv's free-page hints).
    zero: Option<&'static [u8]>,
}

impl Expect {
    fn in_balloon(&self, page: usize) -> bool {
        self.balloon
            .is_some_and(|(s, c)| (s..s + c).contains(&page))
    }
}

fn expected_page(source: &std::fs::File, page: usize, expect: Expect, buf: &mut [u8]) {
    let removed = expect
        .removed
        .is_some_and(|(s, c)| (s..s + c).contains(&page));
    let hinted = expect.zero.is_some_and(|bits| {
        bits.get(page / 8)
            .is_some_and(|b| b & (1 << (page % 8)) != 0)
    });
    if removed || hinted || expect.in_balloon(page) {
        buf.fill(0);
    } else {
        source
            .read_exact_at(buf, (page * PAGE) as u64)
            .expect("read the source file");
    }
}

/// Checks `pages` against the source; returns the mismatches and the latency (ns) of every
/// first touch of a page in this process (`touched` records which pages were touched).
fn check_pages(
    ram: &GuestRam,
    source: &std::fs::File,
    pages: &[usize],
    expect: Expect,
    touched: &[std::sync::atomic::AtomicBool],
) -> (u64, Vec<u64>) {
    let mut want = vec![0u8; PAGE];
    let mut mismatches = 0;
    let mut first_touch_ns = Vec::new();
    for &p in pages {
        let first = !touched[p].swap(true, std::sync::atomic::Ordering::AcqRel);
        let t0 = Instant::now();
        // SAFETY: reads one byte of guest RAM (faultd resolves the fault).
        let _ = unsafe { std::ptr::read_volatile(ram.page_addr(p) as *const u8) };
        if first {
            first_touch_ns.push(t0.elapsed().as_nanos() as u64);
        }
        if expect.in_balloon(p) && !expect.balloon_done {
            // Being given back right now: it may read either way mid-compare.
            continue;
        }
        expected_page(source, p, expect, &mut want);
        if ram.page(p) != want.as_slice() {
            if mismatches < 5 {
                eprintln!("test-vmm: page {p} differs from the source");
            }
            mismatches += 1;
        }
    }
    (mismatches, first_touch_ns)
}

/// The pages to touch, in order: `random` (every page once, shuffled), `seq` (every page
/// once, in order), `hot` (80% of touches to the first 10% of pages), `clustered` (a
/// restored function's working set: one 64 KiB block in 16, drawn at random, every page of
/// those once, shuffled: 6.25% of the memory, in clusters).
fn touch_order(
    order: &str,
    pages: usize,
    touches: Option<usize>,
    seed: u64,
) -> Result<Vec<usize>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut list: Vec<usize> = match order {
        "random" => {
            let mut all: Vec<usize> = (0..pages).collect();
            all.shuffle(&mut rng);
            all
        }
        "seq" => (0..pages).collect(),
        "hot" => {
            let hot = (pages / 10).max(1);
            (0..touches.unwrap_or(pages))
                .map(|_| {
                    if rng.gen_bool(0.8) {
                        rng.gen_range(0..hot)
                    } else {
                        rng.gen_range(0..pages)
                    }
                })
                .collect()
        }
        "clustered" => {
            const BLOCK: usize = 16;
            let mut set: Vec<usize> = (0..pages.div_ceil(BLOCK))
                .filter(|_| rng.gen_ratio(1, 16))
                .flat_map(|block| block * BLOCK..((block + 1) * BLOCK).min(pages))
                .collect();
            set.shuffle(&mut rng);
            set
        }
        other => {
            return Err(format!(
                "unknown --order {other} (random, seq, hot, clustered)"
            ));
        }
    };
    if let Some(n) = touches {
        list.truncate(n);
    }
    Ok(list)
}

/// A first touch at least this long took a fault (a touch of a page already placed costs a
/// TLB miss, well under a microsecond).
const FAULT_NS: u64 = 5_000;

/// Percentiles (µs) and power-of-two buckets of the first touches that faulted, as JSON.
fn latency_json(all: Vec<u64>, pass_ms: f64) -> String {
    let touches = all.len();
    let mut ns: Vec<u64> = all.into_iter().filter(|&n| n >= FAULT_NS).collect();
    ns.sort_unstable();
    let pick = |q: f64| -> f64 {
        if ns.is_empty() {
            return 0.0;
        }
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        ns[rank - 1] as f64 / 1000.0
    };
    let mut buckets = vec![0u64; 1];
    for &n in &ns {
        let us = (n / 1000).max(1);
        let i = (63 - us.leading_zeros()) as usize;
        if buckets.len() <= i {
            buckets.resize(i + 1, 0);
        }
        buckets[i] += 1;
    }
    let samples: Vec<String> = ns
        .iter()
        .step_by((ns.len() / 2000).max(1))
        .map(|n| format!("{:.2}", *n as f64 / 1000.0))
        .collect();
    format!(
        r#"{{"first_touches":{touches},"pass_ms":{pass_ms:.3},"count":{},"p50":{:.2},"p90":{:.2},"p99":{:.2},"p999":{:.2},"max":{:.2},"dist_us":{:?},"cdf_samples_us":[{}]}}"#,
        ns.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        pick(0.999),
        ns.last().map_or(0.0, |n| *n as f64 / 1000.0),
        buckets,
        samples.join(",")
    )
}

/// Touches pages from `args.threads` threads in the chosen order, checking each; returns the
/// mismatches (and writes the first-touch latencies where asked).
fn touch_pages(
    args: &Args,
    ram: &GuestRam,
    source: &std::fs::File,
    pages: usize,
    expect: Expect,
) -> Result<u64, String> {
    let order = touch_order(&args.order, pages, args.touches, args.seed)?;
    let touched: Vec<std::sync::atomic::AtomicBool> = (0..pages)
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let chunk = order.len().div_ceil(args.threads.max(1)).max(1);
    let pass = std::time::Instant::now();
    let (bad, latencies) = std::thread::scope(|s| {
        let handles: Vec<_> = order
            .chunks(chunk)
            .map(|mine| s.spawn(|| check_pages(ram, source, mine, expect, &touched)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("toucher panicked"))
            .fold((0, Vec::new()), |(m, mut all), (b, l)| {
                all.extend(l);
                (m + b, all)
            })
    });
    let pass_ms = pass.elapsed().as_secs_f64() * 1000.0;
    if let Some(path) = &args.latency_out {
        std::fs::write(path, latency_json(latencies, pass_ms))
            .map_err(|e| format!("write {path}: {e}"))?;
    }
    Ok(bad)
}

/// Gives pages `start..start+count` back `chunk` pages at a time, like a balloon inflating
/// (each `madvise` blocks until faultd has read its REMOVE event).
fn inflate_balloon(
    ram: &GuestRam,
    (start, count, chunk): (usize, usize, usize),
    interval_ms: u64,
    memfd: bool,
) -> Result<(), String> {
    let advice = if memfd {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let mut page = start;
    while page < start + count {
        let n = chunk.min(start + count - page);
        // SAFETY: the range lies inside guest RAM (the caller keeps it within one region).
        if unsafe { libc::madvise(ram.page_addr(page) as *mut _, n * PAGE, advice) } < 0 {
            return Err(os_err("madvise (balloon)"));
        }
        page += n;
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    Ok(())
}

/// Waits until faultd's control socket says `switched` (a line holding `"event":"switched"`).
fn wait_for_switch(path: &str) -> Result<(), String> {
    let conn = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    let mut lines = std::io::BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut lines, &mut line)
            .map_err(|e| format!("read {path}: {e}"))?;
        if n == 0 {
            return Err("faultd closed its control socket before the switch".into());
        }
        if line.contains(r#""event":"switched""#) {
            return Ok(());
        }
        if line.contains(r#""event":"failed""#) {
            return Err(format!("faultd failed: {}", line.trim()));
        }
    }
}

fn run() -> Result<bool, String> {
    let args = parse_args()?;
    let source =
        std::fs::File::open(&args.source).map_err(|e| format!("open {}: {e}", args.source))?;
    let source_bytes = source.metadata().map_err(|e| e.to_string())?.len() as usize;
    let total = args.ram_bytes.unwrap_or(source_bytes);
    let pages = total / PAGE;
    let ram = GuestRam::map(
        total,
        args.regions,
        args.memfd,
        args.shared_ram.as_deref(),
        args.hugepages,
    )?;
    let uffd = create_uffd(args.memfd, args.hugepages, args.blocking_uffd)?;
    for &(addr, size, _) in &ram.regions {
        register(&uffd, addr, size)?;
    }
    let mut sock =
        UnixStream::connect(&args.uds).map_err(|e| format!("connect {}: {e}", args.uds))?;
    let mut fds = vec![uffd.as_raw_fd()];
    if let Some(m) = &ram.memfd {
        fds.push(m.as_raw_fd());
    }
    let started = Instant::now();
    send_handshake(&sock, &ram.layout_json(), &fds)?;
    if let Some(control) = &args.wait_switch {
        wait_for_switch(control)?;
    }

    if let Some((start, count)) = args.remove {
        // Touch the first page of the range (it arrives with data), then give the range back.
        // SAFETY: reads one byte of guest RAM (faultd resolves the fault).
        let _ = unsafe { std::ptr::read_volatile(ram.page_addr(start) as *const u8) };
        let advice = if args.memfd && args.shared_ram.is_none() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: the range lies inside guest RAM (the caller keeps it within one region).
        if unsafe { libc::madvise(ram.page_addr(start) as *mut _, count * PAGE, advice) } < 0 {
            return Err(os_err("madvise"));
        }
    }

    let zero = match &args.expect_zero {
        Some(path) => Some(
            &*std::fs::read(path)
                .map_err(|e| format!("{path}: {e}"))?
                .leak(),
        ),
        None => None,
    };
    let mut expect = Expect {
        zero,
        // A page given back in a private mapping of a shared file reads the file's page
        // (the template's) again, not zero.
        removed: args.remove.filter(|_| args.shared_ram.is_none()),
        balloon: args.balloon.map(|(s, c, _)| (s, c)),
        balloon_done: false,
    };
    let mut mismatches = 0;
    let (ram_ref, interval, memfd) = (&ram, args.balloon_interval_ms, args.memfd);
    let balloon_result = std::thread::scope(|s| {
        let balloon = args
            .balloon
            .map(|b| s.spawn(move || inflate_balloon(ram_ref, b, interval, memfd)));
        if args.touch {
            mismatches += touch_pages(&args, &ram, &source, pages, expect)?;
        }
        balloon.map_or(Ok(()), |h| h.join().expect("balloon thread panicked"))
    });
    balloon_result?;
    expect.balloon_done = true;
    let touched_ms = started.elapsed().as_secs_f64() * 1e3;

    if !args.wait {
        println!(
            r#"{{"pages":{pages},"touched":{},"mismatches_during":{mismatches},"mismatches_after":0,"socket_closed":false,"touch_ms":{touched_ms:.1}}}"#,
            args.touch
        );
        return Ok(mismatches == 0);
    }
    // faultd closes the socket once every page is present.
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let eof = loop {
        match sock.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    let eof_ms = started.elapsed().as_secs_f64() * 1e3;
    let all: Vec<usize> = (0..pages).collect();
    // Without faultd, a missing page would block forever: only check after completion.
    let final_mismatches = if eof && args.touch {
        let touched: Vec<std::sync::atomic::AtomicBool> = (0..pages)
            .map(|_| std::sync::atomic::AtomicBool::new(true))
            .collect();
        check_pages(&ram, &source, &all, expect, &touched).0
    } else {
        0
    };
    // A write after completion must work without faultd.
    if eof && args.touch && pages > 0 {
        let p = rand::thread_rng().gen_range(0..pages);
        // SAFETY: writes one byte inside guest RAM.
        unsafe { std::ptr::write_volatile(ram.page_addr(p) as *mut u8, 0xA5) };
    }
    println!(
        r#"{{"pages":{pages},"touched":{},"mismatches_during":{mismatches},"mismatches_after":{final_mismatches},"socket_closed":{eof},"touch_ms":{touched_ms:.1},"complete_ms":{eof_ms:.1}}}"#,
        args.touch
    );
    drop(uffd);
    Ok(eof && mismatches == 0 && final_mismatches == 0)
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("test-vmm: error: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clustered_order_touches_whole_blocks_once_each_about_one_in_sixteen() {
        let pages = 1 << 16;
        let order = touch_order("clustered", pages, None, 7).unwrap();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), order.len(), "a page touched twice");
        let share = order.len() as f64 / pages as f64;
        assert!((0.05..0.075).contains(&share), "{share}");
        for block in sorted.chunks(16) {
            assert_eq!(block[0] % 16, 0, "{block:?}");
            assert!(block.windows(2).all(|w| w[1] == w[0] + 1), "{block:?}");
        }
        // The same seed, the same set (a restore touches what the recorded one did).
        assert_eq!(touch_order("clustered", pages, None, 7).unwrap(), order);
        assert_ne!(touch_order("clustered", pages, None, 8).unwrap(), order);
    }
}
