//! The NATS JetStream backend: deliveries come from a durable pull consumer
//! (explicit ack, `ack_wait` as the lease, in-progress acks as heartbeats,
//! `nak` with a delay as the backoff), while the store's task table stays
//! the record of each task's status, attempts and error.
//!
//! A transactional outbox feeds the stream: storing an instance marks its
//! series' task unpublished in the same transaction; [`run_relay`]
//! publishes due unpublished tasks, awaits JetStream's ack, then marks them
//! published. A crash between the two publishes again under the same
//! `Nats-Msg-Id` (task id and its version), which the stream's duplicate
//! window drops.
//!
//! Attempts are counted in the store, not by the broker: the consumer's
//! `max_deliver` is unlimited, so a crash loop cannot make the broker drop
//! a task silently; after `max_attempts` the task is dead in the store and
//! its message goes to the dead-letter stream with its error.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream, AckKind};
use clinflow_store::{now_millis, Store, TaskOutcome, TaskStatus};
use futures::{FutureExt, StreamExt};
use rand::SeedableRng;
use tokio::sync::Notify;

use crate::{Backoff, BoxFuture, Failed, Lease, Task, TaskQueue};

/// Every call to the broker is bounded by this.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Names and timings of the JetStream queue.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// The work stream (work-queue retention, file storage).
    pub stream: String,
    /// Its subject; the dead letters go to `{subject}.dead`.
    pub subject: String,
    pub consumer: String,
    pub dead_stream: String,
    /// The lease: a delivery not acked (or in progress) within it is
    /// delivered again.
    pub ack_wait: Duration,
    pub backoff: Backoff,
    /// Deliveries outstanding at once across all workers.
    pub max_ack_pending: i64,
}

impl JetStreamConfig {
    /// Defaults under a name prefix (`CLINFLOW_IMAGING`).
    pub fn named(prefix: &str, ack_wait: Duration, backoff: Backoff) -> JetStreamConfig {
        let lower = prefix.to_ascii_lowercase().replace('_', "-");
        JetStreamConfig {
            stream: prefix.to_string(),
            subject: format!("{lower}.tasks"),
            consumer: format!("{prefix}_WORKERS"),
            dead_stream: format!("{prefix}_DEAD"),
            ack_wait,
            backoff,
            max_ack_pending: 1024,
        }
    }

    fn dead_subject(&self) -> String {
        format!("{}.dead", self.subject)
    }
}

/// Connects to NATS (bounded) and returns its JetStream context.
pub async fn connect(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(BROKER_TIMEOUT)
        .request_timeout(Some(BROKER_TIMEOUT))
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    Ok(jetstream::new(client))
}

/// Creates the work stream, the dead-letter stream and the durable
/// consumer when missing.
async fn ensure(
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let work = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![cfg.subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {}: {e}", cfg.stream))?;
    js.get_or_create_stream(stream::Config {
        name: cfg.dead_stream.clone(),
        subjects: vec![cfg.dead_subject()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating stream {}: {e}", cfg.dead_stream))?;
    work.get_or_create_consumer(
        &cfg.consumer,
        consumer::pull::Config {
            durable_name: Some(cfg.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.ack_wait,
            max_deliver: -1,
            max_ack_pending: cfg.max_ack_pending,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("creating consumer {}: {e}", cfg.consumer))
}

/// The JetStream backend of [`TaskQueue`].
pub struct JetStreamQueue {
    store: Store,
    worker: String,
    js: jetstream::Context,
    consumer: consumer::Consumer<consumer::pull::Config>,
    cfg: JetStreamConfig,
    rng: Mutex<rand::rngs::StdRng>,
}

/// What a delivery carries.
#[derive(serde::Serialize, serde::Deserialize)]
struct Delivery {
    task: String,
    series: String,
}

impl JetStreamQueue {
    pub async fn new(
        js: jetstream::Context,
        store: Store,
        worker: impl Into<String>,
        cfg: JetStreamConfig,
    ) -> anyhow::Result<JetStreamQueue> {
        let consumer = ensure(&js, &cfg).await?;
        Ok(JetStreamQueue {
            store,
            worker: worker.into(),
            js,
            consumer,
            cfg,
            rng: Mutex::new(rand::rngs::StdRng::from_os_rng()),
        })
    }

    fn lease_ms(&self) -> i64 {
        self.cfg.ack_wait.as_millis() as i64
    }

    /// Takes one delivery as a lease, or settles it when its task is no
    /// longer to be run.
    async fn take(&self, msg: jetstream::Message) -> anyhow::Result<Option<Lease>> {
        let Ok(d) = serde_json::from_slice::<Delivery>(&msg.payload) else {
            tracing::warn!("an unreadable delivery was terminated");
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(None);
        };
        let task = self.store.imaging_task(&d.task).await?;
        let Some(t) = task.filter(|t| {
            matches!(
                t.status,
                TaskStatus::Queued | TaskStatus::Failed | TaskStatus::Running
            )
        }) else {
            // Done, dead or gone: nothing to run.
            let _ = msg.ack().await;
            return Ok(None);
        };
        let attempt = t.attempts + 1;
        if !self
            .store
            .mark_task_running(&t.id, &self.worker, attempt, now_millis() + self.lease_ms())
            .await?
        {
            let _ = msg.ack().await;
            return Ok(None);
        }
        Ok(Some(Lease {
            task: Task {
                id: t.id,
                series_uid: t.series_uid,
                attempt,
                max_attempts: t.max_attempts,
            },
            owner: self.worker.clone(),
            msg: Some(msg),
        }))
    }
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(BROKER_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow::anyhow!("{what}: timed out")),
    }
}

impl TaskQueue for JetStreamQueue {
    fn next(&self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Option<Lease>>> {
        async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left < Duration::from_millis(10) {
                    return Ok(None);
                }
                let mut batch = self
                    .consumer
                    .fetch()
                    .max_messages(1)
                    .expires(left)
                    .messages()
                    .await
                    .map_err(|e| anyhow::anyhow!("fetching from JetStream: {e}"))?;
                let next = tokio::time::timeout(left + BROKER_TIMEOUT, batch.next()).await;
                match next {
                    Ok(Some(Ok(msg))) => {
                        if let Some(lease) = self.take(msg).await? {
                            return Ok(Some(lease));
                        }
                    }
                    Ok(Some(Err(e))) => anyhow::bail!("a JetStream delivery failed: {e}"),
                    Ok(None) | Err(_) => return Ok(None),
                }
            }
        }
        .boxed()
    }

    fn heartbeat<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            if let Some(msg) = &lease.msg {
                bounded("an in-progress ack", msg.ack_with(AckKind::Progress)).await?;
            }
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
            let ours = self
                .store
                .finish_task(&lease.task.id, &lease.owner, done, now_millis())
                .await?;
            // Whether or not a successor took the task over, this delivery
            // is settled: the successor holds its own.
            if let Some(msg) = &lease.msg {
                bounded("acking a delivery", msg.double_ack()).await?;
            }
            if !ours {
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            Ok(())
        }
        .boxed()
    }

    fn fail<'a>(&'a self, lease: Lease, error: &'a str) -> BoxFuture<'a, anyhow::Result<Failed>> {
        async move {
            let now = now_millis();
            let dead = lease.task.attempt >= lease.task.max_attempts;
            let delay = if dead {
                Duration::ZERO
            } else {
                match self.rng.lock() {
                    Ok(mut r) => self.cfg.backoff.delay(lease.task.attempt, &mut *r),
                    Err(_) => self.cfg.backoff.cap(lease.task.attempt),
                }
            };
            let (outcome, failed) = if dead {
                (
                    TaskOutcome::Dead {
                        error: error.to_string(),
                    },
                    Failed::Dead,
                )
            } else {
                let at = now + delay.as_millis() as i64;
                (
                    TaskOutcome::Retry {
                        error: error.to_string(),
                        next_attempt_at: at,
                    },
                    Failed::Retry { at },
                )
            };
            let ours = self
                .store
                .finish_task(&lease.task.id, &lease.owner, outcome, now)
                .await?;
            let Some(msg) = &lease.msg else {
                return Ok(failed);
            };
            if !ours {
                // A successor holds the task; this delivery is settled.
                let _ = bounded("acking a delivery", msg.ack()).await;
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            if dead {
                let letter = serde_json::json!({
                    "task": lease.task.id,
                    "series": lease.task.series_uid,
                    "attempts": lease.task.attempt,
                    "error": error,
                });
                let ack = bounded(
                    "publishing a dead letter",
                    self.js.send_publish(
                        self.cfg.dead_subject(),
                        jetstream::message::PublishMessage::build()
                            .payload(serde_json::to_vec(&letter)?.into())
                            .message_id(format!("{}:{}:{now}", lease.task.id, lease.task.attempt)),
                    ),
                )
                .await?;
                bounded("the dead letter's ack", ack.into_future()).await?;
                bounded("terminating a delivery", msg.ack_with(AckKind::Term)).await?;
            } else {
                bounded("a nak", msg.ack_with(AckKind::Nak(Some(delay)))).await?;
            }
            Ok(failed)
        }
        .boxed()
    }
}

/// The outbox relay: publishes due unpublished tasks (awaiting each ack)
/// and marks them published; wakes on `wake` and every second.
pub async fn run_relay(
    store: Store,
    js: jetstream::Context,
    cfg: JetStreamConfig,
    wake: Arc<Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        match relay_once(&store, &js, &cfg).await {
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "publishing imaging tasks to JetStream failed"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// One relay pass: the number of tasks published.
pub async fn relay_once(
    store: &Store,
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> anyhow::Result<usize> {
    let now = now_millis();
    let due: Vec<_> = store
        .unpublished_tasks(1000)
        .await?
        .into_iter()
        .filter(|t| t.next_attempt_at <= now)
        .collect();
    let mut acks = Vec::with_capacity(due.len());
    for t in &due {
        let body = serde_json::to_vec(&Delivery {
            task: t.id.clone(),
            series: t.series_uid.clone(),
        })?;
        let ack = bounded(
            "publishing a task",
            js.send_publish(
                cfg.subject.clone(),
                jetstream::message::PublishMessage::build()
                    .payload(body.into())
                    .message_id(format!("{}:{}", t.id, t.updated_at)),
            ),
        )
        .await?;
        acks.push((t.id.clone(), ack));
    }
    let mut published = Vec::with_capacity(acks.len());
    for (id, ack) in acks {
        bounded("a publish ack", ack.into_future()).await?;
        published.push(id);
    }
    let n = published.len();
    if n > 0 {
        store.mark_published(published).await?;
    }
    Ok(n)
}
