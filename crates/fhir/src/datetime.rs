//! FHIR date, dateTime and instant values as ranges of instants.
//!
//! A partial date covers a range: `2026` is all of 2026, `2026-03` all of
//! March. Values without a zone are read as UTC (documented choice: the
//! protocol's site time zone is not known here). Ranges are inclusive, in
//! milliseconds since the Unix epoch.

/// An inclusive range of instants, milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub low: i64,
    pub high: i64,
}

/// Parses a FHIR `date`, `dateTime` or `instant` (`YYYY`, `YYYY-MM`,
/// `YYYY-MM-DD`, `YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm)`, and for search also
/// `YYYY-MM-DDThh:mm` ) into the range it covers. `Err` names what is wrong.
pub fn parse_range(text: &str) -> Result<Range, String> {
    todo!("{text}")
}

/// Formats milliseconds since the epoch as a FHIR instant, UTC, with milliseconds
/// (`2026-11-28T04:08:40.123Z`).
pub fn format_instant(millis: i64) -> String {
    todo!("{millis}")
}
