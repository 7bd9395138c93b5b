//! The FHIR R4 REST API under `/fhir`.
//!
//! Interactions: `metadata`, create, read, vread, update (with `If-Match`),
//! delete, instance history, search (GET and POST `_search`), and
//! `transaction`/`batch` Bundles (in [`bundle`]). Every error is an
//! `OperationOutcome`. Every read and search is audited (group-committed);
//! every write is audited in its own transaction.
//!
//! API boundary: resources enter only through `clinflow_fhir::validate`, and
//! leave as the stored JSON text, never re-serialised.

pub mod bundle;
pub mod capability;
pub mod write;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clinflow_fhir::search::SearchQuery;
use clinflow_fhir::IssueCode;
use clinflow_store::{Scope, StoredResource};

use crate::auth::{Caller, Role};
use crate::error::{ApiError, FhirError};
use crate::state::AppState;

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

/// The `/fhir` routes (mounted under `/fhir`, behind authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metadata", get(capability::metadata))
        .route("/", post(bundle::post_bundle))
        .route("/{rtype}", get(search_get).post(write::create))
        .route("/{rtype}/_search", post(search_post))
        .route(
            "/{rtype}/{id}",
            get(read).put(write::update).delete(write::delete),
        )
        .route("/{rtype}/{id}/_history", get(history))
        .route("/{rtype}/{id}/_history/{vid}", get(vread))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(unknown_path)
}

async fn method_not_allowed() -> FhirError {
    FhirError::of(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        "this interaction is not supported on this path (see /fhir/metadata)",
    )
}

async fn unknown_path() -> FhirError {
    FhirError::of(
        StatusCode::NOT_FOUND,
        IssueCode::NotFound,
        "no such FHIR endpoint (see /fhir/metadata)",
    )
}

/// A FHIR request body: checks the media type (415) and size (413).
pub struct FhirBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for FhirBody {
    type Rejection = FhirError;

    async fn from_request(req: Request, state: &S) -> Result<FhirBody, FhirError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = crate::media::media_type(req.headers());
        if !matches!(mime.as_str(), "application/fhir+json" | "application/json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type {ct:?} is not supported: send application/fhir+json"
            ))
            .into());
        }
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(FhirBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(FhirError::of(
                StatusCode::PAYLOAD_TOO_LARGE,
                IssueCode::TooCostly,
                "the request body is larger than this server accepts",
            )),
            Err(e) => Err(FhirError::bad_request(format!(
                "could not read the request body: {e}"
            ))),
        }
    }
}

/// The body as UTF-8 text (a 400 otherwise).
pub fn body_text(body: &Bytes) -> Result<&str, FhirError> {
    std::str::from_utf8(body).map_err(|e| {
        FhirError::of(
            StatusCode::BAD_REQUEST,
            IssueCode::Structure,
            format!("the body is not UTF-8 (byte {})", e.valid_up_to()),
        )
    })
}

/// Checks the resource type in a URL.
pub fn check_type(rtype: &str) -> Result<(), FhirError> {
    if rtype == "AuditEvent" || clinflow_fhir::validate::is_resource_type(rtype) {
        Ok(())
    } else {
        Err(FhirError::of(
            StatusCode::NOT_FOUND,
            IssueCode::NotSupported,
            format!("{rtype:?} is not an R4 resource type"),
        ))
    }
}

/// The scope of what the caller may read, or 403.
pub fn read_scope(caller: &Caller) -> Result<Scope, FhirError> {
    caller.principal.read_scope().ok_or_else(|| {
        FhirError::forbidden(format!(
            "the {} role may not read clinical data",
            caller.principal.role.as_str()
        ))
    })
}

/// Whether a resource in compartment `patient` is inside `scope`.
pub async fn in_scope(
    state: &AppState,
    scope: &Scope,
    patient: Option<&str>,
) -> Result<bool, FhirError> {
    Ok(match (scope, patient) {
        (Scope::All, _) | (_, None) => true,
        (Scope::Patient(p), Some(q)) => p == q,
        (Scope::Sites(sites), Some(p)) => match state.store.patient_site(p).await? {
            Some(site) => sites.contains(&site),
            None => false,
        },
    })
}

/// The base URL of this server's FHIR API, from the request's Host.
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost");
    format!("http://{host}/fhir")
}

/// `W/"n"`.
pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\""))
        .unwrap_or(HeaderValue::from_static("W/\"0\""))
}

/// Parses `If-Match: W/"n"` (or `"n"`, or `n`).
pub fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, FhirError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    parse_etag(s).map(Some).ok_or_else(|| {
        FhirError::bad_request(format!(
            "If-Match {s:?} is not a version ETag such as W/\"3\""
        ))
    })
}

/// `W/"3"` -> 3.
pub fn parse_etag(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s.trim_matches('"');
    s.parse().ok()
}

/// An HTTP date (`Last-Modified`).
pub fn http_date(millis: i64) -> String {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(millis / 1000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_default()
}

/// A response carrying one stored resource version.
pub fn resource_response(status: StatusCode, r: &StoredResource) -> Response {
    let mut resp = (status, r.body.clone().unwrap_or_default()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    h.insert(header::ETAG, etag(r.version));
    if let Ok(v) = HeaderValue::from_str(&http_date(r.last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    resp
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Builds a Bundle's JSON around stored bodies without re-parsing them.
pub struct BundleWriter {
    out: String,
    first: bool,
}

impl BundleWriter {
    /// Starts a Bundle of `kind` (`searchset`, `history`, ...).
    pub fn new(kind: &str, total: Option<u64>, links: &[(&str, String)]) -> BundleWriter {
        let mut out = String::with_capacity(4096);
        out.push_str("{\"resourceType\":\"Bundle\",\"id\":");
        out.push_str(&json_str(&uuid::Uuid::new_v4().to_string()));
        out.push_str(",\"meta\":{\"lastUpdated\":");
        out.push_str(&json_str(&clinflow_fhir::datetime::format_instant(
            clinflow_store::now_millis(),
        )));
        out.push_str("},\"type\":");
        out.push_str(&json_str(kind));
        if let Some(t) = total {
            out.push_str(",\"total\":");
            out.push_str(&t.to_string());
        }
        if !links.is_empty() {
            out.push_str(",\"link\":[");
            for (i, (rel, url)) in links.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"relation\":");
                out.push_str(&json_str(rel));
                out.push_str(",\"url\":");
                out.push_str(&json_str(url));
                out.push('}');
            }
            out.push(']');
        }
        out.push_str(",\"entry\":[");
        BundleWriter { out, first: true }
    }

    /// Adds an entry; `extra` is more entry members as raw JSON (`"search":{...}`).
    pub fn entry(&mut self, full_url: Option<&str>, resource: Option<&str>, extra: &[String]) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('{');
        let mut sep = false;
        if let Some(u) = full_url {
            self.out.push_str("\"fullUrl\":");
            self.out.push_str(&json_str(u));
            sep = true;
        }
        if let Some(r) = resource {
            if sep {
                self.out.push(',');
            }
            self.out.push_str("\"resource\":");
            self.out.push_str(r);
            sep = true;
        }
        for e in extra {
            if sep {
                self.out.push(',');
            }
            self.out.push_str(e);
            sep = true;
        }
        self.out.push('}');
    }

    /// Finishes the Bundle. An empty `entry` array is left out (FHIR forbids it).
    pub fn finish(mut self) -> String {
        if self.first {
            let cut = self.out.len() - ",\"entry\":[".len();
            self.out.truncate(cut);
            self.out.push('}');
        } else {
            self.out.push_str("]}");
        }
        self.out
    }
}

/// A response with a Bundle body.
pub fn bundle_response(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body,
    )
        .into_response()
}

async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    if rtype == "AuditEvent" {
        return crate::audit_api::read_fhir(&state, &caller, &id).await;
    }
    let scope = read_scope(&caller)?;
    let found = state.store.read_current(&rtype, &id).await?;
    let mut rec = caller.audit("read", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    let r = match found {
        Some(r) if in_scope(&state, &scope, r.patient.as_deref()).await? => r,
        _ => {
            rec.outcome = "404".into();
            state.store.audit(vec![rec]).await?;
            return Err(FhirError::not_found(&rtype, &id));
        }
    };
    rec.version = Some(r.version);
    if r.deleted {
        rec.outcome = "410".into();
        state.store.audit(vec![rec]).await?;
        let mut resp = FhirError::of(
            StatusCode::GONE,
            IssueCode::Deleted,
            format!("{rtype}/{id} was deleted"),
        )
        .into_response();
        resp.headers_mut().insert(header::ETAG, etag(r.version));
        return Ok(resp);
    }
    state.store.audit(vec![rec]).await?;
    Ok(resource_response(StatusCode::OK, &r))
}

async fn vread(
    State(state): State<AppState>,
    caller: Caller,
    Path((rtype, id, vid)): Path<(String, String, String)>,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    let scope = read_scope(&caller)?;
    let vid: u64 = vid
        .parse()
        .map_err(|_| FhirError::bad_request(format!("version {vid:?} is not a number")))?;
    let found = state.store.read_version(&rtype, &id, vid).await?;
    let mut rec = caller.audit("vread", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    rec.version = Some(vid);
    let r = match found {
        Some(r) if in_scope(&state, &scope, r.patient.as_deref()).await? => r,
        _ => {
            rec.outcome = "404".into();
            state.store.audit(vec![rec]).await?;
            return Err(FhirError::of(
                StatusCode::NOT_FOUND,
                IssueCode::NotFound,
                format!("{rtype}/{id} has no version {vid}"),
            ));
        }
    };
    state.store.audit(vec![rec]).await?;
    if r.deleted {
        return Err(FhirError::of(
            StatusCode::GONE,
            IssueCode::Deleted,
            format!("version {vid} of {rtype}/{id} is a deletion"),
        ));
    }
    Ok(resource_response(StatusCode::OK, &r))
}

#[derive(serde::Deserialize)]
struct HistoryParams {
    #[serde(rename = "_count")]
    count: Option<usize>,
    #[serde(rename = "_cursor")]
    cursor: Option<u64>,
}

async fn history(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    Query(p): Query<HistoryParams>,
) -> Result<Response, FhirError> {
    check_type(&rtype)?;
    let scope = read_scope(&caller)?;
    let current = state.store.read_current(&rtype, &id).await?;
    let visible = match &current {
        Some(r) => in_scope(&state, &scope, r.patient.as_deref()).await?,
        None => false,
    };
    let mut rec = caller.audit("history", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    if !visible {
        rec.outcome = "404".into();
        state.store.audit(vec![rec]).await?;
        return Err(FhirError::not_found(&rtype, &id));
    }
    let count = p.count.unwrap_or(50).clamp(1, 1000);
    let versions = state
        .store
        .history(&rtype, &id, p.cursor, count + 1)
        .await?;
    state.store.audit(vec![rec]).await?;
    let base = base_url(&headers);
    let mut links = vec![(
        "self",
        format!("{base}/{rtype}/{id}/_history?_count={count}"),
    )];
    let more = versions.len() > count;
    let versions = &versions[..versions.len().min(count)];
    if more {
        if let Some(last) = versions.last() {
            links.push((
                "next",
                format!(
                    "{base}/{rtype}/{id}/_history?_count={count}&_cursor={}",
                    last.version
                ),
            ));
        }
    }
    let mut b = BundleWriter::new("history", None, &links);
    for v in versions {
        let url = format!("{base}/{rtype}/{id}/_history/{}", v.version);
        let (method, status) = if v.deleted {
            ("DELETE", "410 Gone")
        } else if v.version == 1 {
            ("POST", "201 Created")
        } else {
            ("PUT", "200 OK")
        };
        let request = format!(
            "\"request\":{{\"method\":\"{method}\",\"url\":{}}}",
            json_str(&format!("{rtype}/{id}"))
        );
        let response = format!(
            "\"response\":{{\"status\":\"{status}\",\"etag\":\"W/\\\"{}\\\"\",\"lastModified\":{}}}",
            v.version,
            json_str(&clinflow_fhir::datetime::format_instant(v.last_updated))
        );
        b.entry(Some(&url), v.body.as_deref(), &[request, response]);
    }
    Ok(bundle_response(b.finish()))
}

/// Decodes a query string into pairs, keeping repeated keys.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, FhirError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    serde_urlencoded_pairs(raw)
}

fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, FhirError> {
    fn decode(s: &str) -> Result<String, FhirError> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| {
                            FhirError::bad_request(format!(
                                "bad percent-encoding in query near {s:?}"
                            ))
                        })?;
                    out.push(hex);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| FhirError::bad_request("the query string is not UTF-8"))
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

async fn search_get(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    let pairs = query_pairs(raw.as_deref())?;
    search(&state, &caller, &headers, &rtype, pairs).await
}

async fn search_post(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, FhirError> {
    let mut pairs = query_pairs(raw.as_deref())?;
    let form = std::str::from_utf8(&body)
        .map_err(|_| FhirError::bad_request("the form body is not UTF-8"))?;
    pairs.extend(serde_urlencoded_pairs(form)?);
    search(&state, &caller, &headers, &rtype, pairs).await
}

fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~|:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs a search and renders the searchset Bundle.
pub async fn search(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    rtype: &str,
    pairs: Vec<(String, String)>,
) -> Result<Response, FhirError> {
    check_type(rtype)?;
    if rtype == "AuditEvent" {
        return crate::audit_api::search_fhir(state, caller, headers, pairs).await;
    }
    let scope = read_scope(caller)?;
    let q: SearchQuery = clinflow_fhir::search::parse_query(rtype, &pairs)
        .map_err(|o| FhirError::new(StatusCode::BAD_REQUEST, o))?;
    let page = state.store.search(q.clone(), scope).await.map_err(|e| {
        if e.downcast_ref::<clinflow_store::sql::SearchError>()
            .is_some()
        {
            FhirError::bad_request(e.to_string())
        } else {
            FhirError::internal(e)
        }
    })?;
    let base = base_url(headers);
    let own: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| k != "_cursor").collect();
    let qs = own
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut links = vec![("self", format!("{base}/{rtype}?{qs}"))];
    if let Some(c) = &page.next_cursor {
        let sep = if qs.is_empty() { "" } else { "&" };
        links.push((
            "next",
            format!("{base}/{rtype}?{qs}{sep}_cursor={}", encode_component(c)),
        ));
    }
    let mut rec = caller.audit("search", "success");
    rec.resource_type = Some(rtype.to_string());
    let ids: Vec<&str> = page.matches.iter().map(|r| r.id.as_str()).collect();
    rec.detail = Some(format!(
        "?{qs} -> {} match(es): {}",
        ids.len(),
        ids.join(",")
    ));
    state.store.audit(vec![rec]).await?;
    let mut b = BundleWriter::new("searchset", page.total, &links);
    let mode_match = "\"search\":{\"mode\":\"match\"}".to_string();
    let mode_include = "\"search\":{\"mode\":\"include\"}".to_string();
    for r in &page.matches {
        let url = format!("{base}/{rtype}/{}", r.id);
        b.entry(
            Some(&url),
            r.body.as_deref(),
            std::slice::from_ref(&mode_match),
        );
    }
    for r in &page.included {
        let url = format!("{base}/{}/{}", r.resource_type, r.id);
        b.entry(
            Some(&url),
            r.body.as_deref(),
            std::slice::from_ref(&mode_include),
        );
    }
    Ok(bundle_response(b.finish()))
}

/// Whether `role` may write through the FHIR API at all.
pub fn check_may_write(caller: &Caller) -> Result<(), FhirError> {
    if caller.principal.may_write() {
        Ok(())
    } else {
        Err(FhirError::forbidden(format!(
            "the {} role may not change clinical data",
            caller.principal.role.as_str()
        )))
    }
}

/// For a site user: a write must stay inside its site's patients.
pub async fn check_write_scope(
    state: &AppState,
    caller: &Caller,
    patient: Option<&str>,
) -> Result<(), FhirError> {
    if caller.principal.role != Role::SiteUser {
        return Ok(());
    }
    let Some(p) = patient else {
        return Err(FhirError::forbidden(
            "a site user may only change data of its own site's subjects",
        ));
    };
    let scope = read_scope(caller)?;
    if in_scope(state, &scope, Some(p)).await? {
        Ok(())
    } else {
        Err(FhirError::forbidden(
            "this subject is not enrolled at your site",
        ))
    }
}
