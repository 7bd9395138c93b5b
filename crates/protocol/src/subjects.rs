//! The subjects file: one enrolled subject a line, checked against the
//! protocol.
//!
//! Columns, found by header name in any order:
//! `subject,site,enrolled,arm,birth_date,sex,family,given,email,phone`.
//! The header is required, every column must be present and no other may
//! be. Fields are trimmed; `email` and `phone` may be empty. Errors name the
//! line and column but never repeat a personal value (names, dates of
//! birth, contact details, subject ids), since errors reach logs.

use crate::model::Protocol;
use crate::types::{format_date, iso_date, parse_date, E164Phone, Email, SiteId, SubjectId};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use time::Date;

/// An enrolled subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subject {
    /// Subject id; also the FHIR `Patient` and `ResearchSubject` id.
    pub id: SubjectId,
    /// The site that enrolled the subject; one of the protocol's sites.
    pub site: SiteId,
    /// Enrolment date (study day 0), inside the trial period.
    #[serde(with = "iso_date")]
    pub enrolled: Date,
    /// Assigned arm; one of the protocol's arms.
    pub arm: String,
    /// Date of birth, not after enrolment.
    #[serde(with = "iso_date")]
    pub birth_date: Date,
    /// Administrative sex (FHIR `AdministrativeGender`).
    pub sex: Sex,
    /// Family name.
    pub family: String,
    /// Given name.
    pub given: String,
    /// E-mail address, if given.
    pub email: Option<Email>,
    /// Phone number, if given.
    pub phone: Option<E164Phone>,
}

/// Administrative sex, as FHIR `AdministrativeGender` codes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sex {
    /// `male`
    Male,
    /// `female`
    Female,
    /// `other`
    Other,
    /// `unknown`
    Unknown,
}

impl Sex {
    /// The `AdministrativeGender` code.
    pub fn code(self) -> &'static str {
        match self {
            Sex::Male => "male",
            Sex::Female => "female",
            Sex::Other => "other",
            Sex::Unknown => "unknown",
        }
    }

    /// Read a code (`male`, `female`, `other`, `unknown`; exact case).
    pub fn from_code(code: &str) -> Option<Sex> {
        match code {
            "male" => Some(Sex::Male),
            "female" => Some(Sex::Female),
            "other" => Some(Sex::Other),
            "unknown" => Some(Sex::Unknown),
            _ => None,
        }
    }
}

/// Why a subjects file was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {message}", column_part(.column))]
pub struct SubjectsError {
    /// 1-based line of the record (the header is line 1).
    pub line: usize,
    /// The column's header name, when the problem is in one field.
    pub column: Option<String>,
    /// What is wrong.
    pub message: String,
}

fn column_part(column: &Option<String>) -> String {
    column
        .as_ref()
        .map_or(String::new(), |c| format!(", column {c}"))
}

/// The columns, in the reference file's order.
pub const COLUMNS: [&str; 10] = [
    "subject",
    "site",
    "enrolled",
    "arm",
    "birth_date",
    "sex",
    "family",
    "given",
    "email",
    "phone",
];

#[derive(Clone, Copy)]
enum Col {
    Subject,
    Site,
    Enrolled,
    Arm,
    BirthDate,
    Sex,
    Family,
    Given,
    Email,
    Phone,
}

impl Col {
    fn name(self) -> &'static str {
        COLUMNS[self as usize]
    }
}

/// Read a subjects file and check every subject against `protocol`:
/// known site and arm, valid dates with enrolment inside the trial period
/// and birth not after enrolment, sex code, e-mail shape, E.164 phone, and
/// no subject twice. Stops at the first problem.
pub fn parse_subjects_csv(text: &str, protocol: &Protocol) -> Result<Vec<Subject>, SubjectsError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(csv_error)?.clone();
    let header_err = |column: Option<&str>, message: String| SubjectsError {
        line: 1,
        column: column.map(str::to_string),
        message,
    };
    if headers.iter().all(str::is_empty) {
        return Err(header_err(
            None,
            format!("the header line is missing; expected {}", COLUMNS.join(",")),
        ));
    }
    let mut index: [Option<usize>; 10] = [None; 10];
    for (i, h) in headers.iter().enumerate() {
        let Some(c) = COLUMNS.iter().position(|c| *c == h) else {
            return Err(header_err(
                Some(h),
                format!("unknown column; the columns are {}", COLUMNS.join(",")),
            ));
        };
        if index[c].replace(i).is_some() {
            return Err(header_err(Some(h), "the column appears twice".into()));
        }
    }
    if let Some(c) = index.iter().position(Option::is_none) {
        return Err(header_err(
            Some(COLUMNS[c]),
            "the column is missing".to_string(),
        ));
    }

    let mut subjects = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record
            .position()
            .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
        let row = Row {
            record: &record,
            index: &index,
            line,
        };
        let subject = row.subject(protocol)?;
        if let Some(first) = first_line.insert(subject.id.as_str().to_string(), line) {
            return Err(row.err(
                Col::Subject,
                format!("the subject already appears on line {first}"),
            ));
        }
        subjects.push(subject);
    }
    Ok(subjects)
}

fn csv_error(e: csv::Error) -> SubjectsError {
    let line = e
        .position()
        .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the line has {len} fields, the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "the line is not valid UTF-8".to_string(),
        _ => format!("not valid CSV: {e}"),
    };
    SubjectsError {
        line,
        column: None,
        message,
    }
}

struct Row<'a> {
    record: &'a csv::StringRecord,
    index: &'a [Option<usize>; 10],
    line: usize,
}

impl Row<'_> {
    fn get(&self, c: Col) -> &str {
        self.index[c as usize]
            .and_then(|i| self.record.get(i))
            .unwrap_or("")
    }

    fn err(&self, c: Col, message: impl Into<String>) -> SubjectsError {
        SubjectsError {
            line: self.line,
            column: Some(c.name().to_string()),
            message: message.into(),
        }
    }

    fn required(&self, c: Col) -> Result<&str, SubjectsError> {
        match self.get(c) {
            "" => Err(self.err(c, "a value is required")),
            v => Ok(v),
        }
    }

    fn date(&self, c: Col) -> Result<Date, SubjectsError> {
        parse_date(self.required(c)?).ok_or_else(|| self.err(c, "not a date; expected YYYY-MM-DD"))
    }

    fn subject(&self, protocol: &Protocol) -> Result<Subject, SubjectsError> {
        let id = SubjectId::new(self.required(Col::Subject)?)
            .map_err(|e| self.err(Col::Subject, e.to_string()))?;

        let site_text = self.required(Col::Site)?;
        let site = protocol
            .site(site_text)
            .map(|s| s.id.clone())
            .ok_or_else(|| {
                self.err(
                    Col::Site,
                    format!(
                        "unknown site `{site_text}`; the protocol's sites are {}",
                        list(protocol.sites.iter().map(|s| s.id.as_str()))
                    ),
                )
            })?;

        let enrolled = self.date(Col::Enrolled)?;
        if !protocol.period.contains(enrolled) {
            return Err(self.err(
                Col::Enrolled,
                format!(
                    "enrolment is outside the trial period {} to {}",
                    format_date(protocol.period.start),
                    format_date(protocol.period.end)
                ),
            ));
        }

        let arm = self.required(Col::Arm)?;
        if !protocol.has_arm(arm) {
            return Err(self.err(
                Col::Arm,
                format!(
                    "unknown arm `{arm}`; the protocol's arms are {}",
                    list(protocol.arms.iter().map(String::as_str))
                ),
            ));
        }

        let birth_date = self.date(Col::BirthDate)?;
        if birth_date > enrolled {
            return Err(self.err(Col::BirthDate, "the birth date is after enrolment"));
        }

        let sex_text = self.required(Col::Sex)?;
        let sex = Sex::from_code(sex_text)
            .ok_or_else(|| self.err(Col::Sex, "expected male, female, other or unknown"))?;

        let family = self.required(Col::Family)?.to_string();
        let given = self.required(Col::Given)?.to_string();

        let email = match self.get(Col::Email) {
            "" => None,
            v => Some(Email::new(v).map_err(|e| self.err(Col::Email, e.to_string()))?),
        };
        let phone = match self.get(Col::Phone) {
            "" => None,
            v => Some(E164Phone::new(v).map_err(|e| self.err(Col::Phone, e.to_string()))?),
        };

        Ok(Subject {
            id,
            site,
            enrolled,
            arm: arm.to_string(),
            birth_date,
            sex,
            family,
            given,
            email,
            phone,
        })
    }
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Sex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_yaml;
    use proptest::prelude::*;
    use time::macros::date;

    const PROTOCOL: &str = include_str!("../../../reference-trial/protocol.yaml");
    const SUBJECTS: &str = include_str!("../../../reference-trial/subjects.csv");

    fn protocol() -> Protocol {
        parse_yaml(PROTOCOL).unwrap()
    }

    fn header() -> &'static str {
        SUBJECTS.lines().next().unwrap()
    }

    /// The reference file's first data row with `column` set to `value`.
    fn row_with(column: &str, value: &str) -> String {
        let i = header().split(',').position(|h| h == column).unwrap();
        let mut fields: Vec<&str> = SUBJECTS.lines().nth(1).unwrap().split(',').collect();
        fields[i] = value;
        fields.join(",")
    }

    fn one_bad_row(column: &str, value: &str) -> SubjectsError {
        let text = format!("{}\n{}\n", header(), row_with(column, value));
        parse_subjects_csv(&text, &protocol()).unwrap_err()
    }

    #[test]
    fn the_reference_subjects_load() {
        let subjects = parse_subjects_csv(SUBJECTS, &protocol()).unwrap();
        let rows: Vec<Vec<&str>> = SUBJECTS
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(subjects.len(), rows.len());
        for (s, r) in subjects.iter().zip(&rows) {
            assert_eq!(s.id.as_str(), r[0]);
            assert_eq!(s.site.as_str(), r[1]);
            assert_eq!(format_date(s.enrolled), r[2]);
            assert_eq!(s.arm, r[3]);
            assert_eq!(format_date(s.birth_date), r[4]);
            assert_eq!(s.sex.code(), r[5]);
            assert_eq!((s.family.as_str(), s.given.as_str()), (r[6], r[7]));
            assert_eq!(s.email.as_ref().map(Email::as_str), Some(r[8]));
            assert_eq!(s.phone.as_ref().map(E164Phone::as_str), Some(r[9]));
        }
        assert_eq!(subjects[0].enrolled, date!(2026 - 02 - 02));
    }

    #[test]
    fn columns_are_found_by_name() {
        let mut cols: Vec<&str> = header().split(',').collect();
        cols.reverse();
        let mut text = cols.join(",") + "\n";
        for line in SUBJECTS.lines().skip(1) {
            let mut f: Vec<&str> = line.split(',').collect();
            f.reverse();
            text += &(f.join(",") + "\n");
        }
        assert_eq!(
            parse_subjects_csv(&text, &protocol()).unwrap(),
            parse_subjects_csv(SUBJECTS, &protocol()).unwrap()
        );
    }

    #[test]
    fn bad_fields_name_line_and_column() {
        let cases = [
            ("site", "site-009", "unknown site `site-009`"),
            ("arm", "drug-y", "unknown arm `drug-y`"),
            ("enrolled", "2026-02-30", "not a date"),
            ("enrolled", "2025-12-31", "outside the trial period"),
            ("enrolled", "2028-01-01", "outside the trial period"),
            ("birth_date", "12/04/1961", "not a date"),
            ("birth_date", "2026-03-01", "after enrolment"),
            ("sex", "F", "expected male, female, other or unknown"),
            ("phone", "6175550101", "E.164"),
            ("phone", "+1 617 555 0101", "E.164"),
            ("email", "jane.doe.example.org", "e-mail"),
            ("subject", "has space", "subject id"),
            ("family", "", "required"),
        ];
        for (column, value, expect) in cases {
            let e = one_bad_row(column, value);
            assert_eq!(e.line, 2, "{column}={value}: {e}");
            assert_eq!(e.column.as_deref(), Some(column), "{column}={value}: {e}");
            assert!(e.message.contains(expect), "{column}={value}: {e}");
        }
    }

    #[test]
    fn contact_details_may_be_empty() {
        let text = format!("{}\n{}\n", header(), row_with("email", ""));
        let s = parse_subjects_csv(&text, &protocol()).unwrap();
        assert_eq!(s[0].email, None);
    }

    #[test]
    fn errors_do_not_repeat_personal_values() {
        let e = one_bad_row("email", "jane.doe.example.org").to_string();
        assert!(!e.contains("jane"), "{e}");
        let e = one_bad_row("birth_date", "2026-03-01").to_string();
        assert!(!e.contains("2026-03-01"), "{e}");
    }

    #[test]
    fn a_duplicate_subject_names_both_lines() {
        let mut lines: Vec<&str> = SUBJECTS.lines().collect();
        let dup = lines[1];
        lines.push(dup);
        let text = lines.join("\n");
        let e = parse_subjects_csv(&text, &protocol()).unwrap_err();
        assert_eq!(e.line, lines.len());
        assert_eq!(e.column.as_deref(), Some("subject"));
        assert!(e.message.contains("line 2"), "{e}");
    }

    #[test]
    fn header_problems() {
        let p = protocol();
        let e = parse_subjects_csv("", &p).unwrap_err();
        assert_eq!((e.line, e.column.clone()), (1, None), "{e}");
        let without_phone = header().replace(",phone", "");
        let e = parse_subjects_csv(&without_phone, &p).unwrap_err();
        assert_eq!(e.column.as_deref(), Some("phone"), "{e}");
        let extra = format!("{},nickname", header());
        let e = parse_subjects_csv(&extra, &p).unwrap_err();
        assert_eq!(e.column.as_deref(), Some("nickname"), "{e}");
        let twice = format!("{},sex", header());
        let e = parse_subjects_csv(&twice, &p).unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
        assert_eq!(parse_subjects_csv(header(), &p).unwrap(), vec![]);
    }

    #[test]
    fn a_short_line_is_reported_with_its_line() {
        let text = format!(
            "{}\n{}\nCARDIO-01-0009,site-001\n",
            header(),
            row_with("sex", "male")
        );
        let e = parse_subjects_csv(&text, &protocol()).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("2 fields"), "{e}");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in "\\PC*") {
            let _ = parse_subjects_csv(&text, &protocol());
        }

        #[test]
        fn never_panics_on_damaged_subjects(cut in 0usize..700, insert in "[,\"\n\r +@a-z0-9-]{0,4}") {
            let mut text = SUBJECTS.to_string();
            let mut at = cut.min(text.len());
            while !text.is_char_boundary(at) { at -= 1; }
            text.insert_str(at, &insert);
            let _ = parse_subjects_csv(&text, &protocol());
        }
    }
}
