//! Search parameters and the index entries a resource yields.
//!
//! The store writes one row per [`IndexEntry`] in the same transaction as the
//! resource version, and answers searches from those rows only.
//!
//! Each parameter follows its R4 `SearchParameter` expression, written as a
//! simple path into the JSON tree (`effectivePeriod`, `participant.actor`);
//! how a node becomes a value depends on the parameter's kind and the node's
//! shape (a CodeableConcept yields one token per coding, a HumanName one
//! string per part, a Period one date range). The table below is the single
//! source of truth for both [`params`] and [`extract`].
//!
//! Extraction runs for every stored version (tens of thousands a second on
//! bulk ingest), so it walks the tree once per parameter, borrows until it
//! must allocate an entry, and uses no regex.

use crate::datetime;
use crate::resource::Resource;
use crate::validate::{is_resource_type, is_valid_id};
use fhirkit::Json;

/// The type of a search parameter, as FHIR defines them (the ones clinflow uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
    Quantity,
}

/// A search parameter clinflow supports for a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamDef {
    /// `code`, `date`, `subject`, ...
    pub name: &'static str,
    pub kind: ParamKind,
}

/// The value of one index row.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// Coding, CodeableConcept, Identifier, code, boolean. `system` is `None`
    /// when the element has none.
    Token {
        system: Option<String>,
        code: String,
    },
    /// Normalised for matching: lower case, accents and punctuation kept.
    String { value: String },
    /// The range of instants the value covers.
    Date { low: i64, high: i64 },
    /// A literal local reference `Type/id`.
    Reference {
        target_type: String,
        target_id: String,
    },
    /// A Quantity's value with its system and code (UCUM for clinflow data).
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
    },
}

/// One index row for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

/// What the store keeps beside a resource version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extracted {
    pub entries: Vec<IndexEntry>,
    /// The id of the Patient whose compartment the resource is in (the
    /// Patient itself, or the target of `subject`/`patient`/`individual`
    /// when it is `Patient/ID`). Site scoping and the `patient` role use it.
    pub patient: Option<String>,
    /// For a ResearchSubject: the site (Organization id) from clinflow's
    /// site extension [`SITE_EXTENSION`].
    pub subject_site: Option<String>,
    /// The value `_sort=date` orders by (low end of the `date` parameter).
    pub sort_date: Option<i64>,
}

/// The extension on ResearchSubject that names the trial site (valueReference
/// `Organization/SITE_ID`). R4's ResearchSubject has no site element.
pub const SITE_EXTENSION: &str =
    "https://clinflow.dev/fhir/StructureDefinition/research-subject-site";

/// The system of a Money's currency when it is searched as a quantity.
const ISO_4217: &str = "urn:iso:std:iso:4217";

/// The search parameters of `resource_type` (besides `_id` and `_lastUpdated`,
/// which every type has).
pub fn params(resource_type: &str) -> &'static [ParamDef] {
    table(resource_type).map_or(&[], |t| t.defs)
}

/// The resource types clinflow indexes for search.
pub fn indexed_types() -> &'static [&'static str] {
    INDEXED_TYPES
}

/// The definition of parameter `name` on `resource_type`, if clinflow supports it.
pub fn param(resource_type: &str, name: &str) -> Option<ParamDef> {
    params(resource_type)
        .iter()
        .find(|d| d.name == name)
        .copied()
}

/// The one resource type a reference parameter can point at, when there is
/// only one (`patient` -> `Patient`, `study` -> `ResearchStudy`); `None` for
/// parameters with several possible targets (`subject`, `actor`) and for
/// anything that is not a reference parameter.
pub fn reference_target(resource_type: &str, name: &str) -> Option<&'static str> {
    table(resource_type)?
        .specs
        .iter()
        .find(|s| s.name == name && s.kind == ParamKind::Reference)?
        .target
}

/// Where a reference parameter's rows are stored when it is another
/// parameter restricted to one target type: `patient` of Observation is
/// `subject` where the target is a Patient, so its rows are `subject`'s
/// (with `target_type = 'Patient'`) and are not written twice. Returns
/// `(stored parameter, target type)`; `None` for parameters with rows of
/// their own.
pub fn reference_alias(resource_type: &str, name: &str) -> Option<(&'static str, &'static str)> {
    let t = table(resource_type)?;
    let spec = t.specs.iter().find(|s| s.name == name)?;
    alias_of(t, spec)
}

fn alias_of(t: &TypeTable, spec: &Spec) -> Option<(&'static str, &'static str)> {
    let How::RefTo(paths, only) = spec.how else {
        return None;
    };
    t.specs
        .iter()
        .find(|o| {
            o.kind == ParamKind::Reference
                && o.target.is_none_or(|target| target == only)
                && matches!(o.how, How::Paths(p) if p == paths)
        })
        .map(|o| (o.name, only))
}

/// Index entries, compartment and sort key of a resource.
pub fn extract(resource: &Resource) -> Extracted {
    let rtype = resource.resource_type();
    let json = resource.json();
    let Some(t) = table(rtype) else {
        return Extracted::default();
    };
    let mut entries = Vec::with_capacity(t.specs.len() + 4);
    for spec in t.specs {
        if alias_of(t, spec).is_none() {
            extract_param(spec, json, &mut entries);
        }
    }
    let patient = if rtype == "Patient" {
        resource.id().map(str::to_string)
    } else {
        compartment_patient(&entries)
    };
    let subject_site = if rtype == "ResearchSubject" {
        site_of(json)
    } else {
        None
    };
    let sort_date = t
        .specs
        .iter()
        .find(|s| s.kind == ParamKind::Date)
        .and_then(|s| {
            entries.iter().find_map(|e| match e.value {
                IndexValue::Date { low, .. } if e.param == s.name && low != i64::MIN => Some(low),
                _ => None,
            })
        });
    Extracted {
        entries,
        patient,
        subject_site,
        sort_date,
    }
}

/// Splits a literal reference into type and id: `Patient/123`, an absolute
/// URL ending in `/Patient/123`, either with `/_history/n` after it.
/// `None` for contained (`#x`), `urn:` (unresolved Bundle entries), conditional
/// (`Patient?identifier=..`) references, unknown types and invalid ids.
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    if reference.starts_with('#') || reference.starts_with("urn:") || reference.contains('?') {
        return None;
    }
    let r = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let (head, id) = r.rsplit_once('/')?;
    let rtype = head.rsplit_once('/').map_or(head, |(_, t)| t);
    (is_resource_type(rtype) && is_valid_id(id)).then_some((rtype, id))
}

/// How a parameter's values are found.
#[derive(Debug, Clone, Copy)]
enum How {
    /// The nodes at these paths, read according to the parameter's kind.
    Paths(&'static [&'static str]),
    /// References at these paths, kept only when they point at this type
    /// (`patient` is `subject.where(resolve() is Patient)`). When another
    /// parameter indexes the same paths, that one's rows serve both and
    /// none are written for this one ([`reference_alias`]).
    RefTo(&'static [&'static str], &'static str),
    /// A `canonical` that is indexed as a reference to this type when it has
    /// the form `[base/]Type/id[|version]`, else as a token (system-less code
    /// = the canonical as written). R4 `QuestionnaireResponse.questionnaire`.
    Canonical(&'static str, &'static str),
    /// One range from the start of the first element to the end of the
    /// second (Appointment `start`..`end`); the first alone if the second is absent.
    StartEnd(&'static str, &'static str),
}

#[derive(Debug)]
struct Spec {
    name: &'static str,
    kind: ParamKind,
    /// For references: the only target type, when there is one.
    target: Option<&'static str>,
    how: How,
}

struct TypeTable {
    defs: &'static [ParamDef],
    specs: &'static [Spec],
}

/// Declares a type's parameters once, as the public [`ParamDef`] list and
/// the private extraction specs, so the two cannot drift apart.
macro_rules! params_of {
    ($name:ident: [$(($p:literal, $kind:ident, $target:expr, $how:expr)),* $(,)?]) => {
        static $name: TypeTable = TypeTable {
            defs: &[$(ParamDef { name: $p, kind: ParamKind::$kind }),*],
            specs: &[$(Spec { name: $p, kind: ParamKind::$kind, target: $target, how: $how }),*],
        };
    };
}

use How::{Canonical, Paths, RefTo, StartEnd};

const IDENTIFIER: &[&str] = &["identifier"];
const SUBJECT: &[&str] = &["subject"];

params_of!(PATIENT: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("name", String, None, Paths(&["name"])),
    ("family", String, None, Paths(&["name.family"])),
    ("given", String, None, Paths(&["name.given"])),
    ("birthdate", Date, None, Paths(&["birthDate"])),
    ("gender", Token, None, Paths(&["gender"])),
    ("address-country", String, None, Paths(&["address.country"])),
]);

params_of!(PRACTITIONER: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("name", String, None, Paths(&["name"])),
    ("family", String, None, Paths(&["name.family"])),
    ("given", String, None, Paths(&["name.given"])),
]);

params_of!(ORGANIZATION: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("name", String, None, Paths(&["name", "alias"])),
    ("address-country", String, None, Paths(&["address.country"])),
]);

params_of!(LOCATION: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("name", String, None, Paths(&["name", "alias"])),
    ("address-country", String, None, Paths(&["address.country"])),
    ("organization", Reference, Some("Organization"), Paths(&["managingOrganization"])),
]);

params_of!(RESEARCH_STUDY: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("title", String, None, Paths(&["title"])),
    ("status", Token, None, Paths(&["status"])),
]);

params_of!(RESEARCH_SUBJECT: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("study", Reference, Some("ResearchStudy"), Paths(&["study"])),
    ("individual", Reference, Some("Patient"), Paths(&["individual"])),
    ("patient", Reference, Some("Patient"), RefTo(&["individual"], "Patient")),
    ("status", Token, None, Paths(&["status"])),
]);

params_of!(QUESTIONNAIRE: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("name", String, None, Paths(&["name"])),
    ("title", String, None, Paths(&["title"])),
    ("status", Token, None, Paths(&["status"])),
]);

params_of!(QUESTIONNAIRE_RESPONSE: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("questionnaire", Reference, Some("Questionnaire"), Canonical("questionnaire", "Questionnaire")),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("authored", Date, None, Paths(&["authored"])),
    ("status", Token, None, Paths(&["status"])),
]);

params_of!(OBSERVATION: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("code", Token, None, Paths(&["code"])),
    ("category", Token, None, Paths(&["category"])),
    ("status", Token, None, Paths(&["status"])),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("date", Date, None, Paths(&["effectiveDateTime", "effectivePeriod", "effectiveInstant"])),
    ("value-quantity", Quantity, None, Paths(&["valueQuantity"])),
    ("encounter", Reference, Some("Encounter"), Paths(&["encounter"])),
]);

// `identifier` is not an R4 search parameter of AdverseEvent; clinflow
// indexes it (its one `identifier`) so that ingest finds an event it
// already stored by its item key, as it does for every other type.
params_of!(ADVERSE_EVENT: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("date", Date, None, Paths(&["date"])),
    ("seriousness", Token, None, Paths(&["seriousness"])),
    ("severity", Token, None, Paths(&["severity"])),
    ("actuality", Token, None, Paths(&["actuality"])),
    ("category", Token, None, Paths(&["category"])),
    ("event", Token, None, Paths(&["event"])),
    ("study", Reference, Some("ResearchStudy"), Paths(&["study"])),
]);

params_of!(APPOINTMENT: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("actor", Reference, None, Paths(&["participant.actor"])),
    ("patient", Reference, Some("Patient"), RefTo(&["participant.actor"], "Patient")),
    ("date", Date, None, StartEnd("start", "end")),
    ("status", Token, None, Paths(&["status"])),
]);

params_of!(ENCOUNTER: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("date", Date, None, Paths(&["period"])),
    ("status", Token, None, Paths(&["status"])),
    ("class", Token, None, Paths(&["class"])),
    ("type", Token, None, Paths(&["type"])),
]);

params_of!(CONDITION: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("code", Token, None, Paths(&["code"])),
    ("category", Token, None, Paths(&["category"])),
    ("clinical-status", Token, None, Paths(&["clinicalStatus"])),
    ("onset-date", Date, None, Paths(&["onsetDateTime", "onsetPeriod"])),
]);

params_of!(DIAGNOSTIC_REPORT: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("code", Token, None, Paths(&["code"])),
    ("category", Token, None, Paths(&["category"])),
    ("status", Token, None, Paths(&["status"])),
    ("date", Date, None, Paths(&["effectiveDateTime", "effectivePeriod"])),
    ("result", Reference, Some("Observation"), Paths(&["result"])),
]);

params_of!(IMAGING_STUDY: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("started", Date, None, Paths(&["started"])),
    ("status", Token, None, Paths(&["status"])),
    ("modality", Token, None, Paths(&["series.modality"])),
]);

// `occurrence` is `occurrence[x]`; of its Timing variant clinflow indexes
// nothing (a schedule has no one range to search or sort by).
params_of!(CHARGE_ITEM: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("code", Token, None, Paths(&["code"])),
    ("occurrence", Date, None, Paths(&["occurrenceDateTime", "occurrencePeriod"])),
    ("entered-date", Date, None, Paths(&["enteredDate"])),
    ("context", Reference, Some("Encounter"), Paths(&["context"])),
]);

// `totalgross` is a Money, searched as a quantity in ISO 4217 (see
// `read_node`): `totalgross=80.00|urn:iso:std:iso:4217|EUR`.
params_of!(INVOICE: [
    ("identifier", Token, None, Paths(IDENTIFIER)),
    ("subject", Reference, None, Paths(SUBJECT)),
    ("patient", Reference, Some("Patient"), RefTo(SUBJECT, "Patient")),
    ("date", Date, None, Paths(&["date"])),
    ("status", Token, None, Paths(&["status"])),
    ("type", Token, None, Paths(&["type"])),
    ("totalgross", Quantity, None, Paths(&["totalGross"])),
]);

static INDEXED_TYPES: &[&str] = &[
    "AdverseEvent",
    "Appointment",
    "ChargeItem",
    "Condition",
    "DiagnosticReport",
    "Encounter",
    "ImagingStudy",
    "Invoice",
    "Location",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Questionnaire",
    "QuestionnaireResponse",
    "ResearchStudy",
    "ResearchSubject",
];

fn table(resource_type: &str) -> Option<&'static TypeTable> {
    Some(match resource_type {
        "AdverseEvent" => &ADVERSE_EVENT,
        "Appointment" => &APPOINTMENT,
        "ChargeItem" => &CHARGE_ITEM,
        "Condition" => &CONDITION,
        "DiagnosticReport" => &DIAGNOSTIC_REPORT,
        "Encounter" => &ENCOUNTER,
        "ImagingStudy" => &IMAGING_STUDY,
        "Invoice" => &INVOICE,
        "Location" => &LOCATION,
        "Observation" => &OBSERVATION,
        "Organization" => &ORGANIZATION,
        "Patient" => &PATIENT,
        "Practitioner" => &PRACTITIONER,
        "Questionnaire" => &QUESTIONNAIRE,
        "QuestionnaireResponse" => &QUESTIONNAIRE_RESPONSE,
        "ResearchStudy" => &RESEARCH_STUDY,
        "ResearchSubject" => &RESEARCH_SUBJECT,
        _ => return None,
    })
}

/// Calls `f` on every node at the dotted `path` below `node`, walking arrays.
fn walk<'a>(node: &'a Json, path: &str, f: &mut dyn FnMut(&'a Json)) {
    let (seg, rest) = path.split_once('.').unwrap_or((path, ""));
    let Some(child) = node.get(seg) else { return };
    let mut visit = |n: &'a Json| {
        if rest.is_empty() {
            f(n)
        } else {
            walk(n, rest, f)
        }
    };
    match child {
        Json::Array(items) => items.iter().for_each(&mut visit),
        other => visit(other),
    }
}

fn extract_param(spec: &Spec, root: &Json, out: &mut Vec<IndexEntry>) {
    let mut push = |value: IndexValue| {
        // Repeated values (the same coding twice) would only bloat the index.
        if !out.iter().any(|e| e.param == spec.name && e.value == value) {
            out.push(IndexEntry {
                param: spec.name,
                value,
            });
        }
    };
    match spec.how {
        Paths(paths) => {
            for path in paths {
                walk(root, path, &mut |node| {
                    read_node(spec.kind, node, &mut push)
                });
            }
        }
        RefTo(paths, only) => {
            for path in paths {
                walk(root, path, &mut |node| {
                    if let Some((t, id)) = reference_of(node) {
                        if t == only {
                            push(reference_value(t, id));
                        }
                    }
                });
            }
        }
        Canonical(path, target) => walk(root, path, &mut |node| {
            let Json::String(canonical) = node else {
                return;
            };
            let unversioned = canonical
                .split_once('|')
                .map_or(canonical.as_str(), |(u, _)| u);
            match parse_reference(unversioned) {
                Some((t, id)) if t == target => push(reference_value(t, id)),
                _ => push(IndexValue::Token {
                    system: None,
                    code: canonical.clone(),
                }),
            }
        }),
        StartEnd(start, end) => {
            let range = |key: &str| {
                root.get(key)
                    .and_then(Json::as_str)
                    .and_then(|s| datetime::parse_range(s).ok())
            };
            if let Some(s) = range(start) {
                let high = range(end).map_or(s.high, |e| e.high.max(s.low));
                push(IndexValue::Date { low: s.low, high });
            }
        }
    }
}

/// Reads one node as the parameter's kind, by its shape.
fn read_node(kind: ParamKind, node: &Json, push: &mut dyn FnMut(IndexValue)) {
    match kind {
        ParamKind::Token => read_tokens(node, push),
        ParamKind::String => match node {
            Json::String(s) => push(string_value(s)),
            // A HumanName: one entry per part.
            Json::Object(_) => {
                for key in ["text", "family", "given"] {
                    match node.get(key) {
                        Some(Json::String(s)) => push(string_value(s)),
                        Some(Json::Array(parts)) => parts
                            .iter()
                            .filter_map(Json::as_str)
                            .for_each(|s| push(string_value(s))),
                        _ => {}
                    }
                }
            }
            _ => {}
        },
        ParamKind::Date => match node {
            Json::String(s) => {
                if let Ok(r) = datetime::parse_range(s) {
                    push(IndexValue::Date {
                        low: r.low,
                        high: r.high,
                    });
                }
            }
            // A Period; a missing end means ongoing, a missing start unknown.
            Json::Object(_) => {
                let bound = |k: &str| {
                    node.get(k)
                        .and_then(Json::as_str)
                        .and_then(|s| datetime::parse_range(s).ok())
                };
                let (start, end) = (bound("start"), bound("end"));
                if start.is_some() || end.is_some() {
                    push(IndexValue::Date {
                        low: start.map_or(i64::MIN, |r| r.low),
                        high: end.map_or(i64::MAX, |r| r.high),
                    });
                }
            }
            _ => {}
        },
        ParamKind::Reference => {
            if let Some((t, id)) = reference_of(node) {
                push(reference_value(t, id));
            }
        }
        ParamKind::Quantity => {
            let value = match node.get("value") {
                Some(Json::Number(n)) => n.parse::<f64>().ok().filter(|v| v.is_finite()),
                _ => None,
            };
            if let Some(value) = value {
                let text = |k: &str| node.get(k).and_then(Json::as_str).map(str::to_string);
                // A Money (`value`, `currency`) is the quantity of its
                // currency in ISO 4217, as R4's MoneyQuantity has it.
                let (system, code) = match text("currency") {
                    Some(currency) if node.get("code").is_none() => {
                        (Some(ISO_4217.to_string()), Some(currency))
                    }
                    _ => (text("system"), text("code")),
                };
                push(IndexValue::Quantity {
                    value,
                    system,
                    code,
                });
            }
        }
    }
}

/// Tokens by shape: a CodeableConcept (`coding`), a Coding (`code`), an
/// Identifier (`value`), or a primitive code/string/boolean.
fn read_tokens(node: &Json, push: &mut dyn FnMut(IndexValue)) {
    let token = |system: Option<&Json>, code: &str| IndexValue::Token {
        system: system.and_then(Json::as_str).map(str::to_string),
        code: code.to_string(),
    };
    match node {
        Json::String(s) => push(token(None, s)),
        Json::Bool(b) => push(token(None, if *b { "true" } else { "false" })),
        Json::Object(_) => {
            if let Some(codings) = node.get("coding") {
                let one = |c: &Json, push: &mut dyn FnMut(IndexValue)| {
                    if let Some(code) = c.get("code").and_then(Json::as_str) {
                        push(token(c.get("system"), code));
                    }
                };
                match codings {
                    Json::Array(cs) => cs.iter().for_each(|c| one(c, push)),
                    other => one(other, push),
                }
            } else if let Some(code) = node.get("code").and_then(Json::as_str) {
                push(token(node.get("system"), code));
            } else if let Some(value) = node.get("value").and_then(Json::as_str) {
                push(token(node.get("system"), value));
            }
        }
        _ => {}
    }
}

fn string_value(s: &str) -> IndexValue {
    IndexValue::String {
        value: normalise_string(s),
    }
}

/// How string values are normalised for matching, in the index and in
/// search values alike: lower case, Unicode-aware (accents and punctuation
/// kept). ASCII, the common case, skips the general-purpose path.
pub fn normalise_string(s: &str) -> String {
    if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        s.to_lowercase()
    }
}

/// Whether `name` on `resource_type` is a canonical indexed as a reference
/// when it looks like one and as a token otherwise (see `How::Canonical`).
pub(crate) fn is_canonical(resource_type: &str, name: &str) -> bool {
    table(resource_type).is_some_and(|t| {
        t.specs
            .iter()
            .any(|s| s.name == name && matches!(s.how, How::Canonical(..)))
    })
}

fn reference_of(node: &Json) -> Option<(&str, &str)> {
    parse_reference(node.get("reference")?.as_str()?)
}

fn reference_value(t: &str, id: &str) -> IndexValue {
    IndexValue::Reference {
        target_type: t.to_string(),
        target_id: id.to_string(),
    }
}

/// The Patient whose compartment the resource is in: the first Patient
/// reference among its compartment parameters, in R4's order of preference.
fn compartment_patient(entries: &[IndexEntry]) -> Option<String> {
    ["patient", "subject", "individual", "actor"]
        .iter()
        .find_map(|p| {
            entries.iter().find_map(|e| match &e.value {
                IndexValue::Reference {
                    target_type,
                    target_id,
                } if e.param == *p && target_type == "Patient" => Some(target_id.clone()),
                _ => None,
            })
        })
}

/// The site Organization id of a ResearchSubject, from [`SITE_EXTENSION`].
fn site_of(json: &Json) -> Option<String> {
    let Some(Json::Array(exts)) = json.get("extension") else {
        return None;
    };
    exts.iter()
        .filter(|e| e.get("url").and_then(Json::as_str) == Some(SITE_EXTENSION))
        .find_map(|e| match reference_of(e.get("valueReference")?)? {
            ("Organization", id) => Some(id.to_string()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::parse_resource;
    use proptest::prelude::*;

    fn extract_text(text: &str) -> Extracted {
        let r = parse_resource(text, None).unwrap_or_else(|o| panic!("{o}"));
        extract(&r)
    }

    fn entries(x: &Extracted, param: &str) -> Vec<IndexValue> {
        x.entries
            .iter()
            .filter(|e| e.param == param)
            .map(|e| e.value.clone())
            .collect()
    }

    fn tok(system: Option<&str>, code: &str) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        }
    }

    fn s(v: &str) -> IndexValue {
        IndexValue::String { value: v.into() }
    }

    fn rf(t: &str, id: &str) -> IndexValue {
        IndexValue::Reference {
            target_type: t.into(),
            target_id: id.into(),
        }
    }

    fn date(low: &str, high: &str) -> IndexValue {
        let l = datetime::parse_range(low).unwrap().low;
        let h = datetime::parse_range(high).unwrap().high;
        IndexValue::Date { low: l, high: h }
    }

    #[test]
    fn tables_are_consistent() {
        let mut seen = Vec::new();
        for t in indexed_types() {
            let table = table(t).unwrap();
            assert!(crate::validate::is_resource_type(t));
            assert_eq!(params(t).len(), table.specs.len());
            for (d, s) in table.defs.iter().zip(table.specs) {
                assert_eq!((d.name, d.kind), (s.name, s.kind));
                assert!(!seen.contains(&(t, d.name)), "{t}.{} twice", d.name);
                seen.push((t, d.name));
                if let Some(target) = s.target {
                    assert!(crate::validate::is_resource_type(target));
                    assert_eq!(s.kind, ParamKind::Reference);
                }
            }
        }
        assert!(params("Bundle").is_empty());
        assert_eq!(reference_target("Observation", "patient"), Some("Patient"));
        assert_eq!(reference_target("Observation", "subject"), None);
        assert_eq!(reference_target("Observation", "code"), None);
    }

    #[test]
    fn observation_from_the_load_client() {
        let x = extract_text(
            r#"{"resourceType":"Observation","id":"o1","status":"final",
            "identifier":[{"system":"urn:ietf:rfc:3986","value":"urn:uuid:1"}],
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
            "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"},{"system":"http://loinc.org","code":"8867-4"},{"code":"hr"}],"text":"Heart rate"},
            "subject":{"reference":"Patient/p1"},
            "encounter":{"reference":"https://ehr.example.org/fhir/Encounter/e1/_history/2"},
            "effectiveDateTime":"2026-03-01T08:00:00+01:00",
            "valueQuantity":{"value":72.50,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"},
            "device":{"display":"watch-1"}}"#,
        );
        assert_eq!(
            entries(&x, "code"),
            [tok(Some("http://loinc.org"), "8867-4"), tok(None, "hr")],
            "one entry per distinct coding"
        );
        assert_eq!(
            entries(&x, "category"),
            [tok(
                Some("http://terminology.hl7.org/CodeSystem/observation-category"),
                "vital-signs"
            )]
        );
        assert_eq!(entries(&x, "status"), [tok(None, "final")]);
        assert_eq!(
            entries(&x, "identifier"),
            [tok(Some("urn:ietf:rfc:3986"), "urn:uuid:1")]
        );
        assert_eq!(entries(&x, "subject"), [rf("Patient", "p1")]);
        // `patient` is `subject` restricted to Patients: read from its rows.
        assert!(entries(&x, "patient").is_empty());
        assert_eq!(
            reference_alias("Observation", "patient"),
            Some(("subject", "Patient"))
        );
        assert_eq!(reference_alias("Observation", "subject"), None);
        assert_eq!(entries(&x, "encounter"), [rf("Encounter", "e1")]);
        let d = date("2026-03-01T07:00:00Z", "2026-03-01T07:00:00Z");
        assert_eq!(entries(&x, "date"), std::slice::from_ref(&d));
        assert_eq!(
            entries(&x, "value-quantity"),
            [IndexValue::Quantity {
                value: 72.5,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("/min".into())
            }]
        );
        assert_eq!(x.patient.as_deref(), Some("p1"));
        let IndexValue::Date { low, .. } = d else {
            unreachable!()
        };
        assert_eq!(x.sort_date, Some(low));
        assert_eq!(x.subject_site, None);
    }

    #[test]
    fn observation_about_a_group_is_in_no_patient_compartment() {
        let x = extract_text(
            r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"Group/g1"},"effectivePeriod":{"start":"2026-03"},
            "encounter":{"reference":"#contained"}}"##,
        );
        assert_eq!(entries(&x, "subject"), [rf("Group", "g1")]);
        assert!(entries(&x, "patient").is_empty());
        assert!(entries(&x, "encounter").is_empty());
        assert_eq!(x.patient, None);
        let low = datetime::parse_range("2026-03").unwrap().low;
        assert_eq!(
            entries(&x, "date"),
            [IndexValue::Date {
                low,
                high: i64::MAX
            }]
        );
        assert_eq!(x.sort_date, Some(low));
    }

    #[test]
    fn patient_names_and_own_compartment() {
        let mut r = parse_resource(
            r#"{"resourceType":"Patient","identifier":[{"system":"https://trials.example.org/CARDIO-01/subject","value":"CARDIO-01-0001"}],
            "name":[{"text":"Ana Müller","family":"Müller","given":["Ana","Lucía"]},{"family":"SMITH"}],
            "gender":"female","birthDate":"1970-05","address":[{"country":"DE"}]}"#,
            Some("Patient"),
        )
        .unwrap();
        r.set_id("p1");
        let x = extract(&r);
        assert_eq!(x.patient.as_deref(), Some("p1"));
        assert_eq!(
            entries(&x, "name"),
            [
                s("ana müller"),
                s("müller"),
                s("ana"),
                s("lucía"),
                s("smith")
            ]
        );
        assert_eq!(entries(&x, "family"), [s("müller"), s("smith")]);
        assert_eq!(entries(&x, "given"), [s("ana"), s("lucía")]);
        assert_eq!(entries(&x, "gender"), [tok(None, "female")]);
        assert_eq!(entries(&x, "address-country"), [s("de")]);
        assert_eq!(entries(&x, "birthdate"), [date("1970-05", "1970-05")]);
        assert_eq!(
            x.sort_date,
            Some(datetime::parse_range("1970-05").unwrap().low)
        );
    }

    #[test]
    fn research_subject_site_and_patient() {
        let x = extract_text(&format!(
            r#"{{"resourceType":"ResearchSubject","status":"on-study",
            "extension":[{{"url":"http://other","valueString":"x"}},{{"url":"{SITE_EXTENSION}","valueReference":{{"reference":"Organization/site-01"}}}}],
            "identifier":[{{"value":"CARDIO-01-0001"}}],
            "study":{{"reference":"ResearchStudy/cardio-01"}},"individual":{{"reference":"Patient/p1"}}}}"#
        ));
        assert_eq!(x.subject_site.as_deref(), Some("site-01"));
        assert_eq!(x.patient.as_deref(), Some("p1"));
        assert_eq!(entries(&x, "study"), [rf("ResearchStudy", "cardio-01")]);
        assert_eq!(entries(&x, "individual"), [rf("Patient", "p1")]);
        assert!(entries(&x, "patient").is_empty());
        assert_eq!(
            reference_alias("ResearchSubject", "patient"),
            Some(("individual", "Patient"))
        );
        assert_eq!(entries(&x, "status"), [tok(None, "on-study")]);
        assert_eq!(entries(&x, "identifier"), [tok(None, "CARDIO-01-0001")]);
        assert_eq!(x.sort_date, None);
    }

    #[test]
    fn questionnaire_response_canonicals() {
        let base = r#"{"resourceType":"QuestionnaireResponse","status":"completed","subject":{"reference":"Patient/p4"},"authored":"2026-03-02T20:45:00+01:00","questionnaire":"#;
        let x = extract_text(&format!(r#"{base}"Questionnaire/daily-diary"}}"#));
        assert_eq!(
            entries(&x, "questionnaire"),
            [rf("Questionnaire", "daily-diary")]
        );
        assert_eq!(x.patient.as_deref(), Some("p4"));
        assert_eq!(
            entries(&x, "authored"),
            [date("2026-03-02T19:45:00Z", "2026-03-02T19:45:00Z")]
        );
        let x = extract_text(&format!(
            r#"{base}"https://trials.example.org/fhir/Questionnaire/daily-diary|2"}}"#
        ));
        assert_eq!(
            entries(&x, "questionnaire"),
            [rf("Questionnaire", "daily-diary")]
        );
        let x = extract_text(&format!(
            r#"{base}"https://trials.example.org/q/diary|2"}}"#
        ));
        assert_eq!(
            entries(&x, "questionnaire"),
            [tok(None, "https://trials.example.org/q/diary|2")]
        );
    }

    #[test]
    fn appointment_actors_and_range() {
        let x = extract_text(
            r#"{"resourceType":"Appointment","status":"booked","start":"2026-03-16T09:00:00+08:00","end":"2026-03-16T10:00:00+08:00",
            "participant":[{"actor":{"reference":"Practitioner/dr"},"status":"accepted"},{"actor":{"reference":"Patient/p6"},"status":"accepted"}]}"#,
        );
        assert_eq!(
            entries(&x, "actor"),
            [rf("Practitioner", "dr"), rf("Patient", "p6")]
        );
        assert!(entries(&x, "patient").is_empty());
        assert_eq!(
            reference_alias("Appointment", "patient"),
            Some(("actor", "Patient"))
        );
        assert_eq!(x.patient.as_deref(), Some("p6"));
        assert_eq!(
            entries(&x, "date"),
            [date("2026-03-16T01:00:00Z", "2026-03-16T02:00:00Z")]
        );
        assert_eq!(entries(&x, "status"), [tok(None, "booked")]);
    }

    #[test]
    fn adverse_event_from_the_reference_trial() {
        let x = extract_text(
            r#"{"resourceType":"AdverseEvent","actuality":"actual",
            "event":{"coding":[{"system":"http://snomed.info/sct","code":"404640003","display":"Dizziness"}]},
            "subject":{"reference":"Patient/p6"},"date":"2026-03-02T14:30:00+08:00",
            "seriousness":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/adverse-event-seriousness","code":"non-serious"}]},
            "severity":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/adverse-event-severity","code":"mild"}]},
            "study":[{"reference":"ResearchStudy/cardio-01"}]}"#,
        );
        assert_eq!(x.patient.as_deref(), Some("p6"));
        assert_eq!(entries(&x, "actuality"), [tok(None, "actual")]);
        assert_eq!(
            entries(&x, "event"),
            [tok(Some("http://snomed.info/sct"), "404640003")]
        );
        assert_eq!(entries(&x, "study"), [rf("ResearchStudy", "cardio-01")]);
        assert_eq!(entries(&x, "severity").len(), 1);
        assert_eq!(entries(&x, "seriousness").len(), 1);
        assert!(x.sort_date.is_some());
    }

    #[test]
    fn encounter_condition_report_and_imaging() {
        let x = extract_text(
            r#"{"resourceType":"Encounter","status":"finished",
            "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},
            "type":[{"coding":[{"system":"http://snomed.info/sct","code":"185349003"}]}],
            "subject":{"reference":"Patient/p1"},"period":{"start":"2026-03-02T09:00:00Z","end":"2026-03-02T09:30:00Z"}}"#,
        );
        assert_eq!(
            entries(&x, "class"),
            [tok(
                Some("http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                "AMB"
            )]
        );
        assert_eq!(entries(&x, "type").len(), 1);
        assert_eq!(
            entries(&x, "date"),
            [date("2026-03-02T09:00:00Z", "2026-03-02T09:30:00Z")]
        );
        assert_eq!(x.patient.as_deref(), Some("p1"));

        let x = extract_text(
            r#"{"resourceType":"Condition","clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"active"}]},
            "code":{"coding":[{"system":"http://snomed.info/sct","code":"38341003"}]},"subject":{"reference":"Patient/p2"},
            "onsetDateTime":"2019"}"#,
        );
        assert_eq!(
            entries(&x, "clinical-status"),
            [tok(
                Some("http://terminology.hl7.org/CodeSystem/condition-clinical"),
                "active"
            )]
        );
        assert_eq!(entries(&x, "onset-date"), [date("2019", "2019")]);
        assert_eq!(x.patient.as_deref(), Some("p2"));

        let x = extract_text(
            r#"{"resourceType":"DiagnosticReport","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"58410-2"}]},
            "subject":{"reference":"Patient/p3"},"effectivePeriod":{"end":"2026-03-02"},
            "result":[{"reference":"Observation/o1"},{"reference":"Observation/o2"},{"reference":"urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7"}]}"#,
        );
        assert_eq!(
            entries(&x, "result"),
            [rf("Observation", "o1"), rf("Observation", "o2")]
        );
        let high = datetime::parse_range("2026-03-02").unwrap().high;
        assert_eq!(
            entries(&x, "date"),
            [IndexValue::Date {
                low: i64::MIN,
                high
            }]
        );
        assert_eq!(x.sort_date, None, "an open start does not sort");

        let x = extract_text(
            r#"{"resourceType":"ImagingStudy","status":"available","subject":{"reference":"Patient/p1"},"started":"2026-03-02T10:00:00Z",
            "series":[{"uid":"1.2.3","modality":{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"CT"}},
                      {"uid":"1.2.4","modality":{"system":"http://dicom.nema.org/resources/ontology/DCM","code":"MR"}}]}"#,
        );
        assert_eq!(entries(&x, "modality").len(), 2);
        assert_eq!(entries(&x, "started").len(), 1);
    }

    #[test]
    fn charge_items_sort_by_occurrence_in_the_patients_compartment() {
        let x = extract_text(
            r#"{"resourceType":"ChargeItem","status":"billable",
            "identifier":[{"system":"https://billing.example.org/charge","value":"c-1"}],
            "code":{"coding":[{"system":"https://clinflow.dev/fhir/CodeSystem/charge","code":"lab-glucose"},{"system":"http://loinc.org","code":"2345-7"}]},
            "subject":{"reference":"Patient/p1"},"context":{"reference":"Encounter/e1"},
            "occurrenceDateTime":"2026-03-02T10:00:00+01:00","enteredDate":"2026-03-02T18:00:00Z",
            "priceOverride":{"value":12.50,"currency":"EUR"}}"#,
        );
        assert_eq!(x.patient.as_deref(), Some("p1"));
        assert_eq!(entries(&x, "subject"), [rf("Patient", "p1")]);
        assert!(entries(&x, "patient").is_empty());
        assert_eq!(
            reference_alias("ChargeItem", "patient"),
            Some(("subject", "Patient"))
        );
        assert_eq!(reference_target("ChargeItem", "context"), Some("Encounter"));
        assert_eq!(entries(&x, "context"), [rf("Encounter", "e1")]);
        assert_eq!(
            entries(&x, "code"),
            [
                tok(
                    Some("https://clinflow.dev/fhir/CodeSystem/charge"),
                    "lab-glucose"
                ),
                tok(Some("http://loinc.org"), "2345-7")
            ]
        );
        assert_eq!(
            entries(&x, "identifier"),
            [tok(Some("https://billing.example.org/charge"), "c-1")]
        );
        let occurred = date("2026-03-02T09:00:00Z", "2026-03-02T09:00:00Z");
        assert_eq!(entries(&x, "occurrence"), std::slice::from_ref(&occurred));
        assert_eq!(
            entries(&x, "entered-date"),
            [date("2026-03-02T18:00:00Z", "2026-03-02T18:00:00Z")]
        );
        // The first date parameter, occurrence, not entered-date.
        let IndexValue::Date { low, .. } = occurred else {
            unreachable!()
        };
        assert_eq!(x.sort_date, Some(low));

        // A Period occurrence; without one, entered-date does not sort.
        let x = extract_text(
            r#"{"resourceType":"ChargeItem","status":"billed","code":{"text":"x"},"subject":{"reference":"Patient/p2"},
            "occurrencePeriod":{"start":"2026-03-01","end":"2026-03-05"}}"#,
        );
        assert_eq!(
            entries(&x, "occurrence"),
            [date("2026-03-01", "2026-03-05")]
        );
        assert_eq!(
            x.sort_date,
            Some(datetime::parse_range("2026-03-01").unwrap().low)
        );
        let x = extract_text(
            r#"{"resourceType":"ChargeItem","status":"billed","code":{"text":"x"},"subject":{"reference":"Group/g1"},
            "enteredDate":"2026-03-01"}"#,
        );
        assert_eq!(x.sort_date, None);
        assert_eq!(
            x.patient, None,
            "a Group's charge is in no patient's compartment"
        );
    }

    #[test]
    fn invoices_sort_by_date_and_total_as_iso_4217_quantities() {
        let x = extract_text(
            r#"{"resourceType":"Invoice","status":"issued",
            "type":{"coding":[{"system":"https://billing.example.org/invoice-type","code":"visit"}]},
            "subject":{"reference":"Patient/p1"},"date":"2026-03-04",
            "lineItem":[{"sequence":1,"chargeItemReference":{"reference":"ChargeItem/c1"},
                "priceComponent":[{"type":"base","amount":{"value":80.00,"currency":"EUR"}}]},
                {"sequence":2,"chargeItemReference":{"reference":"ChargeItem/c2"},
                "priceComponent":[{"type":"base","amount":{"value":12.50,"currency":"EUR"}}]}],
            "totalNet":{"value":92.50,"currency":"EUR"},"totalGross":{"value":92.50,"currency":"EUR"}}"#,
        );
        assert_eq!(x.patient.as_deref(), Some("p1"));
        assert_eq!(
            reference_alias("Invoice", "patient"),
            Some(("subject", "Patient"))
        );
        assert_eq!(entries(&x, "status"), [tok(None, "issued")]);
        assert_eq!(
            entries(&x, "type"),
            [tok(
                Some("https://billing.example.org/invoice-type"),
                "visit"
            )]
        );
        assert_eq!(entries(&x, "date"), [date("2026-03-04", "2026-03-04")]);
        assert_eq!(
            x.sort_date,
            Some(datetime::parse_range("2026-03-04").unwrap().low)
        );
        assert_eq!(
            entries(&x, "totalgross"),
            [IndexValue::Quantity {
                value: 92.5,
                system: Some(ISO_4217.into()),
                code: Some("EUR".into())
            }]
        );
    }

    #[test]
    fn organizations_locations_and_studies() {
        let x = extract_text(
            r#"{"resourceType":"Organization","name":"Charité Site","alias":["CHA"],"address":[{"country":"DE"}]}"#,
        );
        assert_eq!(entries(&x, "name"), [s("charité site"), s("cha")]);
        assert_eq!(entries(&x, "address-country"), [s("de")]);
        let x = extract_text(
            r#"{"resourceType":"Location","name":"Ward 3","address":{"country":"SG"},"managingOrganization":{"reference":"Organization/site-03"}}"#,
        );
        assert_eq!(entries(&x, "organization"), [rf("Organization", "site-03")]);
        assert_eq!(entries(&x, "address-country"), [s("sg")]);
        let x = extract_text(
            r#"{"resourceType":"ResearchStudy","status":"active","title":"CARDIO-01"}"#,
        );
        assert_eq!(entries(&x, "title"), [s("cardio-01")]);
        let x = extract_text(
            r#"{"resourceType":"Questionnaire","status":"active","name":"DailyDiary","title":"Daily diary"}"#,
        );
        assert_eq!(entries(&x, "name"), [s("dailydiary")]);
        assert_eq!(entries(&x, "title"), [s("daily diary")]);
        let x = extract_text(
            r#"{"resourceType":"Practitioner","name":[{"family":"Ng","given":["Wei"]}]}"#,
        );
        assert_eq!(entries(&x, "name"), [s("ng"), s("wei")]);
        let x = extract_text(r#"{"resourceType":"Bundle","type":"collection"}"#);
        assert_eq!(x, Extracted::default());
    }

    #[test]
    fn references_are_parsed_strictly() {
        assert_eq!(parse_reference("Patient/1"), Some(("Patient", "1")));
        assert_eq!(
            parse_reference("Patient/1/_history/3"),
            Some(("Patient", "1"))
        );
        assert_eq!(
            parse_reference("https://h.example/fhir/Patient/a.b-1"),
            Some(("Patient", "a.b-1"))
        );
        for bad in [
            "#p1",
            "urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7",
            "Patient?identifier=x|y",
            "Patient/",
            "patient/1",
            "Patient/a_b",
            "1",
            "",
            "/",
        ] {
            assert_eq!(parse_reference(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn extraction_never_panics_on_any_tree(
            rt in prop::sample::select(INDEXED_TYPES.to_vec()),
            text in "\\PC{0,12}",
            n in "-?[1-9][0-9]{0,400}(\\.[0-9]{1,5})?(e[0-9]{1,4})?",
        ) {
            // Shapes validation would reject, straight into the extractor.
            let json = Json::parse(&format!(
                r#"{{"resourceType":"{rt}","id":{t},"code":[[{{"coding":{{"code":{t}}}}}]],"subject":[{t},{{"reference":{t}}}],
                "effectivePeriod":{t},"valueQuantity":{{"value":{n}}},"name":[{t},{{"given":{t}}}],"start":{t},"end":"2026",
                "questionnaire":{t},"extension":[{{"url":"{SITE_EXTENSION}","valueReference":{{"reference":{t}}}}}],
                "participant":[{{"actor":{{"reference":{t}}}}}],"identifier":{{"value":true}},"status":false}}"#,
                t = Json::String(text.clone()).to_compact(),
            )).unwrap();
            let r = Resource::from_validated(rt.to_string(), json);
            let _ = extract(&r);
        }
    }
}
