//! The trial protocol and the subjects file, parsed into typed values, and
//! the FHIR resources a trial becomes. No I/O: text in, values out, so all
//! of it is easy to test and fuzz.
//!
//! Code map:
//! - [`types`]: checked identifiers, codes and contact details (`TrialId`,
//!   `SiteId`, `SubjectId`, `Loinc`, `Ucum`, `Country`, `E164Phone`, `Email`).
//! - [`model`]: the protocol model, one type per key of the format, and the
//!   lookups edit checks need (measurement by id or LOINC, unit conversion,
//!   visit windows).
//! - [`parse`]: [`parse_yaml`] and [`parse_json`], and the format's rules.
//!   Errors carry line, column and key path.
//! - `locate` (private): maps key paths to lines and back.
//! - [`subjects`]: [`parse_subjects_csv`], checked against a protocol.
//! - [`fhir`]: [`trial_resources`], the R4 resources of a trial, with
//!   deterministic ids.
//!
//! API boundary: callers get [`ProtocolError`] or [`SubjectsError`], each
//! saying where (line, key path or column) and what is wrong. Subject
//! errors never quote personal data.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod fhir;
mod locate;
pub mod model;
pub mod parse;
pub mod subjects;
pub mod types;

pub use fhir::{resource_key, trial_resources};
pub use model::{
    AdverseEventRules, Conversion, EnrolmentPlan, Item, ItemType, Measurement, Period, Phase,
    Protocol, Questionnaire, Range, Site, Visit, Window,
};
pub use parse::{parse_json, parse_yaml, ProtocolError, ProtocolErrorKind};
pub use subjects::{parse_subjects_csv, Sex, Subject, SubjectsError};
pub use types::{Country, E164Phone, Email, InvalidValue, Loinc, SiteId, SubjectId, TrialId, Ucum};
