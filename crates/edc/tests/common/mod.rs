//! Shared fixtures: the reference trial (CARDIO-01) as a context, and
//! JSON helpers for assertions.
#![allow(dead_code)]

use clinflow_edc::{ItemOutcome, TrialContext};
use clinflow_fhir::Json;

pub const PROTOCOL: &str = include_str!("../../../../reference-trial/protocol.yaml");
pub const SUBJECTS: &str = include_str!("../../../../reference-trial/subjects.csv");
pub const LAB: &[u8] = include_bytes!("../../../../reference-trial/samples/lab-results.hl7");
pub const WEARABLE: &[u8] = include_bytes!("../../../../reference-trial/samples/wearable.csv");
pub const DIARY: &[u8] = include_bytes!("../../../../reference-trial/samples/diary.ndjson");

pub fn ctx() -> TrialContext {
    let protocol = clinflow_protocol::parse_yaml(PROTOCOL).expect("the reference protocol loads");
    let subjects =
        clinflow_protocol::parse_subjects_csv(SUBJECTS, &protocol).expect("the subjects load");
    TrialContext::from_subjects(protocol, &subjects)
}

/// The JSON at a path of keys and array indexes (`"0"`).
pub fn at<'a>(j: &'a Json, path: &str) -> &'a Json {
    let mut cur = j;
    for key in path.split('.').filter(|k| !k.is_empty()) {
        cur = match (cur, key.parse::<usize>()) {
            (Json::Array(items), Ok(i)) => items.get(i),
            _ => cur.get(key),
        }
        .unwrap_or_else(|| panic!("no {key} in {path} of {}", j.to_compact()));
    }
    cur
}

pub fn text<'a>(j: &'a Json, path: &str) -> &'a str {
    match at(j, path) {
        Json::String(s) | Json::Number(s) => s,
        other => panic!("{path} is {}", other.kind()),
    }
}

/// The extension with this URL.
pub fn extension<'a>(j: &'a Json, url: &str) -> Option<&'a Json> {
    match j.get("extension")? {
        Json::Array(list) => list
            .iter()
            .find(|e| e.get("url").and_then(Json::as_str) == Some(url)),
        _ => None,
    }
}

/// A sub-extension's string value of the provenance extension.
pub fn provenance<'a>(j: &'a Json, part: &str) -> &'a str {
    let p = extension(j, clinflow_edc::provenance::PROVENANCE_URL).expect("provenance extension");
    match p.get("extension") {
        Some(Json::Array(list)) => list
            .iter()
            .find(|e| e.get("url").and_then(Json::as_str) == Some(part))
            .and_then(|e| e.get("valueString").or_else(|| e.get("valueCode")))
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("no {part}")),
        _ => panic!("provenance has no parts"),
    }
}

pub fn visit(j: &Json) -> &str {
    extension(j, clinflow_edc::provenance::VISIT_URL)
        .and_then(|e| e.get("valueString"))
        .and_then(Json::as_str)
        .expect("visit extension")
}

/// Every stored resource passes validation again from its text, as the
/// store would receive it.
pub fn assert_all_valid(items: &[ItemOutcome]) {
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item.index, i, "items are numbered in order");
        for p in &item.stored {
            let text = p.resource.to_json_string();
            clinflow_fhir::validate::parse_resource(&text, Some(p.resource.resource_type()))
                .unwrap_or_else(|o| panic!("{text}\n{}", o.to_json_string()));
        }
        for r in &item.rejections {
            assert_eq!(r.index, item.index);
        }
    }
}

pub fn of_type<'a>(item: &'a ItemOutcome, rtype: &str) -> Vec<&'a Json> {
    item.stored
        .iter()
        .filter(|p| p.resource.resource_type() == rtype)
        .map(|p| p.resource.json())
        .collect()
}
