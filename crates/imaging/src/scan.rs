//! A structural walk over encoded DICOM bytes, run before dicom-rs parses them.
//!
//! dicom-rs allocates a value's buffer from its declared length before reading it, and
//! recurses once per nested sequence, so a 1 KiB input declaring a 3 GiB element or
//! ten thousand nested sequences could exhaust memory or the stack (an abort, which no
//! `catch_unwind` stops). This walk reads only element headers: every defined length
//! must fit in the bytes that remain in its container, every undefined length must be
//! closed by its delimiter, and nesting is limited to [`MAX_DEPTH`]. It also finds where
//! a Part 10 file's dataset starts and which transfer syntax it declares.
//!
//! It does not judge values; that is dicom-rs's job once the structure is known to be
//! bounded.

use crate::error::ParseError;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Deepest nesting of sequences accepted (real objects rarely exceed 5).
pub const MAX_DEPTH: usize = 32;

/// How a dataset's element headers are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Explicit VR (else implicit VR).
    pub explicit: bool,
    /// Big endian (else little endian).
    pub big_endian: bool,
}

impl Encoding {
    const IMPLICIT_LE: Encoding = Encoding {
        explicit: false,
        big_endian: false,
    };
    const EXPLICIT_LE: Encoding = Encoding {
        explicit: true,
        big_endian: false,
    };
}

/// The header encoding of a dataset in transfer syntax `ts`, or `None` when the dataset
/// itself is compressed (deflate) and cannot be walked without inflating it.
pub fn encoding_of(ts: &str) -> Option<Encoding> {
    match ts {
        "1.2.840.10008.1.2" => Some(Encoding::IMPLICIT_LE),
        "1.2.840.10008.1.2.2" => Some(Encoding {
            explicit: true,
            big_endian: true,
        }),
        // Deflated Explicit VR Little Endian and the JPIP deflate variants.
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95" | "1.2.840.10008.1.2.4.205" => None,
        _ => Some(Encoding::EXPLICIT_LE),
    }
}

/// Where the dataset of a Part 10 file starts and the transfer syntax its file meta
/// group declares (trimmed of padding).
pub fn part10_layout(bytes: &[u8]) -> Result<(usize, String), ParseError> {
    if bytes.len() < 132 {
        return Err(ParseError::new(format!(
            "not a DICOM Part 10 file: {} bytes is shorter than the 128-byte preamble and 'DICM'",
            bytes.len()
        )));
    }
    if &bytes[128..132] != b"DICM" {
        return Err(ParseError::at(
            "not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble",
            128,
        ));
    }
    let scanner = Scanner { buf: bytes };
    let mut pos = 132;
    let mut ts = None;
    // Like dicom-rs, trust File Meta Information Group Length (0002,0000) for where the
    // group ends when it comes first; otherwise the group runs while tags are 0002.
    let mut group_end = bytes.len();
    if bytes.len() >= 144 && bytes[132..140] == [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00] {
        let len = scanner.u32(140, false) as usize;
        group_end = 144usize.saturating_add(len).min(bytes.len());
    }
    while group_end.saturating_sub(pos) >= 8 && scanner.u16(pos, false) == 0x0002 {
        let elem = scanner.u16(pos + 2, false);
        let (hdr, len) = scanner.explicit_header(pos, false)?;
        let len = match len {
            Some(len) => len,
            None => {
                return Err(ParseError::at(
                    format!("file meta element (0002,{elem:04X}) has an undefined length"),
                    pos,
                ))
            }
        };
        let start = pos + hdr;
        if len > bytes.len() - start {
            return Err(overrun(Tag(2, elem), len, bytes.len() - start, pos));
        }
        if elem == 0x0010 {
            let value = String::from_utf8_lossy(&bytes[start..start + len]);
            ts = Some(value.trim_matches(|c| c == '\0' || c == ' ').to_string());
        }
        pos = start + len;
    }
    match ts {
        Some(ts) if !ts.is_empty() => Ok((pos, ts)),
        _ => Err(ParseError::at(
            "TransferSyntaxUID (0002,0010) is missing from the file meta group",
            132,
        )),
    }
}

/// Walks the dataset `bytes` (which start at `base` in the caller's input, for error
/// offsets) and checks that its structure is bounded; see the module docs.
pub fn check_dataset(bytes: &[u8], base: usize, encoding: Encoding) -> Result<(), ParseError> {
    let scanner = Scanner { buf: bytes };
    scanner
        .dataset(0, bytes.len(), false, 0, encoding)
        .map(|_| ())
        .map_err(|mut e| {
            e.offset = e.offset.map(|o| o + base as u64);
            e
        })
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u16 = 0xE000;
const ITEM_DELIMITER: u16 = 0xE00D;
const SEQUENCE_DELIMITER: u16 = 0xE0DD;

fn overrun(tag: Tag, len: usize, remaining: usize, at: usize) -> ParseError {
    ParseError::at(
        format!(
            "element ({:04X},{:04X}) declares {len} bytes but only {remaining} remain",
            tag.0, tag.1
        ),
        at,
    )
}

fn truncated(what: &str, at: usize) -> ParseError {
    ParseError::at(format!("input ends inside {what}"), at)
}

struct Scanner<'a> {
    buf: &'a [u8],
}

impl Scanner<'_> {
    // Callers check bounds before reading; `get` keeps a mistake from panicking.
    fn u16(&self, pos: usize, big_endian: bool) -> u16 {
        let b = [
            self.buf.get(pos).copied().unwrap_or(0),
            self.buf.get(pos + 1).copied().unwrap_or(0),
        ];
        if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(&self, pos: usize, big_endian: bool) -> u32 {
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = self.buf.get(pos + i).copied().unwrap_or(0);
        }
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Header length and value length (`None` = undefined) of an explicit VR element.
    fn explicit_header(
        &self,
        pos: usize,
        big_endian: bool,
    ) -> Result<(usize, Option<usize>), ParseError> {
        let vr = self.vr(pos);
        if has_long_length(vr) {
            if self.buf.len() - pos < 12 {
                return Err(truncated("an element header", pos));
            }
            Ok((12, defined(self.u32(pos + 8, big_endian))))
        } else {
            Ok((8, Some(usize::from(self.u16(pos + 6, big_endian)))))
        }
    }

    /// The VR at `pos`; unknown VR bytes read as UN, as dicom-rs reads them.
    fn vr(&self, pos: usize) -> VR {
        let chars = [
            self.buf.get(pos + 4).copied().unwrap_or(0),
            self.buf.get(pos + 5).copied().unwrap_or(0),
        ];
        VR::from_binary(chars).unwrap_or(VR::UN)
    }

    /// Walks elements from `pos` to `end`, or to an item delimiter when `in_undefined_item`.
    /// Returns the position after the last element (after the delimiter).
    fn dataset(
        &self,
        mut pos: usize,
        end: usize,
        in_undefined_item: bool,
        depth: usize,
        enc: Encoding,
    ) -> Result<usize, ParseError> {
        loop {
            if pos >= end {
                if in_undefined_item {
                    return Err(truncated("an item of undefined length", pos));
                }
                return Ok(end);
            }
            if end - pos < 8 {
                // A few trailing padding bytes after the last element of the file are
                // left to dicom-rs to judge; inside an item they are a broken structure.
                if depth == 0 && !in_undefined_item {
                    return Ok(end);
                }
                return Err(truncated("an element header", pos));
            }
            let tag = Tag(
                self.u16(pos, enc.big_endian),
                self.u16(pos + 2, enc.big_endian),
            );
            if tag.0 == 0xFFFE {
                match tag.1 {
                    ITEM_DELIMITER if in_undefined_item => return Ok(pos + 8),
                    // Some writers close defined-length items with a delimiter too.
                    ITEM_DELIMITER => {
                        pos += 8;
                        continue;
                    }
                    _ => {
                        return Err(ParseError::at(
                            format!(
                                "unexpected delimiter ({:04X},{:04X}) in a dataset",
                                tag.0, tag.1
                            ),
                            pos,
                        ))
                    }
                }
            }
            let (hdr, len, vr) = if enc.explicit {
                let (hdr, len) = self.explicit_header(pos, enc.big_endian)?;
                (hdr, len, Some(self.vr(pos)))
            } else {
                (8, defined(self.u32(pos + 4, enc.big_endian)), None)
            };
            let start = pos + hdr;
            if start > end {
                return Err(truncated("an element header", pos));
            }
            pos = match len {
                None if tag == PIXEL_DATA => self.fragments(start, end, tag)?,
                // Any other undefined length is a sequence. dicom-rs keeps the outer
                // encoding inside, even for UN (where PS3.5 6.2.2 says implicit VR), so
                // the walk does too: it must see the structure dicom-rs will read.
                None => self.sequence(start, end, None, depth + 1, enc)?,
                Some(len) => {
                    if len > end - start {
                        return Err(overrun(tag, len, end - start, pos));
                    }
                    let is_sequence = match vr {
                        Some(vr) => vr == VR::SQ,
                        None => implicit_is_sequence(tag),
                    };
                    if is_sequence {
                        self.sequence(start, end, Some(start + len), depth + 1, enc)?;
                    }
                    start + len
                }
            };
        }
    }

    /// Walks the items of a sequence starting at `pos`: up to `defined_end`, or up to its
    /// sequence delimiter (within `end`) when the length is undefined.
    fn sequence(
        &self,
        mut pos: usize,
        end: usize,
        defined_end: Option<usize>,
        depth: usize,
        enc: Encoding,
    ) -> Result<usize, ParseError> {
        if depth > MAX_DEPTH {
            return Err(ParseError::at(
                format!("sequences are nested deeper than {MAX_DEPTH} levels"),
                pos,
            ));
        }
        let limit = defined_end.unwrap_or(end);
        loop {
            if defined_end == Some(pos) {
                return Ok(pos);
            }
            if limit.saturating_sub(pos) < 8 {
                return Err(truncated("a sequence", pos));
            }
            let tag = Tag(
                self.u16(pos, enc.big_endian),
                self.u16(pos + 2, enc.big_endian),
            );
            let len = defined(self.u32(pos + 4, enc.big_endian));
            match (tag.0, tag.1) {
                (0xFFFE, SEQUENCE_DELIMITER) if defined_end.is_none() => return Ok(pos + 8),
                (0xFFFE, ITEM) => {
                    let start = pos + 8;
                    pos = match len {
                        None => self.dataset(start, limit, true, depth, enc)?,
                        Some(len) => {
                            if len > limit - start {
                                return Err(overrun(tag, len, limit - start, pos));
                            }
                            self.dataset(start, start + len, false, depth, enc)?;
                            start + len
                        }
                    };
                }
                _ => {
                    return Err(ParseError::at(
                        format!(
                            "expected a sequence item, found ({:04X},{:04X})",
                            tag.0, tag.1
                        ),
                        pos,
                    ))
                }
            }
        }
    }

    /// Skips the fragments of encapsulated pixel data (always little endian).
    fn fragments(&self, mut pos: usize, end: usize, tag: Tag) -> Result<usize, ParseError> {
        loop {
            if end.saturating_sub(pos) < 8 {
                return Err(truncated("encapsulated pixel data", pos));
            }
            let item = Tag(self.u16(pos, false), self.u16(pos + 2, false));
            let len = self.u32(pos + 4, false);
            match (item.0, item.1) {
                (0xFFFE, SEQUENCE_DELIMITER) => return Ok(pos + 8),
                (0xFFFE, ITEM) if len != UNDEFINED => {
                    let len = len as usize;
                    if len > end - pos - 8 {
                        return Err(overrun(item, len, end - pos - 8, pos));
                    }
                    pos += 8 + len;
                }
                _ => {
                    return Err(ParseError::at(
                        format!(
                            "encapsulated ({:04X},{:04X}) has a malformed fragment",
                            tag.0, tag.1
                        ),
                        pos,
                    ))
                }
            }
        }
    }
}

fn defined(len: u32) -> Option<usize> {
    (len != UNDEFINED).then_some(len as usize)
}

/// Whether an explicit VR header has the 4-byte length form (PS3.5 7.1.2), with the
/// same list as dicom-encoding.
fn has_long_length(vr: VR) -> bool {
    use VR::*;
    !matches!(
        vr,
        AE | AS
            | AT
            | CS
            | DA
            | DS
            | DT
            | FL
            | FD
            | IS
            | LO
            | LT
            | PN
            | SH
            | SL
            | SS
            | ST
            | TM
            | UI
            | UL
            | US
    )
}

const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

fn implicit_is_sequence(tag: Tag) -> bool {
    StandardDataDictionary
        .by_tag(tag)
        .is_some_and(|entry| entry.vr() == VirtualVr::Exact(VR::SQ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit_element(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        if has_long_length(VR::from_binary(*vr).unwrap()) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn an_overrunning_length_is_rejected_with_its_offset() {
        let mut bytes = explicit_element(0x0010, 0x0020, b"LO", b"ID");
        let mut big = explicit_element(0x7FE0, 0x0010, b"OB", &[0; 4]);
        big[8..12].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        bytes.extend(big);
        let err = check_dataset(&bytes, 100, Encoding::EXPLICIT_LE).unwrap_err();
        assert_eq!(err.offset, Some(110));
        assert!(err.reason.contains("(7FE0,0010)"), "{err}");
    }

    #[test]
    fn deep_nesting_is_rejected() {
        // Each level: an SQ of undefined length holding one item of undefined length.
        let mut bytes = Vec::new();
        for _ in 0..(MAX_DEPTH + 2) {
            bytes.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0]);
            bytes.extend_from_slice(&UNDEFINED.to_le_bytes());
            bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            bytes.extend_from_slice(&UNDEFINED.to_le_bytes());
        }
        let err = check_dataset(&bytes, 0, Encoding::EXPLICIT_LE).unwrap_err();
        assert!(err.reason.contains("nested deeper"), "{err}");
    }

    #[test]
    fn a_well_formed_nested_sequence_passes() {
        let inner = explicit_element(0x0008, 0x1150, b"UI", b"1.2\0");
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        item.extend(inner);
        let mut bytes = explicit_element(0x0008, 0x1115, b"SQ", &item);
        bytes.extend(explicit_element(0x0010, 0x0020, b"LO", b"ID"));
        check_dataset(&bytes, 0, Encoding::EXPLICIT_LE).unwrap();
    }
}
