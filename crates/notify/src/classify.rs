//! Send failures, classified: transient ones are retried, permanent ones
//! fail the delivery at once. Reasons are short and never carry a body.

use std::time::Duration;

/// A classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    Permanent {
        reason: String,
    },
}

fn short(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// An SMTP reply code: 4xx transient, 5xx permanent.
pub fn smtp_code(code: u16, text: &str) -> Failure {
    let reason = format!("SMTP {code}: {}", short(text));
    if (500..600).contains(&code) {
        Failure::Permanent { reason }
    } else {
        Failure::Transient {
            reason,
            retry_after: None,
        }
    }
}

/// An HTTP status of a provider's API: 408, 429 and 5xx transient, other
/// 4xx permanent.
pub fn http_status(status: u16, retry_after: Option<Duration>, body_reason: &str) -> Failure {
    let reason = format!("HTTP {status}: {}", short(body_reason));
    match status {
        408 | 429 | 500..=599 => Failure::Transient {
            reason,
            retry_after,
        },
        400..=499 => Failure::Permanent { reason },
        _ => Failure::Transient {
            reason,
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(matches!(
            smtp_code(451, "try later"),
            Failure::Transient { .. }
        ));
        assert!(matches!(
            smtp_code(550, "no such user"),
            Failure::Permanent { .. }
        ));
        assert!(matches!(
            http_status(429, None, ""),
            Failure::Transient { .. }
        ));
        assert!(matches!(
            http_status(503, None, ""),
            Failure::Transient { .. }
        ));
        assert_eq!(
            http_status(400, None, "21211 invalid"),
            Failure::Permanent {
                reason: "HTTP 400: 21211 invalid".into()
            }
        );
    }
}
