//! `--metrics-listen` on both daemons: OpenMetrics on `GET /metrics` while a migration runs
//! and after sessions end, and a clear error when the address cannot be served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::*;

/// The body of `GET /metrics` at `addr`.
fn scrape(addr: &str) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send the request");
    let mut out = String::new();
    conn.read_to_string(&mut out).expect("read the answer");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// Scrapes until every line in `want` is there (the figures are published every 100 ms).
fn scrape_until(addr: &str, want: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let text = scrape(addr);
        if want.iter().all(|w| text.contains(w)) {
            return text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{want:?} not all in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn test_both_daemons_serve_metrics_during_and_after_a_migration() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("metrics");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 1024, 9, 4, 0..0);
    let (pm, fm) = (free_loopback_addr(), free_loopback_addr());
    // No push and no touch: the migration stays open while we look.
    let (mut pagesrv, addr) = start_pagesrv(
        &mem,
        &["--no-push", "--serve-forever", "--metrics-listen", &pm],
    );
    let faultd = start_faultd_with(&addr, &uds, &stats, &["--metrics-listen", &fm]);
    let _vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let mut faultd = faultd;
    let line = faultd.read_line();
    assert!(line.starts_with("faultd link to pagesrv up"), "{line}");
    scrape_until(
        &fm,
        &[
            "faultd_phase{phase=\"postcopy\"} 1",
            "faultd_link_up 1",
            "faultd_pages 1024",
            "faultd_digest_verdict{verdict=\"none\"} 1",
            "faultd_fault_latency_seconds_count",
            "# EOF",
        ],
    );
    scrape_until(
        &pm,
        &[
            "pagesrv_vms 1",
            "pagesrv_session_running{vm=\"vm.mem\"} 1",
            "pagesrv_pages{vm=\"vm.mem\"} 1024",
        ],
    );
    // The session breaks off (faultd goes): pagesrv counts it and keeps serving.
    drop(faultd);
    scrape_until(
        &pm,
        &[
            "pagesrv_session_running{vm=\"vm.mem\"} 0",
            "pagesrv_sessions_total{vm=\"vm.mem\",outcome=\"broke_off\"} 1",
        ],
    );
    assert!(pagesrv.is_running());
}

#[test]
fn test_a_metrics_address_that_cannot_be_served_is_refused_at_start() {
    let dir = Scratch::new("metrics-bad");
    let mem = dir.path("vm.mem");
    write_source(&mem, 16, 9, 4, 0..0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let out = std::process::Command::new(bin("pagesrv"))
        .args(tests::key_args::<&str>(&[]))
        .arg("--vm-mem")
        .arg(&mem)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", &taken_addr])
        .output()
        .expect("run pagesrv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot serve metrics on"), "{err}");
    let out = std::process::Command::new(bin("faultd"))
        .args(tests::key_args::<&str>(&[]))
        .args(["--connect", "127.0.0.1:1", "--uds"])
        .arg(dir.path("s"))
        .args(["--metrics-listen", &taken_addr])
        .output()
        .expect("run faultd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot serve metrics on"), "{err}");
}
