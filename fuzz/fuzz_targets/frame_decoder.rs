//! Any byte stream fed to the frame decoders (handshake and session phase, whole and
//! through the buffered reader) must decode or be rejected, never panic; whatever decodes
//! must encode back to the same bytes.
#![no_main]

use common::framed::FrameReader;
use common::wire::{Decoded, Decoder, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for decoder in [
        Decoder::handshake(),
        Decoder::session(4096, 1 << 20),
        Decoder::session(2 << 20, 7),
    ] {
        let mut rest = data;
        while let Ok(Decoded::Frame {
            message,
            payload,
            consumed,
        }) = decoder.decode(rest)
        {
            let mut again = Vec::new();
            encode(&message, payload.len(), &mut again);
            again.extend_from_slice(payload);
            assert_eq!(again, &rest[..consumed], "re-encoding {message:?} differs");
            rest = &rest[consumed..];
        }
        let mut reader = FrameReader::new(decoder);
        let mut src = data;
        while let Ok((_, payload)) = reader.read_frame(&mut src) {
            let _ = reader.payload(payload);
        }
    }
});
