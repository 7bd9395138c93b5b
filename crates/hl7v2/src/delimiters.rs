//! The delimiters of a message: MSH-1 (field separator) and MSH-2 (component,
//! repetition, escape, subcomponent and, from v2.7, truncation characters).

use crate::error::ErrorKind;

/// A message's delimiters.
///
/// Invariant: all distinct, each a printable ASCII character (0x21..=0x7E)
/// that is not a letter or digit. The standard only forbids letters, digits,
/// CR and LF; this crate also refuses controls, space and bytes above 0x7F,
/// because a non-ASCII delimiter would cut UTF-8 sequences apart and a
/// control or space delimiter cannot be told from data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiters {
    field: u8,
    component: u8,
    repetition: u8,
    escape: u8,
    subcomponent: u8,
    truncation: Option<u8>,
}

impl Default for Delimiters {
    /// The usual `|^~\&`.
    fn default() -> Self {
        Delimiters {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// Delimiters from the field separator (MSH-1) and the encoding
    /// characters (MSH-2: component, repetition, escape, subcomponent, and
    /// optionally truncation). The error's kind says what is wrong; the
    /// parser adds where.
    pub fn new(field: u8, encoding: &[u8]) -> Result<Delimiters, (usize, ErrorKind)> {
        check(field).map_err(|k| (0, k))?;
        let (component, repetition, escape, subcomponent, truncation) = match *encoding {
            [c, r, e, s] => (c, r, e, s, None),
            [c, r, e, s, t] => (c, r, e, s, Some(t)),
            _ => {
                return Err((
                    0,
                    ErrorKind::BadEncodingCharacters {
                        found: encoding.len(),
                    },
                ))
            }
        };
        for (i, b) in encoding.iter().enumerate() {
            check(*b).map_err(|k| (i + 1, k))?;
            let before = std::iter::once(&field).chain(encoding.get(..i).unwrap_or_default());
            if before.into_iter().any(|x| x == b) {
                return Err((i + 1, ErrorKind::DuplicateDelimiter { byte: *b }));
            }
        }
        Ok(Delimiters {
            field,
            component,
            repetition,
            escape,
            subcomponent,
            truncation,
        })
    }

    /// The field separator (MSH-1).
    pub fn field(&self) -> u8 {
        self.field
    }
    /// The component separator.
    pub fn component(&self) -> u8 {
        self.component
    }
    /// The repetition separator.
    pub fn repetition(&self) -> u8 {
        self.repetition
    }
    /// The escape character.
    pub fn escape(&self) -> u8 {
        self.escape
    }
    /// The subcomponent separator.
    pub fn subcomponent(&self) -> u8 {
        self.subcomponent
    }
    /// The truncation character (v2.7+), when MSH-2 has five characters.
    pub fn truncation(&self) -> Option<u8> {
        self.truncation
    }

    /// MSH-2 as it is written: `^~\&` (plus the truncation character).
    pub fn encoding_characters(&self) -> String {
        let mut s: String = [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ]
        .iter()
        .map(|b| char::from(*b))
        .collect();
        if let Some(t) = self.truncation {
            s.push(char::from(t));
        }
        s
    }

    /// Whether `b` is one of the delimiters.
    pub fn is_delimiter(&self, b: u8) -> bool {
        b == self.field
            || b == self.component
            || b == self.repetition
            || b == self.escape
            || b == self.subcomponent
            || Some(b) == self.truncation
    }
}

fn check(b: u8) -> Result<(), ErrorKind> {
    let reason = if b == b'\r' || b == b'\n' {
        "a segment terminator"
    } else if b.is_ascii_alphanumeric() {
        "a letter or digit"
    } else if !b.is_ascii_graphic() {
        "not a printable ASCII character"
    } else {
        return Ok(());
    };
    Err(ErrorKind::InvalidDelimiter { byte: b, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_and_truncation() {
        let d = Delimiters::new(b'|', b"^~\\&").unwrap();
        assert_eq!(d, Delimiters::default());
        assert_eq!(d.encoding_characters(), "^~\\&");
        let d = Delimiters::new(b'|', b"^~\\&#").unwrap();
        assert_eq!(d.truncation(), Some(b'#'));
    }

    #[test]
    fn rejects_bad_sets() {
        assert!(matches!(
            Delimiters::new(b'|', b"^~"),
            Err((0, ErrorKind::BadEncodingCharacters { found: 2 }))
        ));
        assert!(matches!(
            Delimiters::new(b'|', b"^~\\&#!"),
            Err((0, ErrorKind::BadEncodingCharacters { found: 6 }))
        ));
        assert!(matches!(
            Delimiters::new(b'|', b"^~\\|"),
            Err((4, ErrorKind::DuplicateDelimiter { byte: b'|' }))
        ));
        assert!(matches!(
            Delimiters::new(b'|', b"^^\\&"),
            Err((2, ErrorKind::DuplicateDelimiter { byte: b'^' }))
        ));
        assert!(matches!(
            Delimiters::new(b'A', b"^~\\&"),
            Err((0, ErrorKind::InvalidDelimiter { .. }))
        ));
        assert!(matches!(
            Delimiters::new(b'|', b"^~\r&"),
            Err((3, ErrorKind::InvalidDelimiter { .. }))
        ));
        assert!(matches!(
            Delimiters::new(b'|', b"^~\0&"),
            Err((3, ErrorKind::InvalidDelimiter { .. }))
        ));
        assert!(matches!(
            Delimiters::new(0xA6, b"^~\\&"),
            Err((0, ErrorKind::InvalidDelimiter { .. }))
        ));
    }
}
