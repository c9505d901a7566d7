//! Pages onto the wire: pieces (zero runs, data runs) as `ZeroRun`/`PageRun` frames in few
//! writes, shared by the urgent answers and the push.

use std::net::TcpStream;
use std::sync::atomic::Ordering;

use common::framed::FrameEncoder;
use common::wire::{MAX_PAYLOAD_BYTES, Message, PageRange, RANGE_FRAME_BYTES};

use super::Session;
use crate::source::{PageBytes, Piece};

impl Session<'_> {
    /// Sends pieces as ZeroRun/PageRun frames, batched into few writes; returns (zero
    /// pages, data pages).
    pub(super) fn send_pieces(
        &self,
        conn: &mut TcpStream,
        tx: &mut FrameEncoder,
        pieces: &[Piece],
    ) -> std::io::Result<(u64, u64)> {
        let page_size = self.source.page_size();
        let max_pages = (MAX_PAYLOAD_BYTES as u64 / page_size).max(1);
        let (mut zero, mut data) = (0, 0);
        let corrupted = self.corrupted_copy(pieces);
        // Only the precopy pause reads which pages went as zero.
        let track_zero = self.switch.engine.is_some();
        let mut frames: Vec<(Message, &[u8])> = Vec::with_capacity(pieces.len());
        // What keeps the bytes in `frames` put (a cached source's pins) until they are written.
        let mut held = Vec::new();
        for piece in pieces {
            match *piece {
                Piece::Zero { first, count } => {
                    frames.push((Message::ZeroRun(PageRange { first, count }), &[]));
                    if track_zero {
                        self.sent_zero.set_range(first, count);
                    }
                    zero += count;
                }
                Piece::Data { first, count } => {
                    if track_zero {
                        self.sent_zero.clear_range(first, count);
                    }
                    let mut at = first;
                    while at < first + count {
                        let n = (first + count - at).min(max_pages);
                        let range = PageRange {
                            first: at,
                            count: n,
                        };
                        let bytes = match &corrupted {
                            Some((page, copy)) if (at..at + n).contains(page) => {
                                // Send the corrupt page on its own (test-only path).
                                let before = page - at;
                                if before > 0 {
                                    let r = PageRange {
                                        first: at,
                                        count: before,
                                    };
                                    let bytes = lend(&mut held, self.source.bytes(at, before));
                                    frames.push((Message::PageRun(r), bytes));
                                }
                                frames.push((
                                    Message::PageRun(PageRange {
                                        first: *page,
                                        count: 1,
                                    }),
                                    copy,
                                ));
                                at = page + 1;
                                continue;
                            }
                            _ => lend(&mut held, self.source.bytes(at, n)),
                        };
                        frames.push((Message::PageRun(range), bytes));
                        at += n;
                    }
                    data += count;
                }
            }
        }
        if !self.source.pages_intact() {
            // A read failed (a shrunk file, a store gone): the pieces may be wrong.
            let why = self.source.check_intact().err().map(|e| e.to_string());
            return Err(std::io::Error::other(why.unwrap_or_else(|| {
                "the source lost pages while they were read".to_owned()
            })));
        }
        tx.write_frames(conn, &frames)?;
        drop(held);
        let bytes: usize = frames
            .iter()
            .map(|(_, p)| RANGE_FRAME_BYTES + p.len())
            .sum();
        self.stats
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok((zero, data))
    }

    /// With fault injection on and the chosen page among `pieces`' data: that page's bytes
    /// with the first one flipped.
    fn corrupted_copy(&self, pieces: &[Piece]) -> Option<(u64, Vec<u8>)> {
        let page = self.config.corrupt_page?;
        let inside = pieces.iter().any(|p| matches!(*p, Piece::Data { first, count } if (first..first + count).contains(&page)));
        if !inside {
            return None;
        }
        let mut copy = self.source.bytes(page, 1).to_vec();
        copy[0] ^= 0xFF;
        Some((page, copy))
    }
}

/// The bytes of a read, its hold kept in `held` (the bytes stay put while it is).
fn lend<'a>(held: &mut Vec<Box<dyn Send + 'a>>, bytes: PageBytes<'a>) -> &'a [u8] {
    let (bytes, hold) = bytes.into_parts();
    held.extend(hold);
    bytes
}
