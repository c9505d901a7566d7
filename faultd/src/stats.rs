//! The stats JSON written at the end of a migration.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::core::kernel::Kernel;
use crate::core::latency::{LatencyRecorder, LatencySummary};
use crate::core::session::Verdict;
use crate::core::vm::{Counters, Vm};

/// The stats JSON.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Fault events read.
    pub faults: u64,
    /// Faults that had to wait for pagesrv (the rest were served locally: zero pages,
    /// pages that were present or awaited already).
    pub demand_faults: u64,
    /// Data pages placed from urgent replies.
    pub pages_requested: u64,
    /// Data pages placed from the background push.
    pub pages_pushed: u64,
    /// Zero pages placed.
    pub pages_zero: u64,
    /// Pages removed or unmapped by the VMM before they arrived (not verified: every other
    /// page is).
    pub pages_removed: u64,
    /// Pages another restore of the image placed in the guest RAM file shared with it before
    /// they arrived here (not fetched; verified by that restore).
    pub pages_shared: u64,
    /// Zero pages mapped because a thread touched them (the rest stay unplaced).
    pub zero_fills: u64,
    /// Bytes received from pagesrv.
    pub bytes_received: u64,
    /// Sum of the digests of every page as received (`common::digest`), in hex: compare with
    /// the source file's. Pages the VMM removed are not included.
    pub received_digest: String,
    /// The end-to-end check against pagesrv's digests: `match`, `mismatch`, or
    /// `not verified` (`--no-verify`).
    pub digest_check: String,
    /// Page ranges `[first, end)` whose digests differ from the source's.
    pub digest_mismatch_pages: Vec<[u64; 2]>,
    /// Times the link to pagesrv was lost (each followed by a reconnect).
    pub reconnects: u64,
    /// Placements that met EAGAIN (an unread REMOVE) and waited for the event reader.
    pub placement_retries: u64,
    /// Pages the VMM removed while the link to pagesrv was down.
    pub removed_while_link_down: u64,
    /// Page bytes received in precopy rounds, before the switch.
    pub bytes_precopy: u64,
    /// Pages dropped because the source wrote them after they were sent (precopy).
    pub pages_discarded: u64,
    /// Pages placed from the base image (`--base`): their hashes matched the source's.
    pub pages_reused: u64,
    /// Page bytes that did not cross the wire thanks to the base image.
    pub bytes_saved_base: u64,
    /// Bytes of page hashes received (part of `bytes_received`).
    pub bytes_hashes: u64,
    /// From the VMM's handshake to the switch from precopy to postcopy (none without
    /// precopy).
    pub switched_ms: Option<f64>,
    /// From the VMM's handshake to the last page.
    pub duration_ms: f64,
    /// When the last page arrived, in ms since the Unix epoch (to line up with other logs).
    pub completed_unix_ms: f64,
    /// Fault latency percentiles.
    pub fault_latency_us: LatencySummary,
    /// Power-of-two microsecond buckets.
    pub latency_dist_us: Vec<u64>,
}

impl Stats {
    /// The stats of a session that ended with `verdict` (`cuts`: links lost; `started`:
    /// when the migration began).
    pub fn of_session<K: Kernel>(
        vm: &Vm<K>,
        session: &crate::core::session::DestSession<'_, K>,
        verdict: &Verdict,
        cuts: u64,
        started: std::time::Instant,
    ) -> Self {
        let duration = session.completed_in().unwrap_or_else(|| started.elapsed());
        let core = &session.core;
        let mut stats = Stats::collect(vm, core.faults, &core.latencies, duration, verdict, cuts);
        stats.switched_ms = session.switched_in().map(|d| d.as_secs_f64() * 1000.0);
        let since_completed = started.elapsed().saturating_sub(duration);
        stats.completed_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(since_completed)
            .as_secs_f64()
            * 1000.0;
        stats
    }

    /// Collects the stats of a migration.
    pub fn collect<K: Kernel>(
        vm: &Vm<K>,
        faults: u64,
        latencies: &LatencyRecorder,
        duration: Duration,
        verdict: &Verdict,
        reconnects: u64,
    ) -> Self {
        let c = &vm.counters;
        let total_digest = vm
            .chunk_digests()
            .iter()
            .fold(0u64, |acc, d| acc.wrapping_add(*d));
        Stats {
            total_pages: vm.total_pages(),
            page_size: vm.page_size(),
            faults,
            demand_faults: Counters::get(&c.demand_faults),
            pages_requested: Counters::get(&c.pages_requested),
            pages_pushed: Counters::get(&c.pages_pushed),
            pages_zero: Counters::get(&c.pages_zero),
            pages_removed: Counters::get(&c.pages_removed),
            pages_shared: Counters::get(&c.pages_shared),
            zero_fills: Counters::get(&c.zero_fills),
            bytes_received: Counters::get(&c.bytes_received),
            received_digest: format!("{total_digest:016x}"),
            digest_check: verdict.name().into(),
            digest_mismatch_pages: match verdict {
                Verdict::Mismatch(ranges) => ranges.iter().map(|r| [r.start, r.end]).collect(),
                _ => Vec::new(),
            },
            reconnects,
            placement_retries: Counters::get(&c.placement_retries),
            removed_while_link_down: Counters::get(&c.removed_while_link_down),
            bytes_precopy: Counters::get(&c.bytes_precopy),
            pages_discarded: Counters::get(&c.pages_discarded),
            pages_reused: Counters::get(&c.pages_reused),
            bytes_saved_base: Counters::get(&c.pages_reused) * vm.page_size(),
            bytes_hashes: Counters::get(&c.bytes_hashes),
            switched_ms: None,
            duration_ms: duration.as_secs_f64() * 1000.0,
            completed_unix_ms: 0.0,
            fault_latency_us: latencies.summary(),
            latency_dist_us: latencies.distribution(),
        }
    }

    /// Writes the JSON to `path` (via a temporary file, so readers never see half of it).
    ///
    /// # Errors
    /// The write's error.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        common::atomic_file::write(path, &text)
    }
}

/// Writes the pages the guest faulted on (`pages`, from `--record-working-set`) to `path`,
/// tied to image `image_id` (a failure is logged: the migration's outcome does not depend
/// on it).
pub fn save_working_set<K: Kernel>(vm: &Vm<K>, pages: Option<&[u64]>, image_id: u64, path: &Path) {
    let Some(pages) = pages else {
        return;
    };
    if pages.is_empty() || image_id == 0 {
        // Nothing recorded, or never linked to pagesrv (no image to tie it to): an earlier
        // recording in that file is worth more than an empty one.
        tracing::warn!(file = %path.display(), "no working set recorded: the file is left as it was");
        return;
    }
    let set = common::working_set::WorkingSet {
        page_size: u32::try_from(vm.page_size()).unwrap_or(u32::MAX),
        total_pages: vm.total_pages(),
        image_id,
        pages: pages.to_vec(),
    };
    match set.write(path) {
        Ok(()) => tracing::info!(
            pages = set.pages.len(),
            file = %path.display(),
            "recorded the working set"
        ),
        Err(e) => tracing::warn!(error = %e, "failed to record the working set"),
    }
}
