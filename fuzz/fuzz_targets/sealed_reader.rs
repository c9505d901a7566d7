//! Any byte stream fed to a sealed frame reader (a keyed connection after its handshake)
//! must yield only frames that were sealed with the channel's key, in order, or an error;
//! never panic. Half the inputs are a valid sealed stream with bytes flipped or cut.
#![no_main]

use common::auth::{Psk, Transcript};
use common::framed::{FrameEncoder, FrameReader};
use common::wire::{Decoder, Message, PROTOCOL_VERSION, PageRange, Role, SessionParams, VmName};
use libfuzzer_sys::fuzz_target;

fn channel() -> (FrameEncoder, FrameReader) {
    let key = Psk::from_bytes(b"the fuzzer's channel key, 32 b!!");
    let t = Transcript {
        server_nonce: [1; 32],
        client_nonce: [2; 32],
        role: Role::Urgent,
        hello: SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 64,
            session_id: 5,
            image_id: 6,
            flags: 0,
            vm: VmName::default(),
        },
    };
    let (sealer, _) = key.channel_secrets(&t).server();
    let (_, opener) = key.channel_secrets(&t).client();
    let mut reader = FrameReader::new(Decoder::session(4096, 64));
    reader.set_opener(opener);
    (FrameEncoder::sealed(sealer), reader)
}

fuzz_target!(|data: &[u8]| {
    let (mut encoder, mut reader) = channel();
    let mut wire = Vec::new();
    let stream: Vec<u8> = match data.split_first() {
        Some((&mode, rest)) if mode % 2 == 0 => {
            // A real sealed stream, then damaged where the input says.
            let page = [0x5Au8; 4096];
            let frames = [
                (
                    Message::PageRun(PageRange { first: 3, count: 1 }),
                    &page[..],
                ),
                (Message::Heartbeat, &[][..]),
                (Message::ZeroRun(PageRange { first: 9, count: 4 }), &[][..]),
            ];
            encoder
                .write_frames(&mut wire, &frames)
                .expect("a Vec takes it");
            for pair in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % wire.len();
                wire[at] ^= pair[2];
            }
            if let Some(&cut) = rest.first() {
                wire.truncate(wire.len().saturating_sub(usize::from(cut) % 7));
            }
            wire
        }
        Some((_, rest)) => rest.to_vec(),
        None => Vec::new(),
    };
    let mut src = stream.as_slice();
    while let Ok((message, range)) = reader.read_frame(&mut src) {
        let payload = reader.payload(range);
        // Whatever opens was sealed by us: the frames above, in order.
        match message {
            Message::PageRun(r) => {
                assert!(r == PageRange { first: 3, count: 1 } && payload == [0x5A; 4096])
            }
            Message::Heartbeat => {}
            Message::ZeroRun(r) => assert_eq!(r, PageRange { first: 9, count: 4 }),
            other => panic!("a frame nobody sealed opened: {other:?}"),
        }
    }
});
