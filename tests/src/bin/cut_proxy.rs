//! A TCP proxy that breaks the connections it carries, several times, at random moments of
//! a migration: each time a random number of MiB (within `--min-mib..--max-mib`) has passed
//! from server to client since the last break, it
//!
//! - `--mode cut`: shuts down both sides of every live connection;
//! - `--mode freeze`: freezes every live connection: open, but nothing is forwarded any more
//!   in either direction, like a hung peer or a middlebox that dropped the flow (both
//!   kernels still ACK);
//! - `--mode flip`: flips one bit in the middle of the chunk it is forwarding;
//! - `--mode replay`: forwards the chunk, then the previous chunk of that connection again;
//! - `--mode splice`: forwards, before the chunk, the last chunk it carried on another
//!   connection (a frame from another connection);
//! - `--mode truncate`: forwards the chunk but its last 5 bytes, then shuts the connection
//!   (a truncated tag).
//!
//! It forwards everything after the last break untouched.
//!
//! ```text
//! cut-proxy --target ADDR [--listen ADDR] [--cuts N] [--min-mib A] [--max-mib B] [--seed S]
//!           [--mode cut|freeze|flip|replay|splice|truncate] [--dump FILE] [--down-while FILE]
//! ```
//!
//! With `--dump FILE` it also appends every byte it forwards from server to client to FILE
//! (to check what an observer on the path sees). With `--down-while FILE` the server is
//! "away" while FILE exists: live connections are shut down when it appears (checked every
//! 10 ms) and new ones are closed at once; after it is removed, connections are carried
//! again (an outage under a test's control, the server itself untouched).
//!
//! Prints `proxy listening on ADDR` when ready and `MODE N` at each break.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cut,
    Freeze,
    Flip,
    Replay,
    Splice,
    Truncate,
}

impl Mode {
    fn parse(text: &str) -> Mode {
        match text {
            "cut" => Mode::Cut,
            "freeze" => Mode::Freeze,
            "flip" => Mode::Flip,
            "replay" => Mode::Replay,
            "splice" => Mode::Splice,
            "truncate" => Mode::Truncate,
            other => panic!("--mode cut|freeze|flip|replay|splice|truncate, not {other}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Cut => "cut",
            Mode::Freeze => "freeze",
            Mode::Flip => "flip",
            Mode::Replay => "replay",
            Mode::Splice => "splice",
            Mode::Truncate => "truncate",
        }
    }
}

/// One proxied connection: both sockets, and whether it is frozen.
struct Pair {
    sockets: [TcpStream; 2],
    frozen: Arc<AtomicBool>,
}

struct Cutter {
    mode: Mode,
    live: Mutex<Vec<Pair>>,
    bytes: AtomicU64,
    state: Mutex<(u64, u64, rand::rngs::StdRng)>, // (breaks done, threshold bytes, rng)
    breaks: u64,
    min_bytes: u64,
    max_bytes: u64,
    /// The last chunk each connection carried server → client (splice mode).
    last_chunks: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Where to copy what goes server → client.
    dump: Option<Mutex<std::fs::File>>,
}

impl Cutter {
    /// Counts `n` bytes forwarded; true when this chunk is where the next break happens.
    fn crosses(&self, n: u64) -> bool {
        let total = self.bytes.fetch_add(n, Ordering::AcqRel) + n;
        let mut state = self.state.lock().expect("state");
        let (done, threshold, rng) = &mut *state;
        if *done >= self.breaks || total < *threshold {
            return false;
        }
        *done += 1;
        *threshold = rng.gen_range(self.min_bytes..=self.max_bytes);
        self.bytes.store(0, Ordering::Release);
        println!("{} {done}", self.mode.name());
        true
    }

    /// The last chunk some other connection than `conn_id` carried.
    fn chunk_from_another(&self, conn_id: u64) -> Vec<u8> {
        let last = self.last_chunks.lock().expect("last chunks");
        last.iter()
            .rev()
            .find(|(id, _)| *id != conn_id)
            .map(|(_, chunk)| chunk.clone())
            .unwrap_or_default()
    }

    /// Cuts or freezes every live connection.
    fn break_all(&self) {
        for pair in self.live.lock().expect("live").drain(..) {
            if self.mode == Mode::Freeze {
                pair.frozen.store(true, Ordering::Release);
            } else {
                for conn in &pair.sockets {
                    let _ = conn.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Forwards `from` to `to`; with a cutter, counts and breaks (server → client only).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    frozen: Arc<AtomicBool>,
    cutter: Option<(Arc<Cutter>, u64)>,
) {
    let mut buf = vec![0u8; 256 << 10];
    let mut previous: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.load(Ordering::Acquire) {
            // Silent for good, sockets open: keep them (and this thread) until the end.
            let _keep = (from, to);
            loop {
                std::thread::park();
            }
        }
        let chunk = &mut buf[..n];
        let mut ok = true;
        if let Some((cutter, conn_id)) = &cutter {
            if cutter.crosses(n as u64) {
                match cutter.mode {
                    Mode::Cut | Mode::Freeze => {
                        cutter.break_all();
                        if cutter.mode == Mode::Freeze {
                            continue; // this chunk is never delivered
                        }
                    }
                    Mode::Flip => chunk[n / 2] ^= 0x10,
                    Mode::Replay => {
                        // Bytes this connection already carried (the chunk itself, if it is
                        // the first).
                        let again = if previous.is_empty() {
                            chunk.to_vec()
                        } else {
                            std::mem::take(&mut previous)
                        };
                        ok = to.write_all(chunk).is_ok() && to.write_all(&again).is_ok();
                        previous = chunk.to_vec();
                        if ok {
                            continue;
                        }
                    }
                    Mode::Splice => {
                        let other = cutter.chunk_from_another(*conn_id);
                        assert!(
                            !other.is_empty(),
                            "no other connection carried anything yet"
                        );
                        ok = to.write_all(&other).is_ok();
                    }
                    Mode::Truncate => {
                        let _ = to.write_all(&chunk[..n.saturating_sub(5)]);
                        break;
                    }
                }
            }
            if cutter.mode == Mode::Replay {
                previous = chunk.to_vec();
            }
            if cutter.mode == Mode::Splice {
                let mut last = cutter.last_chunks.lock().expect("last chunks");
                last.retain(|(id, _)| id != conn_id);
                last.push((*conn_id, chunk.to_vec()));
            }
        }
        if !ok || to.write_all(chunk).is_err() {
            break;
        }
        if let Some((cutter, _)) = &cutter
            && let Some(dump) = &cutter.dump
        {
            let _ = dump.lock().expect("dump").write_all(chunk);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn main() {
    let mut target = String::new();
    let mut listen = "127.0.0.1:0".to_string();
    let (mut breaks, mut min_mib, mut max_mib, mut seed) = (3u64, 10u64, 40u64, 1u64);
    let mut mode = Mode::Cut;
    let mut dump = None;
    let mut down_while: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => target = value,
            "--listen" => listen = value,
            "--cuts" => breaks = value.parse().expect("--cuts"),
            "--min-mib" => min_mib = value.parse().expect("--min-mib"),
            "--max-mib" => max_mib = value.parse().expect("--max-mib"),
            "--seed" => seed = value.parse().expect("--seed"),
            "--mode" => mode = Mode::parse(&value),
            "--dump" => dump = Some(Mutex::new(std::fs::File::create(&value).expect("--dump"))),
            "--down-while" => down_while = Some(value.into()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!target.is_empty(), "--target is required");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let first = rng.gen_range(min_mib << 20..=max_mib << 20);
    let cutter = Arc::new(Cutter {
        mode,
        live: Mutex::new(Vec::new()),
        bytes: AtomicU64::new(0),
        state: Mutex::new((0, first, rng)),
        breaks,
        min_bytes: min_mib << 20,
        max_bytes: max_mib << 20,
        last_chunks: Mutex::new(Vec::new()),
        dump,
    });
    let listener = TcpListener::bind(&listen).expect("bind");
    println!(
        "proxy listening on {}",
        listener.local_addr().expect("addr")
    );
    if let Some(flag) = down_while.clone() {
        let cutter = cutter.clone();
        std::thread::spawn(move || {
            loop {
                if flag.exists() {
                    for pair in cutter.live.lock().expect("live").drain(..) {
                        for conn in &pair.sockets {
                            let _ = conn.shutdown(Shutdown::Both);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
    }
    for (conn_id, client) in (1u64..).zip(listener.incoming()) {
        let Ok(client) = client else { continue };
        if down_while.as_ref().is_some_and(|f| f.exists()) {
            continue; // dropped: closed at once
        }
        let Ok(server) = TcpStream::connect(&target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let frozen = Arc::new(AtomicBool::new(false));
        cutter.live.lock().expect("live").push(Pair {
            sockets: [
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            ],
            frozen: frozen.clone(),
        });
        let (c2, s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let counted = cutter.clone();
        let frozen2 = frozen.clone();
        std::thread::spawn(move || pump(client, server, frozen, None));
        std::thread::spawn(move || pump(s2, c2, frozen2, Some((counted, conn_id))));
    }
}
