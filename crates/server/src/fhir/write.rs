//! Create, update and delete of single resources.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clinflow_fhir::{IssueCode, OperationOutcome, Resource};
use clinflow_store::{Expect, StoredResource, WriteError, WriteOp, WriteRequest};

use super::{
    body_text, check_may_write, check_type, check_write_scope, etag, in_scope, parse_if_match,
    read_scope, resource_response, FhirBody,
};
use crate::auth::Caller;
use crate::error::FhirError;
use crate::state::AppState;

/// How many times an update without `If-Match` retries when another writer
/// got in between its read and its write.
const UPDATE_RETRIES: usize = 3;

/// A validation failure as an HTTP error: 400 when the body is not a
/// resource of the type asked for (no element path to blame, or only its
/// `resourceType`: missing, unknown, or not the type in the URL), 422 when
/// its content is invalid.
pub fn invalid(outcome: OperationOutcome) -> FhirError {
    fn blames_content(expression: &str) -> bool {
        let resource_type = expression == "resourceType"
            || (expression.starts_with("Bundle.entry[")
                && expression.ends_with("].resource.resourceType"));
        !resource_type
    }
    let content = outcome
        .issues
        .iter()
        .any(|i| i.expression.iter().any(|e| blames_content(e)));
    let status = if content {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::BAD_REQUEST
    };
    FhirError::new(status, outcome)
}

/// Refuses writes to types clinflow keeps read-only through the API.
pub fn check_writable_type(rtype: &str) -> Result<(), FhirError> {
    if rtype == "AuditEvent" {
        return Err(FhirError::of(
            StatusCode::METHOD_NOT_ALLOWED,
            IssueCode::NotSupported,
            "the audit trail is append-only and written by the server alone",
        ));
    }
    Ok(())
}

/// A new server-assigned logical id: a UUIDv7, time-ordered, so that new
/// resources append to the store's B-trees instead of landing on random
/// pages (measured: random v4 ids cost SQLite ~5x the page writes per
/// resource). The time part reveals only the creation time, which
/// `meta.lastUpdated` of version 1 shows anyway.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Turns a validated resource into the version to store: sets `id` and
/// `meta`, extracts the index.
pub fn build_op(mut res: Resource, id: &str, expect: Expect, now: i64) -> WriteOp {
    let new_version = match expect {
        Expect::Absent => 1,
        Expect::Version(v) => v + 1,
    };
    res.set_id(id);
    res.set_meta(new_version, &clinflow_fhir::datetime::format_instant(now));
    let extracted = clinflow_fhir::index::extract(&res);
    WriteOp {
        resource_type: res.resource_type().to_string(),
        id: id.to_string(),
        expect,
        new_version,
        last_updated: now,
        body: Some(res.to_json_string()),
        extracted,
    }
}

/// The version that deletes `rtype/id`, now at `current` (deleted or not).
pub fn delete_op(rtype: &str, id: &str, current: u64) -> WriteOp {
    WriteOp {
        resource_type: rtype.to_string(),
        id: id.to_string(),
        expect: Expect::Version(current),
        new_version: current + 1,
        last_updated: clinflow_store::now_millis(),
        body: None,
        extracted: Default::default(),
    }
}

/// Why a resource the server built itself (a site's Organization, the
/// demo data) cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum BuiltError {
    #[error("the resource JSON does not parse: {0}")]
    NotJson(String),
    /// The OperationOutcome's JSON.
    #[error("the resource is invalid: {0}")]
    Invalid(String),
}

/// A resource the server built, as the version to store: read and
/// validated as a client's would be, then as [`build_op`] makes it.
pub fn built_op(
    resource: &serde_json::Value,
    id: &str,
    expect: Expect,
    now: i64,
) -> Result<WriteOp, BuiltError> {
    built_op_text(&resource.to_string(), id, expect, now)
}

/// [`built_op`] for a resource the server wrote as JSON text. Decimals keep
/// the text they are written with (`80.00` is stored and served as
/// `80.00`); a `serde_json::Value` holds them as f64 and writes `80.0`, so
/// a resource whose decimals must keep their precision (money) is built
/// as text.
pub fn built_op_text(
    text: &str,
    id: &str,
    expect: Expect,
    now: i64,
) -> Result<WriteOp, BuiltError> {
    let json = clinflow_fhir::Json::parse(text).map_err(|e| BuiltError::NotJson(e.to_string()))?;
    let res = clinflow_fhir::validate::validate_json(json, None, "")
        .map_err(|o| BuiltError::Invalid(o.to_json_string()))?;
    Ok(build_op(res, id, expect, now))
}

/// The version a committed op created, as it will be read back.
pub fn stored_of(op: &WriteOp) -> StoredResource {
    StoredResource {
        resource_type: op.resource_type.clone(),
        id: op.id.clone(),
        version: op.new_version,
        last_updated: op.last_updated,
        deleted: op.body.is_none(),
        body: op.body.clone(),
        patient: op.extracted.patient.clone(),
    }
}

/// A write conflict as the HTTP error FHIR expects.
pub fn conflict_error(e: WriteError, if_match: bool) -> FhirError {
    match e {
        WriteError::Conflict {
            resource_type,
            id,
            found,
            ..
        } => {
            let (status, msg) = if if_match {
                (
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "{resource_type}/{id} is at version {}, not the one in If-Match",
                        found.map_or("none".to_string(), |v| v.to_string())
                    ),
                )
            } else {
                (
                    StatusCode::CONFLICT,
                    format!(
                        "{resource_type}/{id} was changed by someone else at the same time; retry"
                    ),
                )
            };
            let code = if if_match {
                IssueCode::Conflict
            } else {
                IssueCode::Duplicate
            };
            FhirError::of(status, code, msg)
        }
        WriteError::Closed => FhirError::of(
            StatusCode::SERVICE_UNAVAILABLE,
            IssueCode::Exception,
            "the server is shutting down",
        ),
        WriteError::Db(e) => FhirError::internal(e),
    }
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(rtype): Path<String>,
    FhirBody(body): FhirBody,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    check_writable_type(&rtype)?;
    check_may_write(&caller)?;
    let res = clinflow_fhir::validate::parse_resource(body_text(&body)?, Some(&rtype))
        .map_err(invalid)?;
    let id = new_id();
    let op = build_op(res, &id, Expect::Absent, clinflow_store::now_millis());
    check_write_scope(&state, &caller, op.extracted.patient.as_deref()).await?;
    let stored = stored_of(&op);
    let mut rec = caller.audit("create", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    rec.version = Some(1);
    state
        .store
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![op],
            audit: vec![rec],
        })
        .await
        .map_err(|e| conflict_error(e, false))?;
    state.metrics.resources_written.inc();
    state.sites.after_fhir_write([rtype.as_str()]).await;
    let mut resp = resource_response(StatusCode::CREATED, &stored);
    if let Ok(v) = HeaderValue::from_str(&format!("/fhir/{rtype}/{id}/_history/1")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    FhirBody(body): FhirBody,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    check_writable_type(&rtype)?;
    check_may_write(&caller)?;
    if !clinflow_fhir::validate::is_valid_id(&id) {
        return Err(FhirError::bad_request(format!(
            "{id:?} is not a valid FHIR id"
        )));
    }
    let if_match = parse_if_match(&headers)?;
    let res = clinflow_fhir::validate::parse_resource(body_text(&body)?, Some(&rtype))
        .map_err(invalid)?;
    match res.id() {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::bad_request(format!(
                "the resource's id {body_id:?} differs from the id in the URL {id:?}"
            )))
        }
        None => {
            return Err(FhirError::bad_request(
                "an update needs the resource's id in the body",
            ))
        }
    }
    let scope = read_scope(&caller)?;
    for _ in 0..UPDATE_RETRIES {
        let current = state.store.read_current(&rtype, &id).await?;
        if let Some(c) = &current {
            if !in_scope(&state, &scope, c.patient.as_deref()).await? {
                return Err(FhirError::forbidden(
                    "this resource belongs to a subject outside your scope",
                ));
            }
            check_write_scope(&state, &caller, c.patient.as_deref()).await?;
        }
        let expect = match (if_match, &current) {
            (Some(v), Some(c)) if c.version == v => Expect::Version(v),
            (Some(v), c) => {
                return Err(FhirError::of(
                    StatusCode::PRECONDITION_FAILED,
                    IssueCode::Conflict,
                    format!(
                        "{rtype}/{id} is at version {}, not {v}",
                        c.as_ref()
                            .map_or("none".to_string(), |c| c.version.to_string())
                    ),
                ))
            }
            (None, Some(c)) => Expect::Version(c.version),
            (None, None) => Expect::Absent,
        };
        let op = build_op(res.clone(), &id, expect, clinflow_store::now_millis());
        check_write_scope(&state, &caller, op.extracted.patient.as_deref()).await?;
        let stored = stored_of(&op);
        let mut rec = caller.audit("update", "success");
        rec.resource_type = Some(rtype.clone());
        rec.resource_id = Some(id.clone());
        rec.version = Some(op.new_version);
        match state
            .store
            .write(WriteRequest {
                queries: Vec::new(),
                ops: vec![op],
                audit: vec![rec],
            })
            .await
        {
            Ok(()) => {
                state.metrics.resources_written.inc();
                state
                    .sites
                    .after_fhir_write([stored.resource_type.as_str()])
                    .await;
                let status = if stored.version == 1 {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                return Ok(resource_response(status, &stored));
            }
            Err(e @ WriteError::Conflict { .. }) if if_match.is_some() => {
                return Err(conflict_error(e, true))
            }
            Err(WriteError::Conflict { .. }) => continue,
            Err(e) => return Err(conflict_error(e, false)),
        }
    }
    Err(FhirError::of(
        StatusCode::CONFLICT,
        IssueCode::Conflict,
        format!("{rtype}/{id} kept changing under this update; retry"),
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    check_writable_type(&rtype)?;
    check_may_write(&caller)?;
    let if_match = parse_if_match(&headers)?;
    let scope = read_scope(&caller)?;
    let current = match state.store.read_current(&rtype, &id).await? {
        Some(c) if in_scope(&state, &scope, c.patient.as_deref()).await? => c,
        _ => return Err(FhirError::not_found(&rtype, &id)),
    };
    check_write_scope(&state, &caller, current.patient.as_deref()).await?;
    if let Some(v) = if_match {
        if v != current.version {
            return Err(FhirError::of(
                StatusCode::PRECONDITION_FAILED,
                IssueCode::Conflict,
                format!("{rtype}/{id} is at version {}, not {v}", current.version),
            ));
        }
    }
    // A site's Organization is deleted through the site registry, which
    // refuses while a trial lists the site or patients are enrolled there.
    if rtype == "Organization" && !current.deleted && state.sites.snapshot().get(&id).is_some() {
        return Err(FhirError::of(
            StatusCode::CONFLICT,
            IssueCode::Conflict,
            format!("Organization/{id} is a trial site: delete it with DELETE /sites/{id}"),
        ));
    }
    if current.deleted {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        resp.headers_mut()
            .insert(header::ETAG, etag(current.version));
        return Ok(resp);
    }
    let op = delete_op(&rtype, &id, current.version);
    let mut rec = caller.audit("delete", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    rec.version = Some(op.new_version);
    let new_version = op.new_version;
    state
        .store
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![op],
            audit: vec![rec],
        })
        .await
        .map_err(|e| conflict_error(e, true))?;
    state.sites.after_fhir_write([rtype.as_str()]).await;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::ETAG, etag(new_version));
    Ok(resp)
}
