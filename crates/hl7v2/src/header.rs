//! The decoded message header (MSH).
//!
//! [`Msh::read`] runs inside [`crate::Message::parse`], so every parsed
//! message has: a supported version (MSH-12, 2.3 to 2.8), a known character
//! set (MSH-18), a message type (MSH-9), a control id (MSH-10) and a
//! processing id (MSH-11); MSH-7 is optional but, when present, a valid DTM.

use std::borrow::Cow;
use std::fmt;

use crate::charset::Charset;
use crate::dtm::{parse_dtm, Dtm};
use crate::error::{ErrorKind, ParseError};
use crate::message::{Field, Segment};

/// An HD (hierarchic designator): MSH-3 to MSH-6.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hd<'a> {
    /// HD.1, namespace id (`LIS`).
    pub namespace_id: Cow<'a, str>,
    /// HD.2, universal id (an OID, say).
    pub universal_id: Cow<'a, str>,
    /// HD.3, universal id type (`ISO`).
    pub universal_id_type: Cow<'a, str>,
}

impl Hd<'_> {
    /// Whether all components are empty.
    pub fn is_empty(&self) -> bool {
        self.namespace_id.is_empty()
            && self.universal_id.is_empty()
            && self.universal_id_type.is_empty()
    }
}

impl fmt::Display for Hd<'_> {
    /// `namespace^universal^type` with empty trailing components left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.namespace_id)?;
        if !self.universal_id.is_empty() || !self.universal_id_type.is_empty() {
            write!(f, "^{}", self.universal_id)?;
        }
        if !self.universal_id_type.is_empty() {
            write!(f, "^{}", self.universal_id_type)?;
        }
        Ok(())
    }
}

/// MSH-9: message code, trigger event, message structure (`ORU^R01^ORU_R01`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageType<'a> {
    /// MSG.1 (`ORU`).
    pub code: Cow<'a, str>,
    /// MSG.2 (`R01`); may be empty.
    pub trigger: Cow<'a, str>,
    /// MSG.3 (`ORU_R01`); may be empty (older versions do not send it).
    pub structure: Cow<'a, str>,
}

impl MessageType<'_> {
    /// Whether this is `code^trigger`.
    pub fn is(&self, code: &str, trigger: &str) -> bool {
        self.code == code && self.trigger == trigger
    }
}

/// MSH-12.1, a version from 2.3 to 2.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// 3 to 8.
    pub minor: u8,
    /// The third number (`2.5.1` has 1), 0 when absent.
    pub patch: u8,
}

impl Version {
    /// Parses `2.N` or `2.N.P` with N from 3 to 8.
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.split('.');
        let num = |p: Option<&str>| -> Option<u8> {
            let p = p?;
            if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        if num(parts.next())? != 2 {
            return None;
        }
        let minor = num(parts.next())?;
        let patch = match parts.next() {
            None => 0,
            p => num(p)?,
        };
        if parts.next().is_some() || !(3..=8).contains(&minor) {
            return None;
        }
        Some(Version { minor, patch })
    }

    /// Whether the ERR segment has the v2.5 layout (ERR-2 to ERR-8).
    pub fn has_v25_err(&self) -> bool {
        self.minor >= 5
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patch == 0 {
            write!(f, "2.{}", self.minor)
        } else {
            write!(f, "2.{}.{}", self.minor, self.patch)
        }
    }
}

/// The decoded MSH segment. Values borrow the input unless decoding changed
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msh<'a> {
    sending_application: Hd<'a>,
    sending_facility: Hd<'a>,
    receiving_application: Hd<'a>,
    receiving_facility: Hd<'a>,
    datetime: Option<Dtm>,
    message_type: MessageType<'a>,
    control_id: Cow<'a, str>,
    processing_id: Cow<'a, str>,
    version: Version,
    charset: Charset,
}

fn component<'a>(f: Option<Field<'a>>, n: usize) -> Result<Cow<'a, str>, ParseError> {
    match f.and_then(|f| f.component(n)) {
        Some(c) => c.decoded(),
        None => Ok(Cow::Borrowed("")),
    }
}

fn hd<'a>(seg: &Segment<'a>, n: usize) -> Result<Hd<'a>, ParseError> {
    let f = seg.field(n);
    Ok(Hd {
        namespace_id: component(f, 1)?,
        universal_id: component(f, 2)?,
        universal_id_type: component(f, 3)?,
    })
}

fn required<'a>(
    seg: &Segment<'a>,
    n: usize,
    name: &'static str,
) -> Result<Cow<'a, str>, ParseError> {
    let v = component(seg.field(n), 1)?;
    if v.trim().is_empty() {
        return Err(ParseError::new(
            ErrorKind::MissingField { name },
            seg.field_location(n),
        ));
    }
    Ok(v)
}

impl<'a> Msh<'a> {
    /// Decodes the MSH segment of a message whose character set is known.
    pub(crate) fn read(seg: &Segment<'a>) -> Result<Msh<'a>, ParseError> {
        let version_text = required(seg, 12, "MSH-12")?;
        let version = Version::parse(version_text.trim()).ok_or_else(|| {
            ParseError::new(
                ErrorKind::UnsupportedVersion {
                    version: version_text.chars().take(32).collect(),
                },
                seg.field_location(12),
            )
        })?;
        let charset = match seg.field(18).and_then(|f| f.component(1)) {
            Some(c) => {
                Charset::from_msh18(c.raw()).map_err(|kind| ParseError::new(kind, c.location()))?
            }
            None => Charset::Ascii,
        };
        let code = required(seg, 9, "MSH-9")?;
        let f9 = seg.field(9);
        let message_type = MessageType {
            code,
            trigger: component(f9, 2)?,
            structure: component(f9, 3)?,
        };
        let datetime = match seg.field(7).and_then(|f| f.component(1)) {
            Some(c) if !c.is_empty() => {
                let text = c.decoded()?;
                Some(parse_dtm(&text).map_err(|reason| {
                    ParseError::new(
                        ErrorKind::InvalidDatetime {
                            value: text.chars().take(32).collect(),
                            reason,
                        },
                        c.location(),
                    )
                })?)
            }
            _ => None,
        };
        Ok(Msh {
            sending_application: hd(seg, 3)?,
            sending_facility: hd(seg, 4)?,
            receiving_application: hd(seg, 5)?,
            receiving_facility: hd(seg, 6)?,
            datetime,
            message_type,
            control_id: required(seg, 10, "MSH-10")?,
            processing_id: required(seg, 11, "MSH-11")?,
            version,
            charset,
        })
    }

    /// MSH-3.
    pub fn sending_application(&self) -> &Hd<'a> {
        &self.sending_application
    }
    /// MSH-4.
    pub fn sending_facility(&self) -> &Hd<'a> {
        &self.sending_facility
    }
    /// MSH-5.
    pub fn receiving_application(&self) -> &Hd<'a> {
        &self.receiving_application
    }
    /// MSH-6.
    pub fn receiving_facility(&self) -> &Hd<'a> {
        &self.receiving_facility
    }
    /// MSH-7, the message date/time, when sent.
    pub fn datetime(&self) -> Option<&Dtm> {
        self.datetime.as_ref()
    }
    /// MSH-9.
    pub fn message_type(&self) -> &MessageType<'a> {
        &self.message_type
    }
    /// MSH-10, the message control id (with the sender, the idempotency key).
    pub fn control_id(&self) -> &str {
        &self.control_id
    }
    /// MSH-11.1, the processing id (`P`, `T`, `D`).
    pub fn processing_id(&self) -> &str {
        &self.processing_id
    }
    /// MSH-12.1.
    pub fn version(&self) -> Version {
        self.version
    }
    /// MSH-18 (ASCII when empty).
    pub fn charset(&self) -> Charset {
        self.charset
    }
    /// The sender as one stable string, `application|facility` (each HD in
    /// its `a^b^c` form), for provenance and idempotency keys.
    pub fn sender(&self) -> String {
        format!("{}|{}", self.sending_application, self.sending_facility)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in [
            "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.2",
        ] {
            assert!(Version::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "", "2", "2.2", "2.9", "3.0", "2.5.1.1", "2.x", "2..1", "2.5.", "2.5.100",
        ] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            Version::parse("2.5.1").map(|v| v.to_string()).as_deref(),
            Some("2.5.1")
        );
    }
}
