use super::*;

fn sample() -> Manifest {
    let frame = |offset, pages, seed: u8| Frame {
        offset,
        len: 100,
        pages,
        raw_hash: [seed; 32],
        delta: false,
    };
    Manifest {
        size_bytes: 4 * PAGE_BYTES,
        image_id: 77,
        packs: vec![[1; 32], [2; 32]],
        frames: vec![
            FrameRef {
                pack: 0,
                frame: frame(0, 2, 9),
            },
            FrameRef {
                pack: 1,
                frame: frame(100, 1, 8),
            },
            FrameRef {
                pack: 1,
                frame: Frame {
                    delta: true,
                    ..frame(200, 2, 7)
                },
            },
        ],
        pages: vec![
            PageRef::Stored { frame: 0, slot: 1 },
            PageRef::Zero,
            PageRef::Stored { frame: 2, slot: 0 },
            PageRef::Stored { frame: 0, slot: 0 },
        ],
        working_set: vec![2, 0],
        bases: [(2, vec![(0, 1), (1, 0)])].into_iter().collect(),
    }
}

#[test]
fn test_manifest_round_trips() {
    let m = sample();
    assert_eq!(Manifest::decode(&m.encode()), Ok(m));
}

#[test]
fn test_a_flipped_byte_anywhere_in_a_manifest_is_refused() {
    let bytes = sample().encode();
    for i in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x10;
        assert!(
            Manifest::decode(&damaged).is_err(),
            "byte {i} flipped was accepted"
        );
    }
    assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn test_references_out_of_bounds_are_malformed() {
    let mut m = sample();
    m.pages[0] = PageRef::Stored { frame: 0, slot: 2 };
    assert!(matches!(
        Manifest::decode(&m.encode()),
        Err(FormatError::Malformed { .. })
    ));
    let mut m = sample();
    m.working_set.push(4);
    assert!(matches!(
        Manifest::decode(&m.encode()),
        Err(FormatError::Malformed { .. })
    ));
    let mut m = sample();
    m.frames[1].pack = 2;
    assert!(matches!(
        Manifest::decode(&m.encode()),
        Err(FormatError::Malformed { .. })
    ));
    // A base must be a page of an ordinary frame: not past a frame's pages, not in a
    // frame that does not exist, not in a delta frame.
    for base in [(0, 2), (3, 0), (2, 0)] {
        let mut m = sample();
        m.bases.get_mut(&2).unwrap()[1] = base;
        assert!(
            matches!(
                Manifest::decode(&m.encode()),
                Err(FormatError::Malformed { .. })
            ),
            "base {base:?} accepted"
        );
    }
}

#[test]
fn test_frames_that_cannot_be_are_malformed() {
    for (offset, len) in [(0, 0), (u64::MAX - 5, 100), (0, 2 << 20)] {
        let mut m = sample();
        m.frames[0].frame.offset = offset;
        m.frames[0].frame.len = len;
        assert!(
            matches!(
                Manifest::decode(&m.encode()),
                Err(FormatError::Malformed { .. })
            ),
            "offset {offset} len {len} accepted"
        );
    }
}

#[test]
fn test_pack_index_round_trips_and_refuses_damage() {
    let index = PackIndex {
        frames: vec![
            Frame {
                offset: 0,
                len: 5,
                pages: 2,
                raw_hash: [3; 32],
                delta: false,
            },
            Frame {
                offset: 5,
                len: 5,
                pages: 1,
                raw_hash: [6; 32],
                delta: true,
            },
        ],
        page_hashes: vec![[4; 32], [5; 32], [7; 32]],
        bases: vec![[8; 32]],
    };
    let bytes = index.encode();
    assert_eq!(PackIndex::decode(&bytes), Ok(index));
    let mut damaged = bytes.clone();
    damaged[50] ^= 1;
    assert_eq!(
        PackIndex::decode(&damaged),
        Err(FormatError::Checksum { what: "pack index" })
    );
}

#[test]
fn test_an_object_of_another_format_version_says_so() {
    let mut old = sample().encode();
    old[6..8].copy_from_slice(b"01");
    let err = Manifest::decode(&old).unwrap_err();
    assert!(
        matches!(&err, FormatError::OtherVersion { found, reads: "02", .. } if found == "01"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("upload the snapshot again"),
        "{err}"
    );
    // Another object altogether is still just not one.
    assert!(matches!(
        Manifest::decode(b"PMPKIDX2 and more bytes than forty, to be sure of it"),
        Err(FormatError::Magic { .. })
    ));
}

#[test]
fn test_hex_round_trips() {
    let h = [0xab; 32];
    assert_eq!(parse_hex(&hex(&h)), Some(h));
    assert_eq!(parse_hex("zz"), None);
}
