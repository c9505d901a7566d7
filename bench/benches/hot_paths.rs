//! Micro-benchmarks of the hot pieces: frame decoding, the page map, zero-page detection,
//! page digests, and sealing frames (AES-256-GCM). `cargo bench -p bench`.

use common::digest::{is_zero, page_digest};
use common::framed::write_frames;
use common::pagemap::PageMap;
use common::wire::{Decoded, Decoder, Message, PageRange, encode};
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let decoder = Decoder::session(4096, 1 << 20);
    let mut request = Vec::new();
    encode(
        &Message::Request(PageRange {
            first: 12345,
            count: 1,
        }),
        0,
        &mut request,
    );
    c.bench_function("decode Request", |b| {
        b.iter(|| {
            matches!(
                decoder.decode(black_box(&request)),
                Ok(Decoded::Frame { .. })
            )
        })
    });
    let pages = vec![5u8; 128 * 4096];
    let mut run = Vec::new();
    write_frames(
        &mut run,
        &[(
            Message::PageRun(PageRange {
                first: 0,
                count: 128,
            }),
            &pages,
        )],
    )
    .unwrap();
    let mut g = c.benchmark_group("decode PageRun 512 KiB");
    g.throughput(Throughput::Bytes(run.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| decoder.decode(black_box(&run)).is_ok())
    });
    g.finish();
}

fn page_map(c: &mut Criterion) {
    let map = PageMap::new(1 << 20);
    map.set_range(1000, 500_000);
    c.bench_function("pagemap set_range 128", |b| {
        let mut at = 0u64;
        b.iter(|| {
            at = (at + 4099) % (1 << 20);
            map.set_range(black_box(at), 128)
        })
    });
    c.bench_function("pagemap clear_runs 64k pages", |b| {
        b.iter(|| map.clear_runs(black_box(400_000), 65536).len())
    });
}

fn zero_and_digest(c: &mut Criterion) {
    let zero = vec![0u8; 4096];
    let mut data = vec![0u8; 4096];
    data[4000] = 1;
    let mut g = c.benchmark_group("4 KiB page");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("is_zero (zero page)", |b| {
        b.iter(|| is_zero(black_box(&zero)))
    });
    g.bench_function("is_zero (late non-zero byte)", |b| {
        b.iter(|| is_zero(black_box(&data)))
    });
    g.bench_function("page_digest", |b| {
        b.iter(|| page_digest(7, black_box(&data)))
    });
    g.finish();
}

/// Sealing and opening page frames, as a keyed session does: one core's cipher throughput.
fn sealing(c: &mut Criterion) {
    use common::auth::{Psk, Transcript};
    use common::framed::{FrameEncoder, FrameReader};
    use common::wire::{PROTOCOL_VERSION, Role, SessionParams};
    let transcript = Transcript {
        server_nonce: [1; 32],
        client_nonce: [2; 32],
        role: Role::Bulk,
        hello: SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 1 << 20,
            session_id: 1,
            image_id: 1,
            flags: 0,
            vm: common::wire::VmName::default(),
        },
    };
    let psk = Psk::from_bytes(b"a benchmark key, 32 bytes long!!");
    for (name, pages) in [("4 KiB", 1u64), ("512 KiB", 128), ("2 MiB", 512)] {
        let payload = vec![0x5Au8; pages as usize * 4096];
        let message = Message::PageRun(PageRange {
            first: 0,
            count: pages,
        });
        let mut g = c.benchmark_group(format!("sealed PageRun of {name}"));
        g.throughput(Throughput::Bytes(payload.len() as u64));
        let (sealer, _) = psk.channel_secrets(&transcript).client();
        let mut encoder = FrameEncoder::sealed(sealer);
        let mut out = Vec::with_capacity(payload.len() + 64);
        g.bench_function("seal", |b| {
            b.iter(|| {
                out.clear();
                encoder.encode(&message, black_box(&payload), &mut out);
                out.len()
            })
        });
        let (sealer, _) = psk.channel_secrets(&transcript).client();
        let (_, opener) = psk.channel_secrets(&transcript).server();
        let mut encoder = FrameEncoder::sealed(sealer);
        let mut reader = FrameReader::new(Decoder::session(4096, 1 << 20));
        reader.set_opener(opener);
        reader.reserve(payload.len() + 64);
        g.bench_function("seal + open", |b| {
            b.iter(|| {
                out.clear();
                encoder.encode(&message, &payload, &mut out);
                let (_, range) = reader.read_frame(&mut out.as_slice()).expect("opens");
                range.len()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, codec, page_map, zero_and_digest, sealing);
criterion_main!(benches);
