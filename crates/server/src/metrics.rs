//! Prometheus metrics, rendered at `/metrics`.
//!
//! Names say what they count; labels never carry patient data (routes are
//! the matched route templates, not the request paths).

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// A route template as a `&'static str`, so that labelling a request
/// allocates nothing. Templates come from the router, a fixed set, so the
/// interned strings are bounded (and "unmatched" covers every other path).
fn intern(route: &str) -> &'static str {
    static ROUTES: std::sync::RwLock<Vec<&'static str>> = std::sync::RwLock::new(Vec::new());
    if let Some(r) = ROUTES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|r| **r == route)
    {
        return r;
    }
    let mut routes = ROUTES.write().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = routes.iter().find(|r| **r == route) {
        return r;
    }
    let r: &'static str = Box::leak(route.to_string().into_boxed_str());
    routes.push(r);
    r
}

fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// An ingest item's fate, by input format.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestItemLabels {
    pub format: String,
    /// `stored`, `rejected`, `duplicate`.
    pub fate: String,
}

/// An ingest pipeline stage (`map`, `persist`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// One ingest stage's metrics: handles into the `ingest_stage_*`
/// families, labelled with the stage.
#[derive(Clone)]
pub struct StageMetrics {
    /// Batches waiting for the stage's workers.
    pub queue_depth: Gauge,
    /// Workers on a batch now (waiting to hand it to the next stage
    /// included: a blocked worker is an occupied one).
    pub busy: Gauge,
    /// Workers the stage has.
    pub workers: Gauge,
    /// Items that left the stage.
    pub items: Counter,
    /// Time a batch spends in the stage, handing it on included.
    pub seconds: Histogram,
}

/// An edit-check rejection, by its stable code (never its text: that
/// names subjects and values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub reason: String,
}

/// An MLLP acknowledgement, by its code (`AA`, `AE`, `AR`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabels {
    pub code: String,
}

/// Why an MLLP connection was closed without an ACK (a fixed phrase,
/// never message content).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnackedLabels {
    pub why: String,
}

/// The server's metrics.
pub struct Metrics {
    /// Unique per `Metrics` in the process: the key of its per-thread
    /// handle cache ([`observe`]), never reused, unlike an address.
    id: u64,
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub auth_failures: Counter,
    pub resources_written: Counter,
    /// The ingest stages behind the intake, in order.
    pub ingest_map: StageMetrics,
    pub ingest_persist: StageMetrics,
    pub ingest_items: Family<IngestItemLabels, Counter>,
    pub ingest_rejections: Family<RejectionLabels, Counter>,
    /// From a worker taking a batch to the batch done.
    pub ingest_batch_seconds: Histogram,
    /// MLLP connections open now, and opened in all.
    pub mllp_connections_open: Gauge,
    pub mllp_connections: Counter,
    /// ACKs sent, by code.
    pub mllp_acks: Family<AckLabels, Counter>,
    /// From a whole frame read to its ACK written.
    pub mllp_ack_seconds: Histogram,
    /// Messages left without an ACK (the connection closed; the sender
    /// resends), by reason.
    pub mllp_unacknowledged: Family<UnackedLabels, Counter>,
    /// Framing errors (garbage, over-size or badly ended frames).
    pub mllp_frame_errors: Counter,
    /// Site-registry snapshot rebuilds, by outcome (`ok`, `failed`).
    pub sites_refreshes: Family<OutcomeLabels, Counter>,
    /// Age of the snapshot served (set when rendered): grows while
    /// refreshes fail.
    pub sites_snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Sites in the snapshot served.
    pub sites: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("clinflow");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let auth_failures = Counter::default();
        let resources_written = Counter::default();
        let stage_queue = Family::<StageLabels, Gauge>::default();
        let stage_busy = Family::<StageLabels, Gauge>::default();
        let stage_workers = Family::<StageLabels, Gauge>::default();
        let stage_items = Family::<StageLabels, Counter>::default();
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 18))
        });
        let stage = |name: &str| {
            let l = StageLabels {
                stage: name.to_string(),
            };
            StageMetrics {
                queue_depth: stage_queue.get_or_create(&l).clone(),
                busy: stage_busy.get_or_create(&l).clone(),
                workers: stage_workers.get_or_create(&l).clone(),
                items: stage_items.get_or_create(&l).clone(),
                seconds: stage_seconds.get_or_create(&l).clone(),
            }
        };
        let (ingest_map, ingest_persist) = (stage("map"), stage("persist"));
        let ingest_items = Family::<IngestItemLabels, Counter>::default();
        let ingest_rejections = Family::<RejectionLabels, Counter>::default();
        let ingest_batch_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "ingest_stage_queue_depth",
            "Ingest batches waiting for a stage's workers, by stage",
            stage_queue,
        );
        registry.register(
            "ingest_stage_busy",
            "Ingest workers on a batch, by stage",
            stage_busy,
        );
        registry.register(
            "ingest_stage_workers",
            "Ingest workers, by stage",
            stage_workers,
        );
        registry.register(
            "ingest_stage_items",
            "Ingest items that left a stage, by stage",
            stage_items,
        );
        registry.register(
            "ingest_stage_duration_seconds",
            "Time an ingest batch spends in a stage, by stage",
            stage_seconds,
        );
        registry.register(
            "ingest_items",
            "Ingest items processed, by format and fate",
            ingest_items.clone(),
        );
        registry.register(
            "ingest_rejections",
            "Edit-check rejections, by reason",
            ingest_rejections.clone(),
        );
        registry.register(
            "ingest_batch_duration_seconds",
            "Time from a map worker taking a batch to the batch done",
            ingest_batch_seconds.clone(),
        );
        let mllp_connections_open = Gauge::default();
        let mllp_connections = Counter::default();
        let mllp_acks = Family::<AckLabels, Counter>::default();
        let mllp_ack_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let mllp_unacknowledged = Family::<UnackedLabels, Counter>::default();
        let mllp_frame_errors = Counter::default();
        registry.register(
            "mllp_connections_open",
            "MLLP connections open",
            mllp_connections_open.clone(),
        );
        registry.register(
            "mllp_connections",
            "MLLP connections accepted",
            mllp_connections.clone(),
        );
        registry.register("mllp_acks", "MLLP ACKs sent, by code", mllp_acks.clone());
        registry.register(
            "mllp_ack_duration_seconds",
            "Time from an MLLP frame read to its ACK written",
            mllp_ack_seconds.clone(),
        );
        registry.register(
            "mllp_unacknowledged",
            "MLLP messages left without an ACK (connection closed), by reason",
            mllp_unacknowledged.clone(),
        );
        registry.register(
            "mllp_frame_errors",
            "MLLP framing errors",
            mllp_frame_errors.clone(),
        );
        let sites_refreshes = Family::<OutcomeLabels, Counter>::default();
        let sites_snapshot_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let sites = Gauge::default();
        registry.register(
            "sites_refreshes",
            "Site-registry snapshot rebuilds, by outcome",
            sites_refreshes.clone(),
        );
        registry.register(
            "sites_snapshot_age_seconds",
            "Age of the site-registry snapshot served",
            sites_snapshot_age.clone(),
        );
        registry.register("sites", "Sites in the registry snapshot", sites.clone());
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a missing or invalid token",
            auth_failures.clone(),
        );
        registry.register(
            "fhir_resources_written",
            "FHIR resource versions committed",
            resources_written.clone(),
        );
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Metrics {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            registry,
            requests,
            latency,
            auth_failures,
            resources_written,
            ingest_map,
            ingest_persist,
            ingest_items,
            ingest_rejections,
            ingest_batch_seconds,
            mllp_connections_open,
            mllp_connections,
            mllp_acks,
            mllp_ack_seconds,
            mllp_unacknowledged,
            mllp_frame_errors,
            sites_refreshes,
            sites_snapshot_age,
            sites,
        }
    }

    /// Registers metrics owned elsewhere (the history services and
    /// gateway), before the server starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A request's method and route template, as metric labels (the route
/// template, never the path: paths and queries carry ids).
pub fn labels_of(req: &Request) -> (&'static str, &'static str) {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| intern(m.as_str()));
    (method_label(req.method()), route)
}

/// A request's labels in one [`Metrics`]: (its id, method, route, status).
type HandleKey = (u64, &'static str, &'static str, u16);

/// Counts an answered request and observes its latency by route.
pub fn observe(
    metrics: &Metrics,
    (method, route): (&'static str, &'static str),
    status: u16,
    start: Instant,
) {
    let seconds = start.elapsed().as_secs_f64();
    tracing::debug!(
        method,
        route,
        status,
        latency_ms = seconds * 1000.0,
        "request answered"
    );
    // The families' handles, cached per thread: a family lookup takes its
    // lock, a cache line every core contends on at a hundred thousand
    // requests a second. Handles are shared with the family, so what each
    // thread counts is what /metrics shows.
    thread_local! {
        static HANDLES: std::cell::RefCell<HashMap<HandleKey, (Counter, Histogram)>> =
            std::cell::RefCell::new(HashMap::new());
    }
    let key = (metrics.id, method, route, status);
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        // Bounded: routes and statuses are few; a process with many
        // `Metrics` (tests) starts over rather than grow.
        if h.len() > 4096 {
            h.clear();
        }
        let (count, latency) = h.entry(key).or_insert_with(|| {
            (
                metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        method,
                        route,
                        status,
                    })
                    .clone(),
                metrics
                    .latency
                    .get_or_create(&RouteLabels { route })
                    .clone(),
            )
        });
        count.inc();
        latency.observe(seconds);
    });
}
