//! Structural validation of incoming resources against R4.
//!
//! `fhirkit` checks elements, cardinality, choice types, primitive formats,
//! `_field` extensions and unknown elements while decoding; on top of it this
//! module checks the codes of required bindings clinflow relies on
//! (`Observation.status`, `AdverseEvent.actuality`, ...), see `bindings`.
//!
//! API boundary: this is where client JSON becomes a [`Resource`]. Everything
//! behind it (index extraction, the store) may assume the checks below held.

use crate::bindings;
use crate::outcome::{IssueCode, IssueSeverity, OperationOutcome, OutcomeIssue};
use crate::resource::Resource;
use crate::shapes;
use fhirkit::Json;

/// Parses and validates one resource from JSON text.
///
/// `expected_type`, when given, is the type named by the URL (`POST /fhir/Observation`);
/// a different `resourceType` is an error. Malformed JSON gives an outcome with
/// code `structure` and the line/column; invalid content gives one issue per problem
/// with its element path. Never panics.
pub fn parse_resource(
    text: &str,
    expected_type: Option<&str>,
) -> Result<Resource, OperationOutcome> {
    let json = Json::parse(text).map_err(|e| {
        OperationOutcome::error(
            IssueCode::Structure,
            format!(
                "the body is not valid JSON: line {}, column {}: {}",
                e.line, e.column, e.message
            ),
        )
    })?;
    validate_json(json, expected_type, "")
}

/// Validates JSON that is already parsed (a `Bundle.entry.resource`), as [`parse_resource`].
/// `path` prefixes element paths in issues (e.g. `Bundle.entry[3].resource`).
pub fn validate_json(
    json: fhirkit::Json,
    expected_type: Option<&str>,
    path: &str,
) -> Result<Resource, OperationOutcome> {
    let here = |suffix: &str| -> String {
        match (path.is_empty(), suffix.is_empty()) {
            (true, _) => suffix.to_string(),
            (false, true) => path.to_string(),
            (false, false) => format!("{path}.{suffix}"),
        }
    };
    let err = |code: IssueCode, msg: String, at: String| {
        let issue = OutcomeIssue::error(code, msg);
        OperationOutcome::issue(if at.is_empty() { issue } else { issue.at(at) })
    };
    if !matches!(json, Json::Object(_)) {
        return Err(err(
            IssueCode::Structure,
            format!("a resource must be a JSON object, found {}", json.kind()),
            here(""),
        ));
    }
    let rtype = match json.get("resourceType") {
        Some(Json::String(s)) => s.clone(),
        None => {
            return Err(err(
                IssueCode::Structure,
                "the resource has no resourceType".into(),
                here("resourceType"),
            ))
        }
        Some(other) => {
            return Err(err(
                IssueCode::Structure,
                format!("resourceType must be a string, found {}", other.kind()),
                here("resourceType"),
            ))
        }
    };
    if !is_resource_type(&rtype) {
        return Err(err(
            IssueCode::Invalid,
            format!("{rtype:?} is not an R4 resource type"),
            here("resourceType"),
        ));
    }
    if let Some(expected) = expected_type {
        if expected != rtype {
            return Err(err(
                IssueCode::Invalid,
                format!("the resource is a {rtype} but a {expected} was expected here"),
                here("resourceType"),
            ));
        }
    }

    // fhirkit's decoder tries each of value[x]'s ~50 types by name for every
    // extension (a formatted key per type): most of an ingested resource's
    // validation time went there (its provenance, protocol-version and visit
    // extensions). Extensions of the simple shapes that `simple_extensions`
    // checks itself exactly are taken out while fhirkit decodes the rest.
    let mut json = json;
    let taken = take_simple_extensions(&rtype, &mut json);
    // The common Observation and DiagnosticReport shapes are checked without
    // fhirkit's decoder (`shapes`: it only ever answers "fhirkit accepts this").
    let (decoded, found) = if shapes::Shape::of(&rtype).is_some_and(|t| shapes::accepts(t, &json)) {
        (Some(()), Vec::new())
    } else {
        let (decoded, found) = fhirkit::decode_json::<fhirkit::r4::Resource>(&json);
        (decoded.map(|_| ()), found)
    };
    if let (Json::Object(members), Some((at, ext))) = (&mut json, taken) {
        members.insert(at, ("extension".to_string(), ext));
    }
    let mut outcome = OperationOutcome::default();
    let mut error_paths: Vec<String> = Vec::new();
    for issue in found {
        let severity = match issue.severity {
            fhirkit::Severity::Error => IssueSeverity::Error,
            fhirkit::Severity::Warning => IssueSeverity::Warning,
        };
        if severity == IssueSeverity::Error {
            error_paths.push(issue.path.clone());
        }
        outcome.push(
            OutcomeIssue::new(
                severity,
                code_for(&issue.message),
                diagnostics_for(&issue.path, &issue.message),
            )
            .at(reroot(&issue.path, &rtype, path)),
        );
    }
    if decoded.is_none() && !outcome.has_errors() {
        // fhirkit reports why whenever it gives up; this is belt and braces.
        outcome.push(
            OutcomeIssue::error(IssueCode::Structure, "the resource could not be read")
                .at(reroot(&rtype, &rtype, path)),
        );
    }

    // Checks fhirkit does not make. A problem fhirkit already reported at
    // the same element is not reported twice.
    let mut extra = |at: String, code: IssueCode, message: String| {
        if !error_paths.contains(&at) {
            outcome.push(OutcomeIssue::error(code, message).at(reroot(&at, &rtype, path)));
        }
    };
    if let Some(Json::String(id)) = json.get("id") {
        if !is_valid_id(id) {
            extra(
                format!("{rtype}.id"),
                IssueCode::Value,
                format!("{id:?} is not a valid id (1 to 64 of A-Z, a-z, 0-9, '-', '.')"),
            );
        }
    }
    for v in bindings::check(&rtype, &json) {
        extra(v.path, v.code, v.message);
    }

    if outcome.has_errors() {
        Err(outcome)
    } else {
        // Warnings do not reject; the caller has nowhere to put them on success.
        Ok(Resource::from_validated(rtype, json))
    }
}

/// Takes a DomainResource's own `extension` out of `json`, with its
/// position, when every extension in it is of a shape [`simple_extensions`]
/// checks exactly as fhirkit would; `None` (nothing taken) otherwise, and
/// for the resources that are not DomainResources (`Bundle`, `Binary`,
/// `Parameters`: fhirkit must see an `extension` there, to reject it).
fn take_simple_extensions(rtype: &str, json: &mut Json) -> Option<(usize, Json)> {
    if matches!(rtype, "Bundle" | "Binary" | "Parameters") {
        return None;
    }
    let Json::Object(members) = json else {
        return None;
    };
    let at = members.iter().position(|(k, _)| k == "extension")?;
    // A second `extension` key is fhirkit's to report (a repeated key):
    // taking one out would hide it.
    if members.iter().filter(|(k, _)| k == "extension").count() > 1
        || !simple_extensions(&members[at].1, 0)
    {
        return None;
    }
    Some((at, members.remove(at).1))
}

/// Whether `v` is a non-empty array of extensions each of which is either
/// `{"url", one of valueString|valueCode|valueUri|valueInteger|valueBoolean|
/// valueQuantity}` (a Quantity of [`crate::shapes`]' table)
/// or `{"url", "extension": [...]}` of the same shapes (one level deep),
/// every value valid by fhirkit's own primitive rules: what fhirkit accepts
/// for such an Extension. Anything else (an `id`, `_value` siblings, other
/// value types, both a value and extensions, none) is left to fhirkit.
fn simple_extensions(v: &Json, depth: u8) -> bool {
    use fhirkit::primitive::{is_integer, Kind};
    let Json::Array(items) = v else { return false };
    !items.is_empty()
        && items.iter().all(|e| {
            let Json::Object(m) = e else { return false };
            let [(k1, v1), (k2, v2)] = m.as_slice() else {
                return false;
            };
            let ((_, url), (key, value)) = match (k1.as_str(), k2.as_str()) {
                ("url", _) => ((k1, v1), (k2, v2)),
                (_, "url") => ((k2, v2), (k1, v1)),
                _ => return false,
            };
            let Json::String(url) = url else { return false };
            if Kind::Uri.check(url).is_err() {
                return false;
            }
            match (key.as_str(), value) {
                ("extension", nested) => depth == 0 && simple_extensions(nested, depth + 1),
                ("valueString", Json::String(s)) => Kind::String.check(s).is_ok(),
                ("valueCode", Json::String(s)) => Kind::Code.check(s).is_ok(),
                ("valueUri", Json::String(s)) => Kind::Uri.check(s).is_ok(),
                ("valueInteger", Json::Number(n)) => is_integer(n) && n.parse::<i32>().is_ok(),
                ("valueBoolean", Json::Bool(_)) => true,
                ("valueQuantity", q) => crate::shapes::accepts_quantity(q),
                _ => false,
            }
        })
}

/// Whether `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    // fhirkit's list is sorted (a test holds it to that); extraction calls
    // this for every reference, so it is a binary search.
    fhirkit::r4::RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// Whether `id` is a valid FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The issue code for one of fhirkit's messages.
///
/// fhirkit has no machine-readable kinds, so this keys on its wording
/// (`decode.rs`, `primitive.rs` of fhirkit 0.1): shape and type problems are
/// `structure`, missing elements `required`, and the rest (lexical rules of
/// primitives, integer ranges) `value`. A test pins each message.
fn code_for(message: &str) -> IssueCode {
    if message == "required element missing" || message.starts_with("needs at least") {
        IssueCode::Required
    } else if message == "unknown element"
        || message.starts_with("expected ")
        || message.starts_with("only one type may be given")
        || message.starts_with("null ")
        || message.starts_with("an empty array")
        || message.starts_with("has ")
        || message.starts_with("a resource needs")
        || message.contains("appears more than once")
        || message.contains("resource type")
    {
        IssueCode::Structure
    } else {
        IssueCode::Value
    }
}

/// A self-contained message: the two bare ones get the element's name.
fn diagnostics_for(path: &str, message: &str) -> String {
    let name = path.rsplit('.').next().unwrap_or(path);
    match message {
        "unknown element" => format!("unknown element {name:?}"),
        "required element missing" => format!("required element {name:?} is missing"),
        _ => message.to_string(),
    }
}

/// Moves a path rooted at the resource type (`Observation.status`) under
/// `prefix` (`Bundle.entry[3].resource.status`); unchanged without a prefix.
fn reroot(issue_path: &str, rtype: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        return issue_path.to_string();
    }
    match issue_path.strip_prefix(rtype) {
        Some(rest) if rest.is_empty() || rest.starts_with(['.', '[']) => {
            format!("{prefix}{rest}")
        }
        _ => format!("{prefix}.{issue_path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_repeated_extension_key_is_rejected_as_fhirkit_rejects_it() {
        let ext = r#"[{"url":"urn:x","valueString":"a"}]"#;
        let text = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"extension":{ext},"extension":{ext}}}"#
        );
        let (_, issues) =
            fhirkit::decode_json::<fhirkit::r4::Resource>(&Json::parse(&text).unwrap());
        assert!(issues
            .iter()
            .any(|i| i.severity == fhirkit::Severity::Error));
        assert!(parse_resource(&text, None).is_err());
    }

    /// The fast path for simple extensions decides exactly as fhirkit does:
    /// for each extension array, an Observation carrying it is accepted by
    /// `parse_resource` iff fhirkit's decoder, given the whole resource,
    /// finds no error.
    #[test]
    fn simple_extensions_are_judged_as_fhirkit_judges_them() {
        let cases = [
            // edc's own: provenance (complex), protocol version, visit.
            r#"[{"url":"https://x.test/prov","extension":[{"url":"format","valueCode":"hl7v2"},{"url":"sender","valueString":"LAB|HOSP"},{"url":"sha256","valueString":"ab12"}]},{"url":"https://x.test/v","valueInteger":3},{"url":"https://x.test/visit","valueString":"week-4"}]"#,
            r#"[{"valueBoolean":true,"url":"urn:x"}]"#,
            r#"[{"url":"urn:x","valueUri":"urn:uuid:1"}]"#,
            r#"[{"url":"urn:x","valueInteger":-2147483648}]"#,
            // Invalid, or outside the fast path's shapes.
            r#"[{"url":"has space","valueString":"a"}]"#,
            r#"[{"url":"","valueString":"a"}]"#,
            r#"[{"url":"urn:x","valueString":""}]"#,
            r#"[{"url":"urn:x","valueCode":" padded"}]"#,
            r#"[{"url":"urn:x","valueCode":"two  spaces"}]"#,
            r#"[{"url":"urn:x","valueInteger":1.5}]"#,
            r#"[{"url":"urn:x","valueInteger":2147483648}]"#,
            r#"[{"url":"urn:x","valueInteger":"1"}]"#,
            r#"[{"url":"urn:x","valueBoolean":"true"}]"#,
            r#"[{"url":"urn:x","valueString":7}]"#,
            r#"[{"url":"urn:x","valueFoo":"a"}]"#,
            r#"[{"url":"urn:x"}]"#,
            r#"[{"valueString":"a"}]"#,
            r#"[{"url":"urn:x","valueString":"a","extension":[{"url":"y","valueString":"b"}]}]"#,
            r#"[{"url":"urn:x","extension":[]}]"#,
            r#"[{"url":"urn:x","extension":[{"url":"y","extension":[{"url":"z","valueString":"c"}]}]}]"#,
            r#"[{"id":"e1","url":"urn:x","valueString":"a"}]"#,
            r#"[{"url":"urn:x","valueDecimal":1.50}]"#,
            r#"[]"#,
            r#"{"url":"urn:x","valueString":"a"}"#,
            r#"["urn:x"]"#,
        ];
        for ext in cases {
            let text = format!(
                r#"{{"resourceType":"Observation","extension":{ext},"status":"final","code":{{"text":"x"}}}}"#
            );
            let json = Json::parse(&text).expect("JSON");
            let (_, issues) = fhirkit::decode_json::<fhirkit::r4::Resource>(&json);
            let fhirkit_accepts = !issues
                .iter()
                .any(|i| matches!(i.severity, fhirkit::Severity::Error));
            let ours = parse_resource(&text, Some("Observation"));
            assert_eq!(ours.is_ok(), fhirkit_accepts, "{ext}: {ours:?}");
            if let Ok(r) = ours {
                // Served back as sent: the extensions are back in place.
                assert_eq!(r.json().to_compact(), json.to_compact(), "{ext}");
            }
        }
        // A Bundle has no `extension`: never taken out there.
        let bundle = r#"{"resourceType":"Bundle","type":"collection","extension":[{"url":"urn:x","valueString":"a"}]}"#;
        assert!(parse_resource(bundle, Some("Bundle")).is_err());
    }

    const OBS: &str = r#"{"resourceType":"Observation","status":"final",
        "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
        "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
        "subject":{"reference":"Patient/p1"},
        "effectiveDateTime":"2026-03-01T08:00:00+01:00",
        "valueQuantity":{"value":7.40,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}"#;

    fn issues(text: &str, expected: Option<&str>) -> Vec<(IssueCode, String, String)> {
        match parse_resource(text, expected) {
            Ok(_) => Vec::new(),
            Err(o) => o
                .issues
                .into_iter()
                .map(|i| (i.code, i.expression.join(","), i.diagnostics))
                .collect(),
        }
    }

    fn codes_and_paths(text: &str) -> Vec<(IssueCode, String)> {
        issues(text, None)
            .into_iter()
            .map(|(c, p, _)| (c, p))
            .collect()
    }

    #[test]
    fn a_good_observation_passes() {
        let r = parse_resource(OBS, Some("Observation")).unwrap();
        assert_eq!(r.resource_type(), "Observation");
        assert_eq!(r.id(), None);
    }

    #[test]
    fn the_reference_trial_bundle_entries_pass() {
        let bundle = Json::parse(include_str!("../tests/data/events-bundle.json")).unwrap();
        let Some(Json::Array(entries)) = bundle.get("entry") else {
            panic!("no entries")
        };
        for (i, e) in entries.iter().enumerate() {
            let res = e.get("resource").unwrap().clone();
            let path = format!("Bundle.entry[{i}].resource");
            if let Err(o) = validate_json(res, None, &path) {
                panic!("{o}");
            }
        }
        assert!(parse_resource(include_str!("../tests/data/events-bundle.json"), None).is_ok());
    }

    #[test]
    fn malformed_json_says_where() {
        let o = parse_resource("{\n \"resourceType\": \"Patient\",\n}", None).unwrap_err();
        assert_eq!(o.issues[0].code, IssueCode::Structure);
        assert!(o.issues[0].diagnostics.contains("line 3, column 1"), "{o}");
    }

    #[test]
    fn resource_type_problems() {
        let c = |t: &str, e: Option<&str>| issues(t, e)[0].clone();
        assert_eq!(c("[]", None).0, IssueCode::Structure);
        assert_eq!(c("{}", None).0, IssueCode::Structure);
        assert_eq!(c(r#"{"resourceType":1}"#, None).0, IssueCode::Structure);
        let (code, path, msg) = c(r#"{"resourceType":"Patiant"}"#, None);
        assert_eq!((code, path.as_str()), (IssueCode::Invalid, "resourceType"));
        assert!(msg.contains("Patiant"));
        let (code, _, msg) = c(r#"{"resourceType":"Patient"}"#, Some("Observation"));
        assert_eq!(code, IssueCode::Invalid);
        assert!(
            msg.contains("Patient") && msg.contains("Observation"),
            "{msg}"
        );
        // Abstract types are not resource types.
        assert_eq!(
            c(r#"{"resourceType":"DomainResource"}"#, None).0,
            IssueCode::Invalid
        );
    }

    #[test]
    fn unknown_elements_wrong_primitives_and_missing_elements() {
        let text = r#"{"resourceType":"Observation","code":{"text":"x"},"foo":1,
            "effectiveDateTime":"yesterday","valueQuantity":{"value":"7.4"}}"#;
        let got = codes_and_paths(text);
        for want in [
            (IssueCode::Structure, "Observation.foo"),
            (IssueCode::Value, "Observation.effectiveDateTime"),
            (IssueCode::Structure, "Observation.valueQuantity.value"),
            (IssueCode::Required, "Observation.status"),
        ] {
            assert!(
                got.contains(&(want.0, want.1.to_string())),
                "{want:?} not in {got:?}"
            );
        }
        let all = issues(text, None);
        assert!(all.iter().any(|(_, _, d)| d == "unknown element \"foo\""));
        assert!(all
            .iter()
            .any(|(_, _, d)| d == "required element \"status\" is missing"));
        // The date check does not repeat fhirkit's complaint about the same element.
        assert_eq!(
            got.iter()
                .filter(|(_, p)| p == "Observation.effectiveDateTime")
                .count(),
            1
        );
    }

    #[test]
    fn bad_status_codes_are_value_errors() {
        let text = OBS.replace(r#""status":"final""#, r#""status":"done""#);
        let got = issues(&text, None);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0, got[0].1.as_str()),
            (IssueCode::Value, "Observation.status")
        );
        assert!(got[0].2.contains("\"done\"") && got[0].2.contains("entered-in-error"));
        for (rt, body) in [
            (
                "AdverseEvent",
                r#""actuality":"maybe","subject":{"reference":"Patient/1"}"#,
            ),
            (
                "Appointment",
                r#""status":"open","participant":[{"status":"accepted"}]"#,
            ),
            ("Encounter", r#""status":"done","class":{"code":"AMB"}"#),
            ("Patient", r#""gender":"M""#),
            (
                "ResearchSubject",
                r#""status":"enrolled","study":{"reference":"ResearchStudy/s"},"individual":{"reference":"Patient/p"}"#,
            ),
            ("ResearchStudy", r#""status":"open""#),
            ("Questionnaire", r#""status":"published""#),
            ("QuestionnaireResponse", r#""status":"done""#),
            ("DiagnosticReport", r#""status":"done","code":{"text":"x"}"#),
            (
                "ChargeItem",
                r#""status":"paid","code":{"text":"x"},"subject":{"reference":"Patient/p"}"#,
            ),
            ("Invoice", r#""status":"paid""#),
            (
                "Invoice",
                r#""status":"issued","lineItem":[{"chargeItemReference":{"reference":"ChargeItem/c"},"priceComponent":[{"type":"fee"}]}]"#,
            ),
        ] {
            let text = format!(r#"{{"resourceType":"{rt}",{body}}}"#);
            let got = codes_and_paths(&text);
            assert_eq!(got.len(), 1, "{rt}: {got:?}");
            assert_eq!(got[0].0, IssueCode::Value, "{rt}");
        }
    }

    #[test]
    fn choice_conflicts_are_structure_errors() {
        let text = OBS.replace(
            r#""effectiveDateTime""#,
            r#""effectiveInstant":"2026-03-01T08:00:00Z","effectiveDateTime""#,
        );
        let got = codes_and_paths(&text);
        assert_eq!(
            got[0],
            (IssueCode::Structure, "Observation.effective[x]".to_string())
        );
        // fhirkit reads the first variant and reports the other as unknown.
        assert!(
            got.iter().all(|(c, _)| *c == IssueCode::Structure),
            "{got:?}"
        );
    }

    #[test]
    fn primitive_extensions_are_accepted() {
        let text = r#"{"resourceType":"Patient","birthDate":"1974-12-25",
            "_birthDate":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/patient-birthTime","valueDateTime":"1974-12-25T14:35:45-05:00"}]},
            "_gender":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"unknown"}]}}"#;
        assert!(
            parse_resource(text, Some("Patient")).is_ok(),
            "{:?}",
            issues(text, None)
        );
    }

    #[test]
    fn ids_must_be_valid() {
        let got = codes_and_paths(r#"{"resourceType":"Patient","id":"a_b"}"#);
        assert_eq!(got, [(IssueCode::Value, "Patient.id".to_string())]);
        assert!(is_valid_id("abc-1.2") && is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id("") && !is_valid_id(&"x".repeat(65)) && !is_valid_id("a/b"));
    }

    #[test]
    fn calendar_dates_are_checked() {
        let text = OBS.replace("2026-03-01T08:00:00+01:00", "2026-02-30T08:00:00+01:00");
        let got = codes_and_paths(&text);
        assert_eq!(
            got,
            [(
                IssueCode::Value,
                "Observation.effectiveDateTime".to_string()
            )]
        );
    }

    #[test]
    fn bundle_paths_are_prefixed() {
        let json = Json::parse(
            r#"{"resourceType":"Observation","status":"x","code":{"text":"t"},"foo":[]}"#,
        )
        .unwrap();
        let o = validate_json(json, Some("Observation"), "Bundle.entry[3].resource").unwrap_err();
        let paths: Vec<&str> = o.issues.iter().map(|i| i.expression[0].as_str()).collect();
        assert_eq!(
            paths,
            [
                "Bundle.entry[3].resource.foo",
                "Bundle.entry[3].resource.status"
            ]
        );
        let o = validate_json(Json::Null, None, "Bundle.entry[0].resource").unwrap_err();
        assert_eq!(o.issues[0].expression, ["Bundle.entry[0].resource"]);
        let o = validate_json(
            Json::parse(r#"{"resourceType":"Patient"}"#).unwrap(),
            Some("Observation"),
            "Bundle.entry[1].resource",
        )
        .unwrap_err();
        assert_eq!(
            o.issues[0].expression,
            ["Bundle.entry[1].resource.resourceType"]
        );
    }

    #[test]
    fn decimals_round_trip_byte_exact() {
        let mut r = parse_resource(OBS, None).unwrap();
        r.set_id("obs-1");
        r.set_meta(3, "2026-11-28T04:08:40.123Z");
        let out = r.to_json_string();
        assert!(out.starts_with(r#"{"resourceType":"Observation","id":"obs-1","meta":{"versionId":"3","lastUpdated":"2026-11-28T04:08:40.123Z"},"status":"final""#), "{out}");
        assert!(out.contains(r#""value":7.40,"#), "{out}");
        // What was written reads back as the same resource.
        let again = parse_resource(&out, None).unwrap();
        assert_eq!(again.to_json_string(), out);
    }

    #[test]
    fn set_meta_keeps_other_meta_and_replaces_in_place() {
        let mut r = parse_resource(
            r#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"2020-01-01T00:00:00Z","tag":[{"code":"t"}],"versionId":"1"},"gender":"male"}"#,
            None,
        )
        .unwrap();
        r.set_meta(2, "2026-01-01T00:00:00.000Z");
        r.set_id("q");
        assert_eq!(
            r.to_json_string(),
            r#"{"resourceType":"Patient","id":"q","meta":{"lastUpdated":"2026-01-01T00:00:00.000Z","tag":[{"code":"t"}],"versionId":"2"},"gender":"male"}"#
        );
        let mut r = parse_resource(
            r#"{"resourceType":"Patient","gender":"male","meta":{"source":"x"}}"#,
            None,
        )
        .unwrap();
        r.set_meta(1, "2026-01-01T00:00:00.000Z");
        r.set_id("p1");
        assert_eq!(
            r.to_json_string(),
            r#"{"resourceType":"Patient","id":"p1","gender":"male","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z","source":"x"}}"#
        );
        let mut r = parse_resource(r#"{"resourceType":"Patient","gender":"male"}"#, None).unwrap();
        r.set_meta(1, "2026-01-01T00:00:00.000Z");
        assert_eq!(
            r.to_json_string(),
            r#"{"resourceType":"Patient","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"},"gender":"male"}"#
        );
        assert!(parse_resource(&r.to_json_string(), None).is_ok());
    }

    #[test]
    fn resource_types_are_sorted_for_binary_search() {
        assert!(fhirkit::r4::RESOURCE_TYPES.is_sorted());
        assert!(is_resource_type("Observation") && is_resource_type("VisionPrescription"));
        assert!(!is_resource_type("observation") && !is_resource_type("Resource"));
    }

    #[test]
    fn fhirkit_messages_map_to_codes() {
        use IssueCode::*;
        for (msg, code) in [
            ("required element missing", Required),
            ("needs at least 2 entries, found 1", Required),
            ("unknown element", Structure),
            ("the key appears more than once", Structure),
            (
                "only one type may be given, found valueString, valueBoolean",
                Structure,
            ),
            ("expected an object, found a string", Structure),
            ("expected a single value, found an array", Structure),
            ("expected true or false, found a string", Structure),
            ("null is not allowed; leave the element out", Structure),
            ("null with no extension in its place", Structure),
            (
                "an empty array is not allowed; leave the element out",
                Structure,
            ),
            (
                "has 2 entries but given has 3; the two arrays must line up",
                Structure,
            ),
            ("a resource needs a resourceType", Structure),
            (
                "Foo is not a FHIR R4 resource type this build knows",
                Structure,
            ),
            ("\"x y \" is not a valid code", Value),
            ("an empty string is not allowed", Value),
            ("an empty date is not allowed; leave the element out", Value),
            ("\"01\" is not a FHIR decimal", Value),
            ("1.0 is not a FHIR integer", Value),
            (
                "2147483648 is outside the 32-bit range of a FHIR integer",
                Value,
            ),
            ("0 is not a positiveInt (1 or more)", Value),
        ] {
            assert_eq!(code_for(msg), code, "{msg}");
        }
    }

    /// JSON-ish trees with FHIR-like keys, so generated input reaches deep
    /// into decoding, bindings and extraction rather than stopping at the type.
    fn fhirish() -> impl Strategy<Value = Json> {
        let key = prop::sample::select(vec![
            "id",
            "status",
            "code",
            "coding",
            "system",
            "value",
            "subject",
            "reference",
            "effectiveDateTime",
            "effectivePeriod",
            "start",
            "end",
            "valueQuantity",
            "gender",
            "birthDate",
            "name",
            "family",
            "given",
            "_given",
            "extension",
            "url",
            "valueReference",
            "item",
            "type",
            "participant",
            "actor",
            "clinicalStatus",
            "identifier",
            "category",
            "meta",
            "contained",
            "resourceType",
            "text",
        ]);
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            "-?[0-9]{1,4}(\\.[0-9]{1,3})?".prop_map(Json::Number),
            prop::sample::select(vec![
                "final",
                "male",
                "Patient/p1",
                "2026-02-29",
                "2024-02-29T10:00:00Z",
                "",
                "x y",
                "http://loinc.org",
                "Observation",
                "active",
            ])
            .prop_map(|s| Json::String(s.to_string())),
            "\\PC{0,8}".prop_map(Json::String),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|m| {
                    Json::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn parse_resource_never_panics_on_text(s in "\\PC*") {
            let _ = parse_resource(&s, None);
        }

        #[test]
        fn validation_and_extraction_never_panic_on_fhirish_json(
            body in fhirish(),
            rt in prop::sample::select(crate::index::indexed_types().to_vec()),
        ) {
            let mut json = body;
            if let Json::Object(m) = &mut json {
                m.retain(|(k, _)| k != "resourceType");
                m.insert(0, ("resourceType".into(), Json::String(rt.into())));
            }
            let text = json.to_compact();
            if let Ok(mut r) = parse_resource(&text, Some(rt)) {
                r.set_id("x1");
                r.set_meta(1, "2026-01-01T00:00:00.000Z");
                let _ = crate::index::extract(&r);
                prop_assert!(parse_resource(&r.to_json_string(), Some(rt)).is_ok());
            }
            let _ = validate_json(json, None, "Bundle.entry[0].resource");
        }
    }
}
