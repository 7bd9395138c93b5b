//! Cutting an input (an HTTP body, a file) into messages.
//!
//! Rules, line by line (`\r`, `\n`, `\r\n`, mixed; see [`Piece`] for what
//! comes out):
//! - A line starting with `MSH` followed by a non-alphanumeric byte (or
//!   nothing) starts a message, which runs up to the next message start.
//! - Blank lines (empty, or spaces and tabs only) are ignored everywhere.
//! - Batch envelope lines (`FHS`, `BHS`, `BTS`, `FTS`) end any message and
//!   come out as [`PieceKind::Envelope`]: not an item, neither stored nor
//!   rejected.
//! - Non-blank lines before the first message, or between a message's last
//!   segment-like line and the next message, are garbage: one
//!   [`PieceKind::Garbage`] piece (one rejected item) per run. A line is
//!   segment-like when it starts with a valid segment id followed by the
//!   message's field separator (or nothing). A bad line *followed by*
//!   segments stays inside its message, where the parser reports it
//!   precisely.
//! - A UTF-8 byte order mark at the very start is skipped.

use std::ops::Range;

use crate::error::{ParseError, SegmentId};
use crate::lines::{is_blank, Lines};
use crate::message::{Message, Origin};

/// What a piece of the input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    /// A message: starts with `MSH`. Parse it with [`Piece::parse`].
    Message,
    /// Bytes that are not a message: one rejected item.
    Garbage,
    /// One batch envelope line (`FHS`, `BHS`, `BTS`, `FTS`): not an item.
    Envelope,
}

/// A piece of the input: `start..end` in it (without the final line's
/// terminator) and the line it starts on (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Piece {
    /// What it is.
    pub kind: PieceKind,
    /// Offset of the first byte.
    pub start: usize,
    /// Offset just past the last byte.
    pub end: usize,
    /// Line of the first byte, from 1.
    pub line: usize,
}

impl Piece {
    /// The byte range.
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    /// The piece's bytes in `input` (the input it was split from; another
    /// input gives whatever is at that range, or nothing).
    pub fn bytes<'a>(&self, input: &'a [u8]) -> &'a [u8] {
        input.get(self.range()).unwrap_or_default()
    }

    /// Where the piece starts, for [`Message::parse_at`].
    pub fn origin(&self) -> Origin {
        Origin {
            offset: self.start,
            line: self.line,
        }
    }

    /// Parses the piece as a message, with locations in `input`.
    pub fn parse<'a>(&self, input: &'a [u8]) -> Result<Message<'a>, ParseError> {
        Message::parse_at(self.bytes(input), self.origin())
    }
}

fn is_msh_start(s: &[u8]) -> bool {
    s.starts_with(b"MSH") && s.get(3).is_none_or(|b| !b.is_ascii_alphanumeric())
}

fn is_envelope(s: &[u8]) -> bool {
    matches!(s.get(..3), Some(b"FHS" | b"BHS" | b"BTS" | b"FTS"))
        && s.get(3).is_none_or(|b| !b.is_ascii_alphanumeric())
}

fn is_segment_like(s: &[u8], fs: Option<u8>) -> bool {
    SegmentId::from_prefix(s).is_some()
        && match (s.get(3), fs) {
            (None, _) => true,
            (Some(b), Some(fs)) => *b == fs,
            // The header has no separator: any id followed by punctuation.
            (Some(b), None) => !b.is_ascii_alphanumeric(),
        }
}

struct Open {
    start: usize,
    line: usize,
    fs: Option<u8>,
    last_segment_end: usize,
    /// Non-segment lines since the last segment-like one: (start, line, end).
    tail: Option<(usize, usize, usize)>,
}

/// Cuts `input` into messages, garbage and envelope lines, in input order.
/// Total: any bytes give pieces that cover every non-blank line once.
pub fn split_messages(input: &[u8]) -> Vec<Piece> {
    let start = if input.starts_with(&[0xEF, 0xBB, 0xBF]) {
        3
    } else {
        0
    };
    let mut out = Vec::new();
    let mut open: Option<Open> = None;
    let mut garbage: Option<(usize, usize, usize)> = None;

    let close = |open: &mut Option<Open>,
                 garbage: &mut Option<(usize, usize, usize)>,
                 out: &mut Vec<Piece>| {
        if let Some(m) = open.take() {
            out.push(Piece {
                kind: PieceKind::Message,
                start: m.start,
                end: m.last_segment_end,
                line: m.line,
            });
            if let Some((start, line, end)) = m.tail {
                out.push(Piece {
                    kind: PieceKind::Garbage,
                    start,
                    end,
                    line,
                });
            }
        }
        if let Some((start, line, end)) = garbage.take() {
            out.push(Piece {
                kind: PieceKind::Garbage,
                start,
                end,
                line,
            });
        }
    };

    for l in Lines::new(input, start, 1) {
        let s = input.get(l.start..l.end).unwrap_or_default();
        if is_blank(s) {
            continue;
        }
        if is_msh_start(s) {
            close(&mut open, &mut garbage, &mut out);
            open = Some(Open {
                start: l.start,
                line: l.number,
                fs: s.get(3).copied(),
                last_segment_end: l.end,
                tail: None,
            });
        } else if is_envelope(s) {
            close(&mut open, &mut garbage, &mut out);
            out.push(Piece {
                kind: PieceKind::Envelope,
                start: l.start,
                end: l.end,
                line: l.number,
            });
        } else if let Some(m) = open.as_mut() {
            if is_segment_like(s, m.fs) {
                m.last_segment_end = l.end;
                m.tail = None;
            } else {
                let (start, line) = m.tail.map_or((l.start, l.number), |(s, n, _)| (s, n));
                m.tail = Some((start, line, l.end));
            }
        } else {
            let (start, line) = garbage.map_or((l.start, l.number), |(s, n, _)| (s, n));
            garbage = Some((start, line, l.end));
        }
    }
    close(&mut open, &mut garbage, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(input: &[u8]) -> Vec<(PieceKind, String, usize)> {
        split_messages(input)
            .iter()
            .map(|p| {
                (
                    p.kind,
                    String::from_utf8_lossy(p.bytes(input)).into_owned(),
                    p.line,
                )
            })
            .collect()
    }

    #[test]
    fn sample_file_has_two_messages() {
        let input = include_bytes!("../../../reference-trial/samples/lab-results.hl7");
        let pieces = split_messages(input);
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.kind == PieceKind::Message));
        assert_eq!(pieces[0].line, 1);
        assert_eq!(pieces[1].line, 7);
        for p in &pieces {
            let m = p.parse(input).unwrap();
            assert_eq!(m.msh().message_type().code, "ORU");
        }
    }

    #[test]
    fn mixed_terminators_and_blank_lines() {
        let input = b"MSH|^~\\&|A\r\nPID|1\rOBX|1\n\n  \r\nMSH|^~\\&|B\rPID|2\r\n\r\n";
        let k = kinds(input);
        assert_eq!(k.len(), 2);
        assert_eq!(
            k[0],
            (PieceKind::Message, "MSH|^~\\&|A\r\nPID|1\rOBX|1".into(), 1)
        );
        assert_eq!(k[1], (PieceKind::Message, "MSH|^~\\&|B\rPID|2".into(), 6));
    }

    #[test]
    fn garbage_before_between_and_after() {
        let input = b"hello\nworld\nMSH|^~\\&|A\nPID|1\n-- junk --\n\nmore junk\nMSH|^~\\&|B\nPID|2\ntrailer";
        let k = kinds(input);
        assert_eq!(
            k,
            vec![
                (PieceKind::Garbage, "hello\nworld".into(), 1),
                (PieceKind::Message, "MSH|^~\\&|A\nPID|1".into(), 3),
                (PieceKind::Garbage, "-- junk --\n\nmore junk".into(), 5),
                (PieceKind::Message, "MSH|^~\\&|B\nPID|2".into(), 8),
                (PieceKind::Garbage, "trailer".into(), 10),
            ]
        );
    }

    #[test]
    fn bad_line_inside_a_message_stays_in_it() {
        let input = b"MSH|^~\\&|A\nPID|1\nnot a segment\nOBX|1\n";
        let k = kinds(input);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].1, "MSH|^~\\&|A\nPID|1\nnot a segment\nOBX|1");
    }

    #[test]
    fn envelopes_bom_and_empty() {
        let input = b"\xEF\xBB\xBFFHS|^~\\&\rBHS|^~\\&\rMSH|^~\\&|A\rPID|1\rBTS|1\rFTS|1\r";
        let k = kinds(input);
        assert_eq!(
            k.iter().map(|k| k.0).collect::<Vec<_>>(),
            vec![
                PieceKind::Envelope,
                PieceKind::Envelope,
                PieceKind::Message,
                PieceKind::Envelope,
                PieceKind::Envelope
            ]
        );
        assert_eq!(split_messages(b""), vec![]);
        assert_eq!(split_messages(b"\r\n\n  \t\r"), vec![]);
        assert_eq!(kinds(b"MSH")[0].0, PieceKind::Message);
        assert_eq!(kinds(b"MSHX|")[0].0, PieceKind::Garbage);
        // A header cut before its separator keeps its segments: one item.
        assert_eq!(kinds(b"MSH\rPID|1\rOBX|1").len(), 1);
    }

    #[test]
    fn parse_errors_carry_input_positions() {
        let input = b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1\nPID|1\n\nMSH|^~\\&|A|B|C|D|20260302||ORU^R01|2|P|2.5.1\nPID|1\nbad\nOBX|1";
        let pieces = split_messages(input);
        assert_eq!(pieces.len(), 2);
        assert!(pieces[0].parse(input).is_ok());
        let e = pieces[1].parse(input).unwrap_err();
        assert_eq!(e.location().line, 6);
        assert_eq!(
            e.location().offset,
            input.windows(3).position(|w| w == b"bad").unwrap()
        );
        assert_eq!(e.location().segment_index, Some(3));
    }
}
