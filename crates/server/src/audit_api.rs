//! Reading the audit trail: FHIR `AuditEvent` (read and search by `date`,
//! `agent`, `entity`) and NDJSON export. Admins only. Nothing here (nor
//! anywhere) changes the trail.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clinflow_fhir::IssueCode;
use clinflow_store::{AuditQuery, ChainedAudit};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::{ApiError, FhirError};
use crate::fhir::{base_url, bundle_response, BundleWriter, FHIR_JSON};
use crate::state::AppState;

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only admins read the audit trail".into(),
        ))
    }
}

/// One record as a FHIR AuditEvent.
pub fn audit_event(a: &ChainedAudit) -> Value {
    let r = &a.record;
    let action = match r.action.as_str() {
        "create" | "token-create" | "trial-load" => "C",
        "read" | "vread" | "search" | "history" => "R",
        "update" | "token-revoke" => "U",
        "delete" => "D",
        _ => "E",
    };
    let outcome = match r.outcome.as_str() {
        "success" => "0",
        o if o.starts_with('4') => "4",
        _ => "8",
    };
    let mut agent = json!({
        "type": {"text": "token"},
        "who": {"display": r.actor},
        "role": [{"text": r.role}],
        "requestor": true,
    });
    if let Some(c) = &r.client {
        agent["network"] = json!({"address": c, "type": "2"});
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": a.seq.to_string(),
        "extension": [
            {"url": "https://clinflow.dev/fhir/StructureDefinition/audit-hash", "valueString": a.hash},
            {"url": "https://clinflow.dev/fhir/StructureDefinition/audit-previous-hash", "valueString": a.prev_hash},
        ],
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "https://clinflow.dev/fhir/CodeSystem/audit-action", "code": r.action}],
        "action": action,
        "recorded": clinflow_fhir::datetime::format_instant(r.time),
        "outcome": outcome,
        "outcomeDesc": r.outcome,
        "agent": [agent],
        "source": {"observer": {"display": "clinflow"}},
    });
    if let Some(reason) = &r.reason {
        ev["purposeOfEvent"] = json!([{"text": reason}]);
    }
    if r.resource_type.is_some() || r.detail.is_some() {
        let mut entity = json!({});
        if let Some(t) = &r.resource_type {
            let what = match (&r.resource_id, r.version) {
                (Some(id), Some(v)) => format!("{t}/{id}/_history/{v}"),
                (Some(id), None) => format!("{t}/{id}"),
                _ => t.clone(),
            };
            entity["what"] = json!({"reference": what});
        }
        if let Some(d) = &r.detail {
            entity["description"] = json!(d);
        }
        ev["entity"] = json!([entity]);
    }
    ev
}

pub async fn read_fhir(state: &AppState, caller: &Caller, id: &str) -> Result<Response, FhirError> {
    require_admin(caller)?;
    let seq: i64 = id
        .parse()
        .map_err(|_| FhirError::not_found("AuditEvent", id))?;
    let recs = state
        .store
        .audit_records(AuditQuery {
            after_seq: Some(seq - 1),
            limit: 1,
            ..Default::default()
        })
        .await?;
    match recs.first() {
        Some(a) if a.seq == seq => Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
            audit_event(a).to_string(),
        )
            .into_response()),
        _ => Err(FhirError::not_found("AuditEvent", id)),
    }
}

/// Builds an audit query from FHIR-style search parameters.
fn audit_query(pairs: &[(String, String)]) -> Result<AuditQuery, FhirError> {
    let mut q = AuditQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in pairs {
        match k.as_str() {
            "date" => {
                let (prefix, value) = match v.get(..2) {
                    Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                    _ => ("eq", v.as_str()),
                };
                let r = clinflow_fhir::datetime::parse_range(value)
                    .map_err(|e| FhirError::bad_request(format!("date={v}: {e}")))?;
                match prefix {
                    "ge" | "gt" => q.since = Some(r.low),
                    "le" | "lt" => q.until = Some(r.high),
                    _ => {
                        q.since = Some(r.low);
                        q.until = Some(r.high);
                    }
                }
            }
            "agent" => q.actor = Some(v.clone()),
            "entity" => q.entity = Some(v.clone()),
            "_count" => {
                q.limit = v
                    .parse::<usize>()
                    .map_err(|_| FhirError::bad_request(format!("_count={v} is not a number")))?
                    .clamp(1, 1000)
            }
            "_cursor" => {
                q.after_seq = Some(v.parse().map_err(|_| {
                    FhirError::bad_request("the _cursor parameter is not one this server made")
                })?)
            }
            other => {
                return Err(FhirError::of(
                    StatusCode::BAD_REQUEST,
                    IssueCode::NotSupported,
                    format!(
                        "AuditEvent search supports date, agent, entity and _count, not {other:?}"
                    ),
                ))
            }
        }
    }
    Ok(q)
}

pub async fn search_fhir(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response, FhirError> {
    require_admin(caller)?;
    let mut q = audit_query(&pairs)?;
    let limit = q.limit;
    q.limit = limit + 1;
    let mut recs = state.store.audit_records(q).await?;
    let more = recs.len() > limit;
    recs.truncate(limit);
    let base = base_url(headers);
    let qs: String = pairs
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut links = vec![("self", format!("{base}/AuditEvent?{qs}"))];
    if more {
        if let Some(last) = recs.last() {
            links.push((
                "next",
                format!("{base}/AuditEvent?{qs}&_cursor={}", last.seq),
            ));
        }
    }
    let mut b = BundleWriter::new("searchset", None, &links);
    for a in &recs {
        let url = format!("{base}/AuditEvent/{}", a.seq);
        b.entry(Some(&url), Some(&audit_event(a).to_string()), &[]);
    }
    Ok(bundle_response(b.finish()))
}

#[derive(serde::Deserialize)]
pub struct ExportParams {
    since: Option<String>,
}

/// `GET /audit/export`: the whole trail (or since a date) as NDJSON, one
/// chained record a line, with its hashes, in order.
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ExportParams>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let since = match &p.since {
        Some(s) => Some(
            clinflow_fhir::datetime::parse_range(s)
                .map_err(|e| ApiError::BadRequest(format!("since={s}: {e}")))?
                .low,
        ),
        None => None,
    };
    let mut out = String::new();
    let mut after = 0i64;
    loop {
        let page = state
            .store
            .audit_records(AuditQuery {
                since,
                after_seq: Some(after),
                limit: 5000,
                ..Default::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for a in &page {
            let r = &a.record;
            out.push_str(
                &json!({
                    "seq": a.seq, "time": clinflow_fhir::datetime::format_instant(r.time),
                    "actor": r.actor, "role": r.role, "action": r.action,
                    "resource_type": r.resource_type, "resource_id": r.resource_id, "version": r.version,
                    "reason": r.reason, "outcome": r.outcome, "client": r.client, "detail": r.detail,
                    "prev_hash": a.prev_hash, "hash": a.hash,
                })
                .to_string(),
            );
            out.push('\n');
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        out,
    )
        .into_response())
}

/// `GET /audit/verify`: checks the chain, as `clinflow audit verify` does.
pub async fn verify(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let body = match state.store.verify_audit().await? {
        Ok(n) => json!({"intact": true, "records": n}),
        Err(b) => json!({"intact": false, "problem": b.to_string()}),
    };
    Ok(axum::Json(body).into_response())
}
