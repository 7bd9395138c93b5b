//! The records and billing services: gRPC over the FHIR store.
//!
//! Each call is checked (the service token, a patient id), gets a deadline
//! (the caller's `grpc-timeout`, at most [`MAX_DEADLINE`]) and runs on a task
//! of its own that pages through the store and sends each page as it comes.
//! The task stops at the first of: done, the deadline (the store is told to
//! stop its query, the caller gets `DEADLINE_EXCEEDED`), or the caller gone
//! (its stream dropped: an RST_STREAM from the gateway). Both of the last
//! two count in `clinflow_history_cancelled_total`, so cancellation is
//! observable from outside.

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use clinflow_store::{CompartmentQuery, ReadError, Store};
use futures::{Stream, StreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::money::Totals;
use crate::pb;

/// The clinical records a history holds.
pub const RECORD_TYPES: &[&str] = &[
    "Encounter",
    "Condition",
    "Observation",
    "DiagnosticReport",
    "QuestionnaireResponse",
    "AdverseEvent",
];
/// The billing resources an account holds.
pub const BILLING_TYPES: &[&str] = &["Invoice", "ChargeItem"];
/// The longest a call may run when its caller sets no deadline.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30);
/// Resources per store query and per streamed page.
pub const PAGE: usize = 500;
/// Calls served at once per service; more are refused (`RESOURCE_EXHAUSTED`)
/// rather than queued without bound.
pub const MAX_IN_FLIGHT: usize = 512;
/// Largest request message accepted (a request is an id and a date).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Fault injection for tests and benchmarks: a delay before each call's
/// work (it honours the deadline and the caller going away like real work).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub latency: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CancelLabels {
    service: &'static str,
    /// `deadline` (the call's time ran out) or `caller` (it went away).
    reason: &'static str,
}

/// The services' metrics (no label carries a patient id).
#[derive(Clone, Default)]
pub struct ServiceMetrics {
    requests: Family<OutcomeLabels, Counter>,
    cancelled: Family<CancelLabels, Counter>,
    last_cancel: Family<ServiceLabels, Gauge<f64, AtomicU64>>,
    in_flight: Family<ServiceLabels, Gauge>,
}

impl ServiceMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "history_service_requests",
            "History service calls by outcome (ok, invalid, unauthenticated, overloaded, error, deadline, cancelled)",
            self.requests.clone(),
        );
        r.register(
            "history_cancelled",
            "History service calls stopped before their end: the deadline passed or the caller went away",
            self.cancelled.clone(),
        );
        r.register(
            "history_last_cancel_timestamp_seconds",
            "When a history service last stopped a call (Unix time)",
            self.last_cancel.clone(),
        );
        r.register(
            "history_service_in_flight",
            "History service calls running",
            self.in_flight.clone(),
        );
    }

    fn outcome(&self, service: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { service, outcome })
            .inc();
    }
}

/// What both services share.
#[derive(Clone)]
pub struct ServiceContext {
    store: Store,
    token: Arc<str>,
    faults: Faults,
    metrics: ServiceMetrics,
    permits: Arc<Semaphore>,
}

impl ServiceContext {
    pub fn new(
        store: Store,
        token: &str,
        faults: Faults,
        metrics: ServiceMetrics,
    ) -> ServiceContext {
        ServiceContext {
            store,
            token: token.into(),
            faults,
            metrics,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// A copy with permits of its own: each service has its own limit.
    fn own_permits(&self) -> ServiceContext {
        ServiceContext {
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            ..self.clone()
        }
    }

    /// Checks a call and starts tracking it: its deadline and its permit.
    fn begin(
        &self,
        service: &'static str,
        req: &Request<pb::HistoryRequest>,
    ) -> Result<Tracker, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|t| crate::wire::same_secret(t.as_bytes(), self.token.as_bytes())) {
            self.metrics.outcome(service, "unauthenticated");
            return Err(Status::unauthenticated("a valid service token is required"));
        }
        if !valid_id(&req.get_ref().patient_id) {
            self.metrics.outcome(service, "invalid");
            return Err(Status::invalid_argument("patient_id is not a FHIR id"));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.outcome(service, "overloaded");
            return Err(Status::resource_exhausted("too many calls in flight"));
        };
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::wire::parse_grpc_timeout)
            .map_or(MAX_DEADLINE, |t| t.min(MAX_DEADLINE));
        self.metrics
            .in_flight
            .get_or_create(&ServiceLabels { service })
            .inc();
        Ok(Tracker {
            metrics: self.metrics.clone(),
            service,
            deadline: Instant::now() + timeout,
            finished: false,
            _permit: permit,
        })
    }
}

/// A FHIR id: 1 to 64 of `A-Za-z0-9-.`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// One call in progress. Dropped unfinished, it counts as cancelled.
struct Tracker {
    metrics: ServiceMetrics,
    service: &'static str,
    deadline: Instant,
    finished: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Tracker {
    fn finish(mut self, outcome: &'static str) {
        self.finished = true;
        self.metrics.outcome(self.service, outcome);
        if outcome == "deadline" {
            self.cancelled("deadline");
        }
    }

    fn cancelled(&self, reason: &'static str) {
        let service = self.service;
        self.metrics
            .cancelled
            .get_or_create(&CancelLabels { service, reason })
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics
            .last_cancel
            .get_or_create(&ServiceLabels { service })
            .set(now);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .get_or_create(&ServiceLabels {
                service: self.service,
            })
            .dec();
        if !self.finished {
            self.metrics.outcome(self.service, "cancelled");
            let reason = if Instant::now() >= self.deadline {
                "deadline"
            } else {
                "caller"
            };
            self.cancelled(reason);
        }
    }
}

type PageStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The pages, then the call's final status when it failed. The status has
/// a channel of its own: the pages' channel may be full when the deadline
/// strikes (the work is then waiting to send), and a status lost there
/// would end the stream as if it had succeeded.
fn stream_of<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
    status: tokio::sync::oneshot::Receiver<Status>,
) -> PageStream<T> {
    let pages = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|page| (Ok(page), rx))
    });
    let end = futures::stream::once(status).filter_map(|s| async move { s.ok().map(Err) });
    Box::pin(pages.chain(end))
}

/// Why a call's work stopped early.
enum Stop {
    /// The receiving side is gone: the caller went away.
    Gone,
    Deadline,
    Failed(Status),
}

impl From<ReadError> for Stop {
    fn from(e: ReadError) -> Stop {
        match e {
            ReadError::Deadline => Stop::Deadline,
            ReadError::Other(e) => {
                tracing::error!(error = %format!("{e:#}"), "a history read failed");
                Stop::Failed(Status::internal("reading the store failed"))
            }
        }
    }
}

/// Runs a call's work on its own task, feeding `tx`, until it ends, its
/// deadline passes or the caller goes away; settles the tracker.
fn spawn_call<T, F>(
    tracker: Tracker,
    tx: mpsc::Sender<T>,
    status: tokio::sync::oneshot::Sender<Status>,
    work: F,
) where
    T: Send + 'static,
    F: std::future::Future<Output = Result<(), Stop>> + Send + 'static,
{
    tokio::spawn(async move {
        let deadline = tracker.deadline;
        let outcome = tokio::select! {
            // The caller dropping its stream closes the channel: stop at
            // once, whatever the work is waiting for (the store's query is
            // stopped by dropping it).
            () = tx.closed() => Err(Stop::Gone),
            r = tokio::time::timeout_at(deadline, work) => r.unwrap_or(Err(Stop::Deadline)),
        };
        match outcome {
            Ok(()) => tracker.finish("ok"),
            Err(Stop::Gone) => drop(tracker),
            Err(Stop::Deadline) => {
                tracker.finish("deadline");
                let _ = status.send(Status::deadline_exceeded("the call's deadline passed"));
            }
            Err(Stop::Failed(s)) => {
                tracker.finish("error");
                let _ = status.send(s);
            }
        }
        // `tx` goes last: the stream ends only once the status is there.
        drop(tx);
    });
}

/// What a service makes of the store's pages: the messages it streams.
trait Pages: Send + 'static {
    type Page: Send + 'static;
    /// The service's name (metrics, and the gateway's messages).
    const SERVICE: &'static str;
    /// The resource types it reads, in this order.
    const TYPES: &'static [&'static str];
    /// The message for one page of resources (never empty).
    fn page(&mut self, resources: Vec<pb::Resource>) -> Result<Self::Page, Stop>;
    /// The last message, which says the stream is whole.
    fn last(self) -> Self::Page;
}

/// Starts a call: checks it, then streams every current resource of
/// `P::TYPES` in the patient's compartment, page by page, then `last`.
fn start<P: Pages>(
    ctx: &ServiceContext,
    request: Request<pb::HistoryRequest>,
    mut pages: P,
) -> Result<Response<PageStream<P::Page>>, Status> {
    let tracker = ctx.begin(P::SERVICE, &request)?;
    let req = request.into_inner();
    let (tx, rx) = mpsc::channel(2);
    let (status_tx, status_rx) = tokio::sync::oneshot::channel();
    let ctx = ctx.clone();
    let deadline = tracker.deadline;
    let out = tx.clone();
    spawn_call(tracker, tx, status_tx, async move {
        if !ctx.faults.latency.is_zero() {
            tokio::time::sleep(ctx.faults.latency).await;
        }
        for rtype in P::TYPES {
            let mut after = None;
            loop {
                let page = ctx
                    .store
                    .compartment_page(
                        CompartmentQuery {
                            patient: req.patient_id.clone(),
                            rtype: rtype.to_string(),
                            since: req.since_ms,
                            after: after.clone(),
                            limit: PAGE,
                        },
                        deadline,
                    )
                    .await?;
                let full = page.len() == PAGE;
                after = page.last().map(|r| r.resource.id.clone());
                let resources = page
                    .into_iter()
                    .filter_map(|r| {
                        Some(pb::Resource {
                            json: r.resource.body?,
                            resource_type: r.resource.resource_type,
                            id: r.resource.id,
                            version: r.resource.version,
                            date_ms: r.date,
                        })
                    })
                    .collect::<Vec<_>>();
                if !resources.is_empty() {
                    out.send(pages.page(resources)?)
                        .await
                        .map_err(|_| Stop::Gone)?;
                }
                if !full {
                    break;
                }
            }
        }
        out.send(pages.last()).await.map_err(|_| Stop::Gone)
    });
    Ok(Response::new(stream_of(rx, status_rx)))
}

struct RecordsPages;

impl Pages for RecordsPages {
    type Page = pb::ResourcePage;
    const SERVICE: &'static str = "records";
    const TYPES: &'static [&'static str] = RECORD_TYPES;

    fn page(&mut self, resources: Vec<pb::Resource>) -> Result<pb::ResourcePage, Stop> {
        Ok(pb::ResourcePage {
            resources,
            last: false,
        })
    }

    fn last(self) -> pb::ResourcePage {
        pb::ResourcePage {
            resources: Vec::new(),
            last: true,
        }
    }
}

/// Billing's pages, and the invoices' totals so far (sent last).
#[derive(Default)]
struct BillingPages {
    totals: Totals,
}

impl Pages for BillingPages {
    type Page = pb::BillingPage;
    const SERVICE: &'static str = "billing";
    const TYPES: &'static [&'static str] = BILLING_TYPES;

    fn page(&mut self, resources: Vec<pb::Resource>) -> Result<pb::BillingPage, Stop> {
        for r in resources.iter().filter(|r| r.resource_type == "Invoice") {
            // No resource id in the log or the status: ids may be made from
            // subject ids. The error says what is wrong, not whose.
            add_invoice(&mut self.totals, &r.json).map_err(|e| {
                tracing::error!(error = %e, "an invoice's total is unreadable");
                Stop::Failed(Status::data_loss(format!(
                    "an invoice has an unreadable total: {e}"
                )))
            })?;
        }
        Ok(pb::BillingPage {
            resources,
            totals: Vec::new(),
            last: false,
        })
    }

    fn last(self) -> pb::BillingPage {
        pb::BillingPage {
            resources: Vec::new(),
            totals: self
                .totals
                .render()
                .into_iter()
                .map(|(value, currency)| pb::Money { value, currency })
                .collect(),
            last: true,
        }
    }
}

/// Adds an invoice's `totalGross` (else `totalNet`) to the totals, unless
/// it is cancelled or entered in error. The amount's decimal text is read
/// as written (a raw JSON value), never through a float.
fn add_invoice(totals: &mut Totals, json: &str) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Money<'a> {
        #[serde(borrow)]
        value: Option<&'a serde_json::value::RawValue>,
        currency: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Invoice<'a> {
        status: Option<String>,
        #[serde(rename = "totalGross", borrow)]
        total_gross: Option<Money<'a>>,
        #[serde(rename = "totalNet", borrow)]
        total_net: Option<Money<'a>>,
    }
    let inv: Invoice<'_> = serde_json::from_str(json)?;
    if matches!(
        inv.status.as_deref(),
        Some("cancelled" | "entered-in-error" | "draft")
    ) {
        return Ok(());
    }
    let Some(m) = inv.total_gross.or(inv.total_net) else {
        return Ok(());
    };
    let (Some(value), Some(currency)) = (m.value, m.currency) else {
        anyhow::bail!("the total has no value or no currency");
    };
    totals.add(value.get(), &currency)?;
    Ok(())
}

/// The records service.
#[derive(Clone)]
pub struct RecordsService(pub ServiceContext);

#[tonic::async_trait]
impl pb::records_server::Records for RecordsService {
    type HistoryStream = PageStream<pb::ResourcePage>;

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<Self::HistoryStream>, Status> {
        start(&self.0, request, RecordsPages)
    }
}

/// The billing service.
#[derive(Clone)]
pub struct BillingService(pub ServiceContext);

#[tonic::async_trait]
impl pb::billing_server::Billing for BillingService {
    type AccountStream = PageStream<pb::BillingPage>;

    async fn account(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<Self::AccountStream>, Status> {
        start(&self.0, request, BillingPages::default())
    }
}

/// Which services a server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Records,
    Billing,
}

/// The gRPC routes of the `which` services, as an axum router.
pub fn grpc_router(ctx: &ServiceContext, which: &[Which]) -> axum::Router {
    let mut routes = tonic::service::Routes::default();
    for w in which {
        routes = match w {
            Which::Records => routes.add_service(
                pb::records_server::RecordsServer::new(RecordsService(ctx.own_permits()))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            ),
            Which::Billing => routes.add_service(
                pb::billing_server::BillingServer::new(BillingService(ctx.own_permits()))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            ),
        };
    }
    routes.into_axum_router()
}

/// Serves the `which` services on `listener` until `shutdown` resolves:
/// gRPC (HTTP/2 without TLS, prior knowledge) and, on the same port over
/// HTTP/1.1, `GET /healthz` (public) and `GET /metrics` (the service token).
/// This is `clinflow records serve` / `clinflow billing serve`, and the
/// in-process services of `clinflow serve` (without the two HTTP routes:
/// their metrics are the server's).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: ServiceContext,
    which: Vec<Which>,
    standalone: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = grpc_router(&ctx, &which);
    if standalone {
        let mut registry = Registry::with_prefix("clinflow");
        ctx.metrics.register(&mut registry);
        let registry = Arc::new(registry);
        let token = ctx.token.clone();
        app = app
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/metrics",
                axum::routing::get(move |headers: axum::http::HeaderMap| {
                    let registry = registry.clone();
                    let token = token.clone();
                    async move { render_metrics(&registry, &token, &headers) }
                }),
            );
    }
    // No Nagle delay: a page is one write, the last one must not wait.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn render_metrics(
    registry: &Registry,
    token: &str,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|t| crate::wire::same_secret(t.as_bytes(), token.as_bytes())) {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            "the service token is required\n",
        )
            .into_response();
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoice_totals_read_the_decimal_text() {
        let mut t = Totals::default();
        add_invoice(&mut t, r#"{"resourceType":"Invoice","status":"issued","totalGross":{"value":80.10,"currency":"EUR"}}"#).unwrap();
        add_invoice(&mut t, r#"{"resourceType":"Invoice","status":"balanced","totalNet":{"value":0.20,"currency":"EUR"}}"#).unwrap();
        add_invoice(&mut t, r#"{"resourceType":"Invoice","status":"cancelled","totalGross":{"value":1000,"currency":"EUR"}}"#).unwrap();
        add_invoice(&mut t, r#"{"resourceType":"Invoice","status":"issued"}"#).unwrap();
        assert_eq!(t.render(), vec![("80.30".into(), "EUR".into())]);
        assert!(add_invoice(
            &mut t,
            r#"{"status":"issued","totalGross":{"value":1.5e3,"currency":"EUR"}}"#
        )
        .is_err());
        assert!(add_invoice(&mut t, r#"{"status":"issued","totalGross":{"value":1}}"#).is_err());
    }

    #[test]
    fn patient_ids_are_fhir_ids() {
        assert!(valid_id("demo-S-001"));
        assert!(valid_id("0193f1c2-7b3a-7cc1-9d0e-3f5a1b2c4d5e"));
        for bad in ["", "a/b", "a b", "x".repeat(65).as_str(), "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
