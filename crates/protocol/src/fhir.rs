//! The FHIR R4 resources a trial becomes: its `ResearchStudy`, an
//! `Organization` per site, a `Questionnaire` per ePRO questionnaire, and a
//! `Patient` and `ResearchSubject` per subject.
//!
//! Invariant: ids are derived from the protocol and subject ids only
//! ([`questionnaire_id`] and the id newtypes), and the output depends on
//! nothing else, so loading a trial twice writes the same resources (an
//! idempotent `PUT` per resource). Every resource decodes under fhirkit's
//! strict R4 reading without error (tested below).

use crate::model::{Item, ItemType, Protocol, Questionnaire, Site};
use crate::subjects::Subject;
use crate::types::format_date;
use fhirkit::Json;

/// `Identifier.system` of a trial's `ResearchStudy`.
pub const TRIAL_SYSTEM: &str = "https://clinflow.dev/fhir/trial";
/// `Identifier.system` of a site's `Organization`.
pub const SITE_SYSTEM: &str = "https://clinflow.dev/fhir/site";
/// Extension on `ResearchStudy`: the protocol version (`valueInteger`).
pub const PROTOCOL_VERSION_URL: &str =
    "https://clinflow.dev/fhir/StructureDefinition/protocol-version";
/// Extension on `Organization`: the site's IANA time zone (`valueString`).
pub const TIMEZONE_URL: &str = "https://clinflow.dev/fhir/StructureDefinition/timezone";
/// Extension on `ResearchSubject`: the enrolling site
/// (`valueReference` to `Organization/{site}`).
pub const RESEARCH_SUBJECT_SITE_URL: &str =
    "https://clinflow.dev/fhir/StructureDefinition/research-subject-site";
/// Code system of `ResearchStudy.phase`.
pub const PHASE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/research-study-phase";
/// Standard extension: the smallest allowed answer of a questionnaire item.
pub const MIN_VALUE_URL: &str = "http://hl7.org/fhir/StructureDefinition/minValue";
/// Standard extension: the largest allowed answer of a questionnaire item.
pub const MAX_VALUE_URL: &str = "http://hl7.org/fhir/StructureDefinition/maxValue";

/// Every resource of a trial, in a fixed order: the `ResearchStudy`, the
/// sites' `Organization`s, the `Questionnaire`s, then for each subject its
/// `Patient` and `ResearchSubject`.
pub fn trial_resources(protocol: &Protocol, subjects: &[Subject]) -> Vec<Json> {
    let mut out = Vec::with_capacity(
        1 + protocol.sites.len() + protocol.questionnaires.len() + 2 * subjects.len(),
    );
    out.push(research_study(protocol));
    out.extend(protocol.sites.iter().map(organization));
    out.extend(
        protocol
            .questionnaires
            .iter()
            .map(|q| questionnaire(protocol, q)),
    );
    for s in subjects {
        out.push(patient(protocol, s));
        out.push(research_subject(protocol, s));
    }
    out
}

/// `(resourceType, id)` of a resource, the key it is stored under.
pub fn resource_key(resource: &Json) -> Option<(&str, &str)> {
    Some((
        resource.get("resourceType")?.as_str()?,
        resource.get("id")?.as_str()?,
    ))
}

/// The FHIR id of a protocol questionnaire: `{trial}-{questionnaire}`. The
/// protocol rules keep it a valid FHIR id.
pub fn questionnaire_id(protocol: &Protocol, q: &Questionnaire) -> String {
    format!("{}-{}", protocol.id, q.id)
}

/// The trial's `ResearchStudy`, id = trial id.
pub fn research_study(p: &Protocol) -> Json {
    obj([
        ("resourceType", s("ResearchStudy")),
        ("id", s(p.id.as_str())),
        (
            "extension",
            arr([obj([
                ("url", s(PROTOCOL_VERSION_URL)),
                ("valueInteger", num(p.version)),
            ])]),
        ),
        ("identifier", arr([identifier(TRIAL_SYSTEM, p.id.as_str())])),
        ("title", s(&p.title)),
        ("status", s("active")),
        (
            "phase",
            obj([(
                "coding",
                arr([obj([
                    ("system", s(PHASE_SYSTEM)),
                    ("code", s(p.phase.code())),
                    ("display", s(p.phase.display())),
                ])]),
            )]),
        ),
        (
            "period",
            obj([
                ("start", s(&format_date(p.period.start))),
                ("end", s(&format_date(p.period.end))),
            ]),
        ),
        (
            "arm",
            Json::Array(p.arms.iter().map(|a| obj([("name", s(a))])).collect()),
        ),
    ])
}

/// A site's `Organization`, id = site id.
pub fn organization(site: &Site) -> Json {
    obj([
        ("resourceType", s("Organization")),
        ("id", s(site.id.as_str())),
        (
            "extension",
            arr([obj([
                ("url", s(TIMEZONE_URL)),
                ("valueString", s(&site.timezone)),
            ])]),
        ),
        (
            "identifier",
            arr([identifier(SITE_SYSTEM, site.id.as_str())]),
        ),
        ("active", Json::Bool(true)),
        ("name", s(&site.name)),
        (
            "address",
            arr([obj([
                ("city", s(&site.city)),
                ("country", s(site.country.as_str())),
            ])]),
        ),
    ])
}

/// A protocol questionnaire as a FHIR `Questionnaire`, id
/// [`questionnaire_id`], url `https://clinflow.dev/fhir/Questionnaire/{trial}/{id}`.
pub fn questionnaire(p: &Protocol, q: &Questionnaire) -> Json {
    obj([
        ("resourceType", s("Questionnaire")),
        ("id", s(&questionnaire_id(p, q))),
        (
            "url",
            s(&format!(
                "https://clinflow.dev/fhir/Questionnaire/{}/{}",
                p.id, q.id
            )),
        ),
        ("version", s(&p.version.to_string())),
        ("title", s(&q.title)),
        ("status", s("active")),
        ("subjectType", arr([s("Patient")])),
        ("item", Json::Array(q.items.iter().map(item).collect())),
    ])
}

fn item(i: &Item) -> Json {
    let mut m: Vec<(String, Json)> = Vec::new();
    if let Some(r) = &i.range {
        let bound = |url: &str, v: f64| match i.kind {
            // The rules make an integer item's bounds whole numbers.
            ItemType::Integer => obj([("url", s(url)), ("valueInteger", integer(v))]),
            _ => obj([("url", s(url)), ("valueDecimal", decimal(v))]),
        };
        m.push((
            "extension".into(),
            arr([
                bound(MIN_VALUE_URL, r.low()),
                bound(MAX_VALUE_URL, r.high()),
            ]),
        ));
    }
    m.push(("linkId".into(), s(&i.link_id)));
    m.push(("text".into(), s(&i.text)));
    m.push(("type".into(), s(i.kind.code())));
    m.push(("required".into(), Json::Bool(i.required)));
    if let Some(n) = i.max_length {
        m.push(("maxLength".into(), num(n)));
    }
    if !i.options.is_empty() {
        m.push((
            "answerOption".into(),
            Json::Array(
                i.options
                    .iter()
                    .map(|o| obj([("valueString", s(o))]))
                    .collect(),
            ),
        ));
    }
    Json::Object(m)
}

/// A subject's `Patient`, id = subject id.
pub fn patient(p: &Protocol, subject: &Subject) -> Json {
    let mut m: Vec<(String, Json)> = vec![
        ("resourceType".into(), s("Patient")),
        ("id".into(), s(subject.id.as_str())),
        (
            "identifier".into(),
            arr([identifier(
                &p.subject_identifier_system,
                subject.id.as_str(),
            )]),
        ),
        (
            "name".into(),
            arr([obj([
                ("family", s(&subject.family)),
                ("given", arr([s(&subject.given)])),
            ])]),
        ),
    ];
    let mut telecom = Vec::new();
    if let Some(e) = &subject.email {
        telecom.push(obj([("system", s("email")), ("value", s(e.as_str()))]));
    }
    if let Some(ph) = &subject.phone {
        telecom.push(obj([("system", s("phone")), ("value", s(ph.as_str()))]));
    }
    if !telecom.is_empty() {
        m.push(("telecom".into(), Json::Array(telecom)));
    }
    m.push(("gender".into(), s(subject.sex.code())));
    m.push(("birthDate".into(), s(&format_date(subject.birth_date))));
    Json::Object(m)
}

/// A subject's `ResearchSubject`, id = subject id: on study from enrolment,
/// in its arm, with the enrolling site as an extension.
pub fn research_subject(p: &Protocol, subject: &Subject) -> Json {
    obj([
        ("resourceType", s("ResearchSubject")),
        ("id", s(subject.id.as_str())),
        (
            "extension",
            arr([obj([
                ("url", s(RESEARCH_SUBJECT_SITE_URL)),
                (
                    "valueReference",
                    obj([("reference", s(&format!("Organization/{}", subject.site)))]),
                ),
            ])]),
        ),
        (
            "identifier",
            arr([identifier(
                &p.subject_identifier_system,
                subject.id.as_str(),
            )]),
        ),
        ("status", s("on-study")),
        (
            "period",
            obj([("start", s(&format_date(subject.enrolled)))]),
        ),
        (
            "study",
            obj([("reference", s(&format!("ResearchStudy/{}", p.id)))]),
        ),
        (
            "individual",
            obj([("reference", s(&format!("Patient/{}", subject.id)))]),
        ),
        ("assignedArm", s(&subject.arm)),
    ])
}

fn identifier(system: &str, value: &str) -> Json {
    obj([("system", s(system)), ("value", s(value))])
}

fn obj<const N: usize>(members: [(&str, Json); N]) -> Json {
    Json::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn arr<const N: usize>(items: [Json; N]) -> Json {
    Json::Array(items.into())
}

fn s(v: &str) -> Json {
    Json::String(v.to_string())
}

fn num(n: u32) -> Json {
    Json::Number(n.to_string())
}

/// A whole number as a FHIR integer (saturating at the i64 range, which
/// the rules' whole-number bounds of a protocol stay far inside).
fn integer(v: f64) -> Json {
    Json::Number((v as i64).to_string())
}

/// A finite float as a FHIR decimal. Rust writes floats without exponent,
/// the shortest text that reads back to the same value.
fn decimal(v: f64) -> Json {
    Json::Number(format!("{v}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_subjects_csv, parse_yaml};
    use fhirkit::r4::Resource;
    use fhirkit::Severity;

    const PROTOCOL: &str = include_str!("../../../reference-trial/protocol.yaml");
    const SUBJECTS: &str = include_str!("../../../reference-trial/subjects.csv");

    fn reference() -> Vec<Json> {
        let p = parse_yaml(PROTOCOL).unwrap();
        let subjects = parse_subjects_csv(SUBJECTS, &p).unwrap();
        trial_resources(&p, &subjects)
    }

    fn find<'a>(all: &'a [Json], ty: &str, id: &str) -> &'a Json {
        all.iter()
            .find(|r| resource_key(r) == Some((ty, id)))
            .unwrap_or_else(|| panic!("{ty}/{id} missing"))
    }

    fn at<'a>(j: &'a Json, path: &[&str]) -> &'a Json {
        path.iter().fold(j, |j, k| match k.parse::<usize>() {
            Ok(i) => match j {
                Json::Array(a) => &a[i],
                _ => panic!("not an array at {k}"),
            },
            Err(_) => j.get(k).unwrap_or_else(|| panic!("no {k}")),
        })
    }

    fn str_at<'a>(j: &'a Json, path: &[&str]) -> &'a str {
        at(j, path).as_str().unwrap()
    }

    #[test]
    fn every_resource_passes_strict_r4_decoding() {
        for r in reference() {
            let text = r.to_compact();
            let (decoded, issues) = fhirkit::decode_json::<Resource>(&r);
            let errors: Vec<_> = issues
                .iter()
                .filter(|i| i.severity == Severity::Error)
                .collect();
            assert!(errors.is_empty(), "{text}\n{errors:?}");
            assert!(decoded.is_some(), "{text}");
            assert!(
                fhirkit::from_json_strict::<Resource>(&text).is_ok(),
                "{text}"
            );
            let (_, id) = resource_key(&r).unwrap();
            assert!(fhirkit::primitive::is_id(id), "{id}");
        }
    }

    #[test]
    fn the_reference_trial_gives_the_expected_resources() {
        let all = reference();
        let keys: Vec<(&str, &str)> = all.iter().filter_map(resource_key).collect();
        let count = |ty: &str| keys.iter().filter(|(t, _)| *t == ty).count();
        let subject_rows = SUBJECTS.lines().skip(1).count();
        assert_eq!(count("ResearchStudy"), 1);
        assert_eq!(count("Organization"), 3);
        assert_eq!(count("Questionnaire"), 1);
        assert_eq!(count("Patient"), subject_rows);
        assert_eq!(count("ResearchSubject"), subject_rows);
        let mut unique = keys.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "keys are unique");

        let study = find(&all, "ResearchStudy", "CARDIO-01");
        assert_eq!(str_at(study, &["identifier", "0", "system"]), TRIAL_SYSTEM);
        assert_eq!(str_at(study, &["phase", "coding", "0", "code"]), "phase-3");
        assert_eq!(str_at(study, &["period", "start"]), "2026-01-01");
        assert_eq!(str_at(study, &["arm", "1", "name"]), "placebo");
        assert_eq!(
            str_at(study, &["extension", "0", "url"]),
            PROTOCOL_VERSION_URL
        );
        assert_eq!(
            at(study, &["extension", "0", "valueInteger"]),
            &Json::Number("3".into())
        );

        let org = find(&all, "Organization", "site-002");
        assert_eq!(str_at(org, &["address", "0", "country"]), "DE");
        assert_eq!(
            str_at(org, &["extension", "0", "valueString"]),
            "Europe/Berlin"
        );

        let q = find(&all, "Questionnaire", "CARDIO-01-daily-diary");
        assert_eq!(
            str_at(q, &["url"]),
            "https://clinflow.dev/fhir/Questionnaire/CARDIO-01/daily-diary"
        );
        let pain = at(q, &["item", "0"]);
        assert_eq!(str_at(pain, &["type"]), "integer");
        assert_eq!(str_at(pain, &["extension", "0", "url"]), MIN_VALUE_URL);
        assert_eq!(
            at(pain, &["extension", "1", "valueInteger"]),
            &Json::Number("10".into())
        );
        assert_eq!(
            at(q, &["item", "3", "maxLength"]),
            &Json::Number("500".into())
        );

        let patient = find(&all, "Patient", "CARDIO-01-0003");
        assert_eq!(
            str_at(patient, &["identifier", "0", "system"]),
            "https://trials.example.org/CARDIO-01/subject"
        );
        assert_eq!(str_at(patient, &["name", "0", "given", "0"]), "Anna");
        assert_eq!(str_at(patient, &["gender"]), "female");
        assert_eq!(str_at(patient, &["telecom", "1", "value"]), "+4930555010");

        let rs = find(&all, "ResearchSubject", "CARDIO-01-0003");
        assert_eq!(
            str_at(rs, &["extension", "0", "url"]),
            RESEARCH_SUBJECT_SITE_URL
        );
        assert_eq!(
            str_at(rs, &["extension", "0", "valueReference", "reference"]),
            "Organization/site-002"
        );
        assert_eq!(
            str_at(rs, &["study", "reference"]),
            "ResearchStudy/CARDIO-01"
        );
        assert_eq!(
            str_at(rs, &["individual", "reference"]),
            "Patient/CARDIO-01-0003"
        );
        assert_eq!(str_at(rs, &["period", "start"]), "2026-02-09");
        assert_eq!(str_at(rs, &["assignedArm"]), "drug-x");
        assert_eq!(str_at(rs, &["status"]), "on-study");
    }

    #[test]
    fn loading_twice_gives_the_same_resources() {
        assert_eq!(reference(), reference());
    }

    #[test]
    fn decimal_items_and_choices_are_valid_fhir_too() {
        let text = PROTOCOL.replace(
            "      - { linkId: notes,",
            "      - { linkId: temp, text: Temperature, type: decimal, range: [35.5, 42] }\n      \
             - { linkId: mood, text: Mood, type: choice, options: [good, bad] }\n      - { linkId: notes,",
        );
        let p = parse_yaml(&text).unwrap();
        let q = questionnaire(&p, &p.questionnaires[0]);
        let (_, issues) = fhirkit::decode_json::<Resource>(&q);
        assert!(
            issues.iter().all(|i| i.severity != Severity::Error),
            "{issues:?}"
        );
        assert_eq!(
            at(&q, &["item", "3", "extension", "0", "valueDecimal"]),
            &Json::Number("35.5".into())
        );
        assert_eq!(
            str_at(&q, &["item", "4", "answerOption", "1", "valueString"]),
            "bad"
        );
    }
}
