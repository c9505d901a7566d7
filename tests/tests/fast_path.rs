//! The fault-path levers of both daemons (`--fault-cpu`/`--urgent-cpu`, `--bulk-cpus`/
//! `--push-cpus`, `--busy-poll-us`): threads land where asked, and a migration with every
//! lever on still moves every byte right.

use std::time::Duration;

use tests::*;

/// The CPUs this test may use; `None` (a visible skip, or a failure under CI) with fewer
/// than two.
fn two_cpus() -> Option<(usize, usize)> {
    let cpus = common::sched::allowed_cpus().expect("sched_getaffinity");
    if cpus.len() < 2 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI machines have two CPUs; this one lets us use {cpus:?}"
        );
        eprintln!("SKIPPED: pinning needs two CPUs, we may use {cpus:?}");
        return None;
    }
    Some((cpus[0], cpus[1]))
}

/// `Cpus_allowed_list` of every thread of `pid`.
fn thread_cpus(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads") {
        let status = std::fs::read_to_string(task.expect("task").path().join("status"));
        let Ok(status) = status else { continue };
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push(list.trim().to_owned());
        }
    }
    out
}

#[test]
fn test_pinned_threads_land_on_their_cpus() {
    if !require_userfaultfd() {
        return;
    }
    let Some((fast, bulk)) = two_cpus() else {
        return;
    };
    let dir = Scratch::new("pinned");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 16384, 3, 4, 0..0);
    let (fast_s, bulk_s) = (fast.to_string(), bulk.to_string());
    let (pagesrv, addr) = start_pagesrv(&mem, &["--urgent-cpu", &fast_s, "--push-cpus", &bulk_s]);
    // The link freezes after 1 MiB, so every thread is still there while we look (no
    // reconnect within the long link timeout; the guest never touches memory).
    let (mut proxy, proxy_addr) = start_proxy(
        &addr,
        &[
            "--mode",
            "freeze",
            "--cuts",
            "1",
            "--min-mib",
            "1",
            "--max-mib",
            "1",
        ],
    );
    let faultd = start_faultd_with(
        &proxy_addr,
        &uds,
        &stats,
        &[
            "--fault-cpu",
            &fast_s,
            "--bulk-cpus",
            &bulk_s,
            "--link-timeout",
            "60",
        ],
    );
    let _vmm = start_vmm(&uds, &mem, &["--no-touch"]);
    let line = proxy.read_line();
    assert!(line.starts_with("freeze"), "{line}");
    std::thread::sleep(Duration::from_millis(100));
    let faultd_threads = thread_cpus(faultd.id());
    let pagesrv_threads = thread_cpus(pagesrv.id());
    // faultd: the fault thread is its main thread; the bulk thread is on the other CPU.
    let main_thread = std::fs::read_to_string(format!("/proc/{0}/task/{0}/status", faultd.id()))
        .expect("faultd's main thread");
    assert!(
        main_thread
            .lines()
            .any(|l| l.strip_prefix("Cpus_allowed_list:").map(str::trim) == Some(&fast_s)),
        "{main_thread}"
    );
    assert!(faultd_threads.contains(&bulk_s), "{faultd_threads:?}");
    // pagesrv: one urgent thread on the fast CPU, its pusher on the other.
    assert!(pagesrv_threads.contains(&fast_s), "{pagesrv_threads:?}");
    assert!(pagesrv_threads.contains(&bulk_s), "{pagesrv_threads:?}");
    drop(faultd);
    drop(pagesrv);
}

#[test]
fn test_bad_cpu_flags_are_refused_clearly() {
    let dir = Scratch::new("badcpu");
    let mem = dir.path("vm.mem");
    write_source(&mem, 16, 3, 4, 0..0);
    let out = std::process::Command::new(bin("pagesrv"))
        .args(tests::key_args::<&str>(&[]))
        .arg("--vm-mem")
        .arg(&mem)
        .args(["--listen", "127.0.0.1:0", "--urgent-cpu", "4095"])
        .output()
        .expect("run pagesrv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--urgent-cpu") && err.contains("CPU 4095"),
        "{err}"
    );
    let out = std::process::Command::new(bin("faultd"))
        .args(tests::key_args::<&str>(&[]))
        .args(["--connect", "127.0.0.1:1", "--uds"])
        .arg(dir.path("s"))
        .args(["--bulk-cpus", "2-1"])
        .output()
        .expect("run faultd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad CPU range"), "{err}");
    // A CPU this process may not use: refused before faultd waits for a VMM.
    let out = std::process::Command::new(bin("faultd"))
        .args(tests::key_args::<&str>(&[]))
        .args(["--connect", "127.0.0.1:1", "--uds"])
        .arg(dir.path("s"))
        .args(["--fault-cpu", "4095"])
        .output()
        .expect("run faultd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--fault-cpu") && err.contains("CPU 4095"),
        "{err}"
    );
    assert!(
        !dir.path("s").exists(),
        "faultd bound its socket before checking its flags"
    );
    // Busy-polling is bounded.
    let out = std::process::Command::new(bin("pagesrv"))
        .args(tests::key_args::<&str>(&[]))
        .arg("--vm-mem")
        .arg(&mem)
        .args(["--busy-poll-us", "5000"])
        .output()
        .expect("run pagesrv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--busy-poll-us"), "{err}");
}

#[test]
fn test_a_migration_with_every_lever_on_moves_every_byte_right() {
    if !require_userfaultfd() {
        return;
    }
    let Some((fast, bulk)) = two_cpus() else {
        return;
    };
    let dir = Scratch::new("levers");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    let pages = 64 << 20 >> 12;
    write_source(&mem, pages, 7, 4, 100..200);
    let (fast_s, bulk_s) = (fast.to_string(), bulk.to_string());
    // The naive baseline (replies behind pushed pages on one connection) makes pages
    // arrive by push while their requests wait to be written: none may go out once every
    // page is present (pagesrv then waits only for the verdict).
    for (placement, naive) in [("copy", false), ("memfd", false), ("copy", true)] {
        let mut pagesrv_args = vec![
            "--urgent-cpu",
            &fast_s,
            "--push-cpus",
            &bulk_s,
            "--busy-poll-us",
            "200",
        ];
        if naive {
            pagesrv_args.push("--naive-single-connection");
        }
        let (mut pagesrv, addr) = start_pagesrv(&mem, &pagesrv_args);
        let mut faultd = start_faultd_with(
            &addr,
            &uds,
            &stats,
            &[
                "--fault-cpu",
                &fast_s,
                "--bulk-cpus",
                &bulk_s,
                "--busy-poll-us",
                "200",
                "--placement",
                placement,
            ],
        );
        let mut vmm_args = vec!["--threads", "2"];
        if placement == "memfd" {
            vmm_args.push("--memfd");
        }
        let mut vmm = start_vmm(&uds, &mem, &vmm_args);
        let done = finish_migration(placement, &mut vmm, &mut faultd, &mut pagesrv, &stats);
        assert_eq!(
            done.stats["received_digest"],
            source_digest(&mem).as_str(),
            "{placement}: {}",
            done.stats
        );
        assert!(
            done.stats["fault_latency_us"]["count"].as_u64().unwrap() > 0,
            "{placement}: the guest never faulted: the fault path was not exercised"
        );
    }
}
