//! clinflow's storage.
//!
//! One API ([`Store`]) over two engines with the same schema and the same
//! behaviour: SQLite (embedded default, [`sqlite`]) and PostgreSQL
//! ([`postgres`]). What is stored:
//!
//! - every version of every FHIR resource, as the JSON served back, plus the
//!   current version's search-index rows, written in the same transaction;
//! - which site each patient is enrolled at (for site scoping);
//! - API tokens (hashed), trial protocol versions;
//! - ingest batches: the raw input as received, status, counts, rejections;
//! - data queries (open, answered, closed; never deleted);
//! - the append-only, hash-chained audit trail ([`audit`]).
//!
//! Write path: writes are queued to one writer per process that commits them
//! in groups (one transaction, one savepoint per request), so many small
//! concurrent requests cost one commit. Audit records of a write commit with
//! it; read-audit records are queued and ride along the next group commit.
//!
//! Invariant: a [`Store::write`] that returned `Ok` is committed durably.

pub mod audit;
pub mod campaign;
pub mod imaging;
pub mod model;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::path::PathBuf;

pub use campaign::*;
pub use imaging::*;
pub use model::*;

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the data lives, parsed from `--database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH` (or `sqlite:PATH`).
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, passed to the driver as is.
    Postgres(String),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if p.is_empty() {
                return Err("sqlite URL without a path: use sqlite://PATH".into());
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(p)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else {
            Err(format!(
                "unsupported database URL {s:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB"
            ))
        }
    }
}

/// The store: one of the engines. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

macro_rules! dispatch {
    ($self:ident . $m:ident ( $($a:expr),* )) => {
        match $self {
            Store::Sqlite(s) => s.$m($($a),*).await,
            Store::Postgres(s) => s.$m($($a),*).await,
        }
    };
}

impl Store {
    /// Opens the database (creating and migrating it when needed).
    pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Store> {
        Ok(match url {
            DatabaseUrl::Sqlite(p) => Store::Sqlite(sqlite::SqliteStore::open(p).await?),
            DatabaseUrl::Postgres(u) => Store::Postgres(postgres::PgStore::open(u).await?),
        })
    }

    /// The engine's name, for logs and metrics.
    pub fn engine(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        dispatch!(self.ping())
    }

    /// Commits a write request atomically, with its audit records.
    pub async fn write(&self, req: WriteRequest) -> Result<(), WriteError> {
        dispatch!(self.write(req))
    }

    /// Queues read-audit records; they commit with the next group (see
    /// ARCHITECTURE.md for what a crash can lose).
    pub async fn audit(&self, records: Vec<AuditRecord>) -> anyhow::Result<()> {
        dispatch!(self.audit(records))
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> anyhow::Result<()> {
        dispatch!(self.flush())
    }

    pub async fn read_current(
        &self,
        rtype: &str,
        id: &str,
    ) -> anyhow::Result<Option<StoredResource>> {
        dispatch!(self.read_current(rtype, id))
    }

    pub async fn read_version(
        &self,
        rtype: &str,
        id: &str,
        vid: u64,
    ) -> anyhow::Result<Option<StoredResource>> {
        dispatch!(self.read_version(rtype, id, vid))
    }

    pub async fn history(
        &self,
        rtype: &str,
        id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<Vec<StoredResource>> {
        dispatch!(self.history(rtype, id, before, limit))
    }

    pub async fn search(
        &self,
        q: clinflow_fhir::search::SearchQuery,
        scope: Scope,
    ) -> anyhow::Result<SearchPage> {
        dispatch!(self.search(q, scope))
    }

    pub async fn find_by_identifier(
        &self,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> anyhow::Result<Vec<String>> {
        dispatch!(self.find_by_identifier(rtype, system, value))
    }

    /// For each group of `keys` (resource type, identifier value in
    /// `system`), the first key that names a live resource: its index in
    /// the group and the resource's id. One round trip for every group
    /// (ingest checks every resource of every item of a batch this way).
    pub async fn find_first_by_identifier_each(
        &self,
        system: &str,
        groups: Vec<Vec<(String, String)>>,
    ) -> anyhow::Result<Vec<Option<(usize, String)>>> {
        dispatch!(self.find_first_by_identifier_each(system, groups))
    }

    /// Every current `rtype` resource the scope allows (of `patient` only,
    /// when given), in id order. For read-whole views (dashboard, site
    /// registry) over types with at most thousands of resources.
    pub async fn current_resources(
        &self,
        rtype: &str,
        patient: Option<&str>,
        scope: Scope,
    ) -> anyhow::Result<Vec<StoredResource>> {
        dispatch!(self.current_resources(rtype, patient, scope))
    }

    /// One page of a patient's current resources of one type (the history
    /// services read a history this way). The query is stopped in the
    /// database when `deadline` passes (`ReadError::Deadline`) or when this
    /// future is dropped (the caller went away): SQLite is interrupted,
    /// PostgreSQL is sent a cancel request.
    pub async fn compartment_page(
        &self,
        q: CompartmentQuery,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<DatedResource>, ReadError> {
        // A timer armed at a deadline already gone may fire only after a
        // fast query has answered: check first.
        if tokio::time::Instant::now() >= deadline {
            return Err(ReadError::Deadline);
        }
        dispatch!(self.compartment_page(q, deadline))
    }

    /// Every patient's site: `(patient, site)`.
    pub async fn patient_sites(&self) -> anyhow::Result<Vec<(String, String)>> {
        dispatch!(self.patient_sites())
    }

    /// Items rejected in batches received at or after `since` (ms), of
    /// batches submitted in `scope` only when given.
    pub async fn rejected_since(
        &self,
        since: i64,
        scope: Option<IngestScope>,
    ) -> anyhow::Result<u64> {
        dispatch!(self.rejected_since(since, scope))
    }

    /// A signal per committed change of a site or a trial made by any
    /// process, where the engine can tell (PostgreSQL: LISTEN/NOTIFY);
    /// `None` on SQLite, whose one server sees its own writes.
    pub fn site_changes(&self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => Some(s.site_changes()),
        }
    }

    pub async fn patient_site(&self, patient: &str) -> anyhow::Result<Option<String>> {
        dispatch!(self.patient_site(patient))
    }

    pub async fn create_token(
        &self,
        rec: TokenRecord,
        hash: String,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<()> {
        dispatch!(self.create_token(rec, hash, audit))
    }

    pub async fn token_by_hash(&self, hash: &str) -> anyhow::Result<Option<TokenRecord>> {
        dispatch!(self.token_by_hash(hash))
    }

    pub async fn list_tokens(&self) -> anyhow::Result<Vec<TokenRecord>> {
        dispatch!(self.list_tokens())
    }

    pub async fn revoke_token(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        dispatch!(self.revoke_token(id, audit))
    }

    pub async fn put_trial(&self, rec: TrialRecord) -> anyhow::Result<bool> {
        dispatch!(self.put_trial(rec))
    }

    pub async fn trial_versions(&self, id: &str) -> anyhow::Result<Vec<TrialRecord>> {
        dispatch!(self.trial_versions(id))
    }

    pub async fn list_trials(&self) -> anyhow::Result<Vec<TrialRecord>> {
        dispatch!(self.list_trials())
    }

    /// Accepts an ingest batch: its row, raw input and `audit` commit
    /// together and durably before this returns. Content already accepted
    /// in the same format (same SHA-256) writes nothing and gives the
    /// existing batch, with `false`.
    pub async fn put_batch(
        &self,
        batch: NewBatch,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<(BatchRecord, bool)> {
        dispatch!(self.put_batch(batch, audit))
    }

    pub async fn batch(&self, id: &str) -> anyhow::Result<Option<BatchRecord>> {
        dispatch!(self.batch(id))
    }

    /// A batch's raw input, as received.
    pub async fn batch_input(&self, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        dispatch!(self.batch_input(id))
    }

    /// A batch's rejections, in input order.
    pub async fn batch_rejections(&self, id: &str) -> anyhow::Result<Vec<BatchRejection>> {
        dispatch!(self.batch_rejections(id))
    }

    /// Records a batch's counts and rejections and marks it done, in one
    /// transaction; `false` (nothing written) when it was not processing.
    pub async fn finish_batch(
        &self,
        id: &str,
        counts: BatchCounts,
        rejections: Vec<BatchRejection>,
    ) -> anyhow::Result<bool> {
        dispatch!(self.finish_batch(id, counts, rejections))
    }

    /// Puts a done batch back to processing (to be run again: a retry),
    /// clearing its rejections, with its audit records, in one
    /// transaction; `false` (nothing written) when it is not done.
    pub async fn reopen_batch(&self, id: &str, audit: Vec<AuditRecord>) -> anyhow::Result<bool> {
        dispatch!(self.reopen_batch(id, audit))
    }

    /// Records the retry of item `index` of a done batch, with its audit
    /// records, in one transaction: the item's rejections replaced by
    /// `rejections` (its new ones, if any) and the counts changed as `fate`
    /// says. `false` (nothing written) when the batch is not done or has no
    /// rejection of that item (a retry already resolved it).
    pub async fn retry_item(
        &self,
        batch: &str,
        index: u64,
        fate: RetriedFate,
        rejections: Vec<BatchRejection>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        dispatch!(self.retry_item(batch, index, fate, rejections, audit))
    }

    /// Batches not done, oldest first: what a restart resumes.
    pub async fn unfinished_batches(&self) -> anyhow::Result<Vec<String>> {
        dispatch!(self.unfinished_batches())
    }

    /// One data query.
    pub async fn data_query(&self, id: &str) -> anyhow::Result<Option<DataQueryRecord>> {
        dispatch!(self.data_query(id))
    }

    /// Data queries matching the filter, in id (opening) order, at most
    /// `limit`.
    pub async fn data_queries(&self, f: QueryFilter) -> anyhow::Result<Vec<DataQueryRecord>> {
        dispatch!(self.data_queries(f))
    }

    /// Applies a data query's lifecycle step and commits `audit` with it,
    /// in one transaction. `false`, with nothing written, when the query's
    /// status does not allow the step (or there is no such query).
    pub async fn change_query(
        &self,
        id: &str,
        change: QueryChange,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        dispatch!(self.change_query(id, change, by, at, audit))
    }

    pub async fn audit_records(&self, q: AuditQuery) -> anyhow::Result<Vec<ChainedAudit>> {
        dispatch!(self.audit_records(q))
    }

    pub async fn verify_audit(&self) -> anyhow::Result<Result<u64, audit::ChainBreak>> {
        dispatch!(self.verify_audit())
    }

    // ---- campaigns (see [`campaign`]) ----

    /// Writes a campaign and every one of its delivery rows, suppressing
    /// those of opted-out recipients, with its audit records, in one
    /// transaction. When the creator already made a campaign with the same
    /// idempotency key nothing is written and that campaign's id is
    /// answered with `false`.
    pub async fn create_campaign(
        &self,
        c: NewCampaign,
        deliveries: Vec<NewDelivery>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Created> {
        dispatch!(self.create_campaign(c, deliveries, audit))
    }

    pub async fn campaign(&self, id: &str) -> anyhow::Result<Option<CampaignRecord>> {
        dispatch!(self.campaign(id))
    }

    /// Campaigns in id (creation) order after `after`, at most `limit`.
    pub async fn campaigns(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<CampaignRecord>> {
        dispatch!(self.campaigns(after, limit))
    }

    /// A campaign's rows per (channel, status).
    pub async fn delivery_counts(&self, campaign: &str) -> anyhow::Result<DeliveryCounts> {
        dispatch!(self.delivery_counts(campaign))
    }

    /// A campaign's rows sent (or resolved by a send) since `since`, per
    /// channel: its current rate.
    pub async fn sent_since(
        &self,
        campaign: &str,
        since: i64,
    ) -> anyhow::Result<Vec<(Channel, u64)>> {
        dispatch!(self.sent_since(campaign, since))
    }

    /// A page of a campaign's deliveries, in id order.
    pub async fn deliveries(&self, f: DeliveryFilter) -> anyhow::Result<Vec<DeliveryRecord>> {
        dispatch!(self.deliveries(f))
    }

    pub async fn delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRecord>> {
        dispatch!(self.delivery(id))
    }

    /// Cancels a campaign: its pending rows become `cancelled` (rows
    /// already claimed finish their one send). The number of rows
    /// cancelled, or `None` (nothing written, no audit) when there is no
    /// such campaign or it was cancelled before.
    pub async fn cancel_campaign(
        &self,
        id: &str,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Option<u64>> {
        dispatch!(self.cancel_campaign(id, by, at, audit))
    }

    /// Claims up to `limit` due pending rows of `channel` under the token
    /// `claim`: each becomes `sending` with `lease_until = now + lease_ms`
    /// and one more attempt, committed before this returns. Rows claimed
    /// by one call are never returned by another (SKIP LOCKED on
    /// PostgreSQL, the single writer on SQLite).
    pub async fn claim_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
        claim: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        dispatch!(self.claim_deliveries(channel, now, limit, claim, lease_ms))
    }

    /// Writes claim holders' outcomes in one transaction; an update applies
    /// only while its row is still `sending` under its claim (or was given
    /// up as [`OUTCOME_UNKNOWN`] meanwhile). The number applied.
    pub async fn record_deliveries(&self, updates: Vec<DeliveryUpdate>) -> anyhow::Result<u64> {
        dispatch!(self.record_deliveries(updates))
    }

    /// Rows of `channel` left `sending` past their lease: their sender
    /// died or lost contact. Resolving them is the caller's job.
    pub async fn stale_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        dispatch!(self.stale_deliveries(channel, now, limit))
    }

    /// A provider's status report on an SMS delivery, moving it only
    /// forwards; `false` when it did not apply (unknown row, another
    /// message id, or a report older than what is known).
    pub async fn provider_report(
        &self,
        delivery: &str,
        provider_id: &str,
        report: ProviderReport,
        error: Option<String>,
        at: i64,
    ) -> anyhow::Result<bool> {
        dispatch!(self.provider_report(delivery, provider_id, report, error, at))
    }

    /// Records a recipient's opt-out of a channel and suppresses their
    /// pending rows of it, with its audit records, in one transaction;
    /// `false` (nothing written) when they had opted out already.
    pub async fn opt_out(
        &self,
        practitioner: &str,
        channel: Channel,
        source: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        dispatch!(self.opt_out(practitioner, channel, source, at, audit))
    }

    /// Every opt-out: (practitioner, channel).
    pub async fn opt_outs(&self) -> anyhow::Result<Vec<(String, Channel)>> {
        dispatch!(self.opt_outs())
    }

    /// A secret the database generated at migration (`unsubscribe`).
    pub async fn secret(&self, name: &str) -> anyhow::Result<Option<String>> {
        dispatch!(self.secret(name))
    }

    // ---- imaging (see [`imaging`]) ----

    /// Indexes a DICOM instance and upserts its series' study, series and
    /// analysis task rows, with `audit`, in one transaction. A SOP Instance
    /// UID stored before writes nothing (and no audit): `Duplicate`, with
    /// `same_content` when its SHA-256 matches. The task: absent -> queued
    /// due at `settle_until`; queued/failed -> due at the later of the two;
    /// running -> marked dirty; done/dead -> queued again, attempts 0.
    pub async fn put_dicom_instance(
        &self,
        rec: DicomInstanceRecord,
        task: TaskSpec,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<PutInstance> {
        dispatch!(self.put_dicom_instance(rec, Some(task), None, audit))
    }

    /// As [`Store::put_dicom_instance`] for an instance of a study held in
    /// quarantine (its patient is not a subject of the trial): indexed,
    /// the study marked with `reason` (a study's first reason stays), and
    /// no analysis task.
    pub async fn put_quarantined_dicom_instance(
        &self,
        rec: DicomInstanceRecord,
        reason: String,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<PutInstance> {
        dispatch!(self.put_dicom_instance(rec, None, Some(reason), audit))
    }

    /// A study's instances, by series then instance number.
    pub async fn study_instances(&self, study_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        dispatch!(self.study_instances(study_uid))
    }

    /// The analysis queue's depth and its oldest due task, at `now`.
    pub async fn imaging_queue_stats(&self, now: i64) -> anyhow::Result<QueueStats> {
        dispatch!(self.imaging_queue_stats(now))
    }

    /// The association that sent `series` ended: their queued tasks are
    /// due by `now`.
    pub async fn release_series(&self, series: Vec<String>, now: i64) -> anyhow::Result<()> {
        dispatch!(self.release_series(series, now))
    }

    /// QIDO-RS studies, by study date then UID.
    pub async fn dicom_studies(&self, q: DicomQuery) -> anyhow::Result<Vec<StudyRecord>> {
        dispatch!(self.dicom_studies(q))
    }

    pub async fn dicom_instance(&self, sop_uid: &str) -> anyhow::Result<Option<StoredInstance>> {
        dispatch!(self.dicom_instance(sop_uid))
    }

    /// A series' instances by instance number.
    pub async fn series_instances(&self, series_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        dispatch!(self.series_instances(series_uid))
    }

    /// Claims the oldest due task (queued or failed and due, or running
    /// with an expired lease): running under `worker` until
    /// `now + lease_ms`, one more attempt. Two claims never get the same
    /// task (SKIP LOCKED on PostgreSQL, the single writer on SQLite).
    pub async fn claim_imaging_task(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
    ) -> anyhow::Result<Option<TaskRecord>> {
        dispatch!(self.claim_imaging_task(worker, now, lease_ms))
    }

    /// `false` when the task is no longer running under `worker`.
    pub async fn extend_lease(
        &self,
        id: &str,
        worker: &str,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        dispatch!(self.extend_lease(id, worker, lease_until))
    }

    /// Records a broker delivery of a task: running under `worker`,
    /// attempt `attempt` (the broker counts deliveries).
    pub async fn mark_task_running(
        &self,
        id: &str,
        worker: &str,
        attempt: u32,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        dispatch!(self.mark_task_running(id, worker, attempt, lease_until))
    }

    /// Applies a worker's outcome only while the task is running under
    /// `worker` (a worker whose lease expired gets `false`). `Done` on a
    /// dirty task queues it again, due at `now`.
    pub async fn finish_task(
        &self,
        id: &str,
        worker: &str,
        outcome: TaskOutcome,
        now: i64,
    ) -> anyhow::Result<bool> {
        dispatch!(self.finish_task(id, worker, outcome, now))
    }

    pub async fn imaging_task(&self, id: &str) -> anyhow::Result<Option<TaskRecord>> {
        dispatch!(self.imaging_task(id))
    }

    /// Tasks in id order after `after`, at most `limit`.
    pub async fn imaging_tasks(
        &self,
        status: Option<TaskStatus>,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<TaskRecord>> {
        dispatch!(self.imaging_tasks(status, after, limit))
    }

    /// A failed or dead task queued again (attempts 0), with `audit`;
    /// `false` (nothing written) in any other status.
    pub async fn retry_imaging_task(
        &self,
        id: &str,
        now: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        dispatch!(self.retry_imaging_task(id, now, audit))
    }

    /// Queued tasks not yet published to a broker, oldest first.
    pub async fn unpublished_tasks(&self, limit: usize) -> anyhow::Result<Vec<TaskRecord>> {
        dispatch!(self.unpublished_tasks(limit))
    }

    pub async fn mark_published(&self, ids: Vec<String>) -> anyhow::Result<()> {
        dispatch!(self.mark_published(ids))
    }

    /// Raw SQL on a writing connection: only for tests that tamper with the
    /// database as an attacker with file access would.
    pub async fn execute_raw(&self, sql: &str) -> anyhow::Result<()> {
        dispatch!(self.execute_raw(sql))
    }
}
