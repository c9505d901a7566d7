//! Frames over a byte stream: a buffered reader that works for blocking and non-blocking
//! sockets, a vectored writer that sends a header and page bytes without copying them, and
//! [`FrameEncoder`], which seals every frame after an authenticated handshake
//! ([`crate::seal`]); the reader opens them in place.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;

use thiserror::Error;

use crate::seal::{Opener, Sealer, TAG_BYTES};
use crate::wire::{Decoder, ErrorCode, HEADER_LEN, MAX_BODY_BYTES, Message, WireError, encode};

/// Errors reading frames.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The socket failed (for a non-blocking socket: `WouldBlock` means "no whole frame yet").
    #[error("failed to read from the peer")]
    Io(#[from] io::Error),
    /// The peer sent a malformed frame.
    #[error("the peer sent a malformed frame")]
    Wire(#[from] WireError),
    /// The peer closed the connection.
    #[error("the peer closed the connection{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed {
        /// True when part of a frame was buffered.
        mid_frame: bool,
    },
}

/// A connection past its handshake: the stream, its reader (what was read past the last
/// whole frame; with a key, what opens the peer's frames) and its encoder (with a key, what
/// seals ours). What a handshake hands to the code that runs the session.
#[derive(Debug)]
pub struct FramedConn<S = std::net::TcpStream> {
    /// The stream.
    pub stream: S,
    /// Reads (and opens) the peer's frames.
    pub reader: FrameReader,
    /// Encodes (and seals) ours.
    pub tx: FrameEncoder,
}

impl<S: Read + Write> FramedConn<S> {
    /// A connection of these three parts.
    pub fn new(stream: S, reader: FrameReader, tx: FrameEncoder) -> Self {
        FramedConn { stream, reader, tx }
    }

    /// Reads the next frame (see [`FrameReader::read_frame`]).
    ///
    /// # Errors
    /// As [`FrameReader::read_frame`].
    pub fn read_frame(&mut self) -> Result<(Message, Range<usize>), ReadError> {
        self.reader.read_frame(&mut self.stream)
    }

    /// Writes one frame (see [`FrameEncoder::write_frame`]).
    ///
    /// # Errors
    /// The stream's error.
    pub fn write_frame(&mut self, message: &Message, payload: &[u8]) -> io::Result<()> {
        self.tx.write_frame(&mut self.stream, message, payload)
    }
}

/// Reads frames from a stream into a buffer that grows to the largest frame seen (bounded by
/// the decoder's header check, so a peer cannot make it allocate more than one maximal frame).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    decoder: Decoder,
    /// Opens sealed frames (after an authenticated handshake).
    opener: Option<Opener>,
}

impl FrameReader {
    /// A reader decoding with `decoder`.
    pub fn new(decoder: Decoder) -> Self {
        FrameReader::with_capacity(decoder, 64 << 10)
    }

    /// A reader whose buffer starts at `bytes` (it grows as frames need).
    pub fn with_capacity(decoder: Decoder, bytes: usize) -> Self {
        FrameReader {
            buf: vec![0; bytes],
            start: 0,
            end: 0,
            decoder,
            opener: None,
        }
    }

    /// Grows the buffer to at least `bytes`, so one `read` can take many frames at once.
    pub fn reserve(&mut self, bytes: usize) {
        if self.buf.len() < bytes {
            self.buf.resize(bytes, 0);
        }
    }

    /// Switches the decoder (after the handshake).
    pub fn set_decoder(&mut self, decoder: Decoder) {
        self.decoder = match self.opener {
            Some(_) => decoder.sealed(TAG_BYTES),
            None => decoder,
        };
    }

    /// From the next frame on, every frame is sealed: open it with `opener` before decoding.
    pub fn set_opener(&mut self, opener: Opener) {
        self.opener = Some(opener);
        self.decoder = self.decoder.sealed(TAG_BYTES);
    }

    /// Decodes the next whole frame already buffered (opening it first on a sealed stream);
    /// returns the message and where its payload sits (see [`FrameReader::payload`]). The
    /// frame is consumed.
    ///
    /// # Errors
    /// A malformed frame, or a sealed frame that fails authentication.
    pub fn next_buffered(&mut self) -> Result<Option<(Message, Range<usize>)>, WireError> {
        let Some(header_bytes) = self.buf[self.start..self.end].first_chunk::<HEADER_LEN>() else {
            self.make_room(HEADER_LEN);
            return Ok(None);
        };
        let header_bytes = *header_bytes;
        let header = self.decoder.decode_header(&header_bytes)?;
        let frame_len = HEADER_LEN + header.wire_len;
        if self.end - self.start < frame_len {
            debug_assert!(frame_len <= HEADER_LEN + MAX_BODY_BYTES + TAG_BYTES);
            self.make_room(frame_len);
            return Ok(None);
        }
        let body_start = self.start + HEADER_LEN;
        let frame_end = self.start + frame_len;
        let body_len = match &mut self.opener {
            Some(opener) => opener
                .open(&header_bytes, &mut self.buf[body_start..frame_end])
                .map_err(|e| WireError::Unauthentic { counter: e.counter })?,
            None => header.wire_len,
        };
        let body_end = body_start + body_len;
        let (message, payload) = self
            .decoder
            .decode_body(header, &self.buf[body_start..body_end])?;
        // A payload is always the tail of its (plaintext) body.
        let range = body_end - payload.len()..body_end;
        self.start = frame_end;
        Ok(Some((message, range)))
    }

    /// The payload bytes of the frame last returned by [`FrameReader::next_buffered`]; valid
    /// until the next call that reads or decodes.
    pub fn payload(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// One `read` into the buffer; returns the bytes read (0 at end of stream). Decode what
    /// is buffered between calls: the buffer grows only by what one read needs.
    ///
    /// # Errors
    /// The read's error, including `WouldBlock` on a non-blocking socket.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.end == self.buf.len() {
            // Compact, and grow in large steps: never read a byte at a time.
            self.make_room(self.end - self.start + (64 << 10));
        }
        loop {
            match r.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until a whole frame is buffered and decodes it.
    ///
    /// # Errors
    /// I/O errors, malformed frames, or the peer closing.
    pub fn read_frame(&mut self, r: &mut impl Read) -> Result<(Message, Range<usize>), ReadError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            if self.fill(r)? == 0 {
                return Err(ReadError::Closed {
                    mid_frame: self.end > self.start,
                });
            }
        }
    }

    /// Bytes read and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when bytes of an incomplete frame are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    fn make_room(&mut self, frame_bytes: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.start >= frame_bytes {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.buf.len() < frame_bytes {
            self.buf.resize(frame_bytes, 0);
        }
    }
}

/// Writes one frame: the encoded header and body, then `payload` (page bytes of a `PageRun`),
/// with vectored writes so page bytes are not copied in user space.
///
/// # Errors
/// The socket's error.
pub fn write_frame(w: &mut impl Write, message: &Message, payload: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(64);
    encode(message, payload.len(), &mut head);
    write_all_vectored(w, &head, payload)
}

/// Sends an `Error` frame before giving up on a connection; a failure to send it is ignored
/// (the peer may already be gone).
pub fn send_error(w: &mut impl Write, code: ErrorCode, text: &str) {
    let _ = write_frame(
        w,
        &Message::Error {
            code,
            text: text.to_owned(),
        },
        &[],
    );
}

/// Encodes and writes the frames one side sends on one connection after the handshake:
/// sealed when the handshake was authenticated, plain otherwise.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    sealer: Option<Sealer>,
    scratch: Vec<u8>,
}

impl FrameEncoder {
    /// An encoder for a connection without a key: frames travel plain.
    pub fn plain() -> Self {
        FrameEncoder::default()
    }

    /// An encoder that seals every frame.
    pub fn sealed(sealer: Sealer) -> Self {
        FrameEncoder {
            sealer: Some(sealer),
            scratch: Vec::new(),
        }
    }

    /// Whether frames are sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
    }

    /// Appends one whole frame (header, fixed body, `payload`) to `out`, sealed if need be.
    /// Frames must reach the peer in the order they were encoded.
    pub fn encode(&mut self, message: &Message, payload: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        encode(message, payload.len(), out);
        out.extend_from_slice(payload);
        if let Some(sealer) = &mut self.sealer {
            let len_at = start + 4;
            let body_len = u32::from_le_bytes(out[len_at..len_at + 4].try_into().expect("4 bytes"));
            let with_tag = body_len + TAG_BYTES as u32;
            out[len_at..len_at + 4].copy_from_slice(&with_tag.to_le_bytes());
            sealer.seal(out, start);
        }
    }

    /// Writes one frame. A plain frame's payload is sent without copying it.
    ///
    /// # Errors
    /// The socket's error.
    pub fn write_frame(
        &mut self,
        w: &mut impl Write,
        message: &Message,
        payload: &[u8],
    ) -> io::Result<()> {
        if self.sealer.is_none() {
            return write_frame(w, message, payload);
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        self.encode(message, payload, &mut out);
        let result = write_all_slices(w, &mut [IoSlice::new(&out)]);
        self.scratch = out;
        result
    }

    /// Writes several frames with as few system calls as possible.
    ///
    /// # Errors
    /// The socket's error.
    pub fn write_frames(
        &mut self,
        w: &mut impl Write,
        frames: &[(Message, &[u8])],
    ) -> io::Result<()> {
        if self.sealer.is_none() {
            return write_frames(w, frames);
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let mut result = Ok(());
        for (message, payload) in frames {
            self.encode(message, payload, &mut out);
            // Sealed frames are copies: send them in bounded batches, so a large answer
            // never becomes one large buffer.
            if out.len() >= SEALED_BATCH_BYTES {
                result = write_all_slices(w, &mut [IoSlice::new(&out)]);
                out.clear();
                if result.is_err() {
                    break;
                }
            }
        }
        if result.is_ok() && !out.is_empty() {
            result = write_all_slices(w, &mut [IoSlice::new(&out)]);
        }
        // Keep a scratch buffer no larger than a few frames.
        if out.capacity() <= 4 * (HEADER_LEN + MAX_BODY_BYTES) {
            self.scratch = out;
        }
        result
    }

    /// Sends an `Error` frame before giving up on a connection; a failure to send it is
    /// ignored (the peer may already be gone).
    pub fn send_error(&mut self, w: &mut impl Write, code: ErrorCode, text: &str) {
        let error = Message::Error {
            code,
            text: text.to_owned(),
        };
        let _ = self.write_frame(w, &error, &[]);
    }
}

fn write_all_vectored(w: &mut impl Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    write_all_slices(w, &mut [IoSlice::new(a), IoSlice::new(b)])
}

/// Sealed bytes [`FrameEncoder::write_frames`] gathers before it writes them.
const SEALED_BATCH_BYTES: usize = 1 << 20;

/// Most frames [`write_frames`] sends per `writev` (two slices each; IOV_MAX is 1024).
const FRAMES_PER_WRITE: usize = 256;

/// Writes several frames with as few `writev` calls as possible: each system call costs
/// microseconds here, so batching frames is what keeps small page runs fast.
///
/// # Errors
/// The socket's error.
pub fn write_frames(w: &mut impl Write, frames: &[(Message, &[u8])]) -> io::Result<()> {
    for batch in frames.chunks(FRAMES_PER_WRITE) {
        let mut heads = Vec::with_capacity(batch.len() * 32);
        let mut ends = Vec::with_capacity(batch.len());
        for (message, payload) in batch {
            encode(message, payload.len(), &mut heads);
            ends.push(heads.len());
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        let mut start = 0;
        for ((_, payload), &end) in batch.iter().zip(&ends) {
            slices.push(IoSlice::new(&heads[start..end]));
            if !payload.is_empty() {
                slices.push(IoSlice::new(payload));
            }
            start = end;
        }
        write_all_slices(w, &mut slices)?;
    }
    Ok(())
}

fn write_all_slices(w: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while slices.iter().any(|s| !s.is_empty()) {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PageRange;

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn test_reads_frames_split_at_any_point() {
        let mut wire = Vec::new();
        let pages: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        let r = PageRange { first: 4, count: 3 };
        write_frame(&mut wire, &Message::PageRun(r), &pages).unwrap();
        write_frame(&mut wire, &Message::BulkDone, &[]).unwrap();
        for step in [1, 7, 4096, 1 << 20] {
            let mut reader = FrameReader::new(Decoder::session(4096, 100));
            let mut src = Trickle { data: &wire, step };
            let (m, p) = reader.read_frame(&mut src).unwrap();
            assert_eq!(m, Message::PageRun(r));
            assert_eq!(reader.payload(p), pages.as_slice());
            assert_eq!(reader.read_frame(&mut src).unwrap().0, Message::BulkDone);
            assert!(matches!(
                reader.read_frame(&mut src),
                Err(ReadError::Closed { mid_frame: false })
            ));
        }
    }

    /// A writer that takes at most `step` bytes per call.
    struct Dribble {
        out: Vec<u8>,
        step: usize,
    }

    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_write_frames_survives_partial_writes() {
        let pages = vec![3u8; 2 * 4096];
        let frames: Vec<(Message, &[u8])> = (0..300)
            .map(|i| {
                if i % 2 == 0 {
                    (
                        Message::PageRun(PageRange { first: i, count: 2 }),
                        pages.as_slice(),
                    )
                } else {
                    (Message::ZeroRun(PageRange { first: i, count: 1 }), &[][..])
                }
            })
            .collect();
        for step in [1, 1000, 1 << 20] {
            let mut w = Dribble {
                out: Vec::new(),
                step,
            };
            write_frames(&mut w, &frames).unwrap();
            let mut reader = FrameReader::new(Decoder::session(4096, 1000));
            let mut src = w.out.as_slice();
            for (message, payload) in &frames {
                let (m, p) = reader.read_frame(&mut src).unwrap();
                assert_eq!(&m, message);
                assert_eq!(reader.payload(p), *payload);
            }
        }
    }

    #[test]
    fn test_truncated_frame_reports_mid_frame_close() {
        let mut wire = Vec::new();
        write_frame(
            &mut wire,
            &Message::Request(PageRange { first: 1, count: 1 }),
            &[],
        )
        .unwrap();
        wire.pop();
        let mut reader = FrameReader::new(Decoder::session(4096, 100));
        assert!(matches!(
            reader.read_frame(&mut wire.as_slice()),
            Err(ReadError::Closed { mid_frame: true })
        ));
    }
    fn sealed_pair(seed: u8) -> (FrameEncoder, FrameReader) {
        let (sealer, _) = crate::seal::test_secrets(seed).client();
        let (_, opener) = crate::seal::test_secrets(seed).server();
        let mut reader = FrameReader::new(Decoder::session(4096, 100));
        reader.set_opener(opener);
        (FrameEncoder::sealed(sealer), reader)
    }

    fn sealed_stream(encoder: &mut FrameEncoder) -> (Vec<u8>, Vec<usize>) {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        let pages: Vec<u8> = (0..2 * 4096).map(|i| (i % 253) as u8).collect();
        for message in [
            Message::PageRun(PageRange { first: 7, count: 2 }),
            Message::Heartbeat,
            Message::ZeroRun(PageRange { first: 9, count: 3 }),
        ] {
            let payload: &[u8] = if matches!(message, Message::PageRun(_)) {
                &pages
            } else {
                &[]
            };
            encoder.write_frame(&mut wire, &message, payload).unwrap();
            ends.push(wire.len());
        }
        (wire, ends)
    }

    #[test]
    fn test_sealed_frames_round_trip_and_hide_their_bytes() {
        let (mut encoder, mut reader) = sealed_pair(1);
        let (wire, _) = sealed_stream(&mut encoder);
        let plain: Vec<u8> = (0..2 * 4096).map(|i| (i % 253) as u8).collect();
        assert!(
            !wire.windows(64).any(|w| w == &plain[4096..4160]),
            "page bytes travel encrypted"
        );
        let mut src = wire.as_slice();
        let (m, p) = reader.read_frame(&mut src).unwrap();
        assert_eq!(m, Message::PageRun(PageRange { first: 7, count: 2 }));
        assert_eq!(reader.payload(p), plain.as_slice());
        assert_eq!(reader.read_frame(&mut src).unwrap().0, Message::Heartbeat);
        assert_eq!(
            reader.read_frame(&mut src).unwrap().0,
            Message::ZeroRun(PageRange { first: 9, count: 3 })
        );
    }

    /// Reads every frame of `wire`; returns the messages before the first error and whether
    /// it ended with an authentication failure.
    fn read_all(reader: &mut FrameReader, wire: &[u8]) -> (Vec<Message>, Option<ReadError>) {
        let mut src = wire;
        let mut got = Vec::new();
        loop {
            match reader.read_frame(&mut src) {
                Ok((m, _)) => got.push(m),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    #[test]
    fn test_any_flipped_bit_ends_the_stream_before_the_frame_is_decoded() {
        let (mut encoder, _) = sealed_pair(2);
        let (wire, ends) = sealed_stream(&mut encoder);
        // Every byte of the second and third frames (header, body, tag), one bit each.
        for at in ends[0]..wire.len() {
            let mut bad = wire.clone();
            bad[at] ^= 1 << (at % 8);
            let (_, mut reader) = sealed_pair(2);
            let (got, err) = read_all(&mut reader, &bad);
            let before = if at < ends[1] { 1 } else { 2 };
            assert_eq!(got.len(), before, "byte {at}: {got:?}");
            assert!(
                !matches!(err, Some(ReadError::Closed { mid_frame: false })),
                "byte {at}: the flip went unnoticed"
            );
        }
    }

    #[test]
    fn test_replayed_reordered_and_foreign_frames_fail() {
        let (mut encoder, _) = sealed_pair(3);
        let (wire, ends) = sealed_stream(&mut encoder);
        let first = &wire[..ends[0]];
        // The first frame again after itself: a replay.
        let (_, mut reader) = sealed_pair(3);
        let (got, err) = read_all(&mut reader, &[first, first].concat());
        assert_eq!(got.len(), 1);
        assert!(
            matches!(err, Some(ReadError::Wire(WireError::Unauthentic { .. }))),
            "{err:?}"
        );
        // The second frame first: reordered.
        let (_, mut reader) = sealed_pair(3);
        let (got, err) = read_all(&mut reader, &wire[ends[0]..ends[1]]);
        assert!(got.is_empty());
        assert!(
            matches!(err, Some(ReadError::Wire(WireError::Unauthentic { .. }))),
            "{err:?}"
        );
        // A frame sealed for another connection (other keys).
        let (mut other, _) = sealed_pair(4);
        let (foreign, _) = sealed_stream(&mut other);
        let (_, mut reader) = sealed_pair(3);
        let (got, err) = read_all(&mut reader, &foreign);
        assert!(got.is_empty());
        assert!(
            matches!(err, Some(ReadError::Wire(WireError::Unauthentic { .. }))),
            "{err:?}"
        );
    }

    /// Records the size of every write.
    #[derive(Default)]
    struct Writes {
        bytes: Vec<u8>,
        sizes: Vec<usize>,
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.extend_from_slice(buf);
            self.sizes.push(buf.len());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_many_sealed_frames_go_in_bounded_batches_and_all_arrive() {
        let (mut encoder, _) = sealed_pair(6);
        let page: Vec<u8> = (0..4096).map(|i| (i % 241) as u8).collect();
        let frames: Vec<(Message, &[u8])> = (0..100)
            .map(|i| {
                let r = PageRange { first: i, count: 1 };
                (Message::PageRun(r), page.as_slice())
            })
            .collect();
        let mut big = vec![0u8; 3 << 20];
        big.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let mut all = frames.clone();
        all.push((
            Message::PageRun(PageRange {
                first: 0,
                count: 768,
            }),
            big.as_slice(),
        ));
        all.extend(frames);
        let mut out = Writes::default();
        encoder.write_frames(&mut out, &all).unwrap();
        let frame_bytes = crate::wire::RANGE_FRAME_BYTES + TAG_BYTES;
        for &size in &out.sizes {
            assert!(
                size < SEALED_BATCH_BYTES + (3 << 20) + frame_bytes,
                "a write of {size} bytes"
            );
        }
        assert!(out.sizes.len() >= 2, "{:?}", out.sizes);
        let (_, mut reader) = sealed_pair(6);
        reader.set_decoder(Decoder::session(4096, 1000));
        let mut wire = out.bytes.as_slice();
        for (message, payload) in &all {
            let (m, range) = reader.read_frame(&mut wire).unwrap();
            assert_eq!(&m, message);
            assert_eq!(reader.payload(range), *payload);
        }
    }

    #[test]
    fn test_a_truncated_tag_never_yields_the_frame() {
        let (mut encoder, _) = sealed_pair(5);
        let (wire, ends) = sealed_stream(&mut encoder);
        for cut in 1..=16 {
            let (_, mut reader) = sealed_pair(5);
            let (got, err) = read_all(&mut reader, &wire[..ends[0] - cut]);
            assert!(got.is_empty(), "cut {cut}");
            assert!(
                matches!(err, Some(ReadError::Closed { mid_frame: true })),
                "cut {cut}: {err:?}"
            );
        }
        // A header that claims less than a tag.
        let (_, mut reader) = sealed_pair(5);
        let mut short = wire[..HEADER_LEN].to_vec();
        short[4..8].copy_from_slice(&8u32.to_le_bytes());
        let (_, err) = read_all(&mut reader, &short);
        assert!(matches!(err, Some(ReadError::Wire(_))), "{err:?}");
    }
}
