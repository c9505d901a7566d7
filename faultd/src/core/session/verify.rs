//! The end of a session: the maps that say every page is here, and the comparison of every
//! page's digest with the source's.

use std::ops::Range;

use common::framed::FrameEncoder;
use common::wire::{MAX_PAYLOAD_BYTES, Message, PageRange};
use tracing::{error, info};

use crate::core::kernel::Kernel;
use crate::core::vm::Vm;

/// The end-to-end check of every page against the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every page that arrived matches the source.
    Verified,
    /// These page ranges differ from the source.
    Mismatch(Vec<Range<u64>>),
    /// Not checked (`--no-verify`).
    NotVerified,
}

impl Verdict {
    /// As the stats and events name it.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Verified => "match",
            Verdict::Mismatch(_) => "mismatch",
            Verdict::NotVerified => "not verified",
        }
    }
}

/// Appends `DoneMap` frames for the pages already here and `SkipMap` frames for the pages
/// removed before they arrived (empty stretches left out) to `out`: a bitmap, pages / 8
/// bytes at most.
pub fn encode_maps<K: Kernel>(vm: &Vm<K>, tx: &mut FrameEncoder, out: &mut Vec<u8>) {
    let total = vm.total_pages();
    let chunk_pages = (MAX_PAYLOAD_BYTES as u64) * 8;
    let mut first = 0;
    while first < total {
        let count = chunk_pages.min(total - first);
        let range = PageRange { first, count };
        let skipped = vm.skipped.bitmap(first, count);
        let mut held = vm.done.bitmap(first, count);
        for (h, s) in held.iter_mut().zip(&skipped) {
            *h &= !s;
        }
        for (message, bitmap) in [
            (Message::DoneMap(range), held),
            (Message::SkipMap(range), skipped),
        ] {
            if bitmap.iter().any(|&b| b != 0) {
                tx.encode(&message, &bitmap, out);
            }
        }
        first += count;
    }
}

/// Compares pagesrv's per-chunk digests with what was placed here.
pub(super) fn compare_digests<K: Kernel>(vm: &Vm<K>, theirs: &[u8]) -> Verdict {
    let total = vm.total_pages();
    let mut mismatched: Vec<Range<u64>> = Vec::new();
    for (i, (ours, theirs)) in vm
        .chunk_digests()
        .into_iter()
        .zip(theirs.chunks_exact(8))
        .enumerate()
    {
        let theirs = u64::from_le_bytes(theirs.try_into().expect("8-byte chunks"));
        if ours != theirs {
            let chunk_pages = vm.digest_chunk_pages();
            let first = i as u64 * chunk_pages;
            let range = first..(first + chunk_pages).min(total);
            match mismatched.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => mismatched.push(range),
            }
        }
    }
    if mismatched.is_empty() {
        info!(
            unverified_pages = vm.skipped.set_pages(),
            "digests of every page match the source"
        );
        Verdict::Verified
    } else {
        for r in &mismatched {
            error!(
                first_page = r.start,
                end_page = r.end,
                "DIGEST MISMATCH: guest memory in these pages differs from the source"
            );
        }
        Verdict::Mismatch(mismatched)
    }
}
