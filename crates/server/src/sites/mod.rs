//! The site registry: `/sites` served from an in-memory snapshot
//! ([`registry`]), written through to the FHIR store (a site is its
//! `Organization`, [`model`]).
//!
//! - `GET /sites/{id}`, `GET /sites?country=&q=&trial=&limit=&after=`:
//!   every role but `interface`; from the snapshot, with `ETag`, `304` on a
//!   matching `If-None-Match`, and `Cache-Control: private, no-cache` (the
//!   answers need a token, so no shared cache may keep them, and a client
//!   revalidates each time, which a 304 makes cheap).
//! - `POST /sites`, `PUT /sites/{id}` (optional `If-Match`),
//!   `DELETE /sites/{id}`: admin and data-manager. Each writes the
//!   `Organization` and an audit record in one transaction, then rebuilds
//!   the snapshot before answering, so the writer's next read sees it.
//!
//! A site listed by a trial's protocol, or with patients enrolled, cannot be
//! deleted (409): deactivate it (`"active": false`) instead.

pub mod model;
pub mod registry;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clinflow_store::{Expect, WriteError, WriteOp, WriteRequest};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::fhir::write::{built_op, delete_op, BuiltError};
use crate::state::AppState;
pub use model::Site;
pub use registry::SiteRegistry;

const CACHE_CONTROL: HeaderValue = HeaderValue::from_static("private, no-cache");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// Page size of `GET /sites` when `limit` is not given, and its maximum.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// The routes, at the top level (not nested: a nested router costs a
/// prefix strip per request, measurable on the hot read).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sites", get(list).post(create))
        .route("/sites/{id}", get(read).put(update).delete(remove))
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| {
            t == "*"
                || t.as_bytes() == etag.as_bytes()
                || t.strip_prefix("W/")
                    .is_some_and(|w| w.as_bytes() == etag.as_bytes())
        })
}

fn answer(headers: &HeaderMap, etag: HeaderValue, body: Bytes) -> Response {
    let (status, body) = if not_modified(headers, &etag) {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else {
        (StatusCode::OK, Body::from(body))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if status == StatusCode::OK {
        h.insert(header::CONTENT_TYPE, JSON);
    }
    h.insert(header::ETAG, etag);
    h.insert(header::CACHE_CONTROL, CACHE_CONTROL);
    resp
}

/// `GET /sites/{id}`: the hot path; a map lookup and a pre-rendered body.
/// It reads the caller and the headers in place (the `Caller` and
/// `HeaderMap` extractors copy them: measurable at this rate).
async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let principal = req
        .extensions()
        .get::<Arc<crate::auth::Principal>>()
        .ok_or(ApiError::Unauthorized)?;
    if principal.role == Role::Interface {
        return Err(ApiError::Forbidden(
            "the interface role may use the ingest endpoints only".into(),
        ));
    }
    let snap = state.sites.snapshot();
    let entry = snap
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no site {id:?}")))?;
    Ok(answer(
        req.headers(),
        entry.etag.clone(),
        entry.body.clone(),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    country: Option<String>,
    /// Case-insensitive text in the id, name or city.
    q: Option<String>,
    trial: Option<String>,
    limit: Option<usize>,
    /// The last id of the previous page.
    after: Option<String>,
}

/// `GET /sites`: filtered, in id order, paged by id.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.deny_interface()?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let snap = state.sites.snapshot();
    let q = p.q.as_deref().map(str::to_lowercase);
    let matches: Vec<_> = snap
        .sites
        .iter()
        .filter(|e| {
            p.country
                .as_deref()
                .is_none_or(|c| e.site.country.as_str().eq_ignore_ascii_case(c))
                && p.trial
                    .as_deref()
                    .is_none_or(|t| e.trials.iter().any(|x| x == t))
                && q.as_deref().is_none_or(|q| {
                    e.site.id.as_str().to_lowercase().contains(q)
                        || e.site.name.to_lowercase().contains(q)
                        || e.site.city.to_lowercase().contains(q)
                })
        })
        .collect();
    let total = matches.len();
    let start = match &p.after {
        Some(a) => matches.partition_point(|e| e.site.id.as_str() <= a.as_str()),
        None => 0,
    };
    let page = &matches[start..(start + limit).min(total)];
    let next = (start + limit < total).then(|| {
        let mut qs = url_query(&p);
        qs.push((
            "after",
            page.last()
                .map(|e| e.site.id.to_string())
                .unwrap_or_default(),
        ));
        format!(
            "/sites?{}",
            qs.iter()
                .map(|(k, v)| format!("{k}={}", percent(v)))
                .collect::<Vec<_>>()
                .join("&")
        )
    });
    let mut body = Vec::with_capacity(64 + page.len() * 256);
    body.extend_from_slice(b"{\"items\":[");
    for (i, e) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.body);
    }
    body.extend_from_slice(b"],\"total\":");
    body.extend_from_slice(total.to_string().as_bytes());
    body.extend_from_slice(b",\"next\":");
    body.extend_from_slice(serde_json::to_string(&next).unwrap_or_default().as_bytes());
    body.push(b'}');
    // The same snapshot and the same question give the same answer.
    let mut h = Sha256::new();
    h.update(&snap.digest);
    h.update(headers_query_key(&p));
    let etag = HeaderValue::from_str(&format!("\"l-{}\"", hex::encode(&h.finalize()[..12])))
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(answer(&headers, etag, Bytes::from(body)))
}

fn url_query(p: &ListParams) -> Vec<(&'static str, String)> {
    let mut qs = Vec::new();
    for (k, v) in [("country", &p.country), ("q", &p.q), ("trial", &p.trial)] {
        if let Some(v) = v {
            qs.push((k, v.clone()));
        }
    }
    if let Some(l) = p.limit {
        qs.push(("limit", l.to_string()));
    }
    qs
}

fn headers_query_key(p: &ListParams) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        p.country, p.q, p.trial, p.limit, p.after
    )
}

/// Percent-encodes a query value (unreserved characters kept).
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn require_writer(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Admin | Role::DataManager => Ok(()),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not change sites",
            r.as_str()
        ))),
    }
}

fn parse_site(body: &Bytes, path_id: Option<&str>) -> Result<Site, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    Site::from_json(&v, path_id).map_err(|e| ApiError::Unprocessable(e.to_string()))
}

/// The version `If-Match` asks for, if sent: the tag must be the site's
/// current ETag, compared strongly (a weak tag never matches, RFC 9110).
/// A stale tag is 412; the version returned is then checked again in the
/// write's transaction.
fn if_match(state: &AppState, headers: &HeaderMap, id: &str) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let snap = state.sites.snapshot();
    match snap.get(id) {
        Some(e) if v.as_bytes() == e.etag.as_bytes() => Ok(Some(e.version)),
        _ => Err(ApiError::PreconditionFailed(format!(
            "If-Match is not the current ETag of site {id:?}; read it again"
        ))),
    }
}

/// Writes `site` as its Organization, with `expect` as the version check.
async fn write_site(
    state: &AppState,
    caller: &Caller,
    site: &Site,
    expect: Expect,
    action: &str,
) -> Result<(), ApiError> {
    let op = built_op(
        &site.to_organization(),
        site.id.as_str(),
        expect,
        clinflow_store::now_millis(),
    )
    .map_err(|e| match e {
        BuiltError::NotJson(e) => {
            ApiError::Internal(anyhow::anyhow!("site JSON does not parse: {e}"))
        }
        BuiltError::Invalid(o) => {
            ApiError::Unprocessable(format!("the site is not a valid Organization: {o}"))
        }
    })?;
    commit(state, caller, op, action).await
}

async fn commit(
    state: &AppState,
    caller: &Caller,
    op: WriteOp,
    action: &str,
) -> Result<(), ApiError> {
    let mut audit = caller.audit(action, "success");
    audit.resource_type = Some("Organization".into());
    audit.resource_id = Some(op.id.clone());
    audit.version = Some(op.new_version);
    let id = op.id.clone();
    state
        .store
        .write(WriteRequest {
            ops: vec![op],
            audit: vec![audit],
            queries: Vec::new(),
        })
        .await
        .map_err(|e| match e {
            WriteError::Conflict { .. } => ApiError::Conflict(format!(
                "site {id:?} changed meanwhile; read it again and retry"
            )),
            other => ApiError::Internal(anyhow::anyhow!(other)),
        })?;
    state.sites.refresh_after_write().await;
    Ok(())
}

fn site_response(state: &AppState, id: &str, status: StatusCode) -> Response {
    let snap = state.sites.snapshot();
    let mut resp = match snap.get(id) {
        Some(e) => {
            let mut r = Response::new(Body::from(e.body.clone()));
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            r.headers_mut().insert(header::ETAG, e.etag.clone());
            r
        }
        // Committed, but the refresh failed (logged): the write stands.
        None => Response::new(Body::empty()),
    };
    *resp.status_mut() = status;
    if let Ok(loc) = HeaderValue::from_str(&format!("/sites/{id}")) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// `POST /sites`: a new site; 409 when the id is taken.
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    let site = parse_site(&body, None)?;
    let expect = match state
        .store
        .read_current("Organization", site.id.as_str())
        .await?
    {
        None => Expect::Absent,
        Some(c) if c.deleted => Expect::Version(c.version),
        Some(_) => {
            return Err(ApiError::Conflict(format!(
                "site {:?} exists; PUT /sites/{} changes it",
                site.id.as_str(),
                site.id
            )))
        }
    };
    write_site(&state, &caller, &site, expect, "site-create").await?;
    Ok(site_response(&state, site.id.as_str(), StatusCode::CREATED))
}

/// `PUT /sites/{id}`: creates or replaces; with `If-Match`, only if the
/// site is still at that version (else 412).
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    let site = parse_site(&body, Some(&id))?;
    let wanted = if_match(&state, &headers, &id)?;
    let current = state.store.read_current("Organization", &id).await?;
    let live = current.as_ref().filter(|c| !c.deleted);
    if let Some(w) = wanted {
        if live.map(|c| c.version) != Some(w) {
            return Err(ApiError::PreconditionFailed(format!(
                "site {id:?} is not at version {w}"
            )));
        }
    }
    if let Some(c) = live {
        let stored = c
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .and_then(|j| Site::from_organization(&j).ok().flatten());
        if stored.as_ref() == Some(&site) {
            return Ok(site_response(&state, &id, StatusCode::OK));
        }
    }
    let expect = match &current {
        None => Expect::Absent,
        Some(c) => Expect::Version(c.version),
    };
    let (action, status) = if live.is_some() {
        ("site-update", StatusCode::OK)
    } else {
        ("site-create", StatusCode::CREATED)
    };
    write_site(&state, &caller, &site, expect, action).await?;
    Ok(site_response(&state, &id, status))
}

/// `DELETE /sites/{id}`: only a site no trial lists and no patient is
/// enrolled at.
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    let snap = state.sites.snapshot();
    let current = state
        .store
        .read_current("Organization", &id)
        .await?
        .filter(|c| !c.deleted)
        .ok_or_else(|| ApiError::NotFound(format!("no site {id:?}")))?;
    if let Some(e) = snap.get(&id).filter(|e| !e.trials.is_empty()) {
        return Err(ApiError::Conflict(format!(
            "site {id:?} is part of trial(s) {}; set \"active\": false instead",
            e.trials.join(", ")
        )));
    }
    if state
        .store
        .patient_sites()
        .await?
        .iter()
        .any(|(_, s)| *s == id)
    {
        return Err(ApiError::Conflict(format!(
            "site {id:?} has enrolled patients; set \"active\": false instead"
        )));
    }
    let op = delete_op("Organization", &id, current.version);
    commit(&state, &caller, op, "site-delete").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
