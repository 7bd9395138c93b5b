//! The synthetic data set of `clinflow serve --demo`: enough of a running
//! trial that every dashboard chart has something real to show.
//!
//! On top of the reference trial (its protocol and six subjects), and an
//! amendment that adds the recruitment plan, it enrols
//! [`DemoSize::subjects`] more subjects over the three sites from the
//! trial's start to a week ago, and gives each what a trial accumulates:
//! visit appointments (attended, a few missed, upcoming ones booked), lab
//! and vital-sign results at attended visits, two weeks of wearable heart
//! rate and steps, two weeks of daily diaries, adverse events (a few
//! serious, some of those reported late), and values outside the soft
//! ranges with their data queries open.
//!
//! And billing: every attended visit is charged (a `ChargeItem` for the
//! visit, one per lab test drawn at it) and invoiced (an `Invoice` with
//! a line per charge, in EUR; medical services are VAT-exempt, so gross
//! equals net). Invoices of the last 30 days are `issued`, older ones
//! `balanced` (paid). Amounts are whole cents, written with exactly two
//! decimals (`80.00`), which FHIR decimals keep (see [`with_members`]).
//!
//! Deterministic: the same seed on the same day gives the same data (the
//! schedule is laid out relative to today, so that "upcoming" and
//! "overdue" always mean something). Ids are derived from the subject and
//! a counter, so a second load writes nothing new. Billing draws from
//! its own generator per subject and comes after the rest, so it changes
//! neither the other data nor their ids for a given seed.

use clinflow_protocol::{Protocol, Sex, Subject};
use clinflow_store::{AuditRecord, Expect, NewDataQuery, WriteRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::dashboard::sections::{date_of, day_of};
use crate::state::AppState;
use crate::trials::{load, LoadReport};

const DAY_MS: i64 = 86_400_000;
const SEVERITIES: [&str; 3] = ["mild", "moderate", "severe"];
const EVENTS: [(&str, &str); 5] = [
    ("404640003", "Dizziness"),
    ("25064002", "Headache"),
    ("422587007", "Nausea"),
    ("84229001", "Fatigue"),
    ("271807003", "Skin rash"),
];
/// The code system of the demo's charge codes.
const CHARGE_SYSTEM: &str = "https://clinflow.dev/fhir/CodeSystem/charge";
/// The code system of the demo's invoice types.
const INVOICE_TYPE_SYSTEM: &str = "https://clinflow.dev/fhir/CodeSystem/invoice-type";
/// The lab tests that are charged, by measurement: code, display, price in cents.
const LAB_CHARGES: [(&str, &str, &str, i64); 2] = [
    ("glucose", "lab-glucose", "Glucose test, serum/plasma", 1250),
    ("hba1c", "lab-hba1c", "HbA1c test", 2490),
];

/// How much to generate.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    /// Synthetic subjects, besides the reference trial's.
    pub subjects: u32,
    /// Days of wearable readings and diaries per subject, up to today.
    pub recent_days: u32,
}

impl Default for DemoSize {
    fn default() -> DemoSize {
        DemoSize {
            subjects: 360,
            recent_days: 14,
        }
    }
}

/// What the demo load wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    pub trial: LoadReport,
    pub subjects: usize,
    pub resources: usize,
    pub data_queries: usize,
}

/// Loads the reference trial, its amendment and the synthetic data.
pub async fn load_demo(
    state: &AppState,
    protocol_yaml: &str,
    subjects_csv: &str,
    seed: u64,
    size: DemoSize,
) -> anyhow::Result<DemoReport> {
    let audit = AuditRecord {
        actor: "serve --demo".into(),
        role: "admin".into(),
        outcome: "success".into(),
        ..Default::default()
    };
    let reference = clinflow_protocol::parse_yaml(protocol_yaml)
        .map_err(|e| anyhow::anyhow!("the demo protocol: {e}"))?;
    let listed = clinflow_protocol::parse_subjects_csv(subjects_csv, &reference)
        .map_err(|e| anyhow::anyhow!("the demo subjects: {e}"))?;
    load(&state.store, &reference, &listed, audit.clone()).await?;
    // Amendment: the recruitment plan the enrolment chart is drawn against.
    let mut protocol = reference.clone();
    protocol.version += 1;
    protocol.enrolment = Some(clinflow_protocol::EnrolmentPlan {
        target: size.subjects + listed.len() as u32 + size.subjects / 4,
        by: None,
    });
    let today = crate::dashboard::sections::day_of_ms(clinflow_store::now_millis());
    let mut rng = StdRng::seed_from_u64(seed);
    let subjects = synthetic_subjects(&protocol, &mut rng, size.subjects, today);
    let report = load(&state.store, &protocol, &subjects, audit).await?;
    state.sites.refresh().await?;

    let mut resources = 0;
    let mut queries = 0;
    for s in &subjects {
        let (ops, qs) = subject_data(&protocol, s, &mut rng, seed, today, size.recent_days)?;
        resources += ops.len();
        queries += qs.len();
        let ops = ops
            .into_iter()
            .map(|(id, text)| {
                crate::fhir::write::built_op_text(
                    &text,
                    &id,
                    Expect::Absent,
                    clinflow_store::now_millis(),
                )
                .map_err(|e| anyhow::anyhow!("a demo resource: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        match state
            .store
            .write(WriteRequest {
                ops,
                audit: Vec::new(),
                queries: qs,
            })
            .await
        {
            Ok(()) => {}
            // Loaded before (same seed, same day): nothing new to write.
            Err(clinflow_store::WriteError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(DemoReport {
        trial: report,
        subjects: subjects.len(),
        resources,
        data_queries: queries,
    })
}

fn synthetic_subjects(p: &Protocol, rng: &mut StdRng, n: u32, today: i64) -> Vec<Subject> {
    let start = day_of(p.period.start) + 4;
    let last = (today - 7).min(day_of(p.period.end));
    let given = [
        "Alex", "Sam", "Maria", "Jan", "Li", "Noor", "Ana", "Tom", "Mei", "Omar",
    ];
    let family = [
        "Miller", "Schulz", "Wang", "Garcia", "Khan", "Novak", "Silva", "Chen",
    ];
    (0..n)
        .map(|i| {
            let site = &p.sites[i as usize % p.sites.len()];
            // Recruitment accelerates: more subjects later in the period.
            let f: f64 = rng.random::<f64>().sqrt();
            let enrolled = start + ((last - start).max(1) as f64 * f) as i64;
            let enrolled =
                clinflow_protocol::types::parse_date(&date_of(enrolled)).unwrap_or(p.period.start);
            let birth = clinflow_protocol::types::parse_date(&format!(
                "{}-{:02}-{:02}",
                1950 + rng.random_range(0..30),
                rng.random_range(1..=12),
                rng.random_range(1..=28)
            ))
            .unwrap_or(p.period.start);
            Subject {
                id: clinflow_protocol::SubjectId::new(format!("{}-{:04}", p.id, 1001 + i))
                    .expect("a valid subject id"),
                site: site.id.clone(),
                enrolled,
                arm: p.arms[rng.random_range(0..p.arms.len())].clone(),
                birth_date: birth,
                sex: if rng.random_bool(0.5) {
                    Sex::Female
                } else {
                    Sex::Male
                },
                family: family[rng.random_range(0..family.len())].to_string(),
                given: given[rng.random_range(0..given.len())].to_string(),
                email: None,
                phone: None,
            }
        })
        .collect()
}

fn instant(day: i64, hour: i64) -> String {
    clinflow_fhir::datetime::format_instant(day * DAY_MS + hour * 3_600_000)
}

/// A value of a measurement: mostly inside the soft range, ~4% outside it.
fn value_of(m: &clinflow_protocol::Measurement, rng: &mut StdRng) -> (f64, bool) {
    let (lo, hi) = match m.soft {
        Some(s) => (s.low(), s.high()),
        None => (m.hard.low().max(2000.0), m.hard.high().min(15000.0)),
    };
    let span = hi - lo;
    let out = m.soft.is_some() && rng.random_bool(0.04);
    let v = if out {
        if rng.random_bool(0.5) {
            hi + span * rng.random_range(0.02..0.15)
        } else {
            lo - span * rng.random_range(0.02..0.15)
        }
    } else {
        lo + span * rng.random_range(0.2..0.8)
    };
    let v = v.clamp(m.hard.low(), m.hard.high());
    let v = if m.unit.as_str() == "{steps}" {
        v.round()
    } else {
        (v * 10.0).round() / 10.0
    };
    (v, out)
}

/// Resources to write: id and JSON text.
type Resources = Vec<(String, String)>;

/// An attended visit, as billing needs it.
struct Attended<'a> {
    visit: &'a clinflow_protocol::Visit,
    day: i64,
    appointment: String,
    /// The lab results drawn at it: measurement id and Observation id.
    labs: Vec<(&'a str, String)>,
}

fn subject_data(
    p: &Protocol,
    s: &Subject,
    rng: &mut StdRng,
    seed: u64,
    today: i64,
    recent_days: u32,
) -> anyhow::Result<(Resources, Vec<NewDataQuery>)> {
    let patient = format!("Patient/{}", s.id);
    let enrolled = day_of(s.enrolled);
    let mut out: Resources = Vec::new();
    let mut queries = Vec::new();
    let mut n = 0u32;
    let mut next_id = |kind: &str| {
        n += 1;
        format!("demo-{}-{kind}-{n}", s.id)
    };
    let observation = |m: &clinflow_protocol::Measurement, v: f64, when: String, category: &str| {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": m.loinc.as_str(), "display": m.display}]},
            "subject": {"reference": patient},
            "effectiveDateTime": when,
            "valueQuantity": {"value": v, "unit": m.unit.as_str(), "system": "http://unitsofmeasure.org", "code": m.unit.as_str()},
        })
    };
    let measurement = |id: &str| p.measurements.iter().find(|m| m.id == id);
    let record = |out: &mut Resources,
                  queries: &mut Vec<NewDataQuery>,
                  id: String,
                  m: &clinflow_protocol::Measurement,
                  v: f64,
                  is_out: bool,
                  when: String,
                  category: &str| {
        if is_out {
            if let Some(soft) = m.soft {
                queries.push(NewDataQuery {
                    id: crate::fhir::write::new_id(),
                    trial: p.id.as_str().to_string(),
                    site: s.site.as_str().to_string(),
                    patient: s.id.as_str().to_string(),
                    resource_type: "Observation".into(),
                    resource_id: id.clone(),
                    measurement: m.id.clone(),
                    value: v.to_string(),
                    unit: m.unit.as_str().to_string(),
                    soft_low: soft.low(),
                    soft_high: soft.high(),
                    location: "valueQuantity.value".into(),
                    text: format!(
                        "{} {} {} is outside the expected range {}-{}; please confirm",
                        m.display,
                        v,
                        m.unit,
                        soft.low(),
                        soft.high()
                    ),
                    opened_at: clinflow_store::now_millis(),
                    opened_by: "serve --demo".into(),
                });
            }
        }
        out.push((id, observation(m, v, when, category).to_string()));
    };

    // Visits: appointments, and results at the attended ones.
    let mut attended = Vec::new();
    for v in &p.visits {
        let due = enrolled + i64::from(v.day);
        let (_, high) = v.window_days();
        let window_end = enrolled + high;
        let (status, day) = if window_end < today {
            if rng.random_bool(0.07) {
                ("noshow", due)
            } else {
                (
                    "fulfilled",
                    due + rng.random_range(0..=i64::from(v.window.after)),
                )
            }
        } else if due < today {
            // Past due, window open: most were booked, some not yet attended.
            if rng.random_bool(0.5) {
                ("fulfilled", due)
            } else {
                ("booked", today + rng.random_range(0..=2))
            }
        } else {
            ("booked", due)
        };
        let id = next_id("appt");
        out.push((
            id.clone(),
            json!({
                "resourceType": "Appointment",
                "status": status,
                "description": format!("{} {} visit", p.id, v.id),
                "start": instant(day, 9),
                "end": instant(day, 10),
                "participant": [{"actor": {"reference": patient}, "status": "accepted"}],
            })
            .to_string(),
        ));
        if status == "fulfilled" && day <= today {
            let mut visit = Attended {
                visit: v,
                day,
                appointment: id,
                labs: Vec::new(),
            };
            for mid in [
                "systolic-bp",
                "diastolic-bp",
                "glucose",
                "hba1c",
                "body-weight",
            ] {
                if let Some(m) = measurement(mid) {
                    let (val, is_out) = value_of(m, rng);
                    let category = if mid == "glucose" || mid == "hba1c" {
                        "laboratory"
                    } else {
                        "vital-signs"
                    };
                    let id = next_id("obs");
                    if category == "laboratory" {
                        visit.labs.push((mid, id.clone()));
                    }
                    record(
                        &mut out,
                        &mut queries,
                        id,
                        m,
                        val,
                        is_out,
                        instant(day, 10),
                        category,
                    );
                }
            }
            attended.push(visit);
        }
    }
    // Wearable readings and diaries over the last days.
    let first = (today - i64::from(recent_days)).max(enrolled);
    for day in first..today {
        for mid in ["heart-rate", "steps"] {
            if let Some(m) = measurement(mid) {
                let (val, is_out) = value_of(m, rng);
                let id = next_id("obs");
                record(
                    &mut out,
                    &mut queries,
                    id,
                    m,
                    val,
                    is_out,
                    instant(day, 20),
                    "activity",
                );
            }
        }
        if let Some(q) = p.questionnaires.first() {
            if rng.random_bool(0.85) {
                let id = next_id("diary");
                out.push((id, json!({
                    "resourceType": "QuestionnaireResponse",
                    "questionnaire": format!("https://clinflow.dev/fhir/Questionnaire/{}/{}", p.id, q.id),
                    "status": "completed",
                    "subject": {"reference": patient},
                    "authored": instant(day, 21),
                    "item": [
                        {"linkId": "pain", "answer": [{"valueInteger": rng.random_range(0..=6)}]},
                        {"linkId": "dizziness", "answer": [{"valueBoolean": rng.random_bool(0.1)}]},
                        {"linkId": "dose-taken", "answer": [{"valueBoolean": rng.random_bool(0.93)}]},
                    ],
                }).to_string()));
            }
        }
    }
    // Adverse events.
    let events = (0..3).filter(|_| rng.random_bool(0.15)).count();
    for _ in 0..events {
        let span = (today - enrolled).max(1);
        let day = enrolled + rng.random_range(0..span);
        let serious = rng.random_bool(0.1);
        let hours = if serious && rng.random_bool(0.3) {
            rng.random_range(25..72)
        } else {
            rng.random_range(1..20)
        };
        let (code, display) = EVENTS[rng.random_range(0..EVENTS.len())];
        let severity = SEVERITIES[match rng.random_range(0..10) {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        }];
        let date = day * DAY_MS + 11 * 3_600_000;
        let id = next_id("ae");
        out.push((id, json!({
            "resourceType": "AdverseEvent",
            "actuality": "actual",
            "event": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
            "subject": {"reference": patient},
            "date": clinflow_fhir::datetime::format_instant(date),
            "recordedDate": clinflow_fhir::datetime::format_instant(date + hours * 3_600_000),
            "seriousness": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness", "code": if serious { "serious" } else { "non-serious" }}]},
            "severity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adverse-event-severity", "code": severity}]},
            "study": [{"reference": format!("ResearchStudy/{}", p.id)}],
        }).to_string()));
    }
    // Billing, last: its ids come after all the others.
    let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(s.id.as_str()));
    for visit in &attended {
        bill(p, s, visit, &mut rng, today, &mut next_id, &mut out);
    }
    Ok((out, queries))
}

/// FNV-1a: a per-subject seed that, unlike `DefaultHasher`, is the same
/// in every Rust release.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Money in EUR as JSON text, with exactly two decimals: `{"value":80.00,"currency":"EUR"}`.
fn eur(cents: i64) -> String {
    debug_assert!(cents >= 0);
    format!(
        r#"{{"value":{}.{:02},"currency":"EUR"}}"#,
        cents / 100,
        cents % 100
    )
}

/// `object` as JSON text with `members` added, each value given as JSON
/// text. How money keeps its two decimals: clinflow keeps a FHIR decimal's
/// text as written (fhirkit's `Json` holds a number as text, and the
/// stored body is that text), but a `serde_json::Value` holds an f64 and
/// would write `80.00` as `80.0` and `80.50` as `80.5`. So the rest of a
/// billing resource is built with `json!` (which escapes every string) and
/// its amounts are spliced in as text ([`eur`]).
fn with_members(object: Value, members: &[(&str, String)]) -> String {
    let mut text = object.to_string();
    debug_assert!(text.ends_with('}'), "an object");
    text.pop();
    for (key, value) in members {
        if !text.ends_with('{') {
            text.push(',');
        }
        text.push_str(&Value::from(*key).to_string());
        text.push(':');
        text.push_str(value);
    }
    text.push('}');
    text
}

/// The ChargeItems of an attended visit (the visit, then each lab test
/// drawn at it) and the Invoice for them.
fn bill(
    p: &Protocol,
    s: &Subject,
    visit: &Attended,
    rng: &mut StdRng,
    today: i64,
    next_id: &mut impl FnMut(&str) -> String,
    out: &mut Resources,
) {
    let patient = format!("Patient/{}", s.id);
    let site = format!("Organization/{}", s.site);
    let day = visit.day;
    // A visit's price by kind, in 50-cent steps within the tariff's range.
    let (code, display, (low, high)) = match visit.visit.day {
        ..=-1 => ("visit-screening", "Screening visit", (14_000, 18_000)),
        0 => ("visit-baseline", "Baseline visit", (11_000, 15_000)),
        _ => ("visit-followup", "Follow-up visit", (8_000, 12_000)),
    };
    let visit_price = rng.random_range(low / 50..=high / 50) * 50;
    let charge = |code: Value, when: String, cents: i64, link: (&str, Value)| {
        let mut item = json!({
            "resourceType": "ChargeItem",
            "status": "billable",
            "code": code,
            "subject": {"reference": patient},
            "occurrenceDateTime": when,
            "performingOrganization": {"reference": site},
            "quantity": {"value": 1},
            "enteredDate": instant(day, 17),
            "overrideReason": format!("{} study tariff", p.id),
        });
        item[link.0] = link.1;
        with_members(item, &[("priceOverride", eur(cents))])
    };
    let mut lines: Vec<(String, i64)> = Vec::new();
    let id = next_id("charge");
    out.push((
        id.clone(),
        charge(
            json!({"coding": [{"system": CHARGE_SYSTEM, "code": code, "display": display}], "text": format!("{} {} visit", p.id, visit.visit.id)}),
            instant(day, 9),
            visit_price,
            (
                "supportingInformation",
                json!([{"reference": format!("Appointment/{}", visit.appointment)}]),
            ),
        ),
    ));
    lines.push((id, visit_price));
    for (measurement, observation) in &visit.labs {
        let Some(&(_, code, display, cents)) = LAB_CHARGES.iter().find(|(m, ..)| m == measurement)
        else {
            continue;
        };
        let mut coding = vec![json!({"system": CHARGE_SYSTEM, "code": code, "display": display})];
        if let Some(m) = p.measurements.iter().find(|m| m.id == *measurement) {
            coding.push(json!({"system": "http://loinc.org", "code": m.loinc.as_str(), "display": m.display}));
        }
        let id = next_id("charge");
        out.push((
            id.clone(),
            charge(
                json!({"coding": coding}),
                instant(day, 10),
                cents,
                (
                    "service",
                    json!([{"reference": format!("Observation/{observation}")}]),
                ),
            ),
        ));
        lines.push((id, cents));
    }
    // Exact: the total is a sum of whole cents.
    let total: i64 = lines.iter().map(|(_, cents)| cents).sum();
    let line_items = lines
        .iter()
        .enumerate()
        .map(|(i, (charge, cents))| {
            let base = with_members(json!({"type": "base"}), &[("amount", eur(*cents))]);
            with_members(
                json!({
                    "sequence": i + 1,
                    "chargeItemReference": {"reference": format!("ChargeItem/{charge}")},
                }),
                &[("priceComponent", format!("[{base}]"))],
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let invoice = json!({
        "resourceType": "Invoice",
        "status": if day >= today - 30 { "issued" } else { "balanced" },
        "type": {"coding": [{"system": INVOICE_TYPE_SYSTEM, "code": "trial-visit", "display": "Trial visit"}]},
        "subject": {"reference": patient},
        "issuer": {"reference": site},
        "date": date_of((day + 2).min(today)),
        "note": [{"text": "Medical services are exempt from VAT: the gross total is the net total."}],
    });
    let id = next_id("invoice");
    out.push((
        id,
        with_members(
            invoice,
            &[
                ("lineItem", format!("[{line_items}]")),
                ("totalNet", eur(total)),
                ("totalGross", eur(total)),
            ],
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clinflow_fhir::Json;
    use std::collections::BTreeMap;

    const PROTOCOL: &str = include_str!("../../../reference-trial/protocol.yaml");

    /// The data of `n` synthetic subjects for `seed`, on a fixed day.
    fn generate(seed: u64, n: u32) -> (i64, Vec<(Subject, Resources)>) {
        let p = clinflow_protocol::parse_yaml(PROTOCOL).unwrap();
        let today = day_of(clinflow_protocol::types::parse_date("2026-06-15").unwrap());
        let mut rng = StdRng::seed_from_u64(seed);
        let subjects = synthetic_subjects(&p, &mut rng, n, today);
        let data = subjects
            .into_iter()
            .map(|s| {
                let (out, _) = subject_data(&p, &s, &mut rng, seed, today, 3).unwrap();
                (s, out)
            })
            .collect();
        (today, data)
    }

    /// A Money's amount as written, and in cents.
    fn amount(money: &Json) -> (String, i64) {
        assert_eq!(money.get("currency").and_then(Json::as_str), Some("EUR"));
        let Some(Json::Number(text)) = money.get("value") else {
            panic!("no value in {}", money.to_compact())
        };
        let (units, cents) = text.split_once('.').expect("a decimal point");
        assert_eq!(cents.len(), 2, "two decimals: {text}");
        (
            text.clone(),
            units.parse::<i64>().unwrap() * 100 + cents.parse::<i64>().unwrap(),
        )
    }

    #[test]
    fn every_attended_visit_is_charged_and_invoiced_to_the_cent() {
        let (today, data) = generate(7, 30);
        let mut invoices = 0;
        let mut statuses = BTreeMap::new();
        for (s, out) in &data {
            let mut charges: BTreeMap<String, (String, i64)> = BTreeMap::new();
            let mut attended = 0;
            for (id, text) in out {
                let op = crate::fhir::write::built_op_text(text, id, Expect::Absent, 0)
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                let stored = Json::parse(op.body.as_deref().unwrap()).unwrap();
                match op.resource_type.as_str() {
                    "Appointment" => {
                        attended += usize::from(
                            stored.get("status").and_then(Json::as_str) == Some("fulfilled"),
                        );
                    }
                    "ChargeItem" => {
                        assert_eq!(op.extracted.patient.as_deref(), Some(s.id.as_str()));
                        assert!(op.extracted.sort_date.is_some(), "{id} sorts by occurrence");
                        charges.insert(id.clone(), amount(stored.get("priceOverride").unwrap()));
                    }
                    "Invoice" => {
                        invoices += 1;
                        assert_eq!(op.extracted.patient.as_deref(), Some(s.id.as_str()));
                        let date = op.extracted.sort_date.expect("an Invoice sorts by date");
                        assert!(
                            crate::dashboard::sections::day_of_ms(date) <= today,
                            "{id} is not dated after today"
                        );
                        let status = stored.get("status").and_then(Json::as_str).unwrap();
                        *statuses.entry(status.to_string()).or_insert(0) += 1;
                        let Some(Json::Array(lines)) = stored.get("lineItem") else {
                            panic!("{id} has no lines")
                        };
                        let mut sum = 0;
                        for (i, line) in lines.iter().enumerate() {
                            assert_eq!(
                                line.get("sequence"),
                                Some(&Json::Number((i + 1).to_string()))
                            );
                            let charge = line
                                .get("chargeItemReference")
                                .and_then(|r| r.get("reference"))
                                .and_then(Json::as_str)
                                .and_then(|r| r.strip_prefix("ChargeItem/"))
                                .unwrap();
                            let Some(Json::Array(parts)) = line.get("priceComponent") else {
                                panic!("{id} line {i} has no price")
                            };
                            let price = amount(parts[0].get("amount").unwrap());
                            assert_eq!(
                                charges.remove(charge).as_ref(),
                                Some(&price),
                                "{id} line {i}: the charge's price, once"
                            );
                            sum += price.1;
                        }
                        let net = amount(stored.get("totalNet").unwrap());
                        let gross = amount(stored.get("totalGross").unwrap());
                        assert_eq!(net.1, sum, "{id}");
                        assert_eq!(gross, net, "{id}: VAT-exempt");
                    }
                    _ => {}
                }
            }
            assert!(charges.is_empty(), "charges not invoiced: {charges:?}");
            assert_eq!(
                out.iter()
                    .filter(|(id, _)| id.contains("-invoice-"))
                    .count(),
                attended,
                "{}: one invoice per attended visit",
                s.id
            );
        }
        assert!(invoices > 30, "{invoices}");
        assert!(statuses.keys().eq(["balanced", "issued"]), "{statuses:?}");
    }

    #[test]
    fn billing_is_deterministic_and_comes_last() {
        let (_, a) = generate(11, 8);
        let (_, b) = generate(11, 8);
        assert_eq!(
            a.iter().map(|(_, out)| out).collect::<Vec<_>>(),
            b.iter().map(|(_, out)| out).collect::<Vec<_>>()
        );
        for (s, out) in &a {
            let billing = |id: &str| id.contains("-charge-") || id.contains("-invoice-");
            let first = out.iter().position(|(id, _)| billing(id));
            if let Some(first) = first {
                assert!(out[first..].iter().all(|(id, _)| billing(id)), "{}", s.id);
            }
        }
        // Prices differ between subjects: each has its own draws.
        let visit_prices: std::collections::BTreeSet<&str> = a
            .iter()
            .flat_map(|(_, out)| out)
            .filter(|(_, text)| text.contains("\"visit-"))
            .filter_map(|(_, text)| text.split("\"priceOverride\":").nth(1))
            .collect();
        assert!(visit_prices.len() > 3, "{visit_prices:?}");
    }

    #[test]
    fn money_keeps_two_decimals() {
        assert_eq!(eur(8000), r#"{"value":80.00,"currency":"EUR"}"#);
        assert_eq!(eur(1250), r#"{"value":12.50,"currency":"EUR"}"#);
        assert_eq!(eur(7), r#"{"value":0.07,"currency":"EUR"}"#);
        assert_eq!(
            with_members(json!({}), &[("a", "1.50".into())]),
            r#"{"a":1.50}"#
        );
        assert_eq!(
            with_members(json!({"b": "x\"y"}), &[("a", eur(80)), ("c", "[]".into())]),
            r#"{"b":"x\"y","a":{"value":0.80,"currency":"EUR"},"c":[]}"#
        );
    }

    /// Searched as the FHIR API does: `patient=` finds a subject's charge
    /// items and invoices, and `totalgross` matches the invoice total.
    #[tokio::test]
    async fn billing_is_found_by_patient_in_the_store() {
        let dir = std::env::temp_dir().join(format!(
            "clinflow-demo-billing-{}-{}",
            std::process::id(),
            clinflow_store::now_millis()
        ));
        let store = clinflow_store::Store::open(&clinflow_store::DatabaseUrl::Sqlite(
            dir.join("db.sqlite"),
        ))
        .await
        .unwrap();
        let (_, data) = generate(7, 3);
        for (_, out) in &data {
            let ops = out
                .iter()
                .map(|(id, text)| {
                    crate::fhir::write::built_op_text(text, id, Expect::Absent, 1).unwrap()
                })
                .collect();
            store
                .write(WriteRequest {
                    ops,
                    audit: Vec::new(),
                    queries: Vec::new(),
                })
                .await
                .unwrap();
        }
        let search = |rtype: &str, pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let q = clinflow_fhir::search::parse_query(rtype, &pairs).unwrap();
            let store = store.clone();
            async move {
                store
                    .search(q, clinflow_store::Scope::All)
                    .await
                    .unwrap()
                    .matches
            }
        };
        let (s, out) = &data[0];
        let count = |kind: &str| out.iter().filter(|(id, _)| id.contains(kind)).count();
        let patient = s.id.as_str();
        let invoices = search("Invoice", &[("patient", patient), ("_count", "500")]).await;
        assert_eq!(invoices.len(), count("-invoice-"));
        assert!(!invoices.is_empty());
        let charges = search("ChargeItem", &[("patient", patient), ("_count", "500")]).await;
        assert_eq!(charges.len(), count("-charge-"));
        // The first invoice, found again by its total in EUR.
        let first = Json::parse(invoices[0].body.as_deref().unwrap()).unwrap();
        let (total, _) = amount(first.get("totalGross").unwrap());
        let by_total = format!("{total}|urn:iso:std:iso:4217|EUR");
        let found = search(
            "Invoice",
            &[("patient", patient), ("totalgross", by_total.as_str())],
        )
        .await;
        assert!(found.iter().any(|r| r.id == invoices[0].id), "{by_total}");
        let none = format!("{total}|urn:iso:std:iso:4217|USD");
        assert!(search("Invoice", &[("totalgross", none.as_str())])
            .await
            .is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
