//! Working-set prefetch: faultd records the pages a guest faults on in first-touch order
//! (`--record-working-set`), and pagesrv pushes them first on the next migration or restore
//! of the same image (`--prefetch`); a damaged or foreign file is reported and ignored.

use std::path::Path;

use tests::*;

/// Pages of the image and pages the guest touches (a fixed random subset: the same seed in
/// every run, like a restored snapshot that runs the same code).
const PAGES: usize = 16384;
const TOUCHES: &str = "3000";

struct Restore {
    faults: u64,
    requested: u64,
    pagesrv_err: String,
    faultd_err: String,
}

/// One migration of `mem` with the guest touching the same pages as every other run.
fn restore(dir: &Scratch, mem: &Path, pagesrv_args: &[&str], faultd_args: &[&str]) -> Restore {
    let (uds, stats) = (dir.path("faultd.sock"), dir.path("stats.json"));
    let (mut pagesrv, addr) = start_pagesrv(mem, pagesrv_args);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, faultd_args);
    let mut vmm = start_vmm(
        &uds,
        mem,
        &["--threads", "1", "--touches", TOUCHES, "--seed", "11"],
    );
    let done = finish_migration("restore", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert_eq!(done.stats["received_digest"], source_digest(mem).as_str());
    Restore {
        faults: done.stats["fault_latency_us"]["count"].as_u64().unwrap(),
        requested: done.stats["pages_requested"].as_u64().unwrap(),
        pagesrv_err: done.pagesrv_err,
        faultd_err: done.faultd_err,
    }
}

/// "N pushed first from the working set" in pagesrv's summary.
fn pushed_first(pagesrv_err: &str) -> u64 {
    let at = pagesrv_err
        .find(" pushed first from the working set")
        .unwrap_or_else(|| panic!("no prefetch count: {pagesrv_err}"));
    let head = &pagesrv_err[..at];
    head[head.rfind(' ').unwrap() + 1..].parse().unwrap()
}

#[test]
fn test_a_recorded_working_set_is_pushed_first_and_saves_faults() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("wset");
    let mem = dir.path("vm.mem");
    write_source(&mem, PAGES, 21, 0, 0..0);
    let ws = dir.path("ws");
    let ws_arg = ws.to_str().unwrap();
    // Recording on a demand-paged restore (no push, no pre-paging): every page the guest
    // touches faults, and faultd keeps the record even though the guest leaves before the
    // migration ends.
    let (uds, stats) = (dir.path("rec.sock"), dir.path("rec.json"));
    let (pagesrv, addr) = start_pagesrv(&mem, &["--no-push", "--prepage-window", "0"]);
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--record-working-set", ws_arg]);
    let mut vmm = start_vmm(
        &uds,
        &mem,
        &[
            "--threads",
            "1",
            "--touches",
            TOUCHES,
            "--seed",
            "11",
            "--no-wait",
        ],
    );
    let (status, err) = vmm.wait(std::time::Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let (status, faultd_err) = faultd.wait(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "the guest left early: {faultd_err}");
    drop(pagesrv);
    let set = common::working_set::WorkingSet::read(&ws).expect("faultd wrote the working set");
    let touched: u64 = TOUCHES.parse().unwrap();
    assert_eq!(set.pages.len() as u64, touched, "{faultd_err}");
    // The same restore with the set pushed first: few pages are still requested.
    let second = restore(&dir, &mem, &["--prefetch", ws_arg], &[]);
    assert!(
        second
            .pagesrv_err
            .contains("prefetch: the recorded working set is pushed first"),
        "{}",
        second.pagesrv_err
    );
    // pagesrv pushed the set first: every recorded page not requested in the meantime.
    let prefetched = pushed_first(&second.pagesrv_err);
    assert!(
        prefetched + second.requested >= touched && prefetched > touched / 2,
        "{prefetched} pages pushed first, {} requested, of {touched}: {}",
        second.requested,
        second.pagesrv_err
    );
    assert!(
        second.requested * 4 < touched,
        "prefetch saved too few demand faults: {touched} then {} requested ({} faults)\n{}",
        second.requested,
        second.faults,
        second.faultd_err
    );
}

#[test]
fn test_damaged_or_foreign_working_sets_are_reported_and_ignored() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("wset-bad");
    let mem = dir.path("vm.mem");
    write_source(&mem, 1024, 5, 4, 0..0);
    // Damaged: a valid file with one byte flipped.
    let good = common::working_set::WorkingSet {
        page_size: 4096,
        total_pages: 1024,
        image_id: 1,
        pages: vec![1, 2, 3],
    };
    let mut bytes = good.encode();
    bytes[50] ^= 0xFF;
    let damaged = dir.path("damaged");
    std::fs::write(&damaged, bytes).unwrap();
    // Foreign: whole, but recorded on another image (another id).
    let foreign = dir.path("foreign");
    good.write(&foreign).unwrap();
    for (file, why) in [
        (&damaged, "checksum mismatch"),
        (&foreign, "recorded on another memory image"),
        (&dir.path("missing"), "cannot read"),
    ] {
        let run = restore(&dir, &mem, &["--prefetch", file.to_str().unwrap()], &[]);
        assert!(
            run.pagesrv_err
                .contains("ignoring the --prefetch working set")
                && run.pagesrv_err.contains(why),
            "{}",
            run.pagesrv_err
        );
        assert_eq!(pushed_first(&run.pagesrv_err), 0);
    }
}
