//! What one item of an input gives: the resources to store, the rejections
//! (reason and location) and the data queries to open.
//!
//! An item is an HL7 message (or a run of bytes that is not one), a CSV
//! row, or a diary. A lab message some of whose OBX are rejected still
//! gives the others (and counts as stored); a diary with any problem gives
//! nothing. The batch counters of issue 3 follow: an item is *stored* when
//! [`ItemOutcome::is_stored`], else *rejected*.

use clinflow_fhir::Resource;
use clinflow_protocol::{Range, SiteId};

/// A resource to store, with its key within the item.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    /// The item key, `urn:clinflow:ingest:...` (see
    /// [`crate::provenance`]): stable across reprocessing. References
    /// between resources of one item use it (`DiagnosticReport.result`), as
    /// in a FHIR transaction Bundle, so the caller can store the item as one
    /// and rewrite them to the assigned ids. The same value is the
    /// resource's `identifier` (system [`crate::provenance::ITEM_KEY_SYSTEM`]),
    /// which is what duplicates are found by.
    pub full_url: String,
    /// The validated resource (no `id`: the store assigns it).
    pub resource: Resource,
}

/// Why an item, or a part of it (one OBX), was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// Bytes that are not an HL7 message (before the first MSH or between messages).
    #[error("not an HL7 v2 message")]
    NotAMessage,
    /// The input (or a line, segment, field of it) cannot be read.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The subject is not enrolled in the trial.
    #[error("subject {0:?} is not enrolled in the trial")]
    UnknownSubject(String),
    /// No subject id where one is needed.
    #[error("no subject id")]
    MissingSubject,
    /// The code or metric is not a measurement of the protocol.
    #[error("{0:?} is not a measurement of the protocol")]
    UnknownMeasurement(String),
    /// The unit is neither the measurement's unit nor one it converts from.
    #[error("unit {unit:?} is not accepted for {measurement} (expected {expected})")]
    WrongUnit {
        /// The unit as sent (empty when none).
        unit: String,
        /// The measurement id.
        measurement: String,
        /// The accepted units, comma separated.
        expected: String,
    },
    /// The value is not a number, or not of a type a measurement takes.
    #[error("value {0:?} is not a number")]
    NotANumber(String),
    /// OBX-2 names a type clinflow does not map, or none.
    #[error("unsupported value type {0:?}")]
    UnsupportedValueType(String),
    /// The value (in the canonical unit) is outside the hard range.
    #[error("{measurement} value {value} {unit} is outside the plausible range [{low}, {high}]")]
    OutsideHardRange {
        /// The measurement id.
        measurement: String,
        /// The value in the canonical unit, as text.
        value: String,
        /// The canonical unit.
        unit: String,
        /// Lower bound.
        low: String,
        /// Upper bound.
        high: String,
    },
    /// No effective time (OBX-14, OBR-7, CSV `time`, diary `authored`).
    #[error("no effective date/time")]
    MissingEffective,
    /// A date/time that cannot be read, or is too imprecise to check.
    #[error("invalid date/time {value:?}: {why}")]
    InvalidDateTime {
        /// As sent.
        value: String,
        /// Why.
        why: String,
    },
    /// The effective date is outside the trial period.
    #[error("date {date} is outside the trial period {start} to {end}")]
    OutsidePeriod {
        /// The date (in the value's own offset).
        date: String,
        /// First day of the trial.
        start: String,
        /// Last day of the trial.
        end: String,
    },
    /// An HL7 result status that maps to no FHIR status.
    #[error("unknown result status {0:?}")]
    UnknownStatus(String),
    /// The diary names no questionnaire of the protocol.
    #[error("{0:?} is not a questionnaire of the protocol")]
    UnknownQuestionnaire(String),
    /// An answer whose linkId is no item of the questionnaire.
    #[error("{0:?} is not an item of the questionnaire")]
    UnknownLinkId(String),
    /// A required answer is absent.
    #[error("required answer {0:?} is missing")]
    MissingAnswer(String),
    /// An answer of the wrong JSON type for its item.
    #[error("answer {link_id:?} must be {expected}")]
    WrongAnswerType {
        /// The item.
        link_id: String,
        /// What the item type needs.
        expected: &'static str,
    },
    /// A numeric answer outside the item's range.
    #[error("answer {link_id:?} = {value} is outside [{low}, {high}]")]
    AnswerOutOfRange {
        /// The item.
        link_id: String,
        /// The answer.
        value: String,
        /// Lower bound.
        low: String,
        /// Upper bound.
        high: String,
    },
    /// A text answer longer than the item's `max_length`.
    #[error("answer {link_id:?} has {length} characters, more than {max}")]
    AnswerTooLong {
        /// The item.
        link_id: String,
        /// Its length in characters.
        length: usize,
        /// The maximum.
        max: u32,
    },
    /// A choice answer that is none of the item's options.
    #[error("answer {link_id:?} is not one of the options")]
    NotAnOption {
        /// The item.
        link_id: String,
    },
    /// The mapped resource failed FHIR validation (the input holds a value
    /// FHIR cannot carry); the diagnostics of the first issue.
    #[error("the resulting {resource_type} is not valid FHIR: {detail}")]
    InvalidResource {
        /// Observation, DiagnosticReport, ...
        resource_type: String,
        /// The validator's first error.
        detail: String,
    },
    /// A reference by identifier names no resource, or several.
    #[error("{0}")]
    UnresolvedReference(String),
    /// The item is about a subject outside the submitter's reach (a site
    /// user's site, a patient's own record); checked by the server, which
    /// knows the submitter.
    #[error("{0}")]
    OutOfScope(String),
}

impl Reason {
    /// A short stable code, for metrics (`rejections by reason`).
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NotAMessage => "not-a-message",
            Reason::Malformed(_) => "malformed",
            Reason::UnknownSubject(_) => "unknown-subject",
            Reason::MissingSubject => "missing-subject",
            Reason::UnknownMeasurement(_) => "unknown-measurement",
            Reason::WrongUnit { .. } => "wrong-unit",
            Reason::NotANumber(_) => "not-a-number",
            Reason::UnsupportedValueType(_) => "unsupported-value-type",
            Reason::OutsideHardRange { .. } => "hard-range",
            Reason::MissingEffective => "missing-effective",
            Reason::InvalidDateTime { .. } => "invalid-datetime",
            Reason::OutsidePeriod { .. } => "outside-period",
            Reason::UnknownStatus(_) => "unknown-status",
            Reason::UnknownQuestionnaire(_) => "unknown-questionnaire",
            Reason::UnknownLinkId(_) => "unknown-link-id",
            Reason::MissingAnswer(_) => "missing-answer",
            Reason::WrongAnswerType { .. } => "wrong-answer-type",
            Reason::AnswerOutOfRange { .. } => "answer-range",
            Reason::AnswerTooLong { .. } => "answer-too-long",
            Reason::NotAnOption { .. } => "not-an-option",
            Reason::InvalidResource { .. } => "invalid-resource",
            Reason::UnresolvedReference(_) => "unresolved-reference",
            Reason::OutOfScope(_) => "out-of-scope",
        }
    }
}

/// One rejected item or part of an item.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The item's index in its input, from 0 (message, CSV data row, diary).
    pub index: usize,
    /// Why.
    pub reason: Reason,
    /// Where: `OBX[2].5` (segment, its occurrence in the message, field),
    /// `PID[1].3`, `line 4` (garbage or a message that does not parse:
    /// line in the whole input), `line 4, column value` (CSV),
    /// `line 3, answers.pain` (diary).
    pub location: String,
}

/// A data query to open: a value stored although outside the soft range.
#[derive(Debug, Clone, PartialEq)]
pub struct DataQuery {
    /// The item's index in its input.
    pub index: usize,
    /// Which of the item's [`ItemOutcome::stored`] resources it is about.
    pub resource: usize,
    /// The subject id.
    pub subject: String,
    /// The subject's site (queries are site scoped).
    pub site: SiteId,
    /// The measurement id.
    pub measurement: String,
    /// The value in the canonical unit, as text.
    pub value: String,
    /// The canonical unit.
    pub unit: String,
    /// The soft range it is outside.
    pub soft: Range,
    /// Where the value is, as in [`Rejection::location`].
    pub location: String,
    /// A sentence for the site: what is unexpected.
    pub text: String,
}

/// What one item gave.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemOutcome {
    /// The item's index in its input, from 0.
    pub index: usize,
    /// Where the item is in the input (`line 7` for a message or a row).
    pub location: String,
    /// Resources to store, in order (an HL7 order's Observations, then its
    /// DiagnosticReport).
    pub stored: Vec<Produced>,
    /// Rejected parts, or the whole item when `stored` is empty.
    pub rejections: Vec<Rejection>,
    /// Queries to open for stored values outside the soft range.
    pub queries: Vec<DataQuery>,
}

impl ItemOutcome {
    pub(crate) fn new(index: usize, location: String) -> ItemOutcome {
        ItemOutcome {
            index,
            location,
            ..ItemOutcome::default()
        }
    }

    pub(crate) fn reject(&mut self, reason: Reason, location: impl Into<String>) {
        self.rejections.push(Rejection {
            index: self.index,
            reason,
            location: location.into(),
        });
    }

    /// `true` when the item stored something (it counts as stored, with any
    /// rejections as warnings); `false` when it is rejected.
    pub fn is_stored(&self) -> bool {
        !self.stored.is_empty()
    }
}
