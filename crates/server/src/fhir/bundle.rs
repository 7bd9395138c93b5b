//! `transaction` and `batch` Bundles (`POST /fhir`).
//!
//! A transaction is all or nothing: every entry is validated, references
//! between entries (`urn:uuid:` fullUrls) are rewritten to the ids the
//! server assigns, references by identifier (`{"identifier": {...}}`) are
//! resolved to the matching Patient, and then every version and its audit
//! record is committed in one store request. A batch runs each entry on its
//! own and reports each entry's outcome.

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use clinflow_fhir::{IssueCode, Json, OperationOutcome, OutcomeIssue};
use clinflow_store::{Expect, WriteOp, WriteRequest};

use super::write::{build_op, check_writable_type, conflict_error, invalid};
use super::{
    base_url, body_text, bundle_response, check_may_write, check_write_scope, in_scope, json_str,
    parse_etag, read_scope, BundleWriter, FhirBody,
};
use crate::auth::Caller;
use crate::error::FhirError;
use crate::sites::SiteRegistry;
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

/// One entry of a transaction or batch, as read from the Bundle.
#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    full_url: Option<String>,
    method: Method,
    /// `Type` for POST; `Type/id` for PUT, DELETE and GET reads; `Type?query` for GET searches.
    url: String,
    if_match: Option<u64>,
    resource: Option<Json>,
}

fn entry_error(index: usize, msg: impl Into<String>) -> FhirError {
    FhirError::new(
        StatusCode::BAD_REQUEST,
        OperationOutcome {
            issues: vec![OutcomeIssue {
                severity: clinflow_fhir::IssueSeverity::Error,
                code: IssueCode::Invalid,
                diagnostics: msg.into(),
                expression: vec![format!("Bundle.entry[{index}]")],
            }],
        },
    )
}

fn take(obj: &mut Vec<(String, Json)>, key: &str) -> Option<Json> {
    let pos = obj.iter().position(|(k, _)| k == key)?;
    Some(obj.remove(pos).1)
}

fn read_entries(mut bundle: Json, max: usize) -> Result<(String, Vec<Entry>), FhirError> {
    let Json::Object(obj) = &mut bundle else {
        return Err(FhirError::bad_request("the body is not a JSON object"));
    };
    if take(obj, "resourceType").as_ref().and_then(Json::as_str) != Some("Bundle") {
        return Err(FhirError::bad_request(
            "POST /fhir takes a Bundle of type transaction or batch",
        ));
    }
    let kind = take(obj, "type")
        .and_then(|t| t.as_str().map(str::to_string))
        .unwrap_or_default();
    if kind != "transaction" && kind != "batch" {
        return Err(FhirError::bad_request(format!(
            "Bundle.type {kind:?} cannot be posted here: use transaction or batch"
        )));
    }
    let raw = match take(obj, "entry") {
        None => Vec::new(),
        Some(Json::Array(a)) => a,
        Some(_) => return Err(FhirError::bad_request("Bundle.entry must be an array")),
    };
    if raw.len() > max {
        return Err(FhirError::of(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooCostly,
            format!(
                "the Bundle has {} entries; this server takes at most {max} in one Bundle",
                raw.len()
            ),
        ));
    }
    let mut entries = Vec::with_capacity(raw.len());
    for (index, e) in raw.into_iter().enumerate() {
        let Json::Object(mut e) = e else {
            return Err(entry_error(index, "an entry must be an object"));
        };
        let full_url = take(&mut e, "fullUrl").and_then(|u| u.as_str().map(str::to_string));
        let resource = take(&mut e, "resource");
        let Some(Json::Object(mut req)) = take(&mut e, "request") else {
            return Err(entry_error(
                index,
                "entry.request (method and url) is required",
            ));
        };
        let method = match take(&mut req, "method").as_ref().and_then(Json::as_str) {
            Some("GET") => Method::Get,
            Some("POST") => Method::Post,
            Some("PUT") => Method::Put,
            Some("DELETE") => Method::Delete,
            other => {
                return Err(entry_error(
                    index,
                    format!(
                    "entry.request.method {other:?} is not supported: use GET, POST, PUT or DELETE"
                ),
                ))
            }
        };
        let url = take(&mut req, "url")
            .and_then(|u| u.as_str().map(|s| s.trim_start_matches('/').to_string()))
            .filter(|u| !u.is_empty())
            .ok_or_else(|| entry_error(index, "entry.request.url is required"))?;
        let if_match = match take(&mut req, "ifMatch") {
            None => None,
            Some(v) => Some(v.as_str().and_then(parse_etag).ok_or_else(|| {
                entry_error(index, "entry.request.ifMatch is not a version ETag")
            })?),
        };
        if matches!(method, Method::Post | Method::Put) && resource.is_none() {
            return Err(entry_error(index, "a POST or PUT entry needs a resource"));
        }
        entries.push(Entry {
            index,
            full_url,
            method,
            url,
            if_match,
            resource,
        });
    }
    Ok((kind, entries))
}

pub async fn post_bundle(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Result<Response, FhirError> {
    let text = body_text(&body)?;
    let json = Json::parse(text).map_err(|e| {
        FhirError::of(
            StatusCode::BAD_REQUEST,
            IssueCode::Structure,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let (kind, entries) = read_entries(json, state.config.max_bundle_entries)?;
    let base = base_url(&headers);
    if kind == "transaction" {
        let results = transaction(&state, &caller, entries, "transaction").await?;
        let mut b = BundleWriter::new("transaction-response", None, &[]);
        for r in results {
            b.entry(None, None, &[r.response_json()]);
        }
        Ok(bundle_response(b.finish()))
    } else {
        let mut b = BundleWriter::new("batch-response", None, &[]);
        for e in entries {
            let index = e.index;
            let r = if e.method == Method::Get {
                batch_get(&state, &caller, &headers, e).await
            } else {
                transaction(&state, &caller, vec![e], "batch")
                    .await
                    .and_then(|mut v| v.pop().ok_or_else(|| entry_error(index, "no result")))
            };
            match r {
                Ok(r) => b.entry(
                    r.full_url(&base).as_deref(),
                    r.resource.as_deref(),
                    &[r.response_json()],
                ),
                Err(err) => b.entry(
                    None,
                    None,
                    &[format!(
                        "\"response\":{{\"status\":{},\"outcome\":{}}}",
                        json_str(&format!(
                            "{} {}",
                            err.status.as_u16(),
                            err.status.canonical_reason().unwrap_or("")
                        )),
                        err.outcome.to_json_string()
                    )],
                ),
            }
        }
        Ok(bundle_response(b.finish()))
    }
}

/// The outcome of one entry.
struct EntryResult {
    status: &'static str,
    location: Option<String>,
    version: Option<u64>,
    last_updated: Option<i64>,
    /// For batch GETs: the body to return.
    resource: Option<String>,
}

impl EntryResult {
    fn response_json(&self) -> String {
        let mut s = format!("\"response\":{{\"status\":{}", json_str(self.status));
        if let Some(l) = &self.location {
            s.push_str(",\"location\":");
            s.push_str(&json_str(l));
        }
        if let Some(v) = self.version {
            s.push_str(&format!(",\"etag\":\"W/\\\"{v}\\\"\""));
        }
        if let Some(t) = self.last_updated {
            s.push_str(",\"lastModified\":");
            s.push_str(&json_str(&clinflow_fhir::datetime::format_instant(t)));
        }
        s.push('}');
        s
    }

    fn full_url(&self, base: &str) -> Option<String> {
        self.resource.as_ref()?;
        self.location
            .as_ref()
            .map(|l| format!("{base}/{}", l.split("/_history").next().unwrap_or(l)))
    }
}

/// Splits `Type/id`.
fn type_and_id(index: usize, url: &str) -> Result<(String, String), FhirError> {
    let url = url.split('?').next().unwrap_or(url);
    let mut parts = url.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(t), Some(id), None) if clinflow_fhir::validate::is_valid_id(id) => {
            Ok((t.to_string(), id.to_string()))
        }
        _ => Err(entry_error(
            index,
            format!("entry.request.url {url:?} must be Type/id"),
        )),
    }
}

/// Calls `f` on every object below `json` (not on `json` itself).
fn for_each_object(json: &mut Json, f: &mut impl FnMut(&mut Vec<(String, Json)>)) {
    match json {
        Json::Object(members) => {
            for (_, v) in members.iter_mut() {
                if let Json::Object(inner) = v {
                    f(inner);
                }
                for_each_object(v, f);
            }
        }
        Json::Array(items) => {
            for v in items.iter_mut() {
                if let Json::Object(inner) = v {
                    f(inner);
                }
                for_each_object(v, f);
            }
        }
        _ => {}
    }
}

/// What a reference by identifier names: `(type, system, value)`.
pub(crate) type IdentifierKey = (String, Option<String>, String);

/// Why a reference by identifier does not resolve (the text says which).
pub(crate) enum Unresolved {
    /// `Reference.type` is not a resource type.
    NotAType(String),
    /// No resource has the identifier.
    NotFound(String),
    /// More than one has it.
    Ambiguous(String),
}

/// The one stored resource a reference by identifier names. Shared by
/// transactions and `/ingest/fhir`, so both resolve alike.
pub(crate) async fn lookup_identifier(
    store: &clinflow_store::Store,
    key: &IdentifierKey,
) -> anyhow::Result<Result<String, Unresolved>> {
    let (rtype, system, value) = key;
    if !clinflow_fhir::validate::is_resource_type(rtype) {
        return Ok(Err(Unresolved::NotAType(format!(
            "Reference.type {rtype:?} is not a resource type"
        ))));
    }
    let ids = store
        .find_by_identifier(rtype, system.as_deref(), value)
        .await?;
    let system = system.as_deref().unwrap_or("");
    Ok(match ids.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Unresolved::NotFound(format!(
            "no {rtype} has the identifier {system}|{value}"
        ))),
        _ => Err(Unresolved::Ambiguous(format!(
            "more than one {rtype} has the identifier {system}|{value}"
        ))),
    })
}

/// The references by identifier in a resource.
pub(crate) fn identifier_refs(json: &mut Json) -> Vec<IdentifierKey> {
    let mut keys = Vec::new();
    for_each_object(json, &mut |obj| keys.extend(identifier_ref(obj)));
    keys
}

/// Gives each reference by identifier that `resolved` knows its literal
/// `reference` (the identifier is kept beside it).
pub(crate) fn apply_identifier_refs(json: &mut Json, resolved: &HashMap<IdentifierKey, String>) {
    for_each_object(json, &mut |obj| {
        if let Some(key) = identifier_ref(obj) {
            if let Some(id) = resolved.get(&key) {
                obj.insert(
                    0,
                    (
                        "reference".to_string(),
                        Json::String(format!("{}/{id}", key.0)),
                    ),
                );
            }
        }
    });
}

/// A reference by identifier: `(type, system, value)` of a Reference object
/// without a literal `reference`.
fn identifier_ref(obj: &[(String, Json)]) -> Option<(String, Option<String>, String)> {
    if obj.iter().any(|(k, _)| k == "reference") {
        return None;
    }
    let ident = obj
        .iter()
        .find(|(k, _)| k == "identifier")
        .map(|(_, v)| v)?;
    let value = ident.get("value").and_then(Json::as_str)?.to_string();
    let system = ident
        .get("system")
        .and_then(Json::as_str)
        .map(str::to_string);
    let rtype = obj
        .iter()
        .find(|(k, _)| k == "type")
        .and_then(|(_, v)| v.as_str())
        .unwrap_or("Patient")
        .to_string();
    Some((rtype, system, value))
}

/// Identifiers `(system, value)` of a resource.
fn identifiers_of(json: &Json) -> Vec<(Option<String>, String)> {
    match json.get("identifier") {
        Some(Json::Array(ids)) => ids
            .iter()
            .filter_map(|i| {
                Some((
                    i.get("system").and_then(Json::as_str).map(str::to_string),
                    i.get("value").and_then(Json::as_str)?.to_string(),
                ))
            })
            .collect(),
        _ => Vec::new(),
    }
}

async fn transaction(
    state: &AppState,
    caller: &Caller,
    mut entries: Vec<Entry>,
    action: &str,
) -> Result<Vec<EntryResult>, FhirError> {
    check_may_write(caller)?;
    let scope = read_scope(caller)?;
    // 1. Ids for every entry, and what each fullUrl now stands for.
    let mut targets: Vec<(String, String)> = Vec::with_capacity(entries.len());
    let mut rewrite: HashMap<String, String> = HashMap::new();
    let mut seen = HashSet::new();
    for e in &entries {
        let (rtype, id) = match e.method {
            Method::Get => {
                return Err(entry_error(
                    e.index,
                    "GET entries are not supported in a transaction; use a batch",
                ))
            }
            Method::Post => {
                let rtype = e.url.split(['?', '/']).next().unwrap_or("").to_string();
                if !clinflow_fhir::validate::is_resource_type(&rtype) {
                    return Err(entry_error(
                        e.index,
                        format!("{rtype:?} is not an R4 resource type"),
                    ));
                }
                (rtype, super::write::new_id())
            }
            Method::Put | Method::Delete => type_and_id(e.index, &e.url)?,
        };
        check_writable_type(&rtype)?;
        if !seen.insert((rtype.clone(), id.clone())) {
            return Err(entry_error(
                e.index,
                format!("{rtype}/{id} appears twice in this transaction"),
            ));
        }
        if let Some(u) = &e.full_url {
            rewrite.insert(u.clone(), format!("{rtype}/{id}"));
        }
        targets.push((rtype, id));
    }
    // 2. Patients created here can be referenced by identifier too.
    let mut by_identifier: HashMap<(String, Option<String>, String), String> = HashMap::new();
    for (e, (rtype, id)) in entries.iter().zip(&targets) {
        if let Some(r) = &e.resource {
            for (system, value) in identifiers_of(r) {
                by_identifier.insert((rtype.clone(), system, value), id.clone());
            }
        }
    }
    // 3. Rewrite literal references to fullUrls; collect references by identifier.
    let mut wanted: Vec<(usize, IdentifierKey)> = Vec::new();
    for e in entries.iter_mut() {
        let index = e.index;
        if let Some(r) = e.resource.as_mut() {
            for_each_object(r, &mut |obj| {
                for (k, v) in obj.iter_mut() {
                    if k == "reference" {
                        if let Some(to) = v.as_str().and_then(|s| rewrite.get(s)) {
                            *v = Json::String(to.clone());
                        }
                    }
                }
                if let Some(key) = identifier_ref(obj) {
                    wanted.push((index, key));
                }
            });
        }
    }
    // 4. Resolve references by identifier (in the bundle first, then the store).
    for (index, key) in &wanted {
        if by_identifier.contains_key(key) {
            continue;
        }
        match lookup_identifier(&state.store, key).await? {
            Ok(id) => {
                by_identifier.insert(key.clone(), id);
            }
            Err(Unresolved::NotAType(why)) => return Err(entry_error(*index, why)),
            Err(Unresolved::NotFound(why)) => {
                return Err(FhirError::of(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueCode::NotFound,
                    format!("Bundle.entry[{index}]: {why}"),
                ))
            }
            Err(Unresolved::Ambiguous(why)) => {
                return Err(FhirError::of(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueCode::Duplicate,
                    format!("Bundle.entry[{index}]: {why}"),
                ))
            }
        }
    }
    if !wanted.is_empty() {
        for e in entries.iter_mut() {
            if let Some(r) = e.resource.as_mut() {
                apply_identifier_refs(r, &by_identifier);
            }
        }
    }
    // 5. Validate every resource; report every problem of every entry at once.
    let now = clinflow_store::now_millis();
    let mut problems = OperationOutcome::default();
    let mut resources = Vec::with_capacity(entries.len());
    for (e, (rtype, id)) in entries.iter_mut().zip(&targets) {
        let Some(json) = e.resource.take() else {
            resources.push(None);
            continue;
        };
        let path = format!("Bundle.entry[{}].resource", e.index);
        match clinflow_fhir::validate::validate_json(json, Some(rtype), &path) {
            Ok(r) => {
                if e.method == Method::Put && r.id() != Some(id.as_str()) {
                    problems.issues.push(OutcomeIssue {
                        severity: clinflow_fhir::IssueSeverity::Error,
                        code: IssueCode::Invalid,
                        diagnostics: format!(
                            "the resource's id must be {id:?}, as in entry.request.url"
                        ),
                        expression: vec![format!("{path}.id")],
                    });
                }
                resources.push(Some(r));
            }
            Err(o) => {
                problems.issues.extend(o.issues);
                resources.push(None);
            }
        }
    }
    if problems.has_errors() {
        return Err(invalid(problems));
    }
    // 6. The versions to write, each checked against the caller's scope.
    let mut ops: Vec<WriteOp> = Vec::with_capacity(entries.len());
    let mut audit = Vec::with_capacity(entries.len());
    for ((e, (rtype, id)), res) in entries.iter().zip(&targets).zip(resources) {
        let current = match e.method {
            Method::Post => None,
            _ => state.store.read_current(rtype, id).await?,
        };
        if let Some(c) = &current {
            if !in_scope(state, &scope, c.patient.as_deref()).await? {
                return Err(FhirError::forbidden(format!(
                    "Bundle.entry[{}]: {rtype}/{id} belongs to a subject outside your scope",
                    e.index
                )));
            }
            check_write_scope(state, caller, c.patient.as_deref()).await?;
        }
        let expect = match (e.if_match, &current) {
            (Some(v), Some(c)) if c.version == v => Expect::Version(v),
            (Some(v), _) => {
                return Err(FhirError::of(
                    StatusCode::PRECONDITION_FAILED,
                    IssueCode::Conflict,
                    format!(
                        "Bundle.entry[{}]: {rtype}/{id} is not at version {v}",
                        e.index
                    ),
                ))
            }
            (None, Some(c)) => Expect::Version(c.version),
            (None, None) => Expect::Absent,
        };
        let op = match (e.method, res) {
            (Method::Delete, _) => match &current {
                None => {
                    return Err(FhirError::of(
                        StatusCode::NOT_FOUND,
                        IssueCode::NotFound,
                        format!("Bundle.entry[{}]: {rtype}/{id} is not known", e.index),
                    ))
                }
                Some(c) => WriteOp {
                    resource_type: rtype.clone(),
                    id: id.clone(),
                    expect,
                    new_version: c.version + 1,
                    last_updated: now,
                    body: None,
                    extracted: Default::default(),
                },
            },
            (_, Some(res)) => {
                let op = build_op(res, id, expect, now);
                check_write_scope(state, caller, op.extracted.patient.as_deref()).await?;
                op
            }
            (_, None) => return Err(entry_error(e.index, "a POST or PUT entry needs a resource")),
        };
        let mut rec = caller.audit(
            match e.method {
                Method::Post => "create",
                Method::Put => "update",
                _ => "delete",
            },
            "success",
        );
        rec.resource_type = Some(rtype.clone());
        rec.resource_id = Some(id.clone());
        rec.version = Some(op.new_version);
        rec.detail = Some(format!("{action} entry {}", e.index));
        audit.push(rec);
        ops.push(op);
    }
    let results: Vec<EntryResult> = ops
        .iter()
        .map(|op| EntryResult {
            status: match (op.body.is_none(), op.new_version) {
                (true, _) => "204 No Content",
                (false, 1) => "201 Created",
                _ => "200 OK",
            },
            location: Some(format!(
                "{}/{}/_history/{}",
                op.resource_type, op.id, op.new_version
            )),
            version: Some(op.new_version),
            last_updated: Some(op.last_updated),
            resource: None,
        })
        .collect();
    let n = ops.len() as u64;
    let touches_sites = ops
        .iter()
        .any(|o| SiteRegistry::affected_by(&o.resource_type));
    state
        .store
        .write(WriteRequest {
            ops,
            audit,
            queries: Vec::new(),
        })
        .await
        .map_err(|e| conflict_error(e, true))?;
    state.metrics.resources_written.inc_by(n);
    if touches_sites {
        state.sites.refresh_after_write().await;
    }
    Ok(results)
}

/// A GET entry of a batch: a read (`Type/id`).
async fn batch_get(
    state: &AppState,
    caller: &Caller,
    _headers: &HeaderMap,
    e: Entry,
) -> Result<EntryResult, FhirError> {
    let (rtype, id) = type_and_id(e.index, &e.url)?;
    let scope = read_scope(caller)?;
    let mut rec = caller.audit("read", "success");
    rec.resource_type = Some(rtype.clone());
    rec.resource_id = Some(id.clone());
    rec.detail = Some("batch".into());
    let found = match state.store.read_current(&rtype, &id).await? {
        Some(r) if !r.deleted && in_scope(state, &scope, r.patient.as_deref()).await? => r,
        _ => {
            rec.outcome = "404".into();
            state.store.audit(vec![rec]).await?;
            return Err(FhirError::not_found(&rtype, &id));
        }
    };
    rec.version = Some(found.version);
    state.store.audit(vec![rec]).await?;
    Ok(EntryResult {
        status: "200 OK",
        location: Some(format!("{rtype}/{id}/_history/{}", found.version)),
        version: Some(found.version),
        last_updated: Some(found.last_updated),
        resource: found.body,
    })
}
