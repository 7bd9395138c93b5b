//! The PostgreSQL engine: for deployments that outgrow one file.
//!
//! Shape: one writer task per process owns a dedicated connection and
//! commits in groups (several requests per transaction, each inside its own
//! savepoint, so one failing request does not undo the others); reads go
//! through a bounded connection pool. The behaviour is the SQLite engine's
//! ([`crate::sqlite`]), which is the reference; the search SQL is shared
//! ([`crate::sql`]).
//!
//! The write path is built for bulk ingest: the rows of one request go in
//! with one multi-row statement per table (`INSERT ... SELECT FROM UNNEST`
//! of arrays), and the statements of a request are pipelined, so a request
//! of many resources costs a few round trips, not one per row.
//!
//! `?schema=NAME` in the URL (stripped before the driver sees it) makes every
//! connection work in that schema, creating it when needed: tests use one
//! fresh schema each.
//!
//! Invariant: a write request's reply is sent only after the transaction
//! holding it has committed.
//!
//! Invariant: audit appends, from any process, are serialised by the lock on
//! the single row of `audit_head`, taken last in the transaction that appends
//! and held until it commits.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::audit;
use crate::model::*;
use crate::sql::{self, Dialect, SqlValue};
use crate::sqlite::{push_audit_filters, AUDIT_SELECT, BATCH_SELECT, QUERY_SELECT};
use clinflow_fhir::IndexValue;

mod campaigns;
mod imaging;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("0001_init.sql")),
    (2, include_str!("0002_no_random_order_indexes.sql")),
    (3, include_str!("0003_ingest.sql")),
    (4, include_str!("0004_data_queries.sql")),
    (5, include_str!("0005_batch_scope.sql")),
    (6, include_str!("0006_site_notify.sql")),
    (7, include_str!("0007_trial_notify.sql")),
    (8, include_str!("0008_campaigns.sql")),
    (9, include_str!("0009_imaging.sql")),
];
/// The channel of [`PgStore::site_changes`] (see migration 6).
const SITES_CHANNEL: &str = "clinflow_sites";

/// How many queued write requests one group commit takes at most.
const MAX_GROUP: usize = 64;
/// The writer's queue; senders wait when it is full (backpressure).
const QUEUE: usize = 256;
/// Read connections per process.
const POOL_SIZE: usize = 8;
/// The advisory lock that serialises migrations across processes
/// (`clinflow` in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6c69_6e66_6c6f;
/// Bounds on every wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT: Duration = Duration::from_secs(30);
/// The longest one group commit may take (lock waits included) before its
/// connection is given up and every request in it fails.
const GROUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A write other than resource versions, done by the writer in its own
/// savepoint. Replies with the number of rows it changed.
enum Op {
    CreateToken(TokenRecord, String),
    RevokeToken(String),
    PutTrial(TrialRecord),
    /// A new ingest batch and its raw input; a `Conflict` (which drops the
    /// job's audit records) when that content is already a batch.
    PutBatch(NewBatch),
    /// A batch's outcome; 0 rows when it was not processing.
    FinishBatch(String, BatchCounts, Vec<BatchRejection>),
    /// A done batch back to processing, its rejections cleared; a
    /// `Conflict` (which drops the job's audit records) when it is not done.
    ReopenBatch(String),
    /// Item `u64` of a done batch run again; a `Conflict` when the batch is
    /// not done or has no rejection of that item.
    RetryItem(String, u64, RetriedFate, Vec<BatchRejection>),
    /// A data query's lifecycle step (who, when); a `Conflict` (which
    /// drops the job's audit records) when its status does not allow it.
    ChangeQuery(String, QueryChange, String, i64),
    /// A campaign action (create, cancel, opt-out).
    Campaign(campaigns::CampaignOp),
    /// An imaging write (store an instance, retry a task).
    Imaging(imaging::ImagingOp),
    /// Raw SQL (tests that tamper with the database).
    Raw(String),
}

enum Job {
    Write(WriteRequest, oneshot::Sender<Result<(), WriteError>>),
    /// Read-audit records: group-committed, nobody waits for them.
    Audit(Vec<AuditRecord>),
    /// Any other write, with its audit records.
    Op(Op, Vec<AuditRecord>, oneshot::Sender<anyhow::Result<u64>>),
    /// Replies once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    writer: mpsc::Sender<Job>,
    /// How to connect (the listener of [`PgStore::site_changes`] makes its own).
    config: Arc<tokio_postgres::Config>,
    /// Read connections; each keeps its own prepared-statement cache.
    pool: Pool,
    /// Held (shared) by each writer from the moment it takes a group off the
    /// queue until that group is committed; `flush` takes it exclusively, so
    /// it returns only once every group dequeued before its own is committed.
    in_flight: Arc<tokio::sync::RwLock<()>>,
}

/// Writer tasks, each with its own connection, sharing one queue. PostgreSQL
/// runs their transactions in parallel (one backend each: with one writer,
/// its backend was the bottleneck at ~one core); appends to the audit chain
/// stay serialised by the `audit_head` row lock each takes last.
const WRITERS: usize = 3;

/// The driver's configuration and the schema to work in, from a
/// `postgres://` URL with an optional `schema=NAME` query parameter.
fn parse_url(url: &str) -> anyhow::Result<(tokio_postgres::Config, Option<String>)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut schema = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("schema=") {
            Some(s) => schema = Some(s.to_string()),
            None => rest.push(pair),
        }
    }
    let driver_url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    // The URL may hold a password: it is never put in an error message.
    let mut config: tokio_postgres::Config = driver_url
        .parse()
        .map_err(|e| anyhow!("the PostgreSQL URL is not valid: {e}"))?;
    if let Some(s) = &schema {
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit();
        if !valid {
            bail!("schema {s:?} in the PostgreSQL URL: use 1 to 63 of a-z, 0-9 and '_', not starting with a digit");
        }
        let opt = format!("-csearch_path={s}");
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {opt}"),
            _ => opt,
        };
        config.options(options);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("clinflow");
    }
    Ok((config, schema))
}

async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<Client> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "a PostgreSQL connection ended with an error");
        }
    });
    Ok(client)
}

/// One listening connection's life: LISTEN, then a signal on `tx` per
/// notification of this schema, until the connection or `tx` closes.
async fn listen(config: &tokio_postgres::Config, tx: &mpsc::Sender<()>) -> anyhow::Result<()> {
    let (client, mut conn) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| anyhow!("connecting to PostgreSQL timed out"))??;
    let (note_tx, mut notes) = mpsc::channel::<String>(16);
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    // Full: a signal is already pending, which covers this one.
                    let _ = note_tx.try_send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow::Error::from(e)),
            }
        }
        Ok(())
    });
    let schema: String = client
        .query_one("SELECT current_schema()::TEXT", &[])
        .await?
        .try_get(0)?;
    client
        .batch_execute(&format!("LISTEN {SITES_CHANNEL}"))
        .await?;
    // Listening from now on; anything committed before (since the
    // snapshot the caller built, or while disconnected) is caught up by one
    // signal.
    let _ = tx.try_send(());
    loop {
        tokio::select! {
            n = notes.recv() => match n {
                Some(payload) if payload == schema => { let _ = tx.try_send(()); }
                Some(_) => {}
                None => break,
            },
            () = tx.closed() => break,
        }
    }
    drop(client);
    driver
        .await
        .map_err(|e| anyhow!("the listener task failed: {e}"))?
}

async fn migrate(client: &mut Client, schema: Option<&str>) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    // Two processes starting together: the second waits here, then finds
    // the migrations applied.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    if let Some(s) = schema {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{s}\""))
            .await?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied BIGINT NOT NULL)",
    )
    .await?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES ($1, $2)",
                &[version, &crate::now_millis()],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

impl PgStore {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB[?schema=NAME]`, no
    /// TLS), applies the migrations and starts the writer.
    pub async fn open(url: &str) -> anyhow::Result<PgStore> {
        let (config, schema) = parse_url(url)?;
        let mut client = connect(&config).await?;
        migrate(&mut client, schema.as_deref())
            .await
            .context("migrating the PostgreSQL schema")?;
        let stmts = Stmts::prepare(&client).await?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .context("building the PostgreSQL pool")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let in_flight = Arc::new(tokio::sync::RwLock::new(()));
        let mut first = Some((client, stmts));
        for _ in 0..WRITERS {
            let conn = match first.take() {
                Some(c) => c,
                None => {
                    let client = connect(&config).await?;
                    let stmts = Stmts::prepare(&client).await?;
                    (client, stmts)
                }
            };
            let writer = Writer {
                config: config.clone(),
                conn: Some(conn),
            };
            tokio::spawn(writer.run(rx.clone(), in_flight.clone()));
        }
        Ok(PgStore {
            writer: tx,
            pool,
            in_flight,
            config: Arc::new(config),
        })
    }

    /// A signal per committed change of a site or a trial, by any process
    /// on this database and schema (LISTEN/NOTIFY). A dedicated connection
    /// listens; when it breaks, it is made again after a pause, and one
    /// signal is sent each time listening starts, since changes committed
    /// before may have been missed. Ends when the receiver is dropped.
    pub fn site_changes(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let config = self.config.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                if let Err(e) = listen(&config, &tx).await {
                    tracing::warn!(error = %e, "listening for site changes failed; listening again in 5 s");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = tx.closed() => break,
                }
            }
        });
        rx
    }

    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .context("getting a PostgreSQL connection")
    }

    /// Commits a write request (with its audit records) atomically.
    pub async fn write(&self, req: WriteRequest) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Write(req, tx))
            .await
            .map_err(|_| WriteError::Closed)?;
        rx.await.map_err(|_| WriteError::Closed)?
    }

    /// Queues read-audit records for the next group commit.
    pub async fn audit(&self, records: Vec<AuditRecord>) -> anyhow::Result<()> {
        self.writer
            .send(Job::Audit(records))
            .await
            .map_err(|_| anyhow!("store closed"))
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Flush(tx))
            .await
            .map_err(|_| anyhow!("store closed"))?;
        rx.await.map_err(|_| anyhow!("store closed"))?;
        // Groups other writers took off the queue before the flush job.
        drop(self.in_flight.write().await);
        Ok(())
    }

    async fn op(&self, op: Op, audit: Vec<AuditRecord>) -> anyhow::Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Op(op, audit, tx))
            .await
            .map_err(|_| anyhow!("store closed"))?;
        rx.await.map_err(|_| anyhow!("store closed"))?
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn read_current(
        &self,
        rtype: &str,
        id: &str,
    ) -> anyhow::Result<Option<StoredResource>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT r.vid, r.last_updated, r.deleted, r.patient, v.body FROM resources r JOIN resource_versions v ON v.rtype = r.rtype AND v.id = r.id AND v.vid = r.vid WHERE r.rtype = $1 AND r.id = $2",
            )
            .await?;
        c.query_opt(&st, &[&rtype, &id])
            .await?
            .map(|row| version_row(rtype, id, &row))
            .transpose()
    }

    pub async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        vid: u64,
    ) -> anyhow::Result<Option<StoredResource>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT v.vid, v.last_updated, v.deleted, r.patient, v.body FROM resource_versions v JOIN resources r ON r.rtype = v.rtype AND r.id = v.id WHERE v.rtype = $1 AND v.id = $2 AND v.vid = $3",
            )
            .await?;
        c.query_opt(&st, &[&rtype, &id, &(vid as i64)])
            .await?
            .map(|row| version_row(rtype, id, &row))
            .transpose()
    }

    /// Versions of one resource, newest first, at most `limit`, older than
    /// `before` when given.
    pub async fn history(
        &self,
        rtype: &str,
        id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<Vec<StoredResource>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT v.vid, v.last_updated, v.deleted, r.patient, v.body FROM resource_versions v JOIN resources r ON r.rtype = v.rtype AND r.id = v.id WHERE v.rtype = $1 AND v.id = $2 AND v.vid < $3 ORDER BY v.vid DESC LIMIT $4",
            )
            .await?;
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let limit = limit.min(i64::MAX as usize) as i64;
        c.query(&st, &[&rtype, &id, &before, &limit])
            .await?
            .iter()
            .map(|row| version_row(rtype, id, row))
            .collect()
    }

    pub async fn search(
        &self,
        q: clinflow_fhir::search::SearchQuery,
        scope: Scope,
    ) -> anyhow::Result<SearchPage> {
        let c = self.client().await?;
        let mut page = SearchPage::default();
        if q.total || q.count == 0 {
            let s = sql::search_count(Dialect::Postgres, &q, &scope);
            let n: i64 = c
                .query_typed_one(&s.text, &typed(&s.params))
                .await?
                .try_get(0)?;
            page.total = Some(n as u64);
        }
        if q.count > 0 {
            let s = sql::search_page(Dialect::Postgres, &q, &scope)?;
            let mut rows = run_rows(&c, &q.resource_type, &s).await?;
            if rows.len() > q.count {
                rows.truncate(q.count);
                if let Some((last, sort)) = rows.last() {
                    page.next_cursor = Some(
                        sql::Cursor {
                            sort_value: *sort,
                            id: last.id.clone(),
                        }
                        .encode(),
                    );
                }
            }
            page.matches = rows.into_iter().map(|(r, _)| r).collect();
            if q.include_subject && !page.matches.is_empty() {
                let ids: Vec<String> = page.matches.iter().map(|r| r.id.clone()).collect();
                let s = sql::include_targets(Dialect::Postgres, &q.resource_type, "subject", &ids);
                let mut by_type: std::collections::BTreeMap<String, Vec<String>> =
                    Default::default();
                for row in c.query_typed(&s.text, &typed(&s.params)).await? {
                    by_type
                        .entry(row.try_get(0)?)
                        .or_default()
                        .push(row.try_get(1)?);
                }
                for (t, ids) in by_type {
                    let s = sql::read_many(Dialect::Postgres, &t, &ids, &scope);
                    page.included
                        .extend(run_rows(&c, &t, &s).await?.into_iter().map(|(r, _)| r));
                }
            }
        }
        Ok(page)
    }

    /// Ids of `rtype` resources whose `identifier` is `system|value`.
    pub async fn find_by_identifier(
        &self,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> anyhow::Result<Vec<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT x.id FROM idx_token x JOIN resources r ON r.rtype = x.rtype AND r.id = x.id AND r.deleted = 0 WHERE x.rtype = $1 AND x.param = 'identifier' AND x.code = $2 AND ($3::TEXT IS NULL OR x.system = $3) LIMIT 2",
            )
            .await?;
        c.query(&st, &[&rtype, &value, &system])
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    pub async fn find_first_by_identifier_each(
        &self,
        system: &str,
        groups: Vec<Vec<(String, String)>>,
    ) -> anyhow::Result<Vec<Option<(usize, String)>>> {
        let n = groups.len();
        let (mut group, mut index) = (Vec::new(), Vec::new());
        let (mut rtypes, mut values) = (Vec::new(), Vec::new());
        for (g, keys) in groups.into_iter().enumerate() {
            for (i, (rtype, value)) in keys.into_iter().enumerate() {
                group.push(i64::try_from(g)?);
                index.push(i64::try_from(i)?);
                rtypes.push(rtype);
                values.push(value);
            }
        }
        let c = self.client().await?;
        // The keys drive the plan: one index probe each (LATERAL ... LIMIT
        // 1). As a plain join, statistics taken while the tables were small
        // (a fresh database under ingest) made the planner scan `resources`
        // whole and filter the keys for each row: one lookup of 1,100 keys
        // ran for over 45 s at 50k resources; this form takes ~7 ms.
        let st = c
            .prepare_cached(
                "SELECT DISTINCT ON (k.g) k.g, k.i, m.id FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[]) AS k(g, i, rtype, code) CROSS JOIN LATERAL (SELECT x.id FROM idx_token x JOIN resources r ON r.rtype = x.rtype AND r.id = x.id AND r.deleted = 0 WHERE x.rtype = k.rtype AND x.param = 'identifier' AND x.code = k.code AND x.system = $5 LIMIT 1) m ORDER BY k.g, k.i",
            )
            .await?;
        let mut found = vec![None; n];
        for row in c
            .query(&st, &[&group, &index, &rtypes, &values, &system])
            .await?
        {
            let g: i64 = row.try_get(0)?;
            let i: i64 = row.try_get(1)?;
            found[usize::try_from(g)?] = Some((usize::try_from(i)?, row.try_get(2)?));
        }
        Ok(found)
    }

    /// The site a patient is enrolled at.
    pub async fn current_resources(
        &self,
        rtype: &str,
        patient: Option<&str>,
        scope: Scope,
    ) -> anyhow::Result<Vec<StoredResource>> {
        let s = sql::current_all(Dialect::Postgres, rtype, patient, &scope);
        let c = self.client().await?;
        Ok(run_rows(&c, rtype, &s)
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    pub async fn compartment_page(
        &self,
        q: CompartmentQuery,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<DatedResource>, ReadError> {
        let s = sql::compartment_page(Dialect::Postgres, &q);
        let read = async {
            let mut guard = CancelOnDrop(Some(self.client().await?));
            let rows = match guard.0.as_ref() {
                Some(c) => run_rows(c, &q.rtype, &s).await,
                None => Err(anyhow::anyhow!("no connection")),
            };
            // Answered: the connection goes back to the pool as it is.
            drop(guard.0.take());
            rows
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(rows) => Ok(rows?.into_iter().map(|(r, d)| sql::dated(r, d)).collect()),
            Err(_) => Err(ReadError::Deadline),
        }
    }

    pub async fn patient_sites(&self) -> anyhow::Result<Vec<(String, String)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT patient, site FROM patient_sites")
            .await?;
        c.query(&st, &[])
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub async fn rejected_since(
        &self,
        since: i64,
        scope: Option<IngestScope>,
    ) -> anyhow::Result<u64> {
        let scope = scope.map(|s| s.to_column());
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT COALESCE(SUM(rejected), 0)::BIGINT FROM ingest_batches WHERE received_at >= $1 AND ($2::TEXT IS NULL OR scope = $2)")
            .await?;
        let n: i64 = c.query_one(&st, &[&since, &scope]).await?.try_get(0)?;
        Ok(n as u64)
    }

    pub async fn patient_site(&self, patient: &str) -> anyhow::Result<Option<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT site FROM patient_sites WHERE patient = $1")
            .await?;
        Ok(match c.query_opt(&st, &[&patient]).await? {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    // ---- tokens ----

    pub async fn create_token(
        &self,
        rec: TokenRecord,
        hash: String,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<()> {
        self.op(Op::CreateToken(rec, hash), audit).await.map(|_| ())
    }

    pub async fn token_by_hash(&self, hash: &str) -> anyhow::Result<Option<TokenRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT id, name, role, site, patient, created, expires, revoked FROM tokens WHERE hash = $1")
            .await?;
        c.query_opt(&st, &[&hash])
            .await?
            .as_ref()
            .map(token_row)
            .transpose()
    }

    pub async fn list_tokens(&self) -> anyhow::Result<Vec<TokenRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT id, name, role, site, patient, created, expires, revoked FROM tokens ORDER BY created, id",
            )
            .await?;
        c.query(&st, &[]).await?.iter().map(token_row).collect()
    }

    /// Revokes a token; `false` when there is none with that id.
    pub async fn revoke_token(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        Ok(self.op(Op::RevokeToken(id.to_string()), audit).await? > 0)
    }

    // ---- trials ----

    /// Records a protocol version; `false` when that version was already there.
    pub async fn put_trial(&self, rec: TrialRecord) -> anyhow::Result<bool> {
        Ok(self.op(Op::PutTrial(rec), Vec::new()).await? > 0)
    }

    /// Every version of a trial, newest first.
    pub async fn trial_versions(&self, id: &str) -> anyhow::Result<Vec<TrialRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT id, version, protocol, loaded_at FROM trials WHERE id = $1 ORDER BY version DESC")
            .await?;
        c.query(&st, &[&id]).await?.iter().map(trial_row).collect()
    }

    /// The newest version of every trial.
    pub async fn list_trials(&self) -> anyhow::Result<Vec<TrialRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT t.id, t.version, t.protocol, t.loaded_at FROM trials t WHERE t.version = (SELECT MAX(version) FROM trials u WHERE u.id = t.id) ORDER BY t.id",
            )
            .await?;
        c.query(&st, &[]).await?.iter().map(trial_row).collect()
    }

    // ---- ingest batches ----

    /// Accepts a batch (see [`crate::Store::put_batch`]).
    pub async fn put_batch(
        &self,
        b: NewBatch,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<(BatchRecord, bool)> {
        let (format, sha, scope) = (b.format.clone(), b.sha256.clone(), b.scope.to_column());
        let created = self.op_applied(Op::PutBatch(b), audit).await?;
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "{BATCH_SELECT} WHERE format = $1 AND sha256 = $2 AND scope = $3"
            ))
            .await?;
        let row = c
            .query_opt(&st, &[&format, &sha, &scope])
            .await?
            .ok_or_else(|| anyhow!("an accepted batch is not found"))?;
        Ok((batch_row(&row)?, created))
    }

    pub async fn batch(&self, id: &str) -> anyhow::Result<Option<BatchRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{BATCH_SELECT} WHERE id = $1"))
            .await?;
        c.query_opt(&st, &[&id])
            .await?
            .as_ref()
            .map(batch_row)
            .transpose()
    }

    pub async fn batch_input(&self, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT body FROM ingest_inputs WHERE batch = $1")
            .await?;
        Ok(match c.query_opt(&st, &[&id]).await? {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    pub async fn batch_rejections(&self, id: &str) -> anyhow::Result<Vec<BatchRejection>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT item, reason, location FROM ingest_rejections WHERE batch = $1 ORDER BY item, seq",
            )
            .await?;
        c.query(&st, &[&id])
            .await?
            .iter()
            .map(|r| {
                Ok(BatchRejection {
                    index: u64::try_from(r.try_get::<_, i64>(0)?)?,
                    reason: r.try_get(1)?,
                    location: r.try_get(2)?,
                })
            })
            .collect()
    }

    pub async fn finish_batch(
        &self,
        id: &str,
        counts: BatchCounts,
        rejections: Vec<BatchRejection>,
    ) -> anyhow::Result<bool> {
        Ok(self
            .op(
                Op::FinishBatch(id.to_string(), counts, rejections),
                Vec::new(),
            )
            .await?
            > 0)
    }

    pub async fn reopen_batch(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        self.op_applied(Op::ReopenBatch(id.to_string()), audit)
            .await
    }

    pub async fn retry_item(
        &self,
        batch: &str,
        index: u64,
        fate: RetriedFate,
        rejections: Vec<BatchRejection>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        self.op_applied(
            Op::RetryItem(batch.to_string(), index, fate, rejections),
            audit,
        )
        .await
    }

    /// Runs an op whose `Conflict` means "not applied" (its audit records
    /// dropped with it): `false` then, `true` when it committed.
    async fn op_applied(&self, op: Op, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        match self.op(op, audit).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.downcast_ref(), Some(WriteError::Conflict { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn unfinished_batches(&self) -> anyhow::Result<Vec<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT id FROM ingest_batches WHERE status = 'processing' ORDER BY id")
            .await?;
        c.query(&st, &[])
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    // ---- audit ----

    pub async fn audit_records(&self, q: AuditQuery) -> anyhow::Result<Vec<ChainedAudit>> {
        let mut s = sql::Sql::new(Dialect::Postgres);
        s.push(AUDIT_SELECT)
            .push(" WHERE seq > ")
            .int(q.after_seq.unwrap_or(0));
        push_audit_filters(&mut s, &q);
        s.push(" ORDER BY seq LIMIT ")
            .int(q.limit.min(i64::MAX as usize) as i64);
        let c = self.client().await?;
        c.query_typed(&s.text, &typed(&s.params))
            .await?
            .iter()
            .map(audit_row)
            .collect()
    }

    /// Reads the whole trail in order and checks the chain. Rows are
    /// streamed (the driver's buffer is bounded), so memory stays flat
    /// however long the trail is.
    ///
    /// Beyond the chain itself, the last record must be the one the head
    /// row names: records removed from the end are reported as
    /// [`audit::ChainBreak::Removed`] too. Both are read in one snapshot.
    pub async fn verify_audit(&self) -> anyhow::Result<Result<u64, audit::ChainBreak>> {
        let mut c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{AUDIT_SELECT} ORDER BY seq"))
            .await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let head: i64 = tx
            .query_one("SELECT seq FROM audit_head WHERE id = 1", &[])
            .await?
            .try_get(0)?;
        let no_params: [&(dyn ToSql + Sync); 0] = [];
        let mut rows = std::pin::pin!(tx.query_raw(&st, no_params).await?);
        let mut v = audit::Verifier::new();
        while let Some(row) = rows.next().await {
            let rec = audit_row(&row?)?;
            if let Err(b) = v.feed(&rec) {
                return Ok(Err(b));
            }
        }
        let last = v.head().map_or(0, |(seq, _)| *seq);
        if head > last {
            return Ok(Err(audit::ChainBreak::Removed {
                after: last,
                next: head + 1,
            }));
        }
        Ok(Ok(v.checked))
    }

    // ---- data queries ----

    pub async fn data_query(&self, id: &str) -> anyhow::Result<Option<DataQueryRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{QUERY_SELECT} WHERE id = $1"))
            .await?;
        c.query_opt(&st, &[&id])
            .await?
            .as_ref()
            .map(query_row)
            .transpose()
    }

    pub async fn data_queries(&self, f: QueryFilter) -> anyhow::Result<Vec<DataQueryRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "{QUERY_SELECT} WHERE ($1::TEXT IS NULL OR site = $1) AND ($2::TEXT IS NULL OR status = $2) AND id > $3 ORDER BY id LIMIT $4"
            ))
            .await?;
        let status = f.status.map(QueryStatus::as_str);
        let after = f.after.unwrap_or_default();
        let limit = i64::try_from(f.limit).unwrap_or(i64::MAX);
        c.query(&st, &[&f.site, &status, &after, &limit])
            .await?
            .iter()
            .map(query_row)
            .collect()
    }

    /// See [`crate::Store::change_query`].
    pub async fn change_query(
        &self,
        id: &str,
        change: QueryChange,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        self.op_applied(
            Op::ChangeQuery(id.to_string(), change, by.to_string(), at),
            audit,
        )
        .await
    }

    /// Runs raw SQL on the writer's connection, inside its transaction. For
    /// tests that play an attacker with direct database access.
    pub async fn execute_raw(&self, sql: &str) -> anyhow::Result<()> {
        self.op(Op::Raw(sql.to_string()), Vec::new())
            .await
            .map(|_| ())
    }
}

// ---- rows ----

/// The parameters of a built query with their PostgreSQL types, so that a
/// dynamic query costs one round trip and no cached statement.
fn typed(params: &[SqlValue]) -> Vec<(&(dyn ToSql + Sync), Type)> {
    params
        .iter()
        .map(|v| match v {
            SqlValue::Text(s) => (s as &(dyn ToSql + Sync), Type::TEXT),
            SqlValue::Int(i) => (i as &(dyn ToSql + Sync), Type::INT8),
            SqlValue::Real(f) => (f as &(dyn ToSql + Sync), Type::FLOAT8),
        })
        .collect()
}

/// `vid, last_updated, deleted, patient, body` of a version.
fn version_row(rtype: &str, id: &str, row: &Row) -> anyhow::Result<StoredResource> {
    Ok(StoredResource {
        resource_type: rtype.to_string(),
        id: id.to_string(),
        version: row.try_get::<_, i64>(0)? as u64,
        last_updated: row.try_get(1)?,
        deleted: row.try_get::<_, i64>(2)? != 0,
        patient: row.try_get(3)?,
        body: row.try_get(4)?,
    })
}

/// A row of [`sql::search_page`] or [`sql::read_many`], with its sort value
/// (a literal `0`, an INTEGER, when the order is by id).
fn stored_row(rtype: &str, row: &Row) -> anyhow::Result<(StoredResource, i64)> {
    let sort = if *row.columns()[4].type_() == Type::INT4 {
        i64::from(row.try_get::<_, i32>(4)?)
    } else {
        row.try_get(4)?
    };
    Ok((
        StoredResource {
            resource_type: rtype.to_string(),
            id: row.try_get(0)?,
            version: row.try_get::<_, i64>(1)? as u64,
            last_updated: row.try_get(2)?,
            patient: row.try_get(3)?,
            deleted: false,
            body: row.try_get(5)?,
        },
        sort,
    ))
}

async fn run_rows(
    c: &Client,
    rtype: &str,
    s: &sql::Sql,
) -> anyhow::Result<Vec<(StoredResource, i64)>> {
    c.query_typed(&s.text, &typed(&s.params))
        .await?
        .iter()
        .map(|r| stored_row(rtype, r))
        .collect()
}

fn audit_row(row: &Row) -> anyhow::Result<ChainedAudit> {
    Ok(ChainedAudit {
        seq: row.try_get(0)?,
        record: AuditRecord {
            time: row.try_get(1)?,
            actor: row.try_get(2)?,
            role: row.try_get(3)?,
            action: row.try_get(4)?,
            resource_type: row.try_get(5)?,
            resource_id: row.try_get(6)?,
            version: row.try_get::<_, Option<i64>>(7)?.map(|v| v as u64),
            reason: row.try_get(8)?,
            outcome: row.try_get(9)?,
            client: row.try_get(10)?,
            detail: row.try_get(11)?,
        },
        prev_hash: row.try_get(12)?,
        hash: row.try_get(13)?,
    })
}

fn token_row(row: &Row) -> anyhow::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        role: row.try_get(2)?,
        site: row.try_get(3)?,
        patient: row.try_get(4)?,
        created: row.try_get(5)?,
        expires: row.try_get(6)?,
        revoked: row.try_get::<_, i64>(7)? != 0,
    })
}

fn batch_row(row: &Row) -> anyhow::Result<BatchRecord> {
    let n = |i: usize| -> anyhow::Result<u64> { Ok(u64::try_from(row.try_get::<_, i64>(i)?)?) };
    Ok(BatchRecord {
        id: row.try_get(0)?,
        format: row.try_get(1)?,
        sha256: row.try_get(2)?,
        submitter: row.try_get(3)?,
        role: row.try_get(4)?,
        scope: IngestScope::from_column(row.try_get(12)?)?,
        received_at: row.try_get(5)?,
        status: BatchStatus::parse(row.try_get(6)?)?,
        counts: BatchCounts {
            received: n(7)?,
            stored: n(8)?,
            rejected: n(9)?,
            duplicates: n(10)?,
            queries_opened: n(11)?,
        },
    })
}

fn query_row(r: &Row) -> anyhow::Result<DataQueryRecord> {
    let status: &str = r.try_get(13)?;
    Ok(DataQueryRecord {
        query: NewDataQuery {
            id: r.try_get(0)?,
            trial: r.try_get(1)?,
            site: r.try_get(2)?,
            patient: r.try_get(3)?,
            resource_type: r.try_get(4)?,
            resource_id: r.try_get(5)?,
            measurement: r.try_get(6)?,
            value: r.try_get(7)?,
            unit: r.try_get(8)?,
            soft_low: r.try_get(9)?,
            soft_high: r.try_get(10)?,
            location: r.try_get(11)?,
            text: r.try_get(12)?,
            opened_at: r.try_get(15)?,
            opened_by: r.try_get(16)?,
        },
        status: QueryStatus::parse(status)
            .ok_or_else(|| anyhow!("unknown data query status {status:?}"))?,
        answer: r.try_get(14)?,
        answered_at: r.try_get(17)?,
        answered_by: r.try_get(18)?,
        closed_at: r.try_get(19)?,
        closed_by: r.try_get(20)?,
    })
}

fn trial_row(row: &Row) -> anyhow::Result<TrialRecord> {
    let version: i64 = row.try_get(1)?;
    Ok(TrialRecord {
        id: row.try_get(0)?,
        version: u32::try_from(version).context("a trial version out of range")?,
        protocol: row.try_get(2)?,
        loaded_at: row.try_get(3)?,
    })
}

// ---- the writer ----

const INDEX_TABLES: [&str; 5] = [
    "idx_token",
    "idx_string",
    "idx_date",
    "idx_reference",
    "idx_quantity",
];

/// The writer's statements, prepared once per connection.
struct Stmts {
    insert_resources: Statement,
    update_resource: Statement,
    current_vid: Statement,
    insert_versions: Statement,
    /// `DELETE FROM {table} WHERE rtype = $1 AND id = ANY($2)`, in
    /// [`INDEX_TABLES`] order.
    delete_index: Vec<Statement>,
    insert_token: Statement,
    insert_string: Statement,
    insert_date: Statement,
    insert_reference: Statement,
    insert_quantity: Statement,
    upsert_sites: Statement,
    lock_head: Statement,
    log_tail: Statement,
    insert_audit: Statement,
    update_head: Statement,
    insert_token_record: Statement,
    revoke_token: Statement,
    insert_trial: Statement,
}

impl Stmts {
    async fn prepare(c: &Client) -> anyhow::Result<Stmts> {
        let mut delete_index = Vec::with_capacity(INDEX_TABLES.len());
        for table in INDEX_TABLES {
            delete_index.push(
                c.prepare(&format!(
                    "DELETE FROM {table} WHERE rtype = $1 AND id = ANY($2::TEXT[])"
                ))
                .await?,
            );
        }
        Ok(Stmts {
            insert_resources: c
                .prepare(
                    "INSERT INTO resources (rtype, id, vid, last_updated, deleted, patient, sort_date) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[]) ON CONFLICT (rtype, id) DO NOTHING RETURNING rtype, id",
                )
                .await?,
            update_resource: c
                .prepare(
                    "UPDATE resources SET vid = $1, last_updated = $2, deleted = $3, patient = $4, sort_date = $5 WHERE rtype = $6 AND id = $7 AND vid = $8",
                )
                .await?,
            current_vid: c.prepare("SELECT vid FROM resources WHERE rtype = $1 AND id = $2").await?,
            insert_versions: c
                .prepare(
                    "INSERT INTO resource_versions (rtype, id, vid, last_updated, deleted, body) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::TEXT[])",
                )
                .await?,
            delete_index,
            insert_token: c
                .prepare(
                    "INSERT INTO idx_token (rtype, id, param, system, code) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) ON CONFLICT DO NOTHING",
                )
                .await?,
            insert_string: c
                .prepare(
                    "INSERT INTO idx_string (rtype, id, param, value) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) ON CONFLICT DO NOTHING",
                )
                .await?,
            insert_date: c
                .prepare(
                    "INSERT INTO idx_date (rtype, id, param, low, high) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[]) ON CONFLICT DO NOTHING",
                )
                .await?,
            insert_reference: c
                .prepare(
                    "INSERT INTO idx_reference (rtype, id, param, target_type, target_id) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) ON CONFLICT DO NOTHING",
                )
                .await?,
            insert_quantity: c
                .prepare(
                    "INSERT INTO idx_quantity (rtype, id, param, value, system, code) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::DOUBLE PRECISION[], $5::TEXT[], $6::TEXT[]) ON CONFLICT DO NOTHING",
                )
                .await?,
            upsert_sites: c
                .prepare(
                    "INSERT INTO patient_sites (patient, site) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]) ON CONFLICT (patient) DO UPDATE SET site = excluded.site",
                )
                .await?,
            lock_head: c.prepare("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE").await?,
            log_tail: c
                .prepare("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .await?,
            insert_audit: c
                .prepare(
                    "INSERT INTO audit_log (seq, time, actor, role, action, rtype, rid, vid, reason, outcome, client, detail, prev_hash, hash) SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[], $13::TEXT[], $14::TEXT[])",
                )
                .await?,
            update_head: c.prepare("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1").await?,
            insert_token_record: c
                .prepare(
                    "INSERT INTO tokens (id, name, role, site, patient, hash, created, expires, revoked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0)",
                )
                .await?,
            revoke_token: c.prepare("UPDATE tokens SET revoked = 1 WHERE id = $1").await?,
            insert_trial: c
                .prepare(
                    "INSERT INTO trials (id, version, protocol, loaded_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .await?,
        })
    }
}

/// The writer task's state: its connection, re-made when it breaks.
struct Writer {
    config: tokio_postgres::Config,
    conn: Option<(Client, Stmts)>,
}

enum Outcome {
    Write(
        oneshot::Sender<Result<(), WriteError>>,
        Result<(), WriteError>,
    ),
    Op(oneshot::Sender<anyhow::Result<u64>>, anyhow::Result<u64>),
    Flush(oneshot::Sender<()>),
}

impl Outcome {
    /// The outcome of a job the group did not get to: the group failed, so
    /// its reply will be the group's error.
    fn not_run(job: Job) -> Option<Outcome> {
        match job {
            Job::Write(_, reply) => Some(Outcome::Write(reply, Ok(()))),
            Job::Op(_, _, reply) => Some(Outcome::Op(reply, Ok(0))),
            Job::Flush(reply) => Some(Outcome::Flush(reply)),
            Job::Audit(_) => None,
        }
    }
}

impl Writer {
    async fn run(
        mut self,
        rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
        in_flight: Arc<tokio::sync::RwLock<()>>,
    ) {
        loop {
            // One writer at a time takes a group off the queue; it marks the
            // group in flight before letting the next writer take one.
            let (jobs, guard) = {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { break };
                // Read-audit jobs are small and do not count toward the
                // group's size; write requests do, so a transaction stays short.
                let mut writes = usize::from(!matches!(first, Job::Audit(_)));
                let mut jobs = vec![first];
                while writes < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(j) => {
                            writes += usize::from(!matches!(j, Job::Audit(_)));
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
                (jobs, in_flight.clone().read_owned().await)
            };
            self.commit_group(jobs).await;
            drop(guard);
        }
        tracing::debug!("postgres writer stopped: every sender is gone");
    }

    /// The connection, reconnecting when the last one broke.
    async fn connection(&mut self) -> anyhow::Result<(&Client, &Stmts)> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            tracing::warn!("the PostgreSQL writer connection is closed; reconnecting");
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = connect(&self.config).await?;
            let stmts = Stmts::prepare(&client).await?;
            self.conn = Some((client, stmts));
        }
        let (c, s) = self
            .conn
            .as_ref()
            .ok_or_else(|| anyhow!("no writer connection"))?;
        Ok((c, s))
    }

    async fn commit_group(&mut self, jobs: Vec<Job>) {
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter();
        let mut connection_lost = false;
        let result = match self.connection().await {
            Ok((c, st)) => {
                let r =
                    tokio::time::timeout(GROUP_TIMEOUT, run_group(c, st, &mut jobs, &mut outcomes))
                        .await
                        .unwrap_or_else(|_| {
                            Err(anyhow!("the group commit took over {GROUP_TIMEOUT:?}"))
                        });
                if r.is_err() {
                    // A connection that cannot even roll back within the
                    // bound is dropped: the server then aborts the
                    // transaction, and the next group reconnects.
                    connection_lost = !matches!(
                        tokio::time::timeout(CONNECT_TIMEOUT, c.batch_execute("ROLLBACK")).await,
                        Ok(Ok(()))
                    );
                }
                r
            }
            Err(e) => Err(e),
        };
        if connection_lost {
            self.conn = None;
        }
        outcomes.extend(jobs.filter_map(Outcome::not_run));
        if let Err(e) = &result {
            tracing::error!(error = %format!("{e:#}"), "group commit failed; every request in it fails");
        }
        for o in outcomes {
            match o {
                Outcome::Write(reply, r) => {
                    let r = match &result {
                        Ok(()) => r,
                        Err(e) => Err(WriteError::Db(anyhow!("commit failed: {e:#}"))),
                    };
                    let _ = reply.send(r);
                }
                Outcome::Op(reply, r) => {
                    let r = match &result {
                        Ok(()) => r,
                        Err(e) => Err(anyhow!("commit failed: {e:#}")),
                    };
                    let _ = reply.send(r);
                }
                Outcome::Flush(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    }
}

/// Runs the jobs in one transaction. An `Err` means the transaction is lost
/// (every job in it fails); a request that fails on its own is rolled back
/// to its savepoint and the others go on.
///
/// Each job's outcome is pushed before the job runs and filled in after, so
/// that every reply is still there when the group fails or is cancelled
/// midway.
async fn run_group(
    c: &Client,
    st: &Stmts,
    jobs: &mut std::vec::IntoIter<Job>,
    outcomes: &mut Vec<Outcome>,
) -> anyhow::Result<()> {
    c.batch_execute("BEGIN").await?;
    let mut audit_records = Vec::new();
    while let Some(job) = jobs.next() {
        match job {
            Job::Write(req, reply) => {
                // The write requests queued one after the other run as one.
                let mut run = vec![(req, reply)];
                while matches!(jobs.as_slice().first(), Some(Job::Write(..))) {
                    if let Some(Job::Write(req, reply)) = jobs.next() {
                        run.push((req, reply));
                    }
                }
                write_run(c, st, run, outcomes, &mut audit_records).await?;
            }
            Job::Op(op, audit, reply) => {
                outcomes.push(Outcome::Op(reply, Ok(0)));
                let r = apply_op(c, st, &op).await;
                let r = settle(c, r).await?;
                if r.is_ok() {
                    audit_records.extend(audit);
                }
                if let Some(Outcome::Op(_, slot)) = outcomes.last_mut() {
                    *slot = r.map_err(anyhow::Error::from);
                }
            }
            Job::Audit(records) => audit_records.extend(records),
            Job::Flush(reply) => outcomes.push(Outcome::Flush(reply)),
        }
    }
    if !audit_records.is_empty() {
        append_audit(c, st, audit_records)
            .await
            .context("appending to the audit trail")?;
    }
    c.batch_execute("COMMIT").await.context("committing")?;
    Ok(())
}

/// Applies consecutive write requests of a group. First all of them as one
/// (one savepoint, one statement per table: the server parses and plans a
/// statement once per group instead of once per request); when that fails
/// (a version conflict in any of them, rare), it is rolled back and each
/// request runs in its own savepoint, so that only the conflicting one
/// fails. The result is what running them one by one gives: `apply_ops`
/// applies a request's ops in order, and so the run's.
async fn write_run(
    c: &Client,
    st: &Stmts,
    run: Vec<(WriteRequest, oneshot::Sender<Result<(), WriteError>>)>,
    outcomes: &mut Vec<Outcome>,
    audit_records: &mut Vec<AuditRecord>,
) -> anyhow::Result<()> {
    let first = outcomes.len();
    let mut requests = Vec::with_capacity(run.len());
    for (req, reply) in run {
        outcomes.push(Outcome::Write(reply, Ok(())));
        requests.push(req);
    }
    if requests.len() > 1 {
        let all: Vec<&WriteOp> = requests.iter().flat_map(|r| r.ops.iter()).collect();
        let queries: Vec<&NewDataQuery> = requests.iter().flat_map(|r| r.queries.iter()).collect();
        let r = apply_ops(c, st, &all, &queries).await;
        if settle(c, r).await?.is_ok() {
            for req in requests {
                audit_records.extend(req.audit);
            }
            return Ok(());
        }
    }
    for (k, req) in requests.into_iter().enumerate() {
        if req.ops.is_empty() && req.queries.is_empty() {
            audit_records.extend(req.audit);
            continue;
        }
        let ops: Vec<&WriteOp> = req.ops.iter().collect();
        let queries: Vec<&NewDataQuery> = req.queries.iter().collect();
        let r = apply_ops(c, st, &ops, &queries).await;
        let r = settle(c, r).await?;
        if r.is_ok() {
            audit_records.extend(req.audit);
        }
        if let Some(Outcome::Write(_, slot)) = outcomes.get_mut(first + k) {
            *slot = r;
        }
    }
    Ok(())
}

/// After a request ran inside `SAVEPOINT req` (released on success): on
/// failure, undoes it. `Err` when even that failed: the transaction is lost.
async fn settle<T>(c: &Client, r: Result<T, WriteError>) -> anyhow::Result<Result<T, WriteError>> {
    if r.is_err() {
        c.batch_execute("ROLLBACK TO SAVEPOINT req; RELEASE SAVEPOINT req")
            .await
            .context("rolling a failed request back")?;
    }
    Ok(r)
}

fn db(e: tokio_postgres::Error) -> WriteError {
    WriteError::Db(e.into())
}

type PgFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Runs the statements pipelined (sent together, executed in order by the
/// server) and returns the first error, after every reply has come back.
async fn pipeline(futures: Vec<PgFuture<'_>>) -> Result<Vec<u64>, WriteError> {
    futures::future::join_all(futures)
        .await
        .into_iter()
        .map(|r| r.map_err(db))
        .collect()
}

/// Does a token, trial or raw-SQL write in its own savepoint.
async fn apply_op(c: &Client, st: &Stmts, op: &Op) -> Result<u64, WriteError> {
    c.batch_execute("SAVEPOINT req").await.map_err(db)?;
    let n = match op {
        Op::CreateToken(rec, hash) => {
            c.execute(
                &st.insert_token_record,
                &[
                    &rec.id,
                    &rec.name,
                    &rec.role,
                    &rec.site,
                    &rec.patient,
                    hash,
                    &rec.created,
                    &rec.expires,
                ],
            )
            .await
        }
        Op::RevokeToken(id) => c.execute(&st.revoke_token, &[id]).await,
        Op::PutTrial(rec) => {
            c.execute(
                &st.insert_trial,
                &[
                    &rec.id,
                    &i64::from(rec.version),
                    &rec.protocol,
                    &rec.loaded_at,
                ],
            )
            .await
        }
        Op::PutBatch(b) => {
            let n = c
                .execute(
                    "INSERT INTO ingest_batches (id, format, sha256, submitter, role, scope, received_at, status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'processing') ON CONFLICT DO NOTHING",
                    &[&b.id, &b.format, &b.sha256, &b.submitter, &b.role, &b.scope.to_column(), &b.received_at],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(WriteError::Conflict {
                    resource_type: "ingest batch".into(),
                    id: b.id.clone(),
                    expected: Expect::Absent,
                    found: None,
                });
            }
            c.execute(
                "INSERT INTO ingest_inputs (batch, sha256, body) VALUES ($1, $2, $3)",
                &[&b.id, &b.sha256, &b.raw],
            )
            .await
            .map(|_| n)
        }
        Op::FinishBatch(id, k, rejections) => {
            let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let n = c
                .execute(
                    "UPDATE ingest_batches SET status = 'done', received = $1, stored = $2, rejected = $3, duplicates = $4, queries_opened = $5, finished_at = $6 WHERE id = $7 AND status = 'processing'",
                    &[
                        &as_i64(k.received),
                        &as_i64(k.stored),
                        &as_i64(k.rejected),
                        &as_i64(k.duplicates),
                        &as_i64(k.queries_opened),
                        &crate::now_millis(),
                        id,
                    ],
                )
                .await
                .map_err(db)?;
            if n > 0 && !rejections.is_empty() {
                let seq: Vec<i64> = (0..rejections.len() as i64).collect();
                let item: Vec<i64> = rejections.iter().map(|r| as_i64(r.index)).collect();
                let reason: Vec<&str> = rejections.iter().map(|r| r.reason.as_str()).collect();
                let location: Vec<&str> = rejections.iter().map(|r| r.location.as_str()).collect();
                c.execute(
                    "INSERT INTO ingest_rejections (batch, seq, item, reason, location) SELECT $1, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[])",
                    &[id, &seq, &item, &reason, &location],
                )
                .await
                .map_err(db)?;
            }
            Ok(n)
        }
        Op::ReopenBatch(id) => {
            let n = c
                .execute(
                    "UPDATE ingest_batches SET status = 'processing', finished_at = NULL WHERE id = $1 AND status = 'done'",
                    &[id],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(WriteError::Conflict {
                    resource_type: "ingest batch".into(),
                    id: id.clone(),
                    expected: Expect::Absent,
                    found: None,
                });
            }
            c.execute("DELETE FROM ingest_rejections WHERE batch = $1", &[id])
                .await
                .map_err(db)?;
            Ok(n)
        }
        Op::RetryItem(id, index, fate, rejections) => {
            let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let item = as_i64(*index);
            let removed = c
                .execute(
                    "DELETE FROM ingest_rejections WHERE batch = $1 AND item = $2 AND EXISTS (SELECT 1 FROM ingest_batches WHERE id = $1 AND status = 'done')",
                    &[id, &item],
                )
                .await
                .map_err(db)?;
            if removed == 0 {
                return Err(WriteError::Conflict {
                    resource_type: "ingest item".into(),
                    id: format!("{id}.{index}"),
                    expected: Expect::Absent,
                    found: None,
                });
            }
            if !rejections.is_empty() {
                let reason: Vec<&str> = rejections.iter().map(|r| r.reason.as_str()).collect();
                let location: Vec<&str> = rejections.iter().map(|r| r.location.as_str()).collect();
                c.execute(
                    "INSERT INTO ingest_rejections (batch, seq, item, reason, location) SELECT $1, (SELECT COALESCE(MAX(seq), -1) FROM ingest_rejections WHERE batch = $1) + r.n, $2, r.reason, r.location FROM UNNEST($3::TEXT[], $4::TEXT[]) WITH ORDINALITY AS r(reason, location, n)",
                    &[id, &item, &reason, &location],
                )
                .await
                .map_err(db)?;
            }
            let (stored, duplicates, queries): (i64, i64, i64) = match fate {
                RetriedFate::Stored { queries } => (1, 0, as_i64(*queries)),
                RetriedFate::Duplicate => (0, 1, 0),
                RetriedFate::Unchanged => (0, 0, 0),
            };
            if stored + duplicates > 0 {
                c.execute(
                    "UPDATE ingest_batches SET rejected = rejected - 1, stored = stored + $1, duplicates = duplicates + $2, queries_opened = queries_opened + $3 WHERE id = $4",
                    &[&stored, &duplicates, &queries, id],
                )
                .await
                .map_err(db)?;
            }
            Ok(removed)
        }
        Op::ChangeQuery(id, change, by, at) => {
            let n = match change {
                QueryChange::Answer(text) => c
                    .execute(
                        "UPDATE data_queries SET status = 'answered', answer = $1, answered_at = $2, answered_by = $3 WHERE id = $4 AND status = 'open'",
                        &[text, at, by, id],
                    )
                    .await,
                QueryChange::Close => {
                    let from: Vec<&str> =
                        change.from_statuses().iter().map(|s| s.as_str()).collect();
                    c.execute(
                        "UPDATE data_queries SET status = 'closed', closed_at = $1, closed_by = $2 WHERE id = $3 AND status = ANY($4::TEXT[])",
                        &[at, by, id, &from],
                    )
                    .await
                }
            }
            .map_err(db)?;
            if n == 0 {
                // Rolled back by `settle`, dropping the audit records.
                return Err(WriteError::Conflict {
                    resource_type: "data query".into(),
                    id: id.clone(),
                    expected: Expect::Absent,
                    found: None,
                });
            }
            Ok(n)
        }
        Op::Campaign(op) => Ok(campaigns::apply(c, op).await?),
        Op::Imaging(op) => Ok(imaging::apply(c, op).await?),
        Op::Raw(sql) => c.batch_execute(sql).await.map(|()| 0),
    }
    .map_err(db)?;
    c.batch_execute("RELEASE SAVEPOINT req").await.map_err(db)?;
    Ok(n)
}

/// The `resources` columns of a batch of ops.
#[derive(Default)]
struct ResourceCols<'a> {
    rtype: Vec<&'a str>,
    id: Vec<&'a str>,
    vid: Vec<i64>,
    last_updated: Vec<i64>,
    deleted: Vec<i64>,
    patient: Vec<Option<&'a str>>,
    sort_date: Vec<i64>,
}

/// The first three columns of every index table.
#[derive(Default)]
struct IndexKeys<'a> {
    rtype: Vec<&'a str>,
    id: Vec<&'a str>,
    param: Vec<&'a str>,
}

impl<'a> IndexKeys<'a> {
    fn push(&mut self, rtype: &'a str, id: &'a str, param: &'a str) {
        self.rtype.push(rtype);
        self.id.push(id);
        self.param.push(param);
    }
}

/// The index rows of a request, column by column.
#[derive(Default)]
struct IndexRows<'a> {
    token: IndexKeys<'a>,
    token_system: Vec<&'a str>,
    token_code: Vec<&'a str>,
    string: IndexKeys<'a>,
    string_value: Vec<&'a str>,
    date: IndexKeys<'a>,
    date_low: Vec<i64>,
    date_high: Vec<i64>,
    reference: IndexKeys<'a>,
    reference_type: Vec<&'a str>,
    reference_id: Vec<&'a str>,
    quantity: IndexKeys<'a>,
    quantity_value: Vec<f64>,
    quantity_system: Vec<&'a str>,
    quantity_code: Vec<&'a str>,
}

impl<'a> IndexRows<'a> {
    fn add(&mut self, rtype: &'a str, id: &'a str, entries: &'a [clinflow_fhir::IndexEntry]) {
        for e in entries {
            match &e.value {
                IndexValue::Token { system, code } => {
                    self.token.push(rtype, id, e.param);
                    self.token_system.push(system.as_deref().unwrap_or(""));
                    self.token_code.push(code);
                }
                IndexValue::String { value } => {
                    self.string.push(rtype, id, e.param);
                    self.string_value.push(value);
                }
                IndexValue::Date { low, high } => {
                    self.date.push(rtype, id, e.param);
                    self.date_low.push(*low);
                    self.date_high.push(*high);
                }
                IndexValue::Reference {
                    target_type,
                    target_id,
                } => {
                    self.reference.push(rtype, id, e.param);
                    self.reference_type.push(target_type);
                    self.reference_id.push(target_id);
                }
                IndexValue::Quantity {
                    value,
                    system,
                    code,
                } => {
                    self.quantity.push(rtype, id, e.param);
                    self.quantity_value.push(*value);
                    self.quantity_system.push(system.as_deref().unwrap_or(""));
                    self.quantity_code.push(code.as_deref().unwrap_or(""));
                }
            }
        }
    }

    /// One multi-row insert per table that has rows.
    fn statements<'s>(&'s self, c: &'s Client, st: &'s Stmts, out: &mut Vec<PgFuture<'s>>) {
        let t = &self.token;
        if !t.id.is_empty() {
            out.push(Box::pin(async move {
                c.execute(
                    &st.insert_token,
                    &[
                        &t.rtype,
                        &t.id,
                        &t.param,
                        &self.token_system,
                        &self.token_code,
                    ],
                )
                .await
            }));
        }
        let s = &self.string;
        if !s.id.is_empty() {
            out.push(Box::pin(async move {
                c.execute(
                    &st.insert_string,
                    &[&s.rtype, &s.id, &s.param, &self.string_value],
                )
                .await
            }));
        }
        let d = &self.date;
        if !d.id.is_empty() {
            out.push(Box::pin(async move {
                c.execute(
                    &st.insert_date,
                    &[&d.rtype, &d.id, &d.param, &self.date_low, &self.date_high],
                )
                .await
            }));
        }
        let r = &self.reference;
        if !r.id.is_empty() {
            out.push(Box::pin(async move {
                c.execute(
                    &st.insert_reference,
                    &[
                        &r.rtype,
                        &r.id,
                        &r.param,
                        &self.reference_type,
                        &self.reference_id,
                    ],
                )
                .await
            }));
        }
        let q = &self.quantity;
        if !q.id.is_empty() {
            out.push(Box::pin(async move {
                c.execute(
                    &st.insert_quantity,
                    &[
                        &q.rtype,
                        &q.id,
                        &q.param,
                        &self.quantity_value,
                        &self.quantity_system,
                        &self.quantity_code,
                    ],
                )
                .await
            }));
        }
    }
}

/// Applies one write request inside `SAVEPOINT req`, releasing it on
/// success. On error the savepoint is left for the caller to roll back.
///
/// Same outcome as applying the ops one by one in order (the SQLite
/// engine's way), in few round trips: phase 1 pipelines the savepoint, one
/// insert of every created resource and the compare-and-set update of each
/// updated one, and checks the `Expect`s; phase 2 pipelines the version
/// rows, the index rows of each resource's last op and the site upserts.
async fn apply_ops(
    c: &Client,
    st: &Stmts,
    ops: &[&WriteOp],
    queries: &[&NewDataQuery],
) -> Result<(), WriteError> {
    fn sort_date(op: &WriteOp) -> i64 {
        op.extracted.sort_date.unwrap_or(sql::NO_SORT_DATE)
    }
    /// A deleted resource is in no compartment.
    fn patient(op: &WriteOp) -> Option<&str> {
        op.body.as_ref().and(op.extracted.patient.as_deref())
    }

    // ---- phase 1: the rows of `resources`, with the Expect checks ----
    let mut creates = Vec::new();
    let mut new = ResourceCols::default();
    let mut updates = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op.expect {
            Expect::Absent => {
                creates.push(i);
                new.rtype.push(&op.resource_type);
                new.id.push(&op.id);
                new.vid.push(op.new_version as i64);
                new.last_updated.push(op.last_updated);
                new.deleted.push(i64::from(op.body.is_none()));
                new.patient.push(patient(op));
                new.sort_date.push(sort_date(op));
            }
            Expect::Version(v) => updates.push((
                i,
                op.new_version as i64,
                i64::from(op.body.is_none()),
                patient(op),
                sort_date(op),
                v as i64,
            )),
        }
    }
    let savepoint = c.batch_execute("SAVEPOINT req");
    let inserted = async {
        if creates.is_empty() {
            return Ok(Vec::new());
        }
        c.query(
            &st.insert_resources,
            &[
                &new.rtype,
                &new.id,
                &new.vid,
                &new.last_updated,
                &new.deleted,
                &new.patient,
                &new.sort_date,
            ],
        )
        .await
    };
    let updated = futures::future::join_all(updates.iter().map(
        |(i, vid, deleted, patient, sort, expected)| {
            let op = &ops[*i];
            async move {
                c.execute(
                    &st.update_resource,
                    &[
                        vid,
                        &op.last_updated,
                        deleted,
                        patient,
                        sort,
                        &op.resource_type,
                        &op.id,
                        expected,
                    ],
                )
                .await
            }
        },
    ));
    let (savepoint, inserted, updated) = futures::join!(savepoint, inserted, updated);
    savepoint.map_err(db)?;
    let inserted = inserted.map_err(db)?;

    // The first op whose Expect failed, in request order.
    let mut conflict: Option<usize> = None;
    let mut returned: HashMap<(&str, &str), usize> = HashMap::with_capacity(inserted.len());
    for row in &inserted {
        let key = (row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?);
        *returned.entry(key).or_default() += 1;
    }
    for &i in &creates {
        // A key sent twice comes back once: the second op conflicts.
        match returned.get_mut(&(ops[i].resource_type.as_str(), ops[i].id.as_str())) {
            Some(n) if *n > 0 => *n -= 1,
            _ => {
                conflict = Some(i);
                break;
            }
        }
    }
    for ((i, ..), n) in updates.iter().zip(updated) {
        if n.map_err(db)? != 1 {
            conflict = Some(conflict.map_or(*i, |c| c.min(*i)));
            break;
        }
    }
    if let Some(i) = conflict {
        let op = &ops[i];
        let found = c
            .query_opt(&st.current_vid, &[&op.resource_type, &op.id])
            .await
            .map_err(db)?
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()
            .map_err(db)?
            .map(|v| v as u64);
        return Err(WriteError::Conflict {
            resource_type: op.resource_type.clone(),
            id: op.id.clone(),
            expected: op.expect,
            found,
        });
    }

    // ---- phase 2: versions, index rows, sites ----
    let mut versions = ResourceCols::default();
    let mut bodies: Vec<Option<&str>> = Vec::with_capacity(ops.len());
    for op in ops {
        versions.rtype.push(&op.resource_type);
        versions.id.push(&op.id);
        versions.vid.push(op.new_version as i64);
        versions.last_updated.push(op.last_updated);
        versions.deleted.push(i64::from(op.body.is_none()));
        bodies.push(op.body.as_deref());
    }
    // Updated resources lose their old index rows (by type, then ids).
    let mut stale: Vec<(&str, Vec<&str>)> = Vec::new();
    for (i, ..) in &updates {
        let op = &ops[*i];
        match stale.iter_mut().find(|(t, _)| *t == op.resource_type) {
            Some((_, ids)) => ids.push(&op.id),
            None => stale.push((&op.resource_type, vec![&op.id])),
        }
    }
    // Only the last op on a resource leaves index rows (an earlier one's
    // rows would be deleted by the later update); the last site wins.
    let mut index = IndexRows::default();
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(ops.len());
    let mut sites: HashMap<&str, &str> = HashMap::new();
    let (mut site_patients, mut site_sites) = (Vec::new(), Vec::new());
    for op in ops.iter().rev() {
        if !seen.insert((&op.resource_type, &op.id)) || op.body.is_none() {
            continue;
        }
        index.add(&op.resource_type, &op.id, &op.extracted.entries);
    }
    for op in ops.iter().filter(|op| op.body.is_some()) {
        if let (Some(site), Some(p)) = (&op.extracted.subject_site, &op.extracted.patient) {
            sites.insert(p, site);
        }
    }
    for (p, s) in sites {
        site_patients.push(p);
        site_sites.push(s);
    }

    // Before `statements`, which borrows it.
    let q = QueryCols::new(queries);
    let mut statements: Vec<PgFuture<'_>> = Vec::new();
    for (rtype, ids) in &stale {
        for delete in &st.delete_index {
            statements.push(Box::pin(
                async move { c.execute(delete, &[rtype, ids]).await },
            ));
        }
    }
    let (v, b) = (&versions, &bodies);
    statements.push(Box::pin(async move {
        c.execute(
            &st.insert_versions,
            &[&v.rtype, &v.id, &v.vid, &v.last_updated, &v.deleted, b],
        )
        .await
    }));
    index.statements(c, st, &mut statements);
    if !site_patients.is_empty() {
        let (p, s) = (&site_patients, &site_sites);
        statements.push(Box::pin(async move {
            c.execute(&st.upsert_sites, &[p, s]).await
        }));
    }
    if !queries.is_empty() {
        let q = &q;
        statements.push(Box::pin(async move {
            c.execute(
                "INSERT INTO data_queries (id, trial, site, patient, rtype, rid, measurement, value, unit, soft_low, soft_high, location, text, status, opened_at, opened_by) SELECT u.id, u.trial, u.site, u.patient, u.rtype, u.rid, u.measurement, u.value, u.unit, u.soft_low, u.soft_high, u.location, u.text, 'open', u.opened_at, u.opened_by FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::DOUBLE PRECISION[], $11::DOUBLE PRECISION[], $12::TEXT[], $13::TEXT[], $14::BIGINT[], $15::TEXT[]) AS u (id, trial, site, patient, rtype, rid, measurement, value, unit, soft_low, soft_high, location, text, opened_at, opened_by)",
                &[
                    &q.text[0], &q.text[1], &q.text[2], &q.text[3], &q.text[4], &q.text[5],
                    &q.text[6], &q.text[7], &q.text[8], &q.soft_low, &q.soft_high,
                    &q.text[9], &q.text[10], &q.opened_at, &q.text[11],
                ],
            )
            .await
        }));
    }
    statements.push(Box::pin(async move {
        c.batch_execute("RELEASE SAVEPOINT req").await.map(|()| 0)
    }));
    pipeline(statements).await?;
    Ok(())
}

/// The `data_queries` columns of a batch of new queries: the text columns
/// in insert order (id, trial, site, patient, rtype, rid, measurement,
/// value, unit, location, text, opened_by), then the numbers.
struct QueryCols<'a> {
    text: [Vec<&'a str>; 12],
    soft_low: Vec<f64>,
    soft_high: Vec<f64>,
    opened_at: Vec<i64>,
}

impl<'a> QueryCols<'a> {
    fn new(queries: &[&'a NewDataQuery]) -> QueryCols<'a> {
        let mut cols = QueryCols {
            text: Default::default(),
            soft_low: Vec::with_capacity(queries.len()),
            soft_high: Vec::with_capacity(queries.len()),
            opened_at: Vec::with_capacity(queries.len()),
        };
        for q in queries {
            for (col, v) in cols.text.iter_mut().zip([
                &q.id,
                &q.trial,
                &q.site,
                &q.patient,
                &q.resource_type,
                &q.resource_id,
                &q.measurement,
                &q.value,
                &q.unit,
                &q.location,
                &q.text,
                &q.opened_by,
            ]) {
                col.push(v.as_str());
            }
            cols.soft_low.push(q.soft_low);
            cols.soft_high.push(q.soft_high);
            cols.opened_at.push(q.opened_at);
        }
        cols
    }
}

/// Appends records to the chain, after the head locked for this transaction.
async fn append_audit(c: &Client, st: &Stmts, records: Vec<AuditRecord>) -> anyhow::Result<()> {
    // Pipelined: the log's tail is read once the head row is locked.
    let (head, tail) = futures::join!(
        c.query_one(&st.lock_head, &[]),
        c.query_opt(&st.log_tail, &[])
    );
    let head = head?;
    let head: (i64, String) = (head.try_get(0)?, head.try_get(1)?);
    // Chain after whichever is further on. Normally they agree. Records
    // removed from the end of the log leave the head ahead: chaining after
    // it keeps the gap visible to `verify_audit`. A record put in by hand
    // leaves the log ahead: chaining after it keeps the writer working (as
    // on SQLite), and the verifier reports the forgery.
    let head = match tail? {
        Some(t) if t.try_get::<_, i64>(0)? > head.0 => (t.try_get(0)?, t.try_get(1)?),
        _ => head,
    };
    let chained = audit::chain(Some(head), records);
    let Some(last) = chained.last() else {
        return Ok(());
    };
    let n = chained.len();
    let mut seq = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut actor = Vec::with_capacity(n);
    let mut role = Vec::with_capacity(n);
    let mut action = Vec::with_capacity(n);
    let mut rtype = Vec::with_capacity(n);
    let mut rid = Vec::with_capacity(n);
    let mut vid = Vec::with_capacity(n);
    let mut reason = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut client = Vec::with_capacity(n);
    let mut detail = Vec::with_capacity(n);
    let mut prev_hash = Vec::with_capacity(n);
    let mut hash = Vec::with_capacity(n);
    for a in &chained {
        let r = &a.record;
        seq.push(a.seq);
        time.push(r.time);
        actor.push(r.actor.as_str());
        role.push(r.role.as_str());
        action.push(r.action.as_str());
        rtype.push(r.resource_type.as_deref());
        rid.push(r.resource_id.as_deref());
        vid.push(r.version.map(|v| v as i64));
        reason.push(r.reason.as_deref());
        outcome.push(r.outcome.as_str());
        client.push(r.client.as_deref());
        detail.push(r.detail.as_deref());
        prev_hash.push(a.prev_hash.as_str());
        hash.push(a.hash.as_str());
    }
    let insert = async {
        c.execute(
            &st.insert_audit,
            &[
                &seq, &time, &actor, &role, &action, &rtype, &rid, &vid, &reason, &outcome,
                &client, &detail, &prev_hash, &hash,
            ],
        )
        .await
    };
    let move_head = async { c.execute(&st.update_head, &[&last.seq, &last.hash]).await };
    let (inserted, moved) = futures::join!(insert, move_head);
    inserted?;
    if moved? != 1 {
        bail!("the audit head row is missing");
    }
    Ok(())
}

/// Holds a read's connection; dropped while it still does (the read's
/// future went away: deadline, or the caller gone), it takes the connection
/// out of the pool and sends PostgreSQL a cancel request for its query, then
/// closes it. A cancel request names the backend, not the query: had the
/// connection gone back to the pool, the cancel could reach the next
/// borrower's query instead.
struct CancelOnDrop(Option<deadpool_postgres::Object>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            let client = deadpool_postgres::Object::take(conn);
            let token = client.cancel_token();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = token.cancel_query(tokio_postgres::NoTls).await {
                        tracing::debug!(error = %e, "cancelling a PostgreSQL query failed");
                    }
                    drop(client);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_parameter_is_taken_out_of_the_url() {
        let (config, schema) =
            parse_url("postgres://postgres@127.0.0.1:5432/test?schema=t_abc").unwrap();
        assert_eq!(schema.as_deref(), Some("t_abc"));
        assert_eq!(config.get_dbname(), Some("test"));
        assert_eq!(config.get_options(), Some("-csearch_path=t_abc"));

        let (config, schema) =
            parse_url("postgres://u@h/db?connect_timeout=3&schema=s1&application_name=x").unwrap();
        assert_eq!(schema.as_deref(), Some("s1"));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_application_name(), Some("x"));

        let (config, schema) = parse_url("postgres://u@h/db").unwrap();
        assert_eq!(schema, None);
        assert_eq!(config.get_options(), None);
    }

    #[test]
    fn schema_names_that_would_need_quoting_are_refused() {
        for bad in ["", "A", "a-b", "1a", "a;drop", "a\"b"] {
            assert!(
                parse_url(&format!("postgres://u@h/db?schema={bad}")).is_err(),
                "{bad}"
            );
        }
    }
}
