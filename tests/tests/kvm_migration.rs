//! Live migration of a running KVM guest (the `vmm` in bench/), end to end and against
//! broken peers.

use std::process::Command;
use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);
const SIZE_MIB: &str = "64";

fn migrate_with_bench(strategy: &str, mode: &str) -> serde_json::Value {
    migrate_with_bench_args(strategy, mode, &[])
}

fn migrate_with_bench_args(strategy: &str, mode: &str, extra: &[&str]) -> serde_json::Value {
    let dir = Scratch::new(&format!("kvm-{strategy}-{mode}"));
    let out = dir.path("out.json");
    let mut bench = Proc::spawn(
        "bench",
        Command::new(bin("bench"))
            .args(["migrate", "--size-mib", SIZE_MIB, "--mode", mode])
            .args(["--strategy", strategy])
            .args(extra)
            .args(["--warmup-ms", "200", "--after-ms", "200", "--json"])
            .arg(&out)
            .arg("--ram-dir")
            .arg(&dir.0),
    );
    let (status, stderr) = bench.wait(LIMIT);
    let stdout = bench.rest_of_stdout();
    assert!(
        status.success(),
        "bench migrate failed:\n{stdout}\n{stderr}"
    );
    json(&std::fs::read_to_string(&out).expect("bench wrote its JSON"))
}

fn assert_migrated(r: &serde_json::Value) {
    assert_eq!(r["guest"]["mismatches"], 0, "{r}");
    assert_eq!(r["guest"]["ran_on_destination"], true, "{r}");
    assert_eq!(r["digest_match"], true, "{r}");
    assert!(r["guest"]["pages_verified"].as_u64().unwrap() > 0, "{r}");
    let f = &r["faultd"];
    let bytes = f["total_pages"].as_u64().unwrap() * f["page_size"].as_u64().unwrap();
    assert_eq!(bytes, 64 << 20, "{r}");
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        r["total_ms"].as_f64().unwrap() >= r["downtime_ms"].as_f64().unwrap(),
        "{r}"
    );
}

#[test]
fn test_kvm_guest_migrates_in_copy_mode() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    assert_migrated(&migrate_with_bench("postcopy", "copy"));
}

#[test]
fn test_kvm_guest_migrates_in_minor_mode() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    assert_migrated(&migrate_with_bench("postcopy", "minor"));
}

/// Two vCPUs, each on its own share of the pages: both filled theirs on the source and both
/// kept touching (and checking) pages on the destination while faultd served their faults.
fn assert_two_vcpus_migrated(r: &serde_json::Value) {
    assert_migrated(r);
    assert_eq!(r["vcpus"], 2, "{r}");
    let g = &r["guest"];
    let data_pages = (64 << 20 >> 12) - 512; // the first 2 MiB are the system area
    assert_eq!(
        g["before"]["filled"], data_pages,
        "both vCPUs filled their pages: {r}"
    );
    let (before, after) = (&g["vcpu_touches_before"], &g["vcpu_touches_after"]);
    for vcpu in 0..2 {
        let (b, a) = (
            before[vcpu].as_u64().unwrap(),
            after[vcpu].as_u64().unwrap(),
        );
        assert!(
            b > 0 && a > b,
            "vCPU {vcpu} ran on both sides ({b} then {a}): {r}"
        );
    }
}

#[test]
fn test_kvm_guest_with_two_vcpus_migrates_in_copy_mode() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    assert_two_vcpus_migrated(&migrate_with_bench_args(
        "postcopy",
        "copy",
        &["--vcpus", "2"],
    ));
}

#[test]
fn test_kvm_guest_with_two_vcpus_migrates_hybrid() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let r = migrate_with_bench_args("hybrid", "minor", &["--vcpus", "2"]);
    assert_two_vcpus_migrated(&r);
    assert!(
        r["pages_discarded"].as_u64().unwrap() > 0,
        "both vCPUs wrote during precopy: {r}"
    );
}

/// The destination guest on 2 MiB hugetlbfs pages (the bench reserves them for its run and
/// gives them back), in copy and minor registration; skipped with the reason only where huge
/// pages cannot be reserved (a failure under CI=true).
#[test]
fn test_kvm_guest_on_2m_pages_migrates_in_copy_and_minor_modes() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    // The bench reserves its own 40 pages; this checks they can be had and keeps huge-page
    // tests one at a time (each adds to the pool and restores it after).
    let Some(_turn) = HugePages::probe(40) else {
        return;
    };
    for mode in ["copy", "minor"] {
        let r = migrate_with_bench_args("postcopy", mode, &["--page-size", "2m"]);
        assert_migrated(&r);
        assert_eq!(r["page_size"], "2m", "{r}");
        assert_eq!(r["faultd"]["page_size"], 2 << 20, "{r}");
        assert_eq!(r["faultd"]["total_pages"], 32, "{r}");
    }
}

/// Two bulk connections: the extra one waits through the precopy rounds (they and their
/// discards go on the first) and shares the postcopy push.
#[test]
fn test_kvm_guest_migrates_hybrid_over_two_streams() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let r = migrate_with_bench_args("hybrid", "minor", &["--streams", "2"]);
    assert_migrated(&r);
    assert_eq!(r["streams"], 2, "{r}");
    assert!(r["precopy_rounds"].as_u64().unwrap() >= 1, "{r}");
}

#[test]
fn test_kvm_guest_migrates_hybrid() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let r = migrate_with_bench("hybrid", "minor");
    assert_migrated(&r);
    // Rounds while the guest ran on the source, KVM's dirty log naming what it wrote.
    assert!(r["precopy_rounds"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["bytes_precopy"].as_u64().unwrap() > 0, "{r}");
    assert!(r["pages_discarded"].as_u64().unwrap() > 0, "{r}");
    assert!(r["converged_by"].is_string(), "{r}");
}

#[test]
fn test_kvm_guest_migrates_precopy() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let r = migrate_with_bench("precopy", "minor");
    assert_migrated(&r);
    // Stop-and-copy: nothing moved after the pause but what was sent while it lasted.
    assert_eq!(r["bytes_postcopy"], 0, "{r}");
    assert_eq!(r["faultd"]["pages_requested"], 0, "{r}");
    assert!(r["precopy_rounds"].as_u64().unwrap() >= 1, "{r}");
}

#[test]
fn test_kvm_guest_with_free_pages_migrates() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    // Half the guest's data pages free, holding old bytes: the end-to-end digest (with free
    // pages as zero) holds only if they arrive as zero, and fewer bytes move.
    let full = migrate_with_bench("postcopy", "copy");
    for strategy in ["postcopy", "hybrid"] {
        let mode = if strategy == "hybrid" {
            "minor"
        } else {
            "copy"
        };
        let r = migrate_with_bench_args(strategy, mode, &["--free-pct", "50"]);
        assert_migrated(&r);
        if strategy == "postcopy" {
            let bytes = |r: &serde_json::Value| r["faultd"]["bytes_received"].as_u64().unwrap();
            assert!(bytes(&r) < bytes(&full) * 3 / 4, "{r}\n{full}");
        }
    }
}

/// Runs a source guest until it touches pages, pauses it, and returns the RAM and state
/// files' scratch directory.
fn paused_source(tag: &str) -> Scratch {
    paused_source_with(tag, 1)
}

fn paused_source_with(tag: &str, vcpus: u32) -> Scratch {
    let dir = Scratch::new(tag);
    let mut source = Proc::spawn(
        "vmm source",
        Command::new(bin("vmm"))
            .arg("source")
            .arg("--mem-file")
            .arg(dir.path("vm.mem"))
            .args(["--size-mib", SIZE_MIB, "--vcpus", &vcpus.to_string()])
            .arg("--state-file")
            .arg(dir.path("vcpu.json")),
    );
    source.read_event_until(|e| e["counters"]["phase"] == 1);
    source.send_line("pause");
    source.read_event_until(|e| e["event"] == "paused");
    let (status, stderr) = source.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    dir
}

/// A migration in progress: pagesrv in demand-paging mode (so the migration is still running
/// when a peer is killed), faultd with `faultd_args`, and a resumed destination guest that
/// has reported once.
struct Running {
    pagesrv: Proc,
    addr: String,
    faultd: Proc,
    dest: Proc,
    stats: std::path::PathBuf,
}

fn running_migration(dir: &Scratch, faultd_args: &[&str]) -> Running {
    running_migration_with(dir, &[], faultd_args)
}

/// [`running_migration`] with extra pagesrv arguments too.
fn running_migration_with(dir: &Scratch, pagesrv_args: &[&str], faultd_args: &[&str]) -> Running {
    let (uds, stats) = (dir.path("faultd.sock"), dir.path("stats.json"));
    let pagesrv_args = [&["--no-push"][..], pagesrv_args].concat();
    let (pagesrv, addr) = start_pagesrv(&dir.path("vm.mem"), &pagesrv_args);
    let faultd = start_faultd_with(&addr, &uds, &stats, faultd_args);
    let mut dest = start_dest(dir, &uds);
    dest.read_event_until(|e| e["event"] == "resumed");
    dest.read_event_until(|e| e["event"] == "report");
    Running {
        pagesrv,
        addr,
        faultd,
        dest,
        stats,
    }
}

/// The destination VMM, with as many vCPUs as the source saved.
fn start_dest(dir: &Scratch, uds: &std::path::Path) -> Proc {
    let saved = json(&std::fs::read_to_string(dir.path("vcpu.json")).expect("saved vCPUs"));
    let vcpus = saved.as_array().map_or(1, Vec::len).to_string();
    Proc::spawn(
        "vmm dest",
        Command::new(bin("vmm"))
            .arg("dest")
            .arg("--uds")
            .arg(uds)
            .args(["--size-mib", SIZE_MIB, "--vcpus", &vcpus, "--state-file"])
            .arg(dir.path("vcpu.json")),
    )
}

#[test]
fn test_source_vmm_saves_and_exits_when_its_driver_goes_away() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("kvm-orphan");
    let mut source = Proc::spawn(
        "vmm source",
        Command::new(bin("vmm"))
            .arg("source")
            .arg("--mem-file")
            .arg(dir.path("vm.mem"))
            .args(["--size-mib", SIZE_MIB, "--state-file"])
            .arg(dir.path("vcpu.json")),
    );
    source.read_event_until(|e| e["counters"]["phase"] == 1);
    source.close_stdin();
    source.read_event_until(|e| e["event"] == "paused");
    let (status, stderr) = source.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    let state = json(&std::fs::read_to_string(dir.path("vcpu.json")).unwrap());
    assert_eq!(
        state[0]["size_bytes"],
        64u64 << 20,
        "one saved vCPU: {state}"
    );
    assert_eq!(state.as_array().map(Vec::len), Some(1), "{state}");
}

#[test]
fn test_dest_vmm_stops_its_vcpus_when_faultd_dies() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    // Two vCPUs: both wait on faults when faultd goes; both must stop.
    let dir = paused_source_with("kvm-faultd-dies", 2);
    let Running {
        pagesrv: _pagesrv,
        mut faultd,
        mut dest,
        ..
    } = running_migration(&dir, &[]);
    faultd.kill9();
    let (status, stderr) = dest.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("faultd closed its socket before every page was present"),
        "{stderr}"
    );
}

#[test]
fn test_migration_survives_pagesrv_killed_and_restarted() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let dir = paused_source("kvm-pagesrv-restart");
    let (mem, key) = (dir.path("vm.mem"), dir.path("key"));
    // With a key: sealed frames, new keys on every connection, the restart included.
    write_key(&key, "the restart test's shared secret");
    let key_args = ["--psk-file", key.to_str().unwrap()];
    let Running {
        mut pagesrv,
        addr,
        mut faultd,
        mut dest,
        stats,
    } = running_migration_with(&dir, &key_args, &key_args);
    pagesrv.kill9();
    // The guest waits on its faults while pagesrv is away; a new pagesrv on the same file
    // and address is just another reconnect.
    let mut restarted = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .arg("--vm-mem")
            .arg(&mem)
            .args(["--listen", &addr])
            .args(key_args),
    );
    dest.read_event_until(|e| e["event"] == "complete");
    let last = dest.read_event_until(|e| e["event"] == "report");
    assert_eq!(last["counters"]["mismatches"], 0, "{last}");
    dest.send_line("stop");
    let (status, stderr) = dest.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    let (status, stderr) = faultd.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("lost the link to pagesrv"), "{stderr}");
    assert!(stderr.contains("reconnected to pagesrv"), "{stderr}");
    let (status, stderr) = restarted.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    let stats = json(&std::fs::read_to_string(&stats).unwrap());
    assert_eq!(stats["digest_check"], "match", "{stats}");
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn test_faultd_gives_up_after_reconnect_timeout_and_the_vmm_stops() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let dir = paused_source("kvm-pagesrv-gone");
    let Running {
        mut pagesrv,
        mut faultd,
        mut dest,
        ..
    } = running_migration(&dir, &["--reconnect-timeout", "1"]);
    pagesrv.kill9();
    let (status, stderr) = faultd.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--reconnect-timeout"), "{stderr}");
    let (status, stderr) = dest.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("faultd closed its socket"), "{stderr}");
}

/// The source VMM hands its running guest to `pagesrv --vmm-uds --strategy postcopy`
/// (`pagesrv_args` more) and is paused at once; faultd and the destination VMM take it.
/// Returns the source VMM (after its `paused` event), faultd and the destination.
fn postcopy_from_a_running_source(
    dir: &Scratch,
    pagesrv_args: &[&str],
) -> (Proc, Proc, Proc, Proc) {
    let (src_uds, uds, stats) = (
        dir.path("source.sock"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    let mut pagesrv = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(key_args::<&str>(&[]))
            .arg("--vmm-uds")
            .arg(&src_uds)
            .args(["--strategy", "postcopy", "--listen", "127.0.0.1:0"])
            .args(pagesrv_args),
    );
    assert!(
        pagesrv
            .read_line()
            .starts_with("pagesrv waiting for the source VMM")
    );
    let mut source = Proc::spawn(
        "vmm source",
        Command::new(bin("vmm"))
            .arg("source")
            .arg("--mem-file")
            .arg(dir.path("vm.mem"))
            .args(["--size-mib", SIZE_MIB, "--state-file"])
            .arg(dir.path("vcpu.json"))
            .arg("--pagesrv-uds")
            .arg(&src_uds),
    );
    source.read_event_until(|e| e["counters"]["phase"] == 1);
    source.send_line("migrate");
    let addr = pagesrv
        .read_line()
        .strip_prefix("pagesrv listening on ")
        .expect("pagesrv took the RAM")
        .to_owned();
    source.read_event_until(|e| e["event"] == "paused");
    let faultd = start_faultd(&addr, &uds, &stats);
    let dest = start_dest(dir, &uds);
    (pagesrv, source, faultd, dest)
}

#[test]
fn test_the_source_vmm_keeps_its_guest_until_the_outcome_and_acts_on_it() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    // Success: the source VMM hears `completed` (after the destination verified every
    // page, not at the pause) and lets its guest go.
    let dir = Scratch::new("kvm-outcome-ok");
    let (mut pagesrv, mut source, mut faultd, mut dest) = postcopy_from_a_running_source(&dir, &[]);
    let outcome = source.read_event_until(|e| e["event"] == "outcome");
    assert_eq!(outcome["end"]["outcome"], "completed", "{outcome}");
    assert_eq!(outcome["end"]["verified"], true, "{outcome}");
    let (status, stderr) = faultd.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    let (status, stderr) = source.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    let (status, stderr) = pagesrv.wait(LIMIT);
    assert!(status.success(), "{stderr}");
    dest.send_line("stop");
    let _ = dest.wait(LIMIT);

    // Failure (a data page corrupted on the way: the guest fills all but every 4th page
    // first, so 10001 holds data; the digests differ): the source VMM hears
    // `failed` and resumes its guest, which runs on here.
    let dir = Scratch::new("kvm-outcome-failed");
    let (mut pagesrv, mut source, mut faultd, _dest) =
        postcopy_from_a_running_source(&dir, &["--corrupt-page", "10001"]);
    let outcome = source.read_event_until(|e| e["event"] == "outcome");
    assert_eq!(outcome["end"]["outcome"], "failed", "{outcome}");
    assert!(
        outcome["end"]["reason"]
            .as_str()
            .unwrap()
            .contains("differ"),
        "{outcome}"
    );
    source.read_event_until(|e| e["event"] == "resumed");
    let before = source.read_event_until(|e| e["event"] == "report");
    let after = source.read_event_until(|e| e["event"] == "report");
    assert!(
        after["counters"]["touches"].as_u64() > before["counters"]["touches"].as_u64(),
        "the resumed guest runs: {before} → {after}"
    );
    assert_eq!(after["counters"]["mismatches"], 0, "{after}");
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let (status, stderr) = pagesrv.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the source VMM was told the outcome"),
        "{stderr}"
    );
    // Paused again by its driver, with no link: it saves and exits.
    source.send_line("pause");
    source.read_event_until(|e| e["event"] == "paused");
    let (status, stderr) = source.wait(LIMIT);
    assert!(status.success(), "{stderr}");
}
