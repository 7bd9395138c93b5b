//! The EDC ingest core without I/O: parse -> map -> validate.
//!
//! This crate turns inputs the pipeline has already received (an HL7 v2
//! body or MLLP frame, a wearable CSV file, ePRO diaries) into FHIR R4
//! resources and runs the trial protocol's edit checks on them. It reads
//! nothing and writes nothing: the caller supplies a [`TrialContext`] (the
//! protocol and the enrolled subjects) and gets back, per item (a message,
//! a CSV row, a diary), an [`ItemOutcome`]: the resources to store, the
//! rejections with their reasons and locations, and the data queries to
//! open.
//!
//! ```text
//! bytes ──> hl7::ingest_hl7 ───────┐
//! bytes ──> wearable::ingest_csv ──┼─> checks (context) ──> Vec<ItemOutcome>
//! bytes ──> diary::ingest_* ───────┘
//! ```
//!
//! Modules:
//! - [`context`]: [`TrialContext`], the protocol plus the enrolment lookup
//!   (subject -> patient resource id, site, enrolment date).
//! - [`outcome`]: what an item gives: [`ItemOutcome`], [`Produced`],
//!   [`Rejection`], [`Reason`], [`DataQuery`].
//! - [`provenance`]: where a resource came from ([`Provenance`]), the
//!   extension URLs every produced resource carries, and the deterministic
//!   item keys (identifier and fullUrl).
//! - [`checks`]: the protocol's edit checks shared by all formats (unit and
//!   conversion, hard and soft ranges, trial period, visit window).
//! - [`hl7`]: ORU^R01 -> DiagnosticReport + Observations (HL7 V2-to-FHIR IG).
//! - [`wearable`]: `subject,device,time,metric,value,unit` CSV -> Observations.
//! - [`diary`]: JSON / NDJSON diaries -> QuestionnaireResponses.
//! - `json` (private): small builders for fhirkit's lossless JSON and
//!   decimal-text normalisation.
//!
//! Invariants:
//! - **Totality.** No function here panics on any input (property tests in
//!   `tests/properties.rs` over arbitrary bytes for each format).
//! - **Valid output.** Every resource in an [`ItemOutcome`] has passed
//!   [`clinflow_fhir::validate::validate_json`]; a mapping that would give
//!   an invalid resource is a rejection ([`Reason::InvalidResource`]), never
//!   stored.
//! - **Determinism.** The output depends only on the context and the input
//!   bytes, so reprocessing an item (a retry, a restart) gives the same
//!   resources with the same keys.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod checks;
pub mod context;
pub mod diary;
pub mod fhir;
pub mod hl7;
mod json;
pub mod outcome;
pub mod provenance;
pub mod wearable;

pub use context::{Enrolment, TrialContext};
pub use diary::{ingest_diaries_json, ingest_diaries_ndjson, ingest_diary};
pub use fhir::{ingest_fhir_bundle, ingest_fhir_ndjson};
pub use hl7::{ingest_hl7, map_message};
pub use outcome::{DataQuery, ItemOutcome, Produced, Reason, Rejection};
pub use provenance::{InputFormat, Provenance};
pub use wearable::ingest_csv;
