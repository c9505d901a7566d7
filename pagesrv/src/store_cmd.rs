//! `pagesrv store ...`: snapshots in an S3-compatible object store (`snapstore`): upload a
//! memory file, download one back, list them, remove one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use common::working_set::WorkingSet;
use snapstore::{PutOptions, Store, StoreUrl};

/// `pagesrv store ACTION`.
#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// Upload a memory file (a paused VM's RAM, a Firecracker snapshot's memory file) as
    /// snapshot NAME: pages the store holds already are not sent again, zero pages are never
    /// stored, the rest is compressed. The snapshot appears once every byte is stored.
    Put {
        /// The memory file.
        file: PathBuf,
        /// Where: s3://BUCKET/NAME.
        url: StoreUrl,
        /// A working set recorded by `faultd --record-working-set` on this image: stored with
        /// the snapshot, so that restores fetch it first, in the order the guest touched it.
        #[arg(long, value_name = "FILE")]
        working_set: Option<PathBuf>,
        /// The snapshot in the same store this memory was made from (e.g. a clone's
        /// template): a page that changed from the parent's page at the same place is
        /// stored as a delta against it when that is smaller.
        #[arg(long, value_name = "NAME")]
        parent: Option<String>,
    },
    /// Download snapshot s3://BUCKET/NAME into a memory file (checked page by page against
    /// the store's hashes; the file appears only when complete).
    Get {
        /// Which: s3://BUCKET/NAME.
        url: StoreUrl,
        /// The memory file to write.
        file: PathBuf,
    },
    /// List the snapshots in s3://BUCKET.
    Ls {
        /// The store: s3://BUCKET.
        url: StoreUrl,
    },
    /// Remove snapshot s3://BUCKET/NAME, and the packs no other snapshot uses. Do not run
    /// it while an upload to the same store runs.
    Rm {
        /// Which: s3://BUCKET/NAME.
        url: StoreUrl,
        /// Keep unused packs younger than this many seconds (an upload in progress writes
        /// its packs before its manifest).
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        grace_secs: u64,
    },
}

/// Runs one store action, printing what it did.
///
/// # Errors
/// Whatever the action met, with the context of what it was doing.
pub fn run(action: &StoreAction) -> Result<()> {
    match action {
        StoreAction::Put {
            file,
            url,
            working_set,
            parent,
        } => put(file, url, working_set.as_deref(), parent.as_deref()),
        StoreAction::Get { url, file } => {
            let store = open(url)?;
            let r = store
                .get(named(url)?, file)
                .with_context(|| format!("cannot download {url}"))?;
            println!(
                "{url} -> {}: {} pages ({} zero), {} frames in {} requests, {:.1} MiB fetched in {:.2} s",
                file.display(),
                r.pages,
                r.zero_pages,
                r.frames,
                r.requests,
                mib(r.bytes_fetched),
                r.seconds
            );
            Ok(())
        }
        StoreAction::Ls { url } => {
            if !url.name.is_empty() {
                bail!("ls takes a store (s3://BUCKET), not a snapshot ({url})");
            }
            let store = open(url)?;
            let infos = store.list().with_context(|| format!("cannot list {url}"))?;
            for i in &infos {
                let age = std::time::SystemTime::now()
                    .duration_since(i.written)
                    .unwrap_or_default();
                if let Some(why) = &i.unreadable {
                    println!(
                        "{:<32} UNREADABLE ({why}), written {} ago",
                        i.name,
                        age_text(age)
                    );
                    continue;
                }
                println!(
                    "{:<32} {:>8.1} MiB  {:>9} data pages  {:>4} packs  working set {:>7} pages  written {} ago",
                    i.name,
                    mib(i.size_bytes),
                    i.data_pages,
                    i.packs,
                    i.working_set_pages,
                    age_text(age)
                );
            }
            println!("{} snapshot(s) in s3://{}", infos.len(), store.bucket());
            Ok(())
        }
        StoreAction::Rm { url, grace_secs } => {
            let store = open(url)?;
            let r = store
                .remove(named(url)?, Duration::from_secs(*grace_secs))
                .with_context(|| format!("cannot remove {url}"))?;
            println!(
                "removed {url}: {} unused pack(s) deleted ({:.1} MiB freed); {} in use by other snapshots, {} unused but younger than {grace_secs} s kept",
                r.packs_deleted,
                mib(r.bytes_freed),
                r.packs_in_use,
                r.packs_too_young
            );
            Ok(())
        }
    }
}

fn put(
    file: &Path,
    url: &StoreUrl,
    working_set: Option<&Path>,
    parent: Option<&str>,
) -> Result<()> {
    let name = named(url)?;
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let options = PutOptions {
        working_set: match working_set {
            Some(path) => working_set_pages(path, size)?,
            None => Vec::new(),
        },
        parent: parent.map(str::to_owned),
    };
    let started = Instant::now();
    let mut last = Instant::now();
    let mut stderr = std::io::stderr();
    let r = open(url)?
        .put(file, name, &options, &mut |p| {
            if last.elapsed() >= Duration::from_secs(1) || p.pages_done == p.pages_total {
                last = Instant::now();
                let _ = writeln!(
                    stderr,
                    "upload: {:>3}% of {} pages read, {:.1} MiB written, {:.0} s",
                    p.pages_done * 100 / p.pages_total.max(1),
                    p.pages_total,
                    mib(p.bytes_written),
                    started.elapsed().as_secs_f64()
                );
            }
        })
        .with_context(|| format!("cannot upload {} to {url}", file.display()))?;
    println!(
        "{} -> {url}: {} pages: {} zero (not stored), {} already in the store, {} repeated, {} new ({} as deltas) in {} pack(s); {:.1} MiB written ({:.1} MiB of pages before compression) in {:.2} s{}",
        file.display(),
        r.pages,
        r.zero_pages,
        r.reused_pages,
        r.repeated_pages,
        r.new_pages,
        r.delta_pages,
        r.packs_written,
        mib(r.bytes_written),
        mib(r.new_pages * 4096),
        r.seconds,
        if r.unreadable_indexes > 0 {
            format!(
                "; {} damaged pack index(es) in the store were not reused",
                r.unreadable_indexes
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The working set's pages as 4 KiB page numbers of an image of `size` bytes.
fn working_set_pages(path: &Path, size: u64) -> Result<Vec<u64>> {
    let ws = WorkingSet::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let page_size = u64::from(ws.page_size);
    if ws.total_pages * page_size != size {
        bail!(
            "{} was recorded on an image of {} bytes; this one is {size}",
            path.display(),
            ws.total_pages * page_size
        );
    }
    let per = page_size / 4096;
    Ok(ws
        .pages
        .iter()
        .flat_map(|&p| p * per..(p + 1) * per)
        .collect())
}

fn named(url: &StoreUrl) -> Result<&str> {
    if url.name.is_empty() {
        bail!("{url} names no snapshot: give s3://BUCKET/NAME");
    }
    Ok(&url.name)
}

fn open(url: &StoreUrl) -> Result<Store> {
    Store::open(url).with_context(|| format!("cannot reach {url}"))
}

fn age_text(age: Duration) -> String {
    match age.as_secs() {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 2 * 86400 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86400),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}
