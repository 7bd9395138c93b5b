//! Adaptive client-side throttling (Google SRE book, "Handling Overload"):
//! a circuit breaker without states to tune. Over a sliding window the
//! client counts the requests it made and those the service accepted, and
//! rejects a new request locally with probability
//!
//! ```text
//! p = max(0, (requests - K * accepts) / (requests + 1))
//! ```
//!
//! While the service answers, `accepts ~ requests` and `p = 0`. When it is
//! down, `accepts` falls to 0 and `p` climbs towards 1: calls fail fast
//! instead of each waiting for a connection error or the deadline. The
//! requests it still lets through (about one per window-second, whatever the
//! rate) are the probes that find the service back; each accepted one
//! lowers `p`, so traffic returns within a few windows. Rejected requests
//! count as requests, as in the book, so a client cannot talk itself back
//! in by retrying.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::client::{Call, DownstreamError};

/// `K`: how many requests per accepted one are let through before
/// throttling starts (2 in the book: tolerates a service failing half its
/// requests without the client adding to the load).
pub const K: f64 = 2.0;
/// Below this many requests in the window nothing is rejected: one failure
/// after a quiet minute should not halve the traffic.
pub const MIN_REQUESTS: u64 = 5;
const BUCKETS: usize = 10;
/// A call whose whole budget was shorter than this and ran out is not held
/// against the service.
pub const MIN_JUDGED_BUDGET: Duration = Duration::from_millis(100);

/// The window's counts, in [`BUCKETS`] slices of `window / BUCKETS`.
#[derive(Debug)]
pub struct Window {
    slice: Duration,
    /// Slices are numbered from here (the window's creation; `now` is
    /// monotonic).
    origin: Instant,
    /// `(slice start, requests, accepts)`, oldest first in ring order.
    buckets: [(Option<Instant>, u64, u64); BUCKETS],
}

impl Window {
    pub fn new(window: Duration) -> Window {
        Window {
            slice: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            origin: Instant::now(),
            buckets: [(None, 0, 0); BUCKETS],
        }
    }

    fn bucket(&mut self, now: Instant) -> &mut (Option<Instant>, u64, u64) {
        let slice_ms = self.slice.as_millis().max(1);
        let n = now.saturating_duration_since(self.origin).as_millis() / slice_ms;
        let start = self.origin + Duration::from_millis((n * slice_ms) as u64);
        let b = &mut self.buckets[(n % BUCKETS as u128) as usize];
        if b.0 != Some(start) {
            *b = (Some(start), 0, 0);
        }
        b
    }

    /// `(requests, accepts)` over the window ending at `now`.
    pub fn counts(&self, now: Instant) -> (u64, u64) {
        let horizon = self.slice * BUCKETS as u32;
        self.buckets
            .iter()
            .filter(|(start, ..)| start.is_some_and(|s| now.saturating_duration_since(s) < horizon))
            .fold((0, 0), |(r, a), (_, br, ba)| (r + br, a + ba))
    }

    /// The probability of rejecting the next request.
    pub fn reject_probability(&self, now: Instant) -> f64 {
        let (requests, accepts) = self.counts(now);
        if requests < MIN_REQUESTS {
            return 0.0;
        }
        ((requests as f64 - K * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
    }

    pub fn record_request(&mut self, now: Instant) {
        self.bucket(now).1 += 1;
    }

    pub fn record_accept(&mut self, now: Instant) {
        self.bucket(now).2 += 1;
    }
}

/// [`Layer`] of [`Breaker`]; `window` zero turns throttling off.
#[derive(Clone)]
pub struct BreakerLayer {
    service: &'static str,
    window: Duration,
}

impl BreakerLayer {
    pub fn new(service: &'static str, window: Duration) -> BreakerLayer {
        BreakerLayer { service, window }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            service: self.service,
            // A std mutex: held for a few additions, never across an await.
            window: (!self.window.is_zero())
                .then(|| Arc::new(Mutex::new(Window::new(self.window)))),
        }
    }
}

/// Rejects calls locally (`DownstreamError::BreakerOpen`) while the service
/// has not been accepting them. Clones share one window.
#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    service: &'static str,
    window: Option<Arc<Mutex<Window>>>,
}

impl<S, R, T> Service<Call<R>> for Breaker<S>
where
    S: Service<Call<R>, Response = T, Error = DownstreamError> + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
    T: Send + 'static,
{
    type Response = T;
    type Error = DownstreamError;
    type Future = BoxFuture<'static, Result<T, DownstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DownstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        let Some(window) = self.window.clone() else {
            return Box::pin(self.inner.call(call));
        };
        let now = Instant::now();
        let budget = call.deadline.saturating_duration_since(now);
        let reject = {
            let w = window.lock().unwrap_or_else(|e| e.into_inner());
            let p = w.reject_probability(now);
            p > 0.0 && rand::random::<f64>() < p
        };
        if reject {
            // A local rejection counts as a request (the book's rule: a
            // client cannot talk itself back in by insisting).
            window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record_request(now);
            let service = self.service;
            return Box::pin(async move { Err(DownstreamError::BreakerOpen { service }) });
        }
        let fut = self.inner.call(call);
        Box::pin(async move {
            // Counted once the call ends: a call dropped before (its caller
            // went away, or a sibling call failed first) says nothing of
            // the service and counts neither way.
            let r = fut.await;
            let judged = match &r {
                // A deadline too short to answer in judges the caller, not
                // the service: a client sending `X-Request-Timeout: 1` must
                // not open the breaker for everyone.
                Err(DownstreamError::Deadline { .. }) => budget >= MIN_JUDGED_BUDGET,
                _ => true,
            };
            if judged {
                let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                w.record_request(now);
                if r.as_ref()
                    .err()
                    .is_none_or(DownstreamError::service_accepted)
                {
                    w.record_accept(now);
                }
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_healthy_service_is_never_throttled() {
        let mut w = Window::new(Duration::from_secs(10));
        for _ in 0..1000 {
            let now = Instant::now();
            w.record_request(now);
            w.record_accept(now);
            tokio::time::advance(Duration::from_millis(7)).await;
        }
        assert_eq!(w.reject_probability(Instant::now()), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_raise_the_rejection_towards_one_then_age_out() {
        let mut w = Window::new(Duration::from_secs(10));
        let now = Instant::now();
        for _ in 0..(MIN_REQUESTS - 1) {
            w.record_request(now);
        }
        assert_eq!(w.reject_probability(now), 0.0, "too few requests to judge");
        for _ in 0..95 {
            w.record_request(now);
        }
        let (requests, accepts) = w.counts(now);
        assert_eq!((requests, accepts), (MIN_REQUESTS - 1 + 95, 0));
        let p = w.reject_probability(now);
        assert!(
            (p - requests as f64 / (requests as f64 + 1.0)).abs() < 1e-9,
            "{p}"
        );
        // Half the requests accepted: K = 2 tolerates it.
        for _ in 0..50 {
            w.record_accept(now);
        }
        assert_eq!(w.reject_probability(now), 0.0);
        // The window slides: after it, nothing is remembered.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(w.counts(Instant::now()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn old_slices_leave_the_window_one_by_one() {
        let mut w = Window::new(Duration::from_secs(10));
        for _ in 0..10 {
            w.record_request(Instant::now());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // The oldest slice (1 s wide) is 10 s old now: out.
        let (requests, _) = w.counts(Instant::now());
        assert!((9..=10).contains(&requests), "{requests}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let (requests, _) = w.counts(Instant::now());
        assert!((4..=5).contains(&requests), "{requests}");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_calls_and_hopeless_deadlines_count_neither_way() {
        use tower::ServiceExt;
        let never = tower::service_fn(|_: Call<()>| {
            futures::future::pending::<Result<(), DownstreamError>>()
        });
        let mut b = BreakerLayer::new("records", Duration::from_secs(10)).layer(never);
        let window = b.window.clone().unwrap();
        let call = Call {
            request: (),
            deadline: Instant::now() + Duration::from_secs(1),
        };
        let fut = b.ready().await.unwrap().call(call);
        drop(fut);
        assert_eq!(window.lock().unwrap().counts(Instant::now()), (0, 0));

        let late = tower::service_fn(|_: Call<()>| async {
            Err::<(), _>(DownstreamError::Deadline { service: "records" })
        });
        let mut b = BreakerLayer::new("records", Duration::from_secs(10)).layer(late);
        let window = b.window.clone().unwrap();
        let short = Call {
            request: (),
            deadline: Instant::now() + Duration::from_millis(1),
        };
        let _ = b.ready().await.unwrap().call(short).await;
        assert_eq!(
            window.lock().unwrap().counts(Instant::now()),
            (0, 0),
            "a 1 ms budget judges no one"
        );
        let fair = Call {
            request: (),
            deadline: Instant::now() + MIN_JUDGED_BUDGET,
        };
        let _ = b.ready().await.unwrap().call(fair).await;
        assert_eq!(
            window.lock().unwrap().counts(Instant::now()),
            (1, 0),
            "a fair budget missed is a failure"
        );
    }
}
