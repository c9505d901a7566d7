//! A stand-in source VMM that speaks pagesrv's source link (`pagesrv --vmm-uds`) and knows
//! exactly what it writes: guest RAM is a memfd it fills with the fixtures' pattern, a writer
//! thread keeps rewriting random pages at `--write-rate` pages per second (a new generation
//! of the pattern each time) and records them in its own dirty bitmap, which it hands out
//! (and clears) on `dirty`. On `pause` it stops writing, writes the final RAM to `--final`
//! (what the destination must hold), answers with the last bitmap and prints
//! `{"event":"paused",...}`. pagesrv's outcome is printed as `{"event":"outcome",...}`
//! (`failed`: the guest "resumes", `{"event":"resumed"}`); a link that ends without one as
//! `{"event":"link-lost"}` (the guest stays paused). Then it waits for stdin to close.
//!
//! ```text
//! test-source --pagesrv-uds PATH --pages N --final FILE [--write-rate PAGES_PER_S]
//!             [--seed N] [--zero-every N] [--free-every N]
//! ```
//!
//! With `--free-every N`, every page `p` with `p % N == 1` starts free in the guest's
//! allocator: it holds old bytes and is named in the answers to pagesrv's `free` until the
//! writer hands it out (off the free list, then written: a hint taken before says free, the
//! dirty bitmap says written); the final RAM has the pages still free zero, as the
//! destination must read them.
//!
//! ```text
//! ```

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::source_link::{
    CommandKind, FromPagesrv, Outcome, SOURCE_LINK_VERSION, SourceHello, SourceVmmClient,
};
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

struct Args {
    uds: String,
    pages: usize,
    final_path: String,
    write_rate: u64,
    seed: u64,
    zero_every: usize,
    free_every: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        uds: String::new(),
        pages: 0,
        final_path: String::new(),
        write_rate: 0,
        seed: 1,
        zero_every: 4,
        free_every: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--pagesrv-uds" => a.uds = value()?,
            "--pages" => a.pages = value()?.parse().map_err(|e| format!("--pages: {e}"))?,
            "--final" => a.final_path = value()?,
            "--write-rate" => {
                a.write_rate = value()?.parse().map_err(|e| format!("--write-rate: {e}"))?
            }
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--free-every" => {
                a.free_every = value()?.parse().map_err(|e| format!("--free-every: {e}"))?
            }
            "--zero-every" => {
                a.zero_every = value()?.parse().map_err(|e| format!("--zero-every: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.uds.is_empty() || a.pages == 0 || a.final_path.is_empty() {
        return Err("--pagesrv-uds, --pages and --final are required".into());
    }
    Ok(a)
}

/// The fixtures' pattern (`tests::write_source`) for `generation` 0, a different one after.
fn pattern(page: usize, seed: u64, generation: u64, out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let v = (page as u64) << 32 ^ seed.rotate_left(i as u32 % 64) ^ i as u64 ^ generation << 56;
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// Pages written since the last bitmap handed out.
struct Dirty {
    words: Vec<AtomicU64>,
}

impl Dirty {
    fn mark(&self, page: usize) {
        self.words[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// The bitmap (bit `i % 8` of byte `i / 8` for page `i`), cleared as it is taken.
    fn take(&self, pages: usize) -> Vec<u8> {
        let mut out = vec![0u8; pages.div_ceil(8)];
        for (w, word) in self.words.iter().enumerate() {
            let bits = word.swap(0, Ordering::AcqRel);
            for b in 0..8 {
                let at = w * 8 + b;
                if at < out.len() {
                    out[at] = (bits >> (b * 8)) as u8;
                }
            }
        }
        out
    }
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    let bytes = a.pages * PAGE;
    // SAFETY: creates a new anonymous file; the name is a valid C string.
    let raw = unsafe { libc::memfd_create(c"test-source-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let ram = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    ram.set_len(bytes as u64).map_err(|e| e.to_string())?;
    let free_every = a.free_every;
    let is_free = move |p: usize| free_every > 0 && p % free_every == 1;
    let mut page = vec![0u8; PAGE];
    for p in 0..a.pages {
        if is_free(p) {
            page.fill(0xDE); // freed memory keeps its old bytes
        } else if a.zero_every > 0 && p % a.zero_every == 0 {
            continue;
        } else {
            pattern(p, a.seed, 0, &mut page);
        }
        ram.write_all_at(&page, (p * PAGE) as u64)
            .map_err(|e| e.to_string())?;
    }
    let hello = SourceHello {
        version: SOURCE_LINK_VERSION,
        size_bytes: bytes as u64,
        page_size: PAGE as u64,
        free_hints: a.free_every > 0,
    };
    let mut link = SourceVmmClient::connect(std::path::Path::new(&a.uds), &hello, ram.as_fd())
        .map_err(|e| format!("cannot reach pagesrv: {e:#}"))?;
    let dirty = Arc::new(Dirty {
        words: (0..a.pages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(0u64));
    // The guest's free list: pages it has not handed out (yet).
    let free_list = Arc::new(Mutex::new({
        let mut bits = vec![0u8; a.pages.div_ceil(8)];
        for p in (0..a.pages).filter(|&p| is_free(p)) {
            bits[p / 8] |= 1 << (p % 8);
        }
        bits
    }));
    let mut writer = Some({
        let free_list = free_list.clone();
        let (ram, dirty, stop, written) = (
            ram.try_clone().map_err(|e| e.to_string())?,
            dirty.clone(),
            stop.clone(),
            written.clone(),
        );
        let (pages, seed, rate) = (a.pages, a.seed, a.write_rate);
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut page = vec![0u8; PAGE];
            let started = Instant::now();
            let mut count = 0u64;
            while rate > 0 && !stop.load(Ordering::Acquire) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                if count >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let p = rng.gen_range(0..pages);
                {
                    // A free page is handed out (off the free list) before it is written: a
                    // hint taken earlier still names it, the dirty bitmap then wins.
                    let mut free = free_list.lock().unwrap();
                    free[p / 8] &= !(1 << (p % 8));
                }
                count += 1;
                pattern(p, seed, count, &mut page);
                // The write, then its dirty bit: pagesrv takes the bitmap before it reads the
                // pages, so a write is either in what it reads or in the next bitmap.
                let _ = ram.write_all_at(&page, (p * PAGE) as u64);
                dirty.mark(p);
            }
            *written.lock().unwrap() = count;
        })
    });
    // The free list as it was at the pause, once paused.
    let mut paused: Option<Vec<u8>> = None;
    let end = loop {
        let message = link.next_message().map_err(|e| format!("{e:#}"))?;
        let cmd = match message {
            None => break None,
            Some(FromPagesrv::Outcome(outcome)) => {
                link.ack_outcome().map_err(|e| format!("{e:#}"))?;
                break Some(outcome);
            }
            Some(FromPagesrv::Command(cmd)) => cmd,
        };
        match (cmd, paused.as_deref()) {
            (CommandKind::Dirty, None) => {
                let bitmap = dirty.take(a.pages);
                link.send_bitmap(CommandKind::Dirty, &bitmap)
                    .map_err(|e| format!("{e:#}"))?;
            }
            (CommandKind::Free, None) => {
                let free = free_list.lock().unwrap().clone();
                link.send_bitmap(CommandKind::Free, &free)
                    .map_err(|e| format!("{e:#}"))?;
            }
            (CommandKind::Free, Some(free_bitmap)) => {
                link.send_bitmap(CommandKind::Free, free_bitmap)
                    .map_err(|e| format!("{e:#}"))?;
            }
            (CommandKind::Pause, None) => {
                stop.store(true, Ordering::Release);
                if let Some(writer) = writer.take() {
                    writer.join().map_err(|_| "the writer panicked")?;
                }
                let bitmap = dirty.take(a.pages);
                let mut image = vec![0u8; bytes];
                ram.read_exact_at(&mut image, 0)
                    .map_err(|e| e.to_string())?;
                let free_bitmap = free_list.lock().unwrap().clone();
                for (p, bytes) in image.chunks_mut(PAGE).enumerate() {
                    if free_bitmap[p / 8] & (1 << (p % 8)) != 0 {
                        bytes.fill(0); // still free: what the destination must read
                    }
                }
                std::fs::write(&a.final_path, &image).map_err(|e| e.to_string())?;
                link.send_bitmap(CommandKind::Pause, &bitmap)
                    .map_err(|e| format!("{e:#}"))?;
                let written = *written.lock().unwrap();
                println!(r#"{{"event":"paused","pages_written":{written}}}"#);
                std::io::stdout().flush().map_err(|e| e.to_string())?;
                paused = Some(free_bitmap);
            }
            (cmd, Some(_)) => return Err(format!("pagesrv asked for {cmd:?} after the pause")),
        }
    };
    // The writer stopped at the pause (or stops now: the migration ended before it).
    stop.store(true, Ordering::Release);
    if let Some(writer) = writer.take() {
        writer.join().map_err(|_| "the writer panicked")?;
    }
    match end {
        Some(Outcome::Completed { verified }) => {
            println!(r#"{{"event":"outcome","outcome":"completed","verified":{verified}}}"#)
        }
        Some(Outcome::Failed { reason }) => {
            let event =
                serde_json::json!({"event": "outcome", "outcome": "failed", "reason": reason});
            println!("{event}");
            // The destination does not hold the guest: it runs on here.
            println!(r#"{{"event":"resumed"}}"#);
        }
        None => println!(r#"{{"event":"link-lost","paused":{}}}"#, paused.is_some()),
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Keep the RAM until the driver is done with us.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let _ = ram.as_raw_fd();
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("test-source: error: {e}");
        std::process::exit(1);
    }
}
