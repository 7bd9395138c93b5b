//! SMS segment counting (3GPP TS 23.038): GSM-7 when every character is in
//! the default alphabet or its extension table (extension characters take
//! two septets), UCS-2 otherwise.

/// How the text is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

/// The text's size: its units (septets or UTF-16 code units) and the
/// segments it is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    pub encoding: Encoding,
    pub units: usize,
    pub segments: usize,
}

const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const EXTENSION: &str = "^{}\\[~]|€\u{0c}";

fn septets(c: char) -> Option<usize> {
    if BASIC.contains(c) {
        Some(1)
    } else if EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Counts the segments of `text`.
pub fn segments(text: &str) -> Segments {
    let gsm: Option<Vec<usize>> = text.chars().map(septets).collect();
    match gsm {
        Some(sizes) => count(Encoding::Gsm7, &sizes, 160, 153),
        None => {
            let sizes: Vec<usize> = text.chars().map(char::len_utf16).collect();
            count(Encoding::Ucs2, &sizes, 70, 67)
        }
    }
}

/// Units in one segment at most, and per segment of a long message; a
/// character's units are never split across segments.
fn count(encoding: Encoding, sizes: &[usize], single: usize, part: usize) -> Segments {
    let units: usize = sizes.iter().sum();
    if units <= single {
        return Segments {
            encoding,
            units,
            segments: 1,
        };
    }
    let (mut segments, mut used) = (1, 0);
    for &s in sizes {
        if used + s > part {
            segments += 1;
            used = 0;
        }
        used += s;
    }
    Segments {
        encoding,
        units,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm_boundaries() {
        assert_eq!(segments("").segments, 1);
        assert_eq!(segments(&"a".repeat(160)).segments, 1);
        let s = segments(&"a".repeat(161));
        assert_eq!((s.encoding, s.segments), (Encoding::Gsm7, 2));
        assert_eq!(segments(&"a".repeat(306)).segments, 2);
        assert_eq!(segments(&"a".repeat(307)).segments, 3);
        // An extension character at the boundary moves to the next segment.
        let t = format!("{}€{}", "a".repeat(152), "a".repeat(10));
        let s = segments(&t);
        assert_eq!((s.units, s.segments), (164, 2));
        // 306 units fit two segments only if the € could be split.
        let t = format!("{}€{}", "a".repeat(152), "a".repeat(152));
        let s = segments(&t);
        assert_eq!((s.units, s.segments), (306, 3));
    }

    #[test]
    fn ucs2_boundaries() {
        assert_eq!(segments(&"ж".repeat(70)).segments, 1);
        let s = segments(&"ж".repeat(71));
        assert_eq!((s.encoding, s.segments), (Encoding::Ucs2, 2));
        // A surrogate pair is not split: 66 units then an emoji.
        let t = format!("{}😀{}", "ж".repeat(66), "ж".repeat(10));
        let s = segments(&t);
        assert_eq!((s.units, s.segments), (78, 2));
    }
}
