//! FHIR date, dateTime and instant values as ranges of instants.
//!
//! A partial date covers a range: `2026` is all of 2026, `2026-03` all of
//! March. Values without a zone are read as UTC (documented choice: the
//! protocol's site time zone is not known here). Ranges are inclusive, in
//! milliseconds since the Unix epoch.
//!
//! Plain integer arithmetic on the proleptic Gregorian calendar (Howard
//! Hinnant's `days_from_civil`), not a date library: the parser is on the
//! hot path of index extraction, must be total on any input, and only needs
//! what FHIR's lexical forms allow (years 0001 to 9999).

/// An inclusive range of instants, milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub low: i64,
    pub high: i64,
}

const MS_PER_SECOND: i64 = 1_000;
const MS_PER_MINUTE: i64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: i64 = 60 * MS_PER_MINUTE;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// `0001-01-01T00:00:00.000Z`, the earliest instant FHIR can write.
const MIN_INSTANT: i64 = -62_135_596_800_000;
/// `9999-12-31T23:59:59.999Z`, the latest instant FHIR can write.
const MAX_INSTANT: i64 = 253_402_300_799_999;

/// Parses a FHIR `date`, `dateTime` or `instant` (`YYYY`, `YYYY-MM`,
/// `YYYY-MM-DD`, `YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm)`, and for search also
/// `YYYY-MM-DDThh:mm` ) into the range it covers. `Err` names what is wrong.
///
/// The range's width is the value's precision: a day covers its 24 hours, a
/// second `.000` to `.999`, `10:00:00.5` covers `.500` to `.599`. A leap
/// second (`:60`, which FHIR's `time` allows) is read as the last
/// millisecond of its minute.
pub fn parse_range(text: &str) -> Result<Range, String> {
    let mut p = Cursor {
        b: text.as_bytes(),
        pos: 0,
    };
    let year = p.digits(4, "a four-digit year")?;
    if year == 0 {
        return Err("year 0000 does not exist; years start at 0001".into());
    }
    if p.done() {
        let low = civil_to_millis(year, 1, 1);
        return Ok(Range {
            low,
            high: civil_to_millis(year + 1, 1, 1) - 1,
        });
    }
    p.eat(b'-', "'-' after the year")?;
    let month = p.digits(2, "a two-digit month")?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month:02} is not between 01 and 12"));
    }
    if p.done() {
        let (ny, nm) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Ok(Range {
            low: civil_to_millis(year, month, 1),
            high: civil_to_millis(ny, nm, 1) - 1,
        });
    }
    p.eat(b'-', "'-' after the month")?;
    let day = p.digits(2, "a two-digit day")?;
    let dim = days_in_month(year, month);
    if day < 1 || day > dim {
        return Err(format!(
            "day {day:02} does not exist in {year:04}-{month:02} (it has {dim} days)"
        ));
    }
    let midnight = civil_to_millis(year, month, day);
    if p.done() {
        return Ok(Range {
            low: midnight,
            high: midnight + MS_PER_DAY - 1,
        });
    }
    p.eat(b'T', "'T' between the date and the time")?;
    let hour = p.digits(2, "a two-digit hour")?;
    if hour > 23 {
        return Err(format!("hour {hour:02} is not between 00 and 23"));
    }
    p.eat(b':', "':' after the hour")?;
    let minute = p.digits(2, "two-digit minutes")?;
    if minute > 59 {
        return Err(format!("minute {minute:02} is not between 00 and 59"));
    }
    let mut low = midnight + hour * MS_PER_HOUR + minute * MS_PER_MINUTE;
    let mut width = MS_PER_MINUTE;
    if p.peek() == Some(b':') {
        p.pos += 1;
        let second = p.digits(2, "two-digit seconds")?;
        if second > 60 {
            return Err(format!("second {second:02} is not between 00 and 60"));
        }
        if second == 60 {
            // A leap second: the instant just before the next minute.
            low += 59 * MS_PER_SECOND + 999;
            width = 1;
            if p.peek() == Some(b'.') {
                p.pos += 1;
                p.fraction()?;
            }
        } else {
            low += second * MS_PER_SECOND;
            width = MS_PER_SECOND;
            if p.peek() == Some(b'.') {
                p.pos += 1;
                let (ms, w) = p.fraction()?;
                low += ms;
                width = w;
            }
        }
    }
    let offset = match p.peek() {
        None => 0,
        Some(b'Z') => {
            p.pos += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            p.pos += 1;
            let oh = p.digits(2, "a two-digit zone hour")?;
            p.eat(b':', "':' in the zone offset")?;
            let om = p.digits(2, "two-digit zone minutes")?;
            if oh > 14 || om > 59 || (oh == 14 && om > 0) {
                return Err(format!("zone offset {oh:02}:{om:02} is out of range"));
            }
            let o = oh * MS_PER_HOUR + om * MS_PER_MINUTE;
            if sign == b'-' {
                -o
            } else {
                o
            }
        }
        Some(_) => {
            return Err(format!(
            "unexpected {:?} at position {}; expected seconds, a fraction or a zone (Z or +hh:mm)",
            p.rest(),
            p.pos + 1
        ))
        }
    };
    if !p.done() {
        return Err(format!(
            "unexpected {:?} after the zone at position {}",
            p.rest(),
            p.pos + 1
        ));
    }
    // The local time minus its offset is UTC.
    let low = low - offset;
    Ok(Range {
        low,
        high: low + width - 1,
    })
}

/// Formats milliseconds since the epoch as a FHIR instant, UTC, with milliseconds
/// (`2026-11-28T04:08:40.123Z`).
///
/// Instants outside what FHIR can write (years 0001 to 9999) are clamped to
/// its first or last millisecond, so the result is always a valid `instant`.
pub fn format_instant(millis: i64) -> String {
    let millis = millis.clamp(MIN_INSTANT, MAX_INSTANT);
    let days = millis.div_euclid(MS_PER_DAY);
    let in_day = millis.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    // Fixed width (the clamp keeps the year in 1..=9999), written digit by
    // digit: every stored version and every Bundle entry's lastModified
    // goes through here, and `format!` was a visible share of a write.
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, in_day / MS_PER_HOUR);
    put(14, 2, in_day % MS_PER_HOUR / MS_PER_MINUTE);
    put(17, 2, in_day % MS_PER_MINUTE / MS_PER_SECOND);
    put(20, 3, in_day % MS_PER_SECOND);
    out.iter().map(|&b| b as char).collect()
}

/// Whether `year` is a Gregorian leap year.
pub fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in `month` (1-12) of `year`; 0 for a month out of range.
pub fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Midnight UTC of a civil date, in milliseconds since the epoch.
fn civil_to_millis(y: i64, m: i64, d: i64) -> i64 {
    days_from_civil(y, m, d) * MS_PER_DAY
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A byte cursor over the value being parsed.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// The unparsed rest, for messages (lossy: the input may be cut inside
    /// a multi-byte character).
    fn rest(&self) -> String {
        String::from_utf8_lossy(self.b.get(self.pos..).unwrap_or_default()).into_owned()
    }

    fn eat(&mut self, want: u8, what: &str) -> Result<(), String> {
        match self.peek() {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            None => Err(format!("ends early; expected {what}")),
            Some(_) => Err(format!(
                "expected {what} at position {}, found {:?}",
                self.pos + 1,
                self.rest()
            )),
        }
    }

    /// Exactly `n` ASCII digits as a number (`n` is at most 4 here).
    fn digits(&mut self, n: usize, what: &str) -> Result<i64, String> {
        let mut v = 0i64;
        for i in 0..n {
            match self.b.get(self.pos + i) {
                Some(c @ b'0'..=b'9') => v = v * 10 + i64::from(c - b'0'),
                None => return Err(format!("ends early; expected {what}")),
                Some(_) => {
                    return Err(format!(
                        "expected {what} at position {}, found {:?}",
                        self.pos + 1,
                        self.rest()
                    ))
                }
            }
        }
        self.pos += n;
        Ok(v)
    }

    /// A fraction of a second after the `.`: its start in milliseconds and
    /// the width its precision implies (`.5` is 100 ms wide, `.50` 10 ms,
    /// `.500` and finer 1 ms: the range is kept to whole milliseconds).
    fn fraction(&mut self) -> Result<(i64, i64), String> {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        let digits = &self.b[start..self.pos];
        if digits.is_empty() {
            return Err("expected digits after the decimal point of the seconds".into());
        }
        let mut ms = 0i64;
        for i in 0..3 {
            ms = ms * 10 + digits.get(i).map_or(0, |c| i64::from(c - b'0'));
        }
        let width = match digits.len() {
            1 => 100,
            2 => 10,
            _ => 1,
        };
        Ok((ms, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> (String, String) {
        let r = parse_range(s).unwrap();
        (format_instant(r.low), format_instant(r.high))
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn partial_dates_cover_their_whole_span() {
        assert_eq!(
            r("2026"),
            pair("2026-01-01T00:00:00.000Z", "2026-12-31T23:59:59.999Z")
        );
        assert_eq!(
            r("2026-03"),
            pair("2026-03-01T00:00:00.000Z", "2026-03-31T23:59:59.999Z")
        );
        assert_eq!(
            r("2026-12"),
            pair("2026-12-01T00:00:00.000Z", "2026-12-31T23:59:59.999Z")
        );
        assert_eq!(
            r("2026-03-02"),
            pair("2026-03-02T00:00:00.000Z", "2026-03-02T23:59:59.999Z")
        );
        assert_eq!(
            r("2026-03-02T14:30"),
            pair("2026-03-02T14:30:00.000Z", "2026-03-02T14:30:59.999Z")
        );
        assert_eq!(
            r("2026-03-02T14:30:05Z"),
            pair("2026-03-02T14:30:05.000Z", "2026-03-02T14:30:05.999Z")
        );
    }

    #[test]
    fn fractions_set_the_precision() {
        assert_eq!(
            r("2026-03-02T14:30:05.5Z"),
            pair("2026-03-02T14:30:05.500Z", "2026-03-02T14:30:05.599Z")
        );
        assert_eq!(
            r("2026-03-02T14:30:05.12Z"),
            pair("2026-03-02T14:30:05.120Z", "2026-03-02T14:30:05.129Z")
        );
        assert_eq!(
            r("2026-03-02T14:30:05.123Z"),
            pair("2026-03-02T14:30:05.123Z", "2026-03-02T14:30:05.123Z")
        );
        assert_eq!(
            r("2026-03-02T14:30:05.123456789Z"),
            pair("2026-03-02T14:30:05.123Z", "2026-03-02T14:30:05.123Z")
        );
    }

    #[test]
    fn offsets_move_to_utc_and_no_zone_is_utc() {
        assert_eq!(r("2026-03-02T14:30:00+08:00").0, "2026-03-02T06:30:00.000Z");
        assert_eq!(r("2026-03-02T21:10:00-05:00").0, "2026-03-03T02:10:00.000Z");
        assert_eq!(r("2026-03-02T14:30:00-00:00").0, "2026-03-02T14:30:00.000Z");
        assert_eq!(r("2026-03-02T14:30:00").0, "2026-03-02T14:30:00.000Z");
        assert_eq!(r("2026-01-01T00:30+01:00").0, "2025-12-31T23:30:00.000Z");
        assert!(parse_range("2026-03-02T14:30:00+15:00").is_err());
        assert!(parse_range("2026-03-02T14:30:00+14:30").is_err());
        assert!(parse_range("2026-03-02T14:30:00+0800").is_err());
    }

    #[test]
    fn leap_years_and_month_lengths() {
        assert!(parse_range("2024-02-29").is_ok());
        assert!(parse_range("2000-02-29").is_ok());
        assert!(parse_range("1900-02-29").is_err());
        assert!(parse_range("2026-02-29").is_err());
        assert!(parse_range("2026-04-31").is_err());
        assert!(parse_range("2026-04-30").is_ok());
        assert_eq!(
            r("2024-02"),
            pair("2024-02-01T00:00:00.000Z", "2024-02-29T23:59:59.999Z")
        );
        assert_eq!(r("1900-02").1, "1900-02-28T23:59:59.999Z");
    }

    #[test]
    fn rejects_what_fhir_does_not_allow() {
        for bad in [
            "",
            "26",
            "0000",
            "2026-",
            "2026-1",
            "2026-13",
            "2026-00",
            "2026-01-00",
            "2026-01-32",
            "2026-01-01T",
            "2026-01-01T24:00",
            "2026-01-01T10:60",
            "2026-01-01T10:00:61",
            "2026-01-01T10:00:00.",
            "2026-01-01T10:00:00.Z",
            "2026-01-01 10:00",
            "2026-01-01T10:00:00Zjunk",
            "2026-01-01T10:00:00z",
            "２０２６",
        ] {
            let e = parse_range(bad);
            assert!(e.is_err(), "{bad:?} gave {e:?}");
        }
    }

    #[test]
    fn leap_second_is_the_end_of_its_minute() {
        assert_eq!(
            r("2016-12-31T23:59:60Z"),
            pair("2016-12-31T23:59:59.999Z", "2016-12-31T23:59:59.999Z")
        );
    }

    #[test]
    fn instants_format_with_milliseconds() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_instant(1_795_838_920_123),
            "2026-11-28T04:08:40.123Z"
        );
        assert_eq!(format_instant(i64::MIN), "0001-01-01T00:00:00.000Z");
        assert_eq!(format_instant(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(parse_range("0001").unwrap().low, MIN_INSTANT);
        assert_eq!(parse_range("9999").unwrap().high, MAX_INSTANT);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_range(&s);
        }

        #[test]
        fn never_panics_on_near_misses(s in "[0-9]{1,5}(-[0-9]{1,3}(-[0-9]{1,3}(T[0-9]{1,3}(:[0-9]{1,3}(:[0-9]{1,3}(\\.[0-9]{0,12})?)?)?([Z+-][0-9]{0,3}:?[0-9]{0,3})?)?)?)?") {
            if let Ok(r) = parse_range(&s) {
                prop_assert!(r.low <= r.high);
            }
        }

        #[test]
        fn instants_round_trip(ms in MIN_INSTANT..=MAX_INSTANT) {
            let text = format_instant(ms);
            let r = parse_range(&text).unwrap();
            prop_assert_eq!((r.low, r.high), (ms, ms));
            // Cross-check the calendar arithmetic against the `time` crate.
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            prop_assert_eq!(
                &text[..19],
                format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
            );
        }
    }
}
