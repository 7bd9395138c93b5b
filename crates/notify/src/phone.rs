//! E.164 telephone numbers.

use std::fmt;

/// Why a number is not E.164.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneError {
    MissingPlus,
    Length(usize),
    NonDigit(usize),
    LeadingZero,
}

impl fmt::Display for PhoneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhoneError::MissingPlus => write!(f, "missing leading +"),
            PhoneError::Length(n) => write!(f, "must have 8 to 15 digits, has {n}"),
            PhoneError::NonDigit(p) => write!(f, "non-digit at position {p}"),
            PhoneError::LeadingZero => write!(f, "country code cannot start with 0"),
        }
    }
}

impl std::error::Error for PhoneError {}

/// Checks `s` is `+` and 8 to 15 digits, the first not 0.
pub fn e164(s: &str) -> Result<&str, PhoneError> {
    let digits = s.strip_prefix('+').ok_or(PhoneError::MissingPlus)?;
    if let Some((i, _)) = digits.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        return Err(PhoneError::NonDigit(i + 1));
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(PhoneError::Length(digits.len()));
    }
    if digits.starts_with('0') {
        return Err(PhoneError::LeadingZero);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert!(e164("+4915112345678").is_ok());
        assert_eq!(e164("015112345678"), Err(PhoneError::MissingPlus));
        assert_eq!(e164("+49 151"), Err(PhoneError::NonDigit(3)));
        assert_eq!(e164("+1234567"), Err(PhoneError::Length(7)));
        assert_eq!(e164("+0123456789"), Err(PhoneError::LeadingZero));
        assert_eq!(e164("+1234567890123456"), Err(PhoneError::Length(16)));
    }
}
