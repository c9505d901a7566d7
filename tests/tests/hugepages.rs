//! Huge-page guests (Firecracker's `MAP_HUGETLB` memory, `page_size: 2097152`) served from an
//! ordinary memory file: the destination's page size decides.

use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);
const HUGE: usize = 2 << 20;

#[test]
fn test_huge_page_guest_served_from_an_ordinary_file() {
    huge_page_migration("huge512", &[], &[]);
}

/// The same guest on a hugetlbfs memfd with faultd asked for memfd placement: hugetlbfs cannot
/// be written with pwrite, so faultd says so and places the pages with UFFDIO_COPY.
#[test]
fn test_huge_page_guest_on_a_memfd_with_memfd_placement_falls_back_to_copy() {
    huge_page_migration("huge512-memfd", &["--placement", "memfd"], &["--memfd"]);
}

fn huge_page_migration(tag: &str, faultd_args: &[&str], vmm_args: &[&str]) {
    if !require_userfaultfd() {
        return;
    }
    let Some(_reserved) = HugePages::reserve(260) else {
        return;
    };
    let dir = Scratch::new(tag);
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    // 512 MiB: every 4th 4 KiB page zero, and 4 MiB never written (two zero huge pages).
    let pages = 512 << 20 >> 12;
    write_source(&mem, pages, 0x4A6E, 4, 2048..3072);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, faultd_args);
    let vmm_args = [&["--hugepages", "--threads", "2"][..], vmm_args].concat();
    let mut vmm = start_vmm(&uds, &mem, &vmm_args);
    let done = finish_migration(tag, &mut vmm, &mut faultd, &mut pagesrv, &stats);
    if vmm_args.contains(&"--memfd") {
        // The memfd reached faultd, so `--placement memfd` placed through it.
        assert!(
            done.faultd_err.contains("memfd=true"),
            "{}",
            done.faultd_err
        );
    }
    let s = &done.stats;
    assert_eq!(s["page_size"], HUGE, "{s}");
    assert_eq!(s["total_pages"], 256, "{s}");
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(
        n("pages_requested") + n("pages_pushed") + n("pages_zero"),
        256,
        "every huge page arrives once: {s}"
    );
    assert_eq!(n("pages_zero"), 2, "{s}");
    let image = std::fs::read(&mem).unwrap();
    let digest = common::digest::run_digest(0, &image, HUGE);
    assert_eq!(s["received_digest"], format!("{digest:016x}").as_str());
    assert!(n("faults") > 0, "{s}");
}

#[test]
fn test_a_removed_huge_page_reads_zero() {
    if !require_userfaultfd() {
        return;
    }
    let Some(_reserved) = HugePages::reserve(40) else {
        return;
    };
    let dir = Scratch::new("huge-remove");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 64 << 20 >> 12, 0x4E40, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    // Huge pages 4 and 5 (4 KiB pages 2048..3072) are given back early.
    let mut vmm = start_vmm(&uds, &mem, &["--hugepages", "--remove", "2048:1024"]);
    // test-vmm checks that the removed huge pages read zero, during and after: a REMOVE
    // faultd did not handle leaves the page missing for good (the guest would hang), and one
    // it handled late would bring the old bytes back.
    finish_migration("huge remove", &mut vmm, &mut faultd, &mut pagesrv, &stats);
}

#[test]
fn test_a_file_that_is_not_whole_huge_pages_is_refused_before_any_page_moves() {
    if !require_userfaultfd() {
        return;
    }
    let Some(_reserved) = HugePages::reserve(40) else {
        return;
    };
    let dir = Scratch::new("huge-odd");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, (64 << 20 >> 12) + 1, 3, 4, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let ram = (64 << 20).to_string();
    let _vmm = start_vmm(
        &uds,
        &mem,
        &["--hugepages", "--no-touch", "--ram-bytes", &ram],
    );
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a whole number of 2097152-byte pages"),
        "{stderr}"
    );
    assert!(stderr.contains("LayoutMismatch"), "{stderr}");
    assert!(pagesrv.is_running(), "pagesrv keeps serving");
    let pagesrv_err = pagesrv.kill_and_collect();
    assert!(
        !pagesrv_err.contains("destination connected"),
        "{pagesrv_err}"
    );
}
