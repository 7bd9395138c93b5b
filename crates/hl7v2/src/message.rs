//! The zero-copy ER7 parser: [`Message`] and its views [`Segment`],
//! [`Field`], [`Repetition`], [`Component`] and [`Subcomponent`].
//!
//! [`Message::parse`] reads the delimiters from MSH-1/MSH-2, cuts the input
//! into segments (`\r`, `\n` or `\r\n`, mixed; blank lines skipped), checks
//! each segment id, and decodes the header ([`Msh`]): character set
//! (MSH-18), version (MSH-12, 2.3 to 2.8), type, control id. Fields and
//! below are found on demand by scanning the segment's slice, so parsing
//! costs one pass over the bytes plus one small `Vec` of segment spans.
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
            Location::at(origin.offset + offset, origin.line + line - 1)
        };
        let mut lines = Lines::new(bytes, 0, 1)
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
            ctx.charset = Charset::from_msh18(name)
                .map_err(|kind| ParseError::new(kind, f.location()))?;
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
    pub fn segments_with_id<'s>(
        &'s self,
        id: &'s str,
    ) -> impl Iterator<Item = Segment<'a>> + 's {
        self.segments().filter(move |s| s.id() == id)
    }

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
        self.ctx.origin.line + self.span.line - 1
    }

    /// Byte offset in the input.
    pub fn offset(&self) -> usize {
        self.ctx.origin.offset + self.span.start
    }

    /// The segment's bytes, without its terminator.
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
                offset: self.ctx.origin.offset + self.span.end,
                ..self.location()
            },
        }
    }

    fn is_msh(&self) -> bool {
        self.span.id == SegmentId::MSH
    }

    /// Field `n` in HL7 numbering (see the module docs for MSH-1 and
    /// MSH-2); `None` when the segment has fewer fields or `n` is 0.
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
        let this = *self;
        let rest = self.raw.get(4..);
        let first = if self.is_msh() {
            self.raw
                .get(3..4)
                .map(|sep| this.field_node(1, 3, sep, true))
        } else {
            None
        };
        let shift = if self.is_msh() { 2 } else { 1 };
        let pieces = rest
            .map(|r| Pieces::new(r, 4, Some(self.ctx.delims.field())))
            .into_iter()
            .flatten();
        first.into_iter().chain(
            pieces
                .enumerate()
                .map(move |(i, (off, p))| this.field_node(i + shift, off, p, this.is_msh() && i == 0)),
        )
    }

    /// How many fields the segment has (the last number `field` answers).
    pub fn field_count(&self) -> usize {
        match self.raw.get(4..) {
            None => usize::from(self.is_msh() && self.raw.len() > 3),
            Some(rest) => {
                let n = 1 + rest.iter().filter(|b| **b == self.ctx.delims.field()).count();
                if self.is_msh() {
                    n + 1
                } else {
                    n
                }
            }
        }
    }

    fn field_node(&self, number: usize, offset: usize, raw: &'a [u8], literal: bool) -> Field<'a> {
        Field(Node {
            ctx: self.ctx,
            seg: SegInfo {
                id: self.span.id,
                index: self.index,
                sequence: self.span.sequence,
                line: self.span.line,
            },
            raw,
            offset: self.span.start + offset,
            field: number,
            rep: 0,
            comp: 0,
            sub: 0,
            literal,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct SegInfo {
    id: SegmentId,
    index: usize,
    sequence: usize,
    line: usize,
}

/// The common part of field, repetition, component and subcomponent views.
#[derive(Debug, Clone, Copy)]
struct Node<'a> {
    ctx: Ctx,
    seg: SegInfo,
    raw: &'a [u8],
    /// Offset of `raw` in the message.
    offset: usize,
    field: usize,
    rep: usize,
    comp: usize,
    sub: usize,
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
    fn location(&self, delta: usize) -> Location {
        let nz = |n: usize| (n > 0).then_some(n);
        Location {
            offset: self.ctx.origin.offset + self.offset + delta,
            line: self.ctx.origin.line + self.seg.line - 1,
            segment_index: Some(self.seg.index),
            segment_id: Some(self.seg.id),
            segment_sequence: Some(self.seg.sequence),
            field: nz(self.field),
            repetition: nz(self.rep),
            component: nz(self.comp),
            subcomponent: nz(self.sub),
        }
    }

    fn children(self, level: Level) -> impl Iterator<Item = Node<'a>> {
        let d = self.ctx.delims;
        let sep = match (self.literal, level) {
            (true, _) => None,
            (false, Level::Rep) => Some(d.repetition()),
            (false, Level::Comp) => Some(d.component()),
            (false, Level::Sub) => Some(d.subcomponent()),
        };
        Pieces::new(self.raw, self.offset, sep)
            .enumerate()
            .map(move |(i, (offset, raw))| {
                let mut n = Node { raw, offset, ..self };
                match level {
                    Level::Rep => n.rep = i + 1,
                    Level::Comp => n.comp = i + 1,
                    Level::Sub => n.sub = i + 1,
                }
                n
            })
    }

    fn child(self, level: Level, n: usize) -> Option<Node<'a>> {
        self.children(level).nth(n.checked_sub(1)?)
    }

    fn decode(&self, warnings: Option<&mut Vec<crate::escape::EscapeWarning>>) -> Result<Cow<'a, str>, ParseError> {
        if self.literal {
            // Delimiters are printable ASCII (checked when parsed).
            return Ok(Cow::Borrowed(std::str::from_utf8(self.raw).unwrap_or_default()));
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

    fn next(&mut self) -> Option<(usize, &'a [u8])> {
        let rest = self.rest?;
        let found = self
            .sep
            .and_then(|sep| rest.iter().position(|b| *b == sep));
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

macro_rules! value_methods {
    ($t:ident, $what:literal) => {
        impl<'a> $t<'a> {
            #[doc = concat!("The ", $what, "'s bytes as sent (escapes not decoded): a slice of the input.")]
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
        self.0.field
    }

    /// The repetitions; an empty field has one, empty. MSH-1 and MSH-2 have
    /// exactly one.
    pub fn repetitions(&self) -> impl Iterator<Item = Repetition<'a>> + 'a {
        self.0.children(Level::Rep).map(Repetition)
    }

    /// Repetition `n`, from 1.
    pub fn repetition(&self, n: usize) -> Option<Repetition<'a>> {
        self.0.child(Level::Rep, n).map(Repetition)
    }

    /// Component `n` of the first repetition.
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
    pub fn subcomponent(&self, n: usize) -> Option<Subcomponent<'a>> {
        self.0.child(Level::Sub, n).map(Subcomponent)
    }
}
