//! The embedded queue over the store on both engines: SQLite in a temporary
//! directory, PostgreSQL at `CLINFLOW_TEST_PG` in a fresh schema (an
//! unreachable PostgreSQL fails: never a skip). Waits are bounded polls of
//! the store's state, never sleeps as synchronisation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clinflow_queue::*;
use clinflow_store::*;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn open(pg: bool) -> (Store, Option<tempfile::TempDir>) {
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

async fn enqueue(s: &Store, series: &str, max_attempts: u32) -> String {
    let rec = DicomInstanceRecord {
        sop_instance_uid: format!("{series}.1"),
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
        instance_number: Some(1),
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
        s.put_dicom_instance(rec, spec, vec![]).await.unwrap(),
        PutInstance::Stored
    );
    task_id(series)
}

/// Polls until every task is done or dead, at most 20 s.
async fn settle(s: &Store, n: usize) -> Vec<TaskRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = s.imaging_tasks(None, None, 1000).await.unwrap();
        if all.len() == n
            && all
                .iter()
                .all(|t| matches!(t.status, TaskStatus::Done | TaskStatus::Dead))
        {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks never settled: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn failing_tasks_retry_then_die_while_others_complete(pg: bool) {
    let (s, _dir) = open(pg).await;
    let bad = enqueue(&s, "BAD", 3).await;
    for i in 0..5 {
        enqueue(&s, &format!("OK{i}"), 3).await;
    }
    let q = Arc::new(
        EmbeddedQueue::new(s.clone(), "w", Duration::from_secs(5), backoff())
            .poll_every(Duration::from_millis(10)),
    );
    let calls = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let c = calls.clone();
    let pool = tokio::spawn(WorkerPool::run(
        q,
        3,
        move |t: Task| {
            let c = c.clone();
            async move {
                *c.lock().unwrap().entry(t.series_uid.clone()).or_default() += 1;
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
    let all = settle(&s, 6).await;
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
    let calls = calls.lock().unwrap();
    assert_eq!(calls["BAD"], 3);
    assert!((0..5).all(|i| calls[&format!("OK{i}")] == 1));
}

async fn two_pools_process_each_task_once(pg: bool) {
    let (s, _dir) = open(pg).await;
    for i in 0..30 {
        enqueue(&s, &format!("S{i}"), 3).await;
    }
    let calls = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut pools = Vec::new();
    for w in 0..2 {
        let q = Arc::new(
            EmbeddedQueue::new(
                s.clone(),
                format!("w{w}"),
                Duration::from_secs(5),
                backoff(),
            )
            .poll_every(Duration::from_millis(10)),
        );
        let c = calls.clone();
        pools.push(tokio::spawn(WorkerPool::run(
            q,
            2,
            move |t: Task| {
                let c = c.clone();
                async move {
                    *c.lock().unwrap().entry(t.id.clone()).or_default() += 1;
                    Ok("r".to_string())
                }
            },
            Duration::from_millis(50),
            rx.clone(),
        )));
    }
    let all = settle(&s, 30).await;
    stop.send(true).unwrap();
    for p in pools {
        p.await.unwrap();
    }
    assert!(all
        .iter()
        .all(|t| t.status == TaskStatus::Done && t.attempts == 1));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 30);
    assert!(calls.values().all(|&n| n == 1));
}

async fn a_dropped_lease_is_redelivered_and_completes_once(pg: bool) {
    let (s, _dir) = open(pg).await;
    let id = enqueue(&s, "S", 3).await;
    let crashed = EmbeddedQueue::new(s.clone(), "crashed", Duration::from_millis(100), backoff());
    let lease = crashed
        .next(Duration::from_secs(2))
        .await
        .unwrap()
        .expect("a task");
    assert_eq!(lease.task.attempt, 1);
    drop(lease);
    let q = EmbeddedQueue::new(s.clone(), "alive", Duration::from_secs(5), backoff())
        .poll_every(Duration::from_millis(10));
    let again = q
        .next(Duration::from_secs(5))
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
    let t = s.imaging_task(&id).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.report_id.as_deref()),
        (TaskStatus::Done, Some("r1"))
    );
}

macro_rules! both {
    ($($name:ident),*) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(false).await } )* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(true).await } )* }
    };
}

both!(
    failing_tasks_retry_then_die_while_others_complete,
    two_pools_process_each_task_once,
    a_dropped_lease_is_redelivered_and_completes_once
);
