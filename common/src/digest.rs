//! Page digests both sides can compute independently: every page hashed with its index, the
//! hashes summed, so the order pages arrive in does not matter. All-zero pages hash to 0, so
//! zero ranges need no bytes to be digested.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of a page hash ([`page_hash`]): XXH3-128.
pub const PAGE_HASH_BYTES: usize = 16;

/// True when every byte is zero. Checks the first word first (most data pages fail there),
/// then OR-reduces 256-byte blocks, which the compiler vectorises.
pub fn is_zero(bytes: &[u8]) -> bool {
    // The aligned middle as words (zerocopy checks the alignment and length, no unsafe).
    let start = bytes.as_ptr().align_offset(8).min(bytes.len());
    let end = start + (bytes.len() - start) / 8 * 8;
    let (head, middle, tail) = (&bytes[..start], &bytes[start..end], &bytes[end..]);
    let Ok(words) = <[u64] as zerocopy::FromBytes>::ref_from_bytes(middle) else {
        return bytes.iter().all(|&b| b == 0);
    };
    if head.iter().chain(tail).any(|&b| b != 0) {
        return false;
    }
    if words.first().is_some_and(|&w| w != 0) {
        return false;
    }
    words
        .chunks(32)
        .all(|block| block.iter().fold(0, |acc, &w| acc | w) == 0)
}

/// The unit of digests: a page larger than this (a huge page) is digested as its pieces of
/// this size, so a piece written in place can be digested again alone.
pub const DIGEST_PIECE_BYTES: usize = 4096;

/// The digest of one page: the sum of [`piece_digest`] over its [`DIGEST_PIECE_BYTES`]
/// pieces, indexed `page × pieces per page + i` (one piece, indexed `page`, for a page no
/// larger than a piece): 0 for an all-zero page, and a page placed at the wrong index changes
/// the sum.
pub fn page_digest(page: u64, bytes: &[u8]) -> u64 {
    let per = (bytes.len() / DIGEST_PIECE_BYTES).max(1) as u64;
    bytes
        .chunks(DIGEST_PIECE_BYTES)
        .zip(page * per..)
        .fold(0u64, |acc, (piece, index)| {
            acc.wrapping_add(piece_digest(index, piece))
        })
}

/// The digest of one piece: 0 when all zero, else a hash of its bytes seeded with its index.
pub fn piece_digest(index: u64, bytes: &[u8]) -> u64 {
    if is_zero(bytes) {
        0
    } else {
        xxh3_64_with_seed(bytes, index)
    }
}

/// The digest of consecutive pages starting at `first`.
pub fn run_digest(first: u64, bytes: &[u8], page_size: usize) -> u64 {
    bytes
        .chunks(page_size)
        .zip(first..)
        .fold(0u64, |acc, (page, idx)| {
            acc.wrapping_add(page_digest(idx, page))
        })
}

/// The hash of a page offered to a destination that holds a base image: XXH3-128 seeded
/// with the session id (random, never seen by the guest, so a guest cannot prepare a page
/// that collides with one of the base's), little-endian.
pub fn page_hash(seed: u64, bytes: &[u8]) -> [u8; PAGE_HASH_BYTES] {
    xxhash_rust::xxh3::xxh3_128_with_seed(bytes, seed).to_le_bytes()
}

/// A non-zero 64-bit identity of some values (e.g. a memory file's device, inode, size and
/// modification time): equal values give equal identities.
pub fn identity(parts: &[u64]) -> u64 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_page_hash_depends_on_bytes_and_seed() {
        let mut page = vec![7u8; 4096];
        let h = page_hash(1, &page);
        assert_eq!(h, page_hash(1, &page));
        assert_ne!(h, page_hash(2, &page));
        page[4095] ^= 1;
        assert_ne!(h, page_hash(1, &page));
    }

    #[test]
    fn test_is_zero() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 1, 255, 256, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            assert_eq!(is_zero(&page[1..]), at == 0, "unaligned, byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&page[3..4001]));
    }

    #[test]
    fn test_digest_is_order_free_but_index_bound() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let both = [a.clone(), b.clone()].concat();
        let whole = run_digest(10, &both, 4096);
        assert_eq!(whole, page_digest(11, &b).wrapping_add(page_digest(10, &a)));
        assert_ne!(whole, run_digest(10, &[b, a].concat(), 4096));
        assert_eq!(page_digest(5, &[0u8; 4096]), 0);
    }

    #[test]
    fn test_is_zero_sees_any_nonzero_byte_at_any_alignment() {
        let buf = vec![0u8; 4096 + 64];
        for offset in 0..9 {
            for len in [0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 4096] {
                let slice = &buf[offset..offset + len];
                assert!(is_zero(slice), "offset {offset} len {len}");
                for at in [0, len / 2, len.saturating_sub(1)] {
                    if len == 0 {
                        continue;
                    }
                    let mut copy = buf.clone();
                    copy[offset + at] = 1;
                    assert!(
                        !is_zero(&copy[offset..offset + len]),
                        "offset {offset} len {len} byte {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_a_huge_page_digests_as_its_pieces_and_a_small_page_as_itself() {
        let a = vec![1u8; DIGEST_PIECE_BYTES];
        let b = vec![2u8; DIGEST_PIECE_BYTES];
        let zero = vec![0u8; DIGEST_PIECE_BYTES];
        let huge = [a.clone(), zero, b.clone()].concat();
        // Page 5 of 3-piece pages: pieces 15, 16 (zero: 0) and 17.
        assert_eq!(
            page_digest(5, &huge),
            piece_digest(15, &a).wrapping_add(piece_digest(17, &b))
        );
        assert_eq!(page_digest(7, &a), xxh3_64_with_seed(&a, 7));
        assert_eq!(page_digest(7, &a[..64]), xxh3_64_with_seed(&a[..64], 7));
        assert_eq!(page_digest(9, &huge[..0]), 0);
    }
}
