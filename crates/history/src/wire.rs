//! What crosses the gRPC boundary besides the messages: the `grpc-timeout`
//! header (the caller's remaining time, which every call carries) and the
//! service token.

use std::time::Duration;

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), as the gRPC HTTP/2 protocol defines it. `None` for
/// anything else: the service then applies its own limit.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let b = value.as_bytes();
    let (digits, unit) = b.split_at(b.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    // Hashing first makes the lengths equal, so length leaks nothing either.
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The metadata value a caller sends: `Bearer TOKEN`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "m",
            "123456789m",
            "12",
            "1.5S",
            "-1S",
            "5s",
            "5 S",
            "٣S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"x"));
    }

    proptest! {
        #[test]
        fn grpc_timeout_parsing_is_total(s in ".{0,12}") {
            let _ = parse_grpc_timeout(&s);
        }

        #[test]
        fn what_tonic_would_send_parses_back(ms in 0u64..99_999_999) {
            prop_assert_eq!(parse_grpc_timeout(&format!("{ms}m")), Some(Duration::from_millis(ms)));
        }
    }
}
