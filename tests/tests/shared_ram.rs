//! Clones of one template on a host sharing one guest RAM file (test-vmm `--shared-ram`,
//! each mapping it private; faultd `--placement memfd` writes the pages into it): every
//! clone sees the whole template, a page one clone placed is mapped into the next without a
//! fault and is not sent to it again, and a file tied to another image is refused before
//! any page goes in.

use std::path::Path;
use std::time::Duration;

use tests::{Proc, Scratch, write_source};

const LIMIT: Duration = Duration::from_secs(120);

/// Starts `pagesrv --template` serving `image` (and `extra`); returns it and its address.
fn serve_template(image: &Path, extra: &[&str]) -> (Proc, String) {
    tests::start_pagesrv(image, &[&["--template"][..], extra].concat())
}

/// One clone: faultd (memfd placement) and test-vmm over `shared` (touching every page and
/// checking every byte against `image`). Returns faultd's stats.
fn clone(dir: &Scratch, tag: &str, addr: &str, image: &Path, shared: &Path) -> serde_json::Value {
    clone_with(dir, tag, addr, image, shared, &[])
}

/// [`clone`] with more test-vmm arguments.
fn clone_with(
    dir: &Scratch,
    tag: &str,
    addr: &str,
    image: &Path,
    shared: &Path,
    vmm_args: &[&str],
) -> serde_json::Value {
    let shared = shared.to_str().unwrap();
    let vmm_args = [&["--threads", "2", "--shared-ram", shared][..], vmm_args].concat();
    let faultd_args = ["--placement", "memfd", "--shared-ram"];
    // Every byte checked by test-vmm; the pages this faultd received against pagesrv's
    // digests (pages another clone placed were checked by that clone's).
    let (stats, faultd_err) = tests::restore_one(dir, tag, addr, image, &faultd_args, &vmm_args);
    assert!(
        faultd_err.contains("the guest RAM file is shared"),
        "{tag}: {faultd_err}"
    );
    stats
}

#[test]
fn test_clones_sharing_a_ram_file_see_the_whole_template_and_a_later_one_takes_it_from_the_file() {
    if !tests::require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("shared-ram");
    let (image, shared) = (dir.path("tpl.mem"), dir.path("ram.shared"));
    write_source(&image, 4096, 31, 4, 0..0);
    let (pagesrv, addr) = serve_template(&image, &[]);
    // Two at once: each places pages the other may already map.
    let first: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = ["c1", "c2"]
            .into_iter()
            .map(|tag| {
                let (dir, addr, image, shared) = (&dir, &addr, &image, &shared);
                s.spawn(move || clone(dir, tag, addr, image, shared))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let faulted: u64 = first.iter().map(|s| s["faults"].as_u64().unwrap()).sum();
    assert!(faulted > 0, "the first clones fault: {first:?}");
    pagesrv.wait_for_stderr("completed (", 2, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 2, "{err}");

    // Every page is in the file now. A clone served without a push (only what it asks
    // for): its guest finds every page there (no fault, so it asks for nothing), and its
    // faultd completes only by taking the pages over from the file.
    let (pagesrv, addr) = serve_template(&image, &["--no-push", "--prepage-window", "0"]);
    let third = clone(&dir, "c3", &addr, &image, &shared);
    assert_eq!(third["faults"], 0, "{third}");
    assert_eq!(third["pages_requested"], 0, "{third}");
    assert_eq!(third["pages_pushed"], 0, "{third}");
    let n = |k: &str| third[k].as_u64().unwrap();
    assert_eq!(n("pages_shared") + n("pages_zero"), 4096, "{third}");
    assert!(n("pages_shared") > 0, "{third}");
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 1, "{err}");
}

#[test]
fn test_a_ram_file_shared_for_another_image_is_refused_before_any_page_goes_in() {
    if !tests::require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("shared-ram-other");
    let (a, b, shared) = (dir.path("a.mem"), dir.path("b.mem"), dir.path("ram.shared"));
    write_source(&a, 1024, 41, 4, 0..0);
    write_source(&b, 1024, 42, 4, 0..0);
    let (pagesrv_a, addr_a) = serve_template(&a, &[]);
    clone(&dir, "a1", &addr_a, &a, &shared);
    pagesrv_a.wait_for_stderr("completed (", 1, LIMIT);
    drop(pagesrv_a);
    let before = std::fs::read(&shared).unwrap();

    // A clone of another template given the same file.
    let (pagesrv_b, addr_b) = serve_template(&b, &[]);
    let (uds, stats) = (dir.path("b1.sock"), dir.path("b1.json"));
    let mut faultd = tests::start_faultd_with(
        &addr_b,
        &uds,
        &stats,
        &["--placement", "memfd", "--shared-ram"],
    );
    let shared_arg = shared.to_str().unwrap();
    let _vmm = tests::start_vmm(&uds, &b, &["--no-touch", "--shared-ram", shared_arg]);
    let (status, err) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is shared with VMs restoring image"), "{err}");
    assert!(
        std::fs::read(&shared).unwrap() == before,
        "a page of the other image went into the shared file"
    );
    let pagesrv_err = pagesrv_b.kill_and_collect();
    assert!(
        !pagesrv_err.contains("completed ("),
        "the refused clone completed: {pagesrv_err}"
    );
}

#[test]
fn test_pages_a_clone_gives_back_read_the_template_again_and_no_zeros_reach_the_file() {
    if !tests::require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("shared-ram-remove");
    let (image, shared) = (dir.path("tpl.mem"), dir.path("ram.shared"));
    write_source(&image, 2048, 43, 4, 0..0);
    let (pagesrv, addr) = serve_template(&image, &[]);
    // The first clone gives 300 pages back (DONTNEED) early, most before they arrived: it
    // reads them as the template's again, and so does a clone after it, page by page
    // (were they marked zero, a fault on one would write zeros into the file).
    clone_with(
        &dir,
        "giver",
        &addr,
        &image,
        &shared,
        &["--remove", "1000:300"],
    );
    clone(&dir, "after", &addr, &image, &shared);
    let (file, source) = (
        std::fs::read(&shared).unwrap(),
        std::fs::read(&image).unwrap(),
    );
    let given_back = 1000 * tests::PAGE..1300 * tests::PAGE;
    assert!(
        file[given_back.clone()] == source[given_back],
        "the shared file differs from the template where a clone gave pages back"
    );
    pagesrv.wait_for_stderr("completed (", 2, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 2, "{err}");
}

#[test]
fn test_shared_ram_is_refused_for_a_memfd_that_no_other_vmm_can_map() {
    if !tests::require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("shared-ram-memfd");
    let image = dir.path("tpl.mem");
    write_source(&image, 256, 44, 4, 0..0);
    let (pagesrv, addr) = serve_template(&image, &[]);
    let (uds, stats) = (dir.path("m.sock"), dir.path("m.json"));
    let args = ["--placement", "memfd", "--shared-ram"];
    let mut faultd = tests::start_faultd_with(&addr, &uds, &stats, &args);
    let _vmm = tests::start_vmm(&uds, &image, &["--no-touch", "--memfd"]);
    let (status, err) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("not a memfd"), "{err}");
    let pagesrv_err = pagesrv.kill_and_collect();
    assert!(
        !pagesrv_err.contains("destination connected"),
        "faultd connected before refusing: {pagesrv_err}"
    );
}
