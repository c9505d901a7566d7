//! Any bytes read as a pack index are refused or decode into an index with one hash per
//! page of its frames that encodes back to the same bytes; never a panic. The input is
//! taken as the object and as the body of an object sealed with the right hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapstore::layout::PackIndex;

fuzz_target!(|data: &[u8]| {
    let _ = PackIndex::decode(data);
    let mut object = b"PMPKIDX2".to_vec();
    object.extend_from_slice(blake3::hash(data).as_bytes());
    object.extend_from_slice(data);
    if let Ok(index) = PackIndex::decode(&object) {
        let pages: usize = index.frames.iter().map(|f| usize::from(f.pages)).sum();
        assert_eq!(pages, index.page_hashes.len());
        assert_eq!(
            index.encode(),
            object,
            "a decoded index re-encodes to its bytes"
        );
    }
});
