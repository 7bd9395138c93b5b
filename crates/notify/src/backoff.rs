//! Retry waits: exponential backoff with full jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

/// The wait before retry `attempt` (1 is the first retry): a random share
/// (`unit` in [0, 1), from the caller) of `min(cap, base * 2^(attempt-1))`,
/// never less than half of `base`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let exp = attempt.saturating_sub(1).min(40);
    let ceiling = base
        .checked_mul(1u32 << exp.min(31))
        .and_then(|d| if exp > 31 { None } else { Some(d) })
        .unwrap_or(cap)
        .min(cap);
    ceiling.mul_f64(unit).max(base / 2).min(cap.max(base / 2))
}

/// An HTTP `Retry-After` value (delta-seconds or an HTTP-date), capped at
/// a day; `None` when it is neither.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    const DAY: Duration = Duration::from_secs(86_400);
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = v.parse().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(DAY));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(DAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let (b, c) = (Duration::from_secs(1), Duration::from_secs(60));
        let top = |a| backoff(a, b, c, 0.999_999);
        assert!(top(1) <= Duration::from_secs(1));
        assert!(top(3) > Duration::from_secs(3) && top(3) <= Duration::from_secs(4));
        assert!(top(10) <= c && top(10) > Duration::from_secs(59));
        assert_eq!(backoff(u32::MAX, b, c, 0.0), Duration::from_millis(500));
        assert!(backoff(u32::MAX, b, c, 0.5) <= c);
        assert_eq!(backoff(2, b, c, f64::NAN), Duration::from_millis(500));
    }

    #[test]
    fn retry_after_takes_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-1", now), None);
    }
}
