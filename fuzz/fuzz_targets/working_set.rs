//! Any bytes read as a working-set file must decode into a set that encodes back to the same
//! bytes, or be refused; never panic.
#![no_main]

use common::working_set::WorkingSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = WorkingSet::decode(data) {
        assert!(set.pages.iter().all(|&p| p < set.total_pages));
        assert_eq!(set.encode(), data, "a decoded set re-encodes to its bytes");
    }
});
