//! One pagesrv serving several VMs at once: each destination names its VM; one VM's session
//! breaking leaves the others' untouched; pagesrv ends when every VM's migration has.

use std::ffi::OsString;
use std::time::Duration;

use tests::*;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn test_three_vms_at_once_one_link_cut_the_others_unharmed() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("multi-vm");
    let pages = 128 << 20 >> 12;
    let names = ["alpha", "beta", "gamma"];
    let mut args: Vec<OsString> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        // Different contents: a destination served another VM's pages fails its digests.
        write_source(&dir.path(name), pages, 0xA11 + i as u64, 4, 0..0);
        args.push("--vm-mem".into());
        args.push(format!("{name}={}", dir.path(name).display()).into());
    }
    let (mut pagesrv, addr) = start_pagesrv_with(&args);
    // gamma's link is cut twice; alpha and beta go straight to pagesrv.
    let (mut proxy, proxy_addr) =
        start_proxy(&addr, &["--cuts", "2", "--min-mib", "4", "--max-mib", "16"]);
    let mut running = Vec::new();
    for name in names {
        let (uds, stats) = (
            dir.path(&format!("{name}.sock")),
            dir.path(&format!("{name}.json")),
        );
        let target = if name == "gamma" { &proxy_addr } else { &addr };
        let faultd = start_faultd_with(target, &uds, &stats, &["--vm", name]);
        let vmm = start_vmm(&uds, &dir.path(name), &["--threads", "2"]);
        running.push((name, vmm, faultd, stats));
    }
    for (name, vmm, faultd, stats) in &mut running {
        let (status, vmm_err) = vmm.wait(LIMIT);
        let report = json(&vmm.rest_of_stdout());
        let (faultd_status, faultd_err) = faultd.wait(LIMIT);
        assert!(
            status.success(),
            "{name}: {report}\n{vmm_err}\n{faultd_err}"
        );
        assert!(faultd_status.success(), "{name}: {faultd_err}");
        assert_eq!(report["mismatches_during"], 0, "{name}: {report}");
        assert_eq!(report["mismatches_after"], 0, "{name}: {report}");
        let stats = json(&std::fs::read_to_string(&stats).expect("stats written"));
        assert_eq!(stats["digest_check"], "match", "{name}: {stats}");
        assert_eq!(
            stats["received_digest"],
            source_digest(&dir.path(name)).as_str(),
            "{name} got its own VM's pages"
        );
        let reconnects = stats["reconnects"].as_u64().unwrap();
        if *name == "gamma" {
            assert!(reconnects >= 2, "{stats}");
        } else {
            assert_eq!(reconnects, 0, "{name}'s link was never cut: {stats}");
        }
    }
    assert_eq!(proxy.read_line(), "cut 1");
    assert_eq!(proxy.read_line(), "cut 2");
    // Every VM done: pagesrv ends by itself, with a line per VM.
    let (status, err) = pagesrv.wait(LIMIT);
    assert!(status.success(), "{err}");
    for (name, sessions) in [("alpha", "1 session(s)"), ("beta", "1 session(s)")] {
        let line = format!("VM {name}: completed (verified), {sessions}");
        assert!(err.contains(&line), "{line} missing in\n{err}");
    }
    assert!(
        err.contains("VM gamma: completed (verified), 3 session(s)"),
        "gamma resumed after each cut: {err}"
    );
    let aborted = |vm: &str| {
        err.lines()
            .filter(|l| l.contains(&format!("vm {vm}, id")) && l.contains("aborted"))
            .count()
    };
    assert_eq!(aborted("gamma"), 2, "{err}");
    // The first cut came early in gamma's 128 MiB, while the others still ran: they went on.
    let position = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("{needle}: {err}"))
    };
    let first_cut = position("aborted");
    assert!(first_cut < position("completed: vm alpha"), "{err}");
    assert!(first_cut < position("completed: vm beta"), "{err}");
    assert_eq!(aborted("alpha") + aborted("beta"), 0, "{err}");
}

#[test]
fn test_one_vm_failing_leaves_the_other_and_pagesrv_names_it() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("multi-vm-fail");
    // Page 6001 (a data page) is corrupted in flight: it exists in "bad" only.
    write_source(&dir.path("good"), 4096, 1, 4, 0..0);
    write_source(&dir.path("bad"), 8192, 2, 4, 0..0);
    let args: Vec<OsString> = vec![
        "--vm-mem".into(),
        dir.path("good").into(),
        "--vm-mem".into(),
        dir.path("bad").into(),
        "--corrupt-page".into(),
        "6001".into(),
    ];
    let (mut pagesrv, addr) = start_pagesrv_with(&args);
    let mut destinations = Vec::new();
    for name in ["bad", "good"] {
        let (uds, stats) = (
            dir.path(&format!("{name}.sock")),
            dir.path(&format!("{name}.json")),
        );
        let faultd = start_faultd_with(&addr, &uds, &stats, &["--vm", name]);
        let vmm = start_vmm(&uds, &dir.path(name), &["--no-touch"]);
        destinations.push((name, faultd, vmm, stats));
    }
    for (name, faultd, _vmm, stats) in &mut destinations {
        let (status, err) = faultd.wait(LIMIT);
        let stats = json(&std::fs::read_to_string(&stats).expect("stats written"));
        if *name == "bad" {
            assert_eq!(status.code(), Some(1), "{err}");
            assert_eq!(stats["digest_check"], "mismatch", "{stats}");
        } else {
            assert!(status.success(), "{err}");
            assert_eq!(stats["digest_check"], "match", "{stats}");
        }
    }
    let (status, err) = pagesrv.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("VM good: completed (verified), 1 session(s)"),
        "{err}"
    );
    assert!(err.contains("VM bad: FAILED"), "{err}");
    let verdict = err
        .lines()
        .find(|l| l.contains("the migration failed: VM bad:"))
        .unwrap_or_else(|| panic!("no verdict naming VM bad: {err}"));
    assert!(
        !verdict.contains("good"),
        "only the VM that failed: {verdict}"
    );
    assert!(err.contains("keep the source VM"), "{err}");
}

#[test]
fn test_a_destination_must_name_a_vm_pagesrv_serves() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("multi-vm-names");
    let mut args: Vec<OsString> = Vec::new();
    for name in ["one", "two"] {
        write_source(&dir.path(name), 64, 7, 4, 0..0);
        args.push("--vm-mem".into());
        args.push(dir.path(name).into());
    }
    let (mut pagesrv, addr) = start_pagesrv_with(&args);
    for (vm_args, expected) in [
        (&[][..], "this pagesrv serves 2 VMs (one, two): name one"),
        (
            &["--vm", "three"][..],
            "no VM named \"three\" here (serving one, two)",
        ),
    ] {
        let (uds, stats) = (dir.path("d.sock"), dir.path("d.json"));
        let mut faultd = start_faultd_with(&addr, &uds, &stats, vm_args);
        let _vmm = start_vmm(&uds, &dir.path("one"), &["--no-touch"]);
        let (status, err) = faultd.wait(LIMIT);
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{expected} missing in\n{err}");
    }
    // A name that could never be served is a usage error.
    let out = std::process::Command::new(bin("faultd"))
        .args(tests::key_args::<&str>(&[]))
        .args(["--connect", &addr, "--uds"])
        .arg(dir.path("x.sock"))
        .args(["--vm", "a/b"])
        .output()
        .expect("run faultd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VM name"));
    // pagesrv refused them and serves on: VM two migrates.
    assert!(pagesrv.is_running());
    let (uds, stats) = (dir.path("two.sock"), dir.path("two.json"));
    let mut faultd = start_faultd_with(&addr, &uds, &stats, &["--vm", "two"]);
    let mut vmm = start_vmm(&uds, &dir.path("two"), &[]);
    let (status, err) = vmm.wait(LIMIT);
    assert!(status.success(), "{err}");
    let (status, err) = faultd.wait(LIMIT);
    assert!(status.success(), "{err}");
    let stats = json(&std::fs::read_to_string(&stats).unwrap());
    assert_eq!(
        stats["received_digest"],
        source_digest(&dir.path("two")).as_str()
    );
    // One of two VMs done: pagesrv still waits for the other.
    std::thread::sleep(Duration::from_millis(300));
    assert!(pagesrv.is_running(), "VM one has not migrated yet");
}

#[test]
fn test_pagesrv_refuses_two_vms_under_one_name_and_an_empty_dir() {
    let dir = Scratch::new("multi-vm-bad");
    std::fs::create_dir_all(dir.path("a")).unwrap();
    std::fs::create_dir_all(dir.path("b")).unwrap();
    std::fs::create_dir_all(dir.path("empty")).unwrap();
    for sub in ["a", "b"] {
        write_source(&dir.path(&format!("{sub}/vm")), 16, 1, 0, 0..0);
    }
    let run = |args: &[OsString]| {
        std::process::Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run pagesrv")
    };
    let out = run(&[
        "--vm-mem".into(),
        dir.path("a/vm").into(),
        "--vm-mem".into(),
        dir.path("b/vm").into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("two VMs are named \"vm\""), "{err}");
    let out = run(&["--vm-dir".into(), dir.path("empty").into()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no memory file"), "{err}");
    // --vm-dir serves each file under its name.
    let mut p = Proc::spawn(
        "pagesrv",
        std::process::Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .args(["--listen", "127.0.0.1:0", "--vm-dir"])
            .arg(dir.path("a")),
    );
    assert!(p.read_line().starts_with("pagesrv listening on "));
    let err = p.kill_and_collect();
    assert!(err.contains("vm=vm"), "{err}");
}

#[test]
fn test_a_directory_of_more_than_eight_vms_is_served() {
    // Each VM's mapping has its own guard against a shrinking file: more than the 8 there
    // used to be room for.
    let dir = Scratch::new("many-vms");
    std::fs::create_dir_all(dir.path("vms")).unwrap();
    for i in 0..12 {
        write_source(&dir.path(&format!("vms/vm{i}")), 16, i, 0, 0..0);
    }
    let mut p = Proc::spawn(
        "pagesrv",
        std::process::Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .args(["--listen", "127.0.0.1:0", "--vm-dir"])
            .arg(dir.path("vms")),
    );
    let line = p.read_line();
    let err = p.kill_and_collect();
    assert!(line.starts_with("pagesrv listening on "), "{line}\n{err}");
    assert_eq!(err.matches("serving memory").count(), 12, "{err}");
}
