//! Any line from a source VMM (its hello, a bitmap header) or from pagesrv (a command or the
//! outcome, as a VMM reads it) must parse into something consistent or be refused; never
//! panic.
#![no_main]

use common::source_link::{
    CommandKind, FromPagesrv, MAX_REASON_BYTES, Outcome, check_bitmap_header, parse_from_pagesrv,
    parse_hello,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = parse_hello(data) {
        assert!(hello.size_bytes > 0 && hello.size_bytes % hello.page_size == 0);
        assert!(hello.pages() > 0);
        assert_eq!(hello.bitmap_bytes() as u64, hello.pages().div_ceil(8));
    }
    for kind in [CommandKind::Dirty, CommandKind::Pause, CommandKind::Free] {
        let _ = check_bitmap_header(data, kind, 4096);
    }
    if let Ok(FromPagesrv::Outcome(Outcome::Failed { reason })) = parse_from_pagesrv(data) {
        assert!(reason.len() <= MAX_REASON_BYTES);
    }
});
