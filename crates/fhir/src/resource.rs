//! A validated resource held as lossless JSON.

use fhirkit::Json;

/// A FHIR resource that passed structural validation.
///
/// Invariant: `json` is a JSON object whose `resourceType` equals
/// `resource_type`, and it passed [`crate::validate::parse_resource`].
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    resource_type: String,
    json: Json,
}

impl Resource {
    /// Wraps JSON that the validator has accepted. Only `validate` calls this.
    pub(crate) fn from_validated(resource_type: String, json: Json) -> Resource {
        Resource {
            resource_type,
            json,
        }
    }

    /// The `resourceType`.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// The logical id, if the resource carries one.
    pub fn id(&self) -> Option<&str> {
        self.json.get("id").and_then(Json::as_str)
    }

    /// The JSON, read-only.
    pub fn json(&self) -> &Json {
        &self.json
    }

    /// The JSON, for edits that keep it valid (reference rewriting in
    /// transactions). Callers must not remove required elements.
    pub fn json_mut(&mut self) -> &mut Json {
        &mut self.json
    }

    /// Sets `id`, placed right after `resourceType` as FHIR JSON custom has it.
    pub fn set_id(&mut self, id: &str) {
        todo!("{id}")
    }

    /// Sets `meta.versionId` and `meta.lastUpdated` (an instant, e.g.
    /// `2026-11-28T04:08:40.123Z`), keeping every other `meta` element.
    pub fn set_meta(&mut self, version_id: u64, last_updated: &str) {
        todo!("{version_id} {last_updated}")
    }

    /// Compact JSON, as stored and served.
    pub fn to_json_string(&self) -> String {
        self.json.to_compact()
    }
}
