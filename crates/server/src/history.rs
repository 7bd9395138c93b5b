//! The patient history gateway: `GET /patients/{id}/history`.
//!
//! One request fans out to the records and the billing service at once,
//! over gRPC (`clinflow-history`), under one deadline: the server's
//! (`history_timeout`, 5 s) or the caller's shorter `X-Request-Timeout`
//! (ms). Every downstream call carries what is left of it as
//! `grpc-timeout`, and the services stop at it, down to their store
//! queries. Past it the answer is 504 naming the late service; a service
//! that failed, cannot be reached, or whose breaker is open gives 502
//! naming it (retries give up while there is still time to say so).
//! `?partial=true` answers what arrived instead, `"complete": false`, with
//! each missing part and why. When the client goes away, this handler's
//! future is dropped, which drops the gRPC calls (RST_STREAM): the services
//! see it and stop.
//!
//! Load shedding: at most `history_max_in_flight` histories at once; more
//! get 503 with `Retry-After`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clinflow_fhir::IssueCode;
use clinflow_history::client::{self, Billing, Call, DownstreamConfig, DownstreamError, Stack};
use clinflow_history::pb::{self, billing_client::BillingClient, records_client::RecordsClient};
use clinflow_history::service::{Faults, ServiceContext, ServiceMetrics, Which};
use clinflow_store::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::auth::{Caller, Role};
use crate::error::{ApiError, FhirError};
use crate::state::AppState;

/// Where the services are and how to call them.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// `http://HOST:PORT` of `clinflow records serve`; `None` runs the
    /// service in this process (still behind gRPC, on a loopback port).
    pub records_url: Option<String>,
    /// As `records_url`, for `clinflow billing serve`.
    pub billing_url: Option<String>,
    /// The token the services require (`CLINFLOW_SERVICE_TOKEN`); needed
    /// with either URL, made up at start for in-process services.
    pub service_token: Option<String>,
    /// The deadline of a history when the caller asks for none (or more).
    pub timeout: Duration,
    /// Histories served at once; more get 503.
    pub max_in_flight: usize,
    /// The breakers' window (adaptive throttling); zero turns them off.
    pub breaker_window: Duration,
    /// Retries of a call that could not reach its service.
    pub max_retries: u32,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            records_url: None,
            billing_url: None,
            service_token: None,
            timeout: Duration::from_secs(5),
            max_in_flight: 256,
            breaker_window: Duration::from_secs(10),
            max_retries: 2,
        }
    }
}

/// The longest `X-Request-Timeout` read (ms); the server's own deadline
/// caps it anyway.
const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: &'static str,
    outcome: &'static str,
}

/// The gateway: the two client stacks, its concurrency limit, and the
/// in-process services when it runs them.
pub struct Gateway {
    records: Stack<RecordsClient<Channel>>,
    billing: Stack<BillingClient<Channel>>,
    timeout: Duration,
    permits: tokio::sync::Semaphore,
    calls: Family<CallLabels, Counter>,
    /// Stops the in-process services (if any) at shutdown.
    stop: CancellationToken,
}

impl Gateway {
    /// Builds the clients; starts the in-process services for the URLs not
    /// given. Metrics go to `registry` (the in-process services' too).
    pub async fn start(
        cfg: &HistoryConfig,
        store: &Store,
        registry: &mut Registry,
    ) -> anyhow::Result<Gateway> {
        let stop = CancellationToken::new();
        let mut token = cfg.service_token.clone();
        let mut local = Vec::new();
        if cfg.records_url.is_none() {
            local.push(Which::Records);
        }
        if cfg.billing_url.is_none() {
            local.push(Which::Billing);
        }
        let mut local_url = None;
        if !local.is_empty() {
            let token = token
                .get_or_insert_with(|| crate::auth::new_secret().0)
                .clone();
            let metrics = ServiceMetrics::default();
            metrics.register(registry);
            let ctx = ServiceContext::new(store.clone(), &token, Faults::default(), metrics);
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
            local_url = Some(format!("http://{}", listener.local_addr()?));
            let stop = stop.clone();
            tokio::spawn(async move {
                let served = clinflow_history::service::serve(
                    listener,
                    ctx,
                    local,
                    false,
                    stop.cancelled_owned(),
                )
                .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the in-process history services stopped");
                }
            });
        }
        if (cfg.records_url.is_some() || cfg.billing_url.is_some()) && cfg.service_token.is_none() {
            // A token made up here would be sent to the remote service too,
            // which would refuse every call.
            anyhow::bail!("--service-token (CLINFLOW_SERVICE_TOKEN) is required with --records-url or --billing-url");
        }
        let token = token.ok_or_else(|| anyhow::anyhow!("no service token"))?;
        let downstream = |url: &Option<String>| DownstreamConfig {
            url: url
                .clone()
                .or_else(|| local_url.clone())
                .unwrap_or_default(),
            token: token.clone(),
            breaker_window: cfg.breaker_window,
            max_retries: cfg.max_retries,
        };
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "history_downstream_calls",
            "The gateway's calls to the history services, by outcome (ok, deadline, unavailable, failed, breaker-open)",
            calls.clone(),
        );
        Ok(Gateway {
            records: client::records(&downstream(&cfg.records_url))?,
            billing: client::billing(&downstream(&cfg.billing_url))?,
            timeout: cfg.timeout,
            permits: tokio::sync::Semaphore::new(cfg.max_in_flight),
            calls,
            stop,
        })
    }

    /// Stops the in-process services.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn count<T>(&self, service: &'static str, r: &Result<T, DownstreamError>) {
        let outcome = r.as_ref().err().map_or("ok", DownstreamError::kind);
        self.calls
            .get_or_create(&CallLabels { service, outcome })
            .inc();
    }
}

/// `GET /patients/{id}/history?since=&partial=`.
pub async fn get_history(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    let start = Instant::now();
    let gw = state.history.clone();
    let Ok(_permit) = gw.permits.try_acquire() else {
        return Err(ApiError::Unavailable(1).into());
    };
    let p = &caller.principal;
    match p.role {
        Role::Admin | Role::DataManager | Role::SiteUser => {}
        Role::Patient if p.patient.as_deref() == Some(id.as_str()) => {}
        Role::Patient => {
            return Err(FhirError::forbidden(
                "a patient may read its own history only",
            ))
        }
        r => {
            return Err(FhirError::forbidden(format!(
                "the {} role may not read patient histories",
                r.as_str()
            )))
        }
    }
    let mut since = None;
    let mut partial = false;
    for (k, v) in &params {
        match k.as_str() {
            "since" => {
                let range = clinflow_fhir::datetime::parse_range(v)
                    .map_err(|e| FhirError::bad_request(format!("since: {e}")))?;
                since = Some(range.low);
            }
            "partial" => {
                partial = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(FhirError::bad_request("partial must be true or false")),
                }
            }
            other => {
                return Err(FhirError::bad_request(format!(
                    "unknown parameter {other:?}: use since and partial"
                )))
            }
        }
    }
    let mut timeout = gw.timeout;
    if let Some(v) = headers.get("x-request-timeout") {
        let ms = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|ms| (1..=MAX_REQUEST_TIMEOUT_MS).contains(ms))
            .ok_or_else(|| {
                FhirError::bad_request(format!(
                    "X-Request-Timeout must be milliseconds, 1 to {MAX_REQUEST_TIMEOUT_MS}"
                ))
            })?;
        timeout = timeout.min(Duration::from_millis(ms));
    }
    let deadline = start + timeout;

    let mut rec = caller.audit("history", "success");
    rec.resource_type = Some("Patient".into());
    rec.resource_id = Some(id.clone());
    // Recorded however the request ends: a caller that goes away mid-way
    // (the services may have read the whole history by then) is audited
    // `cancelled`.
    let mut audit = AuditOnDrop {
        store: state.store.clone(),
        rec: Some(rec),
    };
    let scope = p
        .read_scope()
        .ok_or_else(|| FhirError::forbidden("this token may read no clinical data"))?;
    // The gateway's own reads share the deadline; running out here is the
    // gateway's 504, not a service's.
    let found = tokio::time::timeout_at(deadline, async {
        match state.store.read_current("Patient", &id).await? {
            // Scoped by the id asked for: a deleted Patient has no
            // compartment of its own any more, but its records still do.
            Some(r) if !r.deleted && crate::fhir::in_scope(&state, &scope, Some(&id)).await? => {
                Ok::<_, FhirError>(Some(r))
            }
            _ => Ok(None),
        }
    })
    .await;
    let patient = match found {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            audit.finish("404").await?;
            return Err(FhirError::not_found("Patient", &id));
        }
        Ok(Err(e)) => {
            audit.finish("500").await?;
            return Err(e);
        }
        Err(_) => {
            audit.finish("504").await?;
            return Err(FhirError::of(
                StatusCode::GATEWAY_TIMEOUT,
                IssueCode::Timeout,
                "the gateway could not read the patient within the deadline",
            ));
        }
    };
    let request = pb::HistoryRequest {
        patient_id: id.clone(),
        since_ms: since,
    };
    let call = |r: &pb::HistoryRequest| Call {
        request: r.clone(),
        deadline,
    };
    let records = async {
        let r = client::call(&gw.records, call(&request)).await;
        gw.count("records", &r);
        r
    };
    let billing = async {
        let r = client::call(&gw.billing, call(&request)).await;
        gw.count("billing", &r);
        r
    };
    let (records, billing) = if partial {
        tokio::join!(records, billing)
    } else {
        // Without `partial` the first failure is the answer: the other call
        // is dropped (cancelled) instead of being waited for.
        match tokio::try_join!(records, billing) {
            Ok((r, b)) => (Ok(r), Ok(b)),
            Err(e) => {
                let status = failure_status(std::slice::from_ref(&e));
                audit.finish(status.as_str()).await?;
                return Err(failure(&[e]));
            }
        }
    };
    let errors: Vec<DownstreamError> = [records.as_ref().err(), billing.as_ref().err()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if errors.len() == 2 {
        audit.finish(failure_status(&errors).as_str()).await?;
        return Err(failure(&errors));
    }
    let body = match document(
        patient.body.as_deref().unwrap_or("null"),
        records.ok(),
        billing.ok(),
        &errors,
    ) {
        Ok(b) => b,
        Err(e) => {
            audit.finish("500").await?;
            return Err(FhirError::internal(e));
        }
    };
    audit
        .finish(if errors.is_empty() {
            "success"
        } else {
            "partial"
        })
        .await?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The history's audit record, written once: by [`AuditOnDrop::finish`]
/// with the outcome, or, when the handler is dropped first (the caller went
/// away, the server's request deadline), as `cancelled`.
struct AuditOnDrop {
    store: Store,
    rec: Option<clinflow_store::AuditRecord>,
}

impl AuditOnDrop {
    async fn finish(&mut self, outcome: &str) -> Result<(), FhirError> {
        if let Some(mut rec) = self.rec.take() {
            rec.outcome = outcome.to_string();
            self.store.audit(vec![rec]).await?;
        }
        Ok(())
    }
}

impl Drop for AuditOnDrop {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.outcome = "cancelled".into();
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.audit(vec![rec]).await {
                    tracing::error!(error = %e, "a cancelled history's audit record was lost");
                }
            });
        }
    }
}

/// 504 when a service ran out of time, else 502.
fn failure_status(errors: &[DownstreamError]) -> StatusCode {
    if errors
        .iter()
        .any(|e| matches!(e, DownstreamError::Deadline { .. }))
    {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    }
}

/// The OperationOutcome of a failed history: one issue per service.
fn failure(errors: &[DownstreamError]) -> FhirError {
    let issues = errors
        .iter()
        .map(|e| {
            let code = match e {
                DownstreamError::Deadline { .. } => IssueCode::Timeout,
                _ => IssueCode::Exception,
            };
            clinflow_fhir::OutcomeIssue::error(code, e.to_string())
        })
        .collect();
    FhirError::new(
        failure_status(errors),
        clinflow_fhir::OperationOutcome { issues },
    )
}

#[derive(Serialize)]
struct Document<'a> {
    patient: &'a RawValue,
    records: Option<BTreeMap<&'a str, Vec<DayGroup<'a>>>>,
    billing: Option<BillingDoc<'a>>,
    complete: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing: Vec<Missing>,
}

#[derive(Serialize)]
struct DayGroup<'a> {
    /// `YYYY-MM-DD` (UTC), or null for undated resources (listed last).
    date: Option<String>,
    resources: Vec<&'a RawValue>,
}

#[derive(Serialize)]
struct BillingDoc<'a> {
    invoices: Vec<&'a RawValue>,
    charge_items: Vec<&'a RawValue>,
    /// The invoices' total when they are in one currency (null otherwise:
    /// see `totals`).
    total: Option<MoneyDoc>,
    totals: Vec<MoneyDoc>,
}

#[derive(Serialize)]
struct MoneyDoc {
    /// The exact decimal, as a JSON number with its fraction digits.
    value: Box<RawValue>,
    currency: String,
}

#[derive(Serialize)]
struct Missing {
    service: &'static str,
    reason: String,
}

/// The answer: the patient, the records by type then day (newest first),
/// the billing, and what is missing when something is. Resources are
/// embedded as stored (decimals keep their text).
fn document(
    patient: &str,
    records: Option<Vec<pb::Resource>>,
    billing: Option<Billing>,
    errors: &[DownstreamError],
) -> anyhow::Result<String> {
    let patient: &RawValue = serde_json::from_str(patient)?;
    let mut records = records;
    let records_doc = match records.as_mut() {
        Some(list) => {
            list.sort_by(|a, b| {
                a.resource_type
                    .cmp(&b.resource_type)
                    .then(
                        b.date_ms
                            .unwrap_or(i64::MIN)
                            .cmp(&a.date_ms.unwrap_or(i64::MIN)),
                    )
                    .then(a.id.cmp(&b.id))
            });
            let mut by_type: BTreeMap<&str, Vec<DayGroup<'_>>> = BTreeMap::new();
            for r in list.iter() {
                let raw: &RawValue = serde_json::from_str(&r.json)?;
                let day = r
                    .date_ms
                    .map(|ms| clinflow_fhir::datetime::format_instant(ms)[..10].to_string());
                let groups = by_type.entry(r.resource_type.as_str()).or_default();
                match groups.last_mut() {
                    Some(g) if g.date == day => g.resources.push(raw),
                    _ => groups.push(DayGroup {
                        date: day,
                        resources: vec![raw],
                    }),
                }
            }
            Some(by_type)
        }
        None => None,
    };
    let billing_doc = match &billing {
        Some(b) => {
            let mut invoices = Vec::new();
            let mut charge_items = Vec::new();
            let mut sorted: Vec<&pb::Resource> = b.resources.iter().collect();
            sorted.sort_by(|a, b| b.date_ms.cmp(&a.date_ms).then(a.id.cmp(&b.id)));
            for r in sorted {
                let raw: &RawValue = serde_json::from_str(&r.json)?;
                match r.resource_type.as_str() {
                    "Invoice" => invoices.push(raw),
                    _ => charge_items.push(raw),
                }
            }
            let totals = b
                .totals
                .iter()
                .map(|m| {
                    Ok(MoneyDoc {
                        value: RawValue::from_string(m.value.clone())?,
                        currency: m.currency.clone(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let total = match totals.as_slice() {
                [one] => Some(MoneyDoc {
                    value: one.value.clone(),
                    currency: one.currency.clone(),
                }),
                _ => None,
            };
            Some(BillingDoc {
                invoices,
                charge_items,
                total,
                totals,
            })
        }
        None => None,
    };
    let doc = Document {
        patient,
        records: records_doc,
        billing: billing_doc,
        complete: errors.is_empty(),
        missing: errors
            .iter()
            .map(|e| Missing {
                service: e.service(),
                reason: e.to_string(),
            })
            .collect(),
    };
    Ok(serde_json::to_string(&doc)?)
}

/// The gateway as the state holds it.
pub type SharedGateway = Arc<Gateway>;

#[cfg(test)]
mod tests {
    use super::*;

    fn res(t: &str, id: &str, date: Option<i64>) -> pb::Resource {
        pb::Resource {
            resource_type: t.into(),
            id: id.into(),
            version: 1,
            date_ms: date,
            json: format!(
                r#"{{"resourceType":"{t}","id":"{id}","valueQuantity":{{"value":7.40}}}}"#
            ),
        }
    }

    #[test]
    fn records_group_by_type_then_day_newest_first_keeping_decimals() {
        let day = 86_400_000;
        let doc = document(
            r#"{"resourceType":"Patient","id":"p"}"#,
            Some(vec![
                res("Observation", "a", Some(10 * day)),
                res("Observation", "b", Some(12 * day + 5)),
                res("Observation", "c", Some(12 * day)),
                res("Observation", "u", None),
                res("Encounter", "e", Some(3 * day)),
            ]),
            Some(Billing::default()),
            &[],
        )
        .unwrap();
        assert!(doc.contains("7.40"), "decimal text kept: {doc}");
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        let obs = v["records"]["Observation"].as_array().unwrap();
        let dates: Vec<_> = obs.iter().map(|g| g["date"].clone()).collect();
        assert_eq!(
            dates,
            [
                serde_json::json!("1970-01-13"),
                "1970-01-11".into(),
                serde_json::Value::Null
            ]
        );
        let ids: Vec<_> = obs[0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(v["records"]["Encounter"][0]["resources"][0]["id"], "e");
        assert_eq!(v["complete"], true);
        assert!(v.get("missing").is_none());
    }

    #[test]
    fn an_incomplete_history_says_what_is_missing_and_why() {
        let doc = document(
            r#"{"resourceType":"Patient","id":"p"}"#,
            Some(vec![]),
            None,
            &[DownstreamError::Deadline { service: "billing" }],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["complete"], false);
        assert_eq!(v["billing"], serde_json::Value::Null);
        assert_eq!(v["missing"][0]["service"], "billing");
        assert!(v["missing"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("deadline"));
    }

    #[test]
    fn totals_are_exact_numbers_and_one_currency_is_the_total() {
        let b = Billing {
            resources: vec![],
            totals: vec![pb::Money {
                value: "92.80".into(),
                currency: "EUR".into(),
            }],
        };
        let doc = document(r#"{"id":"p"}"#, Some(vec![]), Some(b), &[]).unwrap();
        assert!(
            doc.contains(r#""total":{"value":92.80,"currency":"EUR"}"#),
            "{doc}"
        );
    }

    #[test]
    fn deadline_failures_are_504_others_502() {
        let late = DownstreamError::Deadline { service: "records" };
        let down = DownstreamError::Unavailable {
            service: "billing",
            reason: "refused".into(),
        };
        assert_eq!(
            failure_status(std::slice::from_ref(&down)),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(failure_status(&[down, late]), StatusCode::GATEWAY_TIMEOUT);
    }
}
