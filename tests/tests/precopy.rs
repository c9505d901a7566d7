//! Precopy and hybrid migrations from a running source: test-source (a source VMM that knows
//! every page it writes, and writes the final RAM to a file when paused) hands its RAM to
//! `pagesrv --vmm-uds`; faultd places the rounds in test-vmm's memfd; test-vmm waits for the
//! switch, then checks every byte against the final RAM.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::control::ControlClient;
use serde_json::{Value, json};
use tests::*;

/// 64 MiB of guest RAM.
const PAGES: u64 = 16384;
/// The guest's writes per second: several rounds, each dropping pages at the destination.
const WRITE_RATE: &str = "20000";

/// A migration under way.
struct Run {
    /// Holds the files until the run ends.
    _dir: Scratch,
    final_ram: PathBuf,
    stats: PathBuf,
    source: Proc,
    pagesrv: Proc,
    /// pagesrv's control events, as they come.
    events: mpsc::Receiver<Value>,
    faultd: Proc,
    vmm: Proc,
    proxy: Option<Proc>,
}

/// What a run starts with besides the strategy.
#[derive(Default)]
struct Options<'a> {
    pagesrv_args: &'a [&'a str],
    /// Through a cut-proxy with these arguments.
    proxy_args: Option<&'a [&'a str]>,
    /// Sent on pagesrv's control socket before faultd starts (before any round).
    command: Option<Value>,
    /// More arguments for test-source.
    source_args: &'a [&'a str],
    /// The destination resumes at once (postcopy: no switch to wait for).
    no_switch: bool,
}

/// Starts test-source, pagesrv (`--strategy strategy`), faultd and test-vmm.
fn start(tag: &str, strategy: &str, options: Options<'_>) -> Run {
    let Options {
        pagesrv_args,
        proxy_args,
        command,
        source_args,
        no_switch,
    } = options;
    let dir = Scratch::new(tag);
    let (final_ram, stats, uds) = (
        dir.path("final.mem"),
        dir.path("stats.json"),
        dir.path("faultd.sock"),
    );
    let (src_uds, pagesrv_ctl, faultd_ctl) = (
        dir.path("source.sock"),
        dir.path("pagesrv.ctl"),
        dir.path("faultd.ctl"),
    );
    // test-vmm opens it at once; test-source fills it in when it pauses.
    std::fs::File::create(&final_ram)
        .and_then(|f| f.set_len(PAGES * 4096))
        .expect("create the final RAM file");
    let mut pagesrv = Proc::spawn(
        "pagesrv",
        Command::new(bin("pagesrv"))
            .args(tests::key_args::<&str>(&[]))
            .arg("--vmm-uds")
            .arg(&src_uds)
            .args(["--strategy", strategy, "--listen", "127.0.0.1:0"])
            .arg("--control")
            .arg(&pagesrv_ctl)
            .args(pagesrv_args),
    );
    let line = pagesrv.read_line();
    assert!(
        line.starts_with("pagesrv waiting for the source VMM"),
        "{line}"
    );
    let source = Proc::spawn(
        "test-source",
        Command::new(bin("test-source"))
            .arg("--pagesrv-uds")
            .arg(&src_uds)
            .args(["--pages", &PAGES.to_string(), "--write-rate", WRITE_RATE])
            .arg("--final")
            .arg(&final_ram)
            .args(source_args),
    );
    let line = pagesrv.read_line();
    let addr = line
        .strip_prefix("pagesrv listening on ")
        .unwrap_or_else(|| panic!("pagesrv did not take the source's RAM: {line}"))
        .to_owned();
    let mut control = ControlClient::connect(&pagesrv_ctl).expect("pagesrv's control socket");
    if let Some(command) = command {
        control.send(&command).expect("send the command");
        let answer = control
            .wait_for(|v| v.get("ok").is_some() || v.get("error").is_some())
            .expect("read the answer")
            .expect("an answer");
        assert!(answer.get("ok").is_some(), "{command} → {answer}");
    }
    let mut listener = ControlClient::connect(&pagesrv_ctl).expect("pagesrv's control socket");
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = listener.next_line() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let mut proxy = proxy_args.map(|args| {
        Proc::spawn(
            "cut-proxy",
            Command::new(bin("cut-proxy"))
                .args(["--target", &addr])
                .args(args),
        )
    });
    let upstream = match &mut proxy {
        Some(p) => p
            .read_line()
            .strip_prefix("proxy listening on ")
            .expect("proxy started")
            .to_owned(),
        None => addr,
    };
    let faultd = start_faultd_with(
        &upstream,
        &uds,
        &stats,
        &[
            "--placement",
            "memfd",
            "--control",
            faultd_ctl.to_str().expect("path"),
        ],
    );
    let wait_switch = ["--wait-switch", faultd_ctl.to_str().expect("path")];
    let vmm_args = [
        &["--memfd", "--threads", "2"][..],
        if no_switch { &[] } else { &wait_switch },
    ]
    .concat();
    let vmm = start_vmm(&uds, &final_ram, &vmm_args);
    Run {
        _dir: dir,
        final_ram,
        stats,
        source,
        pagesrv,
        events,
        faultd,
        vmm,
        proxy,
    }
}

impl Run {
    /// Waits for the migration to end and checks it (every byte, the digests); returns
    /// faultd's stats and pagesrv's control events.
    fn finish(mut self, what: &str) -> (Value, Vec<Value>) {
        let done = finish_migration(
            what,
            &mut self.vmm,
            &mut self.faultd,
            &mut self.pagesrv,
            &self.stats,
        );
        // What the destination holds is the RAM as the source paused.
        assert_eq!(
            done.stats["received_digest"],
            source_digest(&self.final_ram).as_str(),
            "{what}: {}",
            done.stats
        );
        // The source VMM heard how it ended (after the verdict, not at the pause).
        let outcome = self.source.read_event_until(|e| e["event"] == "outcome");
        assert_eq!(outcome["outcome"], "completed", "{what}: {outcome}");
        assert_eq!(outcome["verified"], true, "{what}: {outcome}");
        self.source.close_stdin();
        let (status, err) = self.source.wait(Duration::from_secs(30));
        assert!(status.success(), "{what}: test-source: {err}");
        if let Some(proxy) = self.proxy.take() {
            proxy.kill_and_collect();
        }
        let events = self.events.try_iter().collect();
        (done.stats, events)
    }
}

fn converged_by(events: &[Value]) -> Value {
    events
        .iter()
        .find(|e| e["event"] == "converged")
        .map_or(Value::Null, |e| e["by"].clone())
}

fn rounds(events: &[Value]) -> usize {
    events.iter().filter(|e| e["event"] == "round").count()
}

#[test]
fn test_hybrid_pages_written_after_they_were_sent_arrive_with_their_new_contents() {
    if !require_userfaultfd() {
        return;
    }
    let (stats, events) = start("hybrid", "hybrid", Options::default()).finish("hybrid");
    // Pages went stale at the destination (written after they were sent) and were dropped;
    // test-vmm found each with the contents the source had when it paused.
    assert!(stats["pages_discarded"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["bytes_precopy"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["switched_ms"].as_f64().is_some(), "{stats}");
    assert!(rounds(&events) >= 1, "{events:?}");
    assert!(
        ["budget", "no-progress", "max-rounds"].contains(&converged_by(&events).as_str().unwrap()),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "switched"),
        "{events:?}"
    );
}

#[test]
fn test_precopy_resumes_the_guest_with_every_page() {
    if !require_userfaultfd() {
        return;
    }
    let (stats, events) = start("precopy", "precopy", Options::default()).finish("precopy");
    // Stop-and-copy: every page was there before the switch; nothing was fetched on demand.
    assert_eq!(stats["pages_requested"], 0, "{stats}");
    assert_eq!(stats["bytes_precopy"], stats["bytes_received"], "{stats}");
    assert!(stats["pages_discarded"].as_u64().unwrap() > 0, "{stats}");
    assert!(converged_by(&events).is_string(), "{events:?}");
}

#[test]
fn test_precopy_sends_every_page_even_without_the_background_push() {
    if !require_userfaultfd() {
        return;
    }
    // --no-push turns off the postcopy push only: the rounds and the stop-and-copy still
    // send every page (the guest resumes with all of them).
    let options = Options {
        pagesrv_args: &["--no-push"],
        ..Options::default()
    };
    let (stats, _) = start("precopy-nopush", "precopy", options).finish("precopy --no-push");
    assert_eq!(stats["pages_requested"], 0, "{stats}");
    assert_eq!(stats["bytes_precopy"], stats["bytes_received"], "{stats}");
}

#[test]
fn test_start_postcopy_forces_the_switch() {
    if !require_userfaultfd() {
        return;
    }
    // Asked before the first round begins, with a budget nothing can meet while the source
    // writes: only the command ends precopy after one round.
    let run = start(
        "forced",
        "hybrid",
        Options {
            pagesrv_args: &["--max-downtime-ms", "0"],
            command: Some(json!({"cmd": "start-postcopy"})),
            ..Options::default()
        },
    );
    let (stats, events) = run.finish("forced");
    assert_eq!(converged_by(&events), "forced", "{events:?}");
    assert_eq!(rounds(&events), 1, "{events:?}");
    assert!(stats["switched_ms"].as_f64().is_some(), "{stats}");
}

#[test]
fn test_a_cut_during_precopy_resumes_precopy() {
    if !require_userfaultfd() {
        return;
    }
    // One cut after 8–24 MiB: inside the first round (64 MiB).
    let proxy: &[&str] = &["--cuts", "1", "--min-mib", "8", "--max-mib", "24"];
    let options = Options {
        proxy_args: Some(proxy),
        ..Options::default()
    };
    let (stats, events) = start("precopy-cut", "hybrid", options).finish("cut");
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats}");
    // The rounds went on over the new link and the switch came after it.
    assert!(rounds(&events) >= 1, "{events:?}");
    assert!(stats["switched_ms"].as_f64().is_some(), "{stats}");
    assert!(stats["pages_discarded"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn test_a_cut_during_stop_and_copy_precopy_resumes_it() {
    if !require_userfaultfd() {
        return;
    }
    let proxy: &[&str] = &["--cuts", "1", "--min-mib", "8", "--max-mib", "24"];
    let options = Options {
        proxy_args: Some(proxy),
        ..Options::default()
    };
    let (stats, _) = start("precopy-cut-s", "precopy", options).finish("precopy cut");
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["pages_requested"], 0, "{stats}");
}

#[test]
fn test_a_cut_around_the_switch_loses_nothing() {
    if !require_userfaultfd() {
        return;
    }
    // One round (forced), then the switch: ≈ 49 MiB cross in the round (every 4th page is
    // zero, a marker), ≈ 6 MiB after it; the cut lands around the switch and the postcopy
    // of what went stale.
    let proxy: &[&str] = &["--cuts", "1", "--min-mib", "48", "--max-mib", "53"];
    let options = Options {
        proxy_args: Some(proxy),
        command: Some(json!({"cmd": "start-postcopy"})),
        ..Options::default()
    };
    let (stats, events) = start("switch-cut", "hybrid", options).finish("switch cut");
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(converged_by(&events), "forced", "{events:?}");
}

#[test]
fn test_free_pages_the_source_vmm_names_at_the_pause_read_zero() {
    if !require_userfaultfd() {
        return;
    }
    // Every third page starts free in the guest (old bytes): pagesrv takes the free list
    // before each round and sends them as zero; meanwhile the writer hands thousands of them
    // out and writes them (after the hint that said free: the dirty bitmap must win, and they
    // must arrive with their contents); the final list at the pause says what must read zero.
    let options = Options {
        source_args: &["--free-every", "3"],
        ..Options::default()
    };
    let (stats, _) = start("precopy-free", "hybrid", options).finish("free");
    // finish() compared every page with the final RAM (free pages zero) and the digests.
    assert!(stats["pages_discarded"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn test_a_failed_migration_tells_the_source_vmm_which_resumes_its_guest() {
    if !require_userfaultfd() {
        return;
    }
    // A page corrupted on its way after the switch: the destination's digests differ, it
    // fails, pagesrv exits 1 and tells the source VMM `failed`; the source resumes.
    let options = Options {
        pagesrv_args: &["--corrupt-page", "5"],
        ..Options::default()
    };
    let mut run = start("failed-outcome", "hybrid", options);
    let (status, err) = run.faultd.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(1), "{err}");
    let (status, err) = run.pagesrv.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(1), "{err}");
    let outcome = run.source.read_event_until(|e| e["event"] == "outcome");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    run.source.read_event_until(|e| e["event"] == "resumed");
    run.source.close_stdin();
    let (status, err) = run.source.wait(Duration::from_secs(30));
    assert!(status.success(), "test-source: {err}");
}

#[test]
fn test_postcopy_from_a_running_source_keeps_the_link_until_the_outcome() {
    if !require_userfaultfd() {
        return;
    }
    // --strategy postcopy pauses the source at once; the link stays until the verdict (it
    // used to close right after the pause, before a page moved).
    let options = Options {
        no_switch: true,
        ..Options::default()
    };
    let run = start("postcopy-link", "postcopy", options);
    let (stats, _) = run.finish("postcopy from a running source");
    assert_eq!(stats["bytes_precopy"], 0, "{stats}");
}

/// Two running VMs migrate at once through one pagesrv (`--vmm-uds a=... --vmm-uds b=...`),
/// hybrid: each has its own rounds, its own switch and its own outcome; both end with every
/// byte right.
#[test]
fn test_two_running_vms_migrate_at_once_through_one_pagesrv() {
    if !require_userfaultfd() {
        return;
    }
    let dir = Scratch::new("precopy-two-vms");
    let names = ["a", "b"];
    let path = |vm: &str, what: &str| dir.path(&format!("{vm}-{what}"));
    for vm in names {
        std::fs::File::create(path(vm, "final.mem"))
            .and_then(|f| f.set_len(PAGES * 4096))
            .expect("create the final RAM file");
    }
    let pagesrv_ctl = dir.path("pagesrv.ctl");
    let mut cmd = Command::new(bin("pagesrv"));
    cmd.args(tests::key_args::<&str>(&[]))
        .args(["--strategy", "hybrid", "--listen", "127.0.0.1:0"])
        .arg("--control")
        .arg(&pagesrv_ctl);
    for vm in names {
        cmd.arg("--vmm-uds").arg(format!(
            "{vm}={}",
            path(vm, "source.sock").to_str().expect("path")
        ));
    }
    let mut pagesrv = Proc::spawn("pagesrv", &mut cmd);
    for _ in names {
        let line = pagesrv.read_line();
        assert!(
            line.starts_with("pagesrv waiting for the source VMM"),
            "{line}"
        );
    }
    let mut sources: Vec<Proc> = names
        .iter()
        .map(|vm| {
            Proc::spawn(
                "test-source",
                Command::new(bin("test-source"))
                    .arg("--pagesrv-uds")
                    .arg(path(vm, "source.sock"))
                    .args(["--pages", &PAGES.to_string(), "--write-rate", WRITE_RATE])
                    .arg("--final")
                    .arg(path(vm, "final.mem")),
            )
        })
        .collect();
    let line = pagesrv.read_line();
    let addr = line
        .strip_prefix("pagesrv listening on ")
        .unwrap_or_else(|| panic!("pagesrv did not take the sources' RAM: {line}"))
        .to_owned();
    let mut status = ControlClient::connect(&pagesrv_ctl).expect("pagesrv's control socket");
    status.send(&json!({"cmd": "status"})).expect("ask");
    let answer = status
        .wait_for(|v| v.get("status").is_some())
        .expect("read")
        .expect("an answer");
    assert_eq!(answer["status"]["a"]["strategy"], "hybrid", "{answer}");
    assert_eq!(answer["status"]["b"]["strategy"], "hybrid", "{answer}");
    let mut pairs: Vec<(Proc, Proc)> = names
        .iter()
        .map(|vm| {
            let ctl = path(vm, "faultd.ctl");
            let ctl = ctl.to_str().expect("path");
            let faultd = start_faultd_with(
                &addr,
                &path(vm, "faultd.sock"),
                &path(vm, "stats.json"),
                &["--placement", "memfd", "--control", ctl, "--vm", vm],
            );
            let vmm = start_vmm(
                &path(vm, "faultd.sock"),
                &path(vm, "final.mem"),
                &["--memfd", "--threads", "2", "--wait-switch", ctl],
            );
            (faultd, vmm)
        })
        .collect();
    for (vm, (faultd, vmm)) in names.iter().zip(&mut pairs) {
        let (status, err) = vmm.wait(Duration::from_secs(120));
        let report = vmm.rest_of_stdout();
        assert!(status.success(), "VM {vm}: test-vmm: {report}\n{err}");
        let report = json(&report);
        assert_eq!(report["mismatches_after"], 0, "VM {vm}: {report}");
        let (status, err) = faultd.wait(Duration::from_secs(60));
        assert!(status.success(), "VM {vm}: faultd: {err}");
        let stats = json(&std::fs::read_to_string(path(vm, "stats.json")).expect("stats"));
        assert_eq!(stats["digest_check"], "match", "VM {vm}: {stats}");
        assert_eq!(
            stats["received_digest"],
            source_digest(&path(vm, "final.mem")).as_str(),
            "VM {vm}: {stats}"
        );
        assert!(
            stats["bytes_precopy"].as_u64().unwrap() > 0,
            "VM {vm}: {stats}"
        );
    }
    let (status, err) = pagesrv.wait(Duration::from_secs(60));
    assert!(status.success(), "pagesrv: {err}");
    for (vm, source) in names.iter().zip(&mut sources) {
        let outcome = source.read_event_until(|e| e["event"] == "outcome");
        assert_eq!(outcome["outcome"], "completed", "VM {vm}: {outcome}");
        assert_eq!(outcome["verified"], true, "VM {vm}: {outcome}");
        source.close_stdin();
        let (status, err) = source.wait(Duration::from_secs(30));
        assert!(status.success(), "VM {vm}: test-source: {err}");
    }
}
