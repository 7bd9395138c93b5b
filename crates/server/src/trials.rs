//! Trials: loading a protocol (and its subjects) into the store, and the
//! `/trials` API.
//!
//! A load turns the protocol into FHIR resources with deterministic ids
//! (ResearchStudy, an Organization per site, Questionnaires, a Patient and
//! a ResearchSubject per subject) and writes only what differs from what is
//! stored, in one request: loading the same file twice changes nothing. Each
//! protocol version is kept; a changed protocol must bump `version`.
//!
//! A site's `Organization` is created by the first load that lists it and
//! from then on belongs to the site registry ([`crate::sites`]): a later
//! load leaves it as the registry has it (a site's details change through
//! `PUT /sites/{id}`, not through a protocol amendment).

use crate::media::media_type;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use clinflow_fhir::Json;
use clinflow_protocol::{Protocol, Subject};
use clinflow_store::{AuditRecord, Expect, Store, TrialRecord, WriteRequest};
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::fhir::write::build_op;
use crate::state::AppState;

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadReport {
    pub trial: String,
    pub version: u32,
    /// Whether this protocol version was new.
    pub new_version: bool,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

/// Why a load was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> ApiError {
        match e {
            LoadError::Conflict(m) => ApiError::Conflict(m),
            LoadError::Internal(e) => ApiError::Internal(e),
        }
    }
}

/// JSON equality ignoring `meta` (which the store sets).
fn same_content(a: &Json, b: &Json) -> bool {
    fn strip(j: &Json) -> Json {
        match j {
            Json::Object(m) => {
                Json::Object(m.iter().filter(|(k, _)| k != "meta").cloned().collect())
            }
            other => other.clone(),
        }
    }
    strip(a).same_as(&strip(b))
}

/// Loads (or amends) a trial. `audit` is the template of the audit record
/// (who, from where, why); its action and detail are filled in here.
pub async fn load(
    store: &Store,
    protocol: &Protocol,
    subjects: &[Subject],
    audit: AuditRecord,
) -> Result<LoadReport, LoadError> {
    let trial_id = protocol.id.as_str().to_string();
    let version = protocol.version;
    let protocol_json = protocol.to_json();
    let versions = store.trial_versions(&trial_id).await?;
    if let Some(latest) = versions.first() {
        if version < latest.version {
            return Err(LoadError::Conflict(format!(
                "trial {trial_id} is at protocol version {}; version {version} is older",
                latest.version
            )));
        }
    }
    let new_version = match versions.iter().find(|v| v.version == version) {
        Some(v) => {
            let same = match (Json::parse(&v.protocol), Json::parse(&protocol_json)) {
                (Ok(a), Ok(b)) => a.same_as(&b),
                _ => false,
            };
            if !same {
                return Err(LoadError::Conflict(format!(
                    "trial {trial_id} version {version} is already loaded with different content; an amendment must bump `version`"
                )));
            }
            false
        }
        None => true,
    };
    let now = clinflow_store::now_millis();
    let mut report = LoadReport {
        trial: trial_id.clone(),
        version,
        new_version,
        created: 0,
        updated: 0,
        unchanged: 0,
    };
    let mut ops = Vec::new();
    for json in clinflow_protocol::trial_resources(protocol, subjects) {
        let res = clinflow_fhir::validate::validate_json(json, None, "").map_err(|o| {
            anyhow::anyhow!(
                "the trial produced an invalid resource: {}",
                o.to_json_string()
            )
        })?;
        let rtype = res.resource_type().to_string();
        let id = res
            .id()
            .ok_or_else(|| anyhow::anyhow!("the trial produced a {rtype} without an id"))?
            .to_string();
        let current = store.read_current(&rtype, &id).await?;
        let expect = match &current {
            Some(c) if !c.deleted && rtype == "Organization" => {
                report.unchanged += 1;
                continue;
            }
            Some(c) if !c.deleted => {
                let stored = c.body.as_deref().and_then(|b| Json::parse(b).ok());
                if stored.is_some_and(|s| same_content(&s, res.json())) {
                    report.unchanged += 1;
                    continue;
                }
                report.updated += 1;
                Expect::Version(c.version)
            }
            Some(c) => {
                report.created += 1;
                Expect::Version(c.version)
            }
            None => {
                report.created += 1;
                Expect::Absent
            }
        };
        ops.push(build_op(res, &id, expect, now));
    }
    let mut rec = audit;
    rec.time = now;
    rec.action = "trial-load".into();
    rec.resource_type = Some("ResearchStudy".into());
    rec.resource_id = Some(trial_id.clone());
    rec.detail = Some(format!(
        "protocol version {version}: {} created, {} updated, {} unchanged",
        report.created, report.updated, report.unchanged
    ));
    if !ops.is_empty() || new_version {
        store
            .write(WriteRequest {
                queries: Vec::new(),
                ops,
                audit: vec![rec],
            })
            .await
            .map_err(|e| match e {
                clinflow_store::WriteError::Conflict { .. } => LoadError::Conflict(format!(
                    "trial {trial_id} changed during the load; retry: {e}"
                )),
                other => LoadError::Internal(anyhow::anyhow!(other)),
            })?;
    }
    if new_version {
        store
            .put_trial(TrialRecord {
                id: trial_id,
                version,
                protocol: protocol_json,
                loaded_at: now,
            })
            .await?;
    }
    Ok(report)
}

fn require_writer(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Admin | Role::DataManager => Ok(()),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not set up trials",
            r.as_str()
        ))),
    }
}

/// `POST /trials`: a protocol as YAML (`application/yaml`, `text/yaml`) or
/// JSON (`application/json`).
pub async fn post_trial(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the protocol is not UTF-8".into()))?;
    let protocol = match media_type(&headers).as_str() {
        "application/json" => clinflow_protocol::parse_json(text),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => {
            clinflow_protocol::parse_yaml(text)
        }
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type {other:?}: send the protocol as application/yaml or application/json"
            )))
        }
    }
    .map_err(|e| ApiError::Unprocessable(format!("the protocol is invalid: {e}")))?;
    let report = load(
        &state.store,
        &protocol,
        &[],
        caller.audit("trial-load", "success"),
    )
    .await?;
    state.sites.refresh_after_write().await;
    let status = if report.new_version || report.created > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, AxumJson(report)).into_response())
}

/// `POST /trials/{id}/subjects`: enrols the subjects of a CSV file
/// (`text/csv`) into the trial's current protocol.
pub async fn post_subjects(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    let latest = state
        .store
        .trial_versions(&id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("no trial {id:?}")))?;
    let protocol = clinflow_protocol::parse_json(&latest.protocol)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored protocol does not parse: {e}")))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the CSV is not UTF-8".into()))?;
    let subjects = clinflow_protocol::parse_subjects_csv(text, &protocol)
        .map_err(|e| ApiError::Unprocessable(format!("the subjects file is invalid: {e}")))?;
    let report = load(
        &state.store,
        &protocol,
        &subjects,
        caller.audit("trial-load", "success"),
    )
    .await?;
    state.sites.refresh_after_write().await;
    Ok(AxumJson(report).into_response())
}

fn trial_json(t: &TrialRecord) -> serde_json::Value {
    json!({
        "id": t.id,
        "version": t.version,
        "loaded_at": clinflow_fhir::datetime::format_instant(t.loaded_at),
        "protocol": serde_json::from_str::<serde_json::Value>(&t.protocol).unwrap_or(serde_json::Value::Null),
    })
}

/// `GET /trials`: every trial at its newest version.
pub async fn list_trials(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.deny_interface()?;
    let items: Vec<_> = state
        .store
        .list_trials()
        .await?
        .iter()
        .map(trial_json)
        .collect();
    Ok(AxumJson(json!({"items": items, "next": null})).into_response())
}

/// `GET /trials/{id}`: the newest protocol, and the versions loaded.
pub async fn get_trial(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.deny_interface()?;
    let versions = state.store.trial_versions(&id).await?;
    let latest = versions
        .first()
        .ok_or_else(|| ApiError::NotFound(format!("no trial {id:?}")))?;
    let mut body = trial_json(latest);
    body["versions"] = json!(versions
        .iter()
        .map(|v| json!({"version": v.version, "loaded_at": clinflow_fhir::datetime::format_instant(v.loaded_at)}))
        .collect::<Vec<_>>());
    Ok(AxumJson(body).into_response())
}
