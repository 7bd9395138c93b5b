//! `application/x-www-form-urlencoded` decoding (request bodies and raw query
//! strings), without allocating for values that need no decoding.

use std::borrow::Cow;

/// The `key=value` pairs of a form body or query string, decoded. A pair
/// without `=` has an empty value; empty segments are skipped.
pub(crate) fn pairs(input: &[u8]) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    input
        .split(|&b| b == b'&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (key, value) = match segment.iter().position(|&b| b == b'=') {
                Some(i) => (&segment[..i], &segment[i + 1..]),
                None => (segment, &segment[segment.len()..]),
            };
            (decode(key), decode(value))
        })
}

/// Percent-decoding with `+` as space; invalid UTF-8 is replaced.
pub(crate) fn decode(raw: &[u8]) -> Cow<'_, str> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        return String::from_utf8_lossy(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, pairs};

    #[test]
    fn decodes_pairs() {
        let got: Vec<(String, String)> =
            pairs(b"To=%2B15551234567&Body=hello+world%21&&Flag&DateSent%3E=2026-12-02")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        assert_eq!(
            got,
            vec![
                ("To".into(), "+15551234567".into()),
                ("Body".into(), "hello world!".into()),
                ("Flag".into(), String::new()),
                ("DateSent>".into(), "2026-12-02".into()),
            ]
        );
    }

    #[test]
    fn keeps_malformed_escapes_and_utf8() {
        assert_eq!(decode(b"100%"), "100%");
        assert_eq!(decode(b"%zz1"), "%zz1");
        assert_eq!(decode(b"%C3%A9t%C3%A9"), "été");
        assert_eq!(decode(b"%4"), "%4");
    }
}
