//! A TCP proxy that cuts every connection it carries, several times, at random moments of
//! a migration: after a random number of MiB (within `--min-mib..--max-mib`) has passed
//! since the last cut, it shuts down both sides of every live connection. It forwards
//! everything after the last cut untouched.
//!
//! ```text
//! cut-proxy --target ADDR [--listen ADDR] [--cuts N] [--min-mib A] [--max-mib B] [--seed S]
//! ```
//!
//! Prints `proxy listening on ADDR` when ready and `cut N` at each cut.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};

struct Cutter {
    live: Mutex<Vec<TcpStream>>,
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
        for conn in self.live.lock().expect("live").drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
        println!("cut {done}");
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cutter: Option<Arc<Cutter>>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!target.is_empty(), "--target is required");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let first = rng.gen_range(min_mib << 20..=max_mib << 20);
    let cutter = Arc::new(Cutter {
        live: Mutex::new(Vec::new()),
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
        {
            let mut live = cutter.live.lock().expect("live");
            live.push(client.try_clone().expect("clone"));
            live.push(server.try_clone().expect("clone"));
        }
        let (c2, s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let counted = cutter.clone();
        std::thread::spawn(move || pump(client, server, None));
        std::thread::spawn(move || pump(s2, c2, Some(counted)));
    }
}
