//! A TCP proxy that breaks every connection it carries, several times, at random moments of
//! a migration: after a random number of MiB (within `--min-mib..--max-mib`) has passed
//! since the last break, it either shuts down both sides of every live connection
//! (`--mode cut`), or freezes them (`--mode freeze`): they stay open but nothing is forwarded
//! any more, in either direction, like a hung peer or a middlebox that dropped the flow
//! (both kernels still ACK). It forwards everything after the last break untouched.
//!
//! ```text
//! cut-proxy --target ADDR [--listen ADDR] [--cuts N] [--min-mib A] [--max-mib B] [--seed S]
//!           [--mode cut|freeze]
//! ```
//!
//! Prints `proxy listening on ADDR` when ready and `cut N` (or `freeze N`) at each break.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

/// One proxied connection: both sockets, and whether it is frozen.
struct Pair {
    sockets: [TcpStream; 2],
    frozen: Arc<AtomicBool>,
}

struct Cutter {
    live: Mutex<Vec<Pair>>,
    freeze: bool,
    bytes: AtomicU64,
    state: Mutex<(u64, u64, rand::rngs::StdRng)>, // (cuts done, threshold bytes, rng)
    cuts: u64,
    min_bytes: u64,
    max_bytes: u64,
}

impl Cutter {
    fn forwarded(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::AcqRel) + n;
        let mut state = self.state.lock().expect("state");
        let (done, threshold, rng) = &mut *state;
        if *done >= self.cuts || total < *threshold {
            return;
        }
        *done += 1;
        *threshold = rng.gen_range(self.min_bytes..=self.max_bytes);
        self.bytes.store(0, Ordering::Release);
        for pair in self.live.lock().expect("live").drain(..) {
            if self.freeze {
                pair.frozen.store(true, Ordering::Release);
            } else {
                for conn in &pair.sockets {
                    let _ = conn.shutdown(Shutdown::Both);
                }
            }
        }
        println!("{} {done}", if self.freeze { "freeze" } else { "cut" });
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    frozen: Arc<AtomicBool>,
    cutter: Option<Arc<Cutter>>,
) {
    let mut buf = vec![0u8; 256 << 10];
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
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(c) = &cutter {
            c.forwarded(n as u64);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn main() {
    let mut target = String::new();
    let mut listen = "127.0.0.1:0".to_string();
    let (mut cuts, mut min_mib, mut max_mib, mut seed) = (3u64, 10u64, 40u64, 1u64);
    let mut freeze = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => target = value,
            "--listen" => listen = value,
            "--cuts" => cuts = value.parse().expect("--cuts"),
            "--min-mib" => min_mib = value.parse().expect("--min-mib"),
            "--max-mib" => max_mib = value.parse().expect("--max-mib"),
            "--seed" => seed = value.parse().expect("--seed"),
            "--mode" => {
                freeze = match value.as_str() {
                    "cut" => false,
                    "freeze" => true,
                    other => panic!("--mode cut|freeze, not {other}"),
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!target.is_empty(), "--target is required");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let first = rng.gen_range(min_mib << 20..=max_mib << 20);
    let cutter = Arc::new(Cutter {
        live: Mutex::new(Vec::new()),
        freeze,
        bytes: AtomicU64::new(0),
        state: Mutex::new((0, first, rng)),
        cuts,
        min_bytes: min_mib << 20,
        max_bytes: max_mib << 20,
    });
    let listener = TcpListener::bind(&listen).expect("bind");
    println!(
        "proxy listening on {}",
        listener.local_addr().expect("addr")
    );
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
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
        std::thread::spawn(move || pump(s2, c2, frozen2, Some(counted)));
    }
}
