//! One storage suite, run on both engines through the public [`Store`] API:
//! SQLite in a temporary directory, PostgreSQL at `CLINFLOW_TEST_PG`
//! (default `postgres://postgres@127.0.0.1:5432/test`), each test in a fresh
//! schema that is dropped afterwards.
//!
//! A PostgreSQL that cannot be reached fails the PostgreSQL tests: they never
//! skip silently, here or in CI.
//!
//! Index entries are built by hand, so the suite does not depend on the
//! FHIR extraction rules.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use clinflow_fhir::index::Extracted;
use clinflow_fhir::search::{
    Clause, Predicate, Prefix, SearchQuery, SortKey, StringMode, TokenSystem,
};
use clinflow_fhir::{IndexEntry, IndexValue};
use clinflow_store::audit::{self, ChainBreak};
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
    engine: Engine,
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
                    engine,
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
                    engine,
                    _dir: None,
                    pg_schema: Some((base, schema)),
                }
            }
        }
    }

    /// SQL that lifts the append-only protection, as an attacker would.
    fn drop_audit_triggers(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite => "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;",
            Engine::Postgres => {
                "DROP TRIGGER audit_log_no_update ON audit_log; DROP TRIGGER audit_log_no_delete ON audit_log;"
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
    create_read_update_delete_and_history,
    a_request_is_all_or_nothing,
    concurrent_writes_all_land,
    search_matches_each_kind_of_parameter,
    paging_walks_every_result_once_in_both_directions,
    totals_and_includes,
    scopes_hide_other_sites_patients,
    identifiers_and_patient_sites,
    tokens_are_created_found_and_revoked,
    trial_versions_are_kept,
    audit_records_are_chained_and_filtered,
    a_tampered_audit_trail_is_detected,
    records_cut_from_the_end_are_detected,
    ingest_batches_are_accepted_once_and_finished_once,
    data_queries_commit_with_their_values_and_follow_their_lifecycle,
    a_replaced_version_leaves_no_index_rows_behind,
    an_ingest_batch_is_its_format_content_and_scope,
    compartment_pages_walk_a_patients_resources_and_stop_at_the_deadline,
    a_large_request_indexes_every_row_of_every_resource,
);

// ---- data ----

const DAY: i64 = 86_400_000;
const T0: i64 = 1_700_000_000_000;
const T1: i64 = 1_710_000_000_000;
const LOINC: &str = "http://loinc.org";
const MRN: &str = "urn:clinflow:mrn";
const SYSTOLIC: &str = "8480-6";
const DIASTOLIC: &str = "8462-4";
const HEART_RATE: &str = "8867-4";
const UCUM: &str = "http://unitsofmeasure.org";

fn token(param: &'static str, system: Option<&str>, code: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        },
    }
}

fn reference(param: &'static str, target_type: &str, target_id: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::Reference {
            target_type: target_type.to_string(),
            target_id: target_id.to_string(),
        },
    }
}

fn write_op(
    rtype: &str,
    id: &str,
    expect: Expect,
    last_updated: i64,
    body: Option<String>,
    extracted: Extracted,
) -> WriteOp {
    WriteOp {
        resource_type: rtype.to_string(),
        id: id.to_string(),
        expect,
        new_version: match expect {
            Expect::Absent => 1,
            Expect::Version(v) => v + 1,
        },
        last_updated,
        body,
        extracted,
    }
}

fn body(rtype: &str, id: &str, note: &str) -> Option<String> {
    Some(format!(
        r#"{{"resourceType":"{rtype}","id":"{id}","note":"{note}"}}"#
    ))
}

fn patient(id: &str, name: &str, mrn: &str) -> WriteOp {
    write_op(
        "Patient",
        id,
        Expect::Absent,
        T0,
        body("Patient", id, name),
        Extracted {
            entries: vec![
                IndexEntry {
                    param: "name",
                    value: IndexValue::String {
                        value: name.to_lowercase(),
                    },
                },
                token("identifier", Some(MRN), mrn),
                IndexEntry {
                    param: "birthdate",
                    value: IndexValue::Date {
                        low: T0 - 10_000 * DAY,
                        high: T0 - 9_999 * DAY - 1,
                    },
                },
            ],
            patient: Some(id.to_string()),
            ..Default::default()
        },
    )
}

fn enrolment(id: &str, patient: &str, site: &str, expect: Expect) -> WriteOp {
    write_op(
        "ResearchSubject",
        id,
        expect,
        T0,
        body("ResearchSubject", id, site),
        Extracted {
            entries: vec![reference("individual", "Patient", patient)],
            patient: Some(patient.to_string()),
            subject_site: Some(site.to_string()),
            ..Default::default()
        },
    )
}

/// The patients of the observations, round robin: pa at site s1, pb at s2,
/// pc enrolled nowhere.
const PATIENTS: [&str; 3] = ["pa", "pb", "pc"];

fn obs_id(i: usize) -> String {
    format!("o-{i:02}")
}

/// Observation `i`: systolic when even, diastolic when odd; value `i` mm[Hg];
/// two observations per day (ties in the date sort); three last-updated
/// instants (ties in the _lastUpdated sort).
fn observation(i: usize) -> WriteOp {
    let id = obs_id(i);
    let p = PATIENTS[i % 3];
    let day = T0 + (i as i64 / 2) * DAY;
    let code = if i.is_multiple_of(2) {
        SYSTOLIC
    } else {
        DIASTOLIC
    };
    write_op(
        "Observation",
        &id,
        Expect::Absent,
        T1 + (i as i64 % 3) * 1000,
        body("Observation", &id, code),
        Extracted {
            entries: vec![
                token("code", Some(LOINC), code),
                reference("subject", "Patient", p),
                IndexEntry {
                    param: "date",
                    value: IndexValue::Date {
                        low: day,
                        high: day + DAY - 1,
                    },
                },
                IndexEntry {
                    param: "value-quantity",
                    value: IndexValue::Quantity {
                        value: i as f64,
                        system: Some(UCUM.to_string()),
                        code: Some("mm[Hg]".to_string()),
                    },
                },
            ],
            patient: Some(p.to_string()),
            sort_date: Some(day),
            ..Default::default()
        },
    )
}

const OBSERVATIONS: usize = 30;
/// One more Observation: no date, no subject (visible in every scope).
const UNDATED: &str = "o-undated";

fn undated_observation() -> WriteOp {
    write_op(
        "Observation",
        UNDATED,
        Expect::Absent,
        T1 + 5000,
        body("Observation", UNDATED, "heart rate"),
        Extracted {
            entries: vec![token("code", Some(LOINC), HEART_RATE)],
            ..Default::default()
        },
    )
}

/// Patients pa (site s1), pb (s2), pc (no site), an Organization, and the
/// observations.
async fn seed(store: &Store) {
    store
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![
                patient("pa", "Alice", "MRN-A"),
                patient("pb", "Albert", "MRN-B"),
                patient("pc", "Bob", "MRN-C"),
                enrolment("rs-a", "pa", "s1", Expect::Absent),
                enrolment("rs-b", "pb", "s2", Expect::Absent),
                write_op(
                    "Organization",
                    "s1",
                    Expect::Absent,
                    T0,
                    body("Organization", "s1", "site"),
                    Extracted::default(),
                ),
            ],
            audit: vec![],
        })
        .await
        .expect("seeding patients");
    let mut ops: Vec<WriteOp> = (0..OBSERVATIONS).map(observation).collect();
    ops.push(undated_observation());
    store
        .write(WriteRequest {
            ops,
            audit: vec![],
            queries: Vec::new(),
        })
        .await
        .expect("seeding observations");
}

fn query(rtype: &str, clauses: Vec<Clause>) -> SearchQuery {
    SearchQuery {
        resource_type: rtype.to_string(),
        clauses,
        count: 100,
        sort: SortKey::Id,
        total: false,
        include_subject: false,
        cursor: None,
    }
}

fn clause(param: &str, any_of: Vec<Predicate>) -> Clause {
    Clause {
        param: param.to_string(),
        any_of,
    }
}

fn code(system: TokenSystem, code: Option<&str>) -> Clause {
    clause(
        "code",
        vec![Predicate::Token {
            system,
            code: code.map(str::to_string),
        }],
    )
}

fn loinc(c: &str) -> Clause {
    code(TokenSystem::Exact(LOINC.to_string()), Some(c))
}

fn any_loinc() -> Clause {
    code(TokenSystem::Exact(LOINC.to_string()), None)
}

fn date(prefix: Prefix, low: i64, high: i64) -> Clause {
    clause("date", vec![Predicate::Date { prefix, low, high }])
}

fn quantity(prefix: Prefix, value: f64, code: Option<&str>) -> Clause {
    clause(
        "value-quantity",
        vec![Predicate::Quantity {
            prefix,
            value,
            low: value - 0.5,
            high: value + 0.5,
            system: None,
            code: code.map(str::to_string),
        }],
    )
}

fn name(value: &str, mode: StringMode) -> Clause {
    clause(
        "name",
        vec![Predicate::String {
            value: value.to_string(),
            mode,
        }],
    )
}

async fn ids(store: &Store, q: SearchQuery, scope: Scope) -> Vec<String> {
    store
        .search(q, scope)
        .await
        .expect("search")
        .matches
        .into_iter()
        .map(|r| r.id)
        .collect()
}

async fn id_set(store: &Store, q: SearchQuery) -> BTreeSet<String> {
    ids(store, q, Scope::All).await.into_iter().collect()
}

fn obs_set(pred: impl Fn(usize) -> bool) -> BTreeSet<String> {
    (0..OBSERVATIONS).filter(|i| pred(*i)).map(obs_id).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn audit_rec(actor: &str, action: &str, rtype: &str, id: &str, time: i64) -> AuditRecord {
    AuditRecord {
        time,
        actor: actor.to_string(),
        role: "admin".to_string(),
        action: action.to_string(),
        resource_type: Some(rtype.to_string()),
        resource_id: Some(id.to_string()),
        version: Some(1),
        reason: None,
        outcome: "success".to_string(),
        client: Some("127.0.0.1".to_string()),
        detail: None,
    }
}

// ---- the suite ----

async fn create_read_update_delete_and_history(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    s.ping().await.expect("ping");
    assert_eq!(s.read_current("Patient", "pa").await.unwrap(), None);

    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![patient("pa", "Alice", "MRN-A")],
        audit: vec![],
    })
    .await
    .expect("create");
    let v1 = s
        .read_current("Patient", "pa")
        .await
        .unwrap()
        .expect("created");
    assert_eq!(v1.version, 1);
    assert_eq!(v1.last_updated, T0);
    assert!(!v1.deleted);
    assert_eq!(v1.body, body("Patient", "pa", "Alice"));
    assert_eq!(v1.patient.as_deref(), Some("pa"));

    // A second create of the same id conflicts and reports the version found.
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![patient("pa", "Alice", "MRN-A")],
            audit: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Conflict { id, expected: Expect::Absent, found: Some(1), .. } if id == "pa"),
        "{err:?}"
    );

    let mut update = patient("pa", "Alicia", "MRN-A");
    update.expect = Expect::Version(1);
    update.new_version = 2;
    update.last_updated = T0 + 1;
    update.body = body("Patient", "pa", "Alicia");
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![update.clone()],
        audit: vec![],
    })
    .await
    .expect("update at the expected version");

    // The same update again: the version moved on.
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![update],
            audit: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::Conflict {
                expected: Expect::Version(1),
                found: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
    // An update of a resource that does not exist.
    let mut ghost = patient("nobody", "Nobody", "MRN-0");
    ghost.expect = Expect::Version(3);
    ghost.new_version = 4;
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![ghost],
            audit: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriteError::Conflict { found: None, .. }),
        "{err:?}"
    );

    let current = s.read_current("Patient", "pa").await.unwrap().unwrap();
    assert_eq!((current.version, current.last_updated), (2, T0 + 1));
    assert_eq!(current.body, body("Patient", "pa", "Alicia"));
    assert_eq!(
        s.read_version("Patient", "pa", 1).await.unwrap(),
        Some(v1.clone())
    );
    assert_eq!(s.read_version("Patient", "pa", 9).await.unwrap(), None);
    // The search index follows the current version only.
    let by_name = |n: &str| query("Patient", vec![name(n, StringMode::Exact)]);
    assert_eq!(id_set(s, by_name("alice")).await, set(&[]));
    assert_eq!(id_set(s, by_name("alicia")).await, set(&["pa"]));

    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![write_op(
            "Patient",
            "pa",
            Expect::Version(2),
            T0 + 2,
            None,
            Extracted::default(),
        )],
        audit: vec![],
    })
    .await
    .expect("delete");
    let deleted = s.read_current("Patient", "pa").await.unwrap().unwrap();
    assert!(deleted.deleted);
    assert_eq!(
        (deleted.version, deleted.body, deleted.patient),
        (3, None, None)
    );
    assert_eq!(id_set(s, by_name("alicia")).await, set(&[]));
    assert_eq!(id_set(s, query("Patient", vec![])).await, set(&[]));
    // A deleted resource still exists: creating it again conflicts.
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![patient("pa", "Alice", "MRN-A")],
            audit: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriteError::Conflict { found: Some(3), .. }),
        "{err:?}"
    );

    let history = s.history("Patient", "pa", None, 10).await.unwrap();
    assert_eq!(
        history.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    assert!(history[0].deleted && history[0].body.is_none());
    assert_eq!(history[2].body, v1.body);
    let older = s.history("Patient", "pa", Some(3), 1).await.unwrap();
    assert_eq!(older.iter().map(|r| r.version).collect::<Vec<_>>(), vec![2]);
    assert!(s
        .history("Patient", "nobody", None, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn a_request_is_all_or_nothing(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    let audit = vec![audit_rec("alice", "transaction", "Bundle", "b1", T1)];

    // Three good creates and one that collides: nothing is written.
    let mut ops: Vec<WriteOp> = (100..103).map(observation).collect();
    ops.insert(2, observation(5));
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops,
            audit: audit.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Conflict { id, found: Some(1), .. } if id == "o-05"),
        "{err:?}"
    );
    for i in 100..103 {
        assert_eq!(
            s.read_current("Observation", &obs_id(i)).await.unwrap(),
            None
        );
    }
    let q = query("Observation", vec![quantity(Prefix::Ge, 100.0, None)]);
    assert!(
        id_set(s, q.clone()).await.is_empty(),
        "no index rows either"
    );

    // An update at a stale version undoes the good update and create beside it.
    let mut good = observation(1);
    good.expect = Expect::Version(1);
    good.new_version = 2;
    let mut stale = observation(2);
    stale.expect = Expect::Version(7);
    stale.new_version = 8;
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![good, observation(103), stale],
            audit: audit.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Conflict { id, expected: Expect::Version(7), found: Some(1), .. } if id == "o-02"),
        "{err:?}"
    );
    assert_eq!(
        s.read_current("Observation", "o-01")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        s.read_current("Observation", &obs_id(103)).await.unwrap(),
        None
    );
    // The same id twice as a create: the second conflicts with the first.
    let err = s
        .write(WriteRequest {
            queries: Vec::new(),
            ops: vec![observation(104), observation(104)],
            audit: audit.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriteError::Conflict { found: Some(1), .. }),
        "{err:?}"
    );
    assert_eq!(
        s.read_current("Observation", &obs_id(104)).await.unwrap(),
        None
    );
    // Failed requests leave no audit records.
    assert_eq!(s.verify_audit().await.unwrap(), Ok(0));

    // Create then update of one resource in one request: the index holds
    // the last version's rows only.
    let mut second = observation(106);
    second.expect = Expect::Version(1);
    second.new_version = 2;
    second.extracted.entries = vec![token("code", Some(LOINC), HEART_RATE)];
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![observation(106), second],
        audit,
    })
    .await
    .expect("create and update together");
    assert_eq!(
        s.read_current("Observation", "o-106")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        id_set(s, query("Observation", vec![loinc(HEART_RATE)])).await,
        set(&["o-106", UNDATED])
    );
    assert!(id_set(s, q).await.is_empty());
    assert_eq!(s.verify_audit().await.unwrap(), Ok(1));
}

async fn concurrent_writes_all_land(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![patient("pa", "Alice", "MRN-A")],
        audit: vec![],
    })
    .await
    .unwrap();
    const TASKS: usize = 8;
    const PER_TASK: usize = 25;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = s.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                let i = 1000 + t * PER_TASK + k;
                let mut op = observation(i);
                op.id = format!("c-{t}-{k}");
                store
                    .write(WriteRequest {
                        queries: Vec::new(),
                        ops: vec![op],
                        audit: vec![audit_rec(
                            "ingest",
                            "create",
                            "Observation",
                            &format!("c-{t}-{k}"),
                            T1,
                        )],
                    })
                    .await
                    .expect("a concurrent write");
                // A failing request in the same groups must not undo others.
                let err = store
                    .write(WriteRequest {
                        queries: Vec::new(),
                        ops: vec![patient("pa", "Alice", "MRN-A")],
                        audit: vec![audit_rec("ingest", "create", "Patient", "pa", T1)],
                    })
                    .await
                    .unwrap_err();
                assert!(matches!(err, WriteError::Conflict { .. }));
            }
        }));
    }
    for h in handles {
        h.await.expect("writer task");
    }
    let mut q = query("Observation", vec![]);
    q.count = 0;
    q.total = true;
    let page = s.search(q, Scope::All).await.unwrap();
    assert_eq!(page.total, Some((TASKS * PER_TASK) as u64));
    assert!(page.matches.is_empty());
    assert_eq!(
        s.verify_audit().await.unwrap(),
        Ok((TASKS * PER_TASK) as u64)
    );
}

async fn search_matches_each_kind_of_parameter(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    let all_obs = || {
        let mut all = obs_set(|_| true);
        all.insert(UNDATED.to_string());
        all
    };
    let obs = |clauses| query("Observation", clauses);

    // Tokens.
    assert_eq!(
        id_set(s, obs(vec![loinc(SYSTOLIC)])).await,
        obs_set(|i| i.is_multiple_of(2))
    );
    assert_eq!(
        id_set(s, obs(vec![code(TokenSystem::Any, Some(DIASTOLIC))])).await,
        obs_set(|i| i % 2 == 1)
    );
    assert!(
        id_set(s, obs(vec![code(TokenSystem::None, Some(SYSTOLIC))]))
            .await
            .is_empty()
    );
    assert_eq!(id_set(s, obs(vec![any_loinc()])).await, all_obs());
    assert!(id_set(
        s,
        obs(vec![code(
            TokenSystem::Exact("urn:other".into()),
            Some(SYSTOLIC)
        )])
    )
    .await
    .is_empty());
    // OR within a clause, AND across clauses.
    let either = clause(
        "code",
        vec![
            Predicate::Token {
                system: TokenSystem::Any,
                code: Some(HEART_RATE.into()),
            },
            Predicate::Token {
                system: TokenSystem::Any,
                code: Some(SYSTOLIC.into()),
            },
        ],
    );
    let mut expected = obs_set(|i| i.is_multiple_of(2));
    expected.insert(UNDATED.to_string());
    assert_eq!(id_set(s, obs(vec![either.clone()])).await, expected);
    assert_eq!(
        id_set(s, obs(vec![either, quantity(Prefix::Lt, 4.0, None)])).await,
        set(&["o-00", "o-02"])
    );

    // Strings: starts-with (case-insensitive), exact, contains.
    let patients = |c| query("Patient", vec![c]);
    assert_eq!(
        id_set(s, patients(name("al", StringMode::StartsWith))).await,
        set(&["pa", "pb"])
    );
    assert_eq!(
        id_set(s, patients(name("AL", StringMode::StartsWith))).await,
        set(&["pa", "pb"])
    );
    assert_eq!(
        id_set(s, patients(name("alice", StringMode::Exact))).await,
        set(&["pa"])
    );
    assert!(id_set(s, patients(name("ali", StringMode::Exact)))
        .await
        .is_empty());
    assert_eq!(
        id_set(s, patients(name("ob", StringMode::Contains))).await,
        set(&["pc"])
    );
    assert!(id_set(s, patients(name("%", StringMode::Contains)))
        .await
        .is_empty());

    // Dates, with prefixes. Observation i covers day i/2.
    let day = |d: i64| (T0 + d * DAY, T0 + (d + 1) * DAY - 1);
    let (lo, hi) = day(3);
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Eq, lo, hi)])).await,
        obs_set(|i| i / 2 == 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Ne, lo, hi)])).await,
        obs_set(|i| i / 2 != 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Gt, lo, hi)])).await,
        obs_set(|i| i / 2 > 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Ge, lo, hi)])).await,
        obs_set(|i| i / 2 >= 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Lt, lo, hi)])).await,
        obs_set(|i| i / 2 < 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Le, lo, hi)])).await,
        obs_set(|i| i / 2 <= 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Sa, lo, hi)])).await,
        obs_set(|i| i / 2 > 3)
    );
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Eb, lo, hi)])).await,
        obs_set(|i| i / 2 < 3)
    );
    // A month covers every day of the data.
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Eq, T0, T0 + 31 * DAY - 1)])).await,
        obs_set(|_| true)
    );

    // _lastUpdated: observation i was updated at T1 + (i % 3) s.
    let lu = |prefix, at: i64| {
        clause(
            "_lastUpdated",
            vec![Predicate::Date {
                prefix,
                low: at,
                high: at + 999,
            }],
        )
    };
    assert_eq!(
        id_set(s, obs(vec![lu(Prefix::Eq, T1 + 1000)])).await,
        obs_set(|i| i % 3 == 1)
    );
    let mut later = obs_set(|i| i % 3 == 2);
    later.insert(UNDATED.to_string());
    assert_eq!(id_set(s, obs(vec![lu(Prefix::Gt, T1 + 1000)])).await, later);

    // References, with and without the type, and by identifier.
    let subject = |target_type: Option<&str>, id: &str| {
        clause(
            "subject",
            vec![Predicate::Reference {
                target_type: target_type.map(str::to_string),
                target_id: id.to_string(),
            }],
        )
    };
    assert_eq!(
        id_set(s, obs(vec![subject(Some("Patient"), "pa")])).await,
        obs_set(|i| i.is_multiple_of(3))
    );
    assert_eq!(
        id_set(s, obs(vec![subject(None, "pb")])).await,
        obs_set(|i| i % 3 == 1)
    );
    assert!(id_set(s, obs(vec![subject(Some("Group"), "pa")]))
        .await
        .is_empty());
    let by_mrn = |system: Option<&str>, value: &str| {
        clause(
            "subject",
            vec![Predicate::ReferenceIdentifier {
                system: system.map(str::to_string),
                value: value.to_string(),
            }],
        )
    };
    assert_eq!(
        id_set(s, obs(vec![by_mrn(Some(MRN), "MRN-C")])).await,
        obs_set(|i| i % 3 == 2)
    );
    assert_eq!(
        id_set(s, obs(vec![by_mrn(None, "MRN-C")])).await,
        obs_set(|i| i % 3 == 2)
    );
    assert!(id_set(s, obs(vec![by_mrn(Some("urn:x"), "MRN-C")]))
        .await
        .is_empty());

    // Quantities.
    assert_eq!(
        id_set(s, obs(vec![quantity(Prefix::Eq, 5.0, None)])).await,
        obs_set(|i| i == 5)
    );
    assert_eq!(
        id_set(s, obs(vec![quantity(Prefix::Gt, 20.0, None)])).await,
        obs_set(|i| i > 20)
    );
    assert_eq!(
        id_set(s, obs(vec![quantity(Prefix::Le, 3.0, Some("mm[Hg]"))])).await,
        obs_set(|i| i <= 3)
    );
    assert!(id_set(s, obs(vec![quantity(Prefix::Le, 3.0, Some("kg"))]))
        .await
        .is_empty());
    assert_eq!(
        id_set(s, obs(vec![quantity(Prefix::Ne, 5.0, None)])).await,
        obs_set(|i| i != 5)
    );

    // _id.
    assert_eq!(
        id_set(
            s,
            obs(vec![clause(
                "_id",
                vec![Predicate::Id("o-07".into()), Predicate::Id("o-08".into())]
            )])
        )
        .await,
        set(&["o-07", "o-08"])
    );
    // A clause with no alternatives matches nothing.
    assert!(id_set(s, obs(vec![clause("code", vec![])]))
        .await
        .is_empty());
}

/// Follows `next_cursor` to the end; each page at most `count` long.
async fn walk(store: &Store, mut q: SearchQuery, scope: Scope) -> Vec<String> {
    let mut all = Vec::new();
    for _ in 0..100 {
        let page = store.search(q.clone(), scope.clone()).await.expect("page");
        assert!(page.matches.len() <= q.count);
        all.extend(page.matches.into_iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return all,
        }
    }
    panic!("paging did not end");
}

async fn paging_walks_every_result_once_in_both_directions(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    // (sort value, id) of every Observation, as each sort orders them.
    let mut by_date: Vec<(i64, String)> = (0..OBSERVATIONS)
        .map(|i| (T0 + (i as i64 / 2) * DAY, obs_id(i)))
        .collect();
    by_date.push((i64::MIN, UNDATED.to_string()));
    by_date.sort();
    let mut by_updated: Vec<(i64, String)> = (0..OBSERVATIONS)
        .map(|i| (T1 + (i as i64 % 3) * 1000, obs_id(i)))
        .collect();
    by_updated.push((T1 + 5000, UNDATED.to_string()));
    by_updated.sort();
    let mut by_id: Vec<String> = by_date.iter().map(|(_, id)| id.clone()).collect();
    by_id.sort();
    let ids_of = |v: &[(i64, String)]| v.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>();
    let reversed = |mut v: Vec<String>| {
        v.reverse();
        v
    };

    for count in [1, 4, 7, 31, 50] {
        let q = |sort| SearchQuery {
            count,
            sort,
            ..query("Observation", vec![any_loinc()])
        };
        assert_eq!(
            walk(s, q(SortKey::Id), Scope::All).await,
            by_id,
            "by id, {count} a page"
        );
        assert_eq!(
            walk(s, q(SortKey::Date { descending: false }), Scope::All).await,
            ids_of(&by_date),
            "by date, {count} a page"
        );
        assert_eq!(
            walk(s, q(SortKey::Date { descending: true }), Scope::All).await,
            reversed(ids_of(&by_date)),
            "by -date, {count} a page"
        );
        assert_eq!(
            walk(s, q(SortKey::LastUpdated { descending: false }), Scope::All).await,
            ids_of(&by_updated),
            "by _lastUpdated, {count} a page"
        );
        assert_eq!(
            walk(s, q(SortKey::LastUpdated { descending: true }), Scope::All).await,
            reversed(ids_of(&by_updated)),
            "by -_lastUpdated, {count} a page"
        );
    }
    // A cursor this server did not make is refused.
    let mut q = query("Observation", vec![]);
    q.cursor = Some("not-a-cursor".into());
    assert!(s.search(q, Scope::All).await.is_err());
}

async fn totals_and_includes(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    let mut q = query("Observation", vec![loinc(SYSTOLIC)]);
    q.count = 4;
    q.total = true;
    let page = s.search(q.clone(), Scope::All).await.unwrap();
    assert_eq!(page.total, Some(15));
    assert_eq!(page.matches.len(), 4);
    assert!(page.next_cursor.is_some());
    // Without _total, no count is made.
    q.total = false;
    assert_eq!(s.search(q.clone(), Scope::All).await.unwrap().total, None);
    // _count=0: the total alone.
    q.count = 0;
    let page = s.search(q, Scope::All).await.unwrap();
    assert_eq!(page.total, Some(15));
    assert!(page.matches.is_empty() && page.next_cursor.is_none());

    // _include=Observation:subject: each subject once, with its body.
    let mut q = query("Observation", vec![any_loinc()]);
    q.include_subject = true;
    q.count = 6;
    let page = s.search(q.clone(), Scope::All).await.unwrap();
    assert_eq!(page.matches.len(), 6);
    let mut included: Vec<_> = page
        .included
        .iter()
        .map(|r| (r.resource_type.as_str(), r.id.as_str()))
        .collect();
    included.sort();
    assert_eq!(
        included,
        vec![("Patient", "pa"), ("Patient", "pb"), ("Patient", "pc")]
    );
    assert!(page
        .included
        .iter()
        .all(|r| r.body.is_some() && r.version == 1));
    // The matches carry their current version and body.
    let first = &page.matches[0];
    assert_eq!(first.id, "o-00");
    assert_eq!(first.body, body("Observation", "o-00", SYSTOLIC));
    assert_eq!(first.patient.as_deref(), Some("pa"));
    // Included resources are scoped like matches.
    let page = s.search(q, Scope::Sites(vec!["s1".into()])).await.unwrap();
    let included: Vec<_> = page.included.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(included, vec!["pa"]);
    // A deleted subject is not included.
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![write_op(
            "Patient",
            "pb",
            Expect::Version(1),
            T1,
            None,
            Extracted::default(),
        )],
        audit: vec![],
    })
    .await
    .unwrap();
    let mut q = query("Observation", vec![loinc(DIASTOLIC)]);
    q.include_subject = true;
    let page = s.search(q, Scope::All).await.unwrap();
    let mut included: Vec<_> = page.included.iter().map(|r| r.id.as_str()).collect();
    included.sort();
    assert_eq!(included, vec!["pa", "pc"]);
}

async fn scopes_hide_other_sites_patients(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    let with_undated = |mut v: BTreeSet<String>| {
        v.insert(UNDATED.to_string());
        v
    };
    let scoped = |scope: Scope| async move {
        let mut q = query("Observation", vec![any_loinc()]);
        q.total = true;
        let page = s.search(q, scope).await.unwrap();
        let found: BTreeSet<String> = page.matches.into_iter().map(|r| r.id).collect();
        (found, page.total)
    };
    let (found, total) = scoped(Scope::All).await;
    assert_eq!((found, total), (with_undated(obs_set(|_| true)), Some(31)));
    // Site s1 sees pa's data and data in no compartment.
    let (found, total) = scoped(Scope::Sites(vec!["s1".into()])).await;
    assert_eq!(
        (found, total),
        (with_undated(obs_set(|i| i.is_multiple_of(3))), Some(11))
    );
    let (found, total) = scoped(Scope::Sites(vec!["s1".into(), "s2".into()])).await;
    assert_eq!(
        (found, total),
        (with_undated(obs_set(|i| i % 3 != 2)), Some(21))
    );
    let (found, total) = scoped(Scope::Sites(vec![])).await;
    assert_eq!((found, total), (set(&[UNDATED]), Some(1)));
    let (found, total) = scoped(Scope::Patient("pb".into())).await;
    assert_eq!(
        (found, total),
        (with_undated(obs_set(|i| i % 3 == 1)), Some(11))
    );

    let patients = |scope| async move { ids(s, query("Patient", vec![]), scope).await };
    assert_eq!(patients(Scope::Sites(vec!["s2".into()])).await, vec!["pb"]);
    assert_eq!(patients(Scope::Patient("pc".into())).await, vec!["pc"]);
    assert_eq!(
        ids(
            s,
            query("Organization", vec![]),
            Scope::Patient("pc".into())
        )
        .await,
        vec!["s1"]
    );

    // Moving pa to site s2 moves its data with it.
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![enrolment("rs-a", "pa", "s2", Expect::Version(1))],
        audit: vec![],
    })
    .await
    .unwrap();
    assert_eq!(s.patient_site("pa").await.unwrap().as_deref(), Some("s2"));
    let (found, _) = scoped(Scope::Sites(vec!["s1".into()])).await;
    assert_eq!(found, set(&[UNDATED]));
    let (found, _) = scoped(Scope::Sites(vec!["s2".into()])).await;
    assert_eq!(found, with_undated(obs_set(|i| i % 3 != 2)));
}

async fn identifiers_and_patient_sites(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    assert_eq!(
        s.find_by_identifier("Patient", Some(MRN), "MRN-B")
            .await
            .unwrap(),
        vec!["pb"]
    );
    assert_eq!(
        s.find_by_identifier("Patient", None, "MRN-B")
            .await
            .unwrap(),
        vec!["pb"]
    );
    assert!(s
        .find_by_identifier("Patient", Some("urn:x"), "MRN-B")
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .find_by_identifier("Observation", None, "MRN-B")
        .await
        .unwrap()
        .is_empty());
    // Two resources with one identifier: both found (at most two).
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![
            patient("pb2", "Albert", "MRN-B"),
            patient("pb3", "Albert", "MRN-B"),
        ],
        audit: vec![],
    })
    .await
    .unwrap();
    assert_eq!(
        s.find_by_identifier("Patient", Some(MRN), "MRN-B")
            .await
            .unwrap()
            .len(),
        2
    );
    // A deleted resource is not found.
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![write_op(
            "Patient",
            "pa",
            Expect::Version(1),
            T1,
            None,
            Extracted::default(),
        )],
        audit: vec![],
    })
    .await
    .unwrap();
    assert!(s
        .find_by_identifier("Patient", Some(MRN), "MRN-A")
        .await
        .unwrap()
        .is_empty());
    // The first live key of each group, in one call: a deleted resource
    // (pa, MRN-A), another type, another system and no key at all are
    // passed over.
    let key = |rtype: &str, value: &str| (rtype.to_string(), value.to_string());
    assert_eq!(
        s.find_first_by_identifier_each(
            MRN,
            vec![
                vec![key("Patient", "MRN-A"), key("Patient", "MRN-C")],
                vec![key("Observation", "MRN-C"), key("Patient", "MRN-X")],
                vec![],
                vec![key("Patient", "MRN-C")],
            ],
        )
        .await
        .unwrap(),
        vec![
            Some((1, "pc".to_string())),
            None,
            None,
            Some((0, "pc".to_string()))
        ]
    );
    assert_eq!(
        s.find_first_by_identifier_each("urn:x", vec![vec![key("Patient", "MRN-C")]])
            .await
            .unwrap(),
        vec![None]
    );

    assert_eq!(s.patient_site("pa").await.unwrap().as_deref(), Some("s1"));
    assert_eq!(s.patient_site("pb").await.unwrap().as_deref(), Some("s2"));
    assert_eq!(s.patient_site("pc").await.unwrap(), None);
    // The last enrolment in one request wins.
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![
            enrolment("rs-c1", "pc", "s1", Expect::Absent),
            enrolment("rs-c2", "pc", "s3", Expect::Absent),
        ],
        audit: vec![],
    })
    .await
    .unwrap();
    assert_eq!(s.patient_site("pc").await.unwrap().as_deref(), Some("s3"));
}

async fn tokens_are_created_found_and_revoked(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let tok = |id: &str, created: i64| TokenRecord {
        id: id.to_string(),
        name: format!("{id}-name"),
        role: "site".to_string(),
        site: Some("s1".to_string()),
        patient: None,
        created,
        expires: Some(created + DAY),
        revoked: false,
    };
    let made = vec![audit_rec("admin", "token-create", "Token", "t2", T0)];
    s.create_token(tok("t2", T0 + 1), "hash-2".into(), made)
        .await
        .unwrap();
    s.create_token(tok("t1", T0), "hash-1".into(), vec![])
        .await
        .unwrap();
    let mut patient_token = tok("t3", T0 + 1);
    patient_token.patient = Some("pa".into());
    patient_token.site = None;
    patient_token.expires = None;
    s.create_token(patient_token.clone(), "hash-3".into(), vec![])
        .await
        .unwrap();
    // The same secret twice is refused.
    assert!(s
        .create_token(tok("t4", T0), "hash-1".into(), vec![])
        .await
        .is_err());

    assert_eq!(
        s.token_by_hash("hash-2").await.unwrap(),
        Some(tok("t2", T0 + 1))
    );
    assert_eq!(
        s.token_by_hash("hash-3").await.unwrap(),
        Some(patient_token.clone())
    );
    assert_eq!(s.token_by_hash("nope").await.unwrap(), None);
    let listed: Vec<String> = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, vec!["t1", "t2", "t3"]);

    let revoked = vec![audit_rec("admin", "token-revoke", "Token", "t2", T0 + 5)];
    assert!(s.revoke_token("t2", revoked).await.unwrap());
    assert!(!s.revoke_token("missing", vec![]).await.unwrap());
    assert!(s.token_by_hash("hash-2").await.unwrap().unwrap().revoked);
    assert!(!s.token_by_hash("hash-1").await.unwrap().unwrap().revoked);

    let trail = s
        .audit_records(AuditQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = trail.iter().map(|a| a.record.action.as_str()).collect();
    assert_eq!(actions, vec!["token-create", "token-revoke"]);
}

async fn trial_versions_are_kept(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let trial = |id: &str, version: u32| TrialRecord {
        id: id.to_string(),
        version,
        protocol: format!(r#"{{"id":"{id}","version":{version}}}"#),
        loaded_at: T0 + i64::from(version),
    };
    assert!(s.put_trial(trial("hyper", 1)).await.unwrap());
    assert!(
        !s.put_trial(trial("hyper", 1)).await.unwrap(),
        "a version is loaded once"
    );
    assert!(s.put_trial(trial("hyper", 2)).await.unwrap());
    assert!(s.put_trial(trial("alpha", u32::MAX)).await.unwrap());
    assert_eq!(
        s.trial_versions("hyper").await.unwrap(),
        vec![trial("hyper", 2), trial("hyper", 1)]
    );
    assert!(s.trial_versions("none").await.unwrap().is_empty());
    assert_eq!(
        s.list_trials().await.unwrap(),
        vec![trial("alpha", u32::MAX), trial("hyper", 2)]
    );
}

async fn audit_records_are_chained_and_filtered(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    assert_eq!(s.verify_audit().await.unwrap(), Ok(0));
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![patient("pa", "Alice", "MRN-A")],
        audit: vec![audit_rec("alice", "create", "Patient", "pa", T0)],
    })
    .await
    .unwrap();
    // Read audits ride along the next commit; flush waits for it.
    let mut read = audit_rec("bob", "read", "Patient", "pa", T0 + 10);
    read.reason = Some("monitoring \u{1f} visit".into());
    read.detail = Some("ids=pa".into());
    read.version = None;
    s.audit(vec![read.clone()]).await.unwrap();
    s.audit(vec![
        audit_rec("bob", "search", "Observation", "-", T0 + 20),
        audit_rec("carol", "read", "Patient", "pb", T0 + 30),
    ])
    .await
    .unwrap();
    s.flush().await.unwrap();

    let all = s
        .audit_records(AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|a| a.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(all[0].prev_hash, audit::GENESIS);
    assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    // Records queued separately may commit in either order on PostgreSQL
    // (several writers); each is there once, with its fields intact.
    assert_eq!(all.iter().filter(|a| a.record == read).count(), 1);
    assert_eq!(s.verify_audit().await.unwrap(), Ok(4));

    let seqs = |q: AuditQuery| async move {
        s.audit_records(AuditQuery { limit: 100, ..q })
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.seq)
            .collect::<Vec<_>>()
    };
    // The expected answer of each filter is the full trail filtered here, in
    // chain order (which records land first may vary between engines).
    let expect = |keep: &dyn Fn(&AuditRecord) -> bool| {
        all.iter()
            .filter(|a| keep(&a.record))
            .map(|a| a.seq)
            .collect::<Vec<_>>()
    };
    let by_bob = expect(&|r| r.actor == "bob");
    assert_eq!(by_bob.len(), 2);
    assert_eq!(
        seqs(AuditQuery {
            actor: Some("bob".into()),
            ..Default::default()
        })
        .await,
        by_bob
    );
    let of_pa = expect(&|r| {
        r.resource_type.as_deref() == Some("Patient") && r.resource_id.as_deref() == Some("pa")
    });
    assert_eq!(of_pa.len(), 2);
    assert_eq!(
        seqs(AuditQuery {
            entity: Some("Patient/pa".into()),
            ..Default::default()
        })
        .await,
        of_pa
    );
    let of_patients = expect(&|r| r.resource_type.as_deref() == Some("Patient"));
    assert_eq!(of_patients.len(), 3);
    assert_eq!(
        seqs(AuditQuery {
            entity: Some("Patient".into()),
            ..Default::default()
        })
        .await,
        of_patients
    );
    let in_window = expect(&|r| (T0 + 10..=T0 + 20).contains(&r.time));
    assert_eq!(in_window.len(), 2);
    assert_eq!(
        seqs(AuditQuery {
            since: Some(T0 + 10),
            until: Some(T0 + 20),
            ..Default::default()
        })
        .await,
        in_window
    );
    let page = s
        .audit_records(AuditQuery {
            after_seq: Some(1),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![2, 3]);

    // The trail refuses changes while its protection is on, and a refused
    // change does not disturb the writer.
    assert!(s
        .execute_raw("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        .await
        .is_err());
    assert!(s
        .execute_raw("DELETE FROM audit_log WHERE seq = 1")
        .await
        .is_err());
    s.audit(vec![audit_rec("dave", "read", "Patient", "pa", T0 + 40)])
        .await
        .unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.verify_audit().await.unwrap(), Ok(5));
}

/// A store with a trail of `n` records.
async fn with_trail(engine: Engine, n: usize) -> TestDb {
    let db = TestDb::open(engine).await;
    let records = (0..n)
        .map(|i| {
            audit_rec(
                &format!("actor-{i}"),
                "read",
                "Patient",
                "pa",
                T0 + i as i64,
            )
        })
        .collect();
    db.store.audit(records).await.unwrap();
    db.store.flush().await.unwrap();
    assert_eq!(db.store.verify_audit().await.unwrap(), Ok(n as u64));
    db.store
        .execute_raw(db.drop_audit_triggers())
        .await
        .expect("dropping the triggers");
    db
}

async fn a_tampered_audit_trail_is_detected(engine: Engine) {
    // A changed record.
    let db = with_trail(engine, 5).await;
    db.store
        .execute_raw("UPDATE audit_log SET outcome = 'denied' WHERE seq = 3")
        .await
        .unwrap();
    assert_eq!(
        db.store.verify_audit().await.unwrap(),
        Err(ChainBreak::Altered { seq: 3 })
    );
    drop(db);

    // A removed record.
    let db = with_trail(engine, 5).await;
    db.store
        .execute_raw("DELETE FROM audit_log WHERE seq = 2")
        .await
        .unwrap();
    assert_eq!(
        db.store.verify_audit().await.unwrap(),
        Err(ChainBreak::Removed { after: 1, next: 3 })
    );
    drop(db);

    // A forged record appended with a valid hash of its own but a made-up
    // link to the record before it.
    let db = with_trail(engine, 5).await;
    let forged = audit_rec("mallory", "read", "Patient", "pz", T0 + 99);
    let fake_prev = "f".repeat(64);
    let hash = audit::hash(6, &fake_prev, &forged);
    db.store
        .execute_raw(&format!(
            "INSERT INTO audit_log (seq, time, actor, role, action, rtype, rid, vid, reason, outcome, client, detail, prev_hash, hash) \
             VALUES (6, {}, 'mallory', 'admin', 'read', 'Patient', 'pz', 1, NULL, 'success', '127.0.0.1', NULL, '{fake_prev}', '{hash}')",
            T0 + 99
        ))
        .await
        .unwrap();
    assert_eq!(
        db.store.verify_audit().await.unwrap(),
        Err(ChainBreak::Inserted { seq: 6 })
    );
    // The writer goes on appending after the forged record.
    db.store
        .audit(vec![audit_rec("alice", "read", "Patient", "pa", T0 + 100)])
        .await
        .unwrap();
    db.store.flush().await.unwrap();
    let tail = db
        .store
        .audit_records(AuditQuery {
            after_seq: Some(6),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(tail.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![7]);
    assert_eq!(
        db.store.verify_audit().await.unwrap(),
        Err(ChainBreak::Inserted { seq: 6 })
    );
}

/// The head row also catches records cut from the end of the trail, which
/// the chain alone cannot show.
async fn records_cut_from_the_end_are_detected(engine: Engine) {
    let db = with_trail(engine, 5).await;
    db.store
        .execute_raw("DELETE FROM audit_log WHERE seq >= 4")
        .await
        .unwrap();
    let cut = Err(ChainBreak::Removed { after: 3, next: 6 });
    assert_eq!(db.store.verify_audit().await.unwrap(), cut);
    // Later records chain after the head, so the gap stays visible.
    db.store
        .audit(vec![audit_rec("alice", "read", "Patient", "pa", T0 + 100)])
        .await
        .unwrap();
    db.store.flush().await.unwrap();
    assert_eq!(db.store.verify_audit().await.unwrap(), cut);
}

/// PostgreSQL only: two processes (here two stores) opening one schema
/// together migrate it once, and their appends keep one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_stores_share_one_schema_and_one_chain() {
    let (base, schema, url) = pg_place();
    let (a, b) = tokio::join!(Store::open(&url), Store::open(&url));
    let a = a.unwrap_or_else(|e| pg_unreachable(e));
    let db = TestDb {
        store: a,
        engine: Engine::Postgres,
        _dir: None,
        pg_schema: Some((base, schema)),
    };
    let b = b.expect("the second store opens the same schema");
    let mut handles = Vec::new();
    for (n, store) in [db.store.clone(), b.clone()].into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            for k in 0..20 {
                let id = format!("s{n}-{k}");
                let mut op = observation(k);
                op.id = id.clone();
                store
                    .write(WriteRequest {
                        queries: Vec::new(),
                        ops: vec![op],
                        audit: vec![audit_rec("ingest", "create", "Observation", &id, T1)],
                    })
                    .await
                    .expect("a write");
                store
                    .audit(vec![audit_rec("reader", "read", "Observation", &id, T1)])
                    .await
                    .expect("a read audit");
            }
            store.flush().await.expect("flush");
        }));
    }
    for h in handles {
        h.await.expect("a writer task");
    }
    assert_eq!(db.store.verify_audit().await.unwrap(), Ok(80));
    assert_eq!(b.verify_audit().await.unwrap(), Ok(80));
    assert!(b
        .read_current("Observation", "s0-3")
        .await
        .unwrap()
        .is_some());
    assert!(db
        .store
        .read_current("Observation", "s1-3")
        .await
        .unwrap()
        .is_some());
}

fn new_batch(id: &str, format: &str, raw: &[u8]) -> NewBatch {
    use sha2::Digest;
    NewBatch {
        id: id.to_string(),
        format: format.to_string(),
        sha256: hex::encode(sha2::Sha256::digest(raw)),
        submitter: "lab-interface".into(),
        role: "interface".into(),
        scope: IngestScope::All,
        received_at: T0,
        raw: raw.to_vec(),
    }
}

async fn ingest_batches_are_accepted_once_and_finished_once(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    // Bytes that are not UTF-8 are kept as they are.
    let raw: &[u8] = b"MSH|^~\\&|LIS\r\xff\x00garbage\n";
    let accept = audit_rec("lab-interface", "ingest-accept", "Batch", "b1", T0);
    let (first, created) = s
        .put_batch(new_batch("b1", "hl7v2", raw), vec![accept.clone()])
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.id, "b1");
    assert_eq!(first.status, BatchStatus::Processing);
    assert_eq!(first.counts, BatchCounts::default());
    assert_eq!(first.submitter, "lab-interface");
    assert_eq!(s.batch_input("b1").await.unwrap().as_deref(), Some(raw));

    // The same content again: the first batch, nothing new, no audit record.
    let (again, created) = s
        .put_batch(new_batch("b2", "hl7v2", raw), vec![accept.clone()])
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again, first);
    assert_eq!(s.batch("b2").await.unwrap(), None);
    assert_eq!(s.batch_input("b2").await.unwrap(), None);
    let accepted = s
        .audit_records(AuditQuery {
            actor: Some("lab-interface".into()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(accepted.len(), 1, "one audit record per accepted batch");
    // The same bytes in another format are another batch.
    let (other, created) = s
        .put_batch(new_batch("b3", "wearable-csv", raw), Vec::new())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(other.id, "b3");
    assert_eq!(
        s.unfinished_batches().await.unwrap(),
        vec!["b1".to_string(), "b3".to_string()]
    );

    let counts = BatchCounts {
        received: 3,
        stored: 1,
        rejected: 1,
        duplicates: 1,
        queries_opened: 2,
    };
    let rejections = vec![
        BatchRejection {
            index: 0,
            reason: "not an HL7 v2 message".into(),
            location: "line 1".into(),
        },
        BatchRejection {
            index: 2,
            reason: "out of range".into(),
            location: "OBX[2].5".into(),
        },
    ];
    assert!(s
        .finish_batch("b1", counts, rejections.clone())
        .await
        .unwrap());
    let done = s.batch("b1").await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Done);
    assert_eq!(done.counts, counts);
    assert_eq!(s.batch_rejections("b1").await.unwrap(), rejections);
    // Finishing twice (a resumed batch racing its first run) changes nothing.
    assert!(!s
        .finish_batch("b1", BatchCounts::default(), rejections.clone())
        .await
        .unwrap());
    assert_eq!(s.batch("b1").await.unwrap().unwrap().counts, counts);
    assert_eq!(s.batch_rejections("b1").await.unwrap(), rejections);
    assert!(!s.finish_batch("none", counts, Vec::new()).await.unwrap());
    assert_eq!(
        s.unfinished_batches().await.unwrap(),
        vec!["b3".to_string()]
    );
    assert!(s.batch_rejections("b3").await.unwrap().is_empty());
}

fn new_query(id: &str, site: &str, op: &WriteOp) -> NewDataQuery {
    NewDataQuery {
        id: id.to_string(),
        trial: "CARDIO-01".into(),
        site: site.to_string(),
        patient: "p1".into(),
        resource_type: op.resource_type.clone(),
        resource_id: op.id.clone(),
        measurement: "heart-rate".into(),
        value: "150".into(),
        unit: "/min".into(),
        soft_low: 40.0,
        soft_high: 140.5,
        location: "line 2, column value".into(),
        text: "heart-rate 150 /min is outside the expected range 40 to 140.5".into(),
        opened_at: T0,
        opened_by: "lab-interface".into(),
    }
}

async fn data_queries_commit_with_their_values_and_follow_their_lifecycle(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let (o1, o2) = (observation(1), observation(2));
    let (q1, q2) = (
        new_query("q1", "site-a", &o1),
        new_query("q2", "site-b", &o2),
    );
    s.write(WriteRequest {
        ops: vec![o1.clone()],
        audit: vec![],
        queries: vec![q1.clone()],
    })
    .await
    .unwrap();
    // A request that cannot commit (its value conflicts) leaves no query.
    let conflict = s
        .write(WriteRequest {
            ops: vec![o1.clone()],
            audit: vec![],
            queries: vec![new_query("q-lost", "site-a", &o1)],
        })
        .await;
    assert!(
        matches!(conflict, Err(WriteError::Conflict { .. })),
        "{conflict:?}"
    );
    assert_eq!(s.data_query("q-lost").await.unwrap(), None);
    s.write(WriteRequest {
        ops: vec![o2],
        audit: vec![],
        queries: vec![q2.clone()],
    })
    .await
    .unwrap();

    let got = s.data_query("q1").await.unwrap().expect("q1 is stored");
    assert_eq!(got.query, q1);
    assert_eq!(got.status, QueryStatus::Open);
    assert_eq!(
        (got.answer, got.answered_at, got.closed_at),
        (None, None, None)
    );
    let all = |site: Option<&str>, status: Option<QueryStatus>| QueryFilter {
        site: site.map(str::to_string),
        status,
        after: None,
        limit: 10,
    };
    let ids = |v: Vec<DataQueryRecord>| v.into_iter().map(|q| q.query.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.data_queries(all(None, None)).await.unwrap()),
        ["q1", "q2"]
    );
    assert_eq!(
        ids(s.data_queries(all(Some("site-b"), None)).await.unwrap()),
        ["q2"]
    );
    let page = QueryFilter {
        after: Some("q1".into()),
        limit: 1,
        ..all(None, None)
    };
    assert_eq!(ids(s.data_queries(page).await.unwrap()), ["q2"]);

    // open -> answered -> closed, each step with its audit record.
    let step = |action: &str| audit_rec("site-a-user", action, "DataQuery", "q1", T0 + 1);
    let answer = QueryChange::Answer("climbed stairs".into());
    assert!(s
        .change_query(
            "q1",
            answer.clone(),
            "site-a-user",
            T0 + 1,
            vec![step("query-answer")]
        )
        .await
        .unwrap());
    // Refused steps change nothing and record nothing.
    assert!(!s
        .change_query(
            "q1",
            answer,
            "site-a-user",
            T0 + 2,
            vec![step("query-answer")]
        )
        .await
        .unwrap());
    assert!(!s
        .change_query(
            "none",
            QueryChange::Close,
            "m",
            T0 + 2,
            vec![step("query-close")]
        )
        .await
        .unwrap());
    let answered = s.data_query("q1").await.unwrap().unwrap();
    assert_eq!(answered.status, QueryStatus::Answered);
    assert_eq!(answered.answer.as_deref(), Some("climbed stairs"));
    assert_eq!(answered.answered_at, Some(T0 + 1));
    assert_eq!(answered.answered_by.as_deref(), Some("site-a-user"));
    assert!(s
        .change_query(
            "q1",
            QueryChange::Close,
            "monitor",
            T0 + 3,
            vec![step("query-close")]
        )
        .await
        .unwrap());
    assert!(!s
        .change_query(
            "q1",
            QueryChange::Close,
            "monitor",
            T0 + 4,
            vec![step("query-close")]
        )
        .await
        .unwrap());
    let closed = s.data_query("q1").await.unwrap().unwrap();
    assert_eq!(closed.status, QueryStatus::Closed);
    assert_eq!(
        (closed.closed_at, closed.closed_by.as_deref()),
        (Some(T0 + 3), Some("monitor"))
    );
    assert_eq!(closed.answer.as_deref(), Some("climbed stairs"));
    // An open query closes directly.
    assert!(s
        .change_query("q2", QueryChange::Close, "monitor", T0 + 5, vec![])
        .await
        .unwrap());
    assert_eq!(
        ids(s
            .data_queries(all(None, Some(QueryStatus::Closed)))
            .await
            .unwrap()),
        ["q1", "q2"]
    );
    assert!(s
        .data_queries(all(None, Some(QueryStatus::Open)))
        .await
        .unwrap()
        .is_empty());
    let trail = s
        .audit_records(AuditQuery {
            entity: Some("DataQuery/q1".into()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<_> = trail.iter().map(|r| r.record.action.as_str()).collect();
    assert_eq!(actions, ["query-answer", "query-close"]);

    // Never deleted: the database itself refuses.
    assert!(s.execute_raw("DELETE FROM data_queries").await.is_err());
    assert_eq!(s.data_queries(all(None, None)).await.unwrap().len(), 2);
}

/// Observation `i` at `version` (1 creates it), coded `code`.
fn recoded(i: usize, version: u64, code: &str) -> WriteOp {
    let mut op = observation(i);
    if version > 1 {
        op.expect = Expect::Version(version - 1);
    }
    op.new_version = version;
    op.last_updated += version as i64;
    op.body = body("Observation", &obs_id(i), code);
    for e in &mut op.extracted.entries {
        if let IndexValue::Token { code: c, .. } = &mut e.value {
            *c = code.to_string();
        }
    }
    op.extracted.entries.push(token("status", None, code));
    op
}

async fn a_replaced_version_leaves_no_index_rows_behind(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    let write = |op: WriteOp| async move {
        s.write(WriteRequest {
            queries: Vec::new(),
            ops: vec![op],
            audit: vec![],
        })
        .await
        .expect("write")
    };
    let found = |code: &'static str| async move {
        let by_code = id_set(s, query("Observation", vec![loinc(code)])).await;
        let status = query(
            "Observation",
            vec![clause(
                "status",
                vec![Predicate::Token {
                    system: TokenSystem::None,
                    code: Some(code.to_string()),
                }],
            )],
        );
        (by_code, id_set(s, status).await)
    };
    let one = set(&[&obs_id(0)]);
    let none = BTreeSet::new();
    write(recoded(0, 1, SYSTOLIC)).await;
    assert_eq!(found(SYSTOLIC).await, (one.clone(), one.clone()));
    // Recoded: found by the new code only, for both of its tokens.
    write(recoded(0, 2, DIASTOLIC)).await;
    assert_eq!(found(SYSTOLIC).await, (none.clone(), none.clone()));
    assert_eq!(found(DIASTOLIC).await, (one.clone(), one.clone()));
    // A rejected update (stale version) removes nothing.
    let stale = recoded(0, 2, HEART_RATE);
    s.write(WriteRequest {
        queries: Vec::new(),
        ops: vec![stale],
        audit: vec![],
    })
    .await
    .expect_err("a stale version conflicts");
    assert_eq!(found(DIASTOLIC).await, (one.clone(), one.clone()));
    // Deleted, then written again under another code.
    let mut delete = recoded(0, 3, DIASTOLIC);
    delete.body = None;
    delete.extracted = Extracted::default();
    write(delete).await;
    assert_eq!(found(DIASTOLIC).await, (none.clone(), none.clone()));
    write(recoded(0, 4, HEART_RATE)).await;
    assert_eq!(found(HEART_RATE).await, (one.clone(), one.clone()));
    assert_eq!(found(DIASTOLIC).await, (none.clone(), none));
}

/// More rows per table than the writer puts in one multi-row insert (32),
/// and not a multiple of it; then a create and an update of one resource in
/// one request, whose update must replace the create's rows.
async fn a_large_request_indexes_every_row_of_every_resource(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    const N: usize = 101;
    let write = |ops: Vec<WriteOp>| async move {
        s.write(WriteRequest {
            queries: Vec::new(),
            ops,
            audit: vec![],
        })
        .await
        .expect("write")
    };
    write((100..100 + N).map(observation).collect()).await;
    let obs = |clauses| query("Observation", clauses);
    let of = |pred: &dyn Fn(usize) -> bool| -> BTreeSet<String> {
        (100..100 + N).filter(|i| pred(*i)).map(obs_id).collect()
    };
    assert_eq!(
        id_set(s, obs(vec![loinc(SYSTOLIC)])).await,
        of(&|i| i % 2 == 0)
    );
    assert_eq!(
        id_set(s, obs(vec![loinc(DIASTOLIC)])).await,
        of(&|i| i % 2 == 1)
    );
    let subject = clause(
        "subject",
        vec![Predicate::Reference {
            target_type: Some("Patient".into()),
            target_id: "pb".into(),
        }],
    );
    assert_eq!(id_set(s, obs(vec![subject])).await, of(&|i| i % 3 == 1));
    assert_eq!(
        id_set(s, obs(vec![quantity(Prefix::Ge, 150.0, None)])).await,
        of(&|i| i >= 150)
    );
    let (lo, hi) = (T0 + 60 * DAY, T0 + 61 * DAY - 1);
    assert_eq!(
        id_set(s, obs(vec![date(Prefix::Eq, lo, hi)])).await,
        of(&|i| i / 2 == 60)
    );

    let mut updated = recoded(7, 2, HEART_RATE);
    updated.expect = Expect::Version(1);
    write(vec![recoded(7, 1, SYSTOLIC), updated]).await;
    let one = set(&[&obs_id(7)]);
    let code_search = |code: &str| obs(vec![loinc(code)]);
    assert_eq!(id_set(s, code_search(HEART_RATE)).await, one);
    assert!(!id_set(s, code_search(SYSTOLIC)).await.contains(&obs_id(7)));
}

async fn an_ingest_batch_is_its_format_content_and_scope(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    // The same content under another scope is another batch, which keeps
    // its scope; under the same scope, the same batch.
    let raw = b"MSH|^~\\&|scoped\r";
    let mut scoped = new_batch("scoped-1", "hl7v2", raw);
    scoped.scope = IngestScope::Site("SITE-A".into());
    let (a, created) = s.put_batch(scoped.clone(), vec![]).await.unwrap();
    assert!(created);
    assert_eq!(a.scope, IngestScope::Site("SITE-A".into()));
    scoped.id = "scoped-2".into();
    let (again, created) = s.put_batch(scoped.clone(), vec![]).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, "scoped-1");
    scoped.id = "scoped-3".into();
    scoped.scope = IngestScope::Patient("p1".into());
    let (p, created) = s.put_batch(scoped.clone(), vec![]).await.unwrap();
    assert!(created);
    assert_eq!(
        s.batch(&p.id).await.unwrap().unwrap().scope,
        IngestScope::Patient("p1".into())
    );
    let (all, created) = s
        .put_batch(new_batch("scoped-4", "hl7v2", raw), vec![])
        .await
        .unwrap();
    assert!(created);
    assert_eq!(all.scope, IngestScope::All);
}

async fn compartment_pages_walk_a_patients_resources_and_stop_at_the_deadline(engine: Engine) {
    let db = TestDb::open(engine).await;
    let s = &db.store;
    seed(s).await;
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let expected: Vec<String> = (0..OBSERVATIONS)
        .filter(|i| PATIENTS[i % 3] == "pa")
        .map(obs_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Pages of 3 in id order, each after the last one's id, cover every
    // Observation of pa exactly once, with its date.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .compartment_page(
                CompartmentQuery {
                    patient: "pa".into(),
                    rtype: "Observation".into(),
                    since: None,
                    after: after.clone(),
                    limit: 3,
                },
                far,
            )
            .await
            .expect("a page");
        assert!(page.len() <= 3);
        for r in &page {
            assert_eq!(r.resource.patient.as_deref(), Some("pa"));
            assert!(r.date.is_some(), "dated");
            assert!(r
                .resource
                .body
                .as_deref()
                .is_some_and(|b| b.contains(&r.resource.id)));
        }
        after = page.last().map(|r| r.resource.id.clone());
        seen.extend(page.into_iter().map(|r| r.resource.id));
        if after.is_none() {
            break;
        }
    }
    assert_eq!(seen, expected);
    // `since` keeps what is dated at or after it.
    let since = T0 + 5 * DAY;
    let recent = s
        .compartment_page(
            CompartmentQuery {
                patient: "pa".into(),
                rtype: "Observation".into(),
                since: Some(since),
                after: None,
                limit: 100,
            },
            far,
        )
        .await
        .expect("a page");
    let want: Vec<String> = (0..OBSERVATIONS)
        .filter(|i| PATIENTS[i % 3] == "pa" && T0 + (*i as i64 / 2) * DAY >= since)
        .map(obs_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        recent
            .into_iter()
            .map(|r| r.resource.id)
            .collect::<Vec<_>>(),
        want
    );
    // A deadline already past: the read says so instead of answering.
    let r = s
        .compartment_page(
            CompartmentQuery {
                patient: "pa".into(),
                rtype: "Observation".into(),
                since: None,
                after: None,
                limit: 100,
            },
            tokio::time::Instant::now(),
        )
        .await;
    assert!(matches!(r, Err(ReadError::Deadline)), "{r:?}");
    // And the store still answers afterwards (the connection went back).
    s.ping().await.expect("ping after a stopped read");
}
