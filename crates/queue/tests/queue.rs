//! The queue's behaviour on every backend: the embedded queue over SQLite
//! (a temporary directory) and over PostgreSQL (`CLINFLOW_TEST_PG`, a fresh
//! schema per test), and JetStream (`CLINFLOW_TEST_NATS`, streams named
//! per test and deleted after it) over either store. An unreachable
//! PostgreSQL or NATS fails the test: never a skip. Waits are bounded
//! polls of observable state (the task rows, the streams), never sleeps as
//! synchronisation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use clinflow_queue::jetstream::{relay_once, run_relay, sweep_once};
use clinflow_queue::*;
use clinflow_store::*;
use tokio::sync::{watch, Notify};

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    EmbeddedSqlite,
    EmbeddedPostgres,
    JetStreamSqlite,
    JetStreamPostgres,
}

impl Backend {
    fn postgres(self) -> bool {
        matches!(self, Backend::EmbeddedPostgres | Backend::JetStreamPostgres)
    }

    fn jetstream(self) -> bool {
        matches!(self, Backend::JetStreamSqlite | Backend::JetStreamPostgres)
    }
}

async fn open_store(pg: bool) -> (Store, Option<tempfile::TempDir>) {
    if !pg {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(dir.path().join("q.db"));
        return (Store::open(&url).await.unwrap(), Some(dir));
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::var("CLINFLOW_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.into());
    let schema = format!(
        "q_{}_{}_{}",
        std::process::id(),
        now_millis(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let url = DatabaseUrl::Postgres(format!("{base}?schema={schema}"));
    let store = Store::open(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {base}: {e:#}"));
    (store, None)
}

fn backoff() -> Backoff {
    Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
        jitter: Jitter::Full,
    }
}

/// The JetStream side of a harness: its context and names.
struct Nats {
    js: jetstream::Context,
    cfg: JetStreamConfig,
    /// Stops the relay.
    stop: watch::Sender<bool>,
    relay: Option<tokio::task::JoinHandle<()>>,
}

/// One test's store and queue backend. Dropping it deletes its streams.
struct Harness {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    lease: Duration,
    /// Notified after each store, as the server does.
    wake: Arc<Notify>,
    nats: Option<Nats>,
}

impl Harness {
    /// A harness whose leases (the consumer's `ack_wait` on JetStream)
    /// last `lease`; on JetStream the relay runs.
    async fn new(backend: Backend, lease: Duration) -> Harness {
        Harness::build(backend, lease, true).await
    }

    async fn build(backend: Backend, lease: Duration, relay: bool) -> Harness {
        let (store, dir) = open_store(backend.postgres()).await;
        let wake = Arc::new(Notify::new());
        let nats = if backend.jetstream() {
            let url = std::env::var("CLINFLOW_TEST_NATS").unwrap_or_else(|_| DEFAULT_NATS.into());
            let js = clinflow_queue::jetstream::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("NATS is not reachable at {url}: {e:#}"));
            let name = format!("T{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase();
            let cfg = JetStreamConfig {
                sweep_every: Duration::from_secs(1),
                ..JetStreamConfig::named(&name, lease, backoff())
            };
            // Creates the streams, so the relay has somewhere to publish.
            JetStreamQueue::new(js.clone(), store.clone(), "setup", cfg.clone())
                .await
                .unwrap_or_else(|e| panic!("JetStream at {url} refused the streams: {e:#}"));
            let (stop, rx) = watch::channel(false);
            let relay = relay.then(|| {
                tokio::spawn(run_relay(
                    store.clone(),
                    js.clone(),
                    cfg.clone(),
                    wake.clone(),
                    rx,
                ))
            });
            Some(Nats {
                js,
                cfg,
                stop,
                relay,
            })
        } else {
            None
        };
        Harness {
            store,
            _dir: dir,
            lease,
            wake,
            nats,
        }
    }

    async fn queue(&self, worker: &str) -> Arc<dyn TaskQueue> {
        match &self.nats {
            None => Arc::new(
                EmbeddedQueue::new(self.store.clone(), worker, self.lease, backoff())
                    .poll_every(Duration::from_millis(10))
                    .wake_on(self.wake.clone()),
            ),
            Some(n) => Arc::new(
                JetStreamQueue::new(n.js.clone(), self.store.clone(), worker, n.cfg.clone())
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Stores instance `n` of `series`; its task is due at once.
    async fn store_instance(&self, series: &str, n: i64, max_attempts: u32) -> String {
        let rec = DicomInstanceRecord {
            sop_instance_uid: format!("{series}.{n}"),
            series_uid: series.into(),
            study_uid: "ST".into(),
            patient_id: "P".into(),
            subject: None,
            site: None,
            study_date: None,
            accession: None,
            modality: "CT".into(),
            series_number: None,
            sop_class_uid: "1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            instance_number: Some(n),
            path: "/x".into(),
            size: 1,
            sha256: "h".into(),
            attrs: "{}".into(),
            source: "T".into(),
            received_at: now_millis(),
        };
        let spec = TaskSpec {
            settle_until: now_millis(),
            max_attempts,
        };
        assert_eq!(
            self.store
                .put_dicom_instance(rec, spec, vec![])
                .await
                .unwrap(),
            PutInstance::Stored
        );
        self.wake.notify_waiters();
        task_id(series)
    }

    async fn enqueue(&self, series: &str, max_attempts: u32) -> String {
        self.store_instance(series, 1, max_attempts).await
    }

    async fn retry(&self, id: &str) {
        assert!(self
            .store
            .retry_imaging_task(id, now_millis(), vec![])
            .await
            .unwrap());
        self.wake.notify_waiters();
    }

    fn nats(&self) -> &Nats {
        self.nats.as_ref().expect("a JetStream backend")
    }

    async fn work_stream(&self) -> jetstream::stream::Stream {
        let n = self.nats();
        n.js.get_stream(&n.cfg.stream).await.unwrap()
    }

    /// Messages in the work stream.
    async fn queued_messages(&self) -> u64 {
        self.work_stream()
            .await
            .get_info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// The dead-letter stream's letters, as JSON.
    async fn dead_letters(&self) -> Vec<serde_json::Value> {
        let n = self.nats();
        let stream = n.js.get_stream(&n.cfg.dead_stream).await.unwrap();
        let state = stream.get_info().await.unwrap().state;
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let m = stream.get_raw_message(seq).await.unwrap();
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
        out
    }

    /// The work stream's and consumer's counts, for a failure message.
    async fn broker_state(&self) -> String {
        let Some(n) = &self.nats else {
            return "embedded".into();
        };
        let stream = self.work_stream().await;
        let state = stream.get_info().await.map(|i| i.state);
        let c = stream.consumer_info(&n.cfg.consumer).await;
        format!("stream {state:?}, consumer {c:?}")
    }

    /// On JetStream: polls until the work stream holds no message and the
    /// consumer has none pending or unacked (every delivery settled).
    async fn assert_drained(&self) {
        if self.nats.is_none() {
            return;
        }
        let n = self.nats();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let messages = self.queued_messages().await;
            let c = self
                .work_stream()
                .await
                .consumer_info(&n.cfg.consumer)
                .await
                .unwrap();
            if messages == 0 && c.num_pending == 0 && c.num_ack_pending == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the work stream never drained: {messages} messages, {} pending, {} unacked",
                c.num_pending,
                c.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until every one of `n` tasks is done or dead, at most 20 s.
    async fn settle(&self, n: usize) -> Vec<TaskRecord> {
        self.wait_all(n, |t| {
            matches!(t.status, TaskStatus::Done | TaskStatus::Dead)
        })
        .await
    }

    async fn wait_all(&self, n: usize, done: impl Fn(&TaskRecord) -> bool) -> Vec<TaskRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.store.imaging_tasks(None, None, 1000).await.unwrap();
            if all.len() == n && all.iter().all(&done) {
                return all;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "tasks never settled: {all:?}; {}",
                    self.broker_state().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the relay (and waits for it).
    async fn stop_relay(&mut self) {
        if let Some(n) = &mut self.nats {
            let _ = n.stop.send(true);
            if let Some(r) = n.relay.take() {
                tokio::time::timeout(Duration::from_secs(10), r)
                    .await
                    .expect("the relay stops")
                    .unwrap();
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let Some(n) = self.nats.take() else {
            return;
        };
        if let Some(r) = &n.relay {
            r.abort();
        }
        // A thread with its own runtime: drop may run inside ours.
        let (js, cfg) = (n.js.clone(), n.cfg.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                for s in [&cfg.stream, &cfg.dead_stream] {
                    let _ = tokio::time::timeout(Duration::from_secs(5), js.delete_stream(s)).await;
                }
            });
        })
        .join();
    }
}

/// Counts handler calls by key.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, u32>>>);

impl Calls {
    fn add(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_string()).or_default() += 1;
    }
    fn get(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    fn snapshot(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().clone()
    }
}

/// Waits for `n` to be notified, at most 20 s.
async fn signalled(n: &Notify, what: &str) {
    tokio::time::timeout(Duration::from_secs(20), n.notified())
        .await
        .unwrap_or_else(|_| panic!("{what} never happened"));
}

// ---- the scenarios, each on every backend ----

async fn failing_tasks_retry_then_die_while_others_complete(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(5)).await;
    let bad = h.enqueue("BAD", 3).await;
    for i in 0..5 {
        h.enqueue(&format!("OK{i}"), 3).await;
    }
    let q = h.queue("w").await;
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let c = calls.clone();
    let pool = tokio::spawn(WorkerPool::run(
        q,
        3,
        move |t: Task| {
            let c = c.clone();
            async move {
                c.add(&t.series_uid);
                if t.series_uid == "BAD" {
                    if t.attempt == 2 {
                        panic!("handler panic");
                    }
                    Err(format!("attempt {} failed", t.attempt))
                } else {
                    Ok(format!("report-{}", t.series_uid))
                }
            }
        },
        Duration::from_millis(50),
        rx,
    ));
    let all = h.settle(6).await;
    stop.send(true).unwrap();
    pool.await.unwrap();
    for t in &all {
        if t.id == bad {
            assert_eq!(t.status, TaskStatus::Dead);
            assert_eq!(t.attempts, 3);
            assert_eq!(t.last_error.as_deref(), Some("attempt 3 failed"));
        } else {
            assert_eq!(t.status, TaskStatus::Done);
            assert_eq!(t.report_id, Some(format!("report-{}", t.series_uid)));
        }
    }
    assert_eq!(calls.get("BAD"), 3);
    assert!((0..5).all(|i| calls.get(&format!("OK{i}")) == 1));
    if b.jetstream() {
        let letters = h.dead_letters().await;
        assert_eq!(
            letters,
            vec![serde_json::json!({
                "task": bad,
                "series": "BAD",
                "attempts": 3,
                "error": "attempt 3 failed",
            })]
        );
    }
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn two_pools_process_each_task_once(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(5)).await;
    for i in 0..30 {
        h.enqueue(&format!("S{i}"), 3).await;
    }
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let mut pools = Vec::new();
    for w in 0..2 {
        let q = h.queue(&format!("w{w}")).await;
        let c = calls.clone();
        pools.push(tokio::spawn(WorkerPool::run(
            q,
            2,
            move |t: Task| {
                let c = c.clone();
                async move {
                    c.add(&t.id);
                    Ok("r".to_string())
                }
            },
            Duration::from_millis(50),
            rx.clone(),
        )));
    }
    let all = h.settle(30).await;
    stop.send(true).unwrap();
    for p in pools {
        p.await.unwrap();
    }
    assert!(all
        .iter()
        .all(|t| t.status == TaskStatus::Done && t.attempts == 1));
    let calls = calls.snapshot();
    assert_eq!(calls.len(), 30);
    assert!(calls.values().all(|&n| n == 1));
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn a_dropped_lease_is_redelivered_and_completes_once(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(1)).await;
    let id = h.enqueue("S", 3).await;
    let crashed = h.queue("crashed").await;
    let lease = crashed
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a task");
    assert_eq!(lease.task.attempt, 1);
    // A crash: neither completed nor failed, no more heartbeats.
    drop(lease);
    drop(crashed);
    let q = h.queue("alive").await;
    let again = q
        .next(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("redelivered");
    assert_eq!(
        (again.task.id.as_str(), again.task.attempt),
        (id.as_str(), 2)
    );
    q.heartbeat(&again).await.unwrap();
    q.complete(again, "r1").await.unwrap();
    assert!(q.next(Duration::from_millis(300)).await.unwrap().is_none());
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.report_id.as_deref(), t.attempts),
        (TaskStatus::Done, Some("r1"), 2)
    );
    h.stop_relay().await;
    h.assert_drained().await;
}

/// A worker that stalled past its lease (no heartbeats) finishes late: its
/// outcome is refused, and it leaves the delivery its successor now holds
/// alone, so the successor's retry still comes back.
async fn a_late_outcome_after_the_lease_expired_is_refused(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(1)).await;
    let id = h.enqueue("S", 5).await;
    let stalled = h.queue("stalled").await;
    let late = stalled
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a task");
    let q = h.queue("successor").await;
    let taken = q
        .next(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("redelivered after the lease");
    assert_eq!(
        (taken.task.id.as_str(), taken.task.attempt),
        (id.as_str(), 2)
    );
    assert!(stalled.complete(late, "late").await.is_err());
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.lease_owner.as_deref(), t.report_id),
        (TaskStatus::Running, Some("successor"), None)
    );
    assert!(matches!(
        q.fail(taken, "boom").await.unwrap(),
        Failed::Retry { .. }
    ));
    let again = q
        .next(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the retry comes back");
    assert_eq!(again.task.attempt, 3);
    q.complete(again, "r").await.unwrap();
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.report_id.as_deref(), t.attempts),
        (TaskStatus::Done, Some("r"), 3)
    );
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn an_aborted_pool_loses_its_task_to_another_that_completes_it_once(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(1)).await;
    let id = h.enqueue("S", 3).await;
    let started = Arc::new(Notify::new());
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let (s, c) = (started.clone(), calls.clone());
    let doomed = tokio::spawn(WorkerPool::run(
        h.queue("doomed").await,
        1,
        move |_t: Task| {
            let (s, c) = (s.clone(), c.clone());
            async move {
                c.add("doomed");
                s.notify_one();
                // Hangs until the runtime ends: its pool is gone.
                std::future::pending::<Result<String, String>>().await
            }
        },
        Duration::from_millis(100),
        rx.clone(),
    ));
    signalled(&started, "the first delivery").await;
    // The crash: the pool (its lease holder and heartbeats) is gone.
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    let c = calls.clone();
    let alive = tokio::spawn(WorkerPool::run(
        h.queue("alive").await,
        2,
        move |_t: Task| {
            let c = c.clone();
            async move {
                c.add("alive");
                Ok("r-alive".to_string())
            }
        },
        Duration::from_millis(100),
        rx,
    ));
    let all = h.settle(1).await;
    stop.send(true).unwrap();
    alive.await.unwrap();
    assert_eq!(all[0].id, id);
    assert_eq!(
        (all[0].status, all[0].report_id.as_deref(), all[0].attempts),
        (TaskStatus::Done, Some("r-alive"), 2)
    );
    assert_eq!((calls.get("doomed"), calls.get("alive")), (1, 1));
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn heartbeats_keep_a_long_task_from_being_redelivered(b: Backend) {
    let lease = Duration::from_secs(1);
    let mut h = Harness::new(b, lease).await;
    let id = h.enqueue("LONG", 3).await;
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let mut pools = Vec::new();
    for w in 0..2 {
        let c = calls.clone();
        pools.push(tokio::spawn(WorkerPool::run(
            h.queue(&format!("w{w}")).await,
            2,
            move |t: Task| {
                let c = c.clone();
                async move {
                    c.add(&t.id);
                    // The analysis itself: three leases long.
                    tokio::time::sleep(lease * 3).await;
                    Ok(format!("attempt-{}", t.attempt))
                }
            },
            lease / 4,
            rx.clone(),
        )));
    }
    let all = h.settle(1).await;
    stop.send(true).unwrap();
    for p in pools {
        p.await.unwrap();
    }
    assert_eq!(
        (all[0].status, all[0].attempts, all[0].report_id.as_deref()),
        (TaskStatus::Done, 1, Some("attempt-1"))
    );
    assert_eq!(calls.get(&id), 1);
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn retrying_a_dead_task_delivers_it_again(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(5)).await;
    let id = h.enqueue("S", 2).await;
    let healthy = Arc::new(AtomicBool::new(false));
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let (ok, c) = (healthy.clone(), calls.clone());
    let pool = tokio::spawn(WorkerPool::run(
        h.queue("w").await,
        2,
        move |t: Task| {
            let (ok, c) = (ok.clone(), c.clone());
            async move {
                c.add(&t.id);
                if ok.load(Ordering::SeqCst) {
                    Ok(format!("fixed-{}", t.attempt))
                } else {
                    Err(format!("broken at attempt {}", t.attempt))
                }
            }
        },
        Duration::from_millis(50),
        rx,
    ));
    let all = h.settle(1).await;
    assert_eq!(
        (all[0].status, all[0].attempts, all[0].last_error.as_deref()),
        (TaskStatus::Dead, 2, Some("broken at attempt 2"))
    );
    if b.jetstream() {
        let letters = h.dead_letters().await;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0]["task"], id.as_str());
        assert_eq!(letters[0]["attempts"], 2);
    }
    healthy.store(true, Ordering::SeqCst);
    h.retry(&id).await;
    let all = h.wait_all(1, |t| t.status == TaskStatus::Done).await;
    stop.send(true).unwrap();
    pool.await.unwrap();
    assert_eq!(
        (
            all[0].attempts,
            all[0].report_id.as_deref(),
            all[0].last_error.as_deref()
        ),
        (1, Some("fixed-1"), None)
    );
    assert_eq!(calls.get(&id), 3);
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn an_instance_stored_mid_run_runs_the_task_again(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(5)).await;
    let id = h.enqueue("S", 3).await;
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let (s, r, c) = (started.clone(), release.clone(), calls.clone());
    let pool = tokio::spawn(WorkerPool::run(
        h.queue("w").await,
        2,
        move |t: Task| {
            let (s, r, c) = (s.clone(), r.clone(), c.clone());
            async move {
                c.add(&t.id);
                let n = c.get(&t.id);
                if n == 1 {
                    s.notify_one();
                    r.notified().await;
                }
                Ok(format!("run-{n}"))
            }
        },
        Duration::from_millis(50),
        rx,
    ));
    signalled(&started, "the first run").await;
    h.store_instance("S", 2, 3).await;
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!((t.status, t.dirty), (TaskStatus::Running, true));
    release.notify_one();
    let all = h
        .wait_all(1, |t| {
            t.status == TaskStatus::Done && t.report_id.as_deref() == Some("run-2")
        })
        .await;
    stop.send(true).unwrap();
    pool.await.unwrap();
    assert_eq!((all[0].attempts, all[0].dirty), (1, false));
    assert_eq!(calls.get(&id), 2);
    h.stop_relay().await;
    h.assert_drained().await;
}

async fn next_waits_for_a_task_then_gives_up(b: Backend) {
    let mut h = Harness::new(b, Duration::from_secs(5)).await;
    let q = h.queue("w").await;
    let t0 = tokio::time::Instant::now();
    assert!(q.next(Duration::from_millis(400)).await.unwrap().is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(5),
        "next waited {waited:?}"
    );
    let waiting = {
        let q = q.clone();
        tokio::spawn(async move { q.next(Duration::from_secs(10)).await })
    };
    let id = h.enqueue("S", 3).await;
    let lease = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("next returns within its wait")
        .unwrap()
        .unwrap()
        .expect("the task stored while waiting");
    assert_eq!(
        (lease.task.id.as_str(), lease.task.attempt),
        (id.as_str(), 1)
    );
    q.complete(lease, "r").await.unwrap();
    h.stop_relay().await;
    h.assert_drained().await;
}

macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        mod embedded_sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::EmbeddedSqlite).await } )* }
        mod embedded_postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::EmbeddedPostgres).await } )* }
        mod jetstream_sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::JetStreamSqlite).await } )* }
        mod jetstream_postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::JetStreamPostgres).await } )* }
    };
}

every_backend!(
    failing_tasks_retry_then_die_while_others_complete,
    two_pools_process_each_task_once,
    a_dropped_lease_is_redelivered_and_completes_once,
    a_late_outcome_after_the_lease_expired_is_refused,
    an_aborted_pool_loses_its_task_to_another_that_completes_it_once,
    heartbeats_keep_a_long_task_from_being_redelivered,
    retrying_a_dead_task_delivers_it_again,
    an_instance_stored_mid_run_runs_the_task_again,
    next_waits_for_a_task_then_gives_up,
);

// ---- JetStream only: the outbox relay and the consumer ----

/// A relay that crashed after JetStream acked a publish but before the
/// store marked it published sends it again: the same Msg-Id, dropped by
/// the duplicate window. A republish under another generation (outside
/// the window) replaces the message: the task runs once.
async fn a_republished_task_runs_once(b: Backend) {
    let h = Harness::build(b, Duration::from_secs(2), false).await;
    let id = h.enqueue("S", 3).await;
    let n = h.nats();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert!(h.store.imaging_task(&id).await.unwrap().unwrap().published);
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 0);
    // The crash: published, but the mark never written.
    h.store
        .execute_raw("UPDATE imaging_tasks SET published = FALSE")
        .await
        .unwrap();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert_eq!(h.queued_messages().await, 1, "deduplicated by Msg-Id");
    // Outside the window (a new generation): the message is replaced.
    h.store
        .execute_raw("UPDATE imaging_tasks SET published = FALSE, updated_at = updated_at + 1")
        .await
        .unwrap();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert_eq!(h.queued_messages().await, 1, "one message per task");

    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let mut pools = Vec::new();
    for w in 0..2 {
        let c = calls.clone();
        pools.push(tokio::spawn(WorkerPool::run(
            h.queue(&format!("w{w}")).await,
            2,
            move |t: Task| {
                let c = c.clone();
                async move {
                    c.add(&t.id);
                    Ok("r".to_string())
                }
            },
            Duration::from_millis(200),
            rx.clone(),
        )));
    }
    h.settle(1).await;
    h.assert_drained().await;
    stop.send(true).unwrap();
    for p in pools {
        p.await.unwrap();
    }
    assert_eq!(calls.get(&id), 1);
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Done, 1));
}

/// A task published again while it runs (its message replaced mid-run,
/// as by a relay that read the row just before it was marked running):
/// the new delivery finds it running under a live lease and is put back,
/// then settled once the run is done; the task runs once.
async fn a_task_republished_mid_run_is_not_run_twice(b: Backend) {
    let h = Harness::build(b, Duration::from_secs(2), false).await;
    let id = h.enqueue("S", 3).await;
    let n = h.nats();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let calls = Calls::default();
    let (stop, rx) = watch::channel(false);
    let pool = |q: Arc<dyn TaskQueue>, slots: usize| {
        let (s, r, c) = (started.clone(), release.clone(), calls.clone());
        tokio::spawn(WorkerPool::run(
            q,
            slots,
            move |t: Task| {
                let (s, r, c) = (s.clone(), r.clone(), c.clone());
                async move {
                    c.add(&t.id);
                    s.notify_one();
                    r.notified().await;
                    Ok("r".to_string())
                }
            },
            Duration::from_millis(500),
            rx.clone(),
        ))
    };
    // One slot: busy with the task, this pool pulls nothing more.
    let first = pool(h.queue("first").await, 1);
    signalled(&started, "the first run").await;
    // A relay that read the row as queued just before the worker marked it
    // running publishes it (a new generation) mid-run.
    h.store
        .execute_raw("UPDATE imaging_tasks SET status = 'queued', published = FALSE")
        .await
        .unwrap();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    h.store
        .execute_raw("UPDATE imaging_tasks SET status = 'running'")
        .await
        .unwrap();
    assert_eq!(h.queued_messages().await, 1, "the message was replaced");
    let second = pool(h.queue("second").await, 2);
    // The new message is delivered, put back until the lease ends, and
    // delivered again while the first run goes on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = h
            .work_stream()
            .await
            .consumer_info(&n.cfg.consumer)
            .await
            .unwrap();
        if c.num_redelivered > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never redelivered: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(calls.get(&id), 1);
    release.notify_waiters();
    h.wait_all(1, |t| t.status == TaskStatus::Done).await;
    h.assert_drained().await;
    stop.send(true).unwrap();
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(calls.get(&id), 1);
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Done, 1));
}

/// A task run and queued again between the relay's publish and its mark
/// (the store marks by id) is left marked published with no message; the
/// sweep publishes it again, and a sweep with nothing lost publishes
/// nothing.
async fn a_task_marked_published_without_a_message_is_swept_back(b: Backend) {
    let h = Harness::build(b, Duration::from_secs(2), false).await;
    let id = h.enqueue("S", 3).await;
    let n = h.nats();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert_eq!(sweep_once(&h.store, &n.js, &n.cfg).await.unwrap(), 0);
    let q = h.queue("w").await;
    let lease = q
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a task");
    h.store_instance("S", 2, 3).await;
    q.complete(lease, "run-1").await.unwrap();
    // The relay's late mark, after the run queued the task again.
    h.store
        .execute_raw("UPDATE imaging_tasks SET published = TRUE")
        .await
        .unwrap();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 0);
    assert_eq!(
        h.queued_messages().await,
        0,
        "the task has lost its message"
    );
    assert_eq!(sweep_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert_eq!(sweep_once(&h.store, &n.js, &n.cfg).await.unwrap(), 0);
    let again = q
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("swept back");
    assert_eq!(
        (again.task.id.as_str(), again.task.attempt),
        (id.as_str(), 1)
    );
    q.complete(again, "run-2").await.unwrap();
    let t = h.store.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.report_id.as_deref()),
        (TaskStatus::Done, Some("run-2"))
    );
    h.assert_drained().await;
}

/// A task still settling is not published; once due, it is.
async fn the_relay_publishes_only_due_tasks(b: Backend) {
    let h = Harness::build(b, Duration::from_secs(2), false).await;
    let rec_at = now_millis();
    let rec = DicomInstanceRecord {
        sop_instance_uid: "LATER.1".into(),
        series_uid: "LATER".into(),
        study_uid: "ST".into(),
        patient_id: "P".into(),
        subject: None,
        site: None,
        study_date: None,
        accession: None,
        modality: "CT".into(),
        series_number: None,
        sop_class_uid: "1.2".into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        instance_number: Some(1),
        path: "/x".into(),
        size: 1,
        sha256: "h".into(),
        attrs: "{}".into(),
        source: "T".into(),
        received_at: rec_at,
    };
    let spec = TaskSpec {
        settle_until: rec_at + 60_000,
        max_attempts: 3,
    };
    h.store.put_dicom_instance(rec, spec, vec![]).await.unwrap();
    let n = h.nats();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 0);
    assert_eq!(h.queued_messages().await, 0);
    h.store
        .release_series(vec!["LATER".into()], now_millis())
        .await
        .unwrap();
    assert_eq!(relay_once(&h.store, &n.js, &n.cfg).await.unwrap(), 1);
    assert_eq!(h.queued_messages().await, 1);
}

/// Reconnecting with another lease updates the durable consumer.
async fn a_changed_lease_updates_the_consumer(b: Backend) {
    let h = Harness::build(b, Duration::from_secs(2), false).await;
    let n = h.nats();
    let cfg = JetStreamConfig {
        ack_wait: Duration::from_secs(7),
        ..n.cfg.clone()
    };
    JetStreamQueue::new(n.js.clone(), h.store.clone(), "w", cfg)
        .await
        .unwrap();
    let info = h
        .work_stream()
        .await
        .consumer_info(&n.cfg.consumer)
        .await
        .unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(info.config.max_deliver, -1);
}

macro_rules! jetstream_only {
    ($($name:ident),* $(,)?) => {
        mod jetstream_sqlite_relay { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::JetStreamSqlite).await } )* }
        mod jetstream_postgres_relay { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Backend::JetStreamPostgres).await } )* }
    };
}

jetstream_only!(
    a_republished_task_runs_once,
    a_task_republished_mid_run_is_not_run_twice,
    a_task_marked_published_without_a_message_is_swept_back,
    the_relay_publishes_only_due_tasks,
    a_changed_lease_updates_the_consumer,
);

#[tokio::test]
async fn the_default_config_names_the_imaging_streams() {
    let cfg = JetStreamConfig::default();
    assert_eq!(
        (
            cfg.stream.as_str(),
            cfg.task_subjects(),
            cfg.dead_subject(),
            cfg.consumer.as_str(),
            cfg.dead_stream.as_str(),
            cfg.ack_wait
        ),
        (
            "CLINFLOW_IMAGING",
            "clinflow.imaging.tasks.*".to_string(),
            "clinflow.imaging.dead".to_string(),
            "imaging-workers",
            "CLINFLOW_IMAGING_DEAD",
            Duration::from_secs(60)
        )
    );
}
