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
//! Deterministic: the same seed on the same day gives the same data (the
//! schedule is laid out relative to today, so that "upcoming" and
//! "overdue" always mean something). Ids are derived from the subject and
//! a counter, so a second load writes nothing new.

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
        let (ops, qs) = subject_data(&protocol, s, &mut rng, today, size.recent_days)?;
        resources += ops.len();
        queries += qs.len();
        let ops = ops
            .into_iter()
            .map(|(id, j)| {
                crate::fhir::write::built_op(&j, &id, Expect::Absent, clinflow_store::now_millis())
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

type Resources = Vec<(String, Value)>;

fn subject_data(
    p: &Protocol,
    s: &Subject,
    rng: &mut StdRng,
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
        out.push((id, observation(m, v, when, category)));
    };

    // Visits: appointments, and results at the attended ones.
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
            id,
            json!({
                "resourceType": "Appointment",
                "status": status,
                "description": format!("{} {} visit", p.id, v.id),
                "start": instant(day, 9),
                "end": instant(day, 10),
                "participant": [{"actor": {"reference": patient}, "status": "accepted"}],
            }),
        ));
        if status == "fulfilled" && day <= today {
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
                })));
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
        })));
    }
    Ok((out, queries))
}
