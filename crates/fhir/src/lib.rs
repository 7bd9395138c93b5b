//! FHIR R4 without I/O.
//!
//! This crate owns everything clinflow knows about FHIR that does not touch a
//! socket or a database:
//!
//! - [`resource`]: a parsed, structurally validated resource ([`Resource`]),
//!   kept as lossless JSON so that it is served back exactly as stored
//!   (decimal precision, key order, primitive extensions).
//! - [`validate`]: structural validation against R4 (via `fhirkit`) plus the
//!   required value-set bindings clinflow enforces; problems come back as an
//!   [`OperationOutcome`] with one issue per problem and its element path.
//! - [`index`]: the search parameters clinflow supports and the index entries
//!   a resource yields for them, plus its patient compartment.
//! - [`search`]: parsing of a search request's query string into a typed
//!   [`search::SearchQuery`]; the store turns that into SQL.
//! - [`datetime`]: FHIR `date`/`dateTime`/`instant` values as the range of
//!   instants they cover.
//! - [`outcome`]: `OperationOutcome` building.
//! - `shapes` (private): acceptance of the common Observation shapes without
//!   `fhirkit`'s decoder; it never rejects, so every error is `fhirkit`'s.
//! - `bindings` (private): the one table of required code bindings and
//!   calendar-checked date elements that validation adds to `fhirkit`'s checks.
//!
//! Invariant: nothing here panics on any input; every function that reads
//! client input is total and returns a precise error instead.

mod bindings;
pub mod datetime;
pub mod index;
pub mod outcome;
pub mod resource;
pub mod search;
mod shapes;
pub mod validate;

pub use fhirkit::Json;
pub use index::{IndexEntry, IndexValue};
pub use outcome::{IssueCode, IssueSeverity, OperationOutcome, OutcomeIssue};
pub use resource::Resource;
