//! The trial monitoring dashboard (`GET /trials/{id}/dashboard`) and the
//! subject views behind the web page (`GET /trials/{id}/subjects`,
//! `GET /trials/{id}/subjects/{subject}`).
//!
//! The dashboard's sections (`enrolment`, `adverse_events`, `visits`,
//! `data_quality`, `ingest`) run concurrently, each under its own deadline
//! (`dashboard_section_timeout`). A section that fails or runs out of time
//! is `{"status": "unavailable", "reason": ...}` and the answer says
//! `"partial": true`; the others are complete. The answer takes about as
//! long as the slowest section. Sections that need the trial's subjects
//! share one read of them (a `OnceCell`).
//!
//! Who sees what: admin, data-manager and monitor see every site; a site
//! user sees its site's numbers only (every read is site scoped, and the
//! planned enrolment, a trial-wide figure, is left out). Patients and the
//! interface role are refused.
//!
//! `dashboard_section_delay` injects a delay before sections (tests and
//! the benchmark of the deadline behaviour); empty in production.

pub mod sections;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clinflow_protocol::Protocol;
use clinflow_store::{IngestScope, QueryFilter, QueryStatus, Scope};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::metrics::StageMetrics;
use crate::state::AppState;
use sections::{AeRow, AppointmentRow, SubjectRow};

/// The section names, in the order they are reported.
pub const SECTIONS: [&str; 5] = [
    "enrolment",
    "adverse_events",
    "visits",
    "data_quality",
    "ingest",
];
/// How far ahead `visits.upcoming` looks.
const HORIZON_DAYS: i64 = 14;

/// What every section of one answer reads.
struct Ctx {
    state: AppState,
    protocol: Protocol,
    scope: Scope,
    /// The caller's site, for a site user.
    site: Option<String>,
    today: i64,
    subjects: OnceCell<Arc<Vec<SubjectRow>>>,
}

impl Ctx {
    async fn subjects(&self) -> anyhow::Result<Arc<Vec<SubjectRow>>> {
        self.subjects
            .get_or_try_init(|| async {
                load_subjects(&self.state, &self.protocol, &self.scope)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// The sites reported: the protocol's, or the caller's one.
    fn sites(&self) -> Vec<(String, String)> {
        let registry = self.state.sites.snapshot();
        self.protocol
            .sites
            .iter()
            .filter(|s| self.site.as_deref().is_none_or(|own| own == s.id.as_str()))
            .map(|s| {
                // The registry's name when it has one (it may have been edited).
                let name = registry
                    .get(s.id.as_str())
                    .map_or_else(|| s.name.clone(), |e| e.site.name.clone());
                (s.id.as_str().to_string(), name)
            })
            .collect()
    }
}

/// Who may look, and at which scope: `(scope, own site)`.
fn dashboard_scope(caller: &Caller) -> Result<(Scope, Option<String>), ApiError> {
    let p = &caller.principal;
    match p.role {
        Role::Admin | Role::DataManager | Role::Monitor => Ok((Scope::All, None)),
        Role::SiteUser => {
            let site = p
                .site
                .clone()
                .ok_or_else(|| ApiError::Forbidden("this site-user token has no site".into()))?;
            Ok((Scope::Sites(vec![site.clone()]), Some(site)))
        }
        r => Err(ApiError::Forbidden(format!(
            "the {} role has no dashboard",
            r.as_str()
        ))),
    }
}

async fn latest_protocol(state: &AppState, id: &str) -> Result<Protocol, ApiError> {
    let latest = state
        .store
        .trial_versions(id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("no trial {id:?}")))?;
    clinflow_protocol::parse_json(&latest.protocol)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored protocol does not parse: {e}")))
}

/// Patient data: no cache (the browser's included) may keep it, so that it
/// is gone from a shared workstation once the page signs out.
fn no_store(body: Value) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

fn today() -> i64 {
    sections::day_of_ms(clinflow_store::now_millis())
}

/// `GET /trials/{id}/dashboard`.
pub async fn get_dashboard(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (scope, site) = dashboard_scope(&caller)?;
    let protocol = latest_protocol(&state, &id).await?;
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        protocol,
        scope,
        site,
        today: today(),
        subjects: OnceCell::new(),
    });
    let timeout = state.config.dashboard_section_timeout;
    let (enrolment, adverse, visits, quality, ingest) = tokio::join!(
        section(&ctx, "enrolment", timeout, enrolment_section(&ctx)),
        section(&ctx, "adverse_events", timeout, adverse_section(&ctx)),
        section(&ctx, "visits", timeout, visits_section(&ctx)),
        section(&ctx, "data_quality", timeout, quality_section(&ctx)),
        section(&ctx, "ingest", timeout, ingest_section(&ctx)),
    );
    let results = [enrolment, adverse, visits, quality, ingest];
    let partial = results.iter().any(|v| v["status"] != "ok");
    let sections: serde_json::Map<String, Value> = SECTIONS
        .iter()
        .zip(results)
        .map(|(name, v)| (name.to_string(), v))
        .collect();
    Ok(no_store(json!({
        "trial": id,
        "generated_at": clinflow_fhir::datetime::format_instant(clinflow_store::now_millis()),
        "partial": partial,
        "sections": sections,
    })))
}

/// One section under its deadline (and its injected delay, if any).
async fn section(
    ctx: &Ctx,
    name: &'static str,
    timeout: Duration,
    work: impl std::future::Future<Output = anyhow::Result<Value>>,
) -> Value {
    let delay = ctx.state.config.dashboard_section_delay.get(name).copied();
    let run = async {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        work.await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(mut v)) => {
            v["status"] = json!("ok");
            v
        }
        Ok(Err(e)) => {
            tracing::warn!(section = name, error = %e, "a dashboard section failed");
            json!({"status": "unavailable", "reason": "the section could not be computed; see the server log"})
        }
        Err(_) => {
            tracing::warn!(section = name, "a dashboard section timed out");
            json!({"status": "unavailable", "reason": format!("timed out after {} ms", timeout.as_millis())})
        }
    }
}

async fn enrolment_section(ctx: &Ctx) -> anyhow::Result<Value> {
    let subjects = ctx.subjects().await?;
    Ok(sections::enrolment(
        &ctx.protocol,
        &ctx.sites(),
        &subjects,
        ctx.today,
        ctx.site.is_none(),
    ))
}

async fn adverse_section(ctx: &Ctx) -> anyhow::Result<Value> {
    let (subjects, stored) = tokio::join!(
        ctx.subjects(),
        ctx.state
            .store
            .current_resources("AdverseEvent", None, ctx.scope.clone())
    );
    let subjects = subjects?;
    let subject_of: HashMap<String, (String, String)> = subjects
        .iter()
        .map(|s| (s.patient.clone(), (s.subject.clone(), s.site.clone())))
        .collect();
    let events: Vec<AeRow> = stored?
        .iter()
        .filter_map(|r| {
            let patient = r.patient.clone()?;
            // The trial's subjects only.
            if !subject_of.contains_key(&patient) {
                return None;
            }
            let j: Value = serde_json::from_str(r.body.as_deref()?).ok()?;
            let code = |k: &str| j[k]["coding"][0]["code"].as_str().map(str::to_string);
            Some(AeRow {
                id: r.id.clone(),
                patient,
                date: instant(&j["date"]),
                recorded: instant(&j["recordedDate"]).unwrap_or(r.last_updated),
                severity: code("severity"),
                serious: code("seriousness").map(|c| c == "serious"),
            })
        })
        .collect();
    Ok(sections::adverse_events(
        &ctx.protocol,
        &events,
        &subject_of,
    ))
}

async fn visits_section(ctx: &Ctx) -> anyhow::Result<Value> {
    let (subjects, stored) = tokio::join!(
        ctx.subjects(),
        ctx.state
            .store
            .current_resources("Appointment", None, ctx.scope.clone())
    );
    let subjects = subjects?;
    let appointments: Vec<AppointmentRow> = stored?
        .iter()
        .filter_map(|r| {
            let j: Value = serde_json::from_str(r.body.as_deref()?).ok()?;
            Some(AppointmentRow {
                patient: r.patient.clone()?,
                start: instant(&j["start"])?,
                status: j["status"].as_str()?.to_string(),
            })
        })
        .collect();
    Ok(sections::visits(
        &ctx.protocol,
        &subjects,
        &appointments,
        ctx.today,
        HORIZON_DAYS,
    ))
}

async fn quality_section(ctx: &Ctx) -> anyhow::Result<Value> {
    let trial = ctx.protocol.id.as_str();
    let mut per_site: std::collections::BTreeMap<String, u64> =
        ctx.sites().into_iter().map(|(id, _)| (id, 0)).collect();
    let mut after = None;
    let mut open = 0;
    loop {
        let page = ctx
            .state
            .store
            .data_queries(QueryFilter {
                site: ctx.site.clone(),
                status: Some(QueryStatus::Open),
                after: after.clone(),
                limit: 1000,
            })
            .await?;
        for q in page.iter().filter(|q| q.query.trial == trial) {
            open += 1;
            *per_site.entry(q.query.site.clone()).or_default() += 1;
        }
        match page.last() {
            Some(last) if page.len() == 1000 => after = Some(last.query.id.clone()),
            _ => break,
        }
    }
    let since = clinflow_store::now_millis() - 86_400_000;
    let scope = ctx.site.clone().map(IngestScope::Site);
    let rejected = ctx.state.store.rejected_since(since, scope).await?;
    Ok(json!({
        "open_queries": open,
        "open_queries_by_site": per_site
            .into_iter()
            .map(|(site, n)| json!({"site": site, "open": n}))
            .collect::<Vec<_>>(),
        "rejected_items_24h": rejected,
    }))
}

async fn ingest_section(ctx: &Ctx) -> anyhow::Result<Value> {
    let m = &ctx.state.metrics;
    let stage = |name: &str, s: &StageMetrics| {
        json!({
            "stage": name,
            "queue_depth": s.queue_depth.get(),
            "busy": s.busy.get(),
            "workers": s.workers.get(),
            "items_total": s.items.get(),
            "items_per_second": ctx.state.ingest_rates.rate(name, s.items.get()),
        })
    };
    Ok(json!({"stages": [stage("map", &m.ingest_map), stage("persist", &m.ingest_persist)]}))
}

/// Items/s of each ingest stage, from the counter's change between two
/// dashboard reads at least a second apart (the rate of the last such
/// interval is repeated in between).
#[derive(Default)]
pub struct IngestRates {
    /// A std mutex: held for a few arithmetic operations, never across an
    /// `.await`.
    last: std::sync::Mutex<HashMap<String, (std::time::Instant, u64, f64)>>,
}

impl IngestRates {
    fn rate(&self, stage: &str, items: u64) -> f64 {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let entry = last.entry(stage.to_string()).or_insert((now, items, 0.0));
        let dt = now.duration_since(entry.0).as_secs_f64();
        if dt >= 1.0 {
            let rate = items.saturating_sub(entry.1) as f64 / dt;
            *entry = (now, items, (rate * 10.0).round() / 10.0);
        }
        entry.2
    }
}

/// The instant a FHIR date/dateTime starts at, in ms.
fn instant(v: &Value) -> Option<i64> {
    clinflow_fhir::datetime::parse_range(v.as_str()?)
        .ok()
        .map(|r| r.low)
}

/// The trial's `ResearchSubject`s the scope allows.
async fn load_subjects(
    state: &AppState,
    protocol: &Protocol,
    scope: &Scope,
) -> anyhow::Result<Vec<SubjectRow>> {
    let study = format!("ResearchStudy/{}", protocol.id);
    let stored = state
        .store
        .current_resources("ResearchSubject", None, scope.clone())
        .await?;
    Ok(stored
        .iter()
        .filter_map(|r| {
            let j: Value = serde_json::from_str(r.body.as_deref()?).ok()?;
            if j["study"]["reference"].as_str() != Some(study.as_str()) {
                return None;
            }
            let site = j["extension"].as_array()?.iter().find_map(|e| {
                (e["url"].as_str() == Some(clinflow_protocol::fhir::RESEARCH_SUBJECT_SITE_URL))
                    .then(|| e["valueReference"]["reference"].as_str())
                    .flatten()
                    .and_then(|r| r.strip_prefix("Organization/"))
            })?;
            let enrolled = clinflow_protocol::types::parse_date(j["period"]["start"].as_str()?)?;
            Some(SubjectRow {
                subject: j["identifier"][0]["value"]
                    .as_str()
                    .unwrap_or(&r.id)
                    .to_string(),
                patient: r.patient.clone()?,
                site: site.to_string(),
                arm: j["assignedArm"].as_str().unwrap_or("").to_string(),
                enrolled: sections::day_of(enrolled),
                status: j["status"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect())
}

fn subject_json(s: &SubjectRow) -> Value {
    json!({
        "subject": s.subject, "patient": s.patient, "site": s.site, "arm": s.arm,
        "enrolled": sections::date_of(s.enrolled), "status": s.status,
    })
}

/// `GET /trials/{id}/subjects`: the trial's subjects the caller may see.
pub async fn list_subjects(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (scope, _) = dashboard_scope(&caller)?;
    let protocol = latest_protocol(&state, &id).await?;
    let subjects = load_subjects(&state, &protocol, &scope).await?;
    read_audit(&state, &caller, "subject-list", None, &id).await;
    Ok(no_store(json!({
        "items": subjects.iter().map(subject_json).collect::<Vec<_>>(),
        "total": subjects.len(),
    })))
}

/// `GET /trials/{id}/subjects/{subject}`: the subject's latest value of
/// each protocol measurement, marked when outside the soft range.
pub async fn get_subject(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, subject)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (scope, _) = dashboard_scope(&caller)?;
    let protocol = latest_protocol(&state, &id).await?;
    let subjects = load_subjects(&state, &protocol, &scope).await?;
    let s = subjects
        .iter()
        .find(|s| s.subject == subject)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no subject {subject:?} in trial {id:?} for this caller"
            ))
        })?;
    let observations = state
        .store
        .current_resources("Observation", Some(&s.patient), scope)
        .await?;
    // Latest per measurement: (time, value, unit).
    let mut latest: HashMap<&str, (i64, f64, String)> = HashMap::new();
    for r in &observations {
        let Some(j) = r
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
        else {
            continue;
        };
        let Some(m) = j["code"]["coding"].as_array().and_then(|cs| {
            cs.iter().find_map(|c| {
                protocol
                    .measurements
                    .iter()
                    .find(|m| c["code"].as_str() == Some(m.loinc.as_str()))
            })
        }) else {
            continue;
        };
        let (Some(value), Some(time)) = (
            j["valueQuantity"]["value"].as_f64(),
            instant(&j["effectiveDateTime"]).or_else(|| instant(&j["effectivePeriod"]["start"])),
        ) else {
            continue;
        };
        let unit = j["valueQuantity"]["code"]
            .as_str()
            .or_else(|| j["valueQuantity"]["unit"].as_str())
            .unwrap_or("")
            .to_string();
        let slot = latest
            .entry(m.id.as_str())
            .or_insert((i64::MIN, 0.0, String::new()));
        if time > slot.0 {
            *slot = (time, value, unit);
        }
    }
    let values: Vec<Value> = protocol
        .measurements
        .iter()
        .filter_map(|m| {
            let (time, value, unit) = latest.get(m.id.as_str())?;
            // In the protocol's unit, when it is a listed other unit.
            let canonical = if unit == m.unit.as_str() {
                Some(*value)
            } else {
                m.convert
                    .iter()
                    .find(|c| c.unit.as_str() == unit)
                    .map(|c| value * c.factor)
            };
            let out = match (m.soft, canonical) {
                (Some(soft), Some(v)) => v < soft.low() || v > soft.high(),
                _ => false,
            };
            Some(json!({
                "measurement": m.id, "display": m.display, "value": value, "unit": unit,
                "time": clinflow_fhir::datetime::format_instant(*time),
                "soft": m.soft.map(|r| [r.low(), r.high()]),
                "out_of_range": out,
            }))
        })
        .collect();
    read_audit(&state, &caller, "subject-read", Some(&s.patient), &id).await;
    let mut body = subject_json(s);
    body["values"] = json!(values);
    Ok(no_store(body))
}

/// Reads of patient data are audited (group-committed, as FHIR reads are).
async fn read_audit(
    state: &AppState,
    caller: &Caller,
    action: &str,
    patient: Option<&str>,
    trial: &str,
) {
    let mut rec = caller.audit(action, "success");
    rec.resource_type = Some(
        if patient.is_some() {
            "Patient"
        } else {
            "ResearchStudy"
        }
        .into(),
    );
    rec.resource_id = Some(patient.unwrap_or(trial).to_string());
    if let Err(e) = state.store.audit(vec![rec]).await {
        tracing::error!(error = %e, "a read-audit record could not be queued");
    }
}
