//! The NATS JetStream backend: deliveries come from a durable pull consumer
//! (explicit ack, `ack_wait` as the lease, in-progress acks as heartbeats,
//! `nak` with a delay as the backoff), while the store's task table stays
//! the record of each task's status, attempts and error (`/imaging/tasks`
//! reads it, never the broker).
//!
//! A transactional outbox feeds the stream: storing an instance marks its
//! series' task unpublished in the same transaction; [`run_relay`]
//! publishes due unpublished tasks, awaits JetStream's ack, then marks them
//! published. A crash between the two publishes again under the same
//! `Nats-Msg-Id` (task id and the row's `updated_at`, which changes only
//! when the task is queued again), which the stream's duplicate window
//! drops. Each task has its own subject (`{prefix}.tasks.{id}`) and the
//! stream keeps one message per subject, so a task published again under
//! a new generation (queued again, or a republish outside the window)
//! replaces its old message instead of queueing a second one.
//!
//! The store's `mark_published` marks by id, not by generation: a task run
//! and queued again between a publish and its mark (new instances stored
//! mid-run) is marked published though its new generation never was. The
//! relay's sweep heals that: a queued, published, due task with no message
//! on its subject is published again (a spurious republish is harmless:
//! the delivery finds the row done, or running, and settles).
//!
//! Invariant: a delivery is only a hint to look at the task's row. Before
//! running it, [`JetStreamQueue`] checks the row: a done or dead task (a
//! stale or duplicate message) is acked and dropped, a task not yet due is
//! `nak`ed until it is, a task running under a live lease is `nak`ed until
//! that lease ends. So a message delivered while an older one of the same
//! task is being run (the older was replaced in the stream mid-run) does
//! not run the task twice at once. One window remains: two deliveries of
//! one task whose rows are both read before either is marked running
//! (`Store::mark_task_running` is not a compare-and-set); one message per
//! subject makes that need a replacement published in the instant between
//! a delivery and its mark.
//!
//! Attempts are counted in the store, not by the broker: the consumer's
//! `max_deliver` is unlimited, so a crash loop (a handler that kills its
//! process) cannot make the broker drop a task silently once it hits its
//! delivery limit; each delivery that runs the task counts one attempt in
//! the row, and after `max_attempts` the task is dead in the store and a
//! letter with its error goes to the dead-letter stream. Broker deliveries
//! that only bounce a not-yet-due task are not attempts, which is why the
//! attempt is the row's count plus one, not the delivery's `delivered`.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream, AckKind};
use clinflow_store::{now_millis, Store, TaskOutcome, TaskStatus};
use futures::{FutureExt, StreamExt};
use rand::SeedableRng;
use tokio::sync::Notify;

use crate::{Backoff, BoxFuture, Failed, Jitter, Lease, Task, TaskQueue};

/// Every call to the broker is bounded by this.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// How many unpublished tasks one relay pass reads.
const RELAY_BATCH: usize = 1000;

/// Names and timings of the JetStream queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// The work stream (work-queue retention, file storage).
    pub stream: String,
    /// Tasks are published to `{subject_prefix}.tasks.{task id}`, dead
    /// letters to `{subject_prefix}.dead`.
    pub subject_prefix: String,
    /// The durable pull consumer every worker shares.
    pub consumer: String,
    /// The dead-letter stream (limits retention: letters stay).
    pub dead_stream: String,
    /// The lease: a delivery neither acked nor marked in progress within
    /// it is delivered again. A property of the consumer, so every worker
    /// of one consumer uses the same.
    pub ack_wait: Duration,
    pub backoff: Backoff,
    /// Deliveries outstanding at once across all workers.
    pub max_ack_pending: i64,
    /// How long the streams remember a `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How often the relay sweeps for published tasks without a message.
    pub sweep_every: Duration,
}

impl Default for JetStreamConfig {
    /// `CLINFLOW_IMAGING` on `clinflow.imaging.*`, a 60 s lease.
    fn default() -> Self {
        JetStreamConfig::named(
            "CLINFLOW_IMAGING",
            Duration::from_secs(60),
            Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(300),
                jitter: Jitter::Full,
            },
        )
    }
}

impl JetStreamConfig {
    /// The names derived from a stream name: `CLINFLOW_IMAGING` gives the
    /// subjects `clinflow.imaging.tasks.*` and `clinflow.imaging.dead`, the
    /// consumer `imaging-workers` and the dead-letter stream
    /// `CLINFLOW_IMAGING_DEAD`.
    pub fn named(stream: &str, ack_wait: Duration, backoff: Backoff) -> JetStreamConfig {
        JetStreamConfig {
            stream: stream.to_string(),
            subject_prefix: stream.to_ascii_lowercase().replace(['_', '-'], "."),
            consumer: "imaging-workers".into(),
            dead_stream: format!("{stream}_DEAD"),
            ack_wait,
            backoff,
            max_ack_pending: 1024,
            duplicate_window: Duration::from_secs(120),
            sweep_every: Duration::from_secs(30),
        }
    }

    /// The work stream's subjects: one per task.
    pub fn task_subjects(&self) -> String {
        format!("{}.tasks.*", self.subject_prefix)
    }

    /// The subject a task is published to (task ids are subject tokens:
    /// `img-` and hex).
    fn task_subject(&self, id: &str) -> String {
        format!("{}.tasks.{id}", self.subject_prefix)
    }

    /// The subject dead letters are published to.
    pub fn dead_subject(&self) -> String {
        format!("{}.dead", self.subject_prefix)
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
/// consumer when missing; an existing stream on other subjects is an
/// error (publishing would find no stream), and an existing consumer with
/// another `ack_wait` or `max_ack_pending` is updated to this config.
async fn ensure(
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let mut work = bounded(
        &format!("creating stream {}", cfg.stream),
        js.get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![cfg.task_subjects()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: cfg.duplicate_window,
            // A new generation of a task replaces the old message.
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }),
    )
    .await?;
    let info = bounded("reading the work stream", work.info()).await?;
    if !info.config.subjects.contains(&cfg.task_subjects())
        || info.config.retention != stream::RetentionPolicy::WorkQueue
        || info.config.max_messages_per_subject != 1
    {
        anyhow::bail!(
            "stream {} exists with subjects {:?}, retention {:?} and {} messages per subject, not {} as a work queue keeping one",
            cfg.stream,
            info.config.subjects,
            info.config.retention,
            info.config.max_messages_per_subject,
            cfg.task_subjects()
        );
    }
    let mut dead = bounded(
        &format!("creating stream {}", cfg.dead_stream),
        js.get_or_create_stream(stream::Config {
            name: cfg.dead_stream.clone(),
            subjects: vec![cfg.dead_subject()],
            storage: stream::StorageType::File,
            duplicate_window: cfg.duplicate_window,
            ..Default::default()
        }),
    )
    .await?;
    let info = bounded("reading the dead-letter stream", dead.info()).await?;
    if !info.config.subjects.contains(&cfg.dead_subject()) {
        anyhow::bail!(
            "stream {} exists with subjects {:?}, not {}",
            cfg.dead_stream,
            info.config.subjects,
            cfg.dead_subject()
        );
    }
    let want = consumer::pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: cfg.ack_wait,
        // Unlimited: attempts are counted in the store (see the module).
        max_deliver: -1,
        max_ack_pending: cfg.max_ack_pending,
        ..Default::default()
    };
    let consumer: consumer::PullConsumer = bounded(
        &format!("creating consumer {}", cfg.consumer),
        work.get_or_create_consumer(&cfg.consumer, want.clone()),
    )
    .await?;
    let have = &consumer.cached_info().config;
    if have.ack_wait != cfg.ack_wait || have.max_ack_pending != cfg.max_ack_pending {
        tracing::info!(
            consumer = %cfg.consumer,
            ack_wait_ms = cfg.ack_wait.as_millis() as u64,
            "The JetStream consumer's lease changed; updating it."
        );
        return bounded(
            &format!("updating consumer {}", cfg.consumer),
            // NATS 2.9 has no update call: creating a durable consumer that
            // exists applies the fields it may change.
            work.create_consumer(want),
        )
        .await;
    }
    Ok(consumer)
}

/// The JetStream backend of [`TaskQueue`].
pub struct JetStreamQueue {
    store: Store,
    /// Names this process's leases in the store.
    worker: String,
    js: jetstream::Context,
    consumer: consumer::Consumer<consumer::pull::Config>,
    cfg: JetStreamConfig,
    /// A lock only around drawing a number, never across an await.
    rng: Mutex<rand::rngs::StdRng>,
}

/// What a delivery carries: only the task's identity; its state is read
/// from the store.
#[derive(serde::Serialize, serde::Deserialize)]
struct Delivery {
    task: String,
    series: String,
}

/// What a dead letter carries.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    task: &'a str,
    series: &'a str,
    attempts: u32,
    error: &'a str,
}

impl JetStreamQueue {
    /// Connects to `url` (`nats://HOST:PORT`) and creates the streams and
    /// the consumer when missing. `worker` names this process's leases
    /// (unique per process).
    pub async fn connect(
        url: &str,
        store: Store,
        worker: impl Into<String>,
        cfg: JetStreamConfig,
    ) -> anyhow::Result<JetStreamQueue> {
        let js = connect(url).await?;
        JetStreamQueue::new(js, store, worker, cfg).await
    }

    /// As [`JetStreamQueue::connect`] on a JetStream context already made.
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

    /// The JetStream context, for [`run_relay`].
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.cfg
    }

    fn lease_ms(&self) -> i64 {
        self.cfg.ack_wait.as_millis() as i64
    }

    /// Takes one delivery as a lease, or settles it when the task's row
    /// says it is not to be run now (see the module's invariant).
    async fn take(&self, msg: jetstream::Message) -> anyhow::Result<Option<Lease>> {
        let Ok(d) = serde_json::from_slice::<Delivery>(&msg.payload) else {
            tracing::warn!("An unreadable delivery was terminated.");
            settle(&msg, AckKind::Term).await?;
            return Ok(None);
        };
        let now = now_millis();
        let Some(t) = self.store.imaging_task(&d.task).await? else {
            tracing::warn!(task = %d.task, "A delivery of an unknown task was terminated.");
            settle(&msg, AckKind::Term).await?;
            return Ok(None);
        };
        let retry_in = |at: i64| {
            // A little past the moment, so it is due on arrival.
            Duration::from_millis((at - now).clamp(0, i64::MAX) as u64 + 20)
        };
        match t.status {
            TaskStatus::Done => {
                settle(&msg, AckKind::Ack).await?;
                return Ok(None);
            }
            TaskStatus::Dead => {
                // The worker that killed it may have died before its
                // letter was out; the letter's Msg-Id makes this a no-op
                // when it was.
                let letter = DeadLetter {
                    task: &t.id,
                    series: &t.series_uid,
                    attempts: t.attempts,
                    error: t.last_error.as_deref().unwrap_or_default(),
                };
                self.dead_letter(&letter, t.updated_at).await?;
                settle(&msg, AckKind::Term).await?;
                return Ok(None);
            }
            TaskStatus::Queued | TaskStatus::Failed if t.next_attempt_at > now => {
                settle(&msg, AckKind::Nak(Some(retry_in(t.next_attempt_at)))).await?;
                return Ok(None);
            }
            TaskStatus::Running if t.lease_until.is_some_and(|u| u >= now) => {
                let until = t.lease_until.unwrap_or(now).min(now + self.lease_ms());
                settle(&msg, AckKind::Nak(Some(retry_in(until)))).await?;
                return Ok(None);
            }
            TaskStatus::Queued | TaskStatus::Failed | TaskStatus::Running => {}
        }
        let attempt = t.attempts + 1;
        if !self
            .store
            .mark_task_running(&t.id, &self.worker, attempt, now + self.lease_ms())
            .await?
        {
            // Done or dead since we read it; the next delivery settles it.
            settle(&msg, AckKind::Nak(None)).await?;
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

    /// Publishes a dead task's letter and awaits its ack; `generation` (the
    /// row's `updated_at` as it died) makes a second letter a duplicate.
    async fn dead_letter(&self, letter: &DeadLetter<'_>, generation: i64) -> anyhow::Result<()> {
        publish(
            &self.js,
            self.cfg.dead_subject(),
            serde_json::to_vec(letter)?,
            format!("{}:dead:{generation}", letter.task),
        )
        .await
        .map(|_| ())
    }
}

/// Bounds a broker call by [`BROKER_TIMEOUT`].
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

/// Acks (or naks, terms) a delivery: acks and terms wait for the server's
/// confirmation, naks and progress are fire-and-forget (a lost one only
/// means a redelivery at `ack_wait`).
async fn settle(msg: &jetstream::Message, kind: AckKind) -> anyhow::Result<()> {
    match kind {
        AckKind::Ack | AckKind::Term => {
            bounded("acking a delivery", msg.double_ack_with(kind)).await
        }
        _ => bounded("acking a delivery", msg.ack_with(kind)).await,
    }
}

/// Publishes under a `Nats-Msg-Id` and awaits the stream's ack (bounded);
/// whether it was a duplicate.
async fn publish(
    js: &jetstream::Context,
    subject: String,
    body: Vec<u8>,
    msg_id: String,
) -> anyhow::Result<bool> {
    let ack = bounded(
        "publishing to JetStream",
        js.send_publish(
            subject,
            jetstream::message::PublishMessage::build()
                .payload(body.into())
                .message_id(msg_id),
        ),
    )
    .await?;
    let ack = bounded("JetStream's publish ack", ack.into_future()).await?;
    Ok(ack.duplicate)
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
                // One waiting pull request: the server holds it until a
                // message arrives or `expires` passes.
                let mut batch = bounded(
                    "a pull request",
                    self.consumer
                        .batch()
                        .max_messages(1)
                        .expires(left)
                        .messages(),
                )
                .await?;
                // The client gives up 5 s after `expires` if the server's
                // timeout never comes; this bounds it too.
                match tokio::time::timeout(left + BROKER_TIMEOUT, batch.next()).await {
                    Ok(Some(Ok(msg))) => {
                        if let Some(lease) = self.take(msg).await? {
                            return Ok(Some(lease));
                        }
                    }
                    Ok(Some(Err(e))) => anyhow::bail!("a JetStream pull failed: {e}"),
                    Ok(None) | Err(_) => {}
                }
            }
        }
        .boxed()
    }

    fn heartbeat<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            // The store first: its lease then ends before the broker's
            // redelivery, so the redelivery finds it expired.
            let until = now_millis() + self.lease_ms();
            if !self
                .store
                .extend_lease(&lease.task.id, &lease.owner, until)
                .await?
            {
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            if let Some(msg) = &lease.msg {
                settle(msg, AckKind::Progress).await?;
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
                // Our lease expired and the broker redelivered this very
                // message to a successor: acking it would take it from
                // them (a retry they nak would then never come back).
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            // A dirty task is queued again, unpublished: the relay sends
            // a new message; this one is done.
            if let Some(msg) = &lease.msg {
                settle(msg, AckKind::Ack).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn fail<'a>(&'a self, lease: Lease, error: &'a str) -> BoxFuture<'a, anyhow::Result<Failed>> {
        async move {
            let now = now_millis();
            let dead = lease.task.attempt >= lease.task.max_attempts;
            let (outcome, failed, delay) = if dead {
                let outcome = TaskOutcome::Dead {
                    error: error.to_string(),
                };
                (outcome, Failed::Dead, Duration::ZERO)
            } else {
                let delay = match self.rng.lock() {
                    Ok(mut r) => self.cfg.backoff.delay(lease.task.attempt, &mut *r),
                    Err(_) => self.cfg.backoff.cap(lease.task.attempt),
                };
                let at = now + delay.as_millis() as i64;
                let outcome = TaskOutcome::Retry {
                    error: error.to_string(),
                    next_attempt_at: at,
                };
                (outcome, Failed::Retry { at }, delay)
            };
            if !self
                .store
                .finish_task(&lease.task.id, &lease.owner, outcome, now)
                .await?
            {
                // As in `complete`: the successor holds this message.
                anyhow::bail!("the lease of task {} was lost", lease.task.id);
            }
            let Some(msg) = &lease.msg else {
                return Ok(failed);
            };
            if dead {
                // `finish_task` set `updated_at = now`: the generation a
                // redelivery would publish the letter under again.
                let letter = DeadLetter {
                    task: &lease.task.id,
                    series: &lease.task.series_uid,
                    attempts: lease.task.attempt,
                    error,
                };
                self.dead_letter(&letter, now).await?;
                settle(msg, AckKind::Term).await?;
            } else {
                // A lost nak is healed: the redelivery at `ack_wait` finds
                // the task not due and naks it for the rest of its delay.
                settle(msg, AckKind::Nak(Some(delay))).await?;
            }
            Ok(failed)
        }
        .boxed()
    }
}

/// The outbox relay: publishes due unpublished tasks (awaiting each ack)
/// and marks them published; wakes on `wake` (notified after each stored
/// instance and each retry) and every second, until `stop` turns true.
/// Every `cfg.sweep_every` it also runs [`sweep_once`].
pub async fn run_relay(
    store: Store,
    js: jetstream::Context,
    cfg: JetStreamConfig,
    wake: Arc<Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut swept = tokio::time::Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        if swept.elapsed() >= cfg.sweep_every {
            swept = tokio::time::Instant::now();
            match sweep_once(&store, &js, &cfg).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    tasks = n,
                    "Published imaging tasks that had lost their message."
                ),
                Err(error) => tracing::warn!(%error, "Sweeping imaging tasks failed."),
            }
        }
        // Registered before the pass, so a store notified while it runs
        // is not missed (`notify_waiters` keeps no permit).
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match relay_once(&store, &js, &cfg).await {
            Ok(n) if n >= RELAY_BATCH => continue,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "Publishing imaging tasks to JetStream failed.")
            }
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// One relay pass: publishes every due unpublished task (at most
/// [`RELAY_BATCH`] read) and marks those JetStream acked; the number
/// published.
pub async fn relay_once(
    store: &Store,
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> anyhow::Result<usize> {
    let now = now_millis();
    // The store returns every queued unpublished task; those still
    // settling are published when due.
    let due: Vec<_> = store
        .unpublished_tasks(RELAY_BATCH)
        .await?
        .into_iter()
        .filter(|t| t.next_attempt_at <= now)
        .collect();
    let mut published = Vec::with_capacity(due.len());
    let mut failure = None;
    for t in &due {
        let body = serde_json::to_vec(&Delivery {
            task: t.id.clone(),
            series: t.series_uid.clone(),
        })?;
        // `updated_at` changes whenever the task is queued again, so a new
        // run is a new message and a republish of this one a duplicate.
        let msg_id = format!("{}:{}", t.id, t.updated_at);
        match publish(js, cfg.task_subject(&t.id), body, msg_id).await {
            Ok(duplicate) => {
                if duplicate {
                    tracing::debug!(task = %t.id, "A republished task was a duplicate.");
                }
                published.push(t.id.clone());
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let n = published.len();
    if n > 0 {
        store.mark_published(published).await?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

/// One sweep: every queued task marked published and due but with no
/// message on its subject is published again (see the module); the
/// number published.
pub async fn sweep_once(
    store: &Store,
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> anyhow::Result<usize> {
    let stream = bounded("reading the work stream", js.get_stream(&cfg.stream)).await?;
    let now = now_millis();
    let mut after = None;
    let mut republished = 0;
    loop {
        let page = store
            .imaging_tasks(Some(TaskStatus::Queued), after.clone(), RELAY_BATCH)
            .await?;
        for t in page
            .iter()
            .filter(|t| t.published && t.next_attempt_at <= now)
        {
            let subject = cfg.task_subject(&t.id);
            match tokio::time::timeout(
                BROKER_TIMEOUT,
                stream.get_last_raw_message_by_subject(&subject),
            )
            .await
            {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Ok(Err(e)) => anyhow::bail!("looking up {subject}: {e}"),
                Err(_) => anyhow::bail!("looking up {subject}: timed out"),
            }
            let body = serde_json::to_vec(&Delivery {
                task: t.id.clone(),
                series: t.series_uid.clone(),
            })?;
            publish(js, subject, body, format!("{}:{}", t.id, t.updated_at)).await?;
            republished += 1;
        }
        if page.len() < RELAY_BATCH {
            return Ok(republished);
        }
        after = page.last().map(|t| t.id.clone());
    }
}
