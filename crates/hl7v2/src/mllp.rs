//! MLLP framing (`0x0B payload 0x1C 0x0D`) as a pure state machine.
//!
//! [`MllpDecoder::feed`] takes whatever a read returned and gives the
//! complete frames it finished, in order, with errors in between. The
//! output depends only on the byte stream, never on how it was cut into
//! reads (a property test checks it): feeding byte by byte or all at once
//! gives the same list, provided [`MllpDecoder::finish`] is called at the
//! end of the stream.
//!
//! Between frames:
//! - CR, LF, space and tab are skipped silently (senders that end frames
//!   with `0x1C 0x0D 0x0A` are common);
//! - any other byte is garbage: a run is reported once, as
//!   [`FrameError::Garbage`] when the next start block arrives (or at
//!   `finish`).
//!
//! Inside a frame:
//! - a payload longer than `max_frame` gives [`FrameError::TooLarge`] once,
//!   and everything up to the frame's end (`0x1C 0x0D`) or the next start
//!   block is skipped: memory stays bounded by `max_frame`;
//! - `0x1C` not followed by `0x0D` gives [`FrameError::BadTrailer`]; the
//!   frame is dropped and the byte after `0x1C` is read as if between
//!   frames (so a start block there starts the next frame);
//! - a start block before the end gives [`FrameError::Unterminated`] for
//!   the partial frame, and starts a new frame.

/// Start of a frame (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End of a frame's payload (FS).
pub const END_BLOCK: u8 = 0x1C;
/// Follows [`END_BLOCK`].
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// A framing problem. `at` is the byte offset in the stream (from the
/// decoder's first byte) where it was noticed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes outside any frame (whitespace not counted).
    #[error("{bytes} bytes of garbage outside any frame, ending at stream offset {at}")]
    Garbage {
        /// Where the run ended.
        at: u64,
        /// How many bytes were skipped.
        bytes: u64,
    },
    /// A payload longer than the maximum; the frame is skipped.
    #[error("frame larger than {max} bytes at stream offset {at}; skipped")]
    TooLarge {
        /// Offset of the first byte over the limit.
        at: u64,
        /// The limit.
        max: usize,
    },
    /// An end block not followed by a carriage return; the frame is dropped.
    #[error("end block not followed by a carriage return at stream offset {at}; frame dropped")]
    BadTrailer {
        /// Offset of the byte that should have been `0x0D`.
        at: u64,
    },
    /// A start block inside a frame; the partial frame is dropped.
    #[error(
        "start block inside an unterminated frame at stream offset {at}; {bytes} bytes dropped"
    )]
    Unterminated {
        /// Offset of the new start block.
        at: u64,
        /// Payload bytes dropped.
        bytes: usize,
    },
    /// The stream ended inside a frame (from [`MllpDecoder::finish`]).
    #[error("stream ended inside a frame at offset {at}; {bytes} bytes dropped")]
    Truncated {
        /// The stream's length.
        at: u64,
        /// Payload bytes dropped.
        bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames.
    Idle,
    /// Reading a payload.
    InFrame,
    /// Read `0x1C`, expecting `0x0D`.
    EndSeen,
    /// Skipping an oversized frame.
    Skipping,
    /// Skipping, just read `0x1C`.
    SkippingEndSeen,
}

/// The MLLP decoder of one connection.
#[derive(Debug, Clone)]
pub struct MllpDecoder {
    max_frame: usize,
    state: State,
    buf: Vec<u8>,
    /// Garbage bytes in the current run between frames.
    garbage_run: u64,
    garbage_total: u64,
    /// Stream offset of the next byte fed.
    pos: u64,
}

fn is_space(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | b' ' | b'\t')
}

impl MllpDecoder {
    /// A decoder accepting payloads of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> MllpDecoder {
        MllpDecoder {
            max_frame,
            state: State::Idle,
            buf: Vec::new(),
            garbage_run: 0,
            garbage_total: 0,
            pos: 0,
        }
    }

    /// Bytes of garbage skipped so far (whitespace between frames not
    /// counted).
    pub fn garbage_bytes(&self) -> u64 {
        self.garbage_total
    }

    /// Payload bytes held for an unfinished frame (at most `max_frame`).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the decoder is between frames with nothing pending.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle && self.garbage_run == 0
    }

    /// Feeds the next bytes of the stream; returns the frames (payloads,
    /// without the framing bytes) and errors completed by them, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(rest) = data.get(i..).filter(|r| !r.is_empty()) {
            let at = self.pos + i as u64;
            match self.state {
                State::Idle => match rest.iter().position(|b| *b == START_BLOCK) {
                    Some(k) => {
                        self.count_garbage(rest.get(..k).unwrap_or_default());
                        if self.garbage_run > 0 {
                            out.push(Err(FrameError::Garbage {
                                at: at + k as u64,
                                bytes: self.garbage_run,
                            }));
                            self.garbage_run = 0;
                        }
                        self.buf.clear();
                        self.state = State::InFrame;
                        i += k + 1;
                    }
                    None => {
                        self.count_garbage(rest);
                        i = data.len();
                    }
                },
                State::InFrame => {
                    let k = rest
                        .iter()
                        .position(|b| *b == START_BLOCK || *b == END_BLOCK)
                        .unwrap_or(rest.len());
                    let room = self.max_frame.saturating_sub(self.buf.len());
                    if k > room {
                        out.push(Err(FrameError::TooLarge {
                            at: at + room as u64,
                            max: self.max_frame,
                        }));
                        self.buf = Vec::new();
                        self.state = State::Skipping;
                        i += room;
                        continue;
                    }
                    self.buf
                        .extend_from_slice(rest.get(..k).unwrap_or_default());
                    i += k;
                    match rest.get(k) {
                        Some(&START_BLOCK) => {
                            out.push(Err(FrameError::Unterminated {
                                at: at + k as u64,
                                bytes: self.buf.len(),
                            }));
                            self.buf.clear();
                            i += 1;
                        }
                        Some(_) => {
                            self.state = State::EndSeen;
                            i += 1;
                        }
                        None => {}
                    }
                }
                State::EndSeen => {
                    if rest.first() == Some(&CARRIAGE_RETURN) {
                        out.push(Ok(std::mem::take(&mut self.buf)));
                        i += 1;
                    } else {
                        out.push(Err(FrameError::BadTrailer { at }));
                        self.buf.clear();
                    }
                    self.state = State::Idle;
                }
                State::Skipping => match rest
                    .iter()
                    .position(|b| *b == START_BLOCK || *b == END_BLOCK)
                {
                    Some(k) => {
                        self.state = if rest.get(k) == Some(&START_BLOCK) {
                            self.buf.clear();
                            State::InFrame
                        } else {
                            State::SkippingEndSeen
                        };
                        i += k + 1;
                    }
                    None => i = data.len(),
                },
                State::SkippingEndSeen => {
                    if rest.first() == Some(&CARRIAGE_RETURN) {
                        self.state = State::Idle;
                        i += 1;
                    } else {
                        self.state = State::Skipping;
                    }
                }
            }
        }
        self.pos += data.len() as u64;
        out
    }

    /// Ends the stream: reports pending garbage or a frame cut short, and
    /// resets the decoder.
    pub fn finish(&mut self) -> Option<FrameError> {
        let at = self.pos;
        let err = match self.state {
            State::Idle if self.garbage_run > 0 => Some(FrameError::Garbage {
                at,
                bytes: self.garbage_run,
            }),
            State::InFrame | State::EndSeen => Some(FrameError::Truncated {
                at,
                bytes: self.buf.len(),
            }),
            _ => None,
        };
        self.state = State::Idle;
        self.garbage_run = 0;
        self.buf = Vec::new();
        err
    }

    fn count_garbage(&mut self, bytes: &[u8]) {
        let n = bytes.iter().filter(|b| !is_space(**b)).count() as u64;
        self.garbage_run += n;
        self.garbage_total += n;
    }
}

/// Frames `payload` for MLLP: `0x0B payload 0x1C 0x0D`. The payload must
/// not contain `0x0B` or `0x1C` (ER7 text never does; not checked).
pub fn mllp_encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(payload);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(dec: &mut MllpDecoder, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut out: Vec<_> = chunks.iter().flat_map(|c| dec.feed(c)).collect();
        out.extend(dec.finish().map(Err));
        out
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut input = mllp_encode(b"MSH|one");
        input.extend(mllp_encode(b"MSH|two"));
        let got = all(&mut MllpDecoder::new(1024), &[&input]);
        assert_eq!(got, vec![Ok(b"MSH|one".to_vec()), Ok(b"MSH|two".to_vec())]);
    }

    #[test]
    fn frame_split_across_reads_and_byte_by_byte() {
        let input = mllp_encode(b"MSH|^~\\&|split\rPID|1");
        let (a, b) = input.split_at(5);
        let mut dec = MllpDecoder::new(1024);
        assert!(dec.feed(a).is_empty());
        assert_eq!(dec.buffered(), 4);
        assert_eq!(dec.feed(b), vec![Ok(b"MSH|^~\\&|split\rPID|1".to_vec())]);
        let mut dec = MllpDecoder::new(1024);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            all(&mut dec, &bytes),
            vec![Ok(b"MSH|^~\\&|split\rPID|1".to_vec())]
        );
        // The trailer split between reads.
        let mut dec = MllpDecoder::new(1024);
        let (a, b) = input.split_at(input.len() - 1);
        assert!(dec.feed(a).is_empty());
        assert_eq!(dec.feed(b).len(), 1);
    }

    #[test]
    fn oversized_frame_then_resync() {
        let mut input = mllp_encode(&[b'x'; 20]);
        input.extend(mllp_encode(b"small"));
        let got = all(&mut MllpDecoder::new(10), &[&input]);
        assert_eq!(
            got,
            vec![
                Err(FrameError::TooLarge { at: 11, max: 10 }),
                Ok(b"small".to_vec())
            ]
        );
        // Oversized and never terminated: the next start block resyncs.
        let mut input = vec![START_BLOCK];
        input.extend([b'y'; 50]);
        input.extend(mllp_encode(b"ok"));
        let got = all(&mut MllpDecoder::new(10), &[&input[..7], &input[7..]]);
        assert_eq!(
            got,
            vec![
                Err(FrameError::TooLarge { at: 11, max: 10 }),
                Ok(b"ok".to_vec())
            ]
        );
        // Exactly at the limit is fine.
        assert_eq!(
            all(&mut MllpDecoder::new(5), &[&mllp_encode(b"12345")]),
            vec![Ok(b"12345".to_vec())]
        );
    }

    #[test]
    fn garbage_between_frames_is_counted() {
        let mut input = b"junk".to_vec();
        input.extend(mllp_encode(b"a"));
        input.extend(b"\r\n");
        input.extend(mllp_encode(b"b"));
        input.extend(b"xy\n");
        let mut dec = MllpDecoder::new(100);
        let got = all(&mut dec, &[&input]);
        assert_eq!(
            got,
            vec![
                Err(FrameError::Garbage { at: 4, bytes: 4 }),
                Ok(b"a".to_vec()),
                Ok(b"b".to_vec()),
                Err(FrameError::Garbage { at: 17, bytes: 2 }),
            ]
        );
        assert_eq!(dec.garbage_bytes(), 6);
    }

    #[test]
    fn end_block_without_cr_and_unterminated() {
        let mut input = vec![START_BLOCK, b'a', END_BLOCK, b'z'];
        input.extend(mllp_encode(b"good"));
        let got = all(&mut MllpDecoder::new(100), &[&input]);
        assert_eq!(
            got,
            vec![
                Err(FrameError::BadTrailer { at: 3 }),
                Err(FrameError::Garbage { at: 4, bytes: 1 }),
                Ok(b"good".to_vec())
            ]
        );
        // 0x1C then a start block: the next frame starts right there.
        let input = [
            START_BLOCK,
            b'a',
            END_BLOCK,
            START_BLOCK,
            b'b',
            END_BLOCK,
            CARRIAGE_RETURN,
        ];
        let got = all(&mut MllpDecoder::new(100), &[&input]);
        assert_eq!(
            got,
            vec![Err(FrameError::BadTrailer { at: 3 }), Ok(b"b".to_vec())]
        );
        // A start block inside a frame.
        let input = [
            START_BLOCK,
            b'a',
            b'b',
            START_BLOCK,
            b'c',
            END_BLOCK,
            CARRIAGE_RETURN,
        ];
        let got = all(&mut MllpDecoder::new(100), &[&input]);
        assert_eq!(
            got,
            vec![
                Err(FrameError::Unterminated { at: 3, bytes: 2 }),
                Ok(b"c".to_vec())
            ]
        );
        // The stream ends inside a frame.
        let got = all(&mut MllpDecoder::new(100), &[&[START_BLOCK, b'a']]);
        assert_eq!(got, vec![Err(FrameError::Truncated { at: 2, bytes: 1 })]);
    }

    #[test]
    fn empty_frame() {
        let got = all(&mut MllpDecoder::new(0), &[&mllp_encode(b"")]);
        assert_eq!(got, vec![Ok(vec![])]);
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        // Frames, garbage and stray framing bytes, mixed.
        let piece = prop_oneof![
            proptest::collection::vec(
                any::<u8>().prop_filter("no framing", |b| *b != START_BLOCK && *b != END_BLOCK),
                0..40
            )
            .prop_map(|p| mllp_encode(&p)),
            proptest::collection::vec(any::<u8>(), 0..10),
            Just(vec![START_BLOCK]),
            Just(vec![END_BLOCK]),
            Just(vec![CARRIAGE_RETURN, b'\n']),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_the_output(
            input in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            max in 0usize..50,
        ) {
            let whole = all(&mut MllpDecoder::new(max), &[&input]);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&input[last..p]);
                last = p;
            }
            chunks.push(&input[last..]);
            let mut dec = MllpDecoder::new(max);
            let pieces = all(&mut dec, &chunks);
            prop_assert_eq!(&pieces, &whole);
            let mut dec = MllpDecoder::new(max);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(&all(&mut dec, &bytes), &whole);
            for frame in whole.iter().flatten() {
                prop_assert!(frame.len() <= max);
            }
        }

        #[test]
        fn encoded_frames_come_back(payloads in proptest::collection::vec(
            proptest::collection::vec(any::<u8>().prop_filter("no framing", |b| *b != START_BLOCK && *b != END_BLOCK), 0..64), 0..6)
        ) {
            let input: Vec<u8> = payloads.iter().flat_map(|p| mllp_encode(p)).collect();
            let got = all(&mut MllpDecoder::new(64), &[&input]);
            let want: Vec<Result<Vec<u8>, FrameError>> = payloads.into_iter().map(Ok).collect();
            prop_assert_eq!(got, want);
        }
    }
}
