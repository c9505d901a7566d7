//! Any bytes given as a free-page bitmap (`pagesrv --free-pages`, or a source VMM's `free`
//! answer) must be refused or give exactly the pages whose bits are set; never panic.
#![no_main]

use common::free_hints::{FreeHints, HINT_PAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&extra, bitmap)) = data.split_first() else {
        return;
    };
    // A memory the bitmap fits (or, with the top bit of `extra`, one a byte larger).
    let pages = (bitmap.len() as u64 * 8).saturating_sub(u64::from(extra % 8))
        + if extra & 0x80 != 0 { 8 } else { 0 };
    let Ok(hints) = FreeHints::from_bitmap(bitmap, pages * HINT_PAGE_BYTES, "fuzz") else {
        return;
    };
    let set: u64 = (0..pages)
        .filter(|&p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .count() as u64;
    assert_eq!(hints.free_pages(), set);
});
