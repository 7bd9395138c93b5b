//! Parse errors and where they happened.
//!
//! Every error of the parser and of decoding carries a [`Location`]: the
//! byte offset and line in the input, and as much of the HL7 position
//! (segment, field, repetition, component, subcomponent) as is known. The
//! offset and line are those of the whole input when the message was parsed
//! with its [`Origin`](crate::Origin) (see [`Piece::parse`](crate::Piece::parse)).

use std::fmt;

use crate::dtm::DtmError;

/// A segment id: three ASCII bytes, an upper-case letter then upper-case
/// letters or digits (`MSH`, `OBX`, `ZL1`).
///
/// Invariant: only built from bytes that passed that check, so
/// [`as_str`](Self::as_str) is always the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentId([u8; 3]);

impl SegmentId {
    /// The id of the message header.
    pub const MSH: SegmentId = SegmentId(*b"MSH");

    /// The id at the start of `bytes`, if it is a valid one.
    pub fn from_prefix(bytes: &[u8]) -> Option<SegmentId> {
        match bytes {
            [a, b, c, ..]
                if a.is_ascii_uppercase()
                    && (b.is_ascii_uppercase() || b.is_ascii_digit())
                    && (c.is_ascii_uppercase() || c.is_ascii_digit()) =>
            {
                Some(SegmentId([*a, *b, *c]))
            }
            _ => None,
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// The id's three bytes.
    pub fn as_bytes(&self) -> &[u8; 3] {
        &self.0
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where something is in the input. HL7 positions are 1-based; `None` means
/// "not at that level" (an error about a whole segment has no field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Byte offset in the input.
    pub offset: usize,
    /// Line in the input, from 1. `\r`, `\n` and `\r\n` each end a line.
    pub line: usize,
    /// Index of the segment in its message, from 1 (MSH is 1).
    pub segment_index: Option<usize>,
    /// The segment's id, when it is a valid one.
    pub segment_id: Option<SegmentId>,
    /// Which occurrence of that id the segment is, from 1 (the second OBX
    /// is 2): the "segment sequence" of an ERR-2 error location.
    pub segment_sequence: Option<usize>,
    /// Field number (HL7 numbering: MSH-1 is the field separator).
    pub field: Option<usize>,
    /// Repetition of the field, from 1.
    pub repetition: Option<usize>,
    /// Component, from 1.
    pub component: Option<usize>,
    /// Subcomponent, from 1.
    pub subcomponent: Option<usize>,
}

impl Location {
    /// A location known only by its offset and line.
    pub fn at(offset: usize, line: usize) -> Location {
        Location {
            offset,
            line,
            segment_index: None,
            segment_id: None,
            segment_sequence: None,
            field: None,
            repetition: None,
            component: None,
            subcomponent: None,
        }
    }

    /// `SEG-f.c` style path when the segment is known (`OBX-5.2`), for
    /// messages to people.
    pub fn path(&self) -> Option<String> {
        let id = self.segment_id?;
        let mut s = id.to_string();
        if let Some(f) = self.field {
            s.push_str(&format!("-{f}"));
            if let Some(r) = self.repetition.filter(|r| *r > 1) {
                s.push_str(&format!("({r})"));
            }
            if let Some(c) = self.component {
                s.push_str(&format!(".{c}"));
                if let Some(sc) = self.subcomponent {
                    s.push_str(&format!(".{sc}"));
                }
            }
        }
        Some(s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(i) = self.segment_index {
            write!(f, ", segment {i}")?;
        }
        if let Some(path) = self.path() {
            write!(f, " ({path})")?;
        }
        write!(f, ", byte {}", self.offset)
    }
}

/// What went wrong while parsing or decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input has no bytes (or only blank lines).
    #[error("empty message")]
    Empty,
    /// The first segment is not MSH.
    #[error("message does not start with an MSH segment")]
    NotMsh,
    /// `MSH` with nothing after it: no field separator (MSH-1).
    #[error("MSH ends before its field separator (MSH-1)")]
    MissingFieldSeparator,
    /// MSH-2 is not 4 or 5 characters long (a truncated header such as
    /// `MSH|^~`).
    #[error("MSH-2 has {found} encoding characters; 4 or 5 are required")]
    BadEncodingCharacters {
        /// How many there were.
        found: usize,
    },
    /// A delimiter that cannot be one.
    #[error("delimiter {byte:#04x} is not allowed: {reason}")]
    InvalidDelimiter {
        /// The byte.
        byte: u8,
        /// Why not.
        reason: &'static str,
    },
    /// Two delimiters are the same character.
    #[error("delimiter {:?} is used twice", char::from(*byte))]
    DuplicateDelimiter {
        /// The repeated byte.
        byte: u8,
    },
    /// A line that does not start with a segment id followed by the field
    /// separator.
    #[error("not a segment: {found:?} (a segment starts with a 3-character id, upper-case letters or digits, then the field separator)")]
    InvalidSegment {
        /// The first bytes of the line, lossily as text.
        found: String,
    },
    /// A second MSH inside one message.
    #[error("a second MSH inside one message (split the input into messages first)")]
    UnexpectedMsh,
    /// A field the standard requires is absent or empty.
    #[error("required field {name} is missing")]
    MissingField {
        /// The field, as `MSH-10`.
        name: &'static str,
    },
    /// MSH-18 names a character set this crate does not support.
    #[error("unsupported character set {name:?} in MSH-18 (ASCII, UNICODE UTF-8 and 8859/1 are supported)")]
    UnknownCharset {
        /// The name as sent.
        name: String,
    },
    /// MSH-12 is not a version from 2.3 to 2.8.
    #[error("unsupported HL7 version {version:?} in MSH-12 (2.3 to 2.8 are accepted)")]
    UnsupportedVersion {
        /// The version as sent.
        version: String,
    },
    /// A DTM value that does not parse.
    #[error("invalid date/time {value:?}: {reason}")]
    InvalidDatetime {
        /// The value as sent.
        value: String,
        /// Why.
        reason: DtmError,
    },
    /// Bytes that are not UTF-8 in a UTF-8 message (directly or through a
    /// `\X..\` escape).
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A byte above 0x7F in an ASCII message.
    #[error("byte {byte:#04x} is not ASCII, the character set of the message")]
    NonAscii {
        /// The byte.
        byte: u8,
    },
}

/// An error of the parser or of decoding a value: what and where.
///
/// Boxed so that `Result<_, ParseError>` stays one word wide.
#[derive(Clone, PartialEq, Eq)]
pub struct ParseError(Box<(ErrorKind, Location)>);

impl ParseError {
    /// A new error.
    pub fn new(kind: ErrorKind, location: Location) -> ParseError {
        ParseError(Box::new((kind, location)))
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0 .0
    }

    /// Where.
    pub fn location(&self) -> &Location {
        &self.0 .1
    }
}

impl fmt::Debug for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParseError")
            .field("kind", self.kind())
            .field("location", self.location())
            .finish()
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.kind(), self.location())
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind() {
            ErrorKind::InvalidDatetime { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Lossy text of at most `max` bytes of `bytes`, for error messages only.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let end = bytes.len().min(max);
    String::from_utf8_lossy(bytes.get(..end).unwrap_or_default()).into_owned()
}
