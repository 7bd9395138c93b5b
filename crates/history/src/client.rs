//! The gateway's clients of the records and billing services, as typed
//! tower stacks: `Retry` (idempotent calls only, within the deadline) over
//! `Breaker` (adaptive throttling, per service) over the gRPC call, which
//! sends the remaining time as `grpc-timeout` and stops at the deadline.
//!
//! A call is a [`Call`]: the request and its deadline, the one the gateway
//! derived from its own; every layer reads it, none invents another.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tower::retry::{Policy, Retry, RetryLayer};
use tower::{Layer, Service, ServiceExt};

use crate::breaker::{Breaker, BreakerLayer};
use crate::pb;
use crate::pb::billing_client::BillingClient;
use crate::pb::records_client::RecordsClient;

/// A request with the deadline it must be answered by.
#[derive(Debug, Clone)]
pub struct Call<R> {
    pub request: R,
    pub deadline: Instant,
}

/// Whether a request may be sent twice. A type's answer is fixed at compile
/// time: the retry layer cannot be handed a write by mistake.
pub trait Idempotent {
    const IDEMPOTENT: bool;
}

/// Both history calls are reads.
impl Idempotent for pb::HistoryRequest {
    const IDEMPOTENT: bool = true;
}

/// Why a downstream service gave no answer. Each names the service, for the
/// gateway's OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownstreamError {
    #[error("the {service} service did not answer within the deadline")]
    Deadline { service: &'static str },
    #[error("the {service} service is unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
    },
    #[error("the {service} service failed: {reason}")]
    Failed {
        service: &'static str,
        reason: String,
        /// The service was up and answered (e.g. invalid argument), as
        /// opposed to failing or shedding load.
        accepted: bool,
    },
    #[error("the {service} service is failing; its circuit breaker is open")]
    BreakerOpen { service: &'static str },
}

impl DownstreamError {
    pub fn service(&self) -> &'static str {
        match self {
            DownstreamError::Deadline { service }
            | DownstreamError::Unavailable { service, .. }
            | DownstreamError::Failed { service, .. }
            | DownstreamError::BreakerOpen { service } => service,
        }
    }

    /// For the breaker: did the service take the request (it is up)?
    pub fn service_accepted(&self) -> bool {
        matches!(self, DownstreamError::Failed { accepted: true, .. })
    }

    /// For the retry layer: could another attempt succeed? Only when the
    /// service could not be reached: a deadline is spent, a breaker is open
    /// on purpose, and an answer is an answer.
    pub fn retryable(&self) -> bool {
        matches!(self, DownstreamError::Unavailable { .. })
    }

    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DownstreamError::Deadline { .. } => "deadline",
            DownstreamError::Unavailable { .. } => "unavailable",
            DownstreamError::Failed { .. } => "failed",
            DownstreamError::BreakerOpen { .. } => "breaker-open",
        }
    }

    fn from_status(service: &'static str, s: &tonic::Status) -> DownstreamError {
        use tonic::Code;
        match s.code() {
            Code::DeadlineExceeded => DownstreamError::Deadline { service },
            Code::Unavailable => DownstreamError::Unavailable {
                service,
                reason: status_reason(s),
            },
            code => DownstreamError::Failed {
                service,
                reason: status_reason(s),
                accepted: !matches!(
                    code,
                    Code::Internal
                        | Code::Unknown
                        | Code::ResourceExhausted
                        | Code::Aborted
                        | Code::Cancelled
                        | Code::DataLoss
                ),
            },
        }
    }
}

/// A status as one line: its code and message (the services' messages
/// name no patient and no resource).
fn status_reason(s: &tonic::Status) -> String {
    let mut r = format!("{:?}", s.code());
    if !s.message().is_empty() {
        r.push_str(": ");
        r.push_str(s.message());
    }
    r
}

/// Retries a failed call while it is idempotent, could succeed on another
/// attempt, and there is time for one before the deadline.
#[derive(Debug, Clone)]
pub struct DeadlineRetry {
    attempts: u32,
    max_retries: u32,
    base: Duration,
}

/// An attempt needs at least this much time left to be worth making: the
/// gateway must still be able to say why before its deadline.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(25);

impl DeadlineRetry {
    pub fn new(max_retries: u32, base: Duration) -> DeadlineRetry {
        DeadlineRetry {
            attempts: 0,
            max_retries,
            base,
        }
    }

    /// The wait before retry `n` (0-based): `base * 2^n`, with full jitter
    /// in its upper half so that callers failing together do not come back
    /// together.
    fn backoff(&self, n: u32) -> Duration {
        let full = self.base.saturating_mul(1 << n.min(10));
        full / 2 + full.mul_f64(rand::random::<f64>() / 2.0)
    }
}

impl<R, T> Policy<Call<R>, T, DownstreamError> for DeadlineRetry
where
    R: Idempotent + Clone,
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        call: &mut Call<R>,
        result: &mut Result<T, DownstreamError>,
    ) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        if !R::IDEMPOTENT || !e.retryable() || self.attempts >= self.max_retries {
            return None;
        }
        let backoff = self.backoff(self.attempts);
        if Instant::now() + backoff + MIN_ATTEMPT >= call.deadline {
            return None;
        }
        self.attempts += 1;
        Some(tokio::time::sleep(backoff))
    }

    fn clone_request(&mut self, call: &Call<R>) -> Option<Call<R>> {
        R::IDEMPOTENT.then(|| call.clone())
    }
}

/// The most resources one history may bring back; past it the call fails
/// rather than growing the gateway's memory without bound.
pub const MAX_RESOURCES: usize = 100_000;

/// The gRPC call itself, to one service.
#[derive(Clone)]
pub struct GrpcCall<C> {
    client: C,
    service: &'static str,
    auth: MetadataValue<Ascii>,
}

/// What the billing service sends: its resources and the invoices' totals.
#[derive(Debug, Clone, Default)]
pub struct Billing {
    pub resources: Vec<pb::Resource>,
    pub totals: Vec<pb::Money>,
}

/// Sends the remaining time and the service token, and turns an expired
/// deadline into an error of its own (the caller's deadline).
fn prepare<R>(call: Call<R>, auth: &MetadataValue<Ascii>) -> Option<(tonic::Request<R>, Instant)> {
    let remaining = call.deadline.checked_duration_since(Instant::now())?;
    if remaining.is_zero() {
        return None;
    }
    let mut req = tonic::Request::new(call.request);
    // tonic sends this as `grpc-timeout` but does not enforce it; the
    // `timeout_at` around the call does. The service is given a little
    // less, so that a late service ends its own stream (DEADLINE_EXCEEDED)
    // just before the gateway would have to reset it: the normal case of a
    // deadline costs no RST_STREAM on the shared connection.
    req.set_timeout(remaining - (remaining / 20).min(SERVICE_GRACE));
    req.metadata_mut().insert("authorization", auth.clone());
    Some((req, call.deadline))
}

/// A generated client as the gateway calls it: one history request, the
/// whole stream collected (bounded by [`MAX_RESOURCES`]), its `last` page
/// required.
pub trait HistoryClient: Clone + Send + 'static {
    type Response: Send + 'static;

    fn fetch(
        self,
        req: tonic::Request<pb::HistoryRequest>,
    ) -> impl std::future::Future<Output = Result<Self::Response, tonic::Status>> + Send;
}

impl HistoryClient for RecordsClient<Channel> {
    type Response = Vec<pb::Resource>;

    async fn fetch(
        mut self,
        req: tonic::Request<pb::HistoryRequest>,
    ) -> Result<Vec<pb::Resource>, tonic::Status> {
        let mut stream = self.history(req).await?.into_inner();
        let mut out = Vec::new();
        let mut last = false;
        while let Some(page) = stream.message().await? {
            out.extend(page.resources);
            last |= page.last;
            if out.len() > MAX_RESOURCES {
                return Err(tonic::Status::resource_exhausted("history too long"));
            }
        }
        if !last {
            // Cut short: a shorter history must never pass for the whole one.
            return Err(tonic::Status::data_loss("the history ended early"));
        }
        Ok(out)
    }
}

impl HistoryClient for BillingClient<Channel> {
    type Response = Billing;

    async fn fetch(
        mut self,
        req: tonic::Request<pb::HistoryRequest>,
    ) -> Result<Billing, tonic::Status> {
        let mut stream = self.account(req).await?.into_inner();
        let mut out = Billing::default();
        let mut last = false;
        while let Some(page) = stream.message().await? {
            out.resources.extend(page.resources);
            out.totals.extend(page.totals);
            last |= page.last;
            if out.resources.len() > MAX_RESOURCES {
                return Err(tonic::Status::resource_exhausted("account too long"));
            }
        }
        if !last {
            // A stream that ends without its last page was cut short: its
            // totals would be wrong, not just partial.
            return Err(tonic::Status::data_loss("the account ended early"));
        }
        Ok(out)
    }
}

impl<C: HistoryClient> Service<Call<pb::HistoryRequest>> for GrpcCall<C> {
    type Response = C::Response;
    type Error = DownstreamError;
    type Future = BoxFuture<'static, Result<C::Response, DownstreamError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DownstreamError>> {
        // The channel queues internally (bounded by its buffer) and each
        // call clones the client, so readiness is checked per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<pb::HistoryRequest>) -> Self::Future {
        let client = self.client.clone();
        let service = self.service;
        let prepared = prepare(call, &self.auth);
        Box::pin(async move {
            let (req, deadline) = prepared.ok_or(DownstreamError::Deadline { service })?;
            match tokio::time::timeout_at(deadline, client.fetch(req)).await {
                Ok(r) => r.map_err(|s| DownstreamError::from_status(service, &s)),
                Err(_) => Err(DownstreamError::Deadline { service }),
            }
        })
    }
}

/// A downstream service's whole stack.
pub type Stack<C> = Retry<DeadlineRetry, Breaker<GrpcCall<C>>>;

/// How the gateway reaches one service.
#[derive(Debug, Clone)]
pub struct DownstreamConfig {
    /// `http://HOST:PORT`.
    pub url: String,
    /// Sent as `authorization: Bearer TOKEN`.
    pub token: String,
    /// The breaker's window; zero turns the breaker off.
    pub breaker_window: Duration,
    /// Retries after the first attempt (each only within the deadline).
    pub max_retries: u32,
}

/// At most this much of the remaining time is kept back from the service.
const SERVICE_GRACE: Duration = Duration::from_millis(5);

/// Time allowed to open a connection (the deadline bounds it too).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn channel(cfg: &DownstreamConfig) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(cfg.url.clone())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        // Every call past its deadline resets its stream; frames the service
        // already sent for it arrive after. HTTP/2 ignores those only for
        // the reset streams it remembers (10 by default, in hyper), and
        // counts the others as the peer's protocol errors: at 1024 it closes
        // the connection, failing every call on it. Measured: 80 of 10,000
        // calls to a hanging service failed so, in two bursts. Remember
        // enough for thousands of deadlines a second.
        .http2_max_concurrent_reset_streams(4096)
        .http2_reset_stream_duration(Duration::from_secs(2))
        // Connects on first use and again after a failure, so the gateway
        // starts before its services and finds them when they come back.
        .connect_lazy())
}

fn stack<C>(service: &'static str, client: C, cfg: &DownstreamConfig) -> anyhow::Result<Stack<C>> {
    let auth = crate::wire::bearer(&cfg.token)
        .parse()
        .map_err(|_| anyhow::anyhow!("the service token is not a valid header value"))?;
    let call = GrpcCall {
        client,
        service,
        auth,
    };
    let breaker = BreakerLayer::new(service, cfg.breaker_window).layer(call);
    Ok(RetryLayer::new(DeadlineRetry::new(
        cfg.max_retries,
        Duration::from_millis(20),
    ))
    .layer(breaker))
}

/// The records service's client stack.
pub fn records(cfg: &DownstreamConfig) -> anyhow::Result<Stack<RecordsClient<Channel>>> {
    stack("records", RecordsClient::new(channel(cfg)?), cfg)
}

/// The billing service's client stack.
pub fn billing(cfg: &DownstreamConfig) -> anyhow::Result<Stack<BillingClient<Channel>>> {
    stack("billing", BillingClient::new(channel(cfg)?), cfg)
}

/// Calls `svc` once (readiness, then the call) on a clone of the stack.
pub async fn call<S, R>(svc: &S, call: Call<R>) -> Result<S::Response, DownstreamError>
where
    S: Service<Call<R>, Error = DownstreamError> + Clone,
{
    svc.clone().oneshot(call).await
}
