//! Conformance corpus: every official R4 example (npm package
//! `hl7.fhir.r4.examples` 4.0.1, CC0) of an indexed type is stored with
//! `PUT /fhir/{type}/{id}` (ids kept) and read back JSON-equal apart from
//! `meta`.
//!
//! Equality is `fhirkit::Json::same_as` (via `clinflow_fhir::Json`): object
//! key order is ignored and numbers compare by their text, so `7.40` and
//! `7.4` differ, as they do in FHIR. (serde_json here has no
//! `arbitrary_precision`, so it would compare decimals as f64 and could not
//! see a lost trailing zero.)
//!
//! The corpus is not in the repository. Install it with
//! `npm install --prefix target/r4-examples hl7.fhir.r4.examples@4.0.1`
//! (from the workspace root), or point `CLINFLOW_R4_EXAMPLES` at a folder
//! holding its JSON files. Without it the test fails, saying so.

use std::path::PathBuf;

use clinflow_fhir::Json;

use crate::helpers::{workspace_root, TestApp, FHIR_JSON};

engine_tests!(official_r4_examples_round_trip);

/// The resource types clinflow indexes (the list).
const INDEXED: &[&str] = &[
    "Patient",
    "Practitioner",
    "Organization",
    "Location",
    "ResearchStudy",
    "ResearchSubject",
    "Questionnaire",
    "QuestionnaireResponse",
    "Observation",
    "AdverseEvent",
    "Appointment",
    "Encounter",
    "Condition",
    "DiagnosticReport",
    "ImagingStudy",
];

/// Examples of the indexed types that are themselves invalid R4, with why,
/// and a part of the diagnostic the server must give: these must be refused
/// with 422, not skipped. (fhirkit's README counts 15 invalid examples in the
/// package; this is the only one of an indexed type.)
const KNOWN_INVALID: &[(&str, &str, &str)] = &[(
    "Questionnaire-qs1.json",
    "items without the required linkId (Questionnaire.item.linkId is 1..1)",
    "linkId",
)];

const INSTALL: &str = "the R4 examples are missing: run `npm install --prefix target/r4-examples \
     hl7.fhir.r4.examples@4.0.1` in the workspace root, or set CLINFLOW_R4_EXAMPLES to the \
     folder holding the package's JSON files";

fn examples_dir() -> PathBuf {
    let dir = std::env::var_os("CLINFLOW_R4_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/r4-examples/node_modules/hl7.fhir.r4.examples")
        });
    // npm unpacks the files at the top; the registry tarball has them
    // under `package/`.
    let nested = dir.join("package");
    let dir = if nested.is_dir() { nested } else { dir };
    assert!(
        dir.join("Patient-example.json").is_file(),
        "{INSTALL} (looked in {})",
        dir.display()
    );
    dir
}

/// The object without its `meta` member.
fn without_meta(j: &Json) -> Json {
    match j {
        Json::Object(m) => Json::Object(m.iter().filter(|(k, _)| k != "meta").cloned().collect()),
        other => other.clone(),
    }
}

async fn official_r4_examples_round_trip(app: TestApp) {
    let dir = examples_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the examples folder is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut stored = 0;
    let mut refused_as_known = Vec::new();
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(path).expect("readable");
        let Ok(original) = Json::parse(&text) else {
            continue; // package.json and the like: not resources
        };
        let Some(rtype) = original.get("resourceType").and_then(Json::as_str) else {
            continue;
        };
        if !INDEXED.contains(&rtype) {
            continue;
        }
        let id = original
            .get("id")
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("{name} has no id"));
        let url = format!("/fhir/{rtype}/{id}");
        let r = app
            .send(
                app.request(reqwest::Method::PUT, &url, &app.admin)
                    .header("content-type", FHIR_JSON)
                    .body(text.clone()),
            )
            .await;
        if let Some((_, why, diagnostic)) = KNOWN_INVALID.iter().find(|(f, _, _)| *f == name) {
            if r.status == 422 && r.text.contains(diagnostic) {
                refused_as_known.push(name.clone());
            } else {
                failures.push(format!(
                    "{name} is invalid ({why}) but got {}: {:.300}",
                    r.status, r.text
                ));
            }
            continue;
        }
        if r.status != 201 && r.status != 200 {
            failures.push(format!(
                "{name}: PUT {url} gave {}: {:.500}",
                r.status, r.text
            ));
            continue;
        }
        let back = app.get(&url, &app.admin).await;
        if back.status != 200 {
            failures.push(format!("{name}: GET {url} gave {}", back.status));
            continue;
        }
        let back = Json::parse(&back.text).expect("the server answers JSON");
        if !without_meta(&back).same_as(&without_meta(&original)) {
            failures.push(format!(
                "{name}: read back differently:\n{}",
                back.to_compact()
            ));
            continue;
        }
        stored += 1;
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        refused_as_known.len(),
        KNOWN_INVALID.len(),
        "every known-invalid example was found and refused"
    );
    assert!(stored > 0, "{INSTALL}");
    // Every type of the list is covered by the corpus.
    for t in INDEXED {
        let n = app.count(&app.admin, t).await;
        assert!(n > 0, "no {t} example stored");
    }
}
