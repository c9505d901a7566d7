//! `bench latency --hugepages`: the same image served to a guest on 2 MiB hugetlb pages (as
//! Firecracker's huge-page guests are), against the 4 KiB guest in the same run: the latency
//! of a demand fault on a 2 MiB page, and the total time with the push on.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::latency::{LatencyArgs, Scenario, run_median};

/// The 2 MiB pool (the default huge page size may be another).
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// The pool size to give back if the bench is interrupted while pages are reserved.
static RESTORE: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);

/// Gives reserved huge pages back (the interrupt handler calls it before exiting).
pub fn give_back() {
    if let Some(old) = RESTORE.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::write(NR_HUGEPAGES, old.to_string());
    }
}

/// Huge pages reserved for the run, given back on drop.
pub(crate) struct Reserved {
    old: u64,
}

impl Reserved {
    /// Adds `n` pages to the 2 MiB pool.
    ///
    /// # Errors
    /// Not root, or the kernel gave fewer.
    pub(crate) fn pages(n: u64) -> Result<Reserved> {
        let read = || -> Result<u64> {
            Ok(std::fs::read_to_string(NR_HUGEPAGES)
                .with_context(|| format!("cannot read {NR_HUGEPAGES}"))?
                .trim()
                .parse()?)
        };
        let old = read()?;
        *RESTORE.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
        let reserved = Reserved { old };
        std::fs::write(NR_HUGEPAGES, (old + n).to_string())
            .with_context(|| format!("cannot reserve {n} huge pages (root needed)"))?;
        if read()? < old + n {
            bail!("the kernel gave fewer than {n} more huge pages (memory too fragmented?)");
        }
        Ok(reserved)
    }
}

impl Reserved {
    /// Touches `n` pages of the pool once and gives them back: on this nested machine the
    /// host backs a guest's memory on first use (≈ 6 ms per 2 MiB page), a cost bare metal
    /// does not have and a destination pays once, when its pool is first used. Best effort.
    pub(crate) fn warm(&self, n: u64) {
        let len = (n as usize) << 21;
        // SAFETY: a fresh anonymous mapping nobody else knows; written only within its
        // length, then unmapped.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            );
            if addr == libc::MAP_FAILED {
                return;
            }
            for offset in (0..len).step_by(2 << 20) {
                addr.cast::<u8>().add(offset).write_volatile(1);
            }
            libc::munmap(addr, len);
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        RESTORE.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// Runs the huge-page scenarios on `image` (an ordinary file: pagesrv serves it in 2 MiB
/// pages to a destination that asks for them); `small_push` is the 4 KiB push-on run of the
/// same image and workload, for the ratio.
///
/// # Errors
/// Huge pages that cannot be reserved, or a run failing.
pub fn run(
    args: &LatencyArgs,
    image: &Path,
    work: &Path,
    small_push: Option<&Value>,
) -> Result<Value> {
    check_size(args.size_mib)?;
    let _reserved = Reserved::pages(args.size_mib / 2 + 8)?;
    let huge = |push: bool| Scenario {
        workload_extra: vec!["--hugepages".into()],
        // A 2 MiB page per fault: fewer touches keep the demand run short.
        touches: (!push).then_some(args.demand_touches.min(args.size_mib / 2)),
        ..Scenario::plain("random", push, false)
    };
    eprintln!("bench: 2 MiB pages, push off");
    let demand = run_median(&huge(false), image, work, args, args.tuning)?;
    eprintln!("bench: 2 MiB pages, push on");
    let push = run_median(&huge(true), image, work, args, args.tuning)?;
    let ratio = small_push
        .and_then(|small| small["total_ms"].as_f64())
        .zip(push["total_ms"].as_f64())
        .map(|(small, huge)| huge / small);
    Ok(json!({
        "demand": demand,
        "push": push,
        "total_vs_4k": ratio,
    }))
}

/// `--size-mib` must be whole 2 MiB pages (checked before anything runs).
///
/// # Errors
/// An odd size.
pub fn check_size(size_mib: u64) -> Result<()> {
    if !size_mib.is_multiple_of(2) {
        bail!("--hugepages needs --size-mib to be a whole number of 2 MiB pages");
    }
    Ok(())
}

/// Prints the huge-page lines.
pub fn print(r: &Value) {
    if r.is_null() {
        return;
    }
    let l = &r["demand"]["fault_latency_us"];
    println!();
    println!(
        "2 MiB pages: demand fault p50 {:.0} µs, p99 {:.0} µs ({} faults); push on: total {:.0} ms ({:.2}× the 4 KiB guest)",
        l["p50"].as_f64().unwrap_or(0.0),
        l["p99"].as_f64().unwrap_or(0.0),
        l["count"],
        r["push"]["total_ms"].as_f64().unwrap_or(0.0),
        r["total_vs_4k"].as_f64().unwrap_or(f64::NAN),
    );
}
