//! Never lose a VM: migrations through connection cuts, authentication, bad peers, and the
//! end-to-end digest catching a corrupted page.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn test_migration_survives_repeated_cuts_with_every_byte_right() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("cuts");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    let pages = 256 << 20 >> 12;
    write_source(&mem, pages, 0xC07, 4, 0..0);
    let key = dir.path("key");
    write_key(&key, "a shared secret for the cut test");
    let key_arg = key.to_str().unwrap();
    let (mut pagesrv, addr) = start_pagesrv(&mem, &["--psk-file", key_arg]);
    let mut proxy = Proc::spawn(
        "cut-proxy",
        Command::new(bin("cut-proxy")).args([
            "--target",
            &addr,
            "--cuts",
            "3",
            "--min-mib",
            "10",
            "--max-mib",
            "40",
        ]),
    );
    let proxy_addr = proxy
        .read_line()
        .strip_prefix("proxy listening on ")
        .expect("proxy started")
        .to_owned();
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &["--psk-file", key_arg]);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration("cuts", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    let (stats, pagesrv_err) = (&done.stats, &done.pagesrv_err);
    assert!(stats["reconnects"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(stats["received_digest"], source_digest(&mem).as_str());
    assert!(pagesrv_err.contains("session broke off"), "{pagesrv_err}");
}

/// Runs faultd against pagesrv with the given key options; returns faultd's exit code, its
/// stderr and pagesrv's stderr. The VMM never touches memory, so nothing can hang.
fn try_session(
    tag: &str,
    pagesrv_args: &[&str],
    faultd_args: &[&str],
) -> (Option<i32>, String, String) {
    let dir = Scratch::new(tag);
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 64, 3, 0, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, pagesrv_args);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, faultd_args);
    let _vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let (status, faultd_err) = faultd.wait(LIMIT);
    assert!(
        pagesrv.is_running(),
        "pagesrv must survive a refused destination"
    );
    let pagesrv_err = pagesrv.kill_and_collect();
    (status.code(), faultd_err, pagesrv_err)
}

#[test]
fn test_wrong_missing_or_unauthenticated_keys_move_no_page() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("keys");
    let (a, b) = (dir.path("a"), dir.path("b"));
    write_key(&a, "the source's secret key, version 1");
    write_key(&b, "a different secret key, version 2");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());

    let (code, err, pagesrv_err) = try_session("wrongkey", &["--psk-file", a], &["--psk-file", b]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("AuthFailed"), "{err}");
    assert!(
        pagesrv_err.contains("authentication failed"),
        "{pagesrv_err}"
    );
    assert!(
        !pagesrv_err.contains("destination connected"),
        "{pagesrv_err}"
    );

    let (code, err, _) = try_session("nokey", &["--psk-file", a], &["--insecure-no-key"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("AuthFailed"), "{err}");
    assert!(err.contains("no key: give faultd --psk-file"), "{err}");

    let (code, err, _) = try_session("noauth", &["--insecure-no-key"], &["--psk-file", a]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("AuthFailed"), "{err}");
    assert!(err.contains("runs without a key"), "{err}");
}

/// Garbage and truncated clients, then a real destination, with pagesrv started with
/// `keyed` or not.
fn garbage_then_a_destination(keyed: bool) {
    let dir = Scratch::new(if keyed { "garbage-key" } else { "garbage" });
    let (mem, key) = (dir.path("vm.mem"), dir.path("key"));
    write_source(&mem, 16, 1, 0, 0..0);
    write_key(&key, "the garbage test's shared secret");
    let key_args: Vec<&str> = if keyed {
        vec!["--psk-file", key.to_str().unwrap()]
    } else {
        vec!["--insecure-no-key"]
    };
    let pagesrv_args = [&["--serve-forever"][..], &key_args].concat();
    let (mut pagesrv, addr) = start_pagesrv(&mem, &pagesrv_args);
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f][..], // a Hello claiming a huge body
        &[1, 0, 0, 0, 32, 0, 0, 0, 0x50, 0x47][..], // a truncated Hello
    ] {
        let mut conn = TcpStream::connect(&addr).expect("connect");
        conn.write_all(bytes).expect("send garbage");
        drop(conn);
    }
    // A real destination is still served afterwards.
    if require_userfaultfd() {
        let (uds, stats) = (dir.path("faultd.sock"), dir.path("stats.json"));
        let mut faultd = start_faultd_with(&addr, &uds, &stats, &key_args);
        let _vmm = start_vmm(&uds, &mem, &["--no-touch"]);
        let (status, stderr) = faultd.wait(LIMIT);
        assert!(status.success(), "{stderr}");
    }
    assert!(pagesrv.is_running());
    let stderr = pagesrv.kill_and_collect();
    // The first rejection of a window is logged with its reason; the others are counted.
    assert_eq!(
        stderr.matches("rejected a connection").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("reason=malformed"), "{stderr}");
}

#[test]
fn test_pagesrv_survives_garbage_and_truncated_clients() {
    garbage_then_a_destination(false);
    garbage_then_a_destination(true);
}

#[test]
fn test_pagesrv_refuses_non_loopback_without_a_key() {
    let dir = Scratch::new("insecure");
    let mem = dir.path("vm.mem");
    write_source(&mem, 16, 1, 0, 0..0);
    let mut p = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .arg("--vm-mem")
            .arg(&mem)
            .args(["--listen", "0.0.0.0:0", "--insecure-no-key"]),
    );
    let (status, stderr) = p.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("without authentication"), "{stderr}");
}

#[test]
fn test_corrupted_page_fails_both_sides() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("corrupt");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 40_000, 9, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &["--corrupt-page", "20001"]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let _vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("DIGEST MISMATCH"), "{stderr}");
    // The source hears the verdict: it must keep the VM, and says so with its exit code.
    let (status, pagesrv_err) = pagesrv.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{pagesrv_err}");
    assert!(pagesrv_err.contains("VerifyFailed"), "{pagesrv_err}");
    assert!(pagesrv_err.contains("keep the source VM"), "{pagesrv_err}");
    assert!(!pagesrv_err.contains("session completed"), "{pagesrv_err}");
    let stats = json(&std::fs::read_to_string(&stats).unwrap());
    assert_eq!(stats["digest_check"], "mismatch", "{stats}");
    // Page 20001 lies in the second 16384-page chunk.
    assert_eq!(
        stats["digest_mismatch_pages"],
        serde_json::json!([[16384, 32768]]),
        "{stats}"
    );
}
