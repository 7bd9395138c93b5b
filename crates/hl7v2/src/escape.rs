//! Escape sequences: decoding (`\F\` ... `\X..\`, `\.br\`) and [`escape()`].
//!
//! Decoding rules, applied to a value's bytes (a field, repetition,
//! component or subcomponent) with the message's own delimiters (shown
//! here as `|^~\&`):
//!
//! | sequence | becomes |
//! | --- | --- |
//! | `\F\` `\S\` `\T\` `\R\` `\E\` | the field, component, subcomponent, repetition, escape character |
//! | `\P\` | the truncation character (v2.7+, when MSH-2 has one); otherwise unknown |
//! | `\Xhhhh..\` | those bytes, decoded through the message's character set: `\XC3A9\` is `é` in UTF-8, `\XE9\` is `é` in ISO 8859-1. Adjacent `\X..\` sequences are decoded together, so a sender may write one byte each (`\XC3\\XA9\`). Bytes invalid for the character set are an error at the first escape of the run. |
//! | `\.br\` | a newline |
//! | `\.sp\`, `\.spN\` | N newlines (default 1, at most 100) |
//! | `\.ce\` | a newline (centering is not kept) |
//! | `\.skN\` | N spaces (at most 100) |
//! | `\.fi\` `\.nf\` `\.inN\` `\.tiN\` | nothing (layout commands) |
//! | `\H\` `\N\` | nothing (highlighting on/off) |
//! | anything else (`\Zxx\` local escapes, `\Cxxyy\`/`\Mxxyyzz\` character set switches, `\Q\`, odd or non-hex `\X..\`) | **kept literally**, with a warning |
//! | an escape character with no closing one | kept literally, with a warning |
//!
//! Unknown sequences are kept rather than dropped or rejected: the text is
//! not lost, a reader sees that something was there, and the pipeline can
//! log the warning ([`Decoded::warnings`]) without rejecting the value.

use std::borrow::Cow;

use crate::charset::Charset;
use crate::delimiters::Delimiters;
use crate::error::{snippet, Location, ParseError};

/// Limit on the newlines or spaces one formatting escape can produce, so
/// that output stays within a small multiple of the input.
const MAX_REPEAT: usize = 100;

/// A decoded value and the warnings its escapes produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The text.
    pub text: Cow<'a, str>,
    /// Escape sequences that were kept literally.
    pub warnings: Vec<EscapeWarning>,
}

/// Why an escape sequence was kept literally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeWarningKind {
    /// Not a sequence this crate knows (including local `\Z..\` ones and
    /// malformed `\X..\`).
    Unknown,
    /// An escape character without its closing one.
    Unterminated,
    /// An ISO 2022 character set switch (`\C..\`, `\M..\`): not supported.
    CharsetSwitch,
}

/// An escape sequence kept literally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscapeWarning {
    /// Why.
    pub kind: EscapeWarningKind,
    /// The sequence as sent (lossy, at most 32 bytes).
    pub sequence: String,
    /// Where it starts.
    pub location: Location,
}

enum Action<'s> {
    Push(char),
    PushRepeat(char, usize),
    Nothing,
    Hex(&'s [u8]),
    Keep(EscapeWarningKind),
}

fn interpret<'s>(content: &'s [u8], d: &Delimiters) -> Action<'s> {
    match content {
        b"F" => Action::Push(char::from(d.field())),
        b"S" => Action::Push(char::from(d.component())),
        b"T" => Action::Push(char::from(d.subcomponent())),
        b"R" => Action::Push(char::from(d.repetition())),
        b"E" => Action::Push(char::from(d.escape())),
        b"P" => match d.truncation() {
            Some(t) => Action::Push(char::from(t)),
            None => Action::Keep(EscapeWarningKind::Unknown),
        },
        b"H" | b"N" => Action::Nothing,
        [b'X', hex @ ..] if hex.len() % 2 == 0 && hex.iter().all(u8::is_ascii_hexdigit) => {
            Action::Hex(hex)
        }
        [b'C', ..] | [b'M', ..] => Action::Keep(EscapeWarningKind::CharsetSwitch),
        [b'.', cmd @ ..] => formatting(cmd),
        _ => Action::Keep(EscapeWarningKind::Unknown),
    }
}

fn formatting(cmd: &[u8]) -> Action<'_> {
    let (name, arg) = (
        cmd.get(..2).unwrap_or_default(),
        cmd.get(2..).unwrap_or_default(),
    );
    let count = |default: usize| -> Option<usize> {
        let arg = arg.trim_ascii();
        let arg = arg.strip_prefix(b"+").unwrap_or(arg);
        if arg.is_empty() {
            return Some(default);
        }
        if arg.len() > 6 || !arg.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = arg
            .iter()
            .fold(0usize, |n, b| n * 10 + usize::from(b - b'0'));
        Some(n.min(MAX_REPEAT))
    };
    let signed_ok = || {
        let a = arg.trim_ascii();
        let a = a
            .strip_prefix(b"+")
            .or_else(|| a.strip_prefix(b"-"))
            .unwrap_or(a);
        a.iter().all(u8::is_ascii_digit)
    };
    match name {
        b"br" if arg.is_empty() => Action::Push('\n'),
        b"ce" if arg.is_empty() => Action::Push('\n'),
        b"fi" | b"nf" if arg.is_empty() => Action::Nothing,
        b"sp" => match count(1) {
            Some(n) => Action::PushRepeat('\n', n),
            None => Action::Keep(EscapeWarningKind::Unknown),
        },
        b"sk" => match count(1) {
            Some(n) => Action::PushRepeat(' ', n),
            None => Action::Keep(EscapeWarningKind::Unknown),
        },
        b"in" | b"ti" if signed_ok() => Action::Nothing,
        _ => Action::Keep(EscapeWarningKind::Unknown),
    }
}

fn hex_bytes(hex: &[u8]) -> Vec<u8> {
    let nibble = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    };
    hex.chunks_exact(2)
        .map(|p| match p {
            [h, l] => (nibble(*h) << 4) | nibble(*l),
            _ => 0,
        })
        .collect()
}

/// Decodes `raw` (see the module docs). `locate(i)` gives the location of
/// byte `i` of `raw`.
pub(crate) fn decode<'a>(
    raw: &'a [u8],
    d: &Delimiters,
    charset: Charset,
    locate: &dyn Fn(usize) -> Location,
    mut warnings: Option<&mut Vec<EscapeWarning>>,
) -> Result<Cow<'a, str>, ParseError> {
    let err = |(i, kind)| ParseError::new(kind, locate(i));
    let esc = d.escape();
    let Some(first) = raw.iter().position(|b| *b == esc) else {
        return charset.decode(raw).map_err(err);
    };
    // Validate everything first: escape characters are ASCII, so every
    // literal run between them is then valid on its own.
    charset.decode(raw).map_err(err)?;
    let mut out = String::with_capacity(raw.len());
    let literal = |out: &mut String, from: usize, to: usize| {
        charset
            .push_decoded(raw.get(from..to).unwrap_or_default(), out)
            .map_err(|(i, kind)| ParseError::new(kind, locate(from + i)))
    };
    literal(&mut out, 0, first)?;
    // Bytes of a run of adjacent `\X..\` escapes, decoded together when
    // the run ends, and the offset of the run's first escape.
    let mut hex_run: Vec<u8> = Vec::new();
    let mut hex_at = first;
    let flush = |out: &mut String, run: &mut Vec<u8>, at: usize| {
        if run.is_empty() {
            return Ok(());
        }
        let r = charset
            .push_decoded(run, out)
            .map_err(|(_, kind)| ParseError::new(kind, locate(at)));
        run.clear();
        r
    };
    let mut i = first;
    while i < raw.len() {
        let after = raw.get(i + 1..).unwrap_or_default();
        let Some(rel) = after.iter().position(|b| *b == esc) else {
            flush(&mut out, &mut hex_run, hex_at)?;
            if let Some(w) = warnings.as_deref_mut() {
                w.push(EscapeWarning {
                    kind: EscapeWarningKind::Unterminated,
                    sequence: snippet(raw.get(i..).unwrap_or_default(), 32),
                    location: locate(i),
                });
            }
            literal(&mut out, i, raw.len())?;
            break;
        };
        let j = i + 1 + rel;
        let content = raw.get(i + 1..j).unwrap_or_default();
        let action = interpret(content, d);
        if !matches!(action, Action::Hex(_)) {
            flush(&mut out, &mut hex_run, hex_at)?;
        }
        match action {
            Action::Push(c) => out.push(c),
            Action::PushRepeat(c, n) => out.extend(std::iter::repeat_n(c, n)),
            Action::Nothing => {}
            Action::Hex(hex) => {
                if hex_run.is_empty() {
                    hex_at = i;
                }
                hex_run.extend(hex_bytes(hex));
            }
            Action::Keep(kind) => {
                if let Some(w) = warnings.as_deref_mut() {
                    w.push(EscapeWarning {
                        kind,
                        sequence: snippet(raw.get(i..=j).unwrap_or_default(), 32),
                        location: locate(i),
                    });
                }
                literal(&mut out, i, j + 1)?;
            }
        }
        i = j + 1;
        let next = raw
            .get(i..)
            .and_then(|r| r.iter().position(|b| *b == esc))
            .map_or(raw.len(), |p| i + p);
        if next > i {
            flush(&mut out, &mut hex_run, hex_at)?;
            literal(&mut out, i, next)?;
        }
        i = next;
    }
    flush(&mut out, &mut hex_run, hex_at)?;
    Ok(Cow::Owned(out))
}

/// Escapes `value` for an ER7 message with delimiters `d`, so that decoding
/// gives `value` back: delimiters become `\F\ \S\ \T\ \R\ \E\` (and `\P\`
/// for a truncation character), `\n` becomes `\.br\` and `\r` becomes
/// `\X0D\`. The result is text; encode it for the message's character set
/// (see [`Charset::encode_lossy`]).
pub fn escape(value: &str, d: &Delimiters) -> String {
    let needs = |b: u8| d.is_delimiter(b) || b == b'\n' || b == b'\r';
    if !value.bytes().any(needs) {
        return value.to_owned();
    }
    let e = char::from(d.escape());
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        let code = match u8::try_from(u32::from(c)) {
            Ok(b) if b == d.field() => "F",
            Ok(b) if b == d.component() => "S",
            Ok(b) if b == d.subcomponent() => "T",
            Ok(b) if b == d.repetition() => "R",
            Ok(b) if b == d.escape() => "E",
            Ok(b) if Some(b) == d.truncation() => "P",
            Ok(b'\n') => ".br",
            Ok(b'\r') => "X0D",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push(e);
        out.push_str(code);
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn dec(raw: &[u8], charset: Charset) -> Result<Decoded<'_>, ParseError> {
        let mut w = Vec::new();
        let text = decode(
            raw,
            &Delimiters::default(),
            charset,
            &|i| Location::at(i, 1),
            Some(&mut w),
        )?;
        Ok(Decoded { text, warnings: w })
    }

    fn text(raw: &str) -> String {
        dec(raw.as_bytes(), Charset::Utf8)
            .unwrap()
            .text
            .into_owned()
    }

    #[test]
    fn delimiter_escapes() {
        assert_eq!(
            text(r"Fasting sample \T\ analysed"),
            "Fasting sample & analysed"
        );
        assert_eq!(text(r"\F\\S\\T\\R\\E\"), r"|^&~\");
        assert!(matches!(
            dec(b"plain", Charset::Utf8).unwrap().text,
            Cow::Borrowed("plain")
        ));
    }

    #[test]
    fn custom_delimiters() {
        let d = Delimiters::new(b'#', b"@!$%").unwrap();
        let got = decode(
            br"a$F$b$S$c$T$d$R$e$E$",
            &d,
            Charset::Ascii,
            &|i| Location::at(i, 1),
            None,
        )
        .unwrap();
        assert_eq!(got, "a#b@c%d!e$");
        assert_eq!(escape("a#b@c%d!e$", &d), "a$F$b$S$c$T$d$R$e$E$");
    }

    #[test]
    fn hex_through_charset() {
        assert_eq!(text(r"caf\XC3A9\"), "café");
        assert_eq!(text(r"\xc3a9\"), r"\xc3a9\"); // lower-case x is not an escape
        let latin = dec(br"caf\XE9\", Charset::Latin1).unwrap();
        assert_eq!(latin.text, "café");
        let e = dec(br"ab\XE9\", Charset::Utf8).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidUtf8);
        assert_eq!(e.location().offset, 2);
        let e = dec(br"ab\XE9\", Charset::Ascii).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::NonAscii { byte: 0xE9 });
        assert_eq!(text(r"\X0D0A\"), "\r\n");
        // Adjacent hex escapes form one byte run: a UTF-8 character may be
        // split across them; a run cut by text is decoded in parts.
        assert_eq!(text(r"caf\XC3\\XA9\!"), "café!");
        assert_eq!(text(r"\XE2\\X82\\XAC\\X41\"), "€A");
        let e = dec(br"ok \XC3\x\XA9\", Charset::Utf8).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidUtf8);
        assert_eq!(e.location().offset, 3);
        let e = dec(br"\T\\XC3\\T\\XA9\", Charset::Utf8).unwrap_err();
        assert_eq!(e.location().offset, 3);
        assert_eq!(text(r"a\X\b"), "ab");
    }

    #[test]
    fn formatting_and_highlight() {
        assert_eq!(text(r"line1\.br\line2"), "line1\nline2");
        assert_eq!(text(r"a\.sp2\b"), "a\n\nb");
        assert_eq!(text(r"a\.sp\b"), "a\nb");
        assert_eq!(text(r"a\.sk3\b"), "a   b");
        assert_eq!(text(r"a\.sp99999\b").len(), 2 + MAX_REPEAT);
        assert_eq!(text(r"\.in+4\\.ti-2\\.fi\\.nf\x"), "x");
        assert_eq!(text(r"\H\bold\N\ normal"), "bold normal");
    }

    #[test]
    fn unknown_and_unterminated_are_kept_with_warnings() {
        let d = dec(br"a\Q\b\ZLOCAL\c", Charset::Utf8).unwrap();
        assert_eq!(d.text, r"a\Q\b\ZLOCAL\c");
        assert_eq!(d.warnings.len(), 2);
        assert_eq!(d.warnings[0].kind, EscapeWarningKind::Unknown);
        assert_eq!(d.warnings[0].sequence, r"\Q\");
        assert_eq!(d.warnings[0].location.offset, 1);
        let d = dec(br"50\% off", Charset::Utf8).unwrap();
        assert_eq!(d.text, r"50\% off");
        assert_eq!(d.warnings[0].kind, EscapeWarningKind::Unterminated);
        let d = dec(br"\C2842\x", Charset::Utf8).unwrap();
        assert_eq!(d.warnings[0].kind, EscapeWarningKind::CharsetSwitch);
        assert_eq!(text(r"\XABC\"), r"\XABC\");
        assert_eq!(text(r"\P\"), r"\P\");
        assert_eq!(text(r"\\"), r"\\");
    }

    #[test]
    fn truncation_escape() {
        let d = Delimiters::new(b'|', b"^~\\&#").unwrap();
        let got = decode(br"a\P\b", &d, Charset::Ascii, &|i| Location::at(i, 1), None).unwrap();
        assert_eq!(got, "a#b");
        assert_eq!(escape("a#b", &d), r"a\P\b");
    }

    #[test]
    fn invalid_utf8_outside_escapes_is_located() {
        let e = dec(b"ok\\T\\\xFF", Charset::Utf8).unwrap_err();
        assert_eq!(e.location().offset, 5);
    }

    #[test]
    fn escape_round_trips() {
        let d = Delimiters::default();
        for s in ["", "plain", "a|b^c&d~e\\f", "x\ny\r\nz", "é ü ∑", "\\.br\\"] {
            let e = escape(s, &d);
            assert!(!e.bytes().any(|b| b == b'\r' || b == b'\n' || b == b'|'));
            assert_eq!(text(&e), s, "{e}");
        }
    }
}
