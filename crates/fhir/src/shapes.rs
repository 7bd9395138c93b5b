//! Acceptance of the common Observation and DiagnosticReport shapes
//! without `fhirkit`'s decoder.
//!
//! Every stored Observation is validated, and `fhirkit` decodes into typed
//! models that validation then throws away: per element it formats the
//! `_key` twin's name and scans the object for each of the ~30 elements of
//! Observation and the 11 types of `value[x]`. That was the largest share
//! of a write's request-side CPU (profiled under `bench/write-throughput.sh`).
//!
//! [`accepts`] walks the JSON once against a closed table of the elements
//! lab, wearable and diary Observations (and lab DiagnosticReports) use, applying `fhirkit`'s
//! own primitive rules ([`Kind::check`], [`Decimal::parse`]). Its contract is
//! one-sided: `true` only when `fhirkit` would report no error for the same
//! JSON. Anything outside the table (another element, a `_key` twin, an
//! `id` or `extension` inside a datatype, `meta`, `contained`, a type it
//! does not know) answers `false`, and the caller runs `fhirkit` as before:
//! so every rejection, and every message, still comes from `fhirkit`.
//! The tests below check the contract against `fhirkit` on resources
//! generated from the tables themselves, valid and mutated.

use fhirkit::primitive::{Decimal, Kind};
use fhirkit::Json;

/// What one element may hold.
#[derive(Clone, Copy)]
enum Value {
    /// A JSON string that passes `fhirkit`'s rule for the kind.
    Text(Kind),
    /// A JSON number that is a FHIR decimal.
    Decimal,
    /// `true` or `false`.
    Boolean,
    /// A JSON object of the given datatype.
    Complex(&'static [Element]),
}

/// One element of a datatype: its JSON key, whether it repeats (a
/// non-empty array), whether it is required (minimum cardinality 1), and
/// what each value is.
struct Element {
    key: &'static str,
    many: bool,
    required: bool,
    value: Value,
}

const fn one(key: &'static str, value: Value) -> Element {
    Element {
        key,
        many: false,
        required: false,
        value,
    }
}

const fn many(key: &'static str, value: Value) -> Element {
    Element {
        key,
        many: true,
        required: false,
        value,
    }
}

const fn required(key: &'static str, value: Value) -> Element {
    Element {
        key,
        many: false,
        required: true,
        value,
    }
}

const CODING: &[Element] = &[
    one("system", Value::Text(Kind::Uri)),
    one("version", Value::Text(Kind::String)),
    one("code", Value::Text(Kind::Code)),
    one("display", Value::Text(Kind::String)),
    one("userSelected", Value::Boolean),
];

const CODEABLE_CONCEPT: &[Element] = &[
    many("coding", Value::Complex(CODING)),
    one("text", Value::Text(Kind::String)),
];

/// A literal reference, a logical one (`identifier`), or both (as the
/// ingest pipeline writes `subject`: the Patient and its trial identifier).
const REFERENCE: &[Element] = &[
    one("reference", Value::Text(Kind::String)),
    one("type", Value::Text(Kind::Uri)),
    one("identifier", Value::Complex(IDENTIFIER)),
    one("display", Value::Text(Kind::String)),
];

/// Without `comparator` (a coded element with a required binding).
const QUANTITY: &[Element] = &[
    one("value", Value::Decimal),
    one("unit", Value::Text(Kind::String)),
    one("system", Value::Text(Kind::Uri)),
    one("code", Value::Text(Kind::Code)),
];

/// Without `use` (a coded element with a required binding).
const IDENTIFIER: &[Element] = &[
    one("type", Value::Complex(CODEABLE_CONCEPT)),
    one("system", Value::Text(Kind::Uri)),
    one("value", Value::Text(Kind::String)),
];

const PERIOD: &[Element] = &[
    one("start", Value::Text(Kind::DateTime)),
    one("end", Value::Text(Kind::DateTime)),
];

const REFERENCE_RANGE: &[Element] = &[
    one("low", Value::Complex(QUANTITY)),
    one("high", Value::Complex(QUANTITY)),
    one("type", Value::Complex(CODEABLE_CONCEPT)),
    many("appliesTo", Value::Complex(CODEABLE_CONCEPT)),
    one("text", Value::Text(Kind::String)),
];

const ANNOTATION: &[Element] = &[
    required("text", Value::Text(Kind::Markdown)),
    one("time", Value::Text(Kind::DateTime)),
    one("authorString", Value::Text(Kind::String)),
];

/// Without `id` and `extension`, as everywhere here.
const META: &[Element] = &[
    one("versionId", Value::Text(Kind::Id)),
    one("lastUpdated", Value::Text(Kind::Instant)),
    one("source", Value::Text(Kind::Uri)),
    many("profile", Value::Text(Kind::Canonical)),
    many("security", Value::Complex(CODING)),
    many("tag", Value::Complex(CODING)),
];

const NARRATIVE: &[Element] = &[
    required("status", Value::Text(Kind::Code)),
    required("div", Value::Text(Kind::Xhtml)),
];

/// The Observation elements checked here; `resourceType` is checked by
/// the caller. `Observation.status` is also a required binding, which
/// `bindings` checks after validation either way.
const OBSERVATION: &[Element] = &[
    one("id", Value::Text(Kind::String)),
    one("meta", Value::Complex(META)),
    one("language", Value::Text(Kind::Code)),
    one("text", Value::Complex(NARRATIVE)),
    many("identifier", Value::Complex(IDENTIFIER)),
    many("basedOn", Value::Complex(REFERENCE)),
    many("partOf", Value::Complex(REFERENCE)),
    required("status", Value::Text(Kind::Code)),
    many("category", Value::Complex(CODEABLE_CONCEPT)),
    required("code", Value::Complex(CODEABLE_CONCEPT)),
    one("subject", Value::Complex(REFERENCE)),
    many("focus", Value::Complex(REFERENCE)),
    one("encounter", Value::Complex(REFERENCE)),
    one("effectiveDateTime", Value::Text(Kind::DateTime)),
    one("effectivePeriod", Value::Complex(PERIOD)),
    one("effectiveInstant", Value::Text(Kind::Instant)),
    one("issued", Value::Text(Kind::Instant)),
    many("performer", Value::Complex(REFERENCE)),
    one("valueQuantity", Value::Complex(QUANTITY)),
    one("valueCodeableConcept", Value::Complex(CODEABLE_CONCEPT)),
    one("valueString", Value::Text(Kind::String)),
    one("valueBoolean", Value::Boolean),
    one("valueDateTime", Value::Text(Kind::DateTime)),
    one("valuePeriod", Value::Complex(PERIOD)),
    one("dataAbsentReason", Value::Complex(CODEABLE_CONCEPT)),
    many("interpretation", Value::Complex(CODEABLE_CONCEPT)),
    many("note", Value::Complex(ANNOTATION)),
    one("bodySite", Value::Complex(CODEABLE_CONCEPT)),
    one("method", Value::Complex(CODEABLE_CONCEPT)),
    one("specimen", Value::Complex(REFERENCE)),
    one("device", Value::Complex(REFERENCE)),
    many("referenceRange", Value::Complex(REFERENCE_RANGE)),
    many("hasMember", Value::Complex(REFERENCE)),
    many("derivedFrom", Value::Complex(REFERENCE)),
];

/// The DiagnosticReport elements checked here (a lab report as the HL7 v2
/// mapping writes it, and the like); `media` and `presentedForm` are left
/// to `fhirkit`. `status` is a required binding `bindings` checks.
const DIAGNOSTIC_REPORT: &[Element] = &[
    one("id", Value::Text(Kind::String)),
    one("meta", Value::Complex(META)),
    one("language", Value::Text(Kind::Code)),
    one("text", Value::Complex(NARRATIVE)),
    many("identifier", Value::Complex(IDENTIFIER)),
    many("basedOn", Value::Complex(REFERENCE)),
    required("status", Value::Text(Kind::Code)),
    many("category", Value::Complex(CODEABLE_CONCEPT)),
    required("code", Value::Complex(CODEABLE_CONCEPT)),
    one("subject", Value::Complex(REFERENCE)),
    one("encounter", Value::Complex(REFERENCE)),
    one("effectiveDateTime", Value::Text(Kind::DateTime)),
    one("effectivePeriod", Value::Complex(PERIOD)),
    one("issued", Value::Text(Kind::Instant)),
    many("performer", Value::Complex(REFERENCE)),
    many("resultsInterpreter", Value::Complex(REFERENCE)),
    many("specimen", Value::Complex(REFERENCE)),
    many("result", Value::Complex(REFERENCE)),
    many("imagingStudy", Value::Complex(REFERENCE)),
    one("conclusion", Value::Text(Kind::String)),
    many("conclusionCode", Value::Complex(CODEABLE_CONCEPT)),
];

/// A resource type this module has a table for, with its choice elements
/// (at most one type of each may be given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Observation,
    DiagnosticReport,
}

impl Shape {
    /// The table for `rtype`, if there is one.
    pub(crate) fn of(rtype: &str) -> Option<Shape> {
        match rtype {
            "Observation" => Some(Shape::Observation),
            "DiagnosticReport" => Some(Shape::DiagnosticReport),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Observation => "Observation",
            Shape::DiagnosticReport => "DiagnosticReport",
        }
    }

    fn elements(self) -> &'static [Element] {
        match self {
            Shape::Observation => OBSERVATION,
            Shape::DiagnosticReport => DIAGNOSTIC_REPORT,
        }
    }

    fn choices(self) -> &'static [&'static str] {
        match self {
            Shape::Observation => &["effective", "value"],
            Shape::DiagnosticReport => &["effective"],
        }
    }
}

/// Whether `fhirkit` is known to accept `json`, a resource of `shape`
/// whose own `extension` the caller has already taken out: `true` only
/// then (see the module's contract); `false` means "ask fhirkit", not
/// "invalid".
pub(crate) fn accepts(shape: Shape, json: &Json) -> bool {
    let Json::Object(members) = json else {
        return false;
    };
    let mut types = members.iter().filter(|(k, _)| k == "resourceType");
    if !matches!((types.next(), types.next()), (Some((_, Json::String(t))), None) if t == shape.name())
    {
        return false;
    }
    // At most one type of each choice element (fhirkit reports two).
    let choices = |prefix: &str| {
        members
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .count()
    };
    members_ok(shape.elements(), members, Some("resourceType"))
        && shape.choices().iter().all(|c| choices(c) <= 1)
}

/// Whether `fhirkit` is known to accept `json` as a Quantity without
/// `comparator` (an extension's `valueQuantity`).
pub(crate) fn accepts_quantity(json: &Json) -> bool {
    value_ok(Value::Complex(QUANTITY), json)
}

/// Every member (but `skip`) is an element of `elements`, once, holding
/// what it may; every required element is there.
fn members_ok(elements: &[Element], members: &[(String, Json)], skip: Option<&str>) -> bool {
    members.iter().enumerate().all(|(i, (key, v))| {
        Some(key.as_str()) == skip
            || !members[..i].iter().any(|(k, _)| k == key)
                && elements
                    .iter()
                    .find(|e| e.key == key)
                    .is_some_and(|e| element_ok(e, v))
    }) && elements
        .iter()
        .filter(|e| e.required)
        .all(|e| members.iter().any(|(k, _)| k == e.key))
}

fn element_ok(element: &Element, v: &Json) -> bool {
    if element.many {
        matches!(v, Json::Array(items) if !items.is_empty() && items.iter().all(|x| value_ok(element.value, x)))
    } else {
        value_ok(element.value, v)
    }
}

fn value_ok(value: Value, v: &Json) -> bool {
    match (value, v) {
        (Value::Text(kind), Json::String(s)) => kind.check(s).is_ok(),
        (Value::Decimal, Json::Number(n)) => Decimal::parse(n).is_ok(),
        (Value::Boolean, Json::Bool(_)) => true,
        (Value::Complex(elements), Json::Object(members)) => members_ok(elements, members, None),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(extra: &str) -> Json {
        Json::parse(&format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}]}}{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_plain_vital_sign_is_accepted() {
        assert!(accepts(
            Shape::Observation,
            &obs(
                r#","subject":{"reference":"Patient/p1"},"effectiveDateTime":"2026-03-01T08:00:00+01:00","valueQuantity":{"value":72.0,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}"#
            )
        ));
    }

    #[test]
    fn a_lab_result_with_meta_and_narrative_is_accepted_keys_in_any_order() {
        let json = Json::parse(
            r#"{"category":[{"coding":[{"code":"laboratory","system":"http://terminology.hl7.org/CodeSystem/observation-category"}],"text":"Laboratory"}],
            "code":{"coding":[{"code":"2951-2","display":"Sodium","system":"http://loinc.org"}]},
            "effectiveDateTime":"2026-01-01T09:00:00Z","encounter":{"reference":"Encounter/e1"},"id":"d23f",
            "meta":{"profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"],"security":[{"code":"HTEST","system":"http://terminology.hl7.org/CodeSystem/v3-ActReason"}]},
            "performer":[{"reference":"Practitioner/p1"}],"resourceType":"Observation","status":"final","subject":{"reference":"Patient/p1"},
            "text":{"div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>140 mmol/L</p></div>","status":"generated"},
            "valueQuantity":{"code":"mmol/L","system":"http://unitsofmeasure.org","unit":"mmol/L","value":140}}"#,
        )
        .unwrap();
        assert!(accepts(Shape::Observation, &json));
    }

    #[test]
    fn anything_outside_the_table_is_left_to_fhirkit() {
        for extra in [
            r#","meta":{"id":"m"}"#,
            r#","text":{"status":"generated"}"#,
            r#","_status":{"id":"s"}"#,
            r#","code":{"text":"again"}"#,
            r#","valueQuantity":{"value":1},"valueString":"x""#,
            r#","valueQuantity":{"value":1,"comparator":"<"}"#,
            r#","subject":{"identifier":{"value":"x","use":"official"}}"#,
            r#","subject":[{"reference":"Patient/p1"}]"#,
            r#","category":[]"#,
            r#","effectiveDateTime":"2026-3-1""#,
            r#","valueQuantity":{"value":"1"}"#,
            r#","issued":"2026-03-01""#,
            r#","note":[{"text":""}]"#,
        ] {
            assert!(!accepts(Shape::Observation, &obs(extra)), "{extra}");
        }
        let no_code = Json::parse(r#"{"resourceType":"Observation","status":"final"}"#).unwrap();
        assert!(!accepts(Shape::Observation, &no_code));
    }
    /// Draws choices from proptest's byte tape (so failures shrink).
    struct Tape<'a>(std::slice::Iter<'a, u8>);

    impl Tape<'_> {
        fn pick(&mut self, n: usize) -> usize {
            self.0.next().map_or(0, |b| usize::from(*b) % n)
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.pick(100) < percent
        }
    }

    /// Text that passes `kind`'s rule, so a tree built from these alone is
    /// valid.
    fn valid_text(kind: Kind, t: &mut Tape) -> &'static str {
        let pool: &[&str] = match kind {
            Kind::Code => &["final", "8867-4", "vital-signs", "mm[Hg]", "a b"],
            Kind::Uri => &["http://loinc.org", "urn:oid:1.2.3", "Patient"],
            Kind::DateTime => &["2026-03-01", "2026-03", "2026", "2026-03-01T08:00:00+01:00"],
            Kind::Instant => &["2026-03-01T08:00:00.120Z", "2026-03-01T08:00:00+01:00"],
            Kind::Id => &["a1", "x-y.z"],
            Kind::Canonical => &[
                "http://hl7.org/fhir/StructureDefinition/vitalsigns",
                "urn:x|1",
            ],
            Kind::Xhtml => &["<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"],
            _ => &["x", "Patient/p1", " padded ", "héllo"],
        };
        pool[t.pick(pool.len())]
    }

    /// Any text, valid for some kind or none.
    const ANY_TEXT: &[&str] = &[
        "",
        " ",
        "final",
        " final",
        "a  b",
        "http://loinc.org",
        "has space",
        "2026-03-01",
        "2026-3-1",
        "2026-03-01T08:00:00Z",
        "2026-03-01T08:00",
        "2026-02-30",
        "24:00:00",
        "Patient/p1",
        "\u{0}",
        "\t",
        "x",
    ];
    const ANY_NUMBER: &[&str] = &["1", "01", "-0", "1.50", "1e5", "1.", "-", "0.0", "1E-3"];

    fn gen_value(value: Value, t: &mut Tape, mutate: bool, depth: usize) -> Json {
        if mutate && t.chance(2) {
            return match t.pick(6) {
                0 => Json::Null,
                1 => Json::Bool(true),
                2 => Json::Number(ANY_NUMBER[t.pick(ANY_NUMBER.len())].to_string()),
                3 => Json::String(ANY_TEXT[t.pick(ANY_TEXT.len())].to_string()),
                4 => Json::Array(Vec::new()),
                _ => Json::Object(Vec::new()),
            };
        }
        match value {
            Value::Text(_) if mutate && t.chance(6) => {
                Json::String(ANY_TEXT[t.pick(ANY_TEXT.len())].to_string())
            }
            Value::Text(kind) => Json::String(valid_text(kind, t).to_string()),
            Value::Decimal if mutate && t.chance(20) => {
                Json::Number(ANY_NUMBER[t.pick(ANY_NUMBER.len())].to_string())
            }
            Value::Decimal => {
                Json::Number(["72.0", "1.50", "-3", "0", "1e2"][t.pick(5)].to_string())
            }
            Value::Boolean => Json::Bool(t.chance(50)),
            Value::Complex(elements) => Json::Object(gen_members(elements, t, mutate, depth + 1)),
        }
    }

    fn gen_element(e: &Element, t: &mut Tape, mutate: bool, depth: usize) -> Json {
        if e.many && !(mutate && t.chance(2)) {
            let n = if mutate && t.chance(2) {
                0
            } else {
                1 + t.pick(2)
            };
            Json::Array(
                (0..n)
                    .map(|_| gen_value(e.value, t, mutate, depth))
                    .collect(),
            )
        } else if !e.many && mutate && t.chance(2) {
            Json::Array(vec![gen_value(e.value, t, mutate, depth)])
        } else {
            gen_value(e.value, t, mutate, depth)
        }
    }

    fn gen_members(
        elements: &[Element],
        t: &mut Tape,
        mutate: bool,
        depth: usize,
    ) -> Vec<(String, Json)> {
        let mut members = Vec::new();
        for e in elements {
            if e.required && !(mutate && t.chance(5)) || depth < 3 && t.chance(25) {
                members.push((e.key.to_string(), gen_element(e, t, mutate, depth)));
            }
        }
        if mutate && t.chance(4) {
            let odd = [
                "extension",
                "id",
                "_status",
                "_value",
                "fhir_comments",
                "foo",
                "resourceType",
            ];
            let key = odd[t.pick(odd.len())];
            members.insert(
                t.pick(members.len() + 1),
                (key.to_string(), Json::String("x".into())),
            );
        }
        if mutate && !members.is_empty() && t.chance(2) {
            let dup = members[t.pick(members.len())].clone();
            members.push(dup);
        }
        members
    }

    /// A resource from a table (the tape's first draw picks which),
    /// `resourceType` anywhere; without `mutate`, valid (at most one type
    /// of each choice; with it, now and then two).
    fn gen_resource(tape: &[u8], mutate: bool) -> (Shape, Json) {
        let mut t = Tape(tape.iter());
        let shape = [Shape::Observation, Shape::DiagnosticReport][t.pick(2)];
        let mut members = vec![(
            "resourceType".to_string(),
            Json::String(shape.name().into()),
        )];
        members.extend(gen_members(shape.elements(), &mut t, mutate, 0));
        if !(mutate && t.chance(10)) {
            let mut seen = [false; 2];
            members.retain(|(k, _)| {
                let Some(c) = shape.choices().iter().position(|c| k.starts_with(c)) else {
                    return true;
                };
                !std::mem::replace(&mut seen[c], true)
            });
        }
        (shape, Json::Object(members))
    }

    fn fhirkit_errors(json: &Json) -> Vec<String> {
        let (decoded, issues) = fhirkit::decode_json::<fhirkit::r4::Resource>(json);
        let mut errors: Vec<String> = issues
            .into_iter()
            .filter(|i| i.severity == fhirkit::Severity::Error)
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect();
        if decoded.is_none() {
            errors.push("not decoded".into());
        }
        errors
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// The contract: accepted here means fhirkit reports no error.
        #[test]
        fn what_is_accepted_fhirkit_accepts(tape in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (shape, json) = gen_resource(&tape, true);
            if accepts(shape, &json) {
                let errors = fhirkit_errors(&json);
                proptest::prop_assert!(errors.is_empty(), "{}\n{:?}", json.to_compact(), errors);
            }
        }

        /// And the shortcut is taken: every resource built from a table
        /// with valid values is accepted (fhirkit agrees, as above).
        #[test]
        fn valid_resources_of_the_tables_are_accepted(tape in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (shape, json) = gen_resource(&tape, false);
            proptest::prop_assert!(accepts(shape, &json), "{}", json.to_compact());
            let errors = fhirkit_errors(&json);
            proptest::prop_assert!(errors.is_empty(), "{}\n{:?}", json.to_compact(), errors);
        }
    }

    #[test]
    fn mutated_resources_are_both_accepted_and_refused() {
        // The contract test above is only as good as its mix: both answers
        // must come up often among the generated resources of each table.
        let (mut yes, mut no) = ([0; 2], [0; 2]);
        for seed in 0..4000u32 {
            let tape: Vec<u8> = (0..400u32)
                .map(|i| {
                    (seed
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i.wrapping_mul(40_503))
                        >> 7) as u8
                })
                .collect();
            let (shape, json) = gen_resource(&tape, true);
            let i = usize::from(shape == Shape::DiagnosticReport);
            if accepts(shape, &json) {
                yes[i] += 1;
            } else {
                no[i] += 1;
            }
        }
        assert!(
            yes.iter().chain(&no).all(|n| *n > 100),
            "accepted {yes:?}, refused {no:?} (Observation, DiagnosticReport)"
        );
    }
}
