//! Required value-set bindings and calendar checks that `fhirkit` does not make.
//!
//! `fhirkit` checks that a `code` is lexically a code, not that it is one of
//! the codes its required binding allows; clinflow's store, search and
//! dashboards rely on those codes (`Observation.status=final`), so the ones
//! it uses are checked here, from one table. Values are the R4 (4.0.1)
//! value sets. Likewise `fhirkit` accepts `2026-02-30` (the R4 regex does);
//! the date elements clinflow indexes must be real dates, or search would
//! silently miss them.
//!
//! Paths in [`BINDINGS`] start with the resource type; each segment is an
//! element name, arrays are walked transparently, and a segment ending in
//! `*` also matches itself nested at any depth (`Questionnaire.item*.type`
//! reaches `item.item.type`).

use crate::datetime;
use crate::outcome::IssueCode;
use fhirkit::Json;
use std::fmt::Write as _;

/// What a bound element must hold.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rule {
    /// A `code` element whose value must be one of these.
    Code(&'static [&'static str]),
    /// A CodeableConcept bound (required) to the codes of one code system:
    /// it needs a coding from `system`, and every coding from `system`
    /// must use one of `codes`.
    Concept {
        system: &'static str,
        codes: &'static [&'static str],
    },
    /// A date, dateTime or instant that must name a real calendar date and
    /// time (days in month, leap years, zone range).
    Date,
    /// A Period whose `start` must not be after its `end` (R4 invariant
    /// `per-1`); an inverted range would never match a date search.
    Period,
}

/// One checked element.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding {
    pub path: &'static str,
    pub rule: Rule,
}

const ADMINISTRATIVE_GENDER: &[&str] = &["male", "female", "other", "unknown"];
const PUBLICATION_STATUS: &[&str] = &["draft", "active", "retired", "unknown"];
const OBSERVATION_STATUS: &[&str] = &[
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const DIAGNOSTIC_REPORT_STATUS: &[&str] = &[
    "registered",
    "partial",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "appended",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const APPOINTMENT_STATUS: &[&str] = &[
    "proposed",
    "pending",
    "booked",
    "arrived",
    "fulfilled",
    "cancelled",
    "noshow",
    "entered-in-error",
    "checked-in",
    "waitlist",
];
const ENCOUNTER_STATUS: &[&str] = &[
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const RESEARCH_SUBJECT_STATUS: &[&str] = &[
    "candidate",
    "eligible",
    "follow-up",
    "ineligible",
    "not-registered",
    "off-study",
    "on-study",
    "on-study-intervention",
    "on-study-observation",
    "pending-on-study",
    "potential-candidate",
    "screening",
    "withdrawn",
];
const RESEARCH_STUDY_STATUS: &[&str] = &[
    "active",
    "administratively-completed",
    "approved",
    "closed-to-accrual",
    "closed-to-accrual-and-intervention",
    "completed",
    "disapproved",
    "in-review",
    "temporarily-closed-to-accrual",
    "temporarily-closed-to-accrual-and-intervention",
    "withdrawn",
];
const QUESTIONNAIRE_RESPONSE_STATUS: &[&str] = &[
    "in-progress",
    "completed",
    "amended",
    "entered-in-error",
    "stopped",
];
const QUESTIONNAIRE_ITEM_TYPE: &[&str] = &[
    "group",
    "display",
    "boolean",
    "decimal",
    "integer",
    "date",
    "dateTime",
    "time",
    "string",
    "text",
    "url",
    "choice",
    "open-choice",
    "attachment",
    "reference",
    "quantity",
];
const IMAGING_STUDY_STATUS: &[&str] = &[
    "registered",
    "available",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const QUANTITY_COMPARATOR: &[&str] = &["<", "<=", ">=", ">"];
const CHARGE_ITEM_STATUS: &[&str] = &[
    "planned",
    "billable",
    "not-billable",
    "aborted",
    "billed",
    "entered-in-error",
    "unknown",
];
const INVOICE_STATUS: &[&str] = &[
    "draft",
    "issued",
    "balanced",
    "cancelled",
    "entered-in-error",
];
const INVOICE_PRICE_COMPONENT_TYPE: &[&str] = &[
    "base",
    "surcharge",
    "deduction",
    "discount",
    "tax",
    "informational",
];

/// Every checked element. R4 binding strength `required` for all codes.
///
/// Keep the `Date` and `Period` entries in step with the date parameters
/// of `index`: those are the values search depends on.
pub(crate) static BINDINGS: &[Binding] = &[
    // Patient, Practitioner
    b("Patient.gender", Rule::Code(ADMINISTRATIVE_GENDER)),
    b("Patient.contact.gender", Rule::Code(ADMINISTRATIVE_GENDER)),
    b(
        "Patient.link.type",
        Rule::Code(&["replaced-by", "replaces", "refer", "seealso"]),
    ),
    b("Patient.birthDate", Rule::Date),
    b("Practitioner.gender", Rule::Code(ADMINISTRATIVE_GENDER)),
    b("Practitioner.birthDate", Rule::Date),
    // Location
    b(
        "Location.status",
        Rule::Code(&["active", "suspended", "inactive"]),
    ),
    b("Location.mode", Rule::Code(&["instance", "kind"])),
    // Observation
    b("Observation.status", Rule::Code(OBSERVATION_STATUS)),
    b(
        "Observation.valueQuantity.comparator",
        Rule::Code(QUANTITY_COMPARATOR),
    ),
    b(
        "Observation.component.valueQuantity.comparator",
        Rule::Code(QUANTITY_COMPARATOR),
    ),
    b("Observation.effectiveDateTime", Rule::Date),
    b("Observation.effectiveInstant", Rule::Date),
    b("Observation.effectivePeriod.start", Rule::Date),
    b("Observation.effectivePeriod.end", Rule::Date),
    b("Observation.effectivePeriod", Rule::Period),
    b("Observation.issued", Rule::Date),
    // DiagnosticReport
    b(
        "DiagnosticReport.status",
        Rule::Code(DIAGNOSTIC_REPORT_STATUS),
    ),
    b("DiagnosticReport.effectiveDateTime", Rule::Date),
    b("DiagnosticReport.effectivePeriod.start", Rule::Date),
    b("DiagnosticReport.effectivePeriod.end", Rule::Date),
    b("DiagnosticReport.effectivePeriod", Rule::Period),
    // AdverseEvent
    b(
        "AdverseEvent.actuality",
        Rule::Code(&["actual", "potential"]),
    ),
    b(
        "AdverseEvent.severity",
        Rule::Concept {
            system: "http://terminology.hl7.org/CodeSystem/adverse-event-severity",
            codes: &["mild", "moderate", "severe"],
        },
    ),
    b(
        "AdverseEvent.outcome",
        Rule::Concept {
            system: "http://terminology.hl7.org/CodeSystem/adverse-event-outcome",
            codes: &[
                "resolved",
                "recovering",
                "ongoing",
                "resolvedWithSequelae",
                "fatal",
                "unknown",
            ],
        },
    ),
    b("AdverseEvent.date", Rule::Date),
    b("AdverseEvent.detected", Rule::Date),
    b("AdverseEvent.recordedDate", Rule::Date),
    // Appointment
    b("Appointment.status", Rule::Code(APPOINTMENT_STATUS)),
    b(
        "Appointment.participant.required",
        Rule::Code(&["required", "optional", "information-only"]),
    ),
    b(
        "Appointment.participant.status",
        Rule::Code(&["accepted", "declined", "tentative", "needs-action"]),
    ),
    b("Appointment.start", Rule::Date),
    b("Appointment.end", Rule::Date),
    // Encounter
    b("Encounter.status", Rule::Code(ENCOUNTER_STATUS)),
    b(
        "Encounter.statusHistory.status",
        Rule::Code(ENCOUNTER_STATUS),
    ),
    b(
        "Encounter.location.status",
        Rule::Code(&["planned", "active", "reserved", "completed"]),
    ),
    b("Encounter.period.start", Rule::Date),
    b("Encounter.period.end", Rule::Date),
    b("Encounter.period", Rule::Period),
    // Condition
    b(
        "Condition.clinicalStatus",
        Rule::Concept {
            system: "http://terminology.hl7.org/CodeSystem/condition-clinical",
            codes: &[
                "active",
                "recurrence",
                "relapse",
                "inactive",
                "remission",
                "resolved",
            ],
        },
    ),
    b(
        "Condition.verificationStatus",
        Rule::Concept {
            system: "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            codes: &[
                "unconfirmed",
                "provisional",
                "differential",
                "confirmed",
                "refuted",
                "entered-in-error",
            ],
        },
    ),
    b("Condition.onsetDateTime", Rule::Date),
    b("Condition.onsetPeriod.start", Rule::Date),
    b("Condition.onsetPeriod.end", Rule::Date),
    b("Condition.onsetPeriod", Rule::Period),
    b("Condition.recordedDate", Rule::Date),
    // ImagingStudy
    b("ImagingStudy.status", Rule::Code(IMAGING_STUDY_STATUS)),
    b("ImagingStudy.started", Rule::Date),
    // ChargeItem, Invoice
    b("ChargeItem.status", Rule::Code(CHARGE_ITEM_STATUS)),
    b("ChargeItem.occurrenceDateTime", Rule::Date),
    b("ChargeItem.occurrencePeriod.start", Rule::Date),
    b("ChargeItem.occurrencePeriod.end", Rule::Date),
    b("ChargeItem.occurrencePeriod", Rule::Period),
    b("ChargeItem.enteredDate", Rule::Date),
    b("Invoice.status", Rule::Code(INVOICE_STATUS)),
    b("Invoice.date", Rule::Date),
    b(
        "Invoice.lineItem.priceComponent.type",
        Rule::Code(INVOICE_PRICE_COMPONENT_TYPE),
    ),
    b(
        "Invoice.totalPriceComponent.type",
        Rule::Code(INVOICE_PRICE_COMPONENT_TYPE),
    ),
    // Research
    b(
        "ResearchSubject.status",
        Rule::Code(RESEARCH_SUBJECT_STATUS),
    ),
    b("ResearchSubject.period.start", Rule::Date),
    b("ResearchSubject.period.end", Rule::Date),
    b("ResearchSubject.period", Rule::Period),
    b("ResearchStudy.status", Rule::Code(RESEARCH_STUDY_STATUS)),
    // Questionnaire, QuestionnaireResponse
    b("Questionnaire.status", Rule::Code(PUBLICATION_STATUS)),
    b(
        "Questionnaire.item*.type",
        Rule::Code(QUESTIONNAIRE_ITEM_TYPE),
    ),
    b(
        "Questionnaire.item*.enableBehavior",
        Rule::Code(&["all", "any"]),
    ),
    b(
        "Questionnaire.item*.enableWhen.operator",
        Rule::Code(&["exists", "=", "!=", ">", "<", ">=", "<="]),
    ),
    b(
        "QuestionnaireResponse.status",
        Rule::Code(QUESTIONNAIRE_RESPONSE_STATUS),
    ),
    b("QuestionnaireResponse.authored", Rule::Date),
];

const fn b(path: &'static str, rule: Rule) -> Binding {
    Binding { path, rule }
}

/// One violation: the element's path (rooted at the resource type) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub path: String,
    /// `value` for codes and dates, `invariant` for inverted periods.
    pub code: IssueCode,
    pub message: String,
}

/// Checks every binding of `resource_type` on `json`, the resource's root object.
pub(crate) fn check(resource_type: &str, json: &Json) -> Vec<Violation> {
    let mut out = Vec::new();
    for binding in BINDINGS {
        let Some(rest) = binding
            .path
            .strip_prefix(resource_type)
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let mut path = String::from(resource_type);
        walk(json, rest, &mut path, &mut |value, path| {
            check_value(binding, value, path, &mut out);
        });
    }
    out
}

/// Calls `f` on every node at `rest` below `node`, with its concrete path
/// (`Patient.contact[1].gender`) in `path`.
fn walk(node: &Json, rest: &str, path: &mut String, f: &mut dyn FnMut(&Json, &str)) {
    if rest.is_empty() {
        f(node, path);
        return;
    }
    let (seg, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let (name, recursive) = match seg.strip_suffix('*') {
        Some(n) => (n, true),
        None => (seg, false),
    };
    let Some(child) = node.get(name) else { return };
    let len = path.len();
    path.push('.');
    path.push_str(name);
    let mut visit = |item: &Json, path: &mut String| {
        walk(item, tail, path, f);
        if recursive {
            walk(item, rest, path, f);
        }
    };
    match child {
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let l = path.len();
                let _ = write!(path, "[{i}]");
                visit(item, path);
                path.truncate(l);
            }
        }
        other => visit(other, path),
    }
    path.truncate(len);
}

fn check_value(binding: &Binding, value: &Json, path: &str, out: &mut Vec<Violation>) {
    // Only built for a message: checking must not allocate.
    let element = || binding.path.replace('*', "");
    let mut report = |path: String, code: IssueCode, message: String| {
        out.push(Violation {
            path,
            code,
            message,
        })
    };
    match binding.rule {
        Rule::Code(codes) => {
            // A non-string is a type error fhirkit already reports.
            if let Json::String(s) = value {
                if !codes.contains(&s.as_str()) {
                    report(
                        path.to_string(),
                        IssueCode::Value,
                        format!(
                            "{s:?} is not a valid code for {}; allowed: {}",
                            element(),
                            codes.join(", ")
                        ),
                    );
                }
            }
        }
        Rule::Concept { system, codes } => {
            let Json::Object(_) = value else { return };
            let mut found = false;
            if let Some(Json::Array(codings)) = value.get("coding") {
                for (i, coding) in codings.iter().enumerate() {
                    if coding.get("system").and_then(Json::as_str) != Some(system) {
                        continue;
                    }
                    found = true;
                    match coding.get("code").and_then(Json::as_str) {
                        Some(c) if codes.contains(&c) => {}
                        Some(c) => report(
                            format!("{path}.coding[{i}].code"),
                            IssueCode::Value,
                            format!(
                                "{c:?} is not a valid code for {} in {system}; allowed: {}",
                                element(),
                                codes.join(", ")
                            ),
                        ),
                        None => report(
                            format!("{path}.coding[{i}]"),
                            IssueCode::Required,
                            format!("a coding from {system} needs a code"),
                        ),
                    }
                }
            }
            if !found {
                report(
                    path.to_string(),
                    IssueCode::Value,
                    format!(
                        "{} has a required binding: it needs a coding from {system} ({})",
                        element(),
                        codes.join(", ")
                    ),
                );
            }
        }
        Rule::Date => {
            if let Json::String(s) = value {
                if let Err(e) = datetime::parse_range(s) {
                    report(
                        path.to_string(),
                        IssueCode::Value,
                        format!("{s:?} is not a valid date/time: {e}"),
                    );
                }
            }
        }
        Rule::Period => {
            let bound = |k: &str| {
                value
                    .get(k)
                    .and_then(Json::as_str)
                    .and_then(|s| datetime::parse_range(s).ok())
            };
            // Compared as ranges: `2026-03` to `2026-03-01` is fine, as the
            // start's first instant is not after the end's last.
            if let (Some(start), Some(end)) = (bound("start"), bound("end")) {
                if start.low > end.high {
                    report(
                        path.to_string(),
                        IssueCode::Invariant,
                        format!(
                            "{} starts after it ends (per-1: start SHALL NOT be after end)",
                            element()
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(text: &str) -> Vec<(String, String)> {
        let json = Json::parse(text).unwrap();
        let rt = json.get("resourceType").and_then(Json::as_str).unwrap();
        check(rt, &json)
            .into_iter()
            .map(|v| (v.path, v.message))
            .collect()
    }

    #[test]
    fn every_path_names_a_resource_and_every_code_list_is_clean() {
        for binding in BINDINGS {
            let rt = binding.path.split('.').next().unwrap();
            assert!(crate::validate::is_resource_type(rt), "{}", binding.path);
            let codes = match binding.rule {
                Rule::Code(c) | Rule::Concept { codes: c, .. } => c,
                Rule::Date | Rule::Period => continue,
            };
            for c in codes {
                assert!(fhirkit::primitive::is_code(c), "{c}");
            }
        }
    }

    #[test]
    fn codes_are_checked_with_indexed_paths() {
        let v = violations(
            r#"{"resourceType":"Patient","gender":"M","contact":[{"gender":"female"},{"gender":"f"}]}"#,
        );
        let paths: Vec<&str> = v.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["Patient.gender", "Patient.contact[1].gender"]);
        assert!(v[0].1.contains("\"M\"") && v[0].1.contains("male, female"));
    }

    #[test]
    fn recursive_segments_reach_nested_items() {
        let v = violations(
            r#"{"resourceType":"Questionnaire","status":"active","item":[
                {"linkId":"1","type":"group","item":[{"linkId":"1.1","type":"question"}]}]}"#,
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, "Questionnaire.item[0].item[0].type");
    }

    #[test]
    fn concepts_need_a_coding_from_the_bound_system() {
        let ok = r#"{"resourceType":"Condition","clinicalStatus":{"coding":[
            {"system":"http://snomed.info/sct","code":"55561003"},
            {"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"active"}]}}"#;
        assert!(violations(ok).is_empty());
        let bad = r#"{"resourceType":"Condition","clinicalStatus":{"coding":[
            {"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"gone"}]}}"#;
        assert_eq!(
            violations(bad)[0].0,
            "Condition.clinicalStatus.coding[0].code"
        );
        let text_only = r#"{"resourceType":"Condition","clinicalStatus":{"text":"active"}}"#;
        assert_eq!(violations(text_only)[0].0, "Condition.clinicalStatus");
    }

    #[test]
    fn dates_must_exist() {
        let v = violations(r#"{"resourceType":"Patient","birthDate":"2023-02-29"}"#);
        assert_eq!(v[0].0, "Patient.birthDate");
        assert!(v[0].1.contains("does not exist"), "{}", v[0].1);
        assert!(violations(r#"{"resourceType":"Patient","birthDate":"2024-02-29"}"#).is_empty());
    }

    #[test]
    fn periods_must_not_be_inverted() {
        let enc = |start: &str, end: &str| {
            violations(&format!(
                r#"{{"resourceType":"Encounter","period":{{"start":"{start}","end":"{end}"}}}}"#
            ))
        };
        let v = enc("2026-03-02T10:00:00Z", "2026-03-02T09:00:00Z");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, "Encounter.period");
        assert!(enc("2026-03", "2026-03-01").is_empty());
        assert!(enc("2026-03-02T10:00:00+01:00", "2026-03-02T09:30:00Z").is_empty());
    }
}
