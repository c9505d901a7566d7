use super::*;
use std::io::{Seek, SeekFrom, Write};

#[test]
fn test_classify_holes_zero_pages_and_data() {
    let dir = std::env::temp_dir().join(format!("pagesrv-src-{}", std::process::id()));
    let mut f = File::create(&dir).unwrap();
    f.set_len(16 * 4096).unwrap();
    f.seek(SeekFrom::Start(2 * 4096)).unwrap();
    f.write_all(&[0u8; 4096]).unwrap(); // written, but zero
    f.write_all(&[5u8; 2 * 4096]).unwrap(); // pages 3, 4
    f.seek(SeekFrom::Start(10 * 4096 + 100)).unwrap();
    f.write_all(&[1]).unwrap(); // page 10
    drop(f);
    let file = MemorySource::open(&dir).unwrap();
    let src = file.paged(4096).unwrap();
    let mut pieces = Vec::new();
    src.classify(0, 16, &mut pieces);
    std::fs::remove_file(&dir).unwrap();
    assert_eq!(
        pieces,
        vec![
            Piece::Zero { first: 0, count: 3 },
            Piece::Data { first: 3, count: 2 },
            Piece::Zero { first: 5, count: 5 },
            Piece::Data {
                first: 10,
                count: 1
            },
            Piece::Zero {
                first: 11,
                count: 5
            },
        ]
    );
    assert_eq!(src.bytes(3, 1)[0], 5);
}

#[test]
fn test_serves_the_page_size_the_destination_asks_for() {
    let path = std::env::temp_dir().join(format!("pagesrv-2m-{}", std::process::id()));
    let mut f = File::create(&path).unwrap();
    f.set_len(3 << 21).unwrap();
    f.seek(SeekFrom::Start((2 << 21) + 4096)).unwrap();
    f.write_all(&[9u8; 10]).unwrap(); // inside the third 2 MiB page
    drop(f);
    let file = MemorySource::open(&path).unwrap();
    let huge = file.paged(2 << 20).unwrap();
    assert_eq!((huge.total_pages(), huge.page_size()), (3, 2 << 20));
    let mut pieces = Vec::new();
    huge.classify(0, 3, &mut pieces);
    assert_eq!(
        pieces,
        vec![
            Piece::Zero { first: 0, count: 2 },
            Piece::Data { first: 2, count: 1 },
        ]
    );
    assert_eq!(huge.bytes(2, 1)[4096], 9);
    assert_eq!(file.paged(4096).unwrap().total_pages(), 3 * 512);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn test_rejects_bad_sizes() {
    let path = std::env::temp_dir().join(format!("pagesrv-bad-{}", std::process::id()));
    File::create(&path)
        .unwrap()
        .set_len((2 << 20) + 4096)
        .unwrap();
    let file = MemorySource::open(&path).unwrap();
    assert!(file.paged(4096).is_ok());
    let err = file.paged(2 << 20).unwrap_err();
    assert!(matches!(err, SourceError::BadSize { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("not a whole number of 2097152-byte pages")
    );
    drop(file);
    File::create(&path).unwrap();
    let err = MemorySource::open(&path).unwrap_err();
    assert!(matches!(err, SourceError::Empty { .. }), "{err}");
    std::fs::remove_file(&path).unwrap();
}
