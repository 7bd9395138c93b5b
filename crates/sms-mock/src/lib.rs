//! A local HTTP server that behaves like Twilio's Messages REST API.
//!
//! Used by clinflow's integration tests in-process ([`MockSms::start`]) and by
//! its benchmark through the `sms-mock` binary. It implements:
//!
//! - `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form body `To`,
//!   `From` or `MessagingServiceSid`, `Body`, optional `StatusCallback`) with
//!   HTTP basic auth, Twilio's error JSON (20003, 20404, 21602, 21603, 21604,
//!   21211, 21617), a concurrency limit answered with 429 (code 20429), and
//!   scripted faults ([`MockConfig::transient`], [`MockConfig::undeliverable`]);
//! - `GET .../Messages/{MessageSid}.json` and `GET .../Messages.json` (filters
//!   `To`, `From`, `DateSent`, `DateSent>`, `DateSent<`, paging `PageSize`,
//!   `Page`);
//! - signed status callbacks (`X-Twilio-Signature`, see [`signature`]);
//! - unauthenticated inspection endpoints `GET /mock/messages` and
//!   `GET /mock/stats`.

mod form;
mod server;
mod sign;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use sign::signature;

/// How the mock behaves. Can be changed while it runs with
/// [`MockSms::set_config`]; a request uses the configuration in force when it
/// arrived, and a message's status callbacks the one in force when it was
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    /// The only account accepted (basic-auth user and the `{AccountSid}` path
    /// segment).
    pub account_sid: String,
    /// The account's auth token: basic-auth password and the key signing the
    /// status callbacks.
    pub auth_token: String,
    /// Time every API request (except a 429) spends before it is answered.
    pub latency: Duration,
    /// API requests in flight at once (from arrival until answered, latency
    /// included); one more is answered 429 at once.
    pub max_concurrent: usize,
    /// `Retry-After` header (seconds) on 429 answers; Twilio sends none.
    pub retry_after_header: Option<u64>,
    /// Time between a message's acceptance and its first status change.
    pub callback_delay: Duration,
    /// Statuses a message goes through after `queued`, in order, each one
    /// posted to its `StatusCallback` if it has one.
    pub callback_statuses: Vec<String>,
    /// `To` numbers answered with that many 503s before one is accepted.
    pub transient: HashMap<String, u32>,
    /// `To` numbers accepted whose last status is `undelivered` (error 30003)
    /// instead of the last of `callback_statuses`.
    pub undeliverable: HashSet<String>,
    /// `To` numbers whose message is accepted (stored, its statuses to
    /// come) at once but answered only after this long: with a client
    /// timeout shorter than that, the answer is lost and only a lookup can
    /// tell that the message was taken.
    pub slow_answer: HashMap<String, Duration>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            account_sid: DEFAULT_ACCOUNT_SID.to_owned(),
            auth_token: DEFAULT_AUTH_TOKEN.to_owned(),
            latency: Duration::from_millis(5),
            max_concurrent: 50,
            retry_after_header: None,
            callback_delay: Duration::from_millis(20),
            callback_statuses: vec!["sent".to_owned(), "delivered".to_owned()],
            transient: HashMap::new(),
            undeliverable: HashSet::new(),
            slow_answer: HashMap::new(),
        }
    }
}

/// [`MockConfig::default`]'s account SID ("AC" and 32 characters).
pub const DEFAULT_ACCOUNT_SID: &str = "ACtest0000000000000000000000000000";
/// [`MockConfig::default`]'s auth token.
pub const DEFAULT_AUTH_TOKEN: &str = "test-auth-token";

/// A message the mock accepted, as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    /// "SM" and 32 lowercase hex digits.
    pub sid: String,
    pub to: String,
    /// The `From` parameter; empty when only `MessagingServiceSid` was given.
    pub from: String,
    pub body: String,
    pub status_callback: Option<String>,
    /// Acceptance time, Unix milliseconds.
    pub created_ms: i64,
    /// `queued`, then each of the configured statuses in turn.
    pub status: String,
}

/// Counters since start (`GET /mock/stats` serves the same JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Messages accepted (201).
    pub accepted: u64,
    /// API requests answered 429 (concurrency limit).
    pub rejected_429: u64,
    /// API requests answered 400 (validation).
    pub rejected_400: u64,
    /// API requests answered 401 (missing or wrong credentials).
    pub rejected_401: u64,
    /// API requests answered 404 (other account, unknown message).
    pub rejected_404: u64,
    /// Scripted 503s answered ([`MockConfig::transient`]).
    pub transient_503: u64,
    /// API requests in flight right now.
    pub in_flight: u64,
    /// The most API requests ever in flight at once.
    pub max_in_flight_seen: u64,
    /// Status callbacks answered 2xx (after retries).
    pub callbacks_ok: u64,
    /// Status callbacks that failed every attempt.
    pub callbacks_failed: u64,
}

/// A running mock. Dropping it stops the server (without waiting);
/// [`MockSms::shutdown`] stops it and waits.
pub struct MockSms {
    shared: Arc<server::Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockSms {
    /// Binds `addr` (port 0 picks a free port) and serves on the current tokio
    /// runtime.
    pub async fn start(addr: SocketAddr, cfg: MockConfig) -> anyhow::Result<MockSms> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr().context("local address")?;
        let shared = Arc::new(server::Shared::new(cfg)?);
        let app = server::router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            // Small request/response pairs: don't let Nagle delay them.
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(MockSms {
            shared,
            addr: local,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, with the loopback address when bound to an
    /// unspecified one (`0.0.0.0`, `::`).
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}")
    }

    /// Accepted messages, in acceptance order.
    pub fn messages(&self) -> Vec<SentMessage> {
        self.shared.messages()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The configuration now.
    pub fn config(&self) -> MockConfig {
        (*self.shared.config()).clone()
    }

    /// Changes the configuration for requests arriving from now on. Changing
    /// [`MockConfig::transient`] restarts the count of 503s already given.
    pub fn set_config(&self, f: impl FnOnce(&mut MockConfig)) {
        self.shared.set_config(f);
    }

    /// Stops accepting connections, stops sending status callbacks, and waits
    /// (at most 5 s) for requests in progress to be answered.
    pub async fn shutdown(mut self) {
        self.shared.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("sms-mock server ended with: {e}"),
                Ok(Err(e)) => tracing::warn!("sms-mock server task: {e}"),
                Err(_) => task.abort(),
            }
        }
    }
}

impl Drop for MockSms {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl std::fmt::Debug for MockSms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockSms").field("addr", &self.addr).finish()
    }
}
