//! The data-query API: the queries ingest opens for values outside the
//! protocol's soft range, and their lifecycle.
//!
//! - `GET /queries?site=&status=&cursor=&count=`: `{"items": [...], "next":
//!   CURSOR_OR_NULL}`, in opening order (keyset paging on the UUIDv7 id).
//! - `POST /queries/{id}/answer` (`{"answer": TEXT}`): open -> answered.
//! - `POST /queries/{id}/close`: open or answered -> closed.
//!
//! A step the query's status does not allow is a `409`. Each step commits
//! with its audit record (`query-answer`, `query-close`, entity the query)
//! in one transaction; queries are never deleted.
//!
//! Site scoped: a `site-user` sees and changes only its own site's queries
//! (another site's is a `404`, as for resources); `monitor`,
//! `data-manager` and `admin` all of them; `patient` and `interface` none
//! (`403`).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use clinflow_fhir::datetime::format_instant;
use clinflow_store::{DataQueryRecord, QueryChange, QueryFilter, QueryStatus};
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::state::AppState;

/// The audit record's resource type for a data query.
pub const AUDIT_ENTITY: &str = "DataQuery";
/// Queries per page when `count` is not given, and at most.
const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 1000;

/// Which sites' queries a caller may see and change.
enum QueryScope {
    All,
    Site(String),
}

fn scope(caller: &Caller) -> Result<QueryScope, ApiError> {
    let p = &caller.principal;
    match p.role {
        Role::Admin | Role::DataManager | Role::Monitor => Ok(QueryScope::All),
        Role::SiteUser => p
            .site
            .clone()
            .map(QueryScope::Site)
            .ok_or_else(|| ApiError::Forbidden("this site-user token has no site".into())),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not see data queries",
            r.as_str()
        ))),
    }
}

#[derive(serde::Deserialize)]
pub struct ListParams {
    site: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    count: Option<usize>,
}

/// `GET /queries`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Response, ApiError> {
    let scope = scope(&caller)?;
    let status = match p.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(QueryStatus::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!("status {s:?}: use open, answered or closed"))
        })?),
    };
    let site = p.site.filter(|s| !s.is_empty());
    let site = match scope {
        QueryScope::All => site,
        // Another site's queries are not there for this caller: none match.
        QueryScope::Site(own) if site.as_ref().is_some_and(|s| *s != own) => {
            return Ok(AxumJson(json!({"items": [], "next": null})).into_response())
        }
        QueryScope::Site(own) => Some(own),
    };
    let count = p.count.unwrap_or(DEFAULT_COUNT).clamp(1, MAX_COUNT);
    let mut rows = state
        .store
        .data_queries(QueryFilter {
            site,
            status,
            after: p.cursor.filter(|c| !c.is_empty()),
            limit: count + 1,
        })
        .await?;
    let more = rows.len() > count;
    rows.truncate(count);
    let next = more
        .then(|| rows.last().map(|q| q.query.id.clone()))
        .flatten();
    let items: Vec<_> = rows.iter().map(query_json).collect();
    Ok(AxumJson(json!({"items": items, "next": next})).into_response())
}

#[derive(serde::Deserialize)]
pub struct AnswerBody {
    answer: String,
}

/// `POST /queries/{id}/answer`.
pub async fn answer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: AnswerBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest("the body must be a JSON object {\"answer\": TEXT}".into())
    })?;
    if body.answer.trim().is_empty() {
        return Err(ApiError::Unprocessable("the answer is empty".into()));
    }
    change(
        &state,
        &caller,
        &id,
        QueryChange::Answer(body.answer),
        "query-answer",
    )
    .await
}

/// `POST /queries/{id}/close`.
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    change(&state, &caller, &id, QueryChange::Close, "query-close").await
}

async fn change(
    state: &AppState,
    caller: &Caller,
    id: &str,
    step: QueryChange,
    action: &str,
) -> Result<Response, ApiError> {
    let scope = scope(caller)?;
    let not_found = || ApiError::NotFound(format!("no data query {id:?}"));
    let current = state.store.data_query(id).await?.ok_or_else(not_found)?;
    if let QueryScope::Site(own) = &scope {
        if current.query.site != *own {
            return Err(not_found());
        }
    }
    let mut rec = caller.audit(action, "success");
    rec.resource_type = Some(AUDIT_ENTITY.into());
    rec.resource_id = Some(id.to_string());
    rec.detail = Some(format!(
        "{} -> {}",
        current.status.as_str(),
        match step {
            QueryChange::Answer(_) => "answered",
            QueryChange::Close => "closed",
        }
    ));
    let now = rec.time;
    let changed = state
        .store
        .change_query(id, step.clone(), &caller.principal.name, now, vec![rec])
        .await?;
    let after = state.store.data_query(id).await?.ok_or_else(not_found)?;
    if !changed {
        return Err(ApiError::Conflict(format!(
            "the data query is {}: it cannot be {}",
            after.status.as_str(),
            match step {
                QueryChange::Answer(_) => "answered (only an open query can)",
                QueryChange::Close => "closed again",
            }
        )));
    }
    Ok(AxumJson(query_json(&after)).into_response())
}

fn query_json(r: &DataQueryRecord) -> serde_json::Value {
    let q = &r.query;
    let who = |at: Option<i64>, by: &Option<String>| match (at, by) {
        (Some(at), Some(by)) => json!({"at": format_instant(at), "by": by}),
        _ => serde_json::Value::Null,
    };
    json!({
        "id": q.id,
        "trial": q.trial,
        "site": q.site,
        "patient": q.patient,
        "resource": format!("{}/{}", q.resource_type, q.resource_id),
        "measurement": q.measurement,
        "value": q.value,
        "unit": q.unit,
        "soft": [q.soft_low, q.soft_high],
        "location": q.location,
        "text": q.text,
        "status": r.status.as_str(),
        "answer": r.answer,
        "opened": {"at": format_instant(q.opened_at), "by": q.opened_by},
        "answered": who(r.answered_at, &r.answered_by),
        "closed": who(r.closed_at, &r.closed_by),
    })
}
