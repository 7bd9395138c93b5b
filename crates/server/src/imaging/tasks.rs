//! `GET /imaging/tasks?status=&after=&limit=` (`{"items", "next"}`),
//! `GET /imaging/tasks/{id}` and `POST /imaging/tasks/{id}/retry` (a
//! failed or dead task queued again, audited). Tasks are operations data:
//! `admin`, `data-manager` and `monitor` read them; `admin` and
//! `data-manager` retry.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clinflow_store::{now_millis, TaskRecord, TaskStatus};
use serde_json::{json, Value};

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/imaging/tasks", get(list))
        .route("/imaging/tasks/{id}", get(one))
        .route("/imaging/tasks/{id}/retry", post(retry))
        .route("/imaging/quarantine", get(quarantine))
}

/// `GET /imaging/quarantine?limit=`: studies held because their PatientID
/// is not a trial subject, with the reason (`admin`, `data-manager`;
/// read-audited).
async fn quarantine(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Response, ApiError> {
    if !matches!(caller.principal.role, Role::Admin | Role::DataManager) {
        return Err(ApiError::Forbidden(
            "the imaging quarantine is for admins and data managers".into(),
        ));
    }
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let offset: usize = p.after.as_deref().and_then(|a| a.parse().ok()).unwrap_or(0);
    let q = clinflow_store::DicomQuery {
        include_quarantined: true,
        quarantined_only: true,
        limit: limit + 1,
        offset,
        ..Default::default()
    };
    let mut rows = state.store.dicom_studies(q).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let items: Vec<Value> = rows
        .iter()
        .map(|s| {
            json!({
                "study": s.study_uid,
                "patientId": s.patient_id,
                "studyDate": s.study_date,
                "reason": s.quarantine,
            })
        })
        .collect();
    let mut audit = caller.audit("imaging-quarantine-read", "success");
    audit.detail = Some(format!("results={}", items.len()));
    state.store.audit(vec![audit]).await?;
    let next = more.then(|| (offset + limit).to_string());
    Ok(Json(json!({"items": items, "next": next})).into_response())
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn may_read(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Admin | Role::DataManager | Role::Monitor => Ok(()),
        _ => Err(ApiError::Forbidden(
            "imaging tasks are for admins, data managers and monitors".into(),
        )),
    }
}

pub fn task_json(t: &TaskRecord) -> Value {
    json!({
        "id": t.id,
        "series": t.series_uid,
        "status": t.status.as_str(),
        "attempts": t.attempts,
        "maxAttempts": t.max_attempts,
        "nextAttemptAt": clinflow_fhir::datetime::format_instant(t.next_attempt_at),
        "leaseOwner": t.lease_owner,
        "lastError": t.last_error,
        "report": t.report_id.as_ref().map(|r| format!("DiagnosticReport/{r}")),
        "createdAt": clinflow_fhir::datetime::format_instant(t.created_at),
        "updatedAt": clinflow_fhir::datetime::format_instant(t.updated_at),
    })
}

#[derive(serde::Deserialize)]
struct ListParams {
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Response, ApiError> {
    may_read(&caller)?;
    let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).map_err(|_| {
            ApiError::BadRequest(format!(
                "status {s:?}: use queued, running, done, failed or dead"
            ))
        })?),
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut rows = state
        .store
        .imaging_tasks(status, p.after.filter(|a| !a.is_empty()), limit + 1)
        .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| rows.last().map(|t| t.id.clone())).flatten();
    let items: Vec<Value> = rows.iter().map(task_json).collect();
    Ok(Json(json!({"items": items, "next": next})).into_response())
}

async fn one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    may_read(&caller)?;
    let t = state
        .store
        .imaging_task(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such imaging task".into()))?;
    Ok(Json(task_json(&t)).into_response())
}

async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !matches!(caller.principal.role, Role::Admin | Role::DataManager) {
        return Err(ApiError::Forbidden(
            "retrying imaging tasks is for admins and data managers".into(),
        ));
    }
    let Some(t) = state.store.imaging_task(&id).await? else {
        return Err(ApiError::NotFound("no such imaging task".into()));
    };
    let mut audit = caller.audit("imaging-task-retry", "success");
    audit.detail = Some(format!("task={id}"));
    if !state
        .store
        .retry_imaging_task(&id, now_millis(), vec![audit])
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "the task is {}: only a failed or dead task can be retried",
            t.status.as_str()
        )));
    }
    state.imaging.wake.notify_waiters();
    let t = state.store.imaging_task(&id).await?.unwrap_or(t);
    Ok(Json(task_json(&t)).into_response())
}
