//! End-to-end migrations over loopback: real pagesrv and faultd, and the independent test VMM
//! touching pages from several threads and checking every byte against the source.

use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);

struct Run {
    vmm: serde_json::Value,
    stats: serde_json::Value,
    pagesrv_stderr: String,
    source_digest: String,
}

/// Migrates a `pages`-page source into a test VMM started with `vmm_args`; asserts that every
/// process exits 0 and returns the VMM report and faultd's stats.
fn migrate(
    tag: &str,
    pages: usize,
    zero_every: usize,
    hole: std::ops::Range<usize>,
    vmm_args: &[&str],
) -> Run {
    let dir = Scratch::new(tag);
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, pages, 0x5EED, zero_every, hole);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = start_vmm(&uds, &mem, vmm_args);
    let (vmm_status, vmm_err) = vmm.wait(LIMIT);
    let report = vmm.rest_of_stdout();
    let (faultd_status, faultd_err) = faultd.wait(LIMIT);
    let (pagesrv_status, pagesrv_err) = pagesrv.wait(LIMIT);
    assert!(
        vmm_status.success(),
        "test-vmm failed: {report}\n{vmm_err}\nfaultd:\n{faultd_err}"
    );
    assert!(faultd_status.success(), "faultd failed:\n{faultd_err}");
    assert!(pagesrv_status.success(), "pagesrv failed:\n{pagesrv_err}");
    let stats = json(&std::fs::read_to_string(&stats).expect("stats JSON written"));
    let image = std::fs::read(&mem).expect("read the source");
    let source_digest = format!("{:016x}", common::digest::run_digest(0, &image, PAGE));
    Run {
        vmm: json(&report),
        stats,
        pagesrv_stderr: pagesrv_err,
        source_digest,
    }
}

fn assert_every_page_accounted(stats: &serde_json::Value, pages: u64) {
    let n = |k: &str| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {stats}"))
    };
    assert_eq!(n("total_pages"), pages);
    assert_eq!(n("page_size"), PAGE as u64);
    assert_eq!(
        n("pages_requested") + n("pages_pushed") + n("pages_zero") + n("pages_removed"),
        pages,
        "every page arrives exactly once: {stats}"
    );
    let lat = &stats["fault_latency_us"];
    for k in ["count", "p50", "p90", "p99", "p999", "max"] {
        assert!(lat[k].is_number(), "fault_latency_us.{k} missing: {stats}");
    }
    assert!(stats["duration_ms"].as_f64().unwrap() > 0.0);
    let dist: u64 = stats["latency_dist_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(dist, lat["count"].as_u64().unwrap());
}

fn assert_vmm_ok(vmm: &serde_json::Value) {
    assert_eq!(vmm["mismatches_during"], 0, "{vmm}");
    assert_eq!(vmm["mismatches_after"], 0, "{vmm}");
    assert_eq!(vmm["socket_closed"], true, "{vmm}");
}

#[test]
fn test_anonymous_ram_256mib_two_threads_every_byte_right() {
    if !require_userfaultfd() {
        return;
    }
    let pages = 256 << 20 >> 12;
    let run = migrate("anon256", pages, 4, 1000..1200, &["--threads", "2"]);
    assert_vmm_ok(&run.vmm);
    assert_every_page_accounted(&run.stats, pages as u64);
    // Every 4th page is zero and pages 1000..1200 are a hole: ~25% travel as zero ranges.
    let zero = run.stats["pages_zero"].as_u64().unwrap();
    assert!(zero >= (pages / 4) as u64, "{}", run.stats);
    assert!(run.stats["fault_latency_us"]["count"].as_u64().unwrap() > 0);
    // Zero pages cost no payload: bytes received stay near the data pages' size.
    let data_bytes = (pages as u64 - zero) * PAGE as u64;
    let received = run.stats["bytes_received"].as_u64().unwrap();
    assert!(
        received < data_bytes + data_bytes / 50,
        "{received} bytes for {data_bytes} of data"
    );
    assert!(
        run.pagesrv_stderr.contains("session completed"),
        "{}",
        run.pagesrv_stderr
    );
}

#[test]
fn test_memfd_ram_three_regions_with_removed_range_reads_zero() {
    if !require_userfaultfd() {
        return;
    }
    let pages = 256 << 20 >> 12;
    // Region 0 holds pages 0..21846; remove 4096 pages inside it.
    let run = migrate(
        "memfd3",
        pages,
        7,
        0..0,
        &[
            "--memfd",
            "--regions",
            "3",
            "--threads",
            "2",
            "--remove",
            "5000:4096",
            "--seed",
            "7",
        ],
    );
    assert_vmm_ok(&run.vmm);
    assert_every_page_accounted(&run.stats, pages as u64);
    assert!(
        run.stats["pages_removed"].as_u64().unwrap() > 0,
        "{}",
        run.stats
    );
}

#[test]
fn test_anonymous_ram_three_regions_with_dontneed_range_reads_zero() {
    if !require_userfaultfd() {
        return;
    }
    let pages = 64 << 20 >> 12;
    let run = migrate(
        "anon3",
        pages,
        0,
        0..0,
        &[
            "--regions",
            "3",
            "--threads",
            "3",
            "--remove",
            "6000:300",
            "--seed",
            "3",
        ],
    );
    assert_vmm_ok(&run.vmm);
    assert_every_page_accounted(&run.stats, pages as u64);
    assert!(
        run.stats["pages_removed"].as_u64().unwrap() > 0,
        "{}",
        run.stats
    );
}

#[test]
fn test_all_zero_source_moves_no_page_bytes() {
    if !require_userfaultfd() {
        return;
    }
    let pages = 16 << 20 >> 12;
    // Every page is written as zero, and the second half is a hole.
    let run = migrate("zero", pages, 1, pages / 2..pages, &["--threads", "2"]);
    assert_vmm_ok(&run.vmm);
    assert_every_page_accounted(&run.stats, pages as u64);
    assert_eq!(run.stats["pages_zero"].as_u64().unwrap(), pages as u64);
    assert_eq!(run.stats["received_digest"], run.source_digest.as_str());
    assert!(run.stats["bytes_received"].as_u64().unwrap() < (pages * 24) as u64);
}
