//! Never hang, never report a false success: links that go silent without closing, faultd
//! started before pagesrv, a balloon inflating while the link is cut, stale and silent
//! clients, a source restarted on another image.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn test_links_that_freeze_twice_are_detected_and_the_migration_completes() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("freeze");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 256 << 20 >> 12, 0xF2EE, 4, 0..0);
    let key = dir.path("key");
    write_key(&key, "the freeze test's shared secret");
    let key_args = ["--psk-file", key.to_str().unwrap()];
    let (mut pagesrv, addr) = start_pagesrv(&mem, &key_args);
    let (mut proxy, proxy_addr) = start_proxy(
        &addr,
        &[
            "--mode",
            "freeze",
            "--cuts",
            "2",
            "--min-mib",
            "8",
            "--max-mib",
            "30",
        ],
    );
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &key_args);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration("freeze", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert_eq!(proxy.read_line(), "freeze 1");
    assert_eq!(proxy.read_line(), "freeze 2");
    let stats = &done.stats;
    assert!(stats["reconnects"].as_u64().unwrap() >= 2, "{stats}");
    assert_eq!(stats["received_digest"], source_digest(&mem).as_str());
    // Detected by the heartbeats (the urgent or the bulk connection, whichever first).
    assert!(done.faultd_err.contains("no frame"), "{}", done.faultd_err);
    eprintln!(
        "longest fault (a silent link costs the link timeout plus a reconnect): {} µs",
        stats["fault_latency_us"]["max"]
    );
}

#[test]
fn test_faultd_started_before_pagesrv_waits_and_serves_the_guest() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("order");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 64 << 20 >> 12, 0x0DE2, 4, 0..0);
    let addr = free_loopback_addr();
    let mut faultd = start_faultd(&addr, &uds, &stats);
    // The guest starts faulting at once; nobody serves it for 3 s.
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(faultd.is_running(), "faultd must wait for pagesrv");
    let mut pagesrv = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .arg("--vm-mem")
            .arg(&mem)
            .args(["--listen", &addr]),
    );
    let done = finish_migration("start order", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert!(
        done.faultd_err.contains("waiting for pagesrv"),
        "{}",
        done.faultd_err
    );
    assert!(done.stats["faults"].as_u64().unwrap() > 0, "{}", done.stats);
}

/// One migration of 256 MiB with a 64 MiB balloon inflating in 256 KiB chunks while a proxy
/// cuts the link 3 times; returns the pages removed while the link was down.
fn balloon_during_cuts(run: u64) -> u64 {
    let dir = Scratch::new(&format!("balloon{run}"));
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    let pages = 256 << 20 >> 12;
    write_source(&mem, pages, 0xBA11 + run, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let seed = (run + 1).to_string();
    let (_proxy, proxy_addr) = start_proxy(
        &addr,
        &[
            "--cuts",
            "3",
            "--min-mib",
            "4",
            "--max-mib",
            "24",
            "--seed",
            &seed,
        ],
    );
    let memfd = run % 2 == 1;
    let placement: &[&str] = if memfd {
        &["--placement", "memfd"]
    } else {
        &[]
    };
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, placement);
    let balloon = format!("{}:{}:64", pages / 4, pages / 4);
    let mut vmm_args = vec![
        "--threads",
        "2",
        "--balloon",
        &balloon,
        "--balloon-interval-ms",
        "2",
    ];
    if memfd {
        vmm_args.push("--memfd");
    }
    let mut vmm = start_vmm(&uds, &mem, &vmm_args);
    // Every ballooned page reads zero at the end and every other byte is right.
    let what = format!("run {run}");
    let done = finish_migration(&what, &mut vmm, &mut faultd, &mut pagesrv, &stats);
    let stats = &done.stats;
    assert!(
        stats["reconnects"].as_u64().unwrap() >= 1,
        "{what}: {stats}"
    );
    assert!(
        stats["pages_removed"].as_u64().unwrap() > 0,
        "{what}: {stats}"
    );
    stats["removed_while_link_down"].as_u64().unwrap()
}

#[test]
fn test_balloon_inflating_while_the_link_is_cut_never_hangs() {
    if !require_userfaultfd() {
        return;
    }
    let removed_while_down: u64 = (0..5).map(balloon_during_cuts).sum();
    assert!(
        removed_while_down > 0,
        "no run inflated the balloon while the link was cut: the test missed its case"
    );
}

/// `clients` connect to pagesrv (with `pagesrv_args`) and say nothing, then a real
/// destination migrates a small guest; returns faultd's and pagesrv's stderr.
fn migrate_behind_silent_clients(clients: usize, pagesrv_args: &[&str]) -> (String, String) {
    let dir = Scratch::new(&format!("silent{clients}"));
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 4096, 5, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, pagesrv_args);
    let silent: Vec<TcpStream> = (0..clients)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let done = finish_migration(
        "silent clients",
        &mut vmm,
        &mut faultd,
        &mut pagesrv,
        &stats,
    );
    drop(silent);
    (done.faultd_err, done.pagesrv_err)
}

#[test]
fn test_silent_clients_do_not_delay_a_destination() {
    if !require_userfaultfd() {
        return;
    }
    // Their handshakes wait out the deadline beside the destination's.
    let (faultd_err, _) = migrate_behind_silent_clients(100, &[]);
    assert!(
        faultd_err.contains("connected to pagesrv attempts=1"),
        "the first attempt must get through: {faultd_err}"
    );
}

#[test]
fn test_more_silent_clients_than_the_handshake_slots_do_not_keep_a_destination_out() {
    if !require_userfaultfd() {
        return;
    }
    // 100 silent clients for 16 slots: each new connection closes the oldest one that has
    // not sent a whole Hello, so the destination's, which sends its Hello at once, gets in at
    // its first attempt.
    let (faultd_err, pagesrv_err) = migrate_behind_silent_clients(100, &["--max-handshakes", "16"]);
    assert!(
        faultd_err.contains("connected to pagesrv attempts=1"),
        "the first attempt must get through: {faultd_err}"
    );
    assert!(
        pagesrv_err.contains("reason=evicted"),
        "the slots were not all taken: {pagesrv_err}"
    );
}

/// A migration that never completes on its own (no push, no touches), paused after both
/// connections are up; returns the processes, the address and the scratch paths.
fn stalled_migration(dir: &Scratch, key: &[&str]) -> (Proc, String, Proc, Proc) {
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 1024, 1, 4, 0..0);
    let pagesrv_args = [&["--no-push"][..], key].concat();
    let (pagesrv, addr) = start_pagesrv(&mem, &pagesrv_args);
    let faultd_args = [&["--reconnect-timeout", "3"][..], key].concat();
    let faultd = start_faultd_with(&addr, &uds, &stats, &faultd_args);
    let vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let mut faultd = faultd;
    let line = faultd.read_line();
    assert!(line.starts_with("faultd link to pagesrv up"), "{line}");
    (pagesrv, addr, faultd, vmm)
}

#[test]
fn test_a_source_restarted_on_another_image_is_refused() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("image");
    let other = dir.path("other.mem");
    write_source(&other, 1024, 2, 4, 0..0);
    let key = dir.path("key");
    write_key(&key, "the image test's secret key");
    let key_args = ["--psk-file", key.to_str().unwrap()];

    // With a key, the refusal is the source's own: final.
    let (mut pagesrv, addr, mut faultd, _vmm) = stalled_migration(&dir, &key_args);
    pagesrv.kill9();
    let mut impostor = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .arg("--vm-mem")
            .arg(&other)
            .args(["--listen", &addr])
            .args(key_args),
    );
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ImageMismatch"), "{stderr}");
    assert!(stderr.contains("pagesrv refused to resume"), "{stderr}");
    assert!(impostor.is_running());
    let impostor_err = impostor.kill_and_collect();
    assert!(impostor_err.contains("memory image"), "{impostor_err}");

    // Without a key anyone could be on the port: keep trying until --reconnect-timeout.
    let dir = Scratch::new("image-nokey");
    let other = dir.path("other.mem");
    write_source(&other, 1024, 2, 4, 0..0);
    let (mut pagesrv, addr, mut faultd, _vmm) = stalled_migration(&dir, &["--insecure-no-key"]);
    pagesrv.kill9();
    let impostor = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .arg("--insecure-no-key")
            .arg("--vm-mem")
            .arg(&other)
            .args(["--listen", &addr]),
    );
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--reconnect-timeout"), "{stderr}");
    let impostor_err = impostor.kill_and_collect();
    assert!(
        impostor_err.contains("ImageMismatch") || impostor_err.contains("memory image"),
        "{impostor_err}"
    );
}

#[test]
fn test_a_memory_file_that_shrinks_fails_the_session_not_the_process() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("shrink");
    let (mut pagesrv, _addr, mut faultd, _vmm) = stalled_migration(&dir, &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path("vm.mem"))
        .unwrap()
        .set_len(512 * PAGE as u64)
        .unwrap();
    let (status, stderr) = pagesrv.wait(LIMIT);
    assert_eq!(
        status.code(),
        Some(1),
        "an error, not a signal: {status:?}\n{stderr}"
    );
    assert!(stderr.contains("shrank while it was served"), "{stderr}");
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("shrank"),
        "the destination hears why: {stderr}"
    );
}

#[test]
fn test_a_blocking_userfaultfd_from_the_vmm_never_blocks_faultd() {
    if !require_userfaultfd() {
        return;
    }
    // A VMM may create its uffd without O_NONBLOCK. faultd reads events at start (before a
    // fault arrived) and on retries after a balloon's REMOVE: on a blocking uffd those reads
    // would wait, holding the placement gate. It makes the uffd non-blocking: the link comes
    // up with no fault, and a balloon inflating during the migration never hangs it.
    let dir = Scratch::new("blocking-uffd");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    let pages = 64 << 20 >> 12;
    write_source(&mem, pages, 0xB10C, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let balloon = format!("{}:{}:64", pages / 4, pages / 4);
    let mut vmm = start_vmm(
        &uds,
        &mem,
        &["--blocking-uffd", "--threads", "2", "--balloon", &balloon],
    );
    let line = faultd.read_line();
    assert!(line.starts_with("faultd link to pagesrv up"), "{line}");
    let done = finish_migration("blocking uffd", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert!(
        done.faultd_err.contains("was blocking: made non-blocking"),
        "{}",
        done.faultd_err
    );
}
