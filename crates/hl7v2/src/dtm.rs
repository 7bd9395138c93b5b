//! HL7 `DTM` date/times: `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`.
//!
//! A [`Dtm`] keeps what was sent: its precision (a year alone stays a year)
//! and its UTC offset (or its absence). [`Dtm::to_fhir_datetime`] gives the
//! FHIR `dateTime` of the same instant and precision, keeping the offset.

use std::fmt;

/// How much of a [`Dtm`] was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    /// `YYYY`.
    Year,
    /// `YYYYMM`.
    Month,
    /// `YYYYMMDD`.
    Day,
    /// `YYYYMMDDHH`.
    Hour,
    /// `YYYYMMDDHHMM`.
    Minute,
    /// `YYYYMMDDHHMMSS`.
    Second,
    /// `YYYYMMDDHHMMSS.S` with this many fraction digits (1 to 4).
    Fraction(u8),
}

/// Why a DTM does not parse (or cannot become a FHIR `dateTime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DtmError {
    /// No characters.
    #[error("empty")]
    Empty,
    /// The date/time part is not 4, 6, 8, 10, 12 or 14 digits.
    #[error("{0} digits before the fraction or offset; 4, 6, 8, 10, 12 or 14 expected")]
    BadLength(usize),
    /// A character that should be a digit.
    #[error("character {position} is not a digit")]
    NotDigit {
        /// From 0.
        position: usize,
    },
    /// A component outside its range (month 13, 30 February, hour 24...).
    #[error("{0} out of range")]
    OutOfRange(&'static str),
    /// A fraction without seconds, or not 1 to 4 digits.
    #[error("a fraction of a second needs seconds and 1 to 4 digits")]
    BadFraction,
    /// The offset is not `+HHMM`/`-HHMM` with HH at most 14 and MM below 60.
    #[error("the UTC offset must be +HHMM or -HHMM (at most 14 hours)")]
    BadOffset,
    /// A time without offset cannot be a FHIR `dateTime` (see
    /// [`Dtm::with_default_offset`]).
    #[error("a time of day without a UTC offset cannot be a FHIR dateTime")]
    MissingOffset,
}

/// A parsed DTM. Absent parts read as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dtm {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    fraction: u16,
    precision: Precision,
    offset: Option<i16>,
}

fn two(b: &[u8], at: usize) -> u8 {
    // Callers pass checked digits; anything else reads as 0, never panics.
    match (b.get(at), b.get(at + 1)) {
        (Some(h @ b'0'..=b'9'), Some(l @ b'0'..=b'9')) => (h - b'0') * 10 + (l - b'0'),
        _ => 0,
    }
}

fn is_leap(year: u16) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses an HL7 DTM (see the module docs). No spaces are allowed; the
/// caller passes component 1 of a TS/DTM field.
pub fn parse_dtm(s: &str) -> Result<Dtm, DtmError> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err(DtmError::Empty);
    }
    let (main, offset_text) = match b.iter().position(|c| *c == b'+' || *c == b'-') {
        Some(p) => (b.get(..p).unwrap_or_default(), b.get(p..)),
        None => (b, None),
    };
    let (digits, frac) = match main.iter().position(|c| *c == b'.') {
        Some(p) => (main.get(..p).unwrap_or_default(), main.get(p + 1..)),
        None => (main, None),
    };
    if let Some(p) = digits.iter().position(|c| !c.is_ascii_digit()) {
        return Err(DtmError::NotDigit { position: p });
    }
    let precision = match digits.len() {
        4 => Precision::Year,
        6 => Precision::Month,
        8 => Precision::Day,
        10 => Precision::Hour,
        12 => Precision::Minute,
        14 => Precision::Second,
        n => return Err(DtmError::BadLength(n)),
    };
    let year = u16::from(two(digits, 0)) * 100 + u16::from(two(digits, 2));
    let part = |at: usize, default: u8| {
        if digits.len() > at {
            two(digits, at)
        } else {
            default
        }
    };
    let (month, day, hour, minute, second) =
        (part(4, 1), part(6, 1), part(8, 0), part(10, 0), part(12, 0));
    if year == 0 {
        return Err(DtmError::OutOfRange("year"));
    }
    if !(1..=12).contains(&month) {
        return Err(DtmError::OutOfRange("month"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(DtmError::OutOfRange("day"));
    }
    if hour > 23 {
        return Err(DtmError::OutOfRange("hour"));
    }
    if minute > 59 {
        return Err(DtmError::OutOfRange("minute"));
    }
    if second > 59 {
        return Err(DtmError::OutOfRange("second"));
    }
    let (precision, fraction) = match frac {
        None => (precision, 0),
        Some(f) => {
            let n = f.len();
            if precision != Precision::Second
                || !(1..=4).contains(&n)
                || !f.iter().all(u8::is_ascii_digit)
            {
                return Err(DtmError::BadFraction);
            }
            let v = f.iter().fold(0u16, |v, c| v * 10 + u16::from(c - b'0'));
            (Precision::Fraction(n as u8), v)
        }
    };
    let offset = match offset_text {
        None => None,
        Some([sign @ (b'+' | b'-'), z @ ..])
            if z.len() == 4 && z.iter().all(u8::is_ascii_digit) =>
        {
            let (hh, mm) = (two(z, 0), two(z, 2));
            if hh > 14 || mm > 59 || (hh == 14 && mm > 0) {
                return Err(DtmError::BadOffset);
            }
            let minutes = i16::from(hh) * 60 + i16::from(mm);
            Some(if *sign == b'-' { -minutes } else { minutes })
        }
        Some(_) => return Err(DtmError::BadOffset),
    };
    Ok(Dtm {
        year,
        month,
        day,
        hour,
        minute,
        second,
        fraction,
        precision,
        offset,
    })
}

impl Dtm {
    /// The instant `unix_seconds` seen at UTC offset `offset_minutes`, to
    /// the second (for ACK timestamps). `None` outside years 1 to 9999 or
    /// for an offset beyond ±14 hours.
    pub fn from_unix(unix_seconds: i64, offset_minutes: i16) -> Option<Dtm> {
        if offset_minutes.unsigned_abs() > 14 * 60 {
            return None;
        }
        let local = unix_seconds.checked_add(i64::from(offset_minutes) * 60)?;
        let days = local.div_euclid(86_400);
        let secs = local.rem_euclid(86_400);
        // Civil from days (H. Hinnant's algorithm).
        let z = days.checked_add(719_468)?;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        if !(1..=9999).contains(&year) {
            return None;
        }
        Some(Dtm {
            year: u16::try_from(year).ok()?,
            month: u8::try_from(month).ok()?,
            day: u8::try_from(day).ok()?,
            hour: u8::try_from(secs / 3600).ok()?,
            minute: u8::try_from(secs % 3600 / 60).ok()?,
            second: u8::try_from(secs % 60).ok()?,
            fraction: 0,
            precision: Precision::Second,
            offset: Some(offset_minutes),
        })
    }

    /// The precision as sent.
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// The year.
    pub fn year(&self) -> u16 {
        self.year
    }
    /// The month (1 to 12), when given.
    pub fn month(&self) -> Option<u8> {
        (self.precision >= Precision::Month).then_some(self.month)
    }
    /// The day of the month, when given.
    pub fn day(&self) -> Option<u8> {
        (self.precision >= Precision::Day).then_some(self.day)
    }
    /// The hour, when given.
    pub fn hour(&self) -> Option<u8> {
        (self.precision >= Precision::Hour).then_some(self.hour)
    }
    /// The minute, when given.
    pub fn minute(&self) -> Option<u8> {
        (self.precision >= Precision::Minute).then_some(self.minute)
    }
    /// The second, when given.
    pub fn second(&self) -> Option<u8> {
        (self.precision >= Precision::Second).then_some(self.second)
    }
    /// The fraction of a second as (digits' value, number of digits): `.25`
    /// is `(25, 2)`.
    pub fn fraction(&self) -> Option<(u16, u8)> {
        match self.precision {
            Precision::Fraction(n) => Some((self.fraction, n)),
            _ => None,
        }
    }
    /// The UTC offset in minutes, when given (`-0500` is -300; `-0000` is
    /// read as 0, the same as `+0000`).
    pub fn offset_minutes(&self) -> Option<i16> {
        self.offset
    }
    /// Whether the value has a time of day.
    pub fn has_time(&self) -> bool {
        self.precision >= Precision::Hour
    }

    /// This value with `minutes` as its offset if it has none (HL7 says a
    /// time without offset is in the sender's zone: pass MSH-7's offset).
    pub fn with_default_offset(self, minutes: i16) -> Dtm {
        Dtm {
            offset: self.offset.or(Some(minutes)),
            ..self
        }
    }

    /// The FHIR `dateTime`: `2026`, `2026-03`, `2026-03-02` for dates (an
    /// offset on a date is dropped: FHIR dates have none), else
    /// `2026-03-02T08:15:00-05:00` with the offset kept. FHIR needs seconds
    /// once there is a time, so hour and minute precision get `:00`; the
    /// fraction is kept as sent. A time without offset is
    /// [`DtmError::MissingOffset`].
    pub fn to_fhir_datetime(&self) -> Result<String, DtmError> {
        let date = match self.precision {
            Precision::Year => return Ok(format!("{:04}", self.year)),
            Precision::Month => return Ok(format!("{:04}-{:02}", self.year, self.month)),
            _ => format!("{:04}-{:02}-{:02}", self.year, self.month, self.day),
        };
        if !self.has_time() {
            return Ok(date);
        }
        let offset = self.offset.ok_or(DtmError::MissingOffset)?;
        let mut s = format!(
            "{date}T{:02}:{:02}:{:02}",
            self.hour, self.minute, self.second
        );
        if let Precision::Fraction(n) = self.precision {
            s.push_str(&format!(
                ".{:0width$}",
                self.fraction,
                width = usize::from(n)
            ));
        }
        let sign = if offset < 0 { '-' } else { '+' };
        let abs = offset.unsigned_abs();
        s.push_str(&format!("{sign}{:02}:{:02}", abs / 60, abs % 60));
        Ok(s)
    }
}

impl fmt::Display for Dtm {
    /// The HL7 form, at the precision it was given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.year)?;
        let parts = [
            (Precision::Month, self.month),
            (Precision::Day, self.day),
            (Precision::Hour, self.hour),
            (Precision::Minute, self.minute),
            (Precision::Second, self.second),
        ];
        for (p, v) in parts {
            if self.precision >= p {
                write!(f, "{v:02}")?;
            }
        }
        if let Precision::Fraction(n) = self.precision {
            write!(f, ".{:0width$}", self.fraction, width = usize::from(n))?;
        }
        if let Some(o) = self.offset {
            let sign = if o < 0 { '-' } else { '+' };
            let abs = o.unsigned_abs();
            write!(f, "{sign}{:02}{:02}", abs / 60, abs % 60)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn precisions_and_offsets() {
        let d = parse_dtm("20260302081500-0500").unwrap();
        assert_eq!(d.precision(), Precision::Second);
        assert_eq!(d.offset_minutes(), Some(-300));
        assert_eq!(d.to_fhir_datetime().unwrap(), "2026-03-02T08:15:00-05:00");
        assert_eq!(d.to_string(), "20260302081500-0500");

        let d = parse_dtm("20260302").unwrap();
        assert_eq!(d.precision(), Precision::Day);
        assert_eq!(d.hour(), None);
        assert_eq!(d.to_fhir_datetime().unwrap(), "2026-03-02");
        assert_eq!(
            parse_dtm("20260302+0100")
                .unwrap()
                .to_fhir_datetime()
                .unwrap(),
            "2026-03-02"
        );
        assert_eq!(
            parse_dtm("2026").unwrap().to_fhir_datetime().unwrap(),
            "2026"
        );
        assert_eq!(
            parse_dtm("202603").unwrap().to_fhir_datetime().unwrap(),
            "2026-03"
        );

        let d = parse_dtm("202603020815+0100").unwrap();
        assert_eq!(d.precision(), Precision::Minute);
        assert_eq!(d.to_fhir_datetime().unwrap(), "2026-03-02T08:15:00+01:00");
        assert_eq!(d.to_string(), "202603020815+0100");

        let d = parse_dtm("20260302081500.0420+0000").unwrap();
        assert_eq!(d.precision(), Precision::Fraction(4));
        assert_eq!(d.fraction(), Some((420, 4)));
        assert_eq!(
            d.to_fhir_datetime().unwrap(),
            "2026-03-02T08:15:00.0420+00:00"
        );
        assert_eq!(d.to_string(), "20260302081500.0420+0000");

        let d = parse_dtm("2026030208").unwrap();
        assert_eq!(d.to_fhir_datetime(), Err(DtmError::MissingOffset));
        assert_eq!(
            d.with_default_offset(60).to_fhir_datetime().unwrap(),
            "2026-03-02T08:00:00+01:00"
        );
        assert_eq!(
            parse_dtm("20260302071500+0100")
                .unwrap()
                .with_default_offset(-300)
                .offset_minutes(),
            Some(60)
        );
    }

    #[test]
    fn invalid() {
        assert_eq!(parse_dtm(""), Err(DtmError::Empty));
        assert_eq!(parse_dtm("202"), Err(DtmError::BadLength(3)));
        assert_eq!(parse_dtm("2026030"), Err(DtmError::BadLength(7)));
        assert_eq!(parse_dtm("2026a3"), Err(DtmError::NotDigit { position: 4 }));
        assert_eq!(parse_dtm("20261301"), Err(DtmError::OutOfRange("month")));
        assert_eq!(parse_dtm("20250229"), Err(DtmError::OutOfRange("day")));
        assert!(parse_dtm("20240229").is_ok());
        assert_eq!(parse_dtm("21000229"), Err(DtmError::OutOfRange("day")));
        assert!(parse_dtm("20000229").is_ok());
        assert_eq!(parse_dtm("2026030224"), Err(DtmError::OutOfRange("hour")));
        assert_eq!(
            parse_dtm("20260302236000"),
            Err(DtmError::OutOfRange("minute"))
        );
        assert_eq!(
            parse_dtm("20260302235960"),
            Err(DtmError::OutOfRange("second"))
        );
        assert_eq!(parse_dtm("202603022359.5"), Err(DtmError::BadFraction));
        assert_eq!(
            parse_dtm("20260302235959.12345"),
            Err(DtmError::BadFraction)
        );
        assert_eq!(parse_dtm("20260302235959."), Err(DtmError::BadFraction));
        assert_eq!(parse_dtm("20260302+01"), Err(DtmError::BadOffset));
        assert_eq!(parse_dtm("20260302+1500"), Err(DtmError::BadOffset));
        assert_eq!(parse_dtm("20260302+0160"), Err(DtmError::BadOffset));
        assert_eq!(parse_dtm("20260302+0100+0100"), Err(DtmError::BadOffset));
        assert_eq!(parse_dtm("0000"), Err(DtmError::OutOfRange("year")));
        assert!(parse_dtm(" 20260302").is_err());
        assert!(parse_dtm("２０２６").is_err());
    }

    #[test]
    fn from_unix() {
        let d = Dtm::from_unix(0, 0).unwrap();
        assert_eq!(d.to_string(), "19700101000000+0000");
        // 2026-03-02T14:15:00Z seen at -05:00.
        let d = Dtm::from_unix(1_772_460_900, -300).unwrap();
        assert_eq!(d.to_fhir_datetime().unwrap(), "2026-03-02T09:15:00-05:00");
        assert!(Dtm::from_unix(i64::MAX, 0).is_none());
        assert!(Dtm::from_unix(0, 15 * 60).is_none());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,30}") {
            let _ = parse_dtm(&s);
        }

        #[test]
        fn display_round_trips(s in "[12][0-9]{3}(0[1-9](0[1-9]([01][0-9]([0-5][0-9]([0-5][0-9](\\.[0-9]{1,4})?)?)?)?)?)?([+-](0[0-9]|1[0-3])[0-5][0-9])?") {
            // `-0000` and `+0000` are the same offset; Display writes `+0000`.
            let d = parse_dtm(&s).unwrap();
            prop_assert_eq!(d.to_string(), s.replace("-0000", "+0000"));
        }

        #[test]
        fn from_unix_is_consistent(secs in 0i64..253_402_300_799, off in -840i16..=840) {
            let d = Dtm::from_unix(secs, off).unwrap();
            let again = parse_dtm(&d.to_string()).unwrap();
            prop_assert_eq!(again, d);
        }
    }
}
