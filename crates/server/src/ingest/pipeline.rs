//! The ingest pipeline: accepted batches -> bounded queues -> the worker
//! pools of two stages, `map` and `persist`.
//!
//! ```text
//! POST /ingest/*, MLLP ──(raw input durable)──> queue (bounded; 429 when full)
//!   ──> map 1..m: raw input + trial context -> clinflow-edc (parse, map,
//!       edit checks) -> items; FHIR: references by identifier resolved
//!   ──> mapped queue (bounded; map waits when full)
//!   ──> persist 1..p: per item ids, references, one store write with
//!       audit; counts + rejections, batch done (one write)
//! ```
//!
//! Processing is idempotent, so that a batch can be run again after a crash
//! (every batch not done at startup is queued again) or posted twice:
//! clinflow-edc gives each resource a deterministic item key (its
//! `identifier`), and an item whose resources are already stored is not
//! written again. It counts as a duplicate, unless this very batch stored
//! it (`meta.source` names the batch): then it was a run cut short, and it
//! counts as stored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clinflow_edc::provenance::ITEM_KEY_SYSTEM;
use clinflow_edc::{ItemOutcome, Reason, Rejection, TrialContext};
use clinflow_fhir::{Json, Resource};
use clinflow_store::{
    AuditRecord, BatchCounts, BatchRecord, BatchRejection, BatchStatus, Expect, IngestScope,
    NewDataQuery, RetriedFate, Store, WriteOp, WriteRequest,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{context, Format};
use crate::error::ApiError;
use crate::fhir::bundle::{
    apply_identifier_refs, identifier_refs, lookup_identifier, IdentifierKey, Unresolved,
};
use crate::fhir::write::{build_op, new_id};
use crate::metrics::{IngestItemLabels, Metrics, RejectionLabels, StageMetrics};

/// A batch's items are written as few store requests of about this many
/// resources each (an item is never split, so each stays atomic): one
/// request per item made commits of a dozen small requests, and the
/// commits, not the rows, were most of the SQLite writer's time.
const RESOURCES_PER_WRITE: usize = 512;
/// Write requests of one batch waiting for their commit at once, so that
/// the next one is queued while one commits.
const WRITES_IN_FLIGHT: usize = 4;
/// Waits between attempts at a failing batch (the last entry is unused:
/// after the last attempt it is left for the next start).
const RETRY_BACKOFF: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(2),
    std::time::Duration::ZERO,
];
/// What a 429 asks the client to wait, in seconds.
const RETRY_AFTER: u64 = 1;

/// The stages' sizes (from [`crate::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct Stages {
    /// `map` workers; 0 leaves accepted batches queued.
    pub map_workers: usize,
    /// `persist` workers.
    pub persist_workers: usize,
    /// Places in the intake queue (batch ids waiting for `map`).
    pub queue: usize,
    /// Places in the mapped queue (mapped batches waiting for `persist`).
    pub mapped_queue: usize,
}

/// A stage behind the intake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Parse, map to FHIR, edit checks (clinflow-edc), and for FHIR input
    /// the references by identifier: CPU work, off the async threads.
    Map,
    /// Store the items (each in one write with its audit), count, finish
    /// the batch.
    Persist,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 2] = [Stage::Map, Stage::Persist];

    /// The stage's name, as the metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Map => "map",
            Stage::Persist => "persist",
        }
    }

    /// The stage's metrics.
    pub fn metrics(self, m: &Metrics) -> &StageMetrics {
        match self {
            Stage::Map => &m.ingest_map,
            Stage::Persist => &m.ingest_persist,
        }
    }
}

/// The intake's end of the queue (in [`crate::state::AppState`]).
#[derive(Clone)]
pub struct IngestQueue {
    tx: mpsc::Sender<String>,
    metrics: Arc<Metrics>,
    /// For one item run again outside the stages (`retry_item`).
    worker: Arc<Worker>,
    /// Woken (all waiters) each time a worker has finished with a batch, so
    /// that the MLLP listener can wait for a message's outcome.
    finished: Arc<Notify>,
}

impl IngestQueue {
    /// A place in the queue, taken before the batch is stored so that an
    /// accepted batch always finds one; 429 when the queue is full.
    pub fn reserve(&self) -> Result<Place<'_>, ApiError> {
        let permit = self.tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => ApiError::TooManyRequests(RETRY_AFTER),
            mpsc::error::TrySendError::Closed(()) => ApiError::Unavailable(RETRY_AFTER),
        })?;
        Ok(Place {
            permit,
            metrics: &self.metrics,
        })
    }

    /// Runs item `index` of done batch `id` again, from the batch's raw
    /// input against the trial as it is now, outside the stages: stored if
    /// it passes now (once: an item stored meanwhile is a duplicate), its
    /// rejections replaced, the batch's counts changed to match, `audit`
    /// (an `ingest-item-retry` record) committed with them. 404 for no
    /// such batch or rejected item, 409 while the batch is processing.
    pub async fn retry_item(
        &self,
        id: &str,
        index: u64,
        audit: AuditRecord,
    ) -> Result<RetriedItem, ApiError> {
        let w = &self.worker;
        let missing =
            || ApiError::NotFound(format!("ingest batch {id} has no rejected item {index}"));
        let batch = w
            .store
            .batch(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no ingest batch {id:?}")))?;
        if batch.status != BatchStatus::Done {
            return Err(ApiError::Conflict(format!(
                "ingest batch {id} is still processing; retry the item once it is done"
            )));
        }
        // One retry of an item at a time in this process, so that the
        // fate computed below is the one the counts record.
        let _retry = w.claims.claim(vec![format!("retry {id}.{index}")]).await;
        let before = w.store.batch_rejections(id).await?;
        if !before.iter().any(|r| r.index == index) {
            return Err(missing());
        }
        let mapped = w.map_batch(batch, Instant::now()).await?;
        let item = mapped
            .items
            .iter()
            .find(|i| i.index as u64 == index)
            .ok_or_else(missing)?;
        let source = batch_source(id);
        let create = AuditRecord {
            actor: mapped.batch.submitter.clone(),
            role: mapped.batch.role.clone(),
            action: "create".into(),
            reason: Some(format!(
                "ingest batch {id}, item {index} retried by {}",
                audit.actor
            )),
            outcome: "success".into(),
            ..AuditRecord::default()
        };
        let fate = match w
            .store_items(
                &mapped.ctx,
                std::slice::from_ref(item),
                &[false],
                &source,
                &create,
            )
            .await?
            .pop()
            .expect("one fate per item")
        {
            Fate::Stored {
                queries,
                written: true,
            } => RetriedFate::Stored {
                queries: queries as u64,
            },
            Fate::Stored { written: false, .. } | Fate::Rejected => RetriedFate::Unchanged,
            Fate::Duplicate => RetriedFate::Duplicate,
        };
        let rejections: Vec<BatchRejection> = item
            .rejections
            .iter()
            .map(|r| BatchRejection {
                index,
                reason: r.reason.to_string(),
                location: r.location.clone(),
            })
            .collect();
        let outcome = match fate {
            RetriedFate::Stored { .. } => "stored",
            RetriedFate::Duplicate => "duplicate",
            RetriedFate::Unchanged if item.is_stored() => "stored-before",
            RetriedFate::Unchanged => "rejected",
        };
        let mut audit = audit;
        audit.detail = Some(format!(
            "batch {id} ({}), item {index}: {outcome}, {} rejection(s)",
            mapped.batch.format,
            rejections.len()
        ));
        if !w
            .store
            .retry_item(id, index, fate, rejections.clone(), vec![audit])
            .await?
        {
            return Err(ApiError::Conflict(format!(
                "item {index} of ingest batch {id} was resolved meanwhile"
            )));
        }
        Ok(RetriedItem {
            outcome,
            rejections,
        })
    }

    /// Notified each time a worker has finished with a batch (done, or left
    /// after its retries). Create the `notified()` future before checking
    /// the batch's status, so that no finish between the two is missed.
    pub fn finished(&self) -> &Notify {
        &self.finished
    }
}

/// What [`IngestQueue::retry_item`] did.
#[derive(Debug)]
pub struct RetriedItem {
    /// `stored`, `duplicate`, `rejected` (still), or `stored-before` (the
    /// item was stored with some values rejected; those stay rejected).
    pub outcome: &'static str,
    /// The item's rejections now.
    pub rejections: Vec<BatchRejection>,
}

/// A reserved place in the queue; dropping it unused gives it back.
pub struct Place<'a> {
    permit: mpsc::Permit<'a, String>,
    metrics: &'a Metrics,
}

impl Place<'_> {
    /// Queues the batch.
    pub fn send(self, batch: String) {
        self.metrics.ingest_map.queue_depth.inc();
        self.permit.send(batch);
    }
}

/// A batch the `map` stage has done, on its way to `persist`.
struct Mapped {
    id: String,
    batch: BatchRecord,
    ctx: Arc<TrialContext>,
    items: Vec<ItemOutcome>,
    /// When a `map` worker took it (for `ingest_batch_duration_seconds`).
    started: Instant,
}

/// A queue's receiving end, shared by a stage's workers. The lock is
/// tokio's because a worker holds it while it waits (an await).
type Shared<T> = Arc<tokio::sync::Mutex<mpsc::Receiver<T>>>;

/// The next item of `rx`: waited for until the drain starts, then only
/// what is queued already; `None` when there is no more, or on abort.
async fn next<T>(
    rx: &Shared<T>,
    drain: &CancellationToken,
    abort: &CancellationToken,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = abort.cancelled() => None,
        _ = drain.cancelled() => rx.lock().await.try_recv().ok(),
        item = async { rx.lock().await.recv().await } => item,
    }
}

/// The running stages, stopped by [`Pipeline::stop`].
pub struct Pipeline {
    /// Stop waiting for new batches; finish what is queued.
    drain: CancellationToken,
    /// Stop taking batches at all (the drain took too long).
    abort: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Keep the queues open when a stage has no workers (a closed intake
    /// would refuse batches with 503 instead of filling up).
    _rx: (Shared<String>, Shared<Mapped>),
}

impl Pipeline {
    /// Starts the stages' workers and queues, and queues again every batch
    /// the store has not finished (`unfinished`, read before the server
    /// takes requests, so none is missed).
    ///
    /// ```text
    /// intake ─(queue)─> map 1..m ─(mapped queue)─> persist 1..p
    /// ```
    ///
    /// Each queue is bounded: a slow `persist` fills the mapped queue, the
    /// `map` workers then wait to hand on, the intake queue fills, and the
    /// ingest endpoints answer 429. `ingest_stage_*` metrics show where.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        stages: Stages,
        unfinished: Vec<String>,
    ) -> (IngestQueue, Pipeline) {
        let (tx, rx) = mpsc::channel(stages.queue.max(1));
        let (mapped_tx, mapped_rx) = mpsc::channel(stages.mapped_queue.max(1));
        let rx: Shared<String> = Arc::new(tokio::sync::Mutex::new(rx));
        let mapped_rx: Shared<Mapped> = Arc::new(tokio::sync::Mutex::new(mapped_rx));
        let (drain, abort) = (CancellationToken::new(), CancellationToken::new());
        let claims = Arc::new(Claims::default());
        let finished = Arc::new(Notify::new());
        metrics.ingest_map.workers.set(stages.map_workers as i64);
        metrics
            .ingest_persist
            .workers
            .set(stages.persist_workers as i64);
        let worker = Worker {
            store: store.clone(),
            metrics: metrics.clone(),
            claims,
            finished: finished.clone(),
        };
        let worker = Arc::new(worker);
        let mut tasks = Vec::with_capacity(stages.map_workers + stages.persist_workers + 1);
        for _ in 0..stages.map_workers {
            let (w, rx, tx) = (worker.clone(), rx.clone(), mapped_tx.clone());
            let (drain, abort) = (drain.clone(), abort.clone());
            tasks.push(tokio::spawn(async move {
                w.run_map(rx, tx, drain, abort).await
            }));
        }
        for _ in 0..stages.persist_workers {
            let (w, rx, abort) = (worker.clone(), mapped_rx.clone(), abort.clone());
            // Runs until every map worker is gone (the drain done) and the
            // mapped queue is empty: the mapped queue's senders are theirs.
            tasks.push(tokio::spawn(async move { w.run_persist(rx, abort).await }));
        }
        if !unfinished.is_empty() {
            tracing::info!(
                batches = unfinished.len(),
                "resuming ingest batches not done"
            );
            let (tx, cancel, metrics) = (tx.clone(), drain.clone(), metrics.clone());
            // Waits for places like any producer; never more than the queue.
            tasks.push(tokio::spawn(async move {
                for id in unfinished {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        r = tx.send(id) => match r {
                            Ok(()) => { metrics.ingest_map.queue_depth.inc(); }
                            Err(_) => break,
                        },
                    }
                }
            }));
        }
        (
            IngestQueue {
                tx,
                metrics,
                finished,
                worker,
            },
            Pipeline {
                drain,
                abort,
                tasks,
                _rx: (rx, mapped_rx),
            },
        )
    }

    /// Drains the stages: the workers take what is queued (nothing new
    /// comes: the server has stopped taking requests), hand it on and
    /// finish it, then stop. What is still not done `within` is left:
    /// every worker finishes the batch it is on, the rest stays
    /// `processing` in the store and is resumed at the next start.
    pub async fn stop(self, within: std::time::Duration) {
        self.drain.cancel();
        let all = futures::future::join_all(self.tasks);
        tokio::pin!(all);
        let results = tokio::select! {
            r = &mut all => r,
            _ = tokio::time::sleep(within) => {
                tracing::warn!(
                    seconds = within.as_secs_f64(),
                    "the ingest drain took too long; what is left resumes at the next start"
                );
                self.abort.cancel();
                all.await
            }
        };
        for r in results {
            if let Err(e) = r {
                tracing::error!(error = %e, "an ingest worker panicked");
            }
        }
    }
}

/// Item keys being written, so that two workers never both store one item
/// (the same message in two batches processed at once). In-process only.
#[derive(Default)]
struct Claims {
    /// A std mutex: held only to test and change the set, never across an
    /// await.
    keys: Mutex<HashSet<String>>,
    released: Notify,
}

struct Claim<'a> {
    claims: &'a Claims,
    keys: Vec<String>,
}

impl Claims {
    /// Waits until none of `keys` is claimed, then claims them all.
    async fn claim(&self, keys: Vec<String>) -> Claim<'_> {
        loop {
            // Created before the check, so a release after it wakes us.
            let released = self.released.notified();
            {
                let mut set = self.keys.lock().unwrap_or_else(|p| p.into_inner());
                if keys.iter().all(|k| !set.contains(k)) {
                    set.extend(keys.iter().cloned());
                    return Claim { claims: self, keys };
                }
            }
            released.await;
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self.claims.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            set.remove(k);
        }
        drop(set);
        self.claims.released.notify_waiters();
    }
}

/// What the workers of both stages share.
struct Worker {
    store: Store,
    metrics: Arc<Metrics>,
    claims: Arc<Claims>,
    finished: Arc<Notify>,
}

/// What became of one item.
enum Fate {
    /// `written`: by this call (else found stored by this very batch).
    Stored {
        queries: usize,
        written: bool,
    },
    Rejected,
    Duplicate,
}

/// Runs `attempt` until it succeeds, at most `RETRY_BACKOFF.len()` times,
/// waiting between attempts (an abort does not wait). A failure (the
/// database unreachable, no trial loaded) is logged with the batch id;
/// processing is idempotent, so a retry after a partial run is safe.
/// `None` when every attempt failed or the pipeline is aborting.
async fn retrying<T, F, Fut>(
    stage: Stage,
    id: &str,
    cancel: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    for (n, backoff) in RETRY_BACKOFF.iter().enumerate() {
        match attempt().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::error!(
                    batch = %id,
                    stage = stage.name(),
                    attempt = n + 1,
                    error = %format!("{e:#}"),
                    "an ingest batch failed"
                );
                if n + 1 == RETRY_BACKOFF.len() {
                    tracing::error!(
                        batch = %id,
                        "the batch stays processing; it is resumed at the next start"
                    );
                    return None;
                }
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(*backoff) => {}
                }
            }
        }
    }
    None
}

impl Worker {
    /// A `map` worker: batch ids in, mapped batches out.
    async fn run_map(
        &self,
        rx: Shared<String>,
        tx: mpsc::Sender<Mapped>,
        drain: CancellationToken,
        abort: CancellationToken,
    ) {
        let m = &self.metrics.ingest_map;
        while let Some(id) = next(&rx, &drain, &abort).await {
            m.queue_depth.dec();
            m.busy.inc();
            let started = Instant::now();
            // Not raced against the cancellation: a batch started is mapped.
            let mapped = retrying(Stage::Map, &id, &abort, || self.map(&id, started)).await;
            let handed = match mapped {
                Some(Some(mapped)) => {
                    let items = mapped.items.len() as u64;
                    // Waits while `persist` is behind: the backpressure.
                    let place = tokio::select! {
                        biased;
                        _ = abort.cancelled() => None,
                        p = tx.reserve() => p.ok(),
                    };
                    match place {
                        Some(place) => {
                            m.items.inc_by(items);
                            self.metrics.ingest_persist.queue_depth.inc();
                            place.send(mapped);
                            true
                        }
                        // Stopping: the batch stays processing in the store.
                        None => false,
                    }
                }
                // Done already, or given up after its retries.
                Some(None) | None => false,
            };
            m.busy.dec();
            m.seconds.observe(started.elapsed().as_secs_f64());
            if !handed {
                self.finished.notify_waiters();
            }
        }
        tracing::debug!("ingest map worker stopped");
    }

    /// A `persist` worker: mapped batches in, done batches out.
    async fn run_persist(&self, rx: Shared<Mapped>, abort: CancellationToken) {
        let m = &self.metrics.ingest_persist;
        // No drain token: this ends when the queue is closed and empty.
        let never = CancellationToken::new();
        while let Some(mapped) = next(&rx, &never, &abort).await {
            m.queue_depth.dec();
            m.busy.inc();
            let started = Instant::now();
            // Not raced against the cancellation: a batch started is finished.
            let done = retrying(Stage::Persist, &mapped.id, &abort, || self.persist(&mapped)).await;
            m.busy.dec();
            m.seconds.observe(started.elapsed().as_secs_f64());
            if done.is_some() {
                m.items.inc_by(mapped.items.len() as u64);
                self.metrics
                    .ingest_batch_seconds
                    .observe(mapped.started.elapsed().as_secs_f64());
            }
            self.finished.notify_waiters();
        }
        tracing::debug!("ingest persist worker stopped");
    }

    /// The `map` stage of one batch: its raw input through clinflow-edc;
    /// `None` when the batch is done already.
    async fn map(&self, id: &str, started: Instant) -> anyhow::Result<Option<Mapped>> {
        let Some(batch) = self.store.batch(id).await? else {
            anyhow::bail!("no such batch");
        };
        if batch.status == BatchStatus::Done {
            return Ok(None);
        }
        self.map_batch(batch, started).await.map(Some)
    }

    /// Runs a batch's raw input through clinflow-edc, whatever its status.
    async fn map_batch(&self, batch: BatchRecord, started: Instant) -> anyhow::Result<Mapped> {
        let id = batch.id.as_str();
        let format = Format::from_code(&batch.format)
            .ok_or_else(|| anyhow::anyhow!("unknown batch format {:?}", batch.format))?;
        let raw = self
            .store
            .batch_input(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the batch has no raw input"))?;
        let ctx = context::load(&self.store)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no trial is loaded"))?;
        let ctx = Arc::new(ctx);
        // Parsing and mapping are CPU work: off the async threads.
        let mut items = {
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || format.ingest(&ctx, &raw)).await?
        };
        if format.is_fhir() {
            resolve_identifiers(&self.store, &mut items).await?;
        }
        apply_scope(&self.store, &batch.scope, &mut items).await?;
        Ok(Mapped {
            id: id.to_string(),
            batch,
            ctx,
            items,
            started,
        })
    }

    /// The `persist` stage of one batch: each item stored once, the counts
    /// and rejections, the batch done (one write).
    async fn persist(&self, mapped: &Mapped) -> anyhow::Result<()> {
        let Mapped {
            id,
            batch,
            ctx,
            items,
            ..
        } = mapped;
        let (id, ctx) = (id.as_str(), ctx.as_ref());
        let source = batch_source(id);
        let audit = AuditRecord {
            actor: batch.submitter.clone(),
            role: batch.role.clone(),
            action: "create".into(),
            reason: Some(format!("ingest batch {id}")),
            outcome: "success".into(),
            ..AuditRecord::default()
        };
        // An item repeated inside the batch is a duplicate of its first
        // occurrence.
        let mut seen = HashSet::new();
        let repeated: Vec<bool> = items
            .iter()
            .map(|item| {
                item.stored
                    .first()
                    .is_some_and(|first| !seen.insert(first.full_url.as_str()))
            })
            .collect();
        let fates = self
            .store_items(ctx, items, &repeated, &source, &audit)
            .await?;

        let mut counts = BatchCounts {
            received: items.len() as u64,
            ..BatchCounts::default()
        };
        let mut rejections = Vec::new();
        for (item, fate) in items.iter().zip(&fates) {
            match fate {
                Fate::Duplicate => {
                    counts.duplicates += 1;
                    continue;
                }
                Fate::Rejected => counts.rejected += 1,
                Fate::Stored { queries, .. } => {
                    counts.stored += 1;
                    counts.queries_opened += *queries as u64;
                }
            }
            rejections.extend(item.rejections.iter().map(|r| BatchRejection {
                index: r.index as u64,
                reason: r.reason.to_string(),
                location: r.location.clone(),
            }));
        }
        let finished = self.store.finish_batch(id, counts, rejections).await?;
        // Counted once per batch, by the run that finished it.
        if finished {
            for (item, fate) in items.iter().zip(&fates) {
                let fate = match fate {
                    Fate::Stored { .. } => "stored",
                    Fate::Rejected => "rejected",
                    Fate::Duplicate => "duplicate",
                };
                self.metrics
                    .ingest_items
                    .get_or_create(&IngestItemLabels {
                        format: batch.format.clone(),
                        fate: fate.to_string(),
                    })
                    .inc();
                if fate != "duplicate" {
                    for r in &item.rejections {
                        self.metrics
                            .ingest_rejections
                            .get_or_create(&RejectionLabels {
                                reason: r.reason.code().to_string(),
                            })
                            .inc();
                    }
                }
            }
        }
        tracing::info!(
            batch = %id,
            format = batch.format,
            received = counts.received,
            stored = counts.stored,
            rejected = counts.rejected,
            duplicates = counts.duplicates,
            "ingest batch done"
        );
        Ok(())
    }

    /// Stores each item's resources, unless they are stored already: the
    /// items are claimed and looked up together (one store call), and the
    /// new ones written as requests of about [`RESOURCES_PER_WRITE`]
    /// resources, each item whole in one request. `repeated[i]`: item `i`
    /// repeats an earlier one of its batch (a duplicate without a look).
    async fn store_items(
        &self,
        ctx: &TrialContext,
        items: &[ItemOutcome],
        repeated: &[bool],
        source: &str,
        audit: &AuditRecord,
    ) -> anyhow::Result<Vec<Fate>> {
        let mut fates: Vec<Option<Fate>> = items
            .iter()
            .zip(repeated)
            .map(|(item, repeated)| {
                if !item.is_stored() {
                    Some(Fate::Rejected)
                } else if *repeated {
                    Some(Fate::Duplicate)
                } else {
                    None
                }
            })
            .collect();
        let todo: Vec<&ItemOutcome> = items
            .iter()
            .zip(&fates)
            .filter(|(_, f)| f.is_none())
            .map(|(item, _)| item)
            .collect();
        let keys = todo
            .iter()
            .flat_map(|item| item.stored.iter().map(|p| p.full_url.clone()))
            .collect();
        let _claim = self.claims.claim(keys).await;
        // Any resource of each item already stored (one round trip for all).
        let lookups = todo
            .iter()
            .map(|item| {
                item.stored
                    .iter()
                    .map(|p| (p.resource.resource_type().to_string(), p.full_url.clone()))
                    .collect()
            })
            .collect();
        let found = self
            .store
            .find_first_by_identifier_each(ITEM_KEY_SYSTEM, lookups)
            .await?;

        let now = clinflow_store::now_millis();
        let mut found = found.into_iter();
        let mut request = WriteRequest::default();
        let mut requests = Vec::new();
        for (item, fate) in items.iter().zip(fates.iter_mut()) {
            if fate.is_some() {
                continue;
            }
            if let Some((i, existing)) = found.next().flatten() {
                *fate = Some(self.stored_before(item, i, &existing, source).await?);
                continue;
            }
            let ops = item_ops(item, source, now);
            let queries = item_queries(ctx, item, &ops, &audit.actor, now);
            // What the batch status counts is what is stored.
            *fate = Some(Fate::Stored {
                queries: queries.len(),
                written: true,
            });
            request.audit.extend(ops.iter().map(|op| AuditRecord {
                time: now,
                resource_type: Some(op.resource_type.clone()),
                resource_id: Some(op.id.clone()),
                version: Some(op.new_version),
                ..audit.clone()
            }));
            request.queries.extend(queries);
            request.ops.extend(ops);
            if request.ops.len() >= RESOURCES_PER_WRITE {
                requests.push(std::mem::take(&mut request));
            }
        }
        if !request.ops.is_empty() {
            requests.push(request);
        }
        futures::stream::iter(requests)
            .map(|r| self.write(r))
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        Ok(fates
            .into_iter()
            .map(|f| f.expect("every item has a fate"))
            .collect())
    }

    /// One store write of items' resources.
    async fn write(&self, request: WriteRequest) -> anyhow::Result<()> {
        let n = request.ops.len() as u64;
        self.store.write(request).await?;
        self.metrics.resources_written.inc_by(n);
        Ok(())
    }

    /// The fate of an item whose resource `index` is stored as `existing`:
    /// stored, if by this very batch (a run cut short), else a duplicate.
    async fn stored_before(
        &self,
        item: &ItemOutcome,
        index: usize,
        existing: &str,
        source: &str,
    ) -> anyhow::Result<Fate> {
        let p = &item.stored[index];
        let ours = self
            .store
            .read_current(p.resource.resource_type(), existing)
            .await?
            .and_then(|r| r.body)
            .and_then(|b| Json::parse(&b).ok())
            .is_some_and(|j| {
                j.get("meta")
                    .and_then(|m| m.get("source"))
                    .and_then(Json::as_str)
                    == Some(source)
            });
        Ok(if ours {
            Fate::Stored {
                queries: item.queries.len(),
                written: false,
            }
        } else {
            Fate::Duplicate
        })
    }
}

/// Resolves the references by identifier of FHIR items as a transaction
/// does ([`crate::fhir::bundle::lookup_identifier`]); an item with one that
/// names no resource, or several, is rejected whole.
async fn resolve_identifiers(store: &Store, items: &mut [ItemOutcome]) -> anyhow::Result<()> {
    let mut resolved: HashMap<IdentifierKey, String> = HashMap::new();
    for item in items.iter_mut() {
        let mut failure = None;
        'item: for p in item.stored.iter_mut() {
            for key in identifier_refs(p.resource.json_mut()) {
                if resolved.contains_key(&key) {
                    continue;
                }
                match lookup_identifier(store, &key).await? {
                    Ok(id) => {
                        resolved.insert(key, id);
                    }
                    Err(
                        Unresolved::NotAType(why)
                        | Unresolved::NotFound(why)
                        | Unresolved::Ambiguous(why),
                    ) => {
                        failure = Some(why);
                        break 'item;
                    }
                }
            }
            apply_identifier_refs(p.resource.json_mut(), &resolved);
        }
        if let Some(why) = failure {
            item.stored.clear();
            item.queries.clear();
            item.rejections.push(Rejection {
                index: item.index,
                reason: Reason::UnresolvedReference(why),
                location: item.location.clone(),
            });
        }
    }
    Ok(())
}

/// Rejects, whole, every item with a resource outside the batch's scope:
/// for a site user's batch, a patient not enrolled at its site; for a
/// patient's, anyone else. A resource in no patient's compartment is
/// outside every scope but [`IngestScope::All`].
async fn apply_scope(
    store: &Store,
    scope: &IngestScope,
    items: &mut [ItemOutcome],
) -> anyhow::Result<()> {
    if *scope == IngestScope::All {
        return Ok(());
    }
    let mut sites: HashMap<String, Option<String>> = HashMap::new();
    for item in items.iter_mut() {
        let mut why = None;
        for p in &item.stored {
            let rtype = p.resource.resource_type();
            let Some(patient) = clinflow_fhir::index::extract(&p.resource).patient else {
                why = Some(format!(
                    "a {rtype} in no patient's record is outside the submitter's reach"
                ));
                break;
            };
            match scope {
                IngestScope::All => {}
                IngestScope::Patient(me) if *me == patient => {}
                IngestScope::Patient(_) => {
                    why = Some(format!("Patient/{patient} is not the submitting patient"));
                    break;
                }
                IngestScope::Site(site) => {
                    let at = match sites.get(&patient) {
                        Some(at) => at.clone(),
                        None => {
                            let at = store.patient_site(&patient).await?;
                            sites.insert(patient.clone(), at.clone());
                            at
                        }
                    };
                    if at.as_deref() != Some(site.as_str()) {
                        why = Some(format!(
                            "Patient/{patient} is not enrolled at site {site}, the submitter's"
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(why) = why {
            item.stored.clear();
            item.queries.clear();
            item.rejections.push(Rejection {
                index: item.index,
                reason: Reason::OutOfScope(why),
                location: item.location.clone(),
            });
        }
    }
    Ok(())
}

/// The item's data queries, about its resources as `ops` writes them
/// (the server-assigned ids), so that they commit with the values.
fn item_queries(
    ctx: &TrialContext,
    item: &ItemOutcome,
    ops: &[WriteOp],
    opened_by: &str,
    now: i64,
) -> Vec<NewDataQuery> {
    item.queries
        .iter()
        .filter_map(|q| {
            // clinflow-edc opens queries only for enrolled subjects and
            // stored resources; one that is not is dropped, not guessed at.
            let op = ops.get(q.resource)?;
            let patient = ctx.enrolment(&q.subject)?.patient_id.clone();
            Some(NewDataQuery {
                id: new_id(),
                trial: ctx.protocol().id.as_str().to_string(),
                site: q.site.as_str().to_string(),
                patient,
                resource_type: op.resource_type.clone(),
                resource_id: op.id.clone(),
                measurement: q.measurement.clone(),
                value: q.value.clone(),
                unit: q.unit.clone(),
                soft_low: q.soft.low(),
                soft_high: q.soft.high(),
                location: q.location.clone(),
                text: q.text.clone(),
                opened_at: now,
                opened_by: opened_by.to_string(),
            })
        })
        .collect()
}

/// `meta.source` of what a batch stores.
fn batch_source(batch: &str) -> String {
    format!("urn:clinflow:ingest-batch:{batch}")
}

/// The item's resources as writes: server ids (UUIDv7), the item's
/// references to their fullUrls (item keys) rewritten to them, `meta.source` naming the batch.
fn item_ops(item: &ItemOutcome, source: &str, now: i64) -> Vec<WriteOp> {
    let ids: Vec<(String, String)> = item
        .stored
        .iter()
        .map(|p| (p.full_url.clone(), new_id()))
        .collect();
    let refs: Vec<(&str, String)> = item
        .stored
        .iter()
        .zip(&ids)
        .map(|(p, (url, id))| (url.as_str(), format!("{}/{id}", p.resource.resource_type())))
        .collect();
    item.stored
        .iter()
        .zip(&ids)
        .map(|(p, (_, id))| {
            let mut res: Resource = p.resource.clone();
            rewrite_references(res.json_mut(), &refs);
            set_source(res.json_mut(), source);
            build_op(res, id, Expect::Absent, now)
        })
        .collect()
}

/// Replaces every `reference` that is one of the item's fullUrls.
fn rewrite_references(json: &mut Json, refs: &[(&str, String)]) {
    match json {
        Json::Object(members) => {
            for (k, v) in members.iter_mut() {
                match v {
                    Json::String(s) if k == "reference" => {
                        if let Some((_, to)) = refs.iter().find(|(from, _)| *from == s.as_str()) {
                            *s = to.clone();
                        }
                    }
                    other => rewrite_references(other, refs),
                }
            }
        }
        Json::Array(items) => {
            for v in items {
                rewrite_references(v, refs);
            }
        }
        _ => {}
    }
}

/// Sets `meta.source`, creating `meta` after `resourceType` when absent
/// (the store adds `versionId` and `lastUpdated` to it).
fn set_source(json: &mut Json, source: &str) {
    let Json::Object(members) = json else { return };
    let value = Json::String(source.to_string());
    match members.iter_mut().find(|(k, _)| k == "meta") {
        Some((_, Json::Object(meta))) => {
            meta.retain(|(k, _)| k != "source");
            meta.push(("source".to_string(), value));
        }
        Some(_) => {}
        None => {
            let at = members
                .iter()
                .position(|(k, _)| k == "resourceType")
                .map_or(0, |i| i + 1);
            members.insert(
                at,
                (
                    "meta".to_string(),
                    Json::Object(vec![("source".to_string(), value)]),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_to_the_item_are_rewritten_and_others_kept() {
        let mut j = Json::parse(
            r#"{"resourceType":"DiagnosticReport","result":[{"reference":"urn:uuid:a"},{"reference":"Observation/x"}],"subject":{"reference":"Patient/p"}}"#,
        )
        .unwrap();
        rewrite_references(&mut j, &[("urn:uuid:a", "Observation/1".to_string())]);
        set_source(&mut j, "urn:clinflow:ingest-batch:b");
        assert_eq!(
            j.to_compact(),
            r#"{"resourceType":"DiagnosticReport","meta":{"source":"urn:clinflow:ingest-batch:b"},"result":[{"reference":"Observation/1"},{"reference":"Observation/x"}],"subject":{"reference":"Patient/p"}}"#
        );
    }

    #[tokio::test]
    async fn a_claimed_key_waits_for_its_release() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim(vec!["k".into()]).await;
        let c2 = claims.clone();
        let waiter = tokio::spawn(async move {
            let _second = c2.claim(vec!["k".into(), "j".into()]).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the second claim is granted after the release")
            .unwrap();
    }
}
