//! Structural validation of incoming resources against R4.
//!
//! `fhirkit` checks elements, cardinality, choice types, primitive formats,
//! `_field` extensions and unknown elements while decoding; on top of it this
//! module checks the codes of required bindings clinflow relies on
//! (`Observation.status`, `AdverseEvent.actuality`, ...).

use crate::outcome::OperationOutcome;
use crate::resource::Resource;

/// Parses and validates one resource from JSON text.
///
/// `expected_type`, when given, is the type named by the URL (`POST /fhir/Observation`);
/// a different `resourceType` is an error. Malformed JSON gives an outcome with
/// code `structure` and the line/column; invalid content gives one issue per problem
/// with its element path. Never panics.
pub fn parse_resource(text: &str, expected_type: Option<&str>) -> Result<Resource, OperationOutcome> {
    todo!("{text} {expected_type:?}")
}

/// Validates JSON that is already parsed (a `Bundle.entry.resource`), as [`parse_resource`].
/// `path` prefixes element paths in issues (e.g. `Bundle.entry[3].resource`).
pub fn validate_json(json: fhirkit::Json, expected_type: Option<&str>, path: &str) -> Result<Resource, OperationOutcome> {
    todo!("{json:?} {expected_type:?} {path}")
}

/// Whether `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    todo!("{name}")
}

/// Whether `id` is a valid FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_valid_id(id: &str) -> bool {
    todo!("{id}")
}
