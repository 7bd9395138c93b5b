//! The ingest API: HL7 v2, wearable CSV, ePRO diaries and FHIR resources in, FHIR out.
//!
//! - `mod.rs` (this file): routes and handlers. `POST /ingest/hl7v2`,
//!   `/ingest/wearable`, `/ingest/diary`, `/ingest/fhir` accept a body: its raw bytes are
//!   committed (with an audit record) before the `202 {"batch", "status"}`;
//!   the same content in the same format is the same batch.
//!   `GET /ingest/batches/{id}` gives a batch's status, counts and
//!   rejections.
//! - [`pipeline`]: the bounded queue and the workers that run clinflow-edc
//!   on a batch and store what it gives (429 when the queue is full).
//! - [`context`]: the trial context (protocol, enrolled subjects) from the
//!   store.
//! - [`mllp`]: the MLLP listener (`--mllp-listen`): HL7 v2 over TCP, each
//!   message a batch accepted as above, answered with an ACK once done.
//!
//! Authorised: `interface`, `data-manager`, `admin`; `site-user` for its
//! own site's subjects and `patient` for its own diaries (a batch records
//! the scope; the map stage rejects items outside it, `out-of-scope`; they
//! see only their own batches).

pub mod context;
pub mod mllp;
pub mod pipeline;

use crate::media::media_type;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as AxumJson, Router};
use clinflow_edc::{ItemOutcome, TrialContext};
use clinflow_store::{BatchRecord, BatchRejection, IngestScope, NewBatch};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::state::AppState;

pub use pipeline::{IngestQueue, Pipeline, Stage, Stages};

/// The routes under `/ingest`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/hl7v2", post(post_hl7v2))
        .route("/wearable", post(post_wearable))
        .route("/diary", post(post_diary))
        .route("/fhir", post(post_fhir))
        .route("/batches/{id}", get(get_batch))
        .route("/batches/{id}/retry", post(retry_batch))
        .route("/items/{id}/retry", post(retry_item))
}

/// An input format, as a batch records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One or more HL7 v2 ER7 messages.
    Hl7v2,
    /// `subject,device,time,metric,value,unit`.
    WearableCsv,
    /// A diary object or an array of them.
    DiaryJson,
    /// One diary per line.
    DiaryNdjson,
    /// A FHIR Bundle (transaction, batch or collection).
    FhirBundle,
    /// One FHIR resource per line.
    FhirNdjson,
}

impl Format {
    pub fn code(self) -> &'static str {
        match self {
            Format::Hl7v2 => "hl7v2",
            Format::WearableCsv => "wearable-csv",
            Format::DiaryJson => "diary-json",
            Format::DiaryNdjson => "diary-ndjson",
            Format::FhirBundle => "fhir-bundle",
            Format::FhirNdjson => "fhir-ndjson",
        }
    }

    pub fn from_code(code: &str) -> Option<Format> {
        [
            Format::Hl7v2,
            Format::WearableCsv,
            Format::DiaryJson,
            Format::DiaryNdjson,
            Format::FhirBundle,
            Format::FhirNdjson,
        ]
        .into_iter()
        .find(|f| f.code() == code)
    }

    /// Runs clinflow-edc on the raw input: one outcome per item.
    pub fn ingest(self, ctx: &TrialContext, raw: &[u8]) -> Vec<ItemOutcome> {
        match self {
            Format::Hl7v2 => clinflow_edc::ingest_hl7(ctx, raw),
            Format::WearableCsv => clinflow_edc::ingest_csv(ctx, raw),
            Format::DiaryJson => clinflow_edc::ingest_diaries_json(ctx, raw),
            Format::DiaryNdjson => clinflow_edc::ingest_diaries_ndjson(ctx, raw),
            Format::FhirBundle => clinflow_edc::ingest_fhir_bundle(raw),
            Format::FhirNdjson => clinflow_edc::ingest_fhir_ndjson(raw),
        }
    }

    /// FHIR input: references by identifier are resolved before storing.
    pub fn is_fhir(self) -> bool {
        matches!(self, Format::FhirBundle | Format::FhirNdjson)
    }
}

/// Who may send `format`: interface, data-manager and admin anything; a
/// site user anything about its site's subjects; a patient its own diaries.
fn require_ingest_role(caller: &Caller, format: Option<Format>) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Interface | Role::DataManager | Role::Admin | Role::SiteUser => Ok(()),
        Role::Patient
            if format.is_none_or(|f| matches!(f, Format::DiaryJson | Format::DiaryNdjson)) =>
        {
            Ok(())
        }
        Role::Patient => Err(ApiError::Forbidden(
            "a patient may ingest its own diaries only".into(),
        )),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not ingest data",
            r.as_str()
        ))),
    }
}

/// Who may retry ingest batches and items: data managers and admins.
fn require_retry_role(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if matches!(caller.principal.role, Role::Admin | Role::DataManager) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "retrying an ingest {what} needs the data-manager or admin role"
        )))
    }
}

/// A rejection as the ingest API shows it, with the id of its item
/// (`BATCH.INDEX`, what `POST /ingest/items/{id}/retry` takes).
fn rejection_json(batch: &str, r: &BatchRejection) -> serde_json::Value {
    json!({
        "index": r.index,
        "item": format!("{batch}.{}", r.index),
        "reason": r.reason,
        "location": r.location,
    })
}

/// Whose items a batch from `caller` may store.
fn scope_of(caller: &Caller) -> Result<IngestScope, ApiError> {
    let p = &caller.principal;
    match p.role {
        Role::SiteUser => p.site.clone().map(IngestScope::Site),
        Role::Patient => p.patient.clone().map(IngestScope::Patient),
        _ => Some(IngestScope::All),
    }
    .ok_or_else(|| ApiError::Forbidden("the token has no site or patient to ingest for".into()))
}

/// Whether `caller` may see batch `b`: its scope within the caller's.
fn may_see(caller: &Caller, b: &BatchRecord) -> bool {
    match scope_of(caller) {
        Ok(IngestScope::All) => true,
        Ok(scope) => scope == b.scope,
        Err(_) => false,
    }
}

fn unsupported(got: &str, want: &str) -> ApiError {
    ApiError::UnsupportedMediaType(format!("Content-Type {got:?}: send {want}"))
}

/// `POST /ingest/hl7v2`: one or more ER7 messages.
pub async fn post_hl7v2(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let takes = [
        ("application/hl7-v2", Format::Hl7v2),
        ("x-application/hl7-v2+er7", Format::Hl7v2),
        ("text/plain", Format::Hl7v2),
    ];
    let described = "application/hl7-v2, x-application/hl7-v2+er7 or text/plain";
    ingest_as(&state, &caller, &headers, body, &takes, described).await
}

/// `POST /ingest/wearable`: a wearable CSV file.
pub async fn post_wearable(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let takes = [("text/csv", Format::WearableCsv)];
    ingest_as(&state, &caller, &headers, body, &takes, "text/csv").await
}

/// `POST /ingest/diary`: a diary or an array (JSON), or NDJSON.
pub async fn post_diary(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let takes = [
        ("application/json", Format::DiaryJson),
        ("application/x-ndjson", Format::DiaryNdjson),
    ];
    let described = "application/json or application/x-ndjson";
    ingest_as(&state, &caller, &headers, body, &takes, described).await
}

/// `POST /ingest/fhir`: a Bundle, or NDJSON (one resource a line).
pub async fn post_fhir(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let takes = [
        ("application/fhir+json", Format::FhirBundle),
        ("application/fhir+ndjson", Format::FhirNdjson),
        ("application/x-ndjson", Format::FhirNdjson),
    ];
    let described =
        "application/fhir+json (a Bundle), application/fhir+ndjson or application/x-ndjson";
    ingest_as(&state, &caller, &headers, body, &takes, described).await
}

/// What every ingest endpoint does: the role check, the input format from
/// the Content-Type (`takes`; 415 naming `described` otherwise), then
/// [`accept`].
async fn ingest_as(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Bytes,
    takes: &[(&str, Format)],
    described: &str,
) -> Result<Response, ApiError> {
    // Every media type an endpoint takes is one family of formats.
    require_ingest_role(caller, takes.first().map(|(_, f)| *f))?;
    let media = media_type(headers);
    let format = takes
        .iter()
        .find(|(m, _)| *m == media)
        .map(|(_, f)| *f)
        .ok_or_else(|| unsupported(&media, described))?;
    accept(state, caller, format, body).await
}

/// Stores the raw input durably, queues the batch, answers 202.
async fn accept(
    state: &AppState,
    caller: &Caller,
    format: Format,
    body: Bytes,
) -> Result<Response, ApiError> {
    let batch = accept_batch(state, caller, format, body).await?;
    Ok(accepted(&batch.id, batch.status.as_str()))
}

/// `202 {"batch", "status"}` with the batch's Location.
fn accepted(id: &str, status: &str) -> Response {
    let mut resp = (
        StatusCode::ACCEPTED,
        AxumJson(json!({"batch": id, "status": status})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/ingest/batches/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The one way into the pipeline (HTTP and MLLP): commits the raw input
/// with an `ingest-accept` audit record and queues the batch, or finds the
/// batch of the same content. `TooManyRequests` (nothing stored) when the
/// queue is full.
pub(crate) async fn accept_batch(
    state: &AppState,
    caller: &Caller,
    format: Format,
    body: Bytes,
) -> Result<BatchRecord, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest("the body is empty".into()));
    }
    if state.store.list_trials().await?.is_empty() {
        return Err(ApiError::Conflict(
            "no trial is loaded: ingest checks data against a protocol (POST /trials first)".into(),
        ));
    }
    // A place in the queue first: a batch once stored always gets one.
    let place = state.ingest.reserve()?;
    let sha256 = hex::encode(Sha256::digest(&body));
    let id = crate::fhir::write::new_id();
    let mut rec = caller.audit("ingest-accept", "success");
    rec.detail = Some(format!(
        "batch {id}: {} bytes of {}, sha256 {sha256}",
        body.len(),
        format.code()
    ));
    let batch = NewBatch {
        id,
        format: format.code().to_string(),
        sha256,
        submitter: caller.principal.name.clone(),
        role: caller.principal.role.as_str().to_string(),
        scope: scope_of(caller)?,
        received_at: clinflow_store::now_millis(),
        raw: body.to_vec(),
    };
    let (batch, created) = state.store.put_batch(batch, vec![rec]).await?;
    if created {
        place.send(batch.id.clone());
    }
    Ok(batch)
}

/// `GET /ingest/batches/{id}`.
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_ingest_role(&caller, None)?;
    let batch = state
        .store
        .batch(&id)
        .await?
        .filter(|b| may_see(&caller, b))
        .ok_or_else(|| ApiError::NotFound(format!("no ingest batch {id:?}")))?;
    let rejections: Vec<_> = state
        .store
        .batch_rejections(&id)
        .await?
        .into_iter()
        .map(|r| rejection_json(&id, &r))
        .collect();
    let k = batch.counts;
    Ok(AxumJson(json!({
        "batch": batch.id,
        "format": batch.format,
        "status": batch.status.as_str(),
        "received": k.received,
        "stored": k.stored,
        "rejected": k.rejected,
        "duplicates": k.duplicates,
        "queries_opened": k.queries_opened,
        "rejections": rejections,
    }))
    .into_response())
}

/// `POST /ingest/items/{id}/retry` (data-manager, admin), `id` being
/// `BATCH.INDEX` (the `item` of a rejection in the batch's status): runs
/// that one rejected item again against the trial as it is now (after a
/// subject was enrolled or the protocol amended). Answers 200 with what it
/// became (`stored`, `duplicate`, `rejected`, or `stored-before` for an
/// item stored with some values rejected, which stay so) and its
/// rejections now; the batch's counts follow. Audited (`ingest-item-retry`).
pub async fn retry_item(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_retry_role(&caller, "item")?;
    let (batch, index) = id
        .rsplit_once('.')
        .and_then(|(b, i)| Some((b, i.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "{id:?} is not an ingest item id (BATCH.INDEX, as a rejection's \"item\" gives it)"
            ))
        })?;
    let audit = caller.audit("ingest-item-retry", "success");
    let r = state.ingest.retry_item(batch, index, audit).await?;
    let rejections: Vec<_> = r
        .rejections
        .iter()
        .map(|r| rejection_json(batch, r))
        .collect();
    Ok(AxumJson(json!({
        "item": id,
        "batch": batch,
        "index": index,
        "outcome": r.outcome,
        "rejections": rejections,
    }))
    .into_response())
}

/// `POST /ingest/batches/{id}/retry` (data-manager, admin): runs a done
/// batch again from its raw input against the trial as it is now (after a
/// subject was enrolled or the protocol amended). What it stored before
/// stays stored once (processing is idempotent); what is still rejected is
/// listed again. Answers 202 like an ingest; 409 while the batch is still
/// processing; 429 when the queue is full (nothing changed).
pub async fn retry_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_retry_role(&caller, "batch")?;
    let batch = state
        .store
        .batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no ingest batch {id:?}")))?;
    let place = state.ingest.reserve()?;
    let k = batch.counts;
    let mut rec = caller.audit("ingest-retry", "success");
    rec.detail = Some(format!(
        "batch {id} ({}): before the retry {} received, {} stored, {} rejected, {} duplicates",
        batch.format, k.received, k.stored, k.rejected, k.duplicates
    ));
    if !state.store.reopen_batch(&id, vec![rec]).await? {
        return Err(ApiError::Conflict(format!(
            "ingest batch {id} is still processing; retry it once it is done"
        )));
    }
    place.send(id.clone());
    Ok(accepted(&id, "processing"))
}
