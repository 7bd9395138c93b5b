//! The zero-copy ER7 parser: [`Message`] and its views [`Segment`],
//! [`Field`], [`Repetition`], [`Component`] and [`Subcomponent`].
//!
//! [`Message::parse`] reads the delimiters from MSH-1/MSH-2, cuts the input
//! into segments (`\r`, `\n` or `\r\n`, mixed; blank lines and a leading
//! UTF-8 byte order mark skipped), checks each segment id, and decodes the
//! header ([`Msh`]): character set (MSH-18), version (MSH-12, 2.3 to 2.8),
//! type, control id. Fields and below are found on demand by scanning the
//! segment's slice, so parsing costs one pass over the bytes plus one small
//! `Vec` of segment spans.
//!
//! Invariants:
//! - Every view borrows the input (`'a`); [`Field::raw`] and friends are
//!   sub-slices of it. Views are `Copy` and cheap (a slice plus position).
//! - Field numbering is HL7's: `field(1)` of MSH is the field separator
//!   itself and `field(2)` the encoding characters, both literal (never
//!   split into components nor unescaped); `field(3)` is MSH-3, the sending
//!   application. For other segments `field(1)` is the first field after
//!   the id. `field(0)` is `None`.
//! - An absent field, repetition, component or subcomponent is `None`; a
//!   present but empty one is `Some` with an empty value. Splitting an
//!   empty value gives one empty child, so `a^` has components `a` and ``.
//! - Nothing here panics, whatever the bytes or the positions asked for.

use std::borrow::Cow;

use crate::charset::Charset;
use crate::delimiters::Delimiters;
use crate::error::{snippet, ErrorKind, Location, ParseError, SegmentId};
use crate::escape::{self, Decoded};
use crate::header::Msh;
use crate::lines::{is_blank, Lines};

/// Where a message's bytes start in the whole input, so that error
/// locations are those of the input (see [`crate::Piece::origin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Byte offset of the message's first byte.
    pub offset: usize,
    /// Line of the message's first byte, from 1.
    pub line: usize,
}

impl Origin {
    /// The start of an input: offset 0, line 1.
    pub const START: Origin = Origin { offset: 0, line: 1 };
}

impl Default for Origin {
    fn default() -> Self {
        Origin::START
    }
}

/// What every view needs to decode itself and say where it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub delims: Delimiters,
    pub charset: Charset,
    pub origin: Origin,
}

/// A segment's place in its message; offsets and lines relative to the
/// message (offset from 0, line from 1).
#[derive(Debug, Clone, Copy)]
struct SegSpan {
    start: usize,
    end: usize,
    line: usize,
    id: SegmentId,
    sequence: usize,
}

/// A parsed message, borrowing its input.
///
/// Built by [`Message::parse`]: the header is decoded and checked (a
/// message that comes back `Ok` has supported delimiters, character set
/// and version, and a control id), the rest is read on demand.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    bytes: &'a [u8],
    ctx: Ctx,
    segments: Vec<SegSpan>,
    msh: Msh<'a>,
}

impl<'a> Message<'a> {
    /// Parses one message (as cut by [`crate::split_messages`], or a whole
    /// MLLP frame). Locations count from the start of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Message<'a>, ParseError> {
        Message::parse_at(bytes, Origin::START)
    }

    /// Parses one message that starts at `origin` in a larger input, so that
    /// error locations are those of the input.
    pub fn parse_at(bytes: &'a [u8], origin: Origin) -> Result<Message<'a>, ParseError> {
        let at = |offset: usize, line: usize| {
            Location::at(
                origin.offset.saturating_add(offset),
                origin.line.saturating_add(line - 1),
            )
        };
        // A UTF-8 byte order mark is skipped, as `split_messages` does, so
        // that an MLLP payload parses like the same bytes in a file.
        let start = if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
            3
        } else {
            0
        };
        let mut lines = Lines::new(bytes, start, 1)
            .filter(|l| !is_blank(bytes.get(l.start..l.end).unwrap_or_default()));
        let Some(first) = lines.next() else {
            return Err(ParseError::new(ErrorKind::Empty, at(0, 1)));
        };
        let head = bytes.get(first.start..first.end).unwrap_or_default();
        let head_loc = |delta: usize, field: Option<usize>| Location {
            segment_index: Some(1),
            segment_id: SegmentId::from_prefix(head),
            segment_sequence: Some(1),
            field,
            ..at(first.start + delta, first.number)
        };
        if !head.starts_with(b"MSH") {
            return Err(ParseError::new(ErrorKind::NotMsh, head_loc(0, None)));
        }
        let Some(&fs) = head.get(3) else {
            return Err(ParseError::new(
                ErrorKind::MissingFieldSeparator,
                head_loc(3, Some(1)),
            ));
        };
        let after = head.get(4..).unwrap_or_default();
        let enc = after.split(|b| *b == fs).next().unwrap_or_default();
        let delims = Delimiters::new(fs, enc).map_err(|(i, kind)| match (i, &kind) {
            (0, ErrorKind::BadEncodingCharacters { .. }) => {
                ParseError::new(kind, head_loc(4, Some(2)))
            }
            (0, _) => ParseError::new(kind, head_loc(3, Some(1))),
            (i, _) => ParseError::new(kind, head_loc(3 + i, Some(2))),
        })?;

        let mut segments = Vec::with_capacity(16);
        let mut counts: Vec<(SegmentId, usize)> = Vec::with_capacity(8);
        for l in std::iter::once(first).chain(lines) {
            let s = bytes.get(l.start..l.end).unwrap_or_default();
            let id = SegmentId::from_prefix(s).filter(|_| s.len() == 3 || s.get(3) == Some(&fs));
            let loc = |id: Option<SegmentId>| Location {
                segment_index: Some(segments.len() + 1),
                segment_id: id,
                ..at(l.start, l.number)
            };
            let Some(id) = id else {
                return Err(ParseError::new(
                    ErrorKind::InvalidSegment {
                        found: snippet(s, 16),
                    },
                    loc(None),
                ));
            };
            if id == SegmentId::MSH && !segments.is_empty() {
                return Err(ParseError::new(ErrorKind::UnexpectedMsh, loc(Some(id))));
            }
            let sequence = match counts.iter_mut().find(|(i, _)| *i == id) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.push((id, 1));
                    1
                }
            };
            segments.push(SegSpan {
                start: l.start,
                end: l.end,
                line: l.number,
                id,
                sequence,
            });
        }

        let mut ctx = Ctx {
            delims,
            charset: Charset::Ascii,
            origin,
        };
        let msh_seg = |ctx: Ctx| Segment {
            ctx,
            raw: head,
            span: segments.first().copied().unwrap_or(SegSpan {
                start: first.start,
                end: first.end,
                line: first.number,
                id: SegmentId::MSH,
                sequence: 1,
            }),
            index: 1,
        };
        // MSH-18 is read before the character set is known: its names are ASCII.
        if let Some(f) = msh_seg(ctx).field(18) {
            let name = f
                .repetition(1)
                .and_then(|r| r.component(1))
                .map(|c| c.raw())
                .unwrap_or_default();
            ctx.charset =
                Charset::from_msh18(name).map_err(|kind| ParseError::new(kind, f.location()))?;
        }
        let msh = Msh::read(&msh_seg(ctx))?;
        Ok(Message {
            bytes,
            ctx,
            segments,
            msh,
        })
    }

    /// The decoded header.
    pub fn msh(&self) -> &Msh<'a> {
        &self.msh
    }

    /// The bytes this message was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The delimiters of MSH-1/MSH-2.
    pub fn delimiters(&self) -> Delimiters {
        self.ctx.delims
    }

    /// The character set of MSH-18.
    pub fn charset(&self) -> Charset {
        self.ctx.charset
    }

    /// Where the message starts in the whole input.
    pub fn origin(&self) -> Origin {
        self.ctx.origin
    }

    /// How many segments (blank lines not counted).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The segments in order, MSH first.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = Segment<'a>> + '_ {
        self.segments
            .iter()
            .enumerate()
            .map(|(i, s)| self.view(i + 1, *s))
    }

    /// The segment at `index`, from 1 (MSH is 1).
    pub fn segment(&self, index: usize) -> Option<Segment<'a>> {
        let span = *self.segments.get(index.checked_sub(1)?)?;
        Some(self.view(index, span))
    }

    /// The segments with this id, in order.
    pub fn segments_with_id<'s>(&'s self, id: &'s str) -> impl Iterator<Item = Segment<'a>> + 's {
        self.segments().filter(move |s| s.id() == id)
    }

    #[inline]
    fn view(&self, index: usize, span: SegSpan) -> Segment<'a> {
        Segment {
            ctx: self.ctx,
            raw: self.bytes.get(span.start..span.end).unwrap_or_default(),
            span,
            index,
        }
    }
}

/// One segment of a message.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    ctx: Ctx,
    raw: &'a [u8],
    span: SegSpan,
    index: usize,
}

impl<'a> Segment<'a> {
    /// The segment id, as `OBX`.
    pub fn id(&self) -> &'a str {
        std::str::from_utf8(self.raw.get(..3).unwrap_or_default()).unwrap_or_default()
    }

    /// The segment id as a value.
    pub fn segment_id(&self) -> SegmentId {
        self.span.id
    }

    /// Index in the message, from 1 (MSH is 1).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Which occurrence of its id this segment is, from 1.
    pub fn sequence(&self) -> usize {
        self.span.sequence
    }

    /// Line in the input.
    pub fn line(&self) -> usize {
        self.ctx.origin.line.saturating_add(self.span.line - 1)
    }

    /// Byte offset in the input.
    pub fn offset(&self) -> usize {
        self.ctx.origin.offset.saturating_add(self.span.start)
    }

    /// The segment's bytes, without its terminator.
    #[inline]
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The segment's location (no field).
    pub fn location(&self) -> Location {
        Location {
            segment_index: Some(self.index),
            segment_id: Some(self.span.id),
            segment_sequence: Some(self.span.sequence),
            ..Location::at(self.offset(), self.line())
        }
    }

    /// The location of field `n`, present or not (for "missing field"
    /// errors): the field's own offset when present, else the segment's end.
    pub fn field_location(&self, n: usize) -> Location {
        match self.field(n) {
            Some(f) => f.location(),
            None => Location {
                field: Some(n),
                offset: self.ctx.origin.offset.saturating_add(self.span.end),
                ..self.location()
            },
        }
    }

    fn is_msh(&self) -> bool {
        self.span.id == SegmentId::MSH
    }

    /// Field `n` in HL7 numbering (see the module docs for MSH-1 and
    /// MSH-2); `None` when the segment has fewer fields or `n` is 0.
    #[inline]
    pub fn field(&self, n: usize) -> Option<Field<'a>> {
        if n == 0 {
            return None;
        }
        let fs = self.ctx.delims.field();
        let rest = self.raw.get(4..)?;
        if self.is_msh() {
            if n == 1 {
                return Some(self.field_node(1, 3, self.raw.get(3..4)?, true));
            }
            let (off, piece) = Pieces::new(rest, 4, Some(fs)).nth(n - 2)?;
            Some(self.field_node(n, off, piece, n == 2))
        } else {
            let (off, piece) = Pieces::new(rest, 4, Some(fs)).nth(n - 1)?;
            Some(self.field_node(n, off, piece, false))
        }
    }

    /// The fields in order from field 1.
    pub fn fields(&self) -> impl Iterator<Item = Field<'a>> + 'a {
        let msh = self.is_msh();
        let sep = self.raw.get(3..4).filter(|_| msh);
        let mut number = 0;
        let mut pieces = self
            .raw
            .get(4..)
            .map(|r| Pieces::new(r, 4, Some(self.ctx.delims.field())));
        let this = *self;
        std::iter::from_fn(move || {
            number += 1;
            if number == 1 {
                if let Some(sep) = sep {
                    return Some(this.field_node(1, 3, sep, true));
                }
            }
            let (off, p) = pieces.as_mut()?.next()?;
            Some(this.field_node(number, off, p, msh && number == 2))
        })
    }

    /// How many fields the segment has (the last number `field` answers).
    pub fn field_count(&self) -> usize {
        match self.raw.get(4..) {
            None => usize::from(self.is_msh() && self.raw.len() > 3),
            Some(rest) => {
                let n = 1 + rest
                    .iter()
                    .filter(|b| **b == self.ctx.delims.field())
                    .count();
                if self.is_msh() {
                    n + 1
                } else {
                    n
                }
            }
        }
    }

    #[inline]
    fn field_node(&self, number: usize, offset: usize, raw: &'a [u8], literal: bool) -> Field<'a> {
        Field(Node {
            ctx: self.ctx,
            seg: SegInfo {
                id: self.span.id,
                index: small(self.index),
                sequence: small(self.span.sequence),
                line: small(self.span.line),
            },
            raw,
            offset: small(self.span.start + offset),
            field: small(number),
            rep: 0,
            comp: 0,
            sub: 0,
            literal,
        })
    }
}

/// Positions below are `u32` to keep views small (they are copied at
/// every step of an iteration); a message over 4 GiB would get saturated
/// locations, never a panic.
fn small(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Copy)]
struct SegInfo {
    id: SegmentId,
    index: u32,
    sequence: u32,
    line: u32,
}

/// The common part of field, repetition, component and subcomponent views.
#[derive(Debug, Clone, Copy)]
struct Node<'a> {
    raw: &'a [u8],
    ctx: Ctx,
    seg: SegInfo,
    /// Offset of `raw` in the message.
    offset: u32,
    field: u32,
    rep: u32,
    comp: u32,
    sub: u32,
    /// MSH-1 and MSH-2: never split nor unescaped.
    literal: bool,
}

#[derive(Clone, Copy)]
enum Level {
    Rep,
    Comp,
    Sub,
}

impl<'a> Node<'a> {
    #[inline]
    fn location(&self, delta: usize) -> Location {
        let nz = |n: u32| (n > 0).then_some(n as usize);
        Location {
            offset: self
                .ctx
                .origin
                .offset
                .saturating_add(self.offset as usize + delta),
            line: self
                .ctx
                .origin
                .line
                .saturating_add((self.seg.line as usize).saturating_sub(1)),
            segment_index: Some(self.seg.index as usize),
            segment_id: Some(self.seg.id),
            segment_sequence: Some(self.seg.sequence as usize),
            field: nz(self.field),
            repetition: nz(self.rep),
            component: nz(self.comp),
            subcomponent: nz(self.sub),
        }
    }

    #[inline]
    fn children(self, level: Level) -> Children<'a> {
        let d = self.ctx.delims;
        let sep = match (self.literal, level) {
            (true, _) => None,
            (false, Level::Rep) => Some(d.repetition()),
            (false, Level::Comp) => Some(d.component()),
            (false, Level::Sub) => Some(d.subcomponent()),
        };
        Children {
            parent: self,
            rest: Some(self.raw),
            pos: 0,
            index: 0,
            sep,
            level,
        }
    }

    #[inline]
    fn child(self, level: Level, n: usize) -> Option<Node<'a>> {
        self.children(level).nth(n.checked_sub(1)?)
    }

    #[inline]
    fn decode(
        &self,
        warnings: Option<&mut Vec<crate::escape::EscapeWarning>>,
    ) -> Result<Cow<'a, str>, ParseError> {
        if self.literal {
            // Delimiters are printable ASCII (checked when parsed).
            return Ok(Cow::Borrowed(
                std::str::from_utf8(self.raw).unwrap_or_default(),
            ));
        }
        // Most values have no escape: decode the bytes in place.
        if !self.raw.contains(&self.ctx.delims.escape()) {
            return self
                .ctx
                .charset
                .decode(self.raw)
                .map_err(|(i, kind)| ParseError::new(kind, self.location(i)));
        }
        escape::decode(
            self.raw,
            &self.ctx.delims,
            self.ctx.charset,
            &|delta| self.location(delta),
            warnings,
        )
    }
}

/// Splits a slice on a byte, with each piece's offset; `sep: None` yields
/// the whole slice once.
#[derive(Clone)]
struct Pieces<'a> {
    rest: Option<&'a [u8]>,
    offset: usize,
    sep: Option<u8>,
}

impl<'a> Pieces<'a> {
    #[inline]
    fn new(raw: &'a [u8], offset: usize, sep: Option<u8>) -> Pieces<'a> {
        Pieces {
            rest: Some(raw),
            offset,
            sep,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = (usize, &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<(usize, &'a [u8])> {
        let rest = self.rest?;
        let found = self.sep.and_then(|sep| rest.iter().position(|b| *b == sep));
        match found {
            Some(k) => {
                let offset = self.offset;
                self.rest = rest.get(k + 1..);
                self.offset += k + 1;
                Some((offset, rest.get(..k).unwrap_or_default()))
            }
            None => {
                self.rest = None;
                Some((self.offset, rest))
            }
        }
    }
}

/// The repetitions, components or subcomponents of a node, built in
/// place (a hand-written iterator: adapter chains cost twice as much here).
#[derive(Clone)]
struct Children<'a> {
    parent: Node<'a>,
    /// What is left to split; `None` once the last piece was given.
    rest: Option<&'a [u8]>,
    /// Offset of `rest` in the parent's slice.
    pos: usize,
    index: u32,
    sep: Option<u8>,
    level: Level,
}

impl<'a> Iterator for Children<'a> {
    type Item = Node<'a>;

    #[inline]
    fn next(&mut self) -> Option<Node<'a>> {
        let rest = self.rest?;
        let found = match self.sep {
            Some(sep) => rest.iter().position(|b| *b == sep),
            None => None,
        };
        let (raw, used) = match found {
            Some(k) => {
                self.rest = rest.get(k + 1..);
                (rest.get(..k).unwrap_or_default(), k + 1)
            }
            None => {
                self.rest = None;
                (rest, rest.len())
            }
        };
        let mut n = self.parent;
        n.raw = raw;
        n.offset = small(n.offset as usize + self.pos);
        self.pos += used;
        self.index = self.index.saturating_add(1);
        match self.level {
            Level::Rep => n.rep = self.index,
            Level::Comp => n.comp = self.index,
            Level::Sub => n.sub = self.index,
        }
        Some(n)
    }
}

macro_rules! value_methods {
    ($t:ident, $what:literal) => {
        impl<'a> $t<'a> {
            #[doc = concat!("The ", $what, "'s bytes as sent (escapes not decoded): a slice of the input.")]
            #[inline]
            pub fn raw(&self) -> &'a [u8] {
                self.0.raw
            }

            #[doc = concat!("Whether the ", $what, " is empty.")]
            pub fn is_empty(&self) -> bool {
                self.0.raw.is_empty()
            }

            #[doc = concat!("Whether the ", $what, " is the HL7 explicit null `\"\"`.")]
            pub fn is_null(&self) -> bool {
                self.0.raw == b"\"\""
            }

            #[doc = concat!("Where the ", $what, " is.")]
            pub fn location(&self) -> Location {
                self.0.location(0)
            }

            #[doc = concat!("The ", $what, " as text: escapes decoded (see [`crate::escape`]), then ")]
            #[doc = "the character set's bytes decoded. Borrowed when nothing had to change."]
            #[doc = ""]
            #[doc = "Delimiters inside (a field's `^`, say) are kept as they are. Errors"]
            #[doc = "(bytes invalid for the character set) name the offending byte."]
            #[inline]
            pub fn decoded(&self) -> Result<Cow<'a, str>, ParseError> {
                self.0.decode(None)
            }

            #[doc = "Like [`decoded`](Self::decoded), also returning warnings about escape"]
            #[doc = "sequences kept literally (unknown, unterminated, character set switches)."]
            pub fn decode_detailed(&self) -> Result<Decoded<'a>, ParseError> {
                let mut warnings = Vec::new();
                let text = self.0.decode(Some(&mut warnings))?;
                Ok(Decoded { text, warnings })
            }
        }
    };
}

/// A field of a segment. See the module docs for numbering.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a>(Node<'a>);

/// One repetition of a field.
#[derive(Debug, Clone, Copy)]
pub struct Repetition<'a>(Node<'a>);

/// One component of a repetition.
#[derive(Debug, Clone, Copy)]
pub struct Component<'a>(Node<'a>);

/// One subcomponent of a component.
#[derive(Debug, Clone, Copy)]
pub struct Subcomponent<'a>(Node<'a>);

value_methods!(Field, "field");
value_methods!(Repetition, "repetition");
value_methods!(Component, "component");
value_methods!(Subcomponent, "subcomponent");

impl<'a> Field<'a> {
    /// The field number (HL7 numbering).
    pub fn number(&self) -> usize {
        self.0.field as usize
    }

    /// The repetitions; an empty field has one, empty. MSH-1 and MSH-2 have
    /// exactly one.
    pub fn repetitions(&self) -> impl Iterator<Item = Repetition<'a>> + 'a {
        self.0.children(Level::Rep).map(Repetition)
    }

    /// Repetition `n`, from 1.
    #[inline]
    pub fn repetition(&self, n: usize) -> Option<Repetition<'a>> {
        self.0.child(Level::Rep, n).map(Repetition)
    }

    /// Component `n` of the first repetition.
    #[inline]
    pub fn component(&self, n: usize) -> Option<Component<'a>> {
        self.repetition(1)?.component(n)
    }
}

impl<'a> Repetition<'a> {
    /// The components; an empty repetition has one, empty.
    pub fn components(&self) -> impl Iterator<Item = Component<'a>> + 'a {
        self.0.children(Level::Comp).map(Component)
    }

    /// Component `n`, from 1.
    #[inline]
    pub fn component(&self, n: usize) -> Option<Component<'a>> {
        self.0.child(Level::Comp, n).map(Component)
    }
}

impl<'a> Component<'a> {
    /// The subcomponents; an empty component has one, empty.
    pub fn subcomponents(&self) -> impl Iterator<Item = Subcomponent<'a>> + 'a {
        self.0.children(Level::Sub).map(Subcomponent)
    }

    /// Subcomponent `n`, from 1.
    #[inline]
    pub fn subcomponent(&self, n: usize) -> Option<Subcomponent<'a>> {
        self.0.child(Level::Sub, n).map(Subcomponent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = include_bytes!("../../../reference-trial/samples/lab-results.hl7");

    fn first_sample() -> &'static [u8] {
        let end = SAMPLE
            .windows(4)
            .skip(1)
            .position(|w| w == b"\nMSH")
            .map_or(SAMPLE.len(), |p| p + 1);
        &SAMPLE[..end]
    }

    fn kind(input: &[u8]) -> ErrorKind {
        Message::parse(input).unwrap_err().kind().clone()
    }

    const MIN: &str = "MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5.1";

    #[test]
    fn sample_header_and_msh_numbering() {
        let m = Message::parse(first_sample()).unwrap();
        assert_eq!(m.segment_count(), 6);
        let msh = m.segment(1).unwrap();
        assert_eq!(msh.id(), "MSH");
        assert!(msh.field(0).is_none());
        assert_eq!(msh.field(1).unwrap().raw(), b"|");
        assert_eq!(msh.field(1).unwrap().decoded().unwrap(), "|");
        let enc = msh.field(2).unwrap();
        assert_eq!(enc.raw(), b"^~\\&");
        assert_eq!(enc.decoded().unwrap(), "^~\\&");
        assert_eq!(enc.repetitions().count(), 1);
        assert!(enc.component(2).is_none());
        assert_eq!(msh.field(3).unwrap().raw(), b"LIS");
        assert_eq!(msh.field(4).unwrap().raw(), b"CENTRAL-LAB");
        assert_eq!(msh.field(7).unwrap().raw(), b"20260302091500+0100");
        assert_eq!(msh.field(9).unwrap().component(2).unwrap().raw(), b"R01");
        assert_eq!(msh.field(10).unwrap().raw(), b"LAB-20260302-0001");
        assert_eq!(msh.field(12).unwrap().raw(), b"2.5.1");
        assert_eq!(msh.field(18).unwrap().raw(), b"UNICODE UTF-8");
        assert!(msh.field(19).is_none());
        assert_eq!(msh.field_count(), 18);
        assert_eq!(msh.fields().count(), 18);
        assert_eq!(
            msh.fields().map(|f| f.number()).collect::<Vec<_>>(),
            (1..=18).collect::<Vec<_>>()
        );
        assert_eq!(msh.fields().nth(2).unwrap().raw(), b"LIS");

        let h = m.msh();
        assert_eq!(h.sending_application().namespace_id, "LIS");
        assert_eq!(h.sending_facility().namespace_id, "CENTRAL-LAB");
        assert_eq!(h.receiving_application().namespace_id, "CLINFLOW");
        assert_eq!(h.receiving_facility().namespace_id, "CARDIO-01");
        assert_eq!(h.message_type().code, "ORU");
        assert_eq!(h.message_type().trigger, "R01");
        assert_eq!(h.message_type().structure, "ORU_R01");
        assert_eq!(h.control_id(), "LAB-20260302-0001");
        assert_eq!(h.processing_id(), "P");
        assert_eq!(h.version().to_string(), "2.5.1");
        assert_eq!(h.charset(), Charset::Utf8);
        assert_eq!(
            h.datetime().unwrap().to_fhir_datetime().unwrap(),
            "2026-03-02T09:15:00+01:00"
        );
        assert_eq!(h.sender(), "LIS|CENTRAL-LAB");
    }

    #[test]
    fn other_segments_number_from_one() {
        let m = Message::parse(first_sample()).unwrap();
        let pid = m.segment(2).unwrap();
        assert_eq!(pid.id(), "PID");
        assert_eq!(pid.field(1).unwrap().raw(), b"1");
        assert!(pid.field(2).unwrap().is_empty());
        let id = pid.field(3).unwrap();
        assert_eq!(id.component(1).unwrap().raw(), b"CARDIO-01-0003");
        assert!(id.component(2).unwrap().is_empty());
        assert_eq!(id.component(4).unwrap().raw(), b"CARDIO-01");
        assert_eq!(id.component(5).unwrap().raw(), b"RI");
        assert!(id.component(6).is_none());
        assert_eq!(pid.field(5).unwrap().component(2).unwrap().raw(), b"Anna");
        assert_eq!(pid.field(8).unwrap().raw(), b"F");
        assert!(pid.field(9).is_none());
        assert_eq!(pid.field_count(), 8);
        let nte = m.segments_with_id("NTE").next().unwrap();
        assert_eq!(
            nte.field(3).unwrap().raw(),
            b"Fasting sample \\T\\ analysed within 2h"
        );
        assert_eq!(
            nte.field(3).unwrap().decoded().unwrap(),
            "Fasting sample & analysed within 2h"
        );
        assert_eq!(m.segments_with_id("OBX").count(), 2);
        let obx2 = m.segments_with_id("OBX").nth(1).unwrap();
        assert_eq!(obx2.sequence(), 2);
        assert_eq!(obx2.index(), 5);
        assert_eq!(obx2.line(), 5);
    }

    #[test]
    fn both_sample_messages_parse() {
        for p in crate::split_messages(SAMPLE) {
            let m = p.parse(SAMPLE).unwrap();
            for seg in m.segments() {
                for f in seg.fields() {
                    for r in f.repetitions() {
                        for c in r.components() {
                            for s in c.subcomponents() {
                                s.decoded().unwrap();
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn values_borrow_the_input() {
        let m = Message::parse(first_sample()).unwrap();
        let v = m
            .segment(2)
            .unwrap()
            .field(5)
            .unwrap()
            .component(1)
            .unwrap()
            .decoded()
            .unwrap();
        assert!(matches!(v, Cow::Borrowed("Schmidt")));
        let range = first_sample().as_ptr_range();
        assert!(range.contains(&v.as_ptr()));
    }

    #[test]
    fn repetitions_components_subcomponents() {
        let input = format!("{MIN}\rZZZ|a~b^c&d&~|x\r");
        let m = Message::parse(input.as_bytes()).unwrap();
        let z = m.segment(2).unwrap();
        let f = z.field(1).unwrap();
        let reps: Vec<_> = f.repetitions().map(|r| r.raw()).collect();
        assert_eq!(reps, vec![&b"a"[..], b"b^c&d&", b""]);
        let r2 = f.repetition(2).unwrap();
        assert_eq!(r2.component(1).unwrap().raw(), b"b");
        let c2 = r2.component(2).unwrap();
        let subs: Vec<_> = c2.subcomponents().map(|s| s.raw()).collect();
        assert_eq!(subs, vec![&b"c"[..], b"d", b""]);
        assert_eq!(c2.subcomponent(2).unwrap().raw(), b"d");
        let loc = c2.subcomponent(2).unwrap().location();
        assert_eq!(
            (loc.field, loc.repetition, loc.component, loc.subcomponent),
            (Some(1), Some(2), Some(2), Some(2))
        );
        assert_eq!(loc.offset, input.find("d&~").unwrap());
        assert_eq!(loc.line, 2);
        assert_eq!(loc.path().unwrap(), "ZZZ-1(2).2.2");
        assert!(f.repetition(0).is_none());
        assert!(f.repetition(4).is_none());
        assert!(z.field(usize::MAX).is_none());
        assert!(f.component(usize::MAX).is_none());
        assert!(c2.subcomponent(usize::MAX).is_none());
        assert_eq!(f.decoded().unwrap(), "a~b^c&d&~");
    }

    #[test]
    fn custom_delimiters() {
        let input = b"MSH#@!$%#LAB@OID#FAC#CF#SITE#20260302##ORU@R01@ORU_R01#C1#P#2.5\rOBX#1#ST#X@Y#1#a$F$b$S$c!d@e%f\r";
        let m = Message::parse(input).unwrap();
        assert_eq!(m.delimiters().encoding_characters(), "@!$%");
        let msh = m.segment(1).unwrap();
        assert_eq!(msh.field(1).unwrap().raw(), b"#");
        assert_eq!(msh.field(2).unwrap().raw(), b"@!$%");
        assert_eq!(m.msh().sending_application().universal_id, "OID");
        assert_eq!(m.msh().message_type().structure, "ORU_R01");
        let v = m.segment(2).unwrap().field(5).unwrap();
        assert_eq!(v.repetitions().count(), 2);
        assert_eq!(v.repetition(1).unwrap().decoded().unwrap(), "a#b@c");
        let c = v.repetition(2).unwrap().component(2).unwrap();
        assert_eq!(c.subcomponent(2).unwrap().raw(), b"f");
    }

    #[test]
    fn mixed_line_endings() {
        let input = format!("{MIN}\r\nPID|1\nOBX|1\r\rNTE|1\r\n");
        let m = Message::parse(input.as_bytes()).unwrap();
        let ids: Vec<_> = m.segments().map(|s| (s.id(), s.line())).collect();
        assert_eq!(ids, vec![("MSH", 1), ("PID", 2), ("OBX", 3), ("NTE", 5)]);
    }

    #[test]
    fn truncated_headers() {
        assert_eq!(kind(b""), ErrorKind::Empty);
        assert_eq!(kind(b"\r\n\r\n"), ErrorKind::Empty);
        assert_eq!(kind(b"M"), ErrorKind::NotMsh);
        assert_eq!(kind(b"MS"), ErrorKind::NotMsh);
        assert_eq!(kind(b"MSH"), ErrorKind::MissingFieldSeparator);
        assert_eq!(kind(b"MSH\rPID|1"), ErrorKind::MissingFieldSeparator);
        assert_eq!(kind(b"MSH|"), ErrorKind::BadEncodingCharacters { found: 0 });
        assert_eq!(
            kind(b"MSH|^~"),
            ErrorKind::BadEncodingCharacters { found: 2 }
        );
        assert_eq!(
            kind(b"MSH|^~\r"),
            ErrorKind::BadEncodingCharacters { found: 2 }
        );
        assert_eq!(
            kind(b"MSH|^~\\&"),
            ErrorKind::MissingField { name: "MSH-12" }
        );
        assert_eq!(
            kind(b"MSH|^~\\&|"),
            ErrorKind::MissingField { name: "MSH-12" }
        );
        assert_eq!(
            kind(b"MSH|^~\\&||||||||||2.5"),
            ErrorKind::MissingField { name: "MSH-9" }
        );
        assert_eq!(
            kind(b"MSH|^~\\&|||||||ORU^R01|||2.5"),
            ErrorKind::MissingField { name: "MSH-10" }
        );
        assert_eq!(
            kind(b"MSH|^~\\&|||||||ORU^R01|1||2.5"),
            ErrorKind::MissingField { name: "MSH-11" }
        );
        assert!(Message::parse(b"MSH|^~\\&|||||||ORU^R01|1|P|2.5").is_ok());
        assert_eq!(kind(b"PID|1"), ErrorKind::NotMsh);
        assert!(matches!(
            kind(b"MSH\0^~\\&"),
            ErrorKind::InvalidDelimiter { byte: 0, .. }
        ));
        assert!(matches!(
            kind(b"MSH|^~\\\0"),
            ErrorKind::InvalidDelimiter { byte: 0, .. }
        ));
        assert!(matches!(
            kind(b"MSH|^~\\^"),
            ErrorKind::DuplicateDelimiter { byte: b'^' }
        ));
        let e = Message::parse(b"MSH|^~").unwrap_err();
        assert_eq!(e.location().field, Some(2));
        assert_eq!(e.location().offset, 4);
        assert_eq!(e.location().segment_index, Some(1));
    }

    #[test]
    fn bad_segments_are_located() {
        let input = format!("{MIN}\nPID|1\n\nobx|1\n");
        let e = Message::parse(input.as_bytes()).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::InvalidSegment {
                found: "obx|1".into()
            }
        );
        assert_eq!(e.location().line, 4);
        assert_eq!(e.location().segment_index, Some(3));
        assert_eq!(e.location().offset, input.find("obx").unwrap());
        assert!(e.to_string().contains("line 4"), "{e}");
        let input = format!("{MIN}\nPID^1\n");
        assert!(matches!(
            kind(input.as_bytes()),
            ErrorKind::InvalidSegment { .. }
        ));
        let input = format!("{MIN}\nPI\n");
        assert!(matches!(
            kind(input.as_bytes()),
            ErrorKind::InvalidSegment { .. }
        ));
        let input = format!("{MIN}\nPID|1\n{MIN}");
        let e = Message::parse(input.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::UnexpectedMsh);
        assert_eq!(e.location().segment_index, Some(3));
        // A bare id is a segment with no fields.
        let input = format!("{MIN}\nPID\n");
        let m = Message::parse(input.as_bytes()).unwrap();
        assert_eq!(m.segment(2).unwrap().field_count(), 0);
        assert!(m.segment(2).unwrap().field(1).is_none());
        assert!(m.segment(3).is_none());
        assert!(m.segment(0).is_none());
    }

    #[test]
    fn versions_and_charsets() {
        for v in [
            "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8",
        ] {
            let input = format!("MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|{v}");
            assert_eq!(
                Message::parse(input.as_bytes())
                    .unwrap()
                    .msh()
                    .version()
                    .to_string(),
                v
            );
        }
        for v in ["2.2", "2.9", "3.0", "x"] {
            let input = format!("MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|{v}");
            let e = Message::parse(input.as_bytes()).unwrap_err();
            assert_eq!(
                e.kind(),
                &ErrorKind::UnsupportedVersion { version: v.into() }
            );
            assert_eq!(e.location().field, Some(12));
        }
        let input = format!("{MIN}||||||ISO IR87");
        let e = Message::parse(input.as_bytes()).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::UnknownCharset {
                name: "ISO IR87".into()
            }
        );
        assert_eq!(e.location().field, Some(18));
        assert!(e.to_string().contains("ISO IR87"));
        let input = format!("{MIN}||||||ASCII");
        assert_eq!(
            Message::parse(input.as_bytes()).unwrap().charset(),
            Charset::Ascii
        );
        assert_eq!(
            Message::parse(MIN.as_bytes()).unwrap().charset(),
            Charset::Ascii
        );
    }

    #[test]
    fn charset_decoding_in_messages() {
        // UTF-8: raw and hex-escaped é; invalid bytes are located.
        let mut input =
            format!("{MIN}||||||UNICODE UTF-8\rNTE|1||Ren\u{e9}e \\XC3A9\\\rNTE|2||bad ")
                .into_bytes();
        input.extend_from_slice(b"\xFF!");
        let m = Message::parse(&input).unwrap();
        let nte = |i: usize| m.segment(i).unwrap().field(3).unwrap();
        assert_eq!(nte(2).decoded().unwrap(), "Renée é");
        let e = nte(3).decoded().unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidUtf8);
        assert_eq!(e.location().offset, input.len() - 2);
        assert_eq!(e.location().line, 3);
        assert_eq!(e.location().path().unwrap(), "NTE-3");
        // ISO 8859-1: bytes map to code points, \XE9\ too.
        let mut input = format!("{MIN}||||||8859/1\rNTE|1||Ren").into_bytes();
        input.extend_from_slice(b"\xE9e \\XE9\\");
        let m = Message::parse(&input).unwrap();
        assert_eq!(
            m.segment(2).unwrap().field(3).unwrap().decoded().unwrap(),
            "Renée é"
        );
        // ASCII rejects bytes above 0x7F, with the location.
        let mut input = format!("{MIN}\rNTE|1||Ren").into_bytes();
        input.extend_from_slice(b"\xE9e");
        let m = Message::parse(&input).unwrap();
        let e = m
            .segment(2)
            .unwrap()
            .field(3)
            .unwrap()
            .decoded()
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::NonAscii { byte: 0xE9 });
        assert_eq!(e.location().offset, input.len() - 2);
        // Non-UTF-8 in the header of a UTF-8 message fails the parse.
        let mut input =
            b"MSH|^~\\&|L\xFFS|B|C|D|20260302||ORU^R01|1|P|2.5.1||||||UNICODE UTF-8".to_vec();
        let e = Message::parse(&input).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidUtf8);
        assert_eq!(e.location().field, Some(3));
        input.clear();
    }

    #[test]
    fn header_datetime_must_be_valid() {
        let e = Message::parse(b"MSH|^~\\&|A|B|C|D|2026-03-02||ORU^R01|1|P|2.5").unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::InvalidDatetime { .. }));
        assert_eq!(e.location().field, Some(7));
        let m = Message::parse(b"MSH|^~\\&|A|B|C|D|||ORU^R01|1|P|2.5").unwrap();
        assert!(m.msh().datetime().is_none());
        // v2.3 TS with a degree of precision component.
        let m = Message::parse(b"MSH|^~\\&|A|B|C|D|200103021200^M||ORU^R01|1|P|2.3").unwrap();
        assert_eq!(m.msh().datetime().unwrap().to_string(), "200103021200");
    }

    #[test]
    fn parse_at_shifts_locations() {
        let input = b"MSH|^~\\&|A|B|C|D|20260302||ORU^R01|1|P|2.5\rbad";
        let e = Message::parse_at(
            input,
            Origin {
                offset: 100,
                line: 10,
            },
        )
        .unwrap_err();
        assert_eq!(e.location().offset, 100 + input.len() - 3);
        assert_eq!(e.location().line, 11);
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let input = format!("\u{feff}{MIN}\rPID|1");
        let m = Message::parse(input.as_bytes()).unwrap();
        assert_eq!(m.segment_count(), 2);
        assert_eq!(m.segment(1).unwrap().offset(), 3);
        assert_eq!(m.segment(2).unwrap().line(), 2);
        // Only at the very start, and only once.
        let input = format!("\u{feff}\u{feff}{MIN}");
        assert_eq!(kind(input.as_bytes()), ErrorKind::NotMsh);
    }

    #[test]
    fn leading_blank_lines_and_nul_bytes() {
        let input = format!("\r\n{MIN}\rZZZ|a\0b");
        let m = Message::parse(input.as_bytes()).unwrap();
        assert_eq!(m.segment(1).unwrap().line(), 2);
        assert_eq!(
            m.segment(2).unwrap().field(1).unwrap().decoded().unwrap(),
            "a\0b"
        );
    }
}
