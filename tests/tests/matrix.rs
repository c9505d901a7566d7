//! The features together: `bench matrix --pairwise` migrates the running KVM guest once per
//! cell of a pairwise-covering subset of strategy {postcopy, hybrid, precopy} × saving
//! {none, base image 90%, free pages 50%} × destination pages {4 KiB, 2 MiB} × cuts {none,
//! one mid-migration}, keys on, and every cell must be verified (the guest checked its
//! pages, the digests match).

use std::process::Command;
use std::time::Duration;

use tests::*;

/// Both tests reserve the machine's huge pages for their run: one at a time.
static HUGE_PAGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn test_every_pair_of_features_migrates_verified() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let _one = HUGE_PAGES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("matrix");
    let out = dir.path("matrix.json");
    let mut bench = Proc::spawn(
        "bench",
        Command::new(bin("bench"))
            .args(["matrix", "--pairwise", "--size-mib", "64"])
            .args(["--warmup-ms", "200", "--after-ms", "200", "--json"])
            .arg(&out),
    );
    let (status, stderr) = bench.wait(Duration::from_secs(600));
    let stdout = bench.rest_of_stdout();
    assert!(status.success(), "bench matrix failed:\n{stdout}\n{stderr}");
    let rows = json(&std::fs::read_to_string(&out).expect("bench wrote its JSON"));
    let rows = rows.as_array().expect("an array of cells");
    assert_eq!(rows.len(), 9, "{rows:?}");
    for row in rows {
        assert_eq!(row["verified"], true, "{row}");
        assert!(row["mib"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["downtime_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    let pairs = |a: &str, b: &str| {
        let mut seen: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r[a].to_string(), r[b].to_string()))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    assert_eq!(pairs("strategy", "saving"), 9);
    assert_eq!(pairs("strategy", "page"), 6);
    assert_eq!(pairs("saving", "page"), 6);
    assert_eq!(pairs("strategy", "cut"), 6);
    assert_eq!(pairs("saving", "cut"), 6);
    assert_eq!(pairs("page", "cut"), 4);
    // A cut cell reconnected once; the others never.
    for row in rows {
        let cut = row["cut"] == "one";
        assert_eq!(row["reconnects"].as_u64().unwrap(), u64::from(cut), "{row}");
    }
    // Hybrid and precopy sent pages before the pause; postcopy none.
    for row in rows {
        let precopy_first = row["strategy"] != "postcopy";
        assert_eq!(
            row["precopy_rounds"].as_u64().unwrap() > 0,
            precopy_first,
            "{row}"
        );
    }
}

/// A cut while precopy patches huge pages (after the first round's 64 MiB): patches the cut
/// may have lost leave their pages unconfirmed, the next session drops them whole and sends
/// them again, and every page is right at the end.
#[test]
fn test_a_cut_among_the_patches_of_huge_pages_resumes_verified() {
    if !require_kvm() || !require_userfaultfd() {
        return;
    }
    let _one = HUGE_PAGES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("patch-cut");
    let out = dir.path("out.json");
    let mut bench = Proc::spawn(
        "bench",
        Command::new(bin("bench"))
            .args(["migrate", "--size-mib", "64", "--page-size", "2m"])
            .args([
                "--cut-after-mib",
                "66",
                "--warmup-ms",
                "200",
                "--after-ms",
                "200",
            ])
            .arg("--json")
            .arg(&out)
            .arg("--ram-dir")
            .arg(&dir.0),
    );
    let (status, stderr) = bench.wait(Duration::from_secs(300));
    let stdout = bench.rest_of_stdout();
    assert!(
        status.success(),
        "bench migrate failed:\n{stdout}\n{stderr}"
    );
    let r = json(&std::fs::read_to_string(&out).expect("bench wrote its JSON"));
    assert_eq!(r["strategy"], "hybrid", "{r}");
    assert_eq!(r["faultd"]["reconnects"], 1, "the cut came: {r}");
    assert!(r["precopy_rounds"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["digest_match"], true, "{r}");
    assert_eq!(r["guest"]["mismatches"], 0, "{r}");
    let moved = r["bytes_precopy"].as_u64().unwrap() + r["bytes_postcopy"].as_u64().unwrap();
    assert!(moved > 66 << 20, "the cut fell after the first round: {r}");
}
