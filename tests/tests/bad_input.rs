//! Bad input from a VMM or a mismatched source: a clear error, a non-zero exit, no hang.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn test_malformed_handshake_is_reported_and_faultd_exits() {
    let dir = Scratch::new("badhs");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 16, 1, 0, 0..0);
    let (_pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = UnixStream::connect(&uds).expect("connect to faultd");
    vmm.write_all(b"[{\"base_host_virt_addr\": oops")
        .expect("send garbage");
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("malformed VMM handshake"), "{stderr}");
    assert!(stderr.contains("not a JSON region list"), "{stderr}");
    assert!(!stats.exists());
}

#[test]
fn test_handshake_without_uffd_is_rejected() {
    let dir = Scratch::new("nofd");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 16, 1, 0, 0..0);
    let (_pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = UnixStream::connect(&uds).expect("connect to faultd");
    vmm.write_all(br#"[{"base_host_virt_addr":4096,"size":65536,"offset":0,"page_size":4096}]"#)
        .expect("send handshake");
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no userfaultfd attached"), "{stderr}");
}

#[test]
fn test_layout_that_does_not_match_the_source_is_refused() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("mismatch");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 256, 1, 0, 0..0);
    let (mut pagesrv, addr) = start_pagesrv(&mem, &["--serve-forever"]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let _vmm = start_vmm(
        &uds,
        &mem,
        &["--no-touch", "--ram-bytes", &(128 * PAGE).to_string()],
    );
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pagesrv refused the session (LayoutMismatch)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("128 pages") && stderr.contains("256 pages"),
        "{stderr}"
    );
    // pagesrv survives a refused destination.
    assert!(pagesrv.is_running());
}

#[test]
fn test_pagesrv_rejects_a_file_that_is_not_whole_pages() {
    let dir = Scratch::new("badsize");
    let mem = dir.path("vm.mem");
    std::fs::write(&mem, vec![1u8; PAGE + 1]).unwrap();
    let mut p = Proc::spawn(
        "pagesrv",
        std::process::Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .arg("--vm-mem")
            .arg(&mem)
            .args(["--listen", "127.0.0.1:0"]),
    );
    let (status, stderr) = p.wait(LIMIT);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("not a whole number of 4096-byte pages"),
        "{stderr}"
    );
}

#[test]
fn test_overlapping_regions_are_refused_before_any_page_moves() {
    let dir = Scratch::new("overlap");
    let (mem, uds, stats) = (
        dir.path("vm.mem"),
        dir.path("faultd.sock"),
        dir.path("stats.json"),
    );
    write_source(&mem, 32, 1, 0, 0..0);
    let (pagesrv, addr) = start_pagesrv(&mem, &[]);
    let mut faultd = start_faultd(&addr, &uds, &stats);
    let mut vmm = UnixStream::connect(&uds).expect("connect to faultd");
    vmm.write_all(
        br#"[{"base_host_virt_addr":65536,"size":65536,"offset":0,"page_size":4096},
             {"base_host_virt_addr":98304,"size":65536,"offset":65536,"page_size":4096}]"#,
    )
    .expect("send handshake");
    let (status, stderr) = faultd.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("regions 0 and 1 overlap"), "{stderr}");
    let pagesrv_err = pagesrv.kill_and_collect();
    assert!(
        !pagesrv_err.contains("destination connected"),
        "{pagesrv_err}"
    );
}
