//! Any bytes read as a snapshot manifest are refused or decode into a manifest whose every
//! reference is in bounds and which encodes back to itself; never a panic, never an
//! allocation the bytes do not pay for. The input is taken twice: as the object itself, and
//! as the body of an object sealed with the right hash (what a damaged hash check cannot
//! reach otherwise).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapstore::layout::{Manifest, PageRef};

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::decode(data);
    let compressed = zstd::bulk::compress(data, 1).expect("compressing to a Vec");
    let mut object = b"PMSNAP02".to_vec();
    object.extend_from_slice(blake3::hash(&compressed).as_bytes());
    object.extend_from_slice(&compressed);
    if let Ok(m) = Manifest::decode(&object) {
        for page in &m.pages {
            if let PageRef::Stored { frame, slot } = *page {
                let f = &m.frames[frame as usize];
                assert!(slot < f.frame.pages);
                assert!((f.pack as usize) < m.packs.len());
            }
        }
        assert!(m.working_set.iter().all(|&p| u64::from(p) < m.page_count()));
        assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
