//! The little-endian reader and writer the object formats are made with.

use super::{FRAME_PAGES, FormatError, Frame, Hash, PAGE_BYTES};

#[derive(Default)]
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(super) fn frame(&mut self, f: &Frame) {
        self.u64(f.offset);
        self.u32(f.len);
        self.u16(f.pages);
        self.bytes(&f.raw_hash);
        self.0.push(u8::from(f.delta));
    }
}

pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }
    pub(super) fn malformed(&self, detail: String) -> FormatError {
        FormatError::Malformed {
            what: self.what,
            detail,
        }
    }
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
    pub(super) fn take<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let Some(b) = self.bytes.get(self.at..self.at + N) else {
            return Err(self.malformed(format!("it ends at byte {}", self.bytes.len())));
        };
        self.at += N;
        Ok(b.try_into().expect("N bytes"))
    }
    pub(super) fn u16(&mut self) -> Result<u16, FormatError> {
        self.take().map(u16::from_le_bytes)
    }
    pub(super) fn u32(&mut self) -> Result<u32, FormatError> {
        self.take().map(u32::from_le_bytes)
    }
    pub(super) fn u64(&mut self) -> Result<u64, FormatError> {
        self.take().map(u64::from_le_bytes)
    }
    pub(super) fn hash(&mut self) -> Result<Hash, FormatError> {
        self.take()
    }
    /// A count of items of `each` bytes that must fit in what is left.
    pub(super) fn count(&mut self, each: usize) -> Result<usize, FormatError> {
        let n = self.u32()? as usize;
        if n > self.remaining() / each {
            return Err(self.malformed(format!("{n} items in {} bytes", self.remaining())));
        }
        Ok(n)
    }
    pub(super) fn frame(&mut self) -> Result<Frame, FormatError> {
        let (offset, len, pages, raw_hash) = (self.u64()?, self.u32()?, self.u16()?, self.hash()?);
        let delta = match self.take::<1>()?[0] {
            0 => false,
            1 => true,
            other => return Err(self.malformed(format!("a frame of kind {other}"))),
        };
        if pages == 0 || usize::from(pages) > FRAME_PAGES {
            return Err(self.malformed(format!("a frame of {pages} pages")));
        }
        // No frame is longer than zstd's bound for its pages, and none ends past 2^64.
        let most = zstd::zstd_safe::compress_bound(usize::from(pages) * PAGE_BYTES as usize);
        if len == 0 || len as usize > most || offset.checked_add(u64::from(len)).is_none() {
            return Err(self.malformed(format!(
                "a frame of {len} bytes at byte {offset} for {pages} pages"
            )));
        }
        Ok(Frame {
            offset,
            len,
            pages,
            raw_hash,
            delta,
        })
    }
    pub(super) fn finish(&self) -> Result<(), FormatError> {
        if self.remaining() != 0 {
            return Err(self.malformed(format!("{} bytes after the end", self.remaining())));
        }
        Ok(())
    }
}
