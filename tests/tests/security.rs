//! With a key every frame after the handshake is sealed: a flipped bit, a replayed frame, a
//! frame from another connection and a truncated tag each end that connection, never place
//! a page, and the migration resumes on a new one with every byte right.

use std::process::Command;

use tests::*;

/// A keyed migration of 128 MiB through a proxy that tampers with the stream twice.
fn tampered_migration(mode: &str) -> Finished {
    let dir = Scratch::new(&format!("tamper-{mode}"));
    let (mem, uds, stats, key) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
        dir.path("key"),
    );
    write_source(&mem, 128 << 20 >> 12, 0x7A3, 4, 0..0);
    write_key(&key, "the tamper tests' shared secret");
    let key_args = ["--psk-file", key.to_str().unwrap()];
    let (mut pagesrv, addr) = start_pagesrv(&mem, &key_args);
    let mut proxy = Proc::spawn(
        "cut-proxy",
        Command::new(bin("cut-proxy")).args([
            "--target",
            &addr,
            "--mode",
            mode,
            "--cuts",
            "2",
            "--min-mib",
            "4",
            "--max-mib",
            "20",
        ]),
    );
    let proxy_addr = proxy
        .read_line()
        .strip_prefix("proxy listening on ")
        .expect("proxy started")
        .to_owned();
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &key_args);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    let done = finish_migration(mode, &mut vmm, &mut faultd, &mut pagesrv, &stats);
    assert_eq!(proxy.read_line(), format!("{mode} 1"));
    assert_eq!(proxy.read_line(), format!("{mode} 2"));
    // The tampered connection was dropped and the session resumed on a new one (the second
    // break may land on the dying first connection); the digest of every page placed equals
    // the file's: nothing tampered was placed.
    assert!(
        done.stats["reconnects"].as_u64().unwrap() >= 1,
        "{}",
        done.stats
    );
    assert_eq!(done.stats["received_digest"], source_digest(&mem).as_str());
    done
}

fn detected_by_tag(done: &Finished) {
    assert!(
        done.faultd_err.contains("failed authentication"),
        "{}",
        done.faultd_err
    );
}

/// Tampering that lands wherever the proxy's read ended: in a body or a tag the tag check
/// refuses the frame; in a header the decoder refuses the header first. Either way the
/// connection ends and nothing of it is placed (the digest check in `tampered_migration`).
fn detected_by_tag_or_decoder(done: &Finished) {
    assert!(
        done.faultd_err.contains("failed authentication")
            || done.faultd_err.contains("pagesrv sent a bad frame"),
        "{}",
        done.faultd_err
    );
}

#[test]
fn test_a_flipped_bit_ends_the_connection_and_places_nothing() {
    if !require_userfaultfd() {
        return;
    }
    // The flipped bit is in the middle of whatever the proxy read.
    detected_by_tag_or_decoder(&tampered_migration("flip"));
}

#[test]
fn test_a_replayed_frame_ends_the_connection_and_places_nothing() {
    if !require_userfaultfd() {
        return;
    }
    detected_by_tag(&tampered_migration("replay"));
}

#[test]
fn test_a_frame_from_another_connection_ends_the_connection_and_places_nothing() {
    if !require_userfaultfd() {
        return;
    }
    // The spliced bytes land wherever the proxy's read of the other connection ended.
    detected_by_tag_or_decoder(&tampered_migration("splice"));
}

#[test]
fn test_a_truncated_tag_ends_the_connection_and_places_nothing() {
    if !require_userfaultfd() {
        return;
    }
    let done = tampered_migration("truncate");
    assert!(
        done.faultd_err.contains("lost the link"),
        "{}",
        done.faultd_err
    );
}

/// Migrates 16 MiB through a proxy that records what crosses the path; returns the record
/// and a 64-byte piece of a data page.
fn observed_migration(key: bool) -> (Vec<u8>, Vec<u8>) {
    let dir = Scratch::new(if key {
        "observed-key"
    } else {
        "observed-plain"
    });
    let (mem, uds, stats, key_file, dump) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
        dir.path("key"),
        dir.path("wire"),
    );
    write_source(&mem, 4096, 0x0B5E, 4, 0..0);
    write_key(&key_file, "the observer test's shared secret");
    let key_args: Vec<&str> = if key {
        vec!["--psk-file", key_file.to_str().unwrap()]
    } else {
        vec!["--insecure-no-key"]
    };
    let (mut pagesrv, addr) = start_pagesrv(&mem, &key_args);
    let mut proxy = Proc::spawn(
        "cut-proxy",
        Command::new(bin("cut-proxy")).args([
            "--target",
            &addr,
            "--cuts",
            "0",
            "--dump",
            dump.to_str().unwrap(),
        ]),
    );
    let proxy_addr = proxy
        .read_line()
        .strip_prefix("proxy listening on ")
        .expect("proxy started")
        .to_owned();
    let mut faultd = start_faultd_with(&proxy_addr, &uds, &stats, &key_args);
    let mut vmm = start_vmm(&uds, &mem, &["--threads", "2"]);
    finish_migration("observed", &mut vmm, &mut faultd, &mut pagesrv, &stats);
    drop(proxy);
    let image = std::fs::read(&mem).unwrap();
    let piece = image[5 * PAGE + 1000..5 * PAGE + 1064].to_vec();
    (std::fs::read(&dump).unwrap(), piece)
}

#[test]
fn test_an_observer_on_the_path_sees_no_page_with_a_key() {
    if !require_userfaultfd() {
        return;
    }
    let (wire, piece) = observed_migration(false);
    assert!(
        wire.windows(piece.len()).any(|w| w == piece),
        "without a key the page travels in clear (the observer check works)"
    );
    let (wire, piece) = observed_migration(true);
    assert!(
        wire.len() > 8 << 20,
        "the record holds the migration: {} bytes",
        wire.len()
    );
    assert!(
        !wire.windows(piece.len()).any(|w| w == piece),
        "with a key no page content crosses the path in clear"
    );
}

#[test]
fn test_a_group_readable_key_file_is_refused() {
    let dir = Scratch::new("keymode");
    let (mem, key) = (dir.path("vm.mem"), dir.path("key"));
    write_source(&mem, 16, 1, 0, 0..0);
    std::fs::write(&key, "a key that others can read, sadly").unwrap();
    let mut p = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .arg("--vm-mem")
            .arg(&mem)
            .arg("--psk-file")
            .arg(&key)
            .args(["--listen", "127.0.0.1:0"]),
    );
    let (status, stderr) = p.wait(std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("readable by others"), "{stderr}");
    assert!(
        !stderr.contains("a key that others"),
        "the key never appears: {stderr}"
    );
    // --gen-psk makes a private key that both sides accept.
    let fresh = dir.path("fresh.key");
    let mut gen_key = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv")).arg("--gen-psk").arg(&fresh),
    );
    let (status, stderr) = gen_key.wait(std::time::Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    let text = std::fs::read_to_string(&fresh).unwrap();
    let (mut pagesrv, _) = start_pagesrv(&mem, &["--psk-file", fresh.to_str().unwrap()]);
    assert!(pagesrv.is_running());
    let pagesrv_err = pagesrv.kill_and_collect();
    assert!(
        !pagesrv_err.contains(text.trim()),
        "the key never appears in logs"
    );
}
