//! `faultd --base FILE`: pages the destination's base image holds are placed from it, by
//! hash, and never cross the wire; the rest arrive as usual; a base that cannot be this VM's
//! is refused before any page moves.

use std::process::Command;
use std::time::Duration;

use tests::*;

const PAGES: usize = 16384;
const LIMIT: Duration = Duration::from_secs(120);

/// Writes a base image like the source but with every `differ_every`-th data page changed
/// and every `missing_every`-th page zero (a page the base does not hold); returns how many
/// data pages of the source it holds unchanged.
fn write_base(source: &std::path::Path, base: &std::path::Path, differ_every: usize) -> u64 {
    let mut image = std::fs::read(source).expect("read the source");
    let mut same = 0;
    for (p, page) in image.chunks_mut(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue; // zero pages are never hashed
        }
        if p % differ_every == 0 {
            page[100] ^= 0xFF;
        } else if p % (differ_every + 1) == 0 {
            page.fill(0);
        } else {
            same += 1;
        }
    }
    std::fs::write(base, &image).expect("write the base");
    same
}

#[test]
fn test_pages_the_base_holds_are_placed_from_it_and_not_sent() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("base");
    let (mem, base, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("base.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, PAGES, 0xBA5E, 4, 0..0);
    let same = write_base(&mem, &base, 10);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &[]);
    let base_arg = base.to_str().expect("path");
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--base", base_arg]);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    // Every byte right (test-vmm compares each page with the source), digests equal.
    let done = finish_migration("base", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    let s = &done.stats;
    assert_eq!(s["received_digest"], source_digest(&mem).as_str(), "{s}");
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
    // Pages the base holds came from it, unless the VMM faulted on them first; the ones it
    // holds differently or not at all crossed the wire.
    assert!(n("pages_reused") <= same, "{s}");
    assert!(n("pages_reused") + n("pages_requested") >= same, "{s}");
    let data_pages = (PAGES - PAGES / 4) as u64;
    assert!(
        n("pages_pushed") + n("pages_requested") + n("pages_reused") >= data_pages,
        "{s}"
    );
    // On the wire: the hashes and the pages not held, not the whole guest.
    let sent_pages = data_pages - n("pages_reused");
    assert!(
        n("bytes_received") <= n("bytes_hashes") + sent_pages * (PAGE as u64 + 64) + (1 << 20),
        "{s}"
    );
    assert_eq!(
        n("bytes_saved_base"),
        n("pages_reused") * PAGE as u64,
        "{s}"
    );
    assert!(
        done.pagesrv_err.contains("in the destination's base"),
        "{}",
        done.pagesrv_err
    );
}

/// faultd with `--base base` against a pagesrv serving a 16384-page source; returns its exit
/// status, its stderr, and whether pagesrv saw a destination at all.
fn faultd_with_base(tag: &str, make_base: impl FnOnce(&std::path::Path)) -> (bool, String, String) {
    let dir = Scratch::new(tag);
    let (mem, base, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("base"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, PAGES, 0xBA5E, 4, 0..0);
    make_base(&base);
    let (pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = Proc::spawn(
        "faultd",
        Command::new(bin("faultd"))
            .args(tests::key_args::<&str>(&[]))
            .args(["--connect", &addr])
            .arg("--uds")
            .arg(&uds)
            .arg("--stats-json")
            .arg(&stats)
            .arg("--base")
            .arg(&base),
    );
    // A VMM, if faultd got as far as waiting for one (it never touches memory).
    let vmm = uds_appears(&uds).then(|| start_vmm(&uds, &mem, &["--no-touch", "--no-wait"]));
    let (status, err) = faultd.wait(LIMIT);
    drop(vmm);
    let pagesrv_err = pagesrv.kill_and_collect();
    (status.success(), err, pagesrv_err)
}

fn uds_appears(path: &std::path::Path) -> bool {
    for _ in 0..200 {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn test_a_base_of_the_wrong_size_is_refused_before_any_page_moves() {
    if !require_userfaultfd() {
        return;
    }
    let (ok, err, pagesrv_err) = faultd_with_base("base-size", |base| {
        std::fs::write(base, vec![1u8; (PAGES / 2) * PAGE]).expect("write a short base");
    });
    assert!(!ok, "{err}");
    assert!(err.contains("not an image of this VM"), "{err}");
    assert!(
        !pagesrv_err.contains("destination connected"),
        "no page may move: {pagesrv_err}"
    );
}

#[test]
fn test_an_unreadable_base_is_refused_at_start() {
    if !require_userfaultfd() {
        return;
    }
    let (ok, err, _) = faultd_with_base("base-dir", |base| {
        std::fs::create_dir(base).expect("a directory where the base should be");
    });
    assert!(!ok, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let (ok, err, _) = faultd_with_base("base-missing", |_| {});
    assert!(!ok, "{err}");
    assert!(err.contains("cannot open the base image"), "{err}");
}
