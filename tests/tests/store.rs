//! Snapshots in an object store (`pagesrv store put/get/ls/rm`) against a real S3-compatible
//! server (SeaweedFS on loopback, one per test): every byte comes back; a similar image
//! stores only its changed pages; damaged objects are refused and nothing wrong is written;
//! a store that goes away or goes silent is an error or a retry, never a hang; removal keeps
//! what other snapshots use.

use std::path::Path;
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tests::s3::{BUCKET, S3Server, require_weed, run_ok, same_bytes};
use tests::{PAGE, Proc, Scratch, start_proxy, write_source};

/// How long a pagesrv has to write a line the test waits for.
const LIMIT: Duration = Duration::from_secs(60);

/// The number just before `word` in `text` (e.g. `number_before(out, " new (")`).
fn number_before(text: &str, word: &str) -> u64 {
    let at = text
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} not in {text}"));
    text[..at]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {text}"))
}

/// Changes one word in `percent`% of the data pages of `path` (spread evenly); returns how
/// many pages changed.
fn change_pages(path: &Path, percent: usize, zero_every: usize) -> u64 {
    let mut bytes = std::fs::read(path).expect("read image");
    let mut changed = 0;
    for (p, page) in bytes.chunks_exact_mut(PAGE).enumerate() {
        if p % zero_every == 0 || (p * 7919) % 100 >= percent {
            continue;
        }
        page[8] ^= 0xFF;
        changed += 1;
    }
    std::fs::write(path, bytes).expect("write image");
    changed
}

/// An object store client for the server (to damage objects as a failing disk would).
fn raw_client(server: &S3Server) -> (object_store::aws::AmazonS3, tokio::runtime::Runtime) {
    let mut builder = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_allow_http(true);
    for (key, value) in server.env() {
        if let Ok(key) = key.to_ascii_lowercase().parse() {
            builder = builder.with_config(key, value);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (builder.build().expect("client"), runtime)
}

/// Flips one byte in the middle of the first object whose key starts with `prefix` and ends
/// with `suffix`; returns its key.
fn damage_object(server: &S3Server, prefix: &str, suffix: &str) -> String {
    let (client, runtime) = raw_client(server);
    runtime.block_on(async {
        use futures::TryStreamExt;
        let metas: Vec<_> = client
            .list(Some(&object_store::path::Path::from(prefix)))
            .try_collect()
            .await
            .expect("list");
        let meta = metas
            .iter()
            .find(|m| m.location.to_string().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {prefix}*{suffix} object"));
        let mut bytes = client
            .get(&meta.location)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        client
            .put(&meta.location, PutPayload::from(bytes))
            .await
            .expect("put");
        meta.location.to_string()
    })
}

#[test]
fn test_an_uploaded_image_comes_back_byte_for_byte() {
    if !require_weed() {
        return;
    }
    let server = S3Server::start("roundtrip");
    let dir = Scratch::new("store-roundtrip");
    let image = dir.path("vm.mem");
    // Zero pages written as zeros, and a hole: neither is stored.
    write_source(&image, 6000, 11, 7, 100..300);
    let put = run_ok(&mut server.pagesrv(&[
        "store",
        "put",
        image.to_str().unwrap(),
        &server.url("team/vm1"),
    ]));
    let data_pages = (0..6000)
        .filter(|p| p % 7 != 0 && !(100..300).contains(p))
        .count() as u64;
    assert_eq!(number_before(&put, " new ("), data_pages, "{put}");
    assert_eq!(
        number_before(&put, " zero (not stored)"),
        6000 - data_pages,
        "{put}"
    );
    let back = dir.path("back.mem");
    let got = run_ok(&mut server.pagesrv(&[
        "store",
        "get",
        &server.url("team/vm1"),
        back.to_str().unwrap(),
    ]));
    assert!(
        same_bytes(&image, &back),
        "the image came back different: {got}"
    );
    assert_eq!(tests::source_digest(&image), tests::source_digest(&back));
    let ls = run_ok(&mut server.pagesrv(&["store", "ls", &format!("s3://{BUCKET}")]));
    assert!(
        ls.contains("team/vm1") && ls.contains("1 snapshot(s)"),
        "{ls}"
    );
    // A name is never overwritten.
    let again = server
        .pagesrv(&[
            "store",
            "put",
            image.to_str().unwrap(),
            &server.url("team/vm1"),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
}

#[test]
fn test_two_uploads_of_one_name_at_once_one_wins_and_the_other_is_told() {
    if !require_weed() {
        return;
    }
    let server = S3Server::start("race");
    let dir = Scratch::new("store-race");
    let (a, b) = (dir.path("a.mem"), dir.path("b.mem"));
    // Different images of 32 MiB: each upload takes long enough that both have looked for
    // the name before either writes its manifest.
    write_source(&a, 8192, 31, 9, 0..0);
    write_source(&b, 8192, 32, 9, 0..0);
    let url = server.url("vm");
    let mut puts: Vec<Proc> = [&a, &b]
        .iter()
        .map(|image| {
            Proc::spawn(
                "pagesrv store put",
                &mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &url]),
            )
        })
        .collect();
    let results: Vec<(bool, String)> = puts
        .iter_mut()
        .map(|p| {
            let (status, err) = p.wait(Duration::from_secs(120));
            (status.success(), err)
        })
        .collect();
    let winners: Vec<usize> = (0..2).filter(|&i| results[i].0).collect();
    assert_eq!(winners.len(), 1, "not one winner: {results:?}");
    let (won, lost) = (winners[0], 1 - winners[0]);
    assert!(
        results[lost].1.contains("exists already"),
        "the loser is not told: {}",
        results[lost].1
    );
    let back = dir.path("back.mem");
    run_ok(&mut server.pagesrv(&["store", "get", &url, back.to_str().unwrap()]));
    assert!(
        same_bytes([&a, &b][won], &back),
        "the stored snapshot is not the winner's"
    );
}

#[test]
fn test_a_95_percent_similar_image_stores_only_its_changed_pages() {
    if !require_weed() {
        return;
    }
    let server = S3Server::start("dedup");
    let dir = Scratch::new("store-dedup");
    let (a, b) = (dir.path("a.mem"), dir.path("b.mem"));
    write_source(&a, 8192, 5, 9, 0..0);
    std::fs::copy(&a, &b).unwrap();
    let changed = change_pages(&b, 5, 9);
    let put_a =
        run_ok(&mut server.pagesrv(&["store", "put", a.to_str().unwrap(), &server.url("a")]));
    let put_b =
        run_ok(&mut server.pagesrv(&["store", "put", b.to_str().unwrap(), &server.url("b")]));
    assert_eq!(number_before(&put_b, " new ("), changed, "{put_b}");
    let written = |out: &str| -> f64 {
        let at = out.find(" MiB written").unwrap();
        out[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (wa, wb) = (written(&put_a), written(&put_b));
    assert!(
        wb <= wa * 0.1,
        "the similar image wrote {wb} MiB against {wa} MiB for the first: {put_b}"
    );
    for (image, name) in [(&a, "a"), (&b, "b")] {
        let back = dir.path(&format!("{name}.back"));
        run_ok(&mut server.pagesrv(&["store", "get", &server.url(name), back.to_str().unwrap()]));
        assert!(same_bytes(image, &back), "{name} came back different");
    }
}

#[test]
fn test_a_clone_stores_its_changed_pages_as_deltas_against_its_template_and_restores_whole() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("delta");
    let dir = Scratch::new("store-delta");
    let (tpl, clone, again) = (
        dir.path("tpl.mem"),
        dir.path("clone.mem"),
        dir.path("again.mem"),
    );
    write_source(&tpl, 8192, 7, 9, 0..0);
    std::fs::copy(&tpl, &clone).unwrap();
    // 5% of the data pages get one byte changed: a clone that ran for a while.
    let changed = change_pages(&clone, 5, 9);
    let put_tpl =
        run_ok(&mut server.pagesrv(&["store", "put", tpl.to_str().unwrap(), &server.url("tpl")]));
    let put_clone = run_ok(&mut server.pagesrv(&[
        "store",
        "put",
        clone.to_str().unwrap(),
        &server.url("clone"),
        "--parent",
        "tpl",
    ]));
    assert_eq!(number_before(&put_clone, " new ("), changed, "{put_clone}");
    assert_eq!(
        number_before(&put_clone, " as deltas)"),
        changed,
        "{put_clone}"
    );
    // Without the parent the same pages cost whole compressed pages.
    let put_again = run_ok(&mut server.pagesrv(&[
        "store",
        "put",
        clone.to_str().unwrap(),
        &server.url("whole"),
    ]));
    assert!(put_again.contains("0 new (0 as deltas)"), "{put_again}");
    let written = |out: &str| -> f64 {
        let at = out.find(" MiB written").unwrap();
        out[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(
        written(&put_clone) <= written(&put_tpl) * 0.05,
        "the clone wrote {put_clone} against {put_tpl}"
    );
    // A clone of the clone: its changed pages are stored against the template's pages (a
    // delta is never a base), the pages it shares with the clone are reused as they are.
    let mut bytes = std::fs::read(&clone).unwrap();
    let mut changed_again = 0;
    for (p, page) in bytes.chunks_exact_mut(PAGE).enumerate() {
        // Other pages than `change_pages` picks, and some of the same (deltas in the clone).
        if p % 9 != 0 && (p * 31) % 100 < 3 {
            page[200] ^= 0x33;
            changed_again += 1;
        }
    }
    std::fs::write(&again, bytes).unwrap();
    let put_again = run_ok(&mut server.pagesrv(&[
        "store",
        "put",
        again.to_str().unwrap(),
        &server.url("again"),
        "--parent",
        "clone",
    ]));
    assert!(number_before(&put_again, " as deltas)") > 0, "{put_again}");
    assert!(
        number_before(&put_again, " new (") <= changed_again,
        "{put_again}"
    );
    for (image, name) in [(&clone, "clone"), (&again, "again")] {
        let back = dir.path(&format!("{name}.back"));
        run_ok(&mut server.pagesrv(&["store", "get", &server.url(name), back.to_str().unwrap()]));
        assert!(same_bytes(image, &back), "{name} came back different");
    }
    // Served to a destination: the deltas' bases come in the same fetches.
    let (pagesrv, addr) = serve_cached(&server, &server.url("again"), &dir, None);
    restore(&dir, "restore", &addr, &again);
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 1, "{err}");
}

#[test]
fn test_damaged_objects_are_refused_and_no_file_is_left() {
    if !require_weed() {
        return;
    }
    let server = S3Server::start("damage");
    let dir = Scratch::new("store-damage");
    let image = dir.path("vm.mem");
    write_source(&image, 4000, 3, 5, 0..0);
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("vm")]));
    let back = dir.path("back.mem");
    let get = |what: &str| {
        let out = server
            .pagesrv(&["store", "get", &server.url("vm"), back.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "a damaged {what} was accepted");
        assert!(
            err.contains("damaged"),
            "no clear error for a damaged {what}: {err}"
        );
        assert!(!back.exists(), "a file was left after a damaged {what}");
        assert!(
            !dir.path("back.mem.partial").exists(),
            "a partial file was left after a damaged {what}"
        );
    };
    let pack = damage_object(&server, "packs", ".pack");
    get(&format!("pack ({pack})"));
    // A damaged index: its pages are not reused by the next upload (stored again).
    damage_object(&server, "packs", ".index");
    let again =
        run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("vm2")]));
    assert!(again.contains("damaged pack index"), "{again}");
    damage_object(&server, "snapshots", "vm.manifest");
    get("manifest");
    // The listing still shows every snapshot, the damaged one with the reason.
    let ls = run_ok(&mut server.pagesrv(&["store", "ls", &format!("s3://{BUCKET}")]));
    assert!(ls.contains("2 snapshot(s)"), "{ls}");
    let line = ls
        .lines()
        .find(|l| l.starts_with("vm "))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(
        line.contains("UNREADABLE") && line.contains("damaged"),
        "{line}"
    );
}

#[test]
fn test_a_store_that_goes_away_is_an_error_or_a_retry_never_a_hang() {
    if !require_weed() {
        return;
    }
    let mut server = S3Server::start("away");
    let dir = Scratch::new("store-away");
    let image = dir.path("vm.mem");
    // Random bytes: 64 MiB that do not compress, so the download is long enough to break.
    let mut bytes = vec![0u8; 16384 * PAGE];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    std::fs::write(&image, bytes).unwrap();
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("vm")]));
    let back = dir.path("back.mem");
    let url = server.url("vm");
    let endpoint = server.endpoint.trim_start_matches("http://").to_owned();

    // A link that goes silent after 8 MiB: the frozen request times out and is retried on a
    // new connection, which the proxy carries.
    let (_proxy, addr) = start_proxy(
        &endpoint,
        &[
            "--mode",
            "freeze",
            "--cuts",
            "1",
            "--min-mib",
            "8",
            "--max-mib",
            "8",
        ],
    );
    let started = Instant::now();
    let out = server
        .pagesrv(&["store", "get", &url, back.to_str().unwrap()])
        .env("AWS_ENDPOINT_URL", format!("http://{addr}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a retry after a silent link failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(same_bytes(&image, &back));
    let took = started.elapsed();
    // The frozen request waited for its timeout (5 s) before the retry.
    assert!(
        took > Duration::from_secs(4),
        "the link never froze ({took:?})"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    std::fs::remove_file(&back).unwrap();

    // The server killed while a download runs: it ends, with the right bytes or a clear
    // error and no file, within the retry budget.
    let mut get = Proc::spawn(
        "pagesrv store get",
        &mut server.pagesrv(&["store", "get", &url, back.to_str().unwrap()]),
    );
    std::thread::sleep(Duration::from_millis(30));
    server.kill();
    let (status, err) = get.wait(Duration::from_secs(60));
    eprintln!("killed mid-download: {status}: {err}");
    if status.success() {
        assert!(same_bytes(&image, &back));
    } else {
        assert!(err.contains("object store"), "no clear error: {err}");
        assert!(!back.exists());
    }

    // Gone before it starts: a clear error within seconds.
    let started = Instant::now();
    let out = server
        .pagesrv(&[
            "store",
            "get",
            &url,
            dir.path("other.mem").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot read snapshots/vm.manifest in the object store"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn test_removal_deletes_only_what_no_other_snapshot_uses() {
    if !require_weed() {
        return;
    }
    let server = S3Server::start("rm");
    let dir = Scratch::new("store-rm");
    let (a, b, x) = (dir.path("a.mem"), dir.path("b.mem"), dir.path("x.mem"));
    // Random bytes (they do not compress): 32 MiB of a in 8 packs of ≈ 4 MiB. b is a with
    // its first half changed, so a's first packs are a's alone and its last ones are b's too.
    let random = |pages: usize| {
        let mut bytes = vec![0u8; pages * PAGE];
        rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
        bytes
    };
    let image = random(8192);
    std::fs::write(&a, &image).unwrap();
    let mut changed = image.clone();
    for page in changed.chunks_exact_mut(PAGE).take(4096) {
        page[..8].copy_from_slice(&[0xA5; 8]);
    }
    std::fs::write(&b, &changed).unwrap();
    std::fs::write(&x, random(256)).unwrap();
    for (image, name) in [(&a, "a"), (&b, "b"), (&x, "x")] {
        run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url(name)]));
    }
    // The default grace period keeps young unused packs (x's own).
    let rm_x = run_ok(&mut server.pagesrv(&["store", "rm", &server.url("x")]));
    assert_eq!(number_before(&rm_x, " unused pack(s) deleted"), 0, "{rm_x}");
    assert!(number_before(&rm_x, " unused but younger") > 0, "{rm_x}");
    // Without it: a's own packs go, those b uses stay, and b comes back whole.
    let rm_a = run_ok(&mut server.pagesrv(&["store", "rm", &server.url("a"), "--grace-secs", "0"]));
    assert!(
        number_before(&rm_a, " unused pack(s) deleted") > 0,
        "{rm_a}"
    );
    assert!(
        number_before(&rm_a, " in use by other snapshots") > 0,
        "{rm_a}"
    );
    let back = dir.path("b.back");
    run_ok(&mut server.pagesrv(&["store", "get", &server.url("b"), back.to_str().unwrap()]));
    assert!(same_bytes(&b, &back), "b lost pages when a was removed");
    let rm_b = run_ok(&mut server.pagesrv(&["store", "rm", &server.url("b"), "--grace-secs", "0"]));
    assert!(
        number_before(&rm_b, " unused pack(s) deleted") > 0,
        "{rm_b}"
    );
    let ls = run_ok(&mut server.pagesrv(&["store", "ls", &format!("s3://{BUCKET}")]));
    assert!(ls.contains("0 snapshot(s)"), "{ls}");
    let (client, runtime) = raw_client(&server);
    let left: Vec<_> = runtime.block_on(async {
        use futures::TryStreamExt;
        client.list(None).try_collect().await.expect("list")
    });
    assert!(
        left.is_empty(),
        "objects left after every snapshot was removed: {:?}",
        left.iter()
            .map(|m| m.location.to_string())
            .collect::<Vec<_>>()
    );
    let missing = server
        .pagesrv(&["store", "rm", &server.url("a")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no snapshot a"));
}

/// pagesrv serving a stored snapshot (with `extra` arguments) on a free loopback port.
fn serve_snapshot(server: &S3Server, url: &str, extra: &[&str]) -> (Proc, String) {
    serve_snapshot_env(server.env(), url, extra)
}

/// [`serve_snapshot`] with the store's environment `env`.
fn serve_snapshot_env(
    env: Vec<(&'static str, String)>,
    url: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args: Vec<std::ffi::OsString> = vec!["--vm-mem".into(), url.into()];
    args.extend(extra.iter().map(Into::into));
    let mut cmd = std::process::Command::new(tests::bin("pagesrv"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .args(tests::key_args(&args))
        .args(&args)
        .envs(env);
    let mut pagesrv = Proc::spawn("pagesrv", &mut cmd);
    let line = pagesrv.read_line();
    let Some(addr) = line.strip_prefix("pagesrv listening on ") else {
        let (_, err) = pagesrv.wait(Duration::from_secs(5));
        panic!("pagesrv did not start: {line:?}\n{err}");
    };
    let addr = addr.to_owned();
    (pagesrv, addr)
}

/// [`serve_snapshot`] with its cache in `dir`, of at most `mib` MiB if given.
fn serve_cached(server: &S3Server, url: &str, dir: &Scratch, mib: Option<&str>) -> (Proc, String) {
    let mut extra = vec!["--store-cache", dir.0.to_str().unwrap()];
    if let Some(mib) = mib {
        extra.extend(["--store-cache-mib", mib]);
    }
    serve_snapshot(server, url, &extra)
}

/// Restores `image` (as stored) into a test VMM through faultd from pagesrv at `addr`;
/// asserts every byte the VMM read was right and the digests matched.
fn restore(dir: &Scratch, tag: &str, addr: &str, image: &Path) {
    restore_vm(dir, tag, addr, image, &[]);
}

/// [`restore`] with more faultd arguments (e.g. `--vm NAME`).
fn restore_vm(dir: &Scratch, tag: &str, addr: &str, image: &Path, faultd_args: &[&str]) {
    restore_with(dir, tag, addr, image, faultd_args, &["--threads", "2"]);
}

/// [`restore`] with faultd and test-vmm arguments; returns faultd's stats.
fn restore_with(
    dir: &Scratch,
    tag: &str,
    addr: &str,
    image: &Path,
    faultd_args: &[&str],
    vmm_args: &[&str],
) -> serde_json::Value {
    let (stats, _) = tests::restore_one(dir, tag, addr, image, faultd_args, vmm_args);
    // The sum of every 4 KiB piece's digest, whatever the page size.
    assert_eq!(
        stats["received_digest"].as_str(),
        Some(tests::source_digest(image).as_str()),
        "{tag}: {stats}"
    );
    stats
}

#[test]
fn test_a_stored_snapshot_restores_twice_through_a_cache_smaller_than_it() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("serve");
    let dir = Scratch::new("store-serve");
    let image = dir.path("vm.mem");
    // 64 MiB: every 4th page zero, a hole, the rest data (48 MiB).
    write_source(&image, 16384, 13, 4, 2000..2100);
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("tpl")]));
    // A cache of 8 MiB for 48 MiB of data: frames are evicted while the restores run.
    let (pagesrv, addr) = serve_cached(&server, &server.url("tpl"), &dir, Some("8"));
    restore(&dir, "first", &addr, &image);
    // A template is never finished: the next restore is served too.
    restore(&dir, "second", &addr, &image);
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 2, LIMIT);
    let err = pagesrv.kill_and_collect();
    for line in err.lines().filter(|l| l.starts_with("pagesrv: VM")) {
        eprintln!("{line}");
    }
    assert_eq!(err.matches("completed (verified)").count(), 2, "{err}");
    let evicted = number_before(&err, " evicted");
    assert!(
        evicted > 0,
        "a cache smaller than the image evicted nothing: {err}"
    );
    // The cache file was unlinked at once: nothing is left in its directory.
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".cache"))
        .collect();
    assert!(left.is_empty(), "cache files left: {left:?}");
}

#[test]
fn test_a_huge_page_guest_restores_a_stored_snapshot_in_2_mib_pages() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let Some(_reserved) = tests::HugePages::reserve(40) else {
        return;
    };
    let server = S3Server::start("huge");
    let dir = Scratch::new("store-huge");
    let image = dir.path("vm.mem");
    // 64 MiB: 32 huge pages, every 4th 4 KiB page zero, one huge page never written.
    write_source(&image, 16384, 41, 4, 512..1024);
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("tpl")]));
    // A cache of 8 MiB: four huge pages; the digests at the end come from the frames as
    // they arrived, not from reading evicted pages again.
    let (pagesrv, addr) = serve_cached(&server, &server.url("tpl"), &dir, Some("8"));
    let stats = restore_with(
        &dir,
        "huge",
        &addr,
        &image,
        &[],
        &["--hugepages", "--threads", "2"],
    );
    assert_eq!(stats["page_size"], 2 << 20, "{stats}");
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 1, "{err}");
}

#[test]
fn test_a_damaged_pack_fails_the_restore_cleanly_and_places_nothing_wrong() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("serve-damage");
    let dir = Scratch::new("store-serve-damage");
    let image = dir.path("vm.mem");
    write_source(&image, 4096, 17, 4, 0..0);
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("tpl")]));
    damage_object(&server, "packs", ".pack");
    let (pagesrv, addr) = serve_snapshot(&server, &server.url("tpl"), &[]);
    let (uds, stats) = (dir.path("f.sock"), dir.path("f.json"));
    let mut faultd = tests::start_faultd(&addr, &uds, &stats);
    let vmm = tests::start_vmm(&uds, &image, &["--threads", "2"]);
    let (faultd_status, faultd_err) = faultd.wait(Duration::from_secs(60));
    // The VMM's faults cannot be served any more: it is stopped (a real VMM would be told
    // by its orchestrator, which sees faultd fail).
    let _ = vmm.kill_and_collect();
    // Damage is final (fetching again cannot mend it): the next restore is refused at once.
    let (uds, stats) = (dir.path("g.sock"), dir.path("g.json"));
    let mut second = tests::start_faultd(&addr, &uds, &stats);
    let vmm = tests::start_vmm(&uds, &image, &["--threads", "2"]);
    let started = Instant::now();
    let (second_status, second_err) = second.wait(Duration::from_secs(60));
    let _ = vmm.kill_and_collect();
    assert!(!second_status.success(), "{second_err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the second restore was not refused at once: {:?}",
        started.elapsed()
    );
    let pagesrv_err = pagesrv.kill_and_collect();
    // Refused when it connected (not admitted to fail again on the same damage).
    assert!(
        second_err.contains("refused the session"),
        "the second restore was admitted: {second_err}"
    );
    assert!(
        !faultd_status.success(),
        "faultd completed from a damaged store: {faultd_err}"
    );
    assert!(
        faultd_err.contains("are lost: "),
        "faultd gives no clear reason: {faultd_err}\npagesrv:\n{pagesrv_err}"
    );
    // Nothing wrong was sent: the damaged frame's pages never left pagesrv.
    assert!(pagesrv_err.contains("its pages are lost"), "{pagesrv_err}");
    assert!(
        second_err.contains("are lost: "),
        "the second restore gives no clear reason: {second_err}"
    );
}

#[test]
fn test_a_store_back_after_an_outage_serves_new_restores_without_a_restart() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("comeback");
    let dir = Scratch::new("store-comeback");
    let image = dir.path("vm.mem");
    write_source(&image, 4096, 23, 4, 0..0);
    let url = server.url("tpl");
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &url]));
    // pagesrv reaches the store through a proxy that is "away" while a file exists (it
    // shuts the live connections and closes new ones): the server itself stays up.
    let down = dir.path("store-down");
    let endpoint = server.endpoint.trim_start_matches("http://").to_owned();
    let (_proxy, proxy_addr) = start_proxy(
        &endpoint,
        &["--cuts", "0", "--down-while", down.to_str().unwrap()],
    );
    let env = server
        .env()
        .into_iter()
        .map(|(k, v)| match k {
            "AWS_ENDPOINT_URL" => (k, format!("http://{proxy_addr}")),
            _ => (k, v),
        })
        .collect();
    let (pagesrv, addr) = serve_snapshot_env(env, &url, &[]);

    // The store goes away before any page is fetched: the restore fails with the reason,
    // never with wrong bytes.
    std::fs::write(&down, b"").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (uds, stats) = (dir.path("away.sock"), dir.path("away.json"));
    let mut faultd = tests::start_faultd(&addr, &uds, &stats);
    let vmm = tests::start_vmm(&uds, &image, &["--threads", "2"]);
    let (status, faultd_err) = faultd.wait(Duration::from_secs(120));
    let _ = vmm.kill_and_collect();
    assert!(
        !status.success(),
        "faultd completed without its store: {faultd_err}"
    );
    assert!(
        faultd_err.contains("are lost: "),
        "no clear reason: {faultd_err}"
    );

    // Back: the same pagesrv serves the next restore whole (before, the failure was final
    // for the template until pagesrv restarted).
    std::fs::remove_file(&down).unwrap();
    restore(&dir, "back", &addr, &image);
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert!(err.contains("its pages are lost"), "{err}");
}

/// The stored manifest of snapshot `name`, decoded.
fn stored_manifest(server: &S3Server, name: &str) -> snapstore::layout::Manifest {
    let (client, runtime) = raw_client(server);
    let bytes = runtime.block_on(async {
        client
            .get(&object_store::path::Path::from(format!(
                "snapshots/{name}.manifest"
            )))
            .await
            .expect("get the manifest")
            .bytes()
            .await
            .expect("read the manifest")
    });
    snapstore::layout::Manifest::decode(&bytes).expect("a sound manifest")
}

#[test]
fn test_a_working_set_is_stored_first_in_its_order_and_restored_from_the_store() {
    use snapstore::layout::PageRef;
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("working-set");
    let dir = Scratch::new("store-working-set");
    let image = dir.path("vm.mem");
    let pages = 4096u64;
    write_source(&image, pages as usize, 31, 4, 0..0);
    // Four pages of one 16-page block in 8 (zero pages among them), in a scattered order.
    let mut set: Vec<u64> = (0..pages)
        .filter(|p| p % 16 < 4 && (p / 16) % 8 == 3)
        .collect();
    set.sort_by_key(|p| (p * 7919) % pages);
    let ws_path = dir.path("vm.ws");
    common::working_set::WorkingSet {
        page_size: PAGE as u32,
        total_pages: pages,
        image_id: 0,
        pages: set.clone(),
    }
    .write(&ws_path)
    .expect("write the working set");
    run_ok(&mut server.pagesrv(&[
        "store",
        "put",
        image.to_str().unwrap(),
        &server.url("tpl"),
        "--working-set",
        ws_path.to_str().unwrap(),
    ]));
    let manifest = stored_manifest(&server, "tpl");
    assert_eq!(
        manifest.working_set,
        set.iter().map(|&p| p as u32).collect::<Vec<_>>()
    );
    let place = |page: u64| match manifest.pages[page as usize] {
        PageRef::Stored { frame, slot } => {
            let at = &manifest.frames[frame as usize];
            Some((at.pack, at.frame.offset, slot))
        }
        PageRef::Zero => None,
    };
    // The set's data pages fill the first frames, one after another in the set's order...
    let in_set: Vec<_> = set.iter().filter_map(|&p| place(p)).collect();
    assert_eq!(
        in_set.len(),
        96,
        "the set's data pages (one in four is zero)"
    );
    assert!(
        in_set.windows(2).all(|w| w[0] < w[1]),
        "the set's pages are not stored in its order: {in_set:?}"
    );
    // ...before every other page: no frame holds both.
    let last_of_set = *in_set.last().expect("not empty");
    let others = (0..pages)
        .filter(|p| !set.contains(p))
        .filter_map(place)
        .min()
        .expect("other data pages");
    assert!(
        (others.0, others.1) > (last_of_set.0, last_of_set.1),
        "{others:?} {last_of_set:?}"
    );
    // The image restores whole, the set prefetched first.
    let (pagesrv, addr) = serve_cached(&server, &server.url("tpl"), &dir, None);
    restore(&dir, "restore", &addr, &image);
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 1, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert!(err.contains("the working set is in the cache"), "{err}");
    assert_eq!(err.matches("completed (verified)").count(), 1, "{err}");
}

#[test]
fn test_clones_of_one_stored_snapshot_restore_at_once_fetching_each_frame_once() {
    if !require_weed() || !tests::require_userfaultfd() {
        return;
    }
    let server = S3Server::start("clones");
    let dir = Scratch::new("store-clones");
    let image = dir.path("tpl.mem");
    // 3072 distinct data pages (every 4th page zero): 192 frames of 16.
    write_source(&image, 4096, 23, 4, 0..0);
    run_ok(&mut server.pagesrv(&["store", "put", image.to_str().unwrap(), &server.url("tpl")]));
    // One name, three destinations at once: each its own session of the template.
    let (pagesrv, addr) = serve_cached(&server, &format!("tpl={}", server.url("tpl")), &dir, None);
    std::thread::scope(|s| {
        for clone in ["c1", "c2", "c3"] {
            let (dir, addr, image) = (&dir, &addr, &image);
            s.spawn(move || restore_vm(dir, clone, addr, image, &["--vm", "tpl"]));
        }
    });
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 3, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 3, "{err}");
    // Three sessions, not one resumed: each restore had a session id of its own.
    let mut sessions: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("destination connected") && l.contains("urgent"))
        .filter_map(|l| l.split("session=").nth(1)?.split_whitespace().next())
        .collect();
    sessions.sort_unstable();
    sessions.dedup();
    assert_eq!(sessions.len(), 3, "{err}");
    let last = err
        .lines()
        .rfind(|l| l.contains("frames fetched"))
        .unwrap_or_else(|| panic!("no cache line: {err}"));
    assert_eq!(
        number_before(last, " frames fetched"),
        192,
        "each frame once: {last}"
    );
}

#[test]
fn test_a_memory_file_template_is_restored_by_two_destinations_at_once() {
    if !tests::require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("file-template");
    let image = dir.path("tpl.mem");
    write_source(&image, 4096, 29, 4, 0..0);
    let (pagesrv, addr) = tests::start_pagesrv(&image, &["--template"]);
    std::thread::scope(|s| {
        for clone in ["d1", "d2"] {
            let (dir, addr, image) = (&dir, &addr, &image);
            s.spawn(move || restore(dir, clone, addr, image));
        }
    });
    // Both done, pagesrv still serves (a template never finishes): a third restore.
    restore(&dir, "d3", &addr, &image);
    // pagesrv writes a restore's totals once its session ended, after faultd was answered.
    pagesrv.wait_for_stderr("completed (", 3, LIMIT);
    let err = pagesrv.kill_and_collect();
    assert_eq!(err.matches("completed (verified)").count(), 3, "{err}");
}
