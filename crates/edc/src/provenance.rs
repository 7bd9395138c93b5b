//! Where a produced resource came from, and the extensions every produced
//! resource carries.
//!
//! Every resource gets, in `extension`:
//! - [`PROVENANCE_URL`], a complex extension: `format` (valueCode:
//!   `hl7v2`, `wearable-csv`, `diary`), `sender` (valueString: MSH-3|MSH-4
//!   as [`clinflow_hl7v2::Msh::sender`] writes it; HL7 only), `control-id`
//!   (valueString: MSH-10; HL7 only), `sha256` (valueString: hex SHA-256
//!   of the raw input as the caller received it) and `location`
//!   (valueString: where in the input, e.g. `OBX[2]` or `line 4`).
//! - [`PROTOCOL_VERSION_URL`] (valueInteger): the protocol version whose
//!   edit checks accepted it.
//! - [`VISIT_URL`] (valueString): the visit id assigned by window, or
//!   `unscheduled`.
//!
//! and one `identifier` with system [`ITEM_KEY_SYSTEM`] whose value is the
//! item key, `urn:clinflow:ingest:` then the format and: for HL7 `sender`,
//! MSH-10 and the segment (so the same message sent twice, even
//! re-encoded, has the same keys: idempotency by sender + MSH-10); for CSV,
//! diaries and FHIR the input's SHA-256 and the line (the same file content
//! sent twice has the same keys). Each part is written with only
//! `A-Z a-z 0-9 - . _` and `~XX` (the byte's hex) for any other byte, so
//! parts are joined by `:` unambiguously and the key needs no escaping in
//! a URL or a FHIR token search. The key is readable and in input order,
//! not hashed: the keys of one message, one file, and of a sender's
//! successive control ids sort together, so the store's identifier index
//! takes them as near-appends instead of one random B-tree page each (a
//! hashed key cost the SQLite writer a page split and a WAL frame per
//! resource). Meta is left alone: the store owns `meta`.

use clinflow_fhir::Json;
use sha2::{Digest, Sha256};

use crate::json::{arr, int, obj, s, ss};

/// Extension: the provenance of an ingested resource (see the module docs).
pub const PROVENANCE_URL: &str = "https://clinflow.dev/fhir/StructureDefinition/ingest-provenance";
/// Extension: the protocol version (`valueInteger`); the same URL as on the
/// trial's `ResearchStudy`.
pub const PROTOCOL_VERSION_URL: &str = clinflow_protocol::fhir::PROTOCOL_VERSION_URL;
/// Extension: the visit the value is assigned to (`valueString`), or
/// [`UNSCHEDULED`].
pub const VISIT_URL: &str = "https://clinflow.dev/fhir/StructureDefinition/visit";
/// The visit of a value no window holds.
pub const UNSCHEDULED: &str = "unscheduled";
/// Extension on `Observation`: the value converted to the measurement's
/// canonical unit (`valueQuantity`), present only when the value was sent
/// in another unit; `valueQuantity` keeps the value as sent.
pub const CANONICAL_QUANTITY_URL: &str =
    "https://clinflow.dev/fhir/StructureDefinition/canonical-quantity";
/// `Identifier.system` of the item key (`urn:clinflow:ingest:...`).
pub const ITEM_KEY_SYSTEM: &str = "https://clinflow.dev/fhir/ingest-key";
/// `Identifier.system` of wearable devices (`Observation.device.identifier`).
pub const DEVICE_SYSTEM: &str = "https://clinflow.dev/fhir/device";

/// The input format, as recorded in the provenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// HL7 v2 ER7.
    Hl7v2,
    /// Wearable long-format CSV.
    WearableCsv,
    /// ePRO diary JSON.
    Diary,
    /// FHIR resources (a Bundle or NDJSON).
    Fhir,
}

impl InputFormat {
    /// The code recorded in the provenance extension.
    pub fn code(self) -> &'static str {
        match self {
            InputFormat::Hl7v2 => "hl7v2",
            InputFormat::WearableCsv => "wearable-csv",
            InputFormat::Diary => "diary",
            InputFormat::Fhir => "fhir",
        }
    }
}

/// Where an input came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The format.
    pub format: InputFormat,
    /// HL7: `MSH-3|MSH-4`.
    pub sender: Option<String>,
    /// HL7: MSH-10.
    pub control_id: Option<String>,
    /// Hex SHA-256 of the raw input.
    pub sha256: String,
}

impl Provenance {
    /// Provenance of an input without HL7 header.
    pub fn of_input(format: InputFormat, raw: &[u8]) -> Provenance {
        Provenance {
            format,
            sender: None,
            control_id: None,
            sha256: sha256_hex(raw),
        }
    }

    /// The item key of the resource at `location` (see the module docs).
    pub fn key(&self, location: &str) -> String {
        let mut key = String::with_capacity(96);
        key.push_str("urn:clinflow:ingest:");
        key.push_str(self.format.code());
        let parts: [&str; 2] = match (&self.sender, &self.control_id) {
            (Some(sender), Some(id)) => [sender, id],
            _ => [&self.sha256, ""],
        };
        for part in parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .chain([location])
        {
            key.push(':');
            push_key_part(&mut key, part);
        }
        key
    }

    /// The extensions of a produced resource (provenance, protocol version,
    /// visit), in that order.
    pub(crate) fn extensions(
        &self,
        location: &str,
        protocol_version: u32,
        visit: &str,
    ) -> Vec<Json> {
        let sub = |url: &str, kind: &str, v: &str| obj([("url", ss(url)), (kind, ss(v))]);
        let mut parts = vec![sub("format", "valueCode", self.format.code())];
        if let Some(sender) = &self.sender {
            parts.push(sub("sender", "valueString", sender));
        }
        if let Some(id) = &self.control_id {
            parts.push(sub("control-id", "valueString", id));
        }
        parts.push(sub("sha256", "valueString", &self.sha256));
        parts.push(sub("location", "valueString", location));
        vec![
            obj([("url", ss(PROVENANCE_URL)), ("extension", arr(parts))]),
            obj([
                ("url", ss(PROTOCOL_VERSION_URL)),
                ("valueInteger", Some(int(i64::from(protocol_version)))),
            ]),
            obj([("url", ss(VISIT_URL)), ("valueString", ss(visit))]),
        ]
    }

    /// The `identifier` entry carrying the key.
    pub(crate) fn identifier(key: &str) -> Json {
        obj([("system", ss(ITEM_KEY_SYSTEM)), ("value", Some(s(key)))])
    }
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `part` with every byte but `A-Z a-z 0-9 - . _` as `~XX`.
fn push_key_part(key: &mut String, part: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            key.push(char::from(b));
        } else {
            key.push('~');
            key.push(char::from(HEX[usize::from(b >> 4)]));
            key.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_readable_and_in_input_order() {
        let p = Provenance {
            format: InputFormat::Hl7v2,
            sender: Some("LIS|LAB".into()),
            control_id: Some("C-1".into()),
            sha256: sha256_hex(b"x"),
        };
        let k = p.key("OBX[1]");
        assert_eq!(k, "urn:clinflow:ingest:hl7v2:LIS~7CLAB:C-1:OBX~5B1~5D");
        assert_eq!(k, p.key("OBX[1]"));
        assert_ne!(k, p.key("OBX[2]"));
        // Another encoding of the same message (other sha) keeps the keys.
        let q = Provenance {
            sha256: sha256_hex(b"y"),
            ..p.clone()
        };
        assert_eq!(q.key("OBX[1]"), k);
        // A sender's successive control ids sort together, in order.
        let next = Provenance {
            control_id: Some("C-2".into()),
            ..p.clone()
        };
        assert!(p.key("PID[1]") < next.key("OBX[1]"));
        // Without an HL7 header: the input's hash and the line.
        let csv = Provenance::of_input(InputFormat::WearableCsv, b"x");
        assert_eq!(
            csv.key("line 4"),
            format!(
                "urn:clinflow:ingest:wearable-csv:{}:line~204",
                sha256_hex(b"x")
            )
        );
    }

    #[test]
    fn key_parts_cannot_run_into_each_other() {
        // `:` inside a part is escaped, so two splits of the same text differ.
        let a = Provenance {
            format: InputFormat::Hl7v2,
            sender: Some("A:B".into()),
            control_id: Some("C".into()),
            sha256: String::new(),
        };
        let b = Provenance {
            sender: Some("A".into()),
            control_id: Some("B:C".into()),
            ..a.clone()
        };
        assert_ne!(a.key("OBX[1]"), b.key("OBX[1]"));
        for k in [a.key("OBX[1]"), b.key("x y,z$|\\é")] {
            assert!(
                k.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._~:".contains(&c)),
                "{k}"
            );
        }
    }
}
