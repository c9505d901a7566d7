//! Any bytes read as a frame (what a ranged GET returned) are refused or give exactly the
//! pages whose hash the manifest names; never a panic, never more than the frame's pages
//! decompressed (as an ordinary frame, and as a delta frame). The first byte chooses how
//! many pages the frame claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapstore::layout::{FRAME_PAGES, Frame, PAGE_BYTES, open_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&first, compressed)) = data.split_first() else {
        return;
    };
    let pages = u16::from(first) % FRAME_PAGES as u16 + 1;
    let want = usize::from(pages) * PAGE_BYTES as usize;
    // The hash a sound manifest would name: of what the bytes decompress to, if that is
    // the frame's size.
    // Bounded: a small input must not make the oracle allocate without limit.
    let raw = zstd::bulk::decompress(compressed, want)
        .ok()
        .filter(|raw| raw.len() == want);
    let frame = Frame {
        offset: 0,
        len: compressed.len() as u32,
        pages,
        raw_hash: raw
            .as_ref()
            .map_or([0; 32], |r| *blake3::hash(r).as_bytes()),
        delta: false,
    };
    // As a delta frame against zero pages: refused or the frame's size, never a panic.
    let delta = Frame {
        delta: true,
        ..frame
    };
    if let Ok(got) = snapstore::layout::open_delta_frame(compressed, &delta, &vec![0; want]) {
        assert_eq!(got.len(), want);
    }
    match (open_frame(compressed, &frame), raw) {
        (Ok(got), Some(raw)) => assert_eq!(got, raw),
        (Ok(got), None) => panic!(
            "opened {} bytes that do not decompress to the frame",
            got.len()
        ),
        (Err(_), _) => {}
    }
});
