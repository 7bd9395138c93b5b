//! The delivery workers: per channel, claim due rows from the database,
//! send each once under the channel's concurrency and rate limits, and
//! write the outcome; resolve rows a stopped process left `sending`.
//!
//! A row's life in one process: claimed (`sending`, committed) -> one send
//! call (bounded by the send timeout) -> its outcome queued to the
//! recorder, which writes every queued outcome in one store call. The
//! claim is taken only when a concurrency slot and a rate-limit cell are
//! both free, so a claimed row is being sent, not waiting: what a crash
//! leaves `sending` is at most the sends in flight.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clinflow_store::{
    now_millis, Channel, DeliveryOutcome, DeliveryRecord, DeliveryUpdate, Store, OUTCOME_UNKNOWN,
};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::senders::{EmailSender, SendError, SmsSender};
use super::Links;

/// One channel's limits.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    /// Sends in flight at most.
    pub concurrency: usize,
    /// Sends started per second at most.
    pub rate: u32,
    /// One send's deadline.
    pub send_timeout: Duration,
}

/// Retry policy, shared by the channels.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Sends of one row at most (the first included).
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

/// The channel's sends in flight, adapted to the provider (AIMD): a 429
/// halves the number allowed (at most once a second), and each run of as
/// many successes as are allowed adds one back, up to the configured
/// concurrency. The semaphore's permits follow the allowance: cuts are
/// permits taken and forgotten, growth is permits added.
pub struct Pacer {
    slots: Arc<Semaphore>,
    ceiling: usize,
    state: std::sync::Mutex<PacerState>,
}

struct PacerState {
    allowed: usize,
    successes: usize,
    last_cut: Option<tokio::time::Instant>,
}

impl Pacer {
    fn new(ceiling: usize) -> Pacer {
        let ceiling = ceiling.max(1);
        Pacer {
            slots: Arc::new(Semaphore::new(ceiling)),
            ceiling,
            state: std::sync::Mutex::new(PacerState {
                allowed: ceiling,
                successes: 0,
                last_cut: None,
            }),
        }
    }

    /// Sends allowed in flight now (the stop no longer reads it: it counts
    /// the sends themselves).
    #[cfg(test)]
    fn allowed(&self) -> usize {
        self.lock().allowed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PacerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn throttled(&self) {
        let mut s = self.lock();
        if s.last_cut
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let target = (s.allowed / 2).max(1);
        let cut = s.allowed - target;
        s.allowed = target;
        s.successes = 0;
        s.last_cut = Some(tokio::time::Instant::now());
        drop(s);
        if cut > 0 {
            // The permits come back from the sends in flight; these are
            // kept (the semaphore is fair: queued before later claims).
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(cut as u32).await {
                    p.forget();
                }
            });
        }
    }

    fn succeeded(&self) {
        let mut s = self.lock();
        if s.allowed >= self.ceiling {
            return;
        }
        s.successes += 1;
        if s.successes >= s.allowed {
            s.successes = 0;
            s.allowed += 1;
            self.slots.add_permits(1);
        }
    }
}

/// What a channel's worker sends with.
pub enum Provider {
    Email(EmailSender),
    Sms(SmsSender),
}

impl Provider {
    fn channel(&self) -> Channel {
        match self {
            Provider::Email(_) => Channel::Email,
            Provider::Sms(_) => Channel::Sms,
        }
    }
}

/// A channel's worker, shared by its send tasks.
pub struct Worker {
    pub provider: Provider,
    pub limits: ChannelLimits,
    pub retry: RetryPolicy,
    pub store: Store,
    pub links: Links,
    /// Woken when a campaign is created here (no wait for the next poll).
    pub wake: Arc<Notify>,
    /// How long an idle worker waits before looking for due rows again.
    pub poll: Duration,
}

impl Worker {
    /// A claim's lease: past it, the row's sender is presumed gone. Three
    /// send timeouts and a second: a live sender's send (its timeout and the
    /// one-second backstop) and an SMS lookup after it (bounded by the
    /// timeout too) are over, and their outcome written, well before.
    fn lease_ms(&self) -> i64 {
        (self.limits.send_timeout.as_millis() as i64) * 3 + 1000
    }
}

/// One claim or send in flight, counted in `busy` until dropped (so a
/// panicking task is not waited for forever).
struct Busy(Arc<watch::Sender<usize>>);

impl Busy {
    fn start(busy: &Arc<watch::Sender<usize>>) -> Busy {
        busy.send_modify(|n| *n += 1);
        Busy(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Claims of one channel's worker in flight at once.
const CLAIMS_AT_ONCE: usize = 2;
/// What the last claim found: rows, none (wait for the poll or a wake-up),
/// or an error (wait a second).
const CLAIM_OK: u8 = 0;
const CLAIM_EMPTY: u8 = 1;
const CLAIM_FAILED: u8 = 2;

/// Runs a channel's worker until `stop`; then lets the sends in flight
/// finish (each is bounded by the send timeout) and writes their outcomes.
pub async fn run(worker: Arc<Worker>, stop: CancellationToken) {
    let channel = worker.provider.channel();
    let pacer = Arc::new(Pacer::new(worker.limits.concurrency));
    let slots = pacer.slots.clone();
    let limiter: Arc<DefaultDirectRateLimiter> = Arc::new(RateLimiter::direct(Quota::per_second(
        NonZeroU32::new(worker.limits.rate.max(1)).unwrap_or(NonZeroU32::MIN),
    )));
    let (record_tx, record_rx) = mpsc::channel::<DeliveryUpdate>(4096);
    let recorder = tokio::spawn(record(worker.store.clone(), record_rx));
    let mut last_stale = None::<tokio::time::Instant>;
    let claims = Arc::new(Semaphore::new(CLAIMS_AT_ONCE));
    let last_claim = Arc::new(AtomicU8::new(CLAIM_OK));
    // Claims and sends in flight, counted so that a stop waits for them.
    let (busy, mut idle) = watch::channel(0usize);
    let busy = Arc::new(busy);
    loop {
        if stop.is_cancelled() {
            break;
        }
        if last_stale.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_stale = Some(tokio::time::Instant::now());
            resolve_stale(&worker, &record_tx).await;
        }
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let mut permits = vec![first];
        while permits.len() < 256 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        tokio::select! {
            () = limiter.until_ready() => {}
            () = stop.cancelled() => break,
        }
        let mut cells = 1;
        while cells < permits.len() && limiter.check().is_ok() {
            cells += 1;
        }
        permits.truncate(cells);
        // What the last claim found decides whether to wait before this one.
        match last_claim.swap(CLAIM_OK, Ordering::AcqRel) {
            CLAIM_EMPTY => {
                drop(permits);
                tokio::select! {
                    () = tokio::time::sleep(worker.poll) => {}
                    () = worker.wake.notified() => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
            CLAIM_FAILED => {
                drop(permits);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
            _ => {}
        }
        // Claims are pipelined: while one waits for its commit, sends that
        // finish meanwhile free slots for the next, so a connection does not
        // idle for a whole commit between messages. At most two at once.
        let in_flight = tokio::select! {
            p = claims.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let (worker, record_tx, pacer, last_claim) = (
            worker.clone(),
            record_tx.clone(),
            pacer.clone(),
            last_claim.clone(),
        );
        let claiming = Busy::start(&busy);
        let busy = busy.clone();
        tokio::spawn(async move {
            let _claiming = claiming;
            let claim = uuid::Uuid::new_v4().to_string();
            let rows = match worker
                .store
                .claim_deliveries(
                    channel,
                    now_millis(),
                    permits.len(),
                    &claim,
                    worker.lease_ms(),
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(channel = channel.as_str(), error = %e, "claiming deliveries failed");
                    last_claim.store(CLAIM_FAILED, Ordering::Release);
                    return;
                }
            };
            if rows.is_empty() {
                last_claim.store(CLAIM_EMPTY, Ordering::Release);
                return;
            }
            last_claim.store(CLAIM_OK, Ordering::Release);
            permits.truncate(rows.len());
            for (row, permit) in rows.into_iter().zip(permits) {
                let worker = worker.clone();
                let record_tx = record_tx.clone();
                let pacer = pacer.clone();
                let sending = Busy::start(&busy);
                tokio::spawn(async move {
                    let _sending = sending;
                    let update = send_one(&worker, &pacer, row).await;
                    // The recorder outlives every send task (it stops when
                    // the last sender of its channel is dropped).
                    let _ = record_tx.send(update).await;
                    drop(permit);
                });
            }
            drop(in_flight);
        });
    }
    // Every claim and send in flight finishes (each send is bounded by its
    // timeout and the backstop, a lookup by the timeout) and queues its
    // outcome.
    let _ = tokio::time::timeout(
        worker.limits.send_timeout * 3 + Duration::from_secs(5),
        idle.wait_for(|n| *n == 0),
    )
    .await;
    drop(record_tx);
    if tokio::time::timeout(Duration::from_secs(10), recorder)
        .await
        .is_err()
    {
        tracing::error!(
            channel = channel.as_str(),
            "delivery outcomes not written at shutdown; the rows stay sending until their lease ends"
        );
    }
}

/// Sends a claimed row once and says what became of it.
async fn send_one(worker: &Worker, pacer: &Pacer, row: DeliveryRecord) -> DeliveryUpdate {
    let claim = row.claim.clone().unwrap_or_default();
    // Each sender bounds its own call by the send timeout and knows its
    // phase; this outer bound (a second later) is a backstop, and hitting it
    // leaves the outcome unknown.
    let sent = tokio::time::timeout(worker.limits.send_timeout + Duration::from_secs(1), async {
        match &worker.provider {
            Provider::Email(s) => s
                .send(&row, &worker.links.unsubscribe(&row.id))
                .await
                .map(|()| None),
            Provider::Sms(s) => s
                .send(&row, worker.links.sms_callback(&row.id).as_deref())
                .await
                .map(Some),
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(SendError::Ambiguous {
            reason: "send timeout".into(),
        })
    });
    match &sent {
        Ok(_) => pacer.succeeded(),
        Err(SendError::Throttled { .. }) => pacer.throttled(),
        Err(_) => {}
    }
    let outcome = match sent {
        Ok(provider_id) => DeliveryOutcome::Sent {
            provider_id,
            delivered: false,
        },
        // Turned away unread: the attempt is given back (a 429 says nothing
        // of the message); the pacer sends fewer at once meanwhile.
        Err(SendError::Throttled {
            reason,
            retry_after,
        }) => throttled(worker, &row, reason, retry_after),
        Err(SendError::Permanent { reason }) => DeliveryOutcome::Failed { error: reason },
        Err(SendError::Transient {
            reason,
            retry_after,
        }) => retry(worker, &row, reason, retry_after),
        Err(SendError::Ambiguous { reason }) => match &worker.provider {
            // Not found yet may be a request still on its way to the
            // provider, so neither found nor an error sends it again now: it
            // stays `sending`, and once its lease is over the stale pass
            // looks again (not found then: sent again).
            Provider::Sms(s) => match s.lookup(&row).await {
                Ok(Some(found)) => found_outcome(&found.sid, &found.status),
                Ok(None) => return unchanged(row.id),
                Err(e) => {
                    tracing::warn!(error = %e, "looking up an SMS after a timeout failed");
                    return unchanged(row.id);
                }
            },
            // SMTP has no lookup: sending again could deliver it twice.
            Provider::Email(_) => DeliveryOutcome::Failed {
                error: format!(
                    "{OUTCOME_UNKNOWN}: {reason}; not sent again, to avoid a second copy"
                ),
            },
        },
    };
    DeliveryUpdate {
        id: row.id,
        claim,
        at: now_millis(),
        outcome,
    }
}

/// An outcome that leaves the row as it is (`sending`, for the stale pass):
/// an empty claim, which the recorder drops.
fn unchanged(id: String) -> DeliveryUpdate {
    DeliveryUpdate {
        id,
        claim: String::new(),
        at: now_millis(),
        outcome: DeliveryOutcome::Failed {
            error: String::new(),
        },
    }
}

fn found_outcome(sid: &str, status: &str) -> DeliveryOutcome {
    match status {
        "failed" | "undelivered" => DeliveryOutcome::Failed {
            error: format!("provider reports {status}"),
        },
        s => DeliveryOutcome::Sent {
            provider_id: Some(sid.to_string()),
            delivered: s == "delivered",
        },
    }
}

/// A transient failure: again after a backoff with jitter (at least the
/// provider's `Retry-After`), or given up when the attempts are used.
fn retry(
    worker: &Worker,
    row: &DeliveryRecord,
    reason: String,
    retry_after: Option<Duration>,
) -> DeliveryOutcome {
    if row.attempts >= worker.retry.max_attempts {
        return DeliveryOutcome::Failed {
            error: format!("{reason} (gave up after {} attempts)", row.attempts),
        };
    }
    DeliveryOutcome::Retry {
        error: reason,
        next_at: next_try(worker, row, retry_after),
        refund: false,
    }
}

/// When a row goes again: a backoff with jitter by its attempts, at least
/// the provider's `Retry-After`.
fn next_try(worker: &Worker, row: &DeliveryRecord, retry_after: Option<Duration>) -> i64 {
    let wait = clinflow_notify::backoff::backoff(
        row.attempts,
        worker.retry.base,
        worker.retry.cap,
        rand::random::<f64>(),
    )
    .max(retry_after.unwrap_or_default());
    now_millis() + wait.as_millis() as i64
}

/// A provider's 429: again after a backoff (at least its `Retry-After`),
/// with the attempt given back, so a throttling provider delays a row but
/// never fails it (a campaign can be cancelled meanwhile).
fn throttled(
    worker: &Worker,
    row: &DeliveryRecord,
    reason: String,
    retry_after: Option<Duration>,
) -> DeliveryOutcome {
    DeliveryOutcome::Retry {
        error: reason,
        next_at: next_try(worker, row, retry_after),
        refund: true,
    }
}

/// Rows left `sending` past their lease (their process stopped): an SMS is
/// looked up at the provider (found: sent; not found: sent again); an
/// e-mail cannot be (SMTP has no lookup), so it is failed as
/// [`OUTCOME_UNKNOWN`] rather than risk a second copy.
async fn resolve_stale(worker: &Worker, record_tx: &mpsc::Sender<DeliveryUpdate>) {
    let channel = worker.provider.channel();
    let rows = match worker
        .store
        .stale_deliveries(channel, now_millis(), 256)
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "reading stale deliveries failed");
            return;
        }
    };
    for row in rows {
        let outcome = match &worker.provider {
            Provider::Email(_) => DeliveryOutcome::Failed {
                error: format!(
                    "{OUTCOME_UNKNOWN}: the send was interrupted (the process stopped); not sent again, to avoid a second copy"
                ),
            },
            Provider::Sms(s) => match s.lookup(&row).await {
                Ok(Some(found)) => found_outcome(&found.sid, &found.status),
                Ok(None) => DeliveryOutcome::Retry {
                    error: "interrupted before the provider accepted it".into(),
                    next_at: now_millis(),
                    refund: false,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "looking up an interrupted SMS failed; later");
                    continue;
                }
            },
        };
        tracing::info!(
            channel = channel.as_str(),
            delivery = %row.id,
            "resolved a delivery left sending"
        );
        let update = DeliveryUpdate {
            id: row.id,
            claim: row.claim.unwrap_or_default(),
            at: now_millis(),
            outcome,
        };
        if record_tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Writes outcomes, as many as are queued per store call; a failed write is
/// retried (the rows stay `sending` meanwhile, never lost).
async fn record(store: Store, mut rx: mpsc::Receiver<DeliveryUpdate>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 512).await > 0 {
        // An empty claim marks an outcome that could not be known: the row
        // stays as it is.
        batch.retain(|u| !u.claim.is_empty());
        let mut wait = Duration::from_millis(100);
        loop {
            match store.record_deliveries(batch.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "recording delivery outcomes failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the pacer's spawned permit-forgetting tasks run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_sends_allowed_and_successes_win_them_back() {
        let p = Pacer::new(16);
        p.throttled();
        settle().await;
        assert_eq!(p.allowed(), 8);
        assert_eq!(p.slots.available_permits(), 8);
        // A burst of 429s from the same moment is one cut.
        p.throttled();
        p.throttled();
        settle().await;
        assert_eq!(p.allowed(), 8);
        tokio::time::advance(Duration::from_millis(1001)).await;
        p.throttled();
        settle().await;
        assert_eq!((p.allowed(), p.slots.available_permits()), (4, 4));
        // As many successes as are allowed add one back.
        for _ in 0..3 {
            p.succeeded();
        }
        assert_eq!(p.allowed(), 4);
        p.succeeded();
        assert_eq!((p.allowed(), p.slots.available_permits()), (5, 5));
        // Never above the configured concurrency, never below one.
        for _ in 0..1000 {
            p.succeeded();
        }
        assert_eq!((p.allowed(), p.slots.available_permits()), (16, 16));
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(1001)).await;
            p.throttled();
        }
        settle().await;
        assert_eq!((p.allowed(), p.slots.available_permits()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_waits_for_the_sends_in_flight() {
        let p = Pacer::new(4);
        let held = p
            .slots
            .clone()
            .acquire_many_owned(4)
            .await
            .expect("permits");
        p.throttled();
        settle().await;
        assert_eq!(p.allowed(), 2);
        assert_eq!(p.slots.available_permits(), 0);
        drop(held);
        settle().await;
        assert_eq!(p.slots.available_permits(), 2);
    }
}
