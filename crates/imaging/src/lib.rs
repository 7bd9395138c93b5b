//! clinflow's DICOM layer: total parsing of Part 10 files and C-STORE datasets into
//! [`Instance`]s with their index fields ([`InstanceMeta`]), DICOM JSON for WADO-RS and
//! QIDO-RS, pixel analysis of a series ([`SeriesAnalyser`]) and the FHIR resources that
//! report it ([`diagnostic_report`], [`imaging_study`]).
//!
//! API boundary: everything here is pure. No I/O, no async, no clock (the caller passes
//! `issued`), no randomness; the same bytes always give the same results, and FHIR ids are
//! derived from DICOM UIDs and [`ANALYSER_VERSION`] so re-running a task overwrites the
//! same resources.
//!
//! Invariant: no input panics or aborts the process. Parsing first walks the element
//! structure itself ([`scan`]) and rejects lengths that overrun the input or nesting that
//! is too deep, before dicom-rs (which trusts declared lengths when it allocates) sees the
//! bytes; pixel decoding checks the declared frame geometry against a size cap and the
//! codestream's own header. Both run under `std::panic::catch_unwind` as a last line of
//! defence, and a panic becomes an error.
//!
//! Code map: [`parse`] (instances and index fields), [`json`] (DICOM JSON, QIDO-RS),
//! [`analysis`] (histogram, window, noise, series geometry, thumbnail), [`fhir`]
//! (DiagnosticReport, Observations, ImagingStudy).

pub mod analysis;
mod base64;
pub mod error;
pub mod fhir;
pub mod json;
pub mod parse;
pub mod scan;
mod thumbnail;
mod values;

pub use analysis::{decoded_bytes_estimate, Histogram, SeriesAnalyser, SeriesAnalysis};
pub use error::{AnalysisError, ParseError};
pub use fhir::{diagnostic_report, imaging_study, imaging_study_id, report_id};
pub use json::{qido_instance, qido_series, qido_study, SeriesSummary, StudySummary};
pub use parse::{parse_dataset, parse_part10, part10_from_dataset, Instance, InstanceMeta};

/// Version of the analysis. It is part of every FHIR identifier and id the analysis
/// writes, so bump it whenever a metric's definition changes: results of the new version
/// are then new resources rather than silent overwrites of the old ones.
pub const ANALYSER_VERSION: &str = "clinflow-imaging/1";
