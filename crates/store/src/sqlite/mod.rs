//! The SQLite engine: the embedded default.
//!
//! Shape: one writer thread owns the only writing connection and commits in
//! groups (several requests per transaction, each inside its own savepoint,
//! so one failing request does not undo the others); a small pool of
//! read-only connections serves reads on the blocking thread pool. The
//! database is in WAL mode, so readers never wait for the writer.
//!
//! Invariant: a write request's reply is sent only after the transaction
//! holding it has committed (with `synchronous=FULL`, after the WAL is on
//! disk).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use rusqlite::{params, Connection, OptionalExtension, ToSql};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::audit;
use crate::model::*;
use crate::sql::{self, Dialect, SqlValue};
use clinflow_fhir::IndexValue;

mod campaigns;
mod imaging;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("0001_init.sql")),
    (2, include_str!("0002_audit_head.sql")),
    (3, include_str!("0003_no_random_order_indexes.sql")),
    (4, include_str!("0004_ingest.sql")),
    (5, include_str!("0005_data_queries.sql")),
    (6, include_str!("0006_token_search_order.sql")),
    (7, include_str!("0007_batch_scope.sql")),
    (8, include_str!("0008_campaigns.sql")),
    (9, include_str!("0009_imaging.sql")),
    (10, include_str!("0010_versions_rowid.sql")),
];

/// How many queued write requests one group commit takes at most.
const MAX_GROUP: usize = 64;
/// The writer's queue; senders wait when it is full (backpressure).
const QUEUE: usize = 256;

/// A custom job: `Ok(true)` when it applied, `Ok(false)` when it found
/// nothing to do (its writes, if any, are rolled back and its audit
/// records dropped: they would record what did not happen).
type CustomFn = Box<dyn FnOnce(&Connection) -> anyhow::Result<bool> + Send>;

/// A write request as the writer takes it: the `resources.tokens` keys of
/// its ops already built, on the caller's thread rather than the writer's
/// (the writer is the one stage every write goes through in turn).
struct Prepared {
    req: WriteRequest,
    /// [`token_keys`] of each op, in op order; `[]` for a deletion.
    tokens: Vec<String>,
}

impl Prepared {
    fn new(req: WriteRequest) -> Prepared {
        let tokens = req
            .ops
            .iter()
            .map(|op| match op.body {
                None => "[]".to_string(),
                Some(_) => token_keys(&op.extracted.entries),
            })
            .collect();
        Prepared { req, tokens }
    }
}

enum Job {
    Write(Prepared, oneshot::Sender<Result<(), WriteError>>),
    /// Read-audit records: group-committed, nobody waits for them.
    Audit(Vec<AuditRecord>),
    /// Any other write (tokens, trials), with its audit records.
    Custom(
        CustomFn,
        Vec<AuditRecord>,
        oneshot::Sender<anyhow::Result<bool>>,
    ),
    /// Replies once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// The SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    path: PathBuf,
}

/// The checkpointer's longest sleep: with no nudge from the writer (a
/// quiet database), it still copies the WAL back this often.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(1000);
/// WAL size, in frames (pages), past which the writer wakes the checkpointer
/// after a commit. A round copies each page changed since the last one once;
/// the pages each group commit changes (the right edges of the id-ordered
/// B-trees, the audit tail) are mostly the same few, so fewer rounds copy
/// less in all. Under ingest a second of WAL is ~80 MB, so the 1 s round
/// alone let the WAL reach the writer's backstop and the writer did the
/// copying itself: 41% of its CPU in `walCheckpoint` (perf, 2026-12-04).
/// 16 MiB keeps the copy-back on the checkpointer's core.
const CHECKPOINT_NUDGE_FRAMES: i32 = 4_096;
/// The writer's own checkpoint, in frames: only a backstop, should the
/// checkpointer fall behind, so that the WAL stays bounded (~400 MiB).
const WRITER_BACKSTOP_FRAMES: i32 = 100_000;
/// The writer's page cache, in KiB (readers keep 256 MiB each). Every
/// COMMIT costs SQLite a walk of the writer's whole page-cache hash while
/// the file is under 1 GiB (`pcache1TruncateUnsafe`: a B-tree rebalance
/// parks a page at the pending-byte page number, past the end of the file,
/// so the truncate to the file's size at commit cannot take its short
/// path): 12% of the writer's CPU with 256 MiB. Pages it evicts are read
/// back through the memory map. 32 MiB measured 10-12% less writer CPU per
/// Observation than 256 MiB, side by side under txload (2026-12-02).
pub const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// Runs WAL checkpoints on its own connection, so that the writer thread
/// (the bottleneck of ingest) only appends to the WAL and the copy-back work
/// runs on another core. A round runs when the writer nudges (the WAL is
/// past [`CHECKPOINT_NUDGE_FRAMES`]) or [`CHECKPOINT_EVERY`] has passed; the
/// loop ends when the writer's connection, which holds the nudge sender in
/// its WAL hook, is closed.
fn checkpoint_loop(path: PathBuf, nudges: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    let conn = match open_conn(&path, false) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no checkpointer: the writer checkpoints at its backstop only");
            return;
        }
    };
    loop {
        match nudges.recv_timeout(CHECKPOINT_EVERY) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // PASSIVE never blocks the writer or readers; what it cannot copy
        // now (pages a reader still needs) it copies on a later round.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "checkpoint deferred");
        }
    }
}

/// The writer connection's WAL hook (in place of SQLite's autocheckpoint):
/// after each commit, wakes the checkpointer once the WAL is past
/// [`CHECKPOINT_NUDGE_FRAMES`], and checkpoints on the writer itself only
/// past [`WRITER_BACKSTOP_FRAMES`]. It never reports an error: the commit
/// has happened by then, and an error here would make SQLite report the
/// committed statement as failed.
fn install_wal_hook(
    conn: &mut Connection,
    nudge: std::sync::mpsc::SyncSender<()>,
) -> rusqlite::Result<()> {
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames| {
        if frames >= WRITER_BACKSTOP_FRAMES {
            if let Err(e) = wal.checkpoint() {
                tracing::debug!(error = %e, "writer backstop checkpoint deferred");
            }
        } else if frames >= CHECKPOINT_NUDGE_FRAMES {
            // Full: a nudge is already pending, which is all it takes.
            let _ = nudge.try_send(());
        }
        Ok(())
    }))
}

struct ReaderPool {
    conns: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

fn open_conn(path: &Path, read_only: bool) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-262144; PRAGMA mmap_size=1073741824; PRAGMA temp_store=MEMORY;",
    )?;
    if read_only {
        conn.execute_batch("PRAGMA query_only=1;")?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.execute_batch(sql)
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES (?, ?)",
                params![version, crate::now_millis()],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`.
    pub async fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        let path = path.to_path_buf();
        let p = path.clone();
        let (writer_conn, readers, nudges) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                if let Some(dir) = p.parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                }
                let mut w = open_conn(&p, false)?;
                w.execute_batch(&format!("PRAGMA cache_size=-{WRITER_CACHE_KIB}"))?;
                migrate(&mut w)?;
                let (nudge, nudges) = std::sync::mpsc::sync_channel(1);
                install_wal_hook(&mut w, nudge)?;
                let readers = (0..4)
                    .map(|_| open_conn(&p, true))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((w, readers, nudges))
            })
            .await??;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx))?;
        let cp_path = path.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(cp_path, nudges))?;
        let n = readers.len();
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(ReaderPool {
                conns: Mutex::new(readers),
                permits: Semaphore::new(n),
            }),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.read_mut(move |c| f(c)).await
    }

    /// As [`SqliteStore::read`], for a read that sets a handler on its
    /// connection (and must clear it before the connection goes back).
    async fn read_mut<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        // The permit goes back with the connection, from the blocking
        // task: a caller that stops waiting (a timeout dropping this
        // future) must not free a permit while its query still holds the
        // connection, or the next reader would find the pool empty.
        self.readers
            .permits
            .acquire()
            .await
            .map_err(|_| anyhow!("store closed"))?
            .forget();
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            // The semaphore guarantees a connection is free; the lock is held
            // only to pop and push, never across the query.
            let conn = pool
                .conns
                .lock()
                .map_err(|_| anyhow!("reader pool poisoned"))
                .and_then(|mut c| c.pop().ok_or_else(|| anyhow!("no free reader")));
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    pool.permits.add_permits(1);
                    return Err(e);
                }
            };
            let r = f(&mut conn);
            if let Ok(mut conns) = pool.conns.lock() {
                conns.push(conn);
            }
            pool.permits.add_permits(1);
            r
        })
        .await?
    }

    /// Commits a write request (with its audit records) atomically.
    pub async fn write(&self, req: WriteRequest) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Write(Prepared::new(req), tx))
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
        rx.await.map_err(|_| anyhow!("store closed"))
    }

    /// Runs `f` in the writer's next group, in a savepoint of its own, and
    /// commits `audit` with it when it applied (see [`CustomFn`]).
    async fn custom(
        &self,
        audit: Vec<AuditRecord>,
        f: impl FnOnce(&Connection) -> anyhow::Result<bool> + Send + 'static,
    ) -> anyhow::Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job::Custom(Box::new(f), audit, tx))
            .await
            .map_err(|_| anyhow!("store closed"))?;
        rx.await.map_err(|_| anyhow!("store closed"))?
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.read(|c| {
            Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())?)
        })
        .await
    }

    pub async fn read_current(
        &self,
        rtype: &str,
        id: &str,
    ) -> anyhow::Result<Option<StoredResource>> {
        let (rtype, id) = (rtype.to_string(), id.to_string());
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT r.vid, r.last_updated, r.deleted, r.patient, v.body FROM resources r JOIN resource_versions v ON v.rtype = r.rtype AND v.id = r.id AND v.vid = r.vid WHERE r.rtype = ? AND r.id = ?",
            )?;
            Ok(st
                .query_row(params![rtype, id], |row| version_row(&rtype, &id, row))
                .optional()?)
        })
        .await
    }

    pub async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        vid: u64,
    ) -> anyhow::Result<Option<StoredResource>> {
        let (rtype, id) = (rtype.to_string(), id.to_string());
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT v.vid, v.last_updated, v.deleted, r.patient, v.body FROM resource_versions v JOIN resources r ON r.rtype = v.rtype AND r.id = v.id WHERE v.rtype = ? AND v.id = ? AND v.vid = ?",
            )?;
            Ok(st
                .query_row(params![rtype, id, vid as i64], |row| version_row(&rtype, &id, row))
                .optional()?)
        })
        .await
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
        let (rtype, id) = (rtype.to_string(), id.to_string());
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT v.vid, v.last_updated, v.deleted, r.patient, v.body FROM resource_versions v JOIN resources r ON r.rtype = v.rtype AND r.id = v.id WHERE v.rtype = ? AND v.id = ? AND v.vid < ? ORDER BY v.vid DESC LIMIT ?",
            )?;
            let rows = st.query_map(
                params![rtype, id, before.map_or(i64::MAX, |b| b as i64), limit as i64],
                |row| version_row(&rtype, &id, row),
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn search(
        &self,
        q: clinflow_fhir::search::SearchQuery,
        scope: Scope,
    ) -> anyhow::Result<SearchPage> {
        self.read(move |c| search_blocking(c, &q, &scope)).await
    }

    /// Ids of `rtype` resources whose `identifier` is `system|value`.
    pub async fn find_by_identifier(
        &self,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> anyhow::Result<Vec<String>> {
        let (rtype, system, value) = (
            rtype.to_string(),
            system.map(str::to_string),
            value.to_string(),
        );
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT x.id FROM idx_token x JOIN resources r ON r.rtype = x.rtype AND r.id = x.id AND r.deleted = 0 WHERE x.rtype = ? AND x.param = 'identifier' AND x.code = ? AND (? IS NULL OR x.system = ?) LIMIT 2",
            )?;
            let rows = st.query_map(params![rtype, value, system, system], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn find_first_by_identifier_each(
        &self,
        system: &str,
        groups: Vec<Vec<(String, String)>>,
    ) -> anyhow::Result<Vec<Option<(usize, String)>>> {
        let system = system.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT x.id FROM idx_token x JOIN resources r ON r.rtype = x.rtype AND r.id = x.id AND r.deleted = 0 WHERE x.rtype = ? AND x.param = 'identifier' AND x.code = ? AND x.system = ? LIMIT 1",
            )?;
            let mut found = Vec::with_capacity(groups.len());
            for keys in &groups {
                let mut first = None;
                for (i, (rtype, value)) in keys.iter().enumerate() {
                    let id: Option<String> = st
                        .query_row(params![rtype, value, system], |r| r.get(0))
                        .optional()?;
                    if let Some(id) = id {
                        first = Some((i, id));
                        break;
                    }
                }
                found.push(first);
            }
            Ok(found)
        })
        .await
    }

    /// The site a patient is enrolled at.
    pub async fn current_resources(
        &self,
        rtype: &str,
        patient: Option<&str>,
        scope: Scope,
    ) -> anyhow::Result<Vec<StoredResource>> {
        let s = sql::current_all(Dialect::Sqlite, rtype, patient, &scope);
        let rtype = rtype.to_string();
        self.read(move |c| {
            Ok(run_rows(c, &rtype, &s)?
                .into_iter()
                .map(|(r, _)| r)
                .collect())
        })
        .await
    }

    pub async fn compartment_page(
        &self,
        q: CompartmentQuery,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<DatedResource>, ReadError> {
        let s = sql::compartment_page(Dialect::Sqlite, &q);
        // Checked by SQLite every 1,000 VM steps, from the statement's first
        // step on: an interrupt from outside could land before that step
        // and be cleared by it, a flag cannot be missed.
        let stop = Arc::new(AtomicBool::new(false));
        let guard = StopOnDrop(Some(stop.clone()));
        let until = deadline.into_std();
        let read = self.read_mut(move |c| {
            let flag = stop.clone();
            c.progress_handler(
                1000,
                Some(move || flag.load(Ordering::Relaxed) || std::time::Instant::now() >= until),
            )?;
            let rows = run_rows(c, &q.rtype, &s);
            // Cleared before the connection goes back to the pool.
            c.progress_handler(0, None::<fn() -> bool>)?;
            rows
        });
        let rows = match tokio::time::timeout_at(deadline, read).await {
            Ok(rows) => rows?,
            // Dropping the read future does not stop the blocking task:
            // the guard below, dropped with this future, raises the flag.
            Err(_) => return Err(ReadError::Deadline),
        };
        guard.disarm();
        Ok(rows.into_iter().map(|(r, d)| sql::dated(r, d)).collect())
    }

    pub async fn patient_sites(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT patient, site FROM patient_sites")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn rejected_since(
        &self,
        since: i64,
        scope: Option<IngestScope>,
    ) -> anyhow::Result<u64> {
        let scope = scope.map(|s| s.to_column());
        self.read(move |c| {
            let n: i64 = c
                .prepare_cached("SELECT COALESCE(SUM(rejected), 0) FROM ingest_batches WHERE received_at >= ? AND (? IS NULL OR scope = ?)")?
                .query_row(params![since, scope, scope], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn patient_site(&self, patient: &str) -> anyhow::Result<Option<String>> {
        let patient = patient.to_string();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT site FROM patient_sites WHERE patient = ?")?
                    .query_row([patient], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    // ---- tokens ----

    pub async fn create_token(
        &self,
        rec: TokenRecord,
        hash: String,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<()> {
        self.custom(audit, move |c| {
            c.execute(
                "INSERT INTO tokens (id, name, role, site, patient, hash, created, expires, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                params![rec.id, rec.name, rec.role, rec.site, rec.patient, hash, rec.created, rec.expires],
            )?;
            Ok(true)
        })
        .await
        .map(|_| ())
    }

    pub async fn token_by_hash(&self, hash: &str) -> anyhow::Result<Option<TokenRecord>> {
        let hash = hash.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT id, name, role, site, patient, created, expires, revoked FROM tokens WHERE hash = ?",
            )?
            .query_row([hash], token_row)
            .optional()?)
        })
        .await
    }

    pub async fn list_tokens(&self) -> anyhow::Result<Vec<TokenRecord>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, name, role, site, patient, created, expires, revoked FROM tokens ORDER BY created, id",
            )?;
            let rows = st.query_map([], token_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Revokes a token; `false` when there is none with that id.
    pub async fn revoke_token(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        let id = id.to_string();
        self.custom(audit, move |c| {
            Ok(c.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", [id])? > 0)
        })
        .await
    }

    // ---- trials ----

    /// Records a protocol version; `false` when that version was already there.
    pub async fn put_trial(&self, rec: TrialRecord) -> anyhow::Result<bool> {
        self.custom(Vec::new(), move |c| {
            Ok(c.execute(
                "INSERT OR IGNORE INTO trials (id, version, protocol, loaded_at) VALUES (?, ?, ?, ?)",
                params![rec.id, rec.version, rec.protocol, rec.loaded_at],
            )? > 0)
        })
        .await
    }

    /// Every version of a trial, newest first.
    pub async fn trial_versions(&self, id: &str) -> anyhow::Result<Vec<TrialRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, version, protocol, loaded_at FROM trials WHERE id = ? ORDER BY version DESC",
            )?;
            let rows = st.query_map([id], trial_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The newest version of every trial.
    pub async fn list_trials(&self) -> anyhow::Result<Vec<TrialRecord>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT t.id, t.version, t.protocol, t.loaded_at FROM trials t WHERE t.version = (SELECT MAX(version) FROM trials u WHERE u.id = t.id) ORDER BY t.id",
            )?;
            let rows = st.query_map([], trial_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    // ---- ingest batches ----

    /// Accepts a batch: its row and raw input commit together, durably,
    /// with `audit`. The same content in the same format is one batch:
    /// then nothing is written and the existing batch is returned, with
    /// `false`.
    pub async fn put_batch(
        &self,
        b: NewBatch,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<(BatchRecord, bool)> {
        let (format, sha, scope) = (b.format.clone(), b.sha256.clone(), b.scope.to_column());
        // Not applied when the batch exists: its audit record (a batch
        // accepted) is dropped, since none was.
        let created = self
            .custom(audit, move |c| {
                let n = c.execute(
                    "INSERT OR IGNORE INTO ingest_batches (id, format, sha256, submitter, role, scope, received_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'processing')",
                    params![b.id, b.format, b.sha256, b.submitter, b.role, b.scope.to_column(), b.received_at],
                )?;
                if n == 0 {
                    return Ok(false);
                }
                c.execute(
                    "INSERT INTO ingest_inputs (batch, sha256, body) VALUES (?, ?, ?)",
                    params![b.id, b.sha256, b.raw],
                )?;
                Ok(true)
            })
            .await?;
        let rec = self
            .read(move |c| {
                Ok(c.prepare_cached(&format!(
                    "{BATCH_SELECT} WHERE format = ? AND sha256 = ? AND scope = ?"
                ))?
                .query_row(params![format, sha, scope], batch_row)
                .optional()?)
            })
            .await?
            .ok_or_else(|| anyhow!("an accepted batch is not found"))?;
        Ok((rec?, created))
    }

    pub async fn batch(&self, id: &str) -> anyhow::Result<Option<BatchRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached(&format!("{BATCH_SELECT} WHERE id = ?"))?
                .query_row([id], batch_row)
                .optional()?)
        })
        .await?
        .transpose()
    }

    /// The raw input of a batch, as received.
    pub async fn batch_input(&self, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let id = id.to_string();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT body FROM ingest_inputs WHERE batch = ?")?
                    .query_row([id], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    /// A batch's rejections in input order.
    pub async fn batch_rejections(&self, id: &str) -> anyhow::Result<Vec<BatchRejection>> {
        let id = id.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT item, reason, location FROM ingest_rejections WHERE batch = ? ORDER BY item, seq",
            )?;
            let rows = st.query_map([id], |r| {
                Ok(BatchRejection {
                    index: r.get::<_, i64>(0)? as u64,
                    reason: r.get(1)?,
                    location: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records a batch's outcome and marks it done, in one transaction;
    /// `false` (and nothing written) when it is not processing.
    pub async fn finish_batch(
        &self,
        id: &str,
        counts: BatchCounts,
        rejections: Vec<BatchRejection>,
    ) -> anyhow::Result<bool> {
        let id = id.to_string();
        self.custom(Vec::new(), move |c| {
            let n = c.execute(
                "UPDATE ingest_batches SET status = 'done', received = ?, stored = ?, rejected = ?, duplicates = ?, queries_opened = ?, finished_at = ? WHERE id = ? AND status = 'processing'",
                params![
                    counts.received as i64,
                    counts.stored as i64,
                    counts.rejected as i64,
                    counts.duplicates as i64,
                    counts.queries_opened as i64,
                    crate::now_millis(),
                    id
                ],
            )?;
            if n > 0 {
                let mut st = c.prepare_cached(
                    "INSERT INTO ingest_rejections (batch, seq, item, reason, location) VALUES (?, ?, ?, ?, ?)",
                )?;
                for (seq, r) in rejections.iter().enumerate() {
                    st.execute(params![id, seq as i64, r.index as i64, r.reason, r.location])?;
                }
            }
            Ok(n > 0)
        })
        .await
    }

    /// A done batch back to processing with its rejections cleared, and its
    /// audit records, in one transaction; `false` (nothing written) when it
    /// is not done.
    pub async fn reopen_batch(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        let id = id.to_string();
        self.custom(audit, move |c| {
            let n = c.execute(
                "UPDATE ingest_batches SET status = 'processing', finished_at = NULL WHERE id = ? AND status = 'done'",
                [&id],
            )?;
            if n == 0 {
                return Ok(false);
            }
            c.execute("DELETE FROM ingest_rejections WHERE batch = ?", [&id])?;
            Ok(true)
        })
        .await
    }

    /// The ids of batches not done, oldest first (resumed at startup).
    pub async fn retry_item(
        &self,
        batch: &str,
        index: u64,
        fate: RetriedFate,
        rejections: Vec<BatchRejection>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        let id = batch.to_string();
        self.custom(audit, move |c| {
                let removed = c.execute(
                    "DELETE FROM ingest_rejections WHERE batch = ?1 AND item = ?2 AND EXISTS (SELECT 1 FROM ingest_batches WHERE id = ?1 AND status = 'done')",
                    params![id, index as i64],
                )?;
                if removed == 0 {
                    // No rejected item `index` in a done batch.
                    return Ok(false);
                }
                let next: i64 = c.query_row(
                    "SELECT COALESCE(MAX(seq), -1) + 1 FROM ingest_rejections WHERE batch = ?",
                    [&id],
                    |r| r.get(0),
                )?;
                let mut st = c.prepare_cached(
                    "INSERT INTO ingest_rejections (batch, seq, item, reason, location) VALUES (?, ?, ?, ?, ?)",
                )?;
                for (k, r) in rejections.iter().enumerate() {
                    st.execute(params![id, next + k as i64, index as i64, r.reason, r.location])?;
                }
                let (stored, duplicates, queries) = match fate {
                    RetriedFate::Stored { queries } => (1, 0, queries as i64),
                    RetriedFate::Duplicate => (0, 1, 0),
                    RetriedFate::Unchanged => (0, 0, 0),
                };
                if stored + duplicates > 0 {
                    c.execute(
                        "UPDATE ingest_batches SET rejected = rejected - 1, stored = stored + ?, duplicates = duplicates + ?, queries_opened = queries_opened + ? WHERE id = ?",
                        params![stored, duplicates, queries, id],
                    )?;
                }
                Ok(true)
            })
            .await
    }

    pub async fn unfinished_batches(&self) -> anyhow::Result<Vec<String>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id FROM ingest_batches WHERE status = 'processing' ORDER BY id",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    // ---- audit ----

    pub async fn audit_records(&self, q: AuditQuery) -> anyhow::Result<Vec<ChainedAudit>> {
        self.read(move |c| {
            let mut s = sql::Sql::new(Dialect::Sqlite);
            s.push(AUDIT_SELECT)
                .push(" WHERE seq > ")
                .int(q.after_seq.unwrap_or(0));
            push_audit_filters(&mut s, &q);
            s.push(" ORDER BY seq LIMIT ").int(q.limit as i64);
            let mut st = c.prepare(&s.text)?;
            let rows = st.query_map(
                rusqlite::params_from_iter(s.params.iter().map(to_sql)),
                audit_row,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Reads the whole trail in order and checks the chain.
    pub async fn verify_audit(&self) -> anyhow::Result<Result<u64, audit::ChainBreak>> {
        self.read(|c| {
            // One read transaction: the head and the records are one snapshot.
            c.execute_batch("BEGIN")?;
            let result = (|| {
                let head: i64 =
                    c.query_row("SELECT seq FROM audit_head WHERE id = 1", [], |r| r.get(0))?;
                let mut st = c.prepare(&format!("{AUDIT_SELECT} ORDER BY seq"))?;
                let mut rows = st.query([])?;
                let mut v = audit::Verifier::new();
                while let Some(row) = rows.next()? {
                    let rec = audit_row(row)?;
                    if let Err(b) = v.feed(&rec) {
                        return Ok(Err(b));
                    }
                }
                // Records cut from the end leave the head pointing past the last one.
                let last = v.head().map_or(0, |(seq, _)| *seq);
                if head > last {
                    return Ok(Err(audit::ChainBreak::Removed {
                        after: last,
                        next: head + 1,
                    }));
                }
                Ok(Ok(v.checked))
            })();
            c.execute_batch("COMMIT")?;
            result
        })
        .await
    }

    // ---- data queries ----

    /// One data query.
    pub async fn data_query(&self, id: &str) -> anyhow::Result<Option<DataQueryRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!("{QUERY_SELECT} WHERE id = ?"))?
                .query_row([id], query_row)
                .optional()?
                .transpose()
        })
        .await
    }

    /// Data queries matching `f`, in id order.
    pub async fn data_queries(&self, f: QueryFilter) -> anyhow::Result<Vec<DataQueryRecord>> {
        self.read(move |c| {
            let status = f.status.map(QueryStatus::as_str);
            let mut st = c.prepare_cached(&format!(
                "{QUERY_SELECT} WHERE (?1 IS NULL OR site = ?1) AND (?2 IS NULL OR status = ?2) AND id > ?3 ORDER BY id LIMIT ?4"
            ))?;
            let rows = st.query_map(
                params![f.site, status, f.after.unwrap_or_default(), f.limit as i64],
                query_row,
            )?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|q| q))
                .collect()
        })
        .await
    }

    /// Applies a lifecycle step with its audit records, in one transaction;
    /// `false` (nothing written, no audit) when the query is not in a
    /// status the step starts from (or does not exist).
    pub async fn change_query(
        &self,
        id: &str,
        change: QueryChange,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        let (id, by) = (id.to_string(), by.to_string());
        self.custom(audit, move |c| {
                let from = change.from_statuses();
                let ok = |s: QueryStatus| from.contains(&s);
                let n = match &change {
                    QueryChange::Answer(text) => c.execute(
                        "UPDATE data_queries SET status = 'answered', answer = ?, answered_at = ?, answered_by = ? WHERE id = ? AND status = 'open'",
                        params![text, at, by, id],
                    )?,
                    QueryChange::Close => c.execute(
                        "UPDATE data_queries SET status = 'closed', closed_at = ?, closed_by = ? WHERE id = ? AND status IN (?, ?)",
                        params![
                            at,
                            by,
                            id,
                            ok(QueryStatus::Open).then_some("open"),
                            ok(QueryStatus::Answered).then_some("answered")
                        ],
                    )?,
                };
                // Not in a status this step starts from: nothing changed.
                Ok(n > 0)
            })
            .await
    }

    /// Runs raw SQL on the writer's connection. For tests that play an
    /// attacker with direct database access (audit tampering).
    pub async fn execute_raw(&self, sql: &str) -> anyhow::Result<()> {
        let sql = sql.to_string();
        self.custom(Vec::new(), move |c| {
            Ok(c.execute_batch(&sql).map(|()| true)?)
        })
        .await
        .map(|_| ())
    }
}

pub(crate) const QUERY_SELECT: &str =
    "SELECT id, trial, site, patient, rtype, rid, measurement, value, unit, soft_low, soft_high, location, text, status, answer, opened_at, opened_by, answered_at, answered_by, closed_at, closed_by FROM data_queries";

/// A data query row; the outer error is the driver's, the inner a bad status.
fn query_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<DataQueryRecord>> {
    let status: String = r.get(13)?;
    let rec = DataQueryRecord {
        query: NewDataQuery {
            id: r.get(0)?,
            trial: r.get(1)?,
            site: r.get(2)?,
            patient: r.get(3)?,
            resource_type: r.get(4)?,
            resource_id: r.get(5)?,
            measurement: r.get(6)?,
            value: r.get(7)?,
            unit: r.get(8)?,
            soft_low: r.get(9)?,
            soft_high: r.get(10)?,
            location: r.get(11)?,
            text: r.get(12)?,
            opened_at: r.get(15)?,
            opened_by: r.get(16)?,
        },
        status: QueryStatus::Open,
        answer: r.get(14)?,
        answered_at: r.get(17)?,
        answered_by: r.get(18)?,
        closed_at: r.get(19)?,
        closed_by: r.get(20)?,
    };
    Ok(match QueryStatus::parse(&status) {
        Some(status) => Ok(DataQueryRecord { status, ..rec }),
        None => Err(anyhow!("unknown data query status {status:?}")),
    })
}

fn insert_queries(c: &Connection, queries: &[NewDataQuery]) -> Result<(), WriteError> {
    for q in queries {
        c.prepare_cached(
            "INSERT INTO data_queries (id, trial, site, patient, rtype, rid, measurement, value, unit, soft_low, soft_high, location, text, status, opened_at, opened_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?)",
        )
        .map_err(db)?
        .execute(params![
            q.id,
            q.trial,
            q.site,
            q.patient,
            q.resource_type,
            q.resource_id,
            q.measurement,
            q.value,
            q.unit,
            q.soft_low,
            q.soft_high,
            q.location,
            q.text,
            q.opened_at,
            q.opened_by
        ])
        .map_err(db)?;
    }
    Ok(())
}

pub(crate) const BATCH_SELECT: &str =
    "SELECT id, format, sha256, submitter, role, received_at, status, received, stored, rejected, duplicates, queries_opened, scope FROM ingest_batches";

/// A batch row; the outer error is the driver's, the inner a bad status.
fn batch_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<BatchRecord>> {
    let status: String = row.get(6)?;
    let scope: String = row.get(12)?;
    let n = |i: usize| row.get::<_, i64>(i).map(|v| v as u64);
    let counts = BatchCounts {
        received: n(7)?,
        stored: n(8)?,
        rejected: n(9)?,
        duplicates: n(10)?,
        queries_opened: n(11)?,
    };
    let (id, format, sha256, submitter, role, received_at) = (
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    );
    let parsed = BatchStatus::parse(&status)
        .and_then(|status| Ok((status, IngestScope::from_column(&scope)?)));
    Ok(parsed.map(|(status, scope)| BatchRecord {
        id,
        format,
        sha256,
        submitter,
        role,
        scope,
        received_at,
        status,
        counts,
    }))
}

pub(crate) const AUDIT_SELECT: &str =
    "SELECT seq, time, actor, role, action, rtype, rid, vid, reason, outcome, client, detail, prev_hash, hash FROM audit_log";

pub(crate) fn push_audit_filters(s: &mut sql::Sql, q: &AuditQuery) {
    if let Some(t) = q.since {
        s.push(" AND time >= ").int(t);
    }
    if let Some(t) = q.until {
        s.push(" AND time <= ").int(t);
    }
    if let Some(a) = &q.actor {
        s.push(" AND actor = ").text(a);
    }
    if let Some(e) = &q.entity {
        match e.split_once('/') {
            Some((t, id)) => {
                s.push(" AND rtype = ").text(t).push(" AND rid = ").text(id);
            }
            None => {
                s.push(" AND rtype = ").text(e);
            }
        }
    }
}

fn audit_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ChainedAudit> {
    Ok(ChainedAudit {
        seq: row.get(0)?,
        record: AuditRecord {
            time: row.get(1)?,
            actor: row.get(2)?,
            role: row.get(3)?,
            action: row.get(4)?,
            resource_type: row.get(5)?,
            resource_id: row.get(6)?,
            version: row.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            reason: row.get(8)?,
            outcome: row.get(9)?,
            client: row.get(10)?,
            detail: row.get(11)?,
        },
        prev_hash: row.get(12)?,
        hash: row.get(13)?,
    })
}

/// A version read as `vid, last_updated, deleted, patient, body`.
fn version_row(rtype: &str, id: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredResource> {
    Ok(StoredResource {
        resource_type: rtype.to_string(),
        id: id.to_string(),
        version: row.get::<_, i64>(0)? as u64,
        last_updated: row.get(1)?,
        deleted: row.get::<_, i64>(2)? != 0,
        patient: row.get(3)?,
        body: row.get(4)?,
    })
}

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role: row.get(2)?,
        site: row.get(3)?,
        patient: row.get(4)?,
        created: row.get(5)?,
        expires: row.get(6)?,
        revoked: row.get::<_, i64>(7)? != 0,
    })
}

fn trial_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TrialRecord> {
    Ok(TrialRecord {
        id: row.get(0)?,
        version: row.get(1)?,
        protocol: row.get(2)?,
        loaded_at: row.get(3)?,
    })
}

fn to_sql(v: &SqlValue) -> &dyn ToSql {
    match v {
        SqlValue::Text(s) => s,
        SqlValue::Int(i) => i,
        SqlValue::Real(f) => f,
    }
}

fn stored_row(rtype: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredResource, i64)> {
    Ok((
        StoredResource {
            resource_type: rtype.to_string(),
            id: row.get(0)?,
            version: row.get::<_, i64>(1)? as u64,
            last_updated: row.get(2)?,
            patient: row.get(3)?,
            deleted: false,
            body: row.get(5)?,
        },
        row.get(4)?,
    ))
}

fn run_rows(
    c: &Connection,
    rtype: &str,
    s: &sql::Sql,
) -> anyhow::Result<Vec<(StoredResource, i64)>> {
    let mut st = c.prepare_cached(&s.text)?;
    let rows = st.query_map(
        rusqlite::params_from_iter(s.params.iter().map(to_sql)),
        |r| stored_row(rtype, r),
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn search_blocking(
    c: &Connection,
    q: &clinflow_fhir::search::SearchQuery,
    scope: &Scope,
) -> anyhow::Result<SearchPage> {
    let mut page = SearchPage::default();
    if q.total || q.count == 0 {
        let s = sql::search_count(Dialect::Sqlite, q, scope);
        let n: i64 = c.prepare_cached(&s.text)?.query_row(
            rusqlite::params_from_iter(s.params.iter().map(to_sql)),
            |r| r.get(0),
        )?;
        page.total = Some(n as u64);
    }
    if q.count > 0 {
        let s = sql::search_page(Dialect::Sqlite, q, scope)?;
        let mut rows = run_rows(c, &q.resource_type, &s)?;
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
            let s = sql::include_targets(Dialect::Sqlite, &q.resource_type, "subject", &ids);
            let mut st = c.prepare(&s.text)?;
            let targets = st
                .query_map(
                    rusqlite::params_from_iter(s.params.iter().map(to_sql)),
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (t, id) in targets {
                by_type.entry(t).or_default().push(id);
            }
            for (t, ids) in by_type {
                let s = sql::read_many(Dialect::Sqlite, &t, &ids, scope);
                page.included
                    .extend(run_rows(c, &t, &s)?.into_iter().map(|(r, _)| r));
            }
        }
    }
    Ok(page)
}

// ---- the writer ----

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        // Read-audit jobs are small and do not count toward the group's
        // size; write requests do, so one group's transaction stays short.
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
        commit_group(&mut conn, jobs);
    }
    tracing::debug!("sqlite writer stopped: every sender is gone");
}

enum Outcome {
    Write(
        oneshot::Sender<Result<(), WriteError>>,
        Result<(), WriteError>,
    ),
    Custom(oneshot::Sender<anyhow::Result<bool>>, anyhow::Result<bool>),
    Flush(oneshot::Sender<()>),
}

fn commit_group(conn: &mut Connection, jobs: Vec<Job>) {
    // A group of read-audit records only is committed without waiting for
    // the disk (WAL, synchronous=NORMAL: safe against a process crash, not
    // a power cut). Nobody waits for these records, and ARCHITECTURE.md
    // already allows losing the queued ones in a crash; this keeps reads
    // from costing an fsync each under load. Any group with a write in it
    // is committed with synchronous=FULL.
    let audit_only = jobs.iter().all(|j| matches!(j, Job::Audit(_)));
    if audit_only {
        let _ = conn.execute_batch("PRAGMA synchronous=NORMAL");
    }
    // First try: apply every write as it comes, without reading first.
    // Conflicts are rare (the server assigns fresh ids to creates; only a
    // stale If-Match, a client-chosen id or a duplicate conditional create
    // conflicts), so checking each op before applying it (one B-tree seek
    // per resource, ~10% of the writer's time in profiles) is paid only
    // when a conflict shows up: then the whole group is rolled back and
    // run again with every request checked. Custom jobs are closures that
    // cannot run twice, so a group with one goes the checked way at once.
    let retryable = !jobs.iter().any(|j| matches!(j, Job::Custom(..)));
    let (result, outcomes) = if retryable {
        match commit_unchecked(conn, &jobs) {
            Ok(()) => (Ok(()), all_ok(jobs)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                if !matches!(e, WriteError::Conflict { .. }) {
                    tracing::warn!(error = %e, "unchecked group failed; retrying it checked");
                }
                commit_checked(conn, jobs)
            }
        }
    } else {
        commit_checked(conn, jobs)
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "group commit failed; every request in it fails");
        let _ = conn.execute_batch("ROLLBACK");
    }
    if audit_only {
        if let Err(e) = conn.execute_batch("PRAGMA synchronous=FULL") {
            // Never go on writing clinical data without full durability.
            tracing::error!(error = %e, "cannot restore synchronous=FULL; the writer stops");
            std::process::abort();
        }
    }
    for o in outcomes {
        match o {
            Outcome::Write(reply, r) => {
                let r = match (&result, r) {
                    (Ok(()), r) => r,
                    (Err(e), _) => Err(WriteError::Db(anyhow!("commit failed: {e}"))),
                };
                let _ = reply.send(r);
            }
            Outcome::Custom(reply, r) => {
                let r = match (&result, r) {
                    (Ok(()), r) => r,
                    (Err(e), _) => Err(anyhow!("commit failed: {e}")),
                };
                let _ = reply.send(r);
            }
            Outcome::Flush(reply) => {
                let _ = reply.send(());
            }
        }
    }
}

/// Applies and commits a group without Custom jobs and without prechecks;
/// any error (a conflict included) leaves the transaction open for the
/// caller to roll back.
fn commit_unchecked(conn: &Connection, jobs: &[Job]) -> Result<(), WriteError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
    let mut stmts = Stmts::new(conn).map_err(db)?;
    let mut audit: Vec<&AuditRecord> = Vec::new();
    for job in jobs {
        match job {
            Job::Write(p, _) => {
                apply_ops(&mut stmts, p)?;
                insert_queries(conn, &p.req.queries)?;
                audit.extend(&p.req.audit);
            }
            Job::Audit(records) => audit.extend(records),
            Job::Flush(_) => {}
            Job::Custom(..) => {
                unreachable!("commit_unchecked is only given groups without Custom jobs")
            }
        }
    }
    if !audit.is_empty() {
        append_audit(conn, audit).map_err(WriteError::Db)?;
    }
    conn.execute_batch("COMMIT").map_err(db)
}

/// What every job of a committed group is answered.
fn all_ok(jobs: Vec<Job>) -> Vec<Outcome> {
    jobs.into_iter()
        .filter_map(|job| match job {
            Job::Write(_, reply) => Some(Outcome::Write(reply, Ok(()))),
            Job::Flush(reply) => Some(Outcome::Flush(reply)),
            Job::Audit(_) => None,
            Job::Custom(_, _, reply) => Some(Outcome::Custom(reply, Ok(true))),
        })
        .collect()
}

/// Runs a group checking each write request before applying it, so that
/// a request that cannot commit fails alone and the others commit.
fn commit_checked(conn: &Connection, jobs: Vec<Job>) -> (anyhow::Result<()>, Vec<Outcome>) {
    let mut outcomes = Vec::with_capacity(jobs.len());
    let result = (|| -> anyhow::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut stmts = Stmts::new(conn)?;
        let mut audit_records = Vec::new();
        for job in jobs {
            match job {
                Job::Write(p, reply) => {
                    // Checked first, so that a request that cannot commit
                    // writes nothing and needs no savepoint: savepoints made
                    // SQLite copy every page an earlier request of the group
                    // had touched into its sub-journal (seen in profiles).
                    // The writer holds the database's write lock, so what
                    // the check reads stays true until the apply.
                    match precheck(conn, &p.req.ops) {
                        Err(e) => outcomes.push(Outcome::Write(reply, Err(e))),
                        Ok(()) => match apply_ops(&mut stmts, &p)
                            .and_then(|()| insert_queries(conn, &p.req.queries))
                        {
                            Ok(()) => {
                                audit_records.extend(p.req.audit);
                                outcomes.push(Outcome::Write(reply, Ok(())));
                            }
                            Err(e) => {
                                // Half-applied: only undoing the whole group is safe.
                                outcomes.push(Outcome::Write(
                                    reply,
                                    Err(WriteError::Db(anyhow!("write failed"))),
                                ));
                                return Err(anyhow!("a checked write failed: {e}"));
                            }
                        },
                    }
                }
                Job::Custom(f, audit, reply) => {
                    let r = custom_in_savepoint(conn, f);
                    if matches!(r, Ok(true)) {
                        audit_records.extend(audit);
                    }
                    outcomes.push(Outcome::Custom(reply, r));
                }
                Job::Audit(records) => audit_records.extend(records),
                Job::Flush(reply) => outcomes.push(Outcome::Flush(reply)),
            }
        }
        if !audit_records.is_empty() {
            append_audit(conn, audit_records.iter().collect())?;
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    })();
    (result, outcomes)
}

/// A custom job in a savepoint: released when it applied, rolled back when
/// it did not or failed.
fn custom_in_savepoint(conn: &Connection, f: CustomFn) -> anyhow::Result<bool> {
    conn.execute_batch("SAVEPOINT req")?;
    let r = f(conn);
    if matches!(r, Ok(true)) {
        conn.execute_batch("RELEASE req")?;
    } else {
        conn.execute_batch("ROLLBACK TO req; RELEASE req")?;
    }
    r
}

/// Checks every op's `Expect` as if the request's ops were applied one
/// after the other (a create then an update of one resource is fine; the
/// same create twice conflicts). Reads only.
fn precheck(c: &Connection, ops: &[WriteOp]) -> Result<(), WriteError> {
    let mut after: std::collections::HashMap<(&str, &str), u64> = std::collections::HashMap::new();
    for op in ops {
        let key = (op.resource_type.as_str(), op.id.as_str());
        let found = match after.get(&key) {
            Some(v) => Some(*v),
            None => current_version(c, &op.resource_type, &op.id)?,
        };
        let holds = match op.expect {
            Expect::Absent => found.is_none(),
            Expect::Version(v) => found == Some(v),
        };
        if !holds {
            return Err(WriteError::Conflict {
                resource_type: op.resource_type.clone(),
                id: op.id.clone(),
                expected: op.expect,
                found,
            });
        }
        after.insert(key, op.new_version);
    }
    Ok(())
}

fn db(e: rusqlite::Error) -> WriteError {
    WriteError::Db(e.into())
}

/// The writer's insert statements for one group, taken from the
/// connection's statement cache once per group rather than once per row
/// (each cache lookup hashes the SQL text: ~2% of the writer's CPU under
/// txload in profiles).
struct Stmts<'c> {
    conn: &'c Connection,
    resource: rusqlite::CachedStatement<'c>,
    version: rusqlite::CachedStatement<'c>,
    token: rusqlite::CachedStatement<'c>,
    string: rusqlite::CachedStatement<'c>,
    date: rusqlite::CachedStatement<'c>,
    reference: rusqlite::CachedStatement<'c>,
    quantity: rusqlite::CachedStatement<'c>,
}

impl<'c> Stmts<'c> {
    fn new(c: &'c Connection) -> rusqlite::Result<Stmts<'c>> {
        Ok(Stmts {
            conn: c,
            resource: c.prepare_cached(
                "INSERT INTO resources (rtype, id, vid, last_updated, deleted, patient, sort_date, tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )?,
            version: c.prepare_cached(
                "INSERT INTO resource_versions (rtype, id, vid, last_updated, deleted, body) VALUES (?, ?, ?, ?, ?, ?)",
            )?,
            token: c.prepare_cached(
                "INSERT OR IGNORE INTO idx_token (rtype, param, code, system, id) VALUES (?, ?, ?, ?, ?)",
            )?,
            string: c.prepare_cached(
                "INSERT OR IGNORE INTO idx_string (rtype, id, param, value) VALUES (?, ?, ?, ?)",
            )?,
            date: c.prepare_cached(
                "INSERT OR IGNORE INTO idx_date (rtype, id, param, low, high) VALUES (?, ?, ?, ?, ?)",
            )?,
            reference: c.prepare_cached(
                "INSERT OR IGNORE INTO idx_reference (rtype, id, param, target_type, target_id) VALUES (?, ?, ?, ?, ?)",
            )?,
            quantity: c.prepare_cached(
                "INSERT OR IGNORE INTO idx_quantity (rtype, id, param, value, system, code) VALUES (?, ?, ?, ?, ?, ?)",
            )?,
        })
    }
}

fn apply_ops(st: &mut Stmts<'_>, p: &Prepared) -> Result<(), WriteError> {
    for (op, tokens) in p.req.ops.iter().zip(&p.tokens) {
        apply_op(st, op, tokens)?;
    }
    Ok(())
}

fn current_version(c: &Connection, rtype: &str, id: &str) -> Result<Option<u64>, WriteError> {
    c.prepare_cached("SELECT vid FROM resources WHERE rtype = ? AND id = ?")
        .map_err(db)?
        .query_row(params![rtype, id], |r| r.get::<_, i64>(0))
        .optional()
        .map(|v| v.map(|v| v as u64))
        .map_err(db)
}

fn apply_op(st: &mut Stmts<'_>, op: &WriteOp, tokens: &str) -> Result<(), WriteError> {
    let c = st.conn;
    let deleted = op.body.is_none();
    let patient = if deleted {
        None
    } else {
        op.extracted.patient.as_deref()
    };
    let sort_date = op.extracted.sort_date.unwrap_or(sql::NO_SORT_DATE);
    let conflict = |found| WriteError::Conflict {
        resource_type: op.resource_type.clone(),
        id: op.id.clone(),
        expected: op.expect,
        found,
    };
    match op.expect {
        Expect::Absent => {
            let r = st.resource.execute(params![
                op.resource_type,
                op.id,
                op.new_version as i64,
                op.last_updated,
                deleted as i64,
                patient,
                sort_date,
                tokens
            ]);
            match r {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(conflict(current_version(c, &op.resource_type, &op.id)?));
                }
                Err(e) => return Err(db(e)),
            }
        }
        Expect::Version(v) => {
            // Before the row changes: the keys of the rows it replaces (if
            // the version is not v, the write fails below and rolls back).
            remove_token_rows(c, &op.resource_type, &op.id)?;
            let n = c
                .prepare_cached(
                    "UPDATE resources SET vid = ?, last_updated = ?, deleted = ?, patient = ?, sort_date = ?, tokens = ? WHERE rtype = ? AND id = ? AND vid = ?",
                )
                .map_err(db)?
                .execute(params![
                    op.new_version as i64,
                    op.last_updated,
                    deleted as i64,
                    patient,
                    sort_date,
                    tokens,
                    op.resource_type,
                    op.id,
                    v as i64
                ])
                .map_err(db)?;
            if n != 1 {
                return Err(conflict(current_version(c, &op.resource_type, &op.id)?));
            }
            for table in ["idx_string", "idx_date", "idx_reference", "idx_quantity"] {
                c.prepare_cached(&format!("DELETE FROM {table} WHERE rtype = ? AND id = ?"))
                    .map_err(db)?
                    .execute(params![op.resource_type, op.id])
                    .map_err(db)?;
            }
        }
    }
    st.version
        .execute(params![
            op.resource_type,
            op.id,
            op.new_version as i64,
            op.last_updated,
            deleted as i64,
            op.body
        ])
        .map_err(db)?;
    if deleted {
        return Ok(());
    }
    write_index(st, &op.resource_type, &op.id, &op.extracted.entries).map_err(db)?;
    if let (Some(site), Some(p)) = (&op.extracted.subject_site, &op.extracted.patient) {
        c.prepare_cached("INSERT INTO patient_sites (patient, site) VALUES (?, ?) ON CONFLICT (patient) DO UPDATE SET site = excluded.site")
            .map_err(db)?
            .execute(params![p, site])
            .map_err(db)?;
    }
    Ok(())
}

/// The token rows a resource version has, as `resources.tokens` keeps
/// them: a JSON array of `[param, system, code]`.
fn token_keys(entries: &[clinflow_fhir::IndexEntry]) -> String {
    fn push_str(out: &mut String, s: &str) {
        out.push('"');
        if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            out.push_str(s);
            out.push('"');
            return;
        }
        for ch in s.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    let mut out = String::from("[");
    for e in entries {
        if let IndexValue::Token { system, code } = &e.value {
            if out.len() > 1 {
                out.push(',');
            }
            out.push('[');
            push_str(&mut out, e.param);
            out.push(',');
            push_str(&mut out, system.as_deref().unwrap_or(""));
            out.push(',');
            push_str(&mut out, code);
            out.push(']');
        }
    }
    out.push(']');
    out
}

/// Deletes the `idx_token` rows of the version a write replaces. The table
/// is keyed in search order (type, parameter, code, system, id) with no
/// second index, which saves a B-tree insert per token on every create
/// (migration 6); the keys of a resource's rows are kept beside its current
/// version in `resources.tokens`. Keys that cannot be read (never written
/// so by this code) fall back to a scan of the type's rows: slow, complete.
fn remove_token_rows(c: &Connection, rtype: &str, id: &str) -> Result<(), WriteError> {
    let row: Option<Option<String>> = c
        .prepare_cached("SELECT tokens FROM resources WHERE rtype = ? AND id = ?")
        .map_err(db)?
        .query_row(params![rtype, id], |r| r.get(0))
        .optional()
        .map_err(db)?;
    // No such resource: nothing to remove (the write reports the conflict).
    let Some(keys) = row else { return Ok(()) };
    let parsed = keys
        .as_deref()
        .and_then(|k| clinflow_fhir::Json::parse(k).ok());
    let Some(clinflow_fhir::Json::Array(keys)) = parsed else {
        tracing::warn!(rtype, "unreadable token keys; scanning for the token rows");
        c.prepare_cached("DELETE FROM idx_token WHERE rtype = ? AND id = ?")
            .map_err(db)?
            .execute(params![rtype, id])
            .map_err(db)?;
        return Ok(());
    };
    let mut st = c
        .prepare_cached(
            "DELETE FROM idx_token WHERE rtype = ? AND param = ? AND system = ? AND code = ? AND id = ?",
        )
        .map_err(db)?;
    for key in &keys {
        let clinflow_fhir::Json::Array(parts) = key else {
            continue;
        };
        if let [param, system, code] = parts.as_slice() {
            if let (Some(p), Some(s), Some(k)) = (param.as_str(), system.as_str(), code.as_str()) {
                st.execute(params![rtype, p, s, k, id]).map_err(db)?;
            }
        }
    }
    Ok(())
}

fn write_index(
    st: &mut Stmts<'_>,
    rtype: &str,
    id: &str,
    entries: &[clinflow_fhir::IndexEntry],
) -> rusqlite::Result<()> {
    for e in entries {
        match &e.value {
            IndexValue::Token { system, code } => {
                st.token.execute(params![
                    rtype,
                    e.param,
                    code,
                    system.as_deref().unwrap_or(""),
                    id
                ])?;
            }
            IndexValue::String { value } => {
                st.string.execute(params![rtype, id, e.param, value])?;
            }
            IndexValue::Date { low, high } => {
                st.date.execute(params![rtype, id, e.param, low, high])?;
            }
            IndexValue::Reference {
                target_type,
                target_id,
            } => {
                st.reference
                    .execute(params![rtype, id, e.param, target_type, target_id])?;
            }
            IndexValue::Quantity {
                value,
                system,
                code,
            } => {
                st.quantity.execute(params![
                    rtype,
                    id,
                    e.param,
                    value,
                    system.as_deref().unwrap_or(""),
                    code.as_deref().unwrap_or("")
                ])?;
            }
        }
    }
    Ok(())
}

fn append_audit(c: &Connection, records: Vec<&AuditRecord>) -> anyhow::Result<()> {
    // The writer holds the database's write lock (BEGIN IMMEDIATE), so the
    // head read here is the head this append follows, even when another
    // process (the CLI) writes to the same file.
    // Chain after whichever is further ahead, the head row or the last
    // record, so a hand-inserted record cannot jam appends (verify reports it).
    let last: Option<(i64, String)> = c
        .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let recorded: Option<(i64, String)> = c
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let head = match (last, recorded) {
        (Some(l), Some(h)) => Some(if h.0 > l.0 { h } else { l }),
        (l, h) => l.or(h).filter(|(seq, _)| *seq > 0),
    };
    let mut st = c.prepare_cached(
        "INSERT INTO audit_log (seq, time, actor, role, action, rtype, rid, vid, reason, outcome, client, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    let (mut seq, mut prev) = head.unwrap_or((0, audit::GENESIS.to_string()));
    for r in records {
        seq += 1;
        let hash = audit::hash(seq, &prev, r);
        st.execute(params![
            seq,
            r.time,
            r.actor,
            r.role,
            r.action,
            r.resource_type,
            r.resource_id,
            r.version.map(|v| v as i64),
            r.reason,
            r.outcome,
            r.client,
            r.detail,
            prev,
            hash
        ])?;
        prev = hash;
    }
    c.prepare_cached("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")?
        .execute(params![seq, prev])?;
    Ok(())
}

/// Raises its flag when dropped armed: the read's future went away
/// (deadline, or the caller gone), so the statement stops at its next
/// progress check.
struct StopOnDrop(Option<Arc<AtomicBool>>);

impl StopOnDrop {
    /// The read answered: nothing to stop.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clinflow_fhir::Json;

    #[test]
    fn migration_10_keeps_every_version_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open_conn(&dir.path().join("v9.db"), false).unwrap();
        c.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)")
            .unwrap();
        for (version, sql) in &MIGRATIONS[..9] {
            c.execute_batch(sql).unwrap();
            c.execute("INSERT INTO schema_migrations VALUES (?, 0)", [version])
                .unwrap();
        }
        let body = format!(
            "{{\"resourceType\":\"Observation\",\"note\":\"{}\"}}",
            "x".repeat(3000)
        );
        c.execute(
            "INSERT INTO resource_versions VALUES ('Observation', 'o1', 1, 10, 0, ?), ('Observation', 'o1', 2, 20, 1, NULL), ('Patient', 'p1', 1, 30, 0, '{}')",
            [&body],
        )
        .unwrap();
        migrate(&mut c).unwrap();
        let rows: Vec<(String, String, i64, i64, i64, Option<String>)> = c
            .prepare("SELECT rtype, id, vid, last_updated, deleted, body FROM resource_versions ORDER BY rtype, id, vid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                ("Observation".into(), "o1".into(), 1, 10, 0, Some(body)),
                ("Observation".into(), "o1".into(), 2, 20, 1, None),
                ("Patient".into(), "p1".into(), 1, 30, 0, Some("{}".into())),
            ]
        );
        // The key still holds: a version cannot be written twice.
        let again = c.execute(
            "INSERT INTO resource_versions VALUES ('Patient', 'p1', 1, 40, 0, '{}')",
            [],
        );
        assert!(
            matches!(&again, Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation),
            "{again:?}"
        );
    }

    #[test]
    fn migration_6_keeps_token_rows_and_records_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open_conn(&dir.path().join("v5.db"), false).unwrap();
        c.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)")
            .unwrap();
        for (version, sql) in &MIGRATIONS[..5] {
            c.execute_batch(sql).unwrap();
            c.execute("INSERT INTO schema_migrations VALUES (?, 0)", [version])
                .unwrap();
        }
        c.execute_batch(
            "INSERT INTO resources VALUES ('Observation', 'o1', 1, 0, 0, 'p1', 0);
             INSERT INTO resources VALUES ('Observation', 'o2', 1, 0, 0, 'p1', 0);
             INSERT INTO idx_token VALUES ('Observation', 'o1', 'code', 'http://loinc.org', '8867-4');
             INSERT INTO idx_token VALUES ('Observation', 'o1', 'status', '', 'fi\"nal');",
        )
        .unwrap();
        migrate(&mut c).unwrap();
        let tokens = |id: &str| -> String {
            c.query_row("SELECT tokens FROM resources WHERE id = ?", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let Json::Array(keys) = Json::parse(&tokens("o1")).unwrap() else {
            panic!("an array")
        };
        let mut keys: Vec<String> = keys.iter().map(|k| k.to_compact()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                r#"["code","http://loinc.org","8867-4"]"#,
                r#"["status","","fi\"nal"]"#
            ]
        );
        assert_eq!(tokens("o2"), "[]");
        let rows: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM idx_token WHERE rtype = 'Observation' AND param = 'code' AND code = '8867-4' AND id = 'o1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 1);
        // The recorded keys are what a replacing write deletes.
        remove_token_rows(&c, "Observation", "o1").unwrap();
        let left: i64 = c
            .query_row("SELECT COUNT(*) FROM idx_token", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn token_keys_are_json_whatever_the_code_holds() {
        let entries = vec![clinflow_fhir::IndexEntry {
            param: "identifier",
            value: IndexValue::Token {
                system: Some("urn:a\\b".into()),
                code: "x\"y\u{1}z é".into(),
            },
        }];
        let keys = Json::parse(&token_keys(&entries)).expect("JSON");
        assert_eq!(
            keys.to_compact(),
            Json::parse(r#"[["identifier","urn:a\\b","x\"y\u0001z é"]]"#)
                .unwrap()
                .to_compact()
        );
    }
}
