//! Micro-benchmarks of the hot pieces: frame decoding, the page map, zero-page detection and
//! page digests. `cargo bench -p bench`.

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

criterion_group!(benches, codec, page_map, zero_and_digest);
criterion_main!(benches);
