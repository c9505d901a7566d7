//! Frames: up to [`super::FRAME_PAGES`] pages compressed as one zstd frame, checked against the
//! BLAKE3 of their pages when opened; a delta frame compressed with its base pages as a
//! raw-content prefix.

use super::{FormatError, Frame, PAGE_BYTES};

/// Decompresses an ordinary frame, which must hold `pages` pages and hash to `raw_hash`.
///
/// # Errors
/// [`FormatError::Checksum`] if it does not decompress to exactly that (a delta frame
/// included: it needs its bases, [`open_delta_frame`]).
pub fn open_frame(compressed: &[u8], frame: &Frame) -> Result<Vec<u8>, FormatError> {
    if frame.delta {
        return Err(FormatError::Checksum { what: "frame" });
    }
    open_with(compressed, frame, &[])
}

/// Decompresses a delta frame with `bases`, its base pages one after another in slot
/// order; it must hold `pages` pages and hash to `raw_hash`.
///
/// # Errors
/// [`FormatError::Checksum`] if it does not decompress to exactly that.
pub fn open_delta_frame(
    compressed: &[u8],
    frame: &Frame,
    bases: &[u8],
) -> Result<Vec<u8>, FormatError> {
    if !frame.delta || bases.len() != usize::from(frame.pages) * PAGE_BYTES as usize {
        return Err(FormatError::Checksum { what: "frame" });
    }
    open_with(compressed, frame, bases)
}

fn open_with(compressed: &[u8], frame: &Frame, dictionary: &[u8]) -> Result<Vec<u8>, FormatError> {
    const WHAT: &str = "frame";
    let want = usize::from(frame.pages) * PAGE_BYTES as usize;
    let raw = if dictionary.is_empty() {
        decompress_bounded(compressed, want)
    } else {
        decompress_with(compressed, want, dictionary)
    }
    .ok_or(FormatError::Checksum { what: WHAT })?;
    if raw.len() != want || blake3::hash(&raw).as_bytes() != &frame.raw_hash {
        return Err(FormatError::Checksum { what: WHAT });
    }
    Ok(raw)
}

/// Compresses `raw` (a delta frame's pages) with `bases` (their base pages) as zstd's
/// dictionary, taken as raw content whatever its first bytes (a page may begin like a
/// formatted zstd dictionary); `None` if zstd refuses.
pub fn compress_delta(raw: &[u8], bases: &[u8], level: i32) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter, compress_bound};
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .ok()?;
    cctx.ref_prefix(bases).ok()?;
    let mut out = Vec::with_capacity(compress_bound(raw.len()));
    cctx.compress2(&mut out, raw).ok()?;
    Some(out)
}

/// zstd-decompresses at most `limit` bytes with `dictionary` (raw content); `None` if the
/// input is not a frame or is larger.
fn decompress_with(compressed: &[u8], limit: usize, dictionary: &[u8]) -> Option<Vec<u8>> {
    use zstd::zstd_safe::DCtx;
    let size = zstd::zstd_safe::get_frame_content_size(compressed).ok()??;
    if size > limit as u64 {
        return None;
    }
    let mut dctx = DCtx::create();
    dctx.ref_prefix(dictionary).ok()?;
    let mut out = Vec::with_capacity(size as usize);
    dctx.decompress(&mut out, compressed).ok()?;
    Some(out)
}

/// zstd-decompresses at most `limit` bytes; `None` if the input is not a frame or is larger.
pub(super) fn decompress_bounded(compressed: &[u8], limit: usize) -> Option<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(compressed).ok()??;
    if size > limit as u64 {
        return None;
    }
    thread_local! {
        // One decompression context per thread, kept: making one costs as much as
        // decoding a small frame.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(zstd::bulk::Decompressor::new().ok()?),
        };
        decompressor.decompress(compressed, size as usize).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_open_only_to_their_hash() {
        let raw = vec![7u8; 2 * PAGE_BYTES as usize];
        let compressed = zstd::bulk::compress(&raw, 3).unwrap();
        let frame = Frame {
            offset: 0,
            len: compressed.len() as u32,
            pages: 2,
            raw_hash: *blake3::hash(&raw).as_bytes(),
            delta: false,
        };
        assert_eq!(open_frame(&compressed, &frame).unwrap(), raw);
        let mut other = raw.clone();
        other[5] = 1;
        let wrong = zstd::bulk::compress(&other, 3).unwrap();
        assert!(open_frame(&wrong, &frame).is_err());
        assert!(open_frame(&compressed[..compressed.len() - 2], &frame).is_err());
        let short = Frame { pages: 1, ..frame };
        assert!(open_frame(&compressed, &short).is_err());
    }

    #[test]
    fn test_a_delta_frame_is_small_and_opens_only_with_its_bases() {
        // Random bytes: the changed pages can match nothing but their bases.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let bases: Vec<u8> = (0..2 * PAGE_BYTES as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut raw = bases.clone();
        for at in [17, 4000, 5000, 8000] {
            raw[at] ^= 0x5a;
        }
        let compressed = compress_delta(&raw, &bases, 3).unwrap();
        assert!(compressed.len() < 100, "{} bytes", compressed.len());
        let frame = Frame {
            offset: 0,
            len: compressed.len() as u32,
            pages: 2,
            raw_hash: *blake3::hash(&raw).as_bytes(),
            delta: true,
        };
        assert_eq!(open_delta_frame(&compressed, &frame, &bases).unwrap(), raw);
        // Without its bases, with other bases, or as an ordinary frame: refused.
        assert!(open_frame(&compressed, &frame).is_err());
        let mut other = bases.clone();
        other[100] ^= 1;
        assert!(open_delta_frame(&compressed, &frame, &other).is_err());
        assert!(open_delta_frame(&compressed, &frame, &bases[..PAGE_BYTES as usize]).is_err());
        let plain = Frame {
            delta: false,
            ..frame
        };
        assert!(open_delta_frame(&compressed, &plain, &bases).is_err());
        // A base page that begins like a formatted zstd dictionary is still raw content.
        let mut magic = bases.clone();
        magic[..4].copy_from_slice(&[0x37, 0xA4, 0x30, 0xEC]);
        let mut raw = magic.clone();
        raw[300] ^= 1;
        let compressed = compress_delta(&raw, &magic, 3).unwrap();
        let frame = Frame {
            len: compressed.len() as u32,
            raw_hash: *blake3::hash(&raw).as_bytes(),
            ..frame
        };
        assert_eq!(open_delta_frame(&compressed, &frame, &magic).unwrap(), raw);
    }
}
