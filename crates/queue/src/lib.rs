//! clinflow's imaging task queue: one trait ([`TaskQueue`]), two backends
//! (the embedded [`EmbeddedQueue`] over the store's task table with
//! leases; [`JetStreamQueue`], NATS JetStream deliveries over the same
//! table, see [`jetstream`]), exponential backoff with jitter
//! ([`Backoff`]) and a bounded worker pool ([`WorkerPool`]).
//!
//! On both backends the store's task row is the record of a task's status,
//! attempts and error; a handler sees the same [`Task`], the same retries
//! and the same dead end after `max_attempts`.
//!
//! Invariant: a lease is the only way to change a task; a worker whose
//! lease expired (it died or stalled) cannot complete or fail the task its
//! successor now holds.

pub mod jetstream;

pub use jetstream::{JetStreamConfig, JetStreamQueue};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clinflow_store::{now_millis, Store, TaskOutcome};
use futures::FutureExt;
use rand::{Rng, SeedableRng};
use tokio::sync::{watch, Notify, Semaphore};

/// A task handed to a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub series_uid: String,
    /// 1-based.
    pub attempt: u32,
    pub max_attempts: u32,
}

/// A task held under a lease; dropping it without completing leaves the
/// task to be redelivered when the lease expires.
#[derive(Debug)]
pub struct Lease {
    pub task: Task,
    /// The worker id the lease is held under.
    owner: String,
    /// The JetStream delivery, on that backend.
    msg: Option<async_nats::jetstream::Message>,
}

/// What [`TaskQueue::fail`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Due again at this time (ms since the epoch).
    Retry {
        at: i64,
    },
    Dead,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A durable queue of imaging tasks.
pub trait TaskQueue: Send + Sync + 'static {
    /// The next task, waiting at most `wait` for one.
    fn next(&self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Option<Lease>>>;
    /// Keeps the lease alive while the handler runs.
    fn heartbeat<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, anyhow::Result<()>>;
    fn complete<'a>(
        &'a self,
        lease: Lease,
        report_id: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Retried with backoff, or dead after the last attempt.
    fn fail<'a>(&'a self, lease: Lease, error: &'a str) -> BoxFuture<'a, anyhow::Result<Failed>>;
}

/// Exponential backoff: attempt `n` (1-based) waits up to
/// `min(max, base * 2^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    None,
    /// Uniform in `[0, cap]`.
    Full,
    /// `cap / 2` plus uniform in `[0, cap / 2]`.
    Equal,
}

impl Backoff {
    /// The capped exponential delay before jitter.
    pub fn cap(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max)
    }

    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let cap = self.cap(attempt).as_millis() as u64;
        let ms = match self.jitter {
            Jitter::None => cap,
            Jitter::Full => rng.random_range(0..=cap),
            Jitter::Equal => cap / 2 + rng.random_range(0..=cap - cap / 2),
        };
        Duration::from_millis(ms)
    }
}

/// The embedded backend: the store's `imaging_tasks` table with leases.
pub struct EmbeddedQueue {
    store: Store,
    worker: String,
    lease: Duration,
    poll: Duration,
    backoff: Backoff,
    /// Woken when a task is enqueued in this process, to claim early.
    wake: Option<Arc<Notify>>,
    /// A lock only around drawing a number, never across an await.
    rng: Mutex<rand::rngs::StdRng>,
}

impl EmbeddedQueue {
    /// `worker` names this process's leases (unique per process).
    pub fn new(store: Store, worker: impl Into<String>, lease: Duration, backoff: Backoff) -> Self {
        EmbeddedQueue {
            store,
            worker: worker.into(),
            lease,
            poll: Duration::from_millis(50),
            backoff,
            wake: None,
            rng: Mutex::new(rand::rngs::StdRng::from_os_rng()),
        }
    }

    /// How often `next` polls the table while waiting.
    pub fn poll_every(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    pub fn wake_on(mut self, notify: Arc<Notify>) -> Self {
        self.wake = Some(notify);
        self
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }
}

impl TaskQueue for EmbeddedQueue {
    fn next(&self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Option<Lease>>> {
        async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let claimed = self
                    .store
                    .claim_imaging_task(&self.worker, now_millis(), self.lease_ms())
                    .await?;
                if let Some(t) = claimed {
                    return Ok(Some(Lease {
                        task: Task {
                            id: t.id,
                            series_uid: t.series_uid,
                            attempt: t.attempts,
                            max_attempts: t.max_attempts,
                        },
                        owner: self.worker.clone(),
                        msg: None,
                    }));
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Ok(None);
                }
                let nap = self.poll.min(deadline - now);
                match &self.wake {
                    Some(n) => {
                        let _ = tokio::time::timeout(nap, n.notified()).await;
                    }
                    None => tokio::time::sleep(nap).await,
                }
            }
        }
        .boxed()
    }

    fn heartbeat<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            let until = now_millis() + self.lease_ms();
            if !self
                .store
                .extend_lease(&lease.task.id, &lease.owner, until)
                .await?
            {
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            Ok(())
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        lease: Lease,
        report_id: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            let done = TaskOutcome::Done {
                report_id: report_id.to_string(),
            };
            if !self
                .store
                .finish_task(&lease.task.id, &lease.owner, done, now_millis())
                .await?
            {
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            Ok(())
        }
        .boxed()
    }

    fn fail<'a>(&'a self, lease: Lease, error: &'a str) -> BoxFuture<'a, anyhow::Result<Failed>> {
        async move {
            let now = now_millis();
            let (outcome, failed) = if lease.task.attempt >= lease.task.max_attempts {
                (
                    TaskOutcome::Dead {
                        error: error.to_string(),
                    },
                    Failed::Dead,
                )
            } else {
                let delay = match self.rng.lock() {
                    Ok(mut r) => self.backoff.delay(lease.task.attempt, &mut *r),
                    Err(_) => self.backoff.cap(lease.task.attempt),
                };
                let at = now + delay.as_millis() as i64;
                (
                    TaskOutcome::Retry {
                        error: error.to_string(),
                        next_attempt_at: at,
                    },
                    Failed::Retry { at },
                )
            };
            if !self
                .store
                .finish_task(&lease.task.id, &lease.owner, outcome, now)
                .await?
            {
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            Ok(failed)
        }
        .boxed()
    }
}

/// Runs handlers over a queue with bounded concurrency.
pub struct WorkerPool;

impl WorkerPool {
    /// Runs until `shutdown` turns true, then waits for running handlers.
    /// At most `workers` handlers run at once; each gets heartbeats every
    /// `heartbeat_every`; `Ok(report)` completes, `Err` or a panic fails.
    pub async fn run<Q, H, F>(
        queue: Arc<Q>,
        workers: usize,
        handler: H,
        heartbeat_every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) where
        Q: TaskQueue + ?Sized,
        H: Fn(Task) -> F + Send + Sync + 'static,
        F: Future<Output = Result<String, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(workers.max(1)));
        let mut running = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.changed() => continue,
            };
            while running.try_join_next().is_some() {}
            let lease = tokio::select! {
                l = queue.next(Duration::from_millis(500)) => l,
                _ = shutdown.changed() => continue,
            };
            let lease = match lease {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "Claiming an imaging task failed.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (queue, handler) = (queue.clone(), handler.clone());
            running.spawn(async move {
                let _permit = permit;
                let id = lease.task.id.clone();
                let work = tokio::spawn((handler)(lease.task.clone()));
                tokio::pin!(work);
                let mut beat = tokio::time::interval(heartbeat_every);
                beat.tick().await;
                let result = loop {
                    tokio::select! {
                        r = &mut work => break r,
                        _ = beat.tick() => {
                            if let Err(error) = queue.heartbeat(&lease).await {
                                tracing::warn!(task = %id, %error, "A heartbeat failed.");
                            }
                        }
                    }
                };
                let result = match result {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => Err("the handler panicked".to_string()),
                    Err(_) => Err("the handler was cancelled".to_string()),
                };
                match result {
                    Ok(report) => {
                        if let Err(error) = queue.complete(lease, &report).await {
                            tracing::warn!(task = %id, %error, "Completing a task failed.");
                        }
                    }
                    Err(e) => match queue.fail(lease, &e).await {
                        Ok(f) => tracing::info!(task = %id, outcome = ?f, "A task failed."),
                        Err(error) => tracing::warn!(task = %id, %error, "Failing a task failed."),
                    },
                }
            });
        }
        while running.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_exponential_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: Jitter::None,
        };
        let caps: Vec<u64> = (1..=6).map(|n| b.cap(n).as_millis() as u64).collect();
        assert_eq!(caps, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.cap(200), Duration::from_secs(1));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for jitter in [Jitter::Full, Jitter::Equal] {
            let b = Backoff { jitter, ..b };
            for n in 1..=6 {
                let d = b.delay(n, &mut rng);
                assert!(d <= b.cap(n));
                if jitter == Jitter::Equal {
                    assert!(d >= b.cap(n) / 2);
                }
            }
        }
        let full = Backoff {
            jitter: Jitter::Full,
            ..b
        };
        let a: Vec<_> = (1..5)
            .map(|n| full.delay(n, &mut rand::rngs::StdRng::seed_from_u64(1)))
            .collect();
        let c: Vec<_> = (1..5)
            .map(|n| full.delay(n, &mut rand::rngs::StdRng::seed_from_u64(1)))
            .collect();
        assert_eq!(a, c);
    }
}
