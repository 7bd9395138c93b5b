//! A validated resource held as lossless JSON.
//!
//! The JSON tree is what clinflow stores and serves; typed models are only
//! used to check it. Edits here (`id`, `meta`) touch the tree in place, so
//! everything else (decimal text, key order, extensions) survives byte-exact.

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
        let Json::Object(members) = &mut self.json else {
            // Unreachable by the type's invariant; nothing sensible to edit.
            return;
        };
        members.retain(|(k, _)| k != "id");
        let at = members
            .iter()
            .position(|(k, _)| k == "resourceType")
            .map_or(0, |i| i + 1);
        members.insert(at, ("id".to_string(), Json::String(id.to_string())));
    }

    /// Sets `meta.versionId` and `meta.lastUpdated` (an instant, e.g.
    /// `2026-11-28T04:08:40.123Z`), keeping every other `meta` element.
    ///
    /// `meta` is created right after `id` (or `resourceType`) when absent.
    /// Existing `versionId`/`lastUpdated` values are replaced where they are;
    /// missing ones go first in `meta`, in FHIR's element order.
    pub fn set_meta(&mut self, version_id: u64, last_updated: &str) {
        let Json::Object(members) = &mut self.json else {
            return;
        };
        let version = Json::String(version_id.to_string());
        let updated = Json::String(last_updated.to_string());
        match members.iter_mut().find(|(k, _)| k == "meta") {
            Some((_, Json::Object(meta))) => {
                set_member(meta, "versionId", version, 0);
                let after_version = meta
                    .iter()
                    .position(|(k, _)| k == "versionId")
                    .map_or(0, |i| i + 1);
                set_member(meta, "lastUpdated", updated, after_version);
            }
            Some((_, other)) => {
                // Validation rejects a non-object meta; replace it anyway
                // rather than leave the version unrecorded.
                *other = new_meta(version, updated);
            }
            None => {
                let at = members
                    .iter()
                    .position(|(k, _)| k == "id")
                    .or_else(|| members.iter().position(|(k, _)| k == "resourceType"))
                    .map_or(0, |i| i + 1);
                members.insert(at, ("meta".to_string(), new_meta(version, updated)));
            }
        }
    }

    /// Compact JSON, as stored and served.
    pub fn to_json_string(&self) -> String {
        self.json.to_compact()
    }
}

/// Replaces the first member `key` in place, or inserts it at `at`.
fn set_member(members: &mut Vec<(String, Json)>, key: &str, value: Json, at: usize) {
    if let Some((_, v)) = members.iter_mut().find(|(k, _)| k == key) {
        *v = value;
    } else {
        members.insert(at.min(members.len()), (key.to_string(), value));
    }
}

fn new_meta(version: Json, updated: Json) -> Json {
    Json::Object(vec![
        ("versionId".to_string(), version),
        ("lastUpdated".to_string(), updated),
    ])
}
