//! Handing the running guest over: to pagesrv for precopy rounds (hybrid, precopy), or
//! paused for postcopy; then following the destination VMM until every page is present.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::summary::{event_is, t_us};
use super::vmm::Vmm;
use super::{MigrateArgs, Paths, STEP_LIMIT, progress, write_base_image};
use crate::procs::{Guard, first_line, sibling, start_faultd, start_pagesrv};

/// What the handover left running.
pub(super) struct Handover {
    pub(super) pagesrv: Guard,
    pub(super) faultd: Guard,
    pub(super) dest: Vmm,
    /// The source VMM's `migrating` (precopy first) or `paused` event.
    pub(super) start: Value,
    pub(super) paused: Value,
    /// pagesrv's control events, as they come (precopy first).
    pub(super) pagesrv_events: Option<mpsc::Receiver<Value>>,
    /// The proxy that cuts the link once (`--cut-after-mib`).
    pub(super) _cut_proxy: Option<Guard>,
}

/// With `--cut-after-mib N`: faultd reaches pagesrv through `cut-proxy` (the tests' proxy,
/// built beside bench by `cargo build --workspace --bins`), which cuts every connection once,
/// when N MiB went from pagesrv to faultd; returns the address faultd connects to, and the
/// proxy.
fn cut_line(after_mib: Option<u64>, pagesrv: &str) -> Result<(String, Option<Guard>)> {
    let Some(mib) = after_mib else {
        return Ok((pagesrv.to_owned(), None));
    };
    let mib = mib.to_string();
    let mut cmd = Command::new(sibling("cut-proxy")?);
    cmd.args(["--target", pagesrv, "--cuts", "1", "--mode", "cut"])
        .args(["--min-mib", &mib, "--max-mib", &mib])
        .stdout(Stdio::piped());
    let mut proxy = Guard::new(cmd.spawn().context("cannot start cut-proxy")?);
    let line = first_line(&mut proxy.0)?;
    let addr = line
        .strip_prefix("proxy listening on ")
        .context("cut-proxy did not start")?
        .to_owned();
    Ok((addr, Some(proxy)))
}

/// Precopy first: pagesrv takes the running guest's RAM from the source VMM and runs the
/// rounds; the destination VMM waits for faultd's `switched`.
pub(super) fn hand_over_precopy(
    args: &MigrateArgs,
    paths: &Paths,
    source: &mut Vmm,
    dest_cmd: &mut Command,
    (strategy, mem): (&str, &Path),
    faultd_args: &[String],
    base: Option<(&Path, u8)>,
) -> Result<Handover> {
    // The destination is prepared before the migration starts, as for QEMU's `-incoming`
    // with `-mem-prealloc`: its RAM is allocated while the guest runs on the source.
    let dest = Vmm::spawn(
        dest_cmd
            .arg("--wait-switch")
            .arg(&paths.faultd_ctl)
            .arg("--prealloc"),
    );
    let mut dest = dest?;
    let allocated = dest.next(STEP_LIMIT)?;
    ensure!(
        event_is(&allocated, "allocated"),
        "the destination VMM did not allocate its RAM: {allocated}"
    );
    progress(&format!(
        "destination RAM allocated in {:.0} ms\n",
        allocated["ms"].as_f64().unwrap_or(0.0)
    ));
    if let Some((path, pct)) = base {
        // An older copy of the running guest, as it is when the migration starts.
        write_base_image(mem, path, pct)?;
    }
    let mut cmd = Command::new(sibling("pagesrv")?);
    cmd.arg("--vmm-uds")
        .arg(&paths.pagesrv_vmm_uds)
        .args(["--strategy", strategy])
        .args(["--max-downtime-ms", &args.max_downtime_ms.to_string()])
        .arg("--control")
        .arg(&paths.pagesrv_ctl)
        .args(["--listen", "127.0.0.1:0"])
        .args(crate::procs::key_args()?)
        .stdout(Stdio::piped());
    let mut pagesrv = Guard::new(cmd.spawn().context("cannot start pagesrv")?);
    let mut lines = BufReader::new(pagesrv.0.stdout.take().context("no stdout")?).lines();
    let mut line = || -> Result<String> { Ok(lines.next().context("pagesrv ended")??) };
    ensure!(
        line()?.starts_with("pagesrv waiting for the source VMM"),
        "pagesrv did not start"
    );
    source.send("migrate")?;
    let addr = line()?
        .strip_prefix("pagesrv listening on ")
        .context("pagesrv did not take the source VMM's RAM")?
        .to_owned();
    std::thread::spawn(move || lines.for_each(drop));
    let pagesrv_events = collect_events(&paths.pagesrv_ctl)?;
    let (addr, cut_proxy) = cut_line(args.cut_after_mib, &addr)?;
    let faultd_ctl = paths.faultd_ctl.to_str().context("path")?;
    let mut args: Vec<&str> = faultd_args.iter().map(String::as_str).collect();
    args.extend(["--control", faultd_ctl]);
    let faultd = start_faultd(&addr, &paths.faultd_uds, &paths.faultd_stats, &args, None)?;
    let mut start = None;
    let paused = loop {
        let e = source.next(STEP_LIMIT)?;
        if event_is(&e, "paused") {
            break e;
        }
        if event_is(&e, "migrating") {
            start = Some(e);
            progress("precopy: pagesrv sends the guest's pages while it runs\n");
        }
    };
    Ok(Handover {
        pagesrv,
        faultd,
        dest,
        start: start.context("the source VMM never handed over its RAM")?,
        paused,
        pagesrv_events: Some(pagesrv_events),
        _cut_proxy: cut_proxy,
    })
}

/// What a postcopy handover needs.
pub(super) struct Postcopy<'a> {
    pub(super) mem: &'a Path,
    pub(super) paths: &'a Paths,
    pub(super) faultd_args: &'a [String],
    /// `--base-similarity`: where to write the base image, and how similar.
    pub(super) base: Option<(&'a Path, u8)>,
    /// `--free-pct`: the free-page hints the source VMM writes at the pause.
    pub(super) free_hints: Option<&'a Path>,
    /// `--cut-after-mib`.
    pub(super) cut_after_mib: Option<u64>,
}

/// Postcopy: pause the source, serve its RAM file, resume the destination at once.
pub(super) fn hand_over_postcopy(
    h: &Postcopy<'_>,
    source: &mut Vmm,
    dest_cmd: &mut Command,
) -> Result<Handover> {
    let start_daemons = || -> Result<(Guard, Guard, Option<Guard>)> {
        let mut extra = Vec::new();
        if let Some(path) = h.free_hints {
            extra.extend(["--free-pages", path.to_str().context("path")?]);
        }
        let (pagesrv, addr) = start_pagesrv(h.mem, &extra, None)?;
        let (addr, cut_proxy) = cut_line(h.cut_after_mib, &addr)?;
        let args: Vec<&str> = h.faultd_args.iter().map(String::as_str).collect();
        let paths = h.paths;
        let faultd = start_faultd(&addr, &paths.faultd_uds, &paths.faultd_stats, &args, None)?;
        Ok((pagesrv, faultd, cut_proxy))
    };
    // The base image and the free-page hints exist only once the source paused.
    let daemons = if h.base.is_none() && h.free_hints.is_none() {
        Some(start_daemons()?)
    } else {
        None
    };
    source.send("pause")?;
    let mut paused = loop {
        let e = source.next(STEP_LIMIT)?;
        if event_is(&e, "paused") {
            break e;
        }
    };
    let (pagesrv, faultd, cut_proxy) = match (daemons, h.base) {
        (Some(daemons), _) => daemons,
        (None, base) => {
            // The base is like the RAM as it paused; writing it is not part of the
            // migration (the destination holds it already), nor is starting the daemons
            // (they would be up before a real pause), so the clock starts after them.
            if let Some((path, pct)) = base {
                write_base_image(h.mem, path, pct)?;
            }
            let daemons = start_daemons()?;
            paused["t_us"] = json!(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_micros() as u64
            );
            daemons
        }
    };
    let dest = Vmm::spawn(dest_cmd)?;
    Ok(Handover {
        pagesrv,
        faultd,
        dest,
        start: paused.clone(),
        paused,
        pagesrv_events: None,
        _cut_proxy: cut_proxy,
    })
}

/// The destination's `resumed`, the guest's reports until its VMM said `complete`, and
/// those for `after_ms` after.
pub(super) fn follow_destination(
    dest: &mut Vmm,
    after_ms: u64,
) -> Result<(Value, Vec<Value>, Vec<Value>)> {
    let resumed = dest.next(STEP_LIMIT)?;
    ensure!(
        event_is(&resumed, "resumed"),
        "unexpected first event from the destination: {resumed}"
    );
    let mut during = Vec::new();
    let complete = loop {
        let e = dest.next(STEP_LIMIT)?;
        if event_is(&e, "complete") {
            break e;
        }
        during.push(e);
    };
    let mut after = Vec::new();
    loop {
        let e = dest.next(STEP_LIMIT)?;
        let done = t_us(&e) >= t_us(&complete) + after_ms * 1000;
        after.push(e);
        if done {
            return Ok((resumed, during, after));
        }
    }
}

/// Events from a daemon's control socket, on a channel, until it closes.
pub(super) fn collect_events(path: &Path) -> Result<mpsc::Receiver<Value>> {
    let mut client = common::control::ControlClient::connect(path)
        .with_context(|| format!("cannot reach {}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = client.next_line() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
