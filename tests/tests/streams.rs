//! Several bulk connections (`faultd --streams N`): the push shared between them, every page
//! once, and a cut on any of them survived like a cut of the link.

use tests::*;

#[test]
fn test_three_streams_share_the_push_and_every_byte_arrives() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("streams");
    let (mem, uds, stats) = (dir.path("vm.mem"), dir.path("f.sock"), dir.path("s.json"));
    let pages = 128 << 20 >> 12;
    write_source(&mem, pages, 0x57EA, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--streams", "3"]);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration("three streams", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    let s = &done.stats;
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(
        n("pages_requested") + n("pages_pushed") + n("pages_zero"),
        pages as u64,
        "every page once: {s}"
    );
    assert_eq!(s["received_digest"], source_digest(&mem).as_str());
    let extra = done
        .pagesrv_err
        .matches("role=\"bulk (extra stream)\"")
        .count();
    assert_eq!(extra, 2, "two extra bulk connections: {}", done.pagesrv_err);
    assert!(
        extra_stream_pages(&done.pagesrv_err) > 0,
        "the extra connections carried part of the push: {}",
        done.pagesrv_err
    );
}

/// Pages pushed on extra bulk connections, from pagesrv's summary line.
fn extra_stream_pages(pagesrv_err: &str) -> u64 {
    let line = pagesrv_err
        .lines()
        .find(|l| l.contains("session completed"))
        .unwrap_or_else(|| panic!("no summary line: {pagesrv_err}"));
    let before = line
        .split(" on extra bulk connections")
        .next()
        .expect("the field");
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

#[test]
fn test_the_naive_baseline_refuses_extra_streams_and_one_carries_all() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("streams-naive");
    let (mem, uds, stats) = (dir.path("vm.mem"), dir.path("f.sock"), dir.path("s.json"));
    write_source(&mem, 4096, 0x9A1, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &["--naive-single-connection"]);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--streams", "2"]);
    let mut vmm = start_vmm(&uds, &mem, &[]);
    let done = finish_migration("naive", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert!(
        done.faultd_err.contains("going on with fewer"),
        "{}",
        done.faultd_err
    );
    assert_eq!(extra_stream_pages(&done.pagesrv_err), 0);
}

#[test]
fn test_cuts_with_several_streams_are_survived() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("streams-cut");
    let (mem, uds, stats) = (dir.path("vm.mem"), dir.path("f.sock"), dir.path("s.json"));
    write_source(&mem, 256 << 20 >> 12, 0xC07, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let (mut proxy, proxy_addr) =
        start_proxy(&addr, &["--cuts", "2", "--min-mib", "4", "--max-mib", "24"]);
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &["--streams", "2"]);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration("streams cut", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert_eq!(proxy.read_line(), "cut 1");
    assert_eq!(proxy.read_line(), "cut 2");
    assert!(
        done.stats["reconnects"].as_u64().unwrap() >= 2,
        "{}",
        done.stats
    );
    assert_eq!(done.stats["received_digest"], source_digest(&mem).as_str());
}

#[test]
fn test_a_stream_count_out_of_range_is_a_usage_error() {
    for bad in ["0", "9"] {
        let out = std::process::Command::new(bin("faultd"))
            .args(tests::key_args::<&str>(&[]))
            .args([
                "--connect",
                "127.0.0.1:1",
                "--uds",
                "/nonexistent/x",
                "--streams",
                bad,
            ])
            .output()
            .expect("run faultd");
        assert_eq!(out.status.code(), Some(2), "--streams {bad}");
    }
}

#[test]
fn test_one_connection_broken_at_a_time_is_survived_with_three_streams() {
    if !require_userfaultfd() {
        return;
    }
    // `truncate` shuts only the connection whose chunk crossed the mark, mostly one of the
    // three bulk connections: the session ends (a page taken for it may never arrive), faultd
    // reconnects with all three and says what it holds.
    let dir = Scratch::new("streams-one-broken");
    let (mem, uds, stats) = (dir.path("vm.mem"), dir.path("f.sock"), dir.path("s.json"));
    write_source(&mem, 256 << 20 >> 12, 0x1B0, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let (mut proxy, proxy_addr) = start_proxy(
        &addr,
        &[
            "--mode",
            "truncate",
            "--cuts",
            "3",
            "--min-mib",
            "4",
            "--max-mib",
            "20",
        ],
    );
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &["--streams", "3"]);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration("one broken", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    for n in 1..=3 {
        assert_eq!(proxy.read_line(), format!("truncate {n}"));
    }
    assert!(
        done.stats["reconnects"].as_u64().unwrap() >= 1,
        "{}",
        done.stats
    );
    assert_eq!(done.stats["received_digest"], source_digest(&mem).as_str());
    eprintln!(
        "sessions ended by an extra stream: {}",
        done.pagesrv_err
            .matches("an extra bulk connection failed")
            .count()
    );
}
