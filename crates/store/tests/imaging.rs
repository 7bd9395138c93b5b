//! The imaging storage suite (DICOM index and analysis tasks), run on both
//! engines through the public [`Store`] API: SQLite in a temporary
//! directory, PostgreSQL at `CLINFLOW_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/test`) in a fresh schema per test.
//! An unreachable PostgreSQL fails: these tests never skip.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use clinflow_store::*;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

/// A store in a place of its own, removed on drop.
struct TestDb {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the server URL and the schema to drop.
    pg_schema: Option<(String, String)>,
}

fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The test server's URL, a fresh schema name, and the URL that uses it.
fn pg_place() -> (String, String, DatabaseUrl) {
    let base = std::env::var("CLINFLOW_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_string());
    let schema = unique_name();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = DatabaseUrl::Postgres(format!("{base}{sep}schema={schema}"));
    (base, schema, url)
}

fn pg_unreachable(e: anyhow::Error) -> ! {
    let at = match std::env::var("CLINFLOW_TEST_PG") {
        Ok(_) => "CLINFLOW_TEST_PG",
        Err(_) => DEFAULT_PG,
    };
    panic!(
        "PostgreSQL is not reachable at {at} ({e:#}). Start it, or set CLINFLOW_TEST_PG to a \
         postgres:// URL: these tests never skip."
    )
}

impl TestDb {
    async fn open(engine: Engine) -> TestDb {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let url = DatabaseUrl::Sqlite(dir.path().join("store.db"));
                let store = Store::open(&url).await.expect("opening SQLite");
                TestDb {
                    store,
                    _dir: Some(dir),
                    pg_schema: None,
                }
            }
            Engine::Postgres => {
                let (base, schema, url) = pg_place();
                let store = Store::open(&url)
                    .await
                    .unwrap_or_else(|e| pg_unreachable(e));
                TestDb {
                    store,
                    _dir: None,
                    pg_schema: Some((base, schema)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort: a schema left behind only costs space.
        let Some((url, schema)) = self.pg_schema.take() else {
            return;
        };
        let _ = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    ))
                    .await?;
                Ok(())
            })
        })
        .join();
    }
}

/// Runs each named suite function on both engines.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Postgres).await;
                }
            )*
        }
    };
}

suite!(
    duplicates_write_nothing,
    a_stored_instance_upserts_its_task_per_state,
    release_makes_queued_tasks_due,
    concurrent_claims_are_exclusive,
    an_expired_lease_is_redelivered_and_the_stale_worker_cannot_finish,
    a_dirty_task_is_queued_again_when_done,
    retry_requeues_failed_and_dead_tasks,
    outbox_lists_unpublished_queued_tasks,
    qido_studies_filter_by_fields_dates_sites_and_quarantine,
    a_quarantined_instance_is_indexed_with_its_reason_and_no_task,
    study_instances_and_queue_stats_follow_the_tasks,
);

const T0: i64 = 1_700_000_000_000;
const SPEC: TaskSpec = TaskSpec {
    settle_until: T0 + 1_000,
    max_attempts: 3,
};

fn instance(sop: &str, series: &str, sha: &str) -> DicomInstanceRecord {
    DicomInstanceRecord {
        sop_instance_uid: sop.into(),
        series_uid: series.into(),
        study_uid: format!("study-{series}"),
        patient_id: "P1".into(),
        subject: Some("pat-1".into()),
        site: Some("site-a".into()),
        study_date: Some("20240115".into()),
        accession: Some("ACC1".into()),
        modality: "MR".into(),
        series_number: Some(1),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        instance_number: Some(sop.len() as i64),
        path: format!("/data/{sop}.dcm"),
        size: 10,
        sha256: sha.into(),
        attrs: "{}".into(),
        source: "SCANNER".into(),
        received_at: T0,
    }
}

async fn put(s: &Store, sop: &str, series: &str, spec: TaskSpec) -> PutInstance {
    s.put_dicom_instance(instance(sop, series, &format!("sha-{sop}")), spec, vec![])
        .await
        .expect("put")
}

async fn task(s: &Store, series: &str) -> TaskRecord {
    s.imaging_task(&task_id(series))
        .await
        .expect("read")
        .expect("a task")
}

async fn duplicates_write_nothing(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    assert_eq!(put(s, "1.1", "S1", SPEC).await, PutInstance::Stored);
    assert_eq!(
        put(s, "1.1", "S1", SPEC).await,
        PutInstance::Duplicate { same_content: true }
    );
    let other = s
        .put_dicom_instance(instance("1.1", "S1", "different"), SPEC, vec![])
        .await
        .unwrap();
    assert_eq!(
        other,
        PutInstance::Duplicate {
            same_content: false
        }
    );
    let got = s.dicom_instance("1.1").await.unwrap().unwrap();
    assert_eq!(got.sha256, "sha-1.1");
    assert_eq!(s.series_instances("S1").await.unwrap().len(), 1);
    assert!(s.dicom_instance("nope").await.unwrap().is_none());
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.attempts, t.next_attempt_at),
        (TaskStatus::Queued, 0, T0 + 1_000)
    );
}

async fn a_stored_instance_upserts_its_task_per_state(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let later = |n| TaskSpec {
        settle_until: T0 + n,
        max_attempts: 3,
    };
    put(s, "1.1", "S1", later(1_000)).await;
    // queued: the later due time wins
    put(s, "1.2", "S1", later(5_000)).await;
    assert_eq!(task(s, "S1").await.next_attempt_at, T0 + 5_000);
    put(s, "1.3", "S1", later(2_000)).await;
    assert_eq!(task(s, "S1").await.next_attempt_at, T0 + 5_000);
    // running: dirty
    let c = s
        .claim_imaging_task("w1", T0 + 5_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c.status, c.attempts), (TaskStatus::Running, 1));
    put(s, "1.4", "S1", later(6_000)).await;
    let t = task(s, "S1").await;
    assert!(t.dirty);
    assert_eq!(t.status, TaskStatus::Running);
    // failed: the later due time wins, stays failed
    let id = task_id("S1");
    s.execute_raw("UPDATE imaging_tasks SET dirty = FALSE")
        .await
        .unwrap();
    assert!(s
        .finish_task(
            &id,
            "w1",
            TaskOutcome::Retry {
                error: "boom".into(),
                next_attempt_at: T0 + 7_000
            },
            T0
        )
        .await
        .unwrap());
    put(s, "1.5", "S1", later(9_000)).await;
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.next_attempt_at, t.attempts),
        (TaskStatus::Failed, T0 + 9_000, 1)
    );
    // done: queued again from scratch
    s.claim_imaging_task("w2", T0 + 9_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    assert!(s
        .finish_task(
            &id,
            "w2",
            TaskOutcome::Done {
                report_id: "r1".into()
            },
            T0 + 9_000
        )
        .await
        .unwrap());
    assert_eq!(task(s, "S1").await.status, TaskStatus::Done);
    s.mark_published(vec![id.clone()]).await.unwrap();
    put(s, "1.6", "S1", later(10_000)).await;
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.attempts, t.next_attempt_at, t.published),
        (TaskStatus::Queued, 0, T0 + 10_000, false)
    );
    // dead: the same
    s.claim_imaging_task("w3", T0 + 10_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    assert!(s
        .finish_task(
            &id,
            "w3",
            TaskOutcome::Dead {
                error: "bad".into()
            },
            T0
        )
        .await
        .unwrap());
    put(s, "1.7", "S1", later(11_000)).await;
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.attempts, t.next_attempt_at),
        (TaskStatus::Queued, 0, T0 + 11_000)
    );
    assert_eq!(s.series_instances("S1").await.unwrap().len(), 7);
}

async fn release_makes_queued_tasks_due(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    put(s, "1.1", "S1", SPEC).await;
    put(s, "2.1", "S2", SPEC).await;
    assert!(s
        .claim_imaging_task("w", T0, 1_000)
        .await
        .unwrap()
        .is_none());
    s.release_series(vec!["S1".into()], T0).await.unwrap();
    assert_eq!(task(s, "S1").await.next_attempt_at, T0);
    assert_eq!(task(s, "S2").await.next_attempt_at, T0 + 1_000);
    let c = s.claim_imaging_task("w", T0, 1_000).await.unwrap().unwrap();
    assert_eq!(c.series_uid, "S1");
    assert!(s
        .claim_imaging_task("w", T0, 1_000)
        .await
        .unwrap()
        .is_none());
}

async fn concurrent_claims_are_exclusive(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    for i in 0..20 {
        put(s, &format!("1.{i}"), &format!("S{i}"), SPEC).await;
    }
    let now = T0 + 1_000;
    let claimers = (0..4).map(|w| {
        let s = s.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(t) = s
                .claim_imaging_task(&format!("w{w}"), now, 60_000)
                .await
                .unwrap()
            {
                got.push(t.id);
            }
            got
        })
    });
    let mut all = Vec::new();
    for h in claimers.collect::<Vec<_>>() {
        all.extend(h.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 20);
    assert_eq!(unique.len(), 20);
}

async fn an_expired_lease_is_redelivered_and_the_stale_worker_cannot_finish(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    put(s, "1.1", "S1", SPEC).await;
    let now = T0 + 1_000;
    let a = s.claim_imaging_task("a", now, 100).await.unwrap().unwrap();
    assert!(s
        .claim_imaging_task("b", now + 50, 100)
        .await
        .unwrap()
        .is_none());
    assert!(s.extend_lease(&a.id, "a", now + 200).await.unwrap());
    assert!(s
        .claim_imaging_task("b", now + 150, 100)
        .await
        .unwrap()
        .is_none());
    let b = s
        .claim_imaging_task("b", now + 201, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.id.as_str(), b.attempts, b.lease_owner.as_deref()),
        (a.id.as_str(), 2, Some("b"))
    );
    assert!(!s.extend_lease(&a.id, "a", now + 500).await.unwrap());
    assert!(!s
        .finish_task(
            &a.id,
            "a",
            TaskOutcome::Done {
                report_id: "stale".into()
            },
            now
        )
        .await
        .unwrap());
    assert!(s
        .finish_task(
            &a.id,
            "b",
            TaskOutcome::Done {
                report_id: "r".into()
            },
            now
        )
        .await
        .unwrap());
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.report_id.as_deref()),
        (TaskStatus::Done, Some("r"))
    );
    assert!(!s
        .finish_task(
            &a.id,
            "b",
            TaskOutcome::Dead {
                error: "again".into()
            },
            now
        )
        .await
        .unwrap());
}

async fn a_dirty_task_is_queued_again_when_done(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    put(s, "1.1", "S1", SPEC).await;
    let c = s
        .claim_imaging_task("w", T0 + 1_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    put(s, "1.2", "S1", SPEC).await;
    assert!(s
        .finish_task(
            &c.id,
            "w",
            TaskOutcome::Done {
                report_id: "r".into()
            },
            T0 + 1_500
        )
        .await
        .unwrap());
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.dirty, t.attempts, t.next_attempt_at),
        (TaskStatus::Queued, false, 0, T0 + 1_500)
    );
}

async fn retry_requeues_failed_and_dead_tasks(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    put(s, "1.1", "S1", SPEC).await;
    let id = task_id("S1");
    assert!(!s.retry_imaging_task(&id, T0, vec![]).await.unwrap());
    s.claim_imaging_task("w", T0 + 1_000, 1_000)
        .await
        .unwrap()
        .unwrap();
    assert!(!s.retry_imaging_task(&id, T0, vec![]).await.unwrap());
    assert!(s
        .finish_task(
            &id,
            "w",
            TaskOutcome::Dead {
                error: "bad".into()
            },
            T0
        )
        .await
        .unwrap());
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.last_error.as_deref()),
        (TaskStatus::Dead, Some("bad"))
    );
    assert_eq!(
        s.imaging_tasks(Some(TaskStatus::Dead), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(s.retry_imaging_task(&id, T0 + 2_000, vec![]).await.unwrap());
    let t = task(s, "S1").await;
    assert_eq!(
        (t.status, t.attempts, t.next_attempt_at),
        (TaskStatus::Queued, 0, T0 + 2_000)
    );
    assert!(s
        .imaging_tasks(Some(TaskStatus::Dead), None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.imaging_tasks(None, None, 10).await.unwrap().len(), 1);
}

async fn outbox_lists_unpublished_queued_tasks(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    put(s, "1.1", "S1", SPEC).await;
    put(s, "2.1", "S2", SPEC).await;
    assert_eq!(s.unpublished_tasks(10).await.unwrap().len(), 2);
    s.mark_published(vec![task_id("S1")]).await.unwrap();
    let left = s.unpublished_tasks(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].series_uid, "S2");
    assert!(s
        .mark_task_running(&task_id("S2"), "broker", 1, T0 + 30_000)
        .await
        .unwrap());
    let t = task(s, "S2").await;
    assert_eq!((t.status, t.attempts), (TaskStatus::Running, 1));
}

async fn qido_studies_filter_by_fields_dates_sites_and_quarantine(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    for (i, (date, site)) in [
        ("20240101", "site-a"),
        ("20240115", "site-b"),
        ("20240201", "site-a"),
    ]
    .iter()
    .enumerate()
    {
        let mut r = instance(&format!("1.{i}"), &format!("S{i}"), "h");
        r.study_date = Some(date.to_string());
        r.site = Some(site.to_string());
        r.accession = Some(format!("ACC{i}"));
        s.put_dicom_instance(r, SPEC, vec![]).await.unwrap();
    }
    let q = |f: fn(&mut DicomQuery)| {
        let mut q = DicomQuery {
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let uids = |v: Vec<StudyRecord>| v.into_iter().map(|r| r.study_uid).collect::<Vec<_>>();
    assert_eq!(s.dicom_studies(q(|_| {})).await.unwrap().len(), 3);
    assert_eq!(
        uids(
            s.dicom_studies(q(|q| {
                q.date_from = Some("20240115".into());
                q.date_to = Some("20240201".into())
            }))
            .await
            .unwrap()
        ),
        vec!["study-S1", "study-S2"]
    );
    assert_eq!(
        uids(
            s.dicom_studies(q(|q| q.accession = Some("ACC0".into())))
                .await
                .unwrap()
        ),
        vec!["study-S0"]
    );
    assert_eq!(
        uids(
            s.dicom_studies(q(|q| q.sites = Some(vec!["site-b".into()])))
                .await
                .unwrap()
        ),
        vec!["study-S1"]
    );
    assert!(s
        .dicom_studies(q(|q| q.sites = Some(vec![])))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.dicom_studies(q(|q| q.patient_id = Some("P1".into())))
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        uids(
            s.dicom_studies(q(|q| {
                q.limit = 1;
                q.offset = 1
            }))
            .await
            .unwrap()
        ),
        vec!["study-S1"]
    );
    s.execute_raw(
        "UPDATE dicom_studies SET quarantine = 'unknown patient' WHERE study_uid = 'study-S0'",
    )
    .await
    .unwrap();
    assert_eq!(s.dicom_studies(q(|_| {})).await.unwrap().len(), 2);
    let all = s
        .dicom_studies(q(|q| q.include_quarantined = true))
        .await
        .unwrap();
    assert_eq!(all[0].quarantine.as_deref(), Some("unknown patient"));
}

async fn a_quarantined_instance_is_indexed_with_its_reason_and_no_task(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let mut rec = instance("9.1", "Q1", "sha-q");
    rec.subject = None;
    rec.site = None;
    let reason = "the PatientID is not a subject".to_string();
    assert_eq!(
        s.put_quarantined_dicom_instance(rec.clone(), reason.clone(), vec![])
            .await
            .unwrap(),
        PutInstance::Stored
    );
    assert!(s.imaging_task(&task_id("Q1")).await.unwrap().is_none());
    let q = DicomQuery {
        include_quarantined: true,
        quarantined_only: true,
        limit: 10,
        ..Default::default()
    };
    let held = s.dicom_studies(q.clone()).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].quarantine.as_deref(), Some(reason.as_str()));
    // A second instance of the study keeps the first reason; a linked
    // study is not listed as quarantined.
    let mut second = instance("9.2", "Q1", "sha-q2");
    second.subject = None;
    s.put_quarantined_dicom_instance(second, "another".into(), vec![])
        .await
        .unwrap();
    put(s, "9.3", "L1", SPEC).await;
    let held = s.dicom_studies(q).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].quarantine.as_deref(), Some(reason.as_str()));
    let hidden = s
        .dicom_studies(DicomQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        hidden
            .iter()
            .map(|r| r.study_uid.as_str())
            .collect::<Vec<_>>(),
        vec!["study-L1"]
    );
}

async fn study_instances_and_queue_stats_follow_the_tasks(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    assert_eq!(
        s.imaging_queue_stats(T0).await.unwrap(),
        QueueStats::default()
    );
    for (sop, series) in [("1.1", "A"), ("1.22", "A"), ("2.1", "B")] {
        put(s, sop, series, SPEC).await;
    }
    let mut other = instance("3.1", "C", "sha-c");
    other.study_uid = "study-A".into();
    s.put_dicom_instance(other, SPEC, vec![]).await.unwrap();
    let of_a: Vec<(String, String)> = s
        .study_instances("study-A")
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.series_uid, i.sop_instance_uid))
        .collect();
    assert_eq!(
        of_a,
        vec![
            ("A".to_string(), "1.1".to_string()),
            ("A".to_string(), "1.22".to_string()),
            ("C".to_string(), "3.1".to_string())
        ]
    );
    // Not due yet (settling): waiting, but no oldest due task.
    let st = s.imaging_queue_stats(T0).await.unwrap();
    assert_eq!((st.waiting, st.running, st.dead), (3, 0, 0));
    assert_eq!(st.oldest_due_created_at, None);
    let due = SPEC.settle_until;
    let st = s.imaging_queue_stats(due).await.unwrap();
    assert_eq!(st.oldest_due_created_at, Some(T0));
    let t = s
        .claim_imaging_task("w", due, 1000)
        .await
        .unwrap()
        .expect("a task");
    s.finish_task(&t.id, "w", TaskOutcome::Dead { error: "x".into() }, due)
        .await
        .unwrap();
    s.claim_imaging_task("w", due, 1000)
        .await
        .unwrap()
        .expect("a task");
    let st = s.imaging_queue_stats(due).await.unwrap();
    assert_eq!((st.waiting, st.running, st.dead), (1, 1, 1));
}
