//! Checked values built at the edge: identifiers, codes, units, contact
//! details and dates.
//!
//! Each type has a fallible constructor (`new`, also `FromStr` and serde
//! `Deserialize`), so code behind the edge takes the checked type instead of
//! re-validating strings. Error reasons never repeat the rejected value: some
//! of these types hold personal data (phone, e-mail, subject id), and errors
//! end up in logs.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use time::{Date, Month};

/// Why a value could not become one of the checked types of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {what}: {reason}")]
pub struct InvalidValue {
    /// What the value was meant to be ("LOINC code").
    pub what: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Check `value` and wrap it.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                match $check(&value) {
                    Ok(()) => Ok(Self(value)),
                    Err(reason) => Err(InvalidValue { what: $what, reason }),
                }
            }

            /// The checked text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(StrVisitor::new(concat!("a ", $what), |s| {
                    Self::new(s).map_err(|e| e.to_string())
                }))
            }
        }
    };
}

checked_string!(
    /// A trial identifier (`CARDIO-01`). It is the id of the trial's FHIR
    /// `ResearchStudy`, so it follows FHIR `id` syntax: 1 to 64 of
    /// `A-Z a-z 0-9 - .`.
    TrialId,
    "trial id",
    check_fhir_id
);

checked_string!(
    /// A site identifier (`site-001`), the id of the site's FHIR
    /// `Organization`: FHIR `id` syntax.
    SiteId,
    "site id",
    check_fhir_id
);

checked_string!(
    /// A subject identifier (`CARDIO-01-0001`), the id of the subject's FHIR
    /// `Patient` and `ResearchSubject`: FHIR `id` syntax.
    SubjectId,
    "subject id",
    check_fhir_id
);

checked_string!(
    /// A LOINC code (`2345-7`): 1 to 7 digits, a dash and the mod-10 check
    /// digit, which is verified.
    Loinc,
    "LOINC code",
    check_loinc
);

checked_string!(
    /// A UCUM unit code (`mg/dL`, `mm[Hg]`, `{steps}`): 1 to 64 printable
    /// ASCII characters without spaces. The UCUM grammar itself is not
    /// checked; units are compared as exact, case-sensitive codes.
    Ucum,
    "UCUM unit",
    check_ucum
);

checked_string!(
    /// An officially assigned ISO 3166-1 alpha-2 country code (`US`, `DE`).
    Country,
    "ISO 3166-1 alpha-2 country code",
    check_country
);

checked_string!(
    /// A phone number in E.164 form: `+`, then 7 to 15 digits, the first not 0.
    E164Phone,
    "E.164 phone number",
    check_e164
);

checked_string!(
    /// An e-mail address of plausible shape (`local@domain.tld`). Shape only:
    /// deliverability is not checked.
    Email,
    "e-mail address",
    check_email
);

/// Reads a string and checks it while the deserializer is still on the
/// value, so that format errors carry the value's own line and key path (an
/// error raised after `String::deserialize` returns is reported at the
/// enclosing mapping).
pub(crate) struct StrVisitor<T, F> {
    expecting: &'static str,
    parse: F,
    _out: std::marker::PhantomData<T>,
}

impl<T, F: FnOnce(&str) -> Result<T, String>> StrVisitor<T, F> {
    pub(crate) fn new(expecting: &'static str, parse: F) -> Self {
        StrVisitor {
            expecting,
            parse,
            _out: std::marker::PhantomData,
        }
    }
}

impl<T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'_> for StrVisitor<T, F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// `true` when `s` is a valid FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_fhir_id(s: &str) -> Result<(), String> {
    if is_fhir_id(s) {
        Ok(())
    } else {
        Err("use 1 to 64 letters, digits, '-' or '.'".into())
    }
}

fn check_loinc(s: &str) -> Result<(), String> {
    let shape = || "expected digits, a dash and a check digit, like 2345-7".to_string();
    let (body, check) = s.split_once('-').ok_or_else(shape)?;
    if body.is_empty()
        || body.len() > 7
        || check.len() != 1
        || !body
            .bytes()
            .chain(check.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(shape());
    }
    let expected = loinc_check_digit(body);
    if check.as_bytes().first().map(|b| b - b'0') == Some(expected) {
        Ok(())
    } else {
        Err(format!("the check digit should be {expected}"))
    }
}

/// The LOINC mod-10 check digit of the digits before the dash. The rightmost
/// digit and every second one leftwards are doubled (the Luhn scheme, which
/// is what LOINC's "odd positions times two" description computes).
fn loinc_check_digit(body: &str) -> u8 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b.wrapping_sub(b'0'));
            if i % 2 == 0 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                d
            }
        })
        .sum();
    // `sum % 10` is below 10, so the result fits a digit.
    ((10 - sum % 10) % 10) as u8
}

fn check_ucum(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.len() > 64 {
        return Err("longer than 64 characters".into());
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("use printable ASCII without spaces".into());
    }
    Ok(())
}

/// ISO 3166-1 alpha-2, officially assigned codes (249), sorted.
const COUNTRIES: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

fn check_country(s: &str) -> Result<(), String> {
    if s.len() != 2 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("expected two upper-case letters, like US".into());
    }
    if COUNTRIES.binary_search(&s).is_err() {
        return Err("not an assigned code".into());
    }
    Ok(())
}

fn check_e164(s: &str) -> Result<(), String> {
    let digits = s
        .strip_prefix('+')
        .ok_or_else(|| "must start with '+' and the country code".to_string())?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("only digits may follow the '+'".into());
    }
    if !(7..=15).contains(&digits.len()) {
        return Err("expected 7 to 15 digits".into());
    }
    if digits.starts_with('0') {
        return Err("a country code does not start with 0".into());
    }
    Ok(())
}

fn check_email(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(why.to_string());
    if s.len() > 254 {
        return bad("longer than 254 characters");
    }
    let Some((local, domain)) = s.split_once('@') else {
        return bad("no '@'");
    };
    if domain.contains('@') {
        return bad("more than one '@'");
    }
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    if local.is_empty()
        || local.len() > 64
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
        || !local.bytes().all(|b| b == b'.' || atext(b))
    {
        return bad("the part before '@' is malformed");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return bad("the domain is malformed");
    }
    Ok(())
}

/// Parse a calendar date written `YYYY-MM-DD` (the FHIR `date` form with
/// day precision; years 0001 to 9999).
pub fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b.len() != 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = Month::try_from(u8::try_from(digits(5..7)?).ok()?).ok()?;
    let day = u8::try_from(digits(8..10)?).ok()?;
    if year == 0 {
        return None;
    }
    Date::from_calendar_date(year, month, day).ok()
}

/// Write a date as `YYYY-MM-DD`.
pub fn format_date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Serde adapter for dates written `YYYY-MM-DD` (`#[serde(with = ...)]`).
pub(crate) mod iso_date {
    use super::{format_date, parse_date, StrVisitor};
    use serde::{Deserializer, Serializer};
    use time::Date;

    pub(crate) fn serialize<S: Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_date(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        d.deserialize_str(StrVisitor::new("a date written YYYY-MM-DD", |s| {
            parse_date(s).ok_or_else(|| format!("not a date: {s:?}, expected YYYY-MM-DD"))
        }))
    }
}

/// As [`iso_date`], for an optional date (`null` or absent is `None`).
pub(crate) mod iso_date_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Date;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::iso_date::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::iso_date")] Date);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loinc_check_digits_of_the_reference_trial_verify() {
        for code in [
            "8480-6", "8462-4", "8867-4", "2345-7", "4548-4", "29463-7", "55423-8",
        ] {
            assert!(Loinc::new(code).is_ok(), "{code}");
        }
    }

    #[test]
    fn loinc_with_a_wrong_check_digit_or_shape_is_rejected() {
        let e = Loinc::new("2345-8").unwrap_err();
        assert_eq!(e.reason, "the check digit should be 7");
        for bad in [
            "",
            "2345",
            "-7",
            "2345-",
            "2345-77",
            "23a5-7",
            "12345678-0",
            "2345 -7",
        ] {
            assert!(Loinc::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ucum_units_are_printable_ascii_without_spaces() {
        for ok in [
            "mg/dL", "mm[Hg]", "/min", "%", "{steps}", "[lb_av]", "mmol/L",
        ] {
            assert_eq!(Ucum::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "mg dL", "µg", "mg\t"] {
            assert!(Ucum::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fhir_ids_follow_the_fhir_id_syntax() {
        assert!(TrialId::new("CARDIO-01").is_ok());
        assert!(SiteId::new("site-001").is_ok());
        assert!(SubjectId::new("a".repeat(64)).is_ok());
        for bad in ["", "has space", "under_score", "x/y"] {
            assert!(TrialId::new(bad).is_err(), "{bad:?}");
        }
        assert!(SubjectId::new("a".repeat(65)).is_err());
    }

    #[test]
    fn countries_are_assigned_alpha_2_codes() {
        assert!(
            COUNTRIES.windows(2).all(|w| w[0] < w[1]),
            "sorted for binary search"
        );
        for ok in ["US", "DE", "CN", "ZW", "AD"] {
            assert!(Country::new(ok).is_ok(), "{ok}");
        }
        for bad in ["us", "XX", "USA", "", "U1", "UK"] {
            assert!(Country::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phones_are_e164() {
        for ok in ["+16175550101", "+4930555010", "+861055501012", "+6834002"] {
            assert!(E164Phone::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "16175550101",
            "+1 617 555",
            "+0123456789",
            "+123456",
            "+1234567890123456",
            "+",
        ] {
            assert!(E164Phone::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn emails_have_a_plausible_shape() {
        for ok in ["jane.doe@example.org", "a+b@x.co", "x@sub.example.org"] {
            assert!(Email::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "x",
            "@example.org",
            "x@",
            "x@y",
            "x@@y.org",
            "a..b@x.org",
            "a b@x.org",
            "x@-y.org",
            "x@y..org",
        ] {
            assert!(Email::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dates_are_strict_iso() {
        let d = parse_date("2026-02-28").unwrap();
        assert_eq!(format_date(d), "2026-02-28");
        for bad in [
            "2026-02-30",
            "2026-2-28",
            "26-02-28",
            "2026-02-28T00:00",
            "0000-01-01",
            "+026-01-01",
            "2026-13-01",
        ] {
            assert!(parse_date(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn errors_do_not_repeat_the_value() {
        let e = Email::new("secret.person@nowhere").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        let e = E164Phone::new("+1 555 0100").unwrap_err().to_string();
        assert!(!e.contains("555"), "{e}");
    }
}
