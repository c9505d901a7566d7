//! Any handshake text must parse into a layout that keeps its invariants, or be rejected;
//! never panic.
#![no_main]

use common::layout::Layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(layout) = Layout::from_json(data) else {
        return;
    };
    let total = layout.total_pages();
    assert_eq!(total * layout.page_size(), layout.total_bytes());
    for page in [0, total / 2, total.saturating_sub(1)] {
        let (addr, run) = layout
            .host_run(page)
            .expect("every page has a host address");
        assert!(run >= 1);
        assert_eq!(layout.locate(addr).expect("host address maps back"), page);
    }
    assert!(layout.host_run(total).is_none());
});
