//! `bench latency --link`: the network namespaces, veth pairs and delay lines it builds for
//! a link profile are gone when it ends, also when it is interrupted or was killed before.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::*;

/// Network namespaces whose name starts with `prefix`.
fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Links (interfaces) whose name starts with `prefix`.
fn links(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Whether this machine can build links (root and iproute2); a visible skip elsewhere, a
/// failure under CI.
fn can_build_links() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI machines run as root with iproute2 (root: {root}, ip: {ip})"
    );
    eprintln!("SKIPPED: link profiles need root and iproute2 (root: {root}, ip: {ip})");
    false
}

#[test]
fn test_a_link_profile_run_leaves_nothing_behind_and_removes_stale_ones() {
    if !require_userfaultfd() || !can_build_links() {
        return;
    }
    // What a bench killed earlier would have left: a namespace of a process that is gone.
    let stale = "pm-4194000-9";
    let made = {
        // As the bench does: a brand-new machine makes its first namespaces one at a time.
        let _machine_wide = common::netns::lock().expect("the namespace lock");
        Command::new("ip")
            .args(["netns", "add", stale])
            .status()
            .expect("ip netns add")
    };
    assert!(made.success());
    let dir = Scratch::new("link");
    let json = dir.path("out.json");
    let bench = Command::new(bin("bench"))
        .args(["latency", "--link", "dc", "--size-mib", "8"])
        .args(["--demand-touches", "200", "--json"])
        .arg(&json)
        .env("TMPDIR", &dir.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run bench");
    // Its namespaces and links carry its pid (other benches may run meanwhile).
    let ours = format!("pm-{}-", bench.id());
    let out = bench.wait_with_output().expect("wait for bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        namespaces(stale).is_empty(),
        "the stale namespace is still there"
    );
    assert!(namespaces(&ours).is_empty(), "{:?}", namespaces(&ours));
    assert!(links(&ours).is_empty(), "{:?}", links(&ours));
    let result = json_file(&json);
    let dc = &result["profiles"][0];
    assert_eq!(dc["profile"], "dc", "{result}");
    // The path's own floor was measured through the delay line: at least its two delays.
    let floor_p50 = dc["floor"]["remote_fault_floor_us"]["p50"]
        .as_f64()
        .unwrap();
    assert!(floor_p50 >= 100.0, "{floor_p50} µs through 2 × 50 µs");
    for key in [
        "fault_p50_vs_floor",
        "fault_p99_push_vs_floor",
        "throughput_vs_link_rate",
    ] {
        assert!(dc["ratios"][key].as_f64().is_some(), "{key}: {dc}");
    }
}

#[test]
fn test_an_interrupted_link_profile_run_removes_its_namespace() {
    if !require_userfaultfd() || !can_build_links() {
        return;
    }
    let dir = Scratch::new("link-int");
    let mut bench = Command::new(bin("bench"))
        .args(["latency", "--link", "wan", "--size-mib", "8"])
        .env("TMPDIR", &dir.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run bench");
    let ours = format!("pm-{}-", bench.id());
    let started = Instant::now();
    while namespaces(&ours).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the bench never built its link"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-run (the wan floor takes seconds): interrupt it as a terminal would.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signals our own child, still running (not yet waited for).
    assert_eq!(unsafe { libc::kill(bench.id() as i32, libc::SIGINT) }, 0);
    let status = bench.wait().expect("wait for bench");
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(namespaces(&ours).is_empty(), "{:?}", namespaces(&ours));
    assert!(links(&ours).is_empty(), "{:?}", links(&ours));
    // Nor its images and work files.
    let tag = format!("pagemig-lat-{}", bench.id());
    let left: Vec<_> = ["/dev/shm", dir.0.to_str().unwrap()]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&tag))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn json_file(path: &std::path::Path) -> serde_json::Value {
    json(&std::fs::read_to_string(path).expect("bench wrote its JSON"))
}
