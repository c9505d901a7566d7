//! Safe by default, tried as an attacker would: crowds of slow clients, a local client
//! without the key, a key holder of another VM, and one that holds the master key but did
//! not open the session. None of them delays a destination past one handshake deadline,
//! learns a session id, takes a session over or completes another's migration; the real
//! migration completes with every byte right.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::auth::{Psk, Transcript};
use common::framed::FrameReader;
use common::wire::{
    AUTH_BYTES, Decoder, ErrorCode, FLAG_RESUMED, Message, PROTOCOL_VERSION, PageRange, Role,
    SessionParams, VmName, encode,
};
use tests::*;

const LIMIT: Duration = Duration::from_secs(120);
/// pagesrv's handshake deadline.
const DEADLINE: Duration = Duration::from_secs(5);

/// Records every byte read, to look for what must not leak.
struct Recording<'a> {
    conn: &'a mut TcpStream,
    seen: &'a mut Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.conn.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// What one scripted connection got back.
struct Attempt {
    /// Every frame received, in order.
    answers: Vec<Message>,
    /// Every byte received.
    bytes: Vec<u8>,
    /// The connection, if still open (welcomed).
    conn: TcpStream,
    /// What was read past the handshake.
    reader: FrameReader,
    /// What both MACs covered.
    transcript: Option<Transcript>,
}

impl Attempt {
    fn refusal(&self) -> Option<(ErrorCode, &str)> {
        self.answers.iter().find_map(|m| match m {
            Message::Error { code, text } => Some((*code, text.as_str())),
            _ => None,
        })
    }

    fn welcomed(&self) -> bool {
        self.answers
            .iter()
            .any(|m| matches!(m, Message::Welcome(_)))
    }

    /// Whether the bytes received hold `id` in any form (binary or hex).
    fn leaks(&self, id: u64) -> bool {
        let text = String::from_utf8_lossy(&self.bytes).to_lowercase();
        self.bytes.windows(8).any(|w| w == id.to_le_bytes()) || text.contains(&format!("{id:x}"))
    }
}

/// A hand-written client: `Hello` with `params`, then the `Proof` made with `key` (and no
/// proof of any session's secret), reading everything pagesrv answers.
fn attempt(addr: &str, key: &Psk, role: Role, params: SessionParams) -> Attempt {
    attempt_proving(addr, key, role, params, None)
}

/// [`attempt`], proving `secret` (a session's resume secret) if given.
fn attempt_proving(
    addr: &str,
    key: &Psk,
    role: Role,
    params: SessionParams,
    secret: Option<&common::auth::ResumeSecret>,
) -> Attempt {
    let mut conn = TcpStream::connect(addr).expect("connect to pagesrv");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    encode(&Message::Hello { role, params }, 0, &mut out);
    conn.write_all(&out).unwrap();
    let mut reader = FrameReader::new(Decoder::handshake());
    let (mut answers, mut bytes) = (Vec::new(), Vec::new());
    let mut transcript = None;
    loop {
        let frame = reader.read_frame(&mut Recording {
            conn: &mut conn,
            seen: &mut bytes,
        });
        let Ok((message, _)) = frame else { break };
        answers.push(message.clone());
        match message {
            Message::Challenge(server_nonce) => {
                let t = Transcript {
                    server_nonce,
                    client_nonce: [9; AUTH_BYTES],
                    role,
                    hello: params,
                };
                let proof = Message::Proof {
                    nonce: t.client_nonce,
                    mac: key.client_mac(&t),
                    resume: secret.map_or([0; AUTH_BYTES], |s| s.prove(&t)),
                };
                let mut out = Vec::new();
                encode(&proof, 0, &mut out);
                conn.write_all(&out).unwrap();
                transcript = Some(t);
            }
            Message::Error { .. } | Message::Welcome(_) => break,
            _ => {}
        }
    }
    Attempt {
        answers,
        bytes,
        conn,
        reader,
        transcript,
    }
}

/// A VM of 1024 pages.
fn params(vm: &str, session_id: u64, flags: u32) -> SessionParams {
    SessionParams {
        version: PROTOCOL_VERSION,
        page_size: PAGE as u32,
        total_pages: 1024,
        session_id,
        image_id: 0,
        flags,
        vm: VmName::new(vm).unwrap(),
    }
}

/// After a welcome: claim every page is here and say goodbye, as a forger would (all in one
/// write, as fast as it can).
fn forge_completion(conn: &mut TcpStream) {
    let mut out = Vec::new();
    let all = PageRange {
        first: 0,
        count: 1024,
    };
    encode(&Message::DoneMap(all), 128, &mut out);
    out.extend_from_slice(&[0xFF; 128]);
    encode(&Message::MapEnd, 0, &mut out);
    encode(&Message::Goodbye, 0, &mut out);
    let _ = conn.write_all(&out);
}

/// A migration of `vm` (1024 pages) that cannot complete on its own (no push, no touches);
/// returns faultd, the VMM and the session id faultd printed.
fn stalled_destination(
    dir: &Scratch,
    tag: &str,
    addr: &str,
    faultd_args: &[&str],
) -> (Proc, Proc, u64) {
    let (uds, stats) = (
        dir.path(&format!("{tag}.sock")),
        dir.path(&format!("{tag}.json")),
    );
    let mem = dir.path(&format!("{tag}.mem"));
    let mut faultd = start_faultd_with(addr, &uds, &stats, faultd_args);
    let vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let line = faultd.read_line();
    let id = line
        .strip_prefix("faultd link to pagesrv up (session ")
        .and_then(|rest| rest.get(..16))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no link: {line:?}"));
    (faultd, vmm, id)
}

/// pagesrv on `addr` with `args` (and `--listen addr`).
fn pagesrv_at(addr: &str, args: &[&str]) -> Proc {
    let mut p = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(["--listen", addr])
            .args(args),
    );
    let line = p.read_line();
    assert!(line.starts_with("pagesrv listening on"), "{line:?}");
    p
}

/// Restarts pagesrv (same address, the push on) so the stalled migrations complete: a
/// restarted pagesrv is a reconnect, not a failure.
fn complete_after_restart(old: &mut Proc, addr: &str, args: &[&str]) -> Proc {
    old.kill9();
    pagesrv_at(addr, args)
}

#[test]
fn test_eighty_dripping_clients_delay_a_keyed_destination_by_less_than_a_deadline() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("drip");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 128 << 20 >> 12, 0xD41, 4, 0..0);
    // Serving on after the migration: the fast dripper below is closed by its deadline,
    // not by pagesrv's exit.
    let (pagesrv, addr) = start_pagesrv(&mem, &["--serve-forever"]);
    let mut hello = Vec::new();
    encode(
        &Message::Hello {
            role: Role::Urgent,
            params: params("", 0, 0),
        },
        0,
        &mut hello,
    );
    // 80 clients, each sending the next byte of a valid Hello every 4 s (reconnecting when
    // closed), for as long as the migration runs.
    let stop = Arc::new(AtomicBool::new(false));
    let dripping = {
        let (stop, addr, hello) = (stop.clone(), addr.clone(), hello.clone());
        std::thread::spawn(move || {
            let mut clients: Vec<(TcpStream, usize)> = (0..80)
                .map(|_| (TcpStream::connect(&addr).unwrap(), 0))
                .collect();
            let mut reconnects = 0;
            while !stop.load(Ordering::Acquire) {
                for (conn, sent) in &mut clients {
                    if conn.write_all(&hello[*sent % hello.len()..][..1]).is_err() {
                        *conn = TcpStream::connect(&addr).unwrap();
                        reconnects += 1;
                    }
                    *sent += 1;
                }
                let next = Instant::now() + Duration::from_secs(4);
                while Instant::now() < next && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            reconnects
        })
    };
    // One more that drips faster than the deadline: it is closed once the deadline is out,
    // however often it sends (the deadline holds for the handshake, not each read).
    let mut one = TcpStream::connect(&addr).unwrap();
    let connected = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    one.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut dripped = 0;
    let closed_after = loop {
        let sent = one.write_all(&hello[dripped % hello.len()..][..1]);
        dripped += 1;
        let mut byte = [0u8; 1];
        let read = one.read(&mut byte);
        let waiting = matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        if sent.is_err() || !waiting {
            eprintln!("the fast dripper: {sent:?}, {read:?} after {dripped} bytes");
            break connected.elapsed();
        }
        assert!(
            connected.elapsed() < DEADLINE * 2,
            "a client that sends a byte every half second is still connected after {:?}",
            connected.elapsed()
        );
    };
    let (vmm_status, vmm_err) = vmm.wait(LIMIT);
    let (faultd_status, faultd_err) = faultd.wait(LIMIT);
    assert!(vmm_status.success(), "{vmm_err}\n{faultd_err}");
    assert!(faultd_status.success(), "{faultd_err}");
    let stats = json(&std::fs::read_to_string(&stats).unwrap());
    assert_eq!(stats["digest_check"], "match", "{stats}");
    stop.store(true, Ordering::Release);
    let reconnects = dripping.join().unwrap();
    // pagesrv writes its totals once the session's thread ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let pagesrv_err = pagesrv.kill_and_collect();
    assert!(
        pagesrv_err.contains("completed (verified)"),
        "{pagesrv_err}"
    );
    assert!(
        closed_after >= DEADLINE - Duration::from_millis(500)
            && closed_after < DEADLINE + Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
    let after_ms: u64 = faultd_err
        .split("connected to pagesrv attempts=")
        .nth(1)
        .and_then(|rest| rest.split("after_ms=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no connect line: {faultd_err}"));
    assert!(
        Duration::from_millis(after_ms) < DEADLINE,
        "the destination waited {after_ms} ms behind 80 slow clients"
    );
    eprintln!(
        "the destination connected after {after_ms} ms; the fast dripper was closed after {closed_after:?}; the slow ones reconnected {reconnects} times"
    );
}

#[test]
fn test_a_keyless_client_learns_no_session_id_and_takes_no_session_over() {
    if !require_userfaultfd() {
        return;
    }
    for keyed in [true, false] {
        let dir = Scratch::new(if keyed { "keyless-vs-key" } else { "keyless" });
        write_source(&dir.path("vm.mem"), 1024, 0x1E55, 4, 0..0);
        let key_arg = if keyed {
            vec!["--psk-file".to_string(), test_key().display().to_string()]
        } else {
            vec!["--insecure-no-key".to_string()]
        };
        let key_arg: Vec<&str> = key_arg.iter().map(String::as_str).collect();
        let addr = free_loopback_addr();
        let mem = dir.path("vm.mem");
        let mem_arg = mem.to_str().unwrap();
        let mut serve = vec!["--vm-mem", mem_arg];
        serve.extend(&key_arg);
        let mut pagesrv = pagesrv_at(&addr, &[&serve[..], &["--no-push"]].concat());
        let (mut faultd, mut vmm, id) = stalled_destination(&dir, "vm", &addr, &key_arg);
        // A local client without the key: a new session, this one by its id (as if it had
        // watched the wire), urgent and bulk, then a forged completion on anything welcomed.
        let stranger = Psk::unkeyed().for_vm(&VmName::default());
        for (role, session, flags) in [
            (Role::Urgent, 0, 0),
            (Role::Urgent, id, FLAG_RESUMED),
            (Role::Bulk, id, 0),
        ] {
            let mut a = attempt(&addr, &stranger, role, params("", session, flags));
            assert!(!a.leaks(id), "{role:?}: the session id leaked");
            let (code, text) = a.refusal().expect("refused");
            assert!(!a.welcomed(), "{role:?} with id {session:x}: welcomed");
            let expected = match (keyed, role) {
                (true, _) => ErrorCode::AuthFailed,
                (false, Role::Urgent) => ErrorCode::Busy,
                (false, Role::Bulk) => ErrorCode::UnknownSession,
            };
            assert_eq!(code, expected, "{role:?} {session:x}: {text}");
            forge_completion(&mut a.conn);
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(pagesrv.is_running(), "pagesrv ended: a forged completion?");
        // The real session was not touched: its link stays up, and once pagesrv comes back
        // with the push the migration completes.
        let mut pagesrv = complete_after_restart(&mut pagesrv, &addr, &serve);
        let stats = dir.path("vm.json");
        let done = finish_migration("keyless", &mut vmm, &mut faultd, &mut pagesrv, &stats);
        assert_eq!(
            done.stats["reconnects"], 1,
            "only the restart: {}",
            done.stats
        );
    }
}

#[test]
fn test_a_key_holder_of_another_vm_cannot_take_over_or_complete_a_session() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("other-vm");
    for vm in ["a", "b"] {
        write_source(&dir.path(&format!("{vm}.mem")), 1024, 0xAB, 4, 0..0);
    }
    let master = test_key().to_str().unwrap().to_owned();
    // b's key, derived from the master key: what b's destination holds.
    let b_key = dir.path("b.key");
    let out = Command::new(bin("pagesrv"))
        .args(["--psk-file", &master, "--derive-vm-key"])
        .arg(format!("b={}", b_key.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b_psk = Psk::load(&b_key).unwrap();
    assert_eq!(b_psk.vm, Some(VmName::new("b").unwrap()));
    let (a_mem, b_mem) = (dir.path("a.mem"), dir.path("b.mem"));
    let a_spec = format!("a={}", a_mem.display());
    let b_spec = format!("b={}", b_mem.display());
    let serve = [
        "--vm-mem",
        a_spec.as_str(),
        "--vm-mem",
        b_spec.as_str(),
        "--psk-file",
        master.as_str(),
    ];
    let addr = free_loopback_addr();
    let mut pagesrv = pagesrv_at(&addr, &[&serve[..], &["--no-push"]].concat());
    let (mut faultd_a, mut vmm_a, id_a) =
        stalled_destination(&dir, "a", &addr, &["--psk-file", &master, "--vm", "a"]);
    let b_key_path = b_key.to_str().unwrap();
    let (mut faultd_b, mut vmm_b, _) =
        stalled_destination(&dir, "b", &addr, &["--psk-file", b_key_path]);

    // b's key opens VM a in no way: not as a, not with a's session id.
    for (role, session, flags) in [
        (Role::Urgent, id_a, FLAG_RESUMED),
        (Role::Urgent, 0, 0),
        (Role::Bulk, id_a, 0),
    ] {
        let a = attempt(&addr, &b_psk.psk, role, params("a", session, flags));
        assert_eq!(
            a.refusal().map(|r| r.0),
            Some(ErrorCode::AuthFailed),
            "{role:?} {session:x}"
        );
        assert!(!a.leaks(id_a));
    }
    // The master key, without the secret of a's session: refused, nothing changes.
    let a_key = Psk::load(std::path::Path::new(&master))
        .unwrap()
        .psk
        .for_vm(&VmName::new("a").unwrap());
    for (role, session, flags) in [
        (Role::Urgent, id_a, FLAG_RESUMED),
        (Role::Urgent, 0, 0),
        (Role::Bulk, id_a, 0),
    ] {
        let mut a = attempt(&addr, &a_key, role, params("a", session, flags));
        assert!(!a.welcomed(), "{role:?} {session:x}: welcomed");
        assert!(!a.leaks(id_a), "{role:?} {session:x}: the id leaked");
        let (code, _) = a.refusal().expect("refused");
        assert!(
            matches!(code, ErrorCode::Busy | ErrorCode::UnknownSession),
            "{code:?}"
        );
        forge_completion(&mut a.conn);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(pagesrv.is_running(), "pagesrv ended: a forged completion?");
    // Both migrations complete once pagesrv comes back with the push.
    let mut pagesrv = complete_after_restart(&mut pagesrv, &addr, &serve);
    let a_stats = dir.path("a.json");
    let (status_a, err_a) = faultd_a.wait(LIMIT);
    assert!(status_a.success(), "{err_a}");
    let (status_b, err_b) = faultd_b.wait(LIMIT);
    assert!(status_b.success(), "{err_b}");
    for vmm in [&mut vmm_a, &mut vmm_b] {
        let (status, err) = vmm.wait(LIMIT);
        assert!(status.success(), "{err}");
    }
    let (status, pagesrv_err) = pagesrv.wait(LIMIT);
    assert!(status.success(), "{pagesrv_err}");
    assert!(
        pagesrv_err.contains("VM a: completed (verified)"),
        "{pagesrv_err}"
    );
    let stats = json(&std::fs::read_to_string(a_stats).unwrap());
    assert_eq!(stats["digest_check"], "match", "{stats}");
    assert_eq!(stats["received_digest"], source_digest(&a_mem).as_str());
}

#[test]
fn test_starting_without_a_key_or_the_opt_in_is_refused_naming_the_flag() {
    let dir = Scratch::new("no-key-flag");
    write_source(&dir.path("vm.mem"), 16, 1, 0, 0..0);
    let out = Command::new(bin("pagesrv"))
        .arg("--vm-mem")
        .arg(dir.path("vm.mem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--insecure-no-key") && err.contains("--psk-file"),
        "{err}"
    );
    let out = Command::new(bin("faultd"))
        .args(["--connect", "127.0.0.1:1", "--uds"])
        .arg(dir.path("s"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--insecure-no-key") && err.contains("--psk-file"),
        "{err}"
    );
    // Keyless to another host: never.
    let out = Command::new(bin("faultd"))
        .args(["--connect", "192.0.2.1:7070", "--insecure-no-key", "--uds"])
        .arg(dir.path("s"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("loopback only"), "{err}");
    assert!(!dir.path("s").exists(), "refused before waiting for a VMM");
}

#[test]
fn test_an_unverified_completion_does_not_exit_0() {
    if !require_userfaultfd() {
        return;
    }
    // faultd --no-verify compares no digests: every page arrived, but nothing proves the
    // source VM redundant, so pagesrv does not say "completed" with exit 0.
    let dir = Scratch::new("unverified");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 1024, 0x0E3, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--no-verify"]);
    let mut vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let (status, err) = vmm.wait(LIMIT);
    assert!(status.success(), "{err}");
    let (status, err) = faultd.wait(LIMIT);
    assert!(status.success(), "{err}");
    let (status, err) = pagesrv.wait(LIMIT);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("completed (NOT verified)"), "{err}");
    assert!(err.contains("faultd --no-verify"), "{err}");
}

#[test]
fn test_a_request_for_the_whole_guest_is_refused_not_copied() {
    // A key holder that opens a session properly (urgent, then bulk proving the session's
    // secret) and asks for 64 MiB in one Request: refused, the session ends; pagesrv never
    // reads and seals the whole range on its urgent thread.
    let dir = Scratch::new("huge-request");
    let mem = dir.path("vm.mem");
    let pages = 64 << 20 >> 12;
    write_source(&mem, pages, 0x4E0, 4, 0..0);
    let (pagesrv, addr) = start_pagesrv(&mem, &["--no-push"]);
    let key = Psk::load(test_key())
        .unwrap()
        .psk
        .for_vm(&VmName::default());
    let ours = SessionParams {
        total_pages: pages as u64,
        ..params("", 0, 0)
    };
    let mut urgent = attempt(&addr, &key, Role::Urgent, ours);
    let Some(Message::Welcome(welcome)) = urgent.answers.last().cloned() else {
        panic!("not welcomed: {:?}", urgent.answers)
    };
    let t = urgent.transcript.expect("a handshake");
    let secret = key.resume_secret(&t, welcome.session_id);
    let bulk_hello = SessionParams {
        session_id: welcome.session_id,
        image_id: welcome.image_id,
        ..ours
    };
    let bulk = attempt_proving(&addr, &key, Role::Bulk, bulk_hello, Some(&secret));
    assert!(bulk.welcomed(), "{:?}", bulk.answers);
    // Sealed from here on.
    let (sealer, opener) = key.channel_secrets(&t).client();
    let mut tx = common::framed::FrameEncoder::sealed(sealer);
    urgent.reader.set_opener(opener);
    urgent
        .reader
        .set_decoder(Decoder::session(PAGE as u64, pages as u64));
    tx.write_frame(&mut urgent.conn, &Message::MapEnd, &[])
        .unwrap();
    let whole = PageRange {
        first: 0,
        count: pages as u64,
    };
    tx.write_frame(&mut urgent.conn, &Message::Request(whole), &[])
        .unwrap();
    let refusal = loop {
        match urgent.reader.read_frame(&mut urgent.conn) {
            Ok((Message::Heartbeat, _)) => {}
            Ok((message, _)) => break message,
            Err(e) => panic!("no answer: {e}"),
        }
    };
    let Message::Error { code, text } = refusal else {
        panic!("answered: {refusal:?}")
    };
    assert_eq!(code, ErrorCode::Protocol);
    assert!(text.contains("over the limit"), "{text}");
    // The session ended: its connection closes, no page follows.
    loop {
        match urgent.reader.read_frame(&mut urgent.conn) {
            Ok((Message::Heartbeat, _)) => {}
            Ok((message, _)) => panic!("after the refusal: {message:?}"),
            Err(_) => break,
        }
    }
    drop(pagesrv);
}

#[test]
fn test_a_stats_path_that_cannot_be_written_is_refused_before_any_page_moves() {
    // After a verified migration faultd used to exit 1 when its stats could not be written,
    // while pagesrv exited 0: the orchestrator then killed the destination and destroyed
    // the source. The path is checked at the start instead.
    let dir = Scratch::new("stats-path");
    let out = Command::new(bin("faultd"))
        .args(["--connect", "127.0.0.1:1", "--insecure-no-key", "--uds"])
        .arg(dir.path("s"))
        .args(["--stats-json", "/nonexistent/dir/stats.json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write --stats-json"), "{err}");
    assert!(!dir.path("s").exists(), "refused before waiting for a VMM");
}

/// A cut-proxy on `listen` in front of `target` that forwards untouched.
fn plain_proxy(listen: &str, target: &str) -> Proc {
    let mut proxy = Proc::spawn(
        "cut-proxy",
        Command::new(bin("cut-proxy"))
            .args(["--target", target, "--listen", listen, "--cuts", "0"]),
    );
    let line = proxy.read_line();
    assert!(line.starts_with("proxy listening on"), "{line}");
    proxy
}

#[test]
fn test_a_session_cut_off_stays_its_destinations() {
    if !require_userfaultfd() {
        return;
    }
    // While the link is down (a partition), nobody else may start a session for the VM
    // (and forge its end), nor resume this one: with the VM's key, or without any key.
    for keyed in [true, false] {
        let dir = Scratch::new(if keyed { "cut-off-key" } else { "cut-off" });
        write_source(&dir.path("vm.mem"), 1024, 0xC0FF, 4, 0..0);
        let key_arg = if keyed {
            vec!["--psk-file".to_string(), test_key().display().to_string()]
        } else {
            vec!["--insecure-no-key".to_string()]
        };
        let key_arg: Vec<&str> = key_arg.iter().map(String::as_str).collect();
        let mem = dir.path("vm.mem");
        let mut serve = vec!["--vm-mem", mem.to_str().unwrap()];
        serve.extend(&key_arg);
        let addr = free_loopback_addr();
        let mut pagesrv = pagesrv_at(&addr, &[&serve[..], &["--no-push"]].concat());
        let front = free_loopback_addr();
        let mut proxy = plain_proxy(&front, &addr);
        let (mut faultd, mut vmm, id) = stalled_destination(&dir, "vm", &front, &key_arg);
        // The partition: faultd cannot reach pagesrv, pagesrv sees the session break off.
        proxy.kill9();
        std::thread::sleep(Duration::from_millis(500));
        let key = if keyed {
            Psk::load(test_key())
                .unwrap()
                .psk
                .for_vm(&VmName::default())
        } else {
            Psk::unkeyed().for_vm(&VmName::default())
        };
        for (role, session, flags) in [
            (Role::Urgent, 0, 0),
            (Role::Urgent, 12345, 0),
            (Role::Urgent, id, FLAG_RESUMED),
            (Role::Bulk, id, 0),
        ] {
            let mut a = attempt(&addr, &key, role, params("", session, flags));
            assert!(
                !a.welcomed(),
                "keyed {keyed}: {role:?} {session:x} welcomed"
            );
            assert!(!a.leaks(id));
            let (code, _) = a.refusal().expect("refused");
            assert!(
                matches!(code, ErrorCode::Busy | ErrorCode::UnknownSession),
                "{code:?}"
            );
            forge_completion(&mut a.conn);
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(pagesrv.is_running(), "pagesrv ended: a forged completion?");
        // The partition heals: the destination resumes its own session.
        let _proxy = plain_proxy(&front, &addr);
        let line = faultd.read_line();
        assert_eq!(
            line,
            format!("faultd link to pagesrv up (session {id:016x}, generation 2)"),
            "keyed {keyed}"
        );
        // And completes once pagesrv comes back with the push.
        let mut pagesrv = complete_after_restart(&mut pagesrv, &addr, &serve);
        let stats = dir.path("vm.json");
        finish_migration("cut off", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    }
}
