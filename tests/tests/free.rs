//! `pagesrv --free-pages FILE`: pages the guest holds free are never sent; the destination
//! reads them as zero (never the old bytes the source still holds there), and the digests
//! agree on that.

use std::process::Command;
use std::time::Duration;

use tests::*;

const PAGES: usize = 16384;

/// Free: every third page from page 1, and pages 1000..5000.
fn is_free(page: usize) -> bool {
    page % 3 == 1 || (1000..5000).contains(&page)
}

#[test]
fn test_free_pages_are_not_sent_and_read_as_zero() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("free");
    let (mem, hints, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("free.bitmap"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    // No zero pages: any page pagesrv answers as zero is a free page someone asked for.
    write_source(&mem, PAGES, 0xF4EE, 0, 0..0);
    // Free pages still hold old bytes at the source (freed memory is not cleared).
    let mut image = std::fs::read(&mem).expect("read the source");
    let mut bitmap = vec![0u8; PAGES.div_ceil(8)];
    let mut free = 0u64;
    for (p, page) in image.chunks_mut(PAGE).enumerate() {
        if is_free(p) {
            page.fill(0xDE);
            bitmap[p / 8] |= 1 << (p % 8);
            free += 1;
        }
    }
    std::fs::write(&mem, &image).expect("write the source");
    std::fs::write(&hints, &bitmap).expect("write the hints");
    let (mut pagesrv, addr) = start_pagesrv(&mem, &["--free-pages", hints.to_str().expect("path")]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let hints_arg = hints.to_str().expect("path");
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2", "--expect-zero", hints_arg]);
    // test-vmm checks every page: the source's bytes, zeros where the hints say free.
    let done = finish_migration("free", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    let s = &done.stats;
    // What the destination holds is the source with its free pages zero, to the digest.
    for (p, page) in image.chunks_mut(PAGE).enumerate() {
        if is_free(p) {
            page.fill(0);
        }
    }
    let expected = format!("{:016x}", common::digest::run_digest(0, &image, PAGE));
    assert_eq!(s["received_digest"], expected.as_str(), "{s}");
    // No free page crossed as data: only the data pages that are not free did.
    let data_not_free = (0..PAGES).filter(|p| !is_free(*p)).count() as u64;
    let bytes = s["bytes_received"].as_u64().expect("bytes");
    assert!(
        bytes <= data_not_free * (PAGE as u64 + 64) + (1 << 20),
        "{bytes} bytes for {data_not_free} data pages: {s}"
    );
    assert!(
        done.pagesrv_err.contains(&format!("{free} free (hinted)")),
        "every free page went as a zero range first: {}",
        done.pagesrv_err
    );
    // Faults on free pages were filled at the destination: none was asked for.
    assert!(
        done.pagesrv_err.contains(", 0 zero)"),
        "a free page was requested: {}",
        done.pagesrv_err
    );
    assert!(free > 0);
}

#[test]
fn test_hints_that_do_not_fit_the_memory_are_refused_at_start() {
    let dir = Scratch::new("free-bad");
    let (mem, hints) = (dir.path("vm.mem"), dir.path("free.bitmap"));
    write_source(&mem, PAGES, 0xF4EE, 4, 0..0);
    std::fs::write(&hints, vec![0xFFu8; PAGES / 8 - 1]).expect("write short hints");
    let mut pagesrv = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .arg("--vm-mem")
            .arg(&mem)
            .args(["--listen", "127.0.0.1:0", "--free-pages"])
            .arg(&hints),
    );
    let (status, err) = pagesrv.wait(Duration::from_secs(30));
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("a bitmap of this memory's 16384 pages"),
        "{err}"
    );
    assert!(
        pagesrv.rest_of_stdout().is_empty(),
        "it never listened: nothing can move"
    );
}
