//! Character sets of MSH-18 and the decoding of value bytes to text.
//!
//! Supported: ASCII (MSH-18 empty or `ASCII`), UTF-8 (`UNICODE UTF-8`, and
//! the common non-standard `UTF-8`) and ISO 8859-1 (`8859/1`). Names are
//! matched case-insensitively after trimming spaces. Only the first
//! repetition of MSH-18 (the default character set) is used; ISO 2022 code
//! switching (`\C..\`, `\M..\`) is not supported (see [`crate::escape`]).

use std::borrow::Cow;

use crate::error::ErrorKind;

/// A message's character set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Charset {
    /// US-ASCII: bytes above 0x7F are errors. The default when MSH-18 is empty.
    #[default]
    Ascii,
    /// UTF-8, validated.
    Utf8,
    /// ISO 8859-1 (Latin-1): each byte is the code point of the same value.
    Latin1,
}

impl Charset {
    /// The character set named by MSH-18 (its first repetition, first
    /// component, as raw bytes).
    pub fn from_msh18(name: &[u8]) -> Result<Charset, ErrorKind> {
        let trimmed = name.trim_ascii();
        let is = |n: &str| trimmed.eq_ignore_ascii_case(n.as_bytes());
        if trimmed.is_empty() || is("ASCII") {
            Ok(Charset::Ascii)
        } else if is("UNICODE UTF-8") || is("UTF-8") || is("UTF8") {
            Ok(Charset::Utf8)
        } else if is("8859/1") {
            Ok(Charset::Latin1)
        } else {
            Err(ErrorKind::UnknownCharset {
                name: crate::error::snippet(trimmed, 64),
            })
        }
    }

    /// The standard MSH-18 name (empty for ASCII, the default).
    pub fn msh18_name(self) -> &'static str {
        match self {
            Charset::Ascii => "",
            Charset::Utf8 => "UNICODE UTF-8",
            Charset::Latin1 => "8859/1",
        }
    }

    /// Decodes `bytes`: borrowed when they already are valid UTF-8 text of
    /// the same meaning. On error, the index of the first bad byte.
    #[inline]
    pub fn decode(self, bytes: &[u8]) -> Result<Cow<'_, str>, (usize, ErrorKind)> {
        match self {
            Charset::Utf8 => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|e| (e.valid_up_to(), ErrorKind::InvalidUtf8)),
            Charset::Ascii => {
                if let Some(i) = bytes.iter().position(|b| !b.is_ascii()) {
                    let byte = bytes.get(i).copied().unwrap_or_default();
                    return Err((i, ErrorKind::NonAscii { byte }));
                }
                std::str::from_utf8(bytes)
                    .map(Cow::Borrowed)
                    .map_err(|e| (e.valid_up_to(), ErrorKind::InvalidUtf8))
            }
            Charset::Latin1 => {
                if bytes.is_ascii() {
                    std::str::from_utf8(bytes)
                        .map(Cow::Borrowed)
                        .map_err(|e| (e.valid_up_to(), ErrorKind::InvalidUtf8))
                } else {
                    Ok(Cow::Owned(bytes.iter().map(|b| char::from(*b)).collect()))
                }
            }
        }
    }

    /// Appends the decoded `bytes` to `out`.
    pub(crate) fn push_decoded(
        self,
        bytes: &[u8],
        out: &mut String,
    ) -> Result<(), (usize, ErrorKind)> {
        match self {
            Charset::Latin1 => out.extend(bytes.iter().map(|b| char::from(*b))),
            _ => out.push_str(&self.decode(bytes)?),
        }
        Ok(())
    }

    /// Encodes text for a message in this character set; characters it
    /// cannot represent become `?`. Used for text clinflow writes itself
    /// (ACK messages), never for received data.
    pub fn encode_lossy(self, text: &str) -> Cow<'_, [u8]> {
        match self {
            Charset::Utf8 => Cow::Borrowed(text.as_bytes()),
            _ if text.is_ascii() => Cow::Borrowed(text.as_bytes()),
            Charset::Ascii => Cow::Owned(
                text.chars()
                    .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
                    .collect(),
            ),
            Charset::Latin1 => Cow::Owned(
                text.chars()
                    .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(Charset::from_msh18(b""), Ok(Charset::Ascii));
        assert_eq!(Charset::from_msh18(b"ASCII"), Ok(Charset::Ascii));
        assert_eq!(Charset::from_msh18(b"UNICODE UTF-8"), Ok(Charset::Utf8));
        assert_eq!(Charset::from_msh18(b"UTF-8"), Ok(Charset::Utf8));
        assert_eq!(Charset::from_msh18(b"8859/1"), Ok(Charset::Latin1));
        assert_eq!(
            Charset::from_msh18(b"ISO IR87"),
            Err(ErrorKind::UnknownCharset {
                name: "ISO IR87".into()
            })
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(Charset::Utf8.decode("é".as_bytes()).unwrap(), "é");
        assert_eq!(
            Charset::Utf8.decode(b"ab\xC3"),
            Err((2, ErrorKind::InvalidUtf8))
        );
        assert_eq!(
            Charset::Ascii.decode(b"a\xE9"),
            Err((1, ErrorKind::NonAscii { byte: 0xE9 }))
        );
        assert_eq!(Charset::Latin1.decode(b"caf\xE9").unwrap(), "café");
        assert!(matches!(
            Charset::Latin1.decode(b"cafe"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn encoding() {
        assert_eq!(&*Charset::Latin1.encode_lossy("café €"), b"caf\xE9 ?");
        assert_eq!(&*Charset::Ascii.encode_lossy("café"), b"caf?");
        assert_eq!(&*Charset::Utf8.encode_lossy("é"), "é".as_bytes());
    }
}
