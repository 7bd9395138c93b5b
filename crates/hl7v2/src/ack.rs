//! HL7 acknowledgements: MSH + MSA (+ ERR).
//!
//! [`build_ack`] answers a parsed message: the original's delimiters,
//! version and character set; sender and receiver swapped; MSH-9
//! `ACK^<trigger>^ACK`; MSA-2 echoing the original MSH-10 exactly as sent.
//! Each [`AckError`] becomes an ERR segment: for v2.5 and later ERR-2
//! (location `SEG^seq^field^rep^comp^sub`), ERR-3 (HL7 table 0357 code),
//! ERR-4 (severity) and ERR-8 (the text); for v2.3/v2.4, one ERR segment
//! whose ERR-1 repeats `SEG^seq^field^code&text&HL70357`, with the texts
//! in MSA-3. All text is escaped and encoded for the message.
//!
//! [`build_reject_ack_without_message`] is for input whose MSH cannot be
//! read: an AR with the standard delimiters, v2.5.1, ASCII.

use crate::charset::Charset;
use crate::delimiters::Delimiters;
use crate::dtm::Dtm;
use crate::error::{ErrorKind, Location, ParseError, SegmentId};
use crate::escape::escape;
use crate::header::Version;
use crate::lines::{is_blank, Lines};
use crate::message::Message;

/// MSA-1, the acknowledgment code (original mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// AA: accepted (and, for clinflow, durably stored).
    Accept,
    /// AE: error; the sender may correct and resend.
    Error,
    /// AR: rejected (unsupported type, version, unreadable, ...).
    Reject,
}

impl AckCode {
    /// `AA`, `AE` or `AR`.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::Accept => "AA",
            AckCode::Error => "AE",
            AckCode::Reject => "AR",
        }
    }
}

/// ERR-4, severity (HL7 table 0516).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// `E`.
    Error,
    /// `W`.
    Warning,
    /// `I`.
    Information,
}

impl Severity {
    /// `E`, `W` or `I`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "E",
            Severity::Warning => "W",
            Severity::Information => "I",
        }
    }
}

/// ERR-3, the HL7 error code (table 0357).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0.
    MessageAccepted,
    /// 100: segments out of order, or a required segment missing.
    SegmentSequenceError,
    /// 101.
    RequiredFieldMissing,
    /// 102: a value that does not fit its data type.
    DataTypeError,
    /// 103.
    TableValueNotFound,
    /// 200.
    UnsupportedMessageType,
    /// 201.
    UnsupportedEventCode,
    /// 202.
    UnsupportedProcessingId,
    /// 203.
    UnsupportedVersionId,
    /// 204: e.g. an unknown patient (subject) identifier.
    UnknownKeyIdentifier,
    /// 205.
    DuplicateKeyIdentifier,
    /// 206.
    ApplicationRecordLocked,
    /// 207.
    ApplicationInternalError,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::MessageAccepted => 0,
            ErrorCode::SegmentSequenceError => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataTypeError => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationRecordLocked => 206,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The table's text.
    pub fn text(self) -> &'static str {
        match self {
            ErrorCode::MessageAccepted => "Message accepted",
            ErrorCode::SegmentSequenceError => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataTypeError => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationRecordLocked => "Application record locked",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }
}

/// ERR-2, where the error is (ERL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorLocation {
    /// Segment id.
    pub segment: SegmentId,
    /// Occurrence of that segment id in the message, from 1.
    pub sequence: usize,
    /// Field number.
    pub field: Option<usize>,
    /// Field repetition.
    pub repetition: Option<usize>,
    /// Component.
    pub component: Option<usize>,
    /// Subcomponent.
    pub subcomponent: Option<usize>,
}

impl ErrorLocation {
    /// From a parser location, when it names a segment.
    pub fn from_location(l: &Location) -> Option<ErrorLocation> {
        Some(ErrorLocation {
            segment: l.segment_id?,
            sequence: l.segment_sequence.unwrap_or(1),
            field: l.field,
            repetition: l.repetition,
            component: l.component,
            subcomponent: l.subcomponent,
        })
    }

    fn render(&self, sep: char) -> String {
        let mut s = format!("{}{sep}{}", self.segment, self.sequence);
        if let Some(f) = self.field {
            s.push_str(&format!("{sep}{f}"));
            if self.repetition.is_some() || self.component.is_some() {
                s.push_str(&format!("{sep}{}", self.repetition.unwrap_or(1)));
            }
            if let Some(c) = self.component {
                s.push_str(&format!("{sep}{c}"));
                if let Some(sc) = self.subcomponent {
                    s.push_str(&format!("{sep}{sc}"));
                }
            }
        }
        s
    }
}

/// One ERR segment of an ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// ERR-2, when the error is about a place in the message.
    pub location: Option<ErrorLocation>,
    /// ERR-3.
    pub code: ErrorCode,
    /// ERR-4.
    pub severity: Severity,
    /// ERR-8, the message to people (escaped when written).
    pub text: String,
}

impl AckError {
    /// The ERR for a parse error: code by kind (203 unsupported version, 103
    /// unknown character set, 101 missing field, 100 a second MSH, 102 for
    /// everything malformed), severity E, the error's text.
    pub fn from_parse_error(e: &ParseError) -> AckError {
        let code = match e.kind() {
            ErrorKind::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersionId,
            ErrorKind::UnknownCharset { .. } => ErrorCode::TableValueNotFound,
            ErrorKind::MissingField { .. } => ErrorCode::RequiredFieldMissing,
            ErrorKind::UnexpectedMsh => ErrorCode::SegmentSequenceError,
            _ => ErrorCode::DataTypeError,
        };
        AckError {
            location: ErrorLocation::from_location(e.location()),
            code,
            severity: Severity::Error,
            text: e.to_string(),
        }
    }
}

/// Writes ER7 text with a message's delimiters and character set.
struct Writer {
    out: Vec<u8>,
    d: Delimiters,
    charset: Charset,
}

impl Writer {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }
    fn fs(&mut self) -> &mut Self {
        self.out.push(self.d.field());
        self
    }
    fn cs(&mut self) -> &mut Self {
        self.out.push(self.d.component());
        self
    }
    fn sc(&mut self) -> &mut Self {
        self.out.push(self.d.subcomponent());
        self
    }
    fn text(&mut self, t: &str) -> &mut Self {
        let e = escape(t, &self.d);
        let bytes = self.charset.encode_lossy(&e).into_owned();
        self.out.extend_from_slice(&bytes);
        self
    }
    fn end(&mut self) -> &mut Self {
        self.out.push(b'\r');
        self
    }

    fn msh_start(&mut self) -> &mut Self {
        let enc = self.d.encoding_characters();
        self.raw(b"MSH").fs().raw(enc.as_bytes())
    }

    fn msa_err(
        &mut self,
        code: AckCode,
        original_id: &[u8],
        errors: &[AckError],
        version: Version,
    ) {
        self.raw(b"MSA")
            .fs()
            .raw(code.as_str().as_bytes())
            .fs()
            .raw(original_id);
        let v25 = version.has_v25_err();
        if !v25 && !errors.is_empty() {
            let texts: Vec<&str> = errors.iter().map(|e| e.text.as_str()).collect();
            self.fs().text(&texts.join("; "));
        }
        self.end();
        if errors.is_empty() {
            return;
        }
        let cs = char::from(self.d.component());
        if v25 {
            for e in errors {
                self.raw(b"ERR").fs().fs();
                if let Some(l) = &e.location {
                    self.text_raw_loc(l, cs);
                }
                self.fs()
                    .raw(e.code.code().to_string().as_bytes())
                    .cs()
                    .text(e.code.text())
                    .cs()
                    .raw(b"HL70357")
                    .fs()
                    .raw(e.severity.as_str().as_bytes())
                    .fs()
                    .fs()
                    .fs()
                    .fs()
                    .text(&e.text)
                    .end();
            }
        } else {
            self.raw(b"ERR").fs();
            for (i, e) in errors.iter().enumerate() {
                if i > 0 {
                    self.out.push(self.d.repetition());
                }
                match &e.location {
                    Some(l) => {
                        let loc = ErrorLocation {
                            repetition: None,
                            component: None,
                            subcomponent: None,
                            ..*l
                        };
                        self.text_raw_loc(&loc, cs);
                        if l.field.is_none() {
                            self.cs();
                        }
                    }
                    None => {
                        self.cs().cs();
                    }
                }
                self.cs()
                    .raw(e.code.code().to_string().as_bytes())
                    .sc()
                    .text(e.code.text())
                    .sc()
                    .raw(b"HL70357");
            }
            self.end();
        }
    }

    fn text_raw_loc(&mut self, l: &ErrorLocation, cs: char) {
        // Segment ids and numbers only: no escaping needed.
        let s = l.render(cs);
        self.raw(s.as_bytes());
    }
}

/// Builds the ACK of `original` (see the module docs). `now` goes in MSH-7,
/// `control_id` (the ACK's own id) in MSH-10.
pub fn build_ack(
    original: &Message<'_>,
    code: AckCode,
    errors: &[AckError],
    now: &Dtm,
    control_id: &str,
) -> Vec<u8> {
    let msh = original.msh();
    let seg = original.segment(1);
    let raw = |n: usize| -> &[u8] {
        seg.and_then(|s| s.field(n))
            .map(|f| f.raw())
            .unwrap_or_default()
    };
    let trigger = seg
        .and_then(|s| s.field(9))
        .and_then(|f| f.component(2))
        .map(|c| c.raw())
        .unwrap_or_default();
    let version = msh.version();
    let mut w = Writer {
        out: Vec::with_capacity(256),
        d: original.delimiters(),
        charset: original.charset(),
    };
    w.msh_start()
        .fs()
        .raw(raw(5))
        .fs()
        .raw(raw(6))
        .fs()
        .raw(raw(3))
        .fs()
        .raw(raw(4))
        .fs()
        .raw(now.to_string().as_bytes())
        .fs()
        .fs()
        .raw(b"ACK");
    if !trigger.is_empty() {
        w.cs().raw(trigger);
        if version > (Version { minor: 3, patch: 0 }) {
            w.cs().raw(b"ACK");
        }
    }
    w.fs().text(control_id).fs().raw(raw(11)).fs().raw(raw(12));
    let charset = raw(18);
    if !charset.is_empty() {
        w.fs().fs().fs().fs().fs().fs().raw(charset);
    }
    w.end();
    w.msa_err(code, raw(10), errors, version);
    w.out
}

/// An AR for input whose MSH could not be read: standard delimiters,
/// version 2.5.1, ASCII, empty sender and receiver, MSA-2 the original
/// control id when one could be salvaged (see [`salvage_control_id`]).
pub fn build_reject_ack_without_message(
    original_control_id: Option<&str>,
    errors: &[AckError],
    now: &Dtm,
    control_id: &str,
) -> Vec<u8> {
    let mut w = Writer {
        out: Vec::with_capacity(256),
        d: Delimiters::default(),
        charset: Charset::Ascii,
    };
    w.msh_start()
        .fs()
        .fs()
        .fs()
        .fs()
        .fs()
        .raw(now.to_string().as_bytes())
        .fs()
        .fs()
        .raw(b"ACK")
        .fs()
        .text(control_id)
        .fs()
        .raw(b"P")
        .fs()
        .raw(b"2.5.1")
        .end();
    let original = w
        .charset
        .encode_lossy(&escape(original_control_id.unwrap_or_default(), &w.d))
        .into_owned();
    w.msa_err(
        AckCode::Reject,
        &original,
        errors,
        Version { minor: 5, patch: 1 },
    );
    w.out
}

/// Best effort MSH-10 of bytes that did not parse, for MSA-2 of a reject:
/// the first non-blank line must start with `MSH` and a field separator;
/// the value (its first component) must be 1 to 199 printable ASCII
/// characters.
pub fn salvage_control_id(bytes: &[u8]) -> Option<String> {
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
    let line = Lines::new(bytes, 0, 1)
        .map(|l| bytes.get(l.start..l.end).unwrap_or_default())
        .find(|l| !is_blank(l))?;
    let rest = line.strip_prefix(b"MSH")?;
    let (&fs, rest) = rest.split_first()?;
    if fs.is_ascii_alphanumeric() {
        return None;
    }
    let mut fields = rest.split(|b| *b == fs);
    let enc = fields.next()?;
    let value = fields.nth(7)?;
    let value = match enc.first() {
        Some(cs) => value.split(|b| b == cs).next()?,
        None => value,
    };
    let ok = !value.is_empty()
        && value.len() < 200
        && value.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtm::parse_dtm;

    const ORU: &[u8] = b"MSH|^~\\&|LIS|CENTRAL-LAB|CLINFLOW|CARDIO-01|20260302091500+0100||ORU^R01^ORU_R01|LAB-20260302-0001|P|2.5.1|||AL|NE||UNICODE UTF-8\rPID|1||X\r";

    fn segments(ack: &[u8]) -> Vec<String> {
        String::from_utf8(ack.to_vec())
            .unwrap()
            .split('\r')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn accept_echoes_control_id() {
        let m = Message::parse(ORU).unwrap();
        let now = parse_dtm("20260302091501+0100").unwrap();
        let ack = build_ack(&m, AckCode::Accept, &[], &now, "ACK-1");
        assert_eq!(
            segments(&ack),
            vec![
                "MSH|^~\\&|CLINFLOW|CARDIO-01|LIS|CENTRAL-LAB|20260302091501+0100||ACK^R01^ACK|ACK-1|P|2.5.1||||||UNICODE UTF-8",
                "MSA|AA|LAB-20260302-0001",
            ]
        );
        // The ACK is itself a valid message.
        let parsed = Message::parse(&ack).unwrap();
        assert_eq!(parsed.msh().message_type().code, "ACK");
        assert_eq!(parsed.msh().charset(), Charset::Utf8);
        assert_eq!(
            parsed
                .segment(2)
                .unwrap()
                .field(2)
                .unwrap()
                .decoded()
                .unwrap(),
            "LAB-20260302-0001"
        );
    }

    #[test]
    fn errors_become_err_segments_with_escaped_text() {
        let m = Message::parse(ORU).unwrap();
        let now = parse_dtm("20260302091501+0100").unwrap();
        let errors = [
            AckError {
                location: Some(ErrorLocation {
                    segment: SegmentId::from_prefix(b"OBX").unwrap(),
                    sequence: 2,
                    field: Some(5),
                    repetition: None,
                    component: None,
                    subcomponent: None,
                }),
                code: ErrorCode::DataTypeError,
                severity: Severity::Warning,
                text: "glucose 5|6 & more: née\nline".into(),
            },
            AckError {
                location: None,
                code: ErrorCode::ApplicationInternalError,
                severity: Severity::Error,
                text: "store down".into(),
            },
        ];
        let ack = build_ack(&m, AckCode::Error, &errors, &now, "A2");
        let segs = segments(&ack);
        assert_eq!(segs[1], "MSA|AE|LAB-20260302-0001");
        assert_eq!(
            segs[2],
            "ERR||OBX^2^5|102^Data type error^HL70357|W||||glucose 5\\F\\6 \\T\\ more: née\\.br\\line"
        );
        assert_eq!(
            segs[3],
            "ERR|||207^Application internal error^HL70357|E||||store down"
        );
        let parsed = Message::parse(&ack).unwrap();
        let err = parsed.segment(3).unwrap();
        assert_eq!(
            err.field(8).unwrap().decoded().unwrap(),
            "glucose 5|6 & more: née\nline"
        );
    }

    #[test]
    fn v24_uses_err1_and_msa3_and_custom_delimiters() {
        let msg = b"MSH#@!$%#LIS#LAB#CF#SITE#20260302##ORU@R01#ID@1#P#2.4\r";
        let m = Message::parse(msg).unwrap();
        let now = parse_dtm("20260302").unwrap();
        let errors = [AckError {
            location: Some(ErrorLocation {
                segment: SegmentId::from_prefix(b"PID").unwrap(),
                sequence: 1,
                field: Some(3),
                repetition: None,
                component: None,
                subcomponent: None,
            }),
            code: ErrorCode::UnknownKeyIdentifier,
            severity: Severity::Error,
            text: "unknown subject #7".into(),
        }];
        let ack = build_ack(&m, AckCode::Reject, &errors, &now, "A3");
        let segs = segments(&ack);
        assert_eq!(
            segs[0],
            "MSH#@!$%#CF#SITE#LIS#LAB#20260302##ACK@R01@ACK#A3#P#2.4"
        );
        assert_eq!(segs[1], "MSA#AR#ID@1#unknown subject $F$7");
        assert_eq!(segs[2], "ERR#PID@1@3@204%Unknown key identifier%HL70357");
        assert!(Message::parse(&ack).is_ok());
    }

    #[test]
    fn reject_without_message() {
        let now = parse_dtm("20260302091501+0100").unwrap();
        let bad = b"MSH|^~\\&|LIS|LAB|CF|SITE|20260302||ORU^R01|CTRL-9|P|9.9\r";
        let err = Message::parse(bad).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::UnsupportedVersion { .. }));
        let id = salvage_control_id(bad);
        assert_eq!(id.as_deref(), Some("CTRL-9"));
        let ack = build_reject_ack_without_message(
            id.as_deref(),
            &[AckError::from_parse_error(&err)],
            &now,
            "R1",
        );
        let segs = segments(&ack);
        assert_eq!(segs[0], "MSH|^~\\&|||||20260302091501+0100||ACK|R1|P|2.5.1");
        assert_eq!(segs[1], "MSA|AR|CTRL-9");
        assert!(segs[2].starts_with("ERR||MSH^1^12|203^Unsupported version id^HL70357|E||||"));
        assert!(Message::parse(&ack).is_ok());
        assert_eq!(
            salvage_control_id(b"\xEF\xBB\xBFMSH|^~\\&|||||||ORU|C-7|P|9").as_deref(),
            Some("C-7")
        );
        assert_eq!(salvage_control_id(b"MSH|^~"), None);
        assert_eq!(salvage_control_id(b""), None);
        assert_eq!(salvage_control_id(b"garbage"), None);
        let ack = build_reject_ack_without_message(None, &[], &now, "R2");
        assert_eq!(segments(&ack)[1], "MSA|AR|");
    }
}
