//! Imaging on PostgreSQL. Audited writes (storing an instance, which
//! upserts its series' task; an operator's retry) go through the writer
//! in its transaction; the task queue does not: a claim is one `UPDATE ...
//! WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)` on a pooled connection,
//! so several processes claim disjoint tasks.

use tokio_postgres::{Client, Row};

use super::{db, PgStore};
use crate::imaging::*;
use crate::model::{AuditRecord, Expect, WriteError};

/// The audited imaging writes, applied by the writer in its transaction.
pub(super) enum ImagingOp {
    /// The instance, its series' task (`None`: quarantined, no task), the
    /// quarantine reason.
    Put(Box<DicomInstanceRecord>, Option<TaskSpec>, Option<String>),
    /// Task id, now.
    Retry(String, i64),
}

fn conflict(what: &str, id: &str) -> WriteError {
    WriteError::Conflict {
        resource_type: what.into(),
        id: id.into(),
        expected: Expect::Absent,
        found: None,
    }
}

/// Applies `op` in the writer's transaction; a `Conflict` (rolled back with
/// its audit records by the caller) when it does not apply.
pub(super) async fn apply(c: &Client, op: &ImagingOp) -> Result<u64, WriteError> {
    match op {
        ImagingOp::Put(rec, task, quarantine) => {
            let now = rec.received_at;
            let n = c
                .execute(
                    &format!("INSERT INTO dicom_instances ({INSTANCE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING"),
                    &[&rec.sop_instance_uid, &rec.series_uid, &rec.study_uid, &rec.sop_class_uid, &rec.transfer_syntax, &rec.instance_number, &rec.path, &rec.size, &rec.sha256, &rec.attrs, &rec.source, &rec.received_at],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(conflict("dicom instance", &rec.sop_instance_uid));
            }
            c.execute(
                "INSERT INTO dicom_studies AS s (study_uid, patient_id, subject, site, study_date, accession, attrs, updated_at, quarantine) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (study_uid) DO UPDATE SET patient_id = excluded.patient_id, subject = COALESCE(excluded.subject, s.subject), site = COALESCE(excluded.site, s.site), study_date = COALESCE(excluded.study_date, s.study_date), accession = COALESCE(excluded.accession, s.accession), quarantine = COALESCE(s.quarantine, excluded.quarantine), updated_at = excluded.updated_at",
                &[&rec.study_uid, &rec.patient_id, &rec.subject, &rec.site, &rec.study_date, &rec.accession, &rec.attrs, &now, quarantine],
            )
            .await
            .map_err(db)?;
            c.execute(
                "INSERT INTO dicom_series AS s (series_uid, study_uid, modality, series_number, attrs, instance_count) VALUES ($1, $2, $3, $4, $5, 1) \
                 ON CONFLICT (series_uid) DO UPDATE SET instance_count = s.instance_count + 1",
                &[&rec.series_uid, &rec.study_uid, &rec.modality, &rec.series_number, &rec.attrs],
            )
            .await
            .map_err(db)?;
            let Some(task) = task else {
                return Ok(1);
            };
            c.execute(
                "INSERT INTO imaging_tasks AS t (id, series_uid, status, attempts, max_attempts, next_attempt_at, dirty, published, created_at, updated_at) VALUES ($1, $2, 'queued', 0, $3, $4, FALSE, FALSE, $5, $5) \
                 ON CONFLICT (series_uid) DO UPDATE SET \
                   dirty = (t.dirty OR t.status = 'running'), \
                   next_attempt_at = CASE WHEN t.status IN ('queued', 'failed') THEN GREATEST(t.next_attempt_at, excluded.next_attempt_at) WHEN t.status IN ('done', 'dead') THEN excluded.next_attempt_at ELSE t.next_attempt_at END, \
                   attempts = CASE WHEN t.status IN ('done', 'dead') THEN 0 ELSE t.attempts END, \
                   published = CASE WHEN t.status IN ('done', 'dead') THEN FALSE ELSE t.published END, \
                   max_attempts = excluded.max_attempts, \
                   status = CASE WHEN t.status IN ('done', 'dead') THEN 'queued' ELSE t.status END, \
                   updated_at = excluded.updated_at",
                &[&task_id(&rec.series_uid), &rec.series_uid, &(task.max_attempts as i64), &task.settle_until, &now],
            )
            .await
            .map_err(db)?;
            Ok(1)
        }
        ImagingOp::Retry(id, now) => {
            let n = c
                .execute(
                    "UPDATE imaging_tasks SET status = 'queued', attempts = 0, published = FALSE, next_attempt_at = $2, last_error = NULL, updated_at = $2 WHERE id = $1 AND status IN ('failed', 'dead')",
                    &[id, now],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(conflict("imaging task", id));
            }
            Ok(n)
        }
    }
}

fn task_row(r: &Row) -> anyhow::Result<TaskRecord> {
    Ok(TaskRecord {
        id: r.try_get(0)?,
        series_uid: r.try_get(1)?,
        status: TaskStatus::parse(r.try_get(2)?)?,
        attempts: r.try_get::<_, i64>(3)? as u32,
        max_attempts: r.try_get::<_, i64>(4)? as u32,
        next_attempt_at: r.try_get(5)?,
        lease_owner: r.try_get(6)?,
        lease_until: r.try_get(7)?,
        last_error: r.try_get(8)?,
        report_id: r.try_get(9)?,
        dirty: r.try_get(10)?,
        published: r.try_get(11)?,
        created_at: r.try_get(12)?,
        updated_at: r.try_get(13)?,
    })
}

fn instance_row(r: &Row) -> anyhow::Result<StoredInstance> {
    Ok(StoredInstance {
        sop_instance_uid: r.try_get(0)?,
        series_uid: r.try_get(1)?,
        study_uid: r.try_get(2)?,
        sop_class_uid: r.try_get(3)?,
        transfer_syntax: r.try_get(4)?,
        instance_number: r.try_get(5)?,
        path: r.try_get(6)?,
        size: r.try_get(7)?,
        sha256: r.try_get(8)?,
        attrs: r.try_get(9)?,
        source: r.try_get(10)?,
        received_at: r.try_get(11)?,
    })
}

impl PgStore {
    /// See [`crate::Store::put_dicom_instance`].
    pub async fn put_dicom_instance(
        &self,
        rec: DicomInstanceRecord,
        task: Option<TaskSpec>,
        quarantine: Option<String>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<PutInstance> {
        let (sop, sha) = (rec.sop_instance_uid.clone(), rec.sha256.clone());
        if self
            .op_applied(
                super::Op::Imaging(ImagingOp::Put(Box::new(rec), task, quarantine)),
                audit,
            )
            .await?
        {
            return Ok(PutInstance::Stored);
        }
        let existing = self.dicom_instance(&sop).await?;
        Ok(PutInstance::Duplicate {
            same_content: existing.is_some_and(|e| e.sha256 == sha),
        })
    }

    pub async fn release_series(&self, series: Vec<String>, now: i64) -> anyhow::Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE imaging_tasks SET next_attempt_at = LEAST(next_attempt_at, $1), updated_at = $1 WHERE series_uid = ANY($2::TEXT[]) AND status = 'queued'",
                &[&now, &series],
            )
            .await?;
        Ok(())
    }

    pub async fn dicom_instance(&self, sop_uid: &str) -> anyhow::Result<Option<StoredInstance>> {
        let c = self.client().await?;
        c.query_opt(
            &format!("SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE sop_instance_uid = $1"),
            &[&sop_uid],
        )
        .await?
        .map(|r| instance_row(&r))
        .transpose()
    }

    pub async fn series_instances(&self, series_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        let c = self.client().await?;
        c.query(
            &format!("SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE series_uid = $1 ORDER BY instance_number NULLS FIRST, sop_instance_uid"),
            &[&series_uid],
        )
        .await?
        .iter()
        .map(instance_row)
        .collect()
    }

    pub async fn study_instances(&self, study_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        let c = self.client().await?;
        c.query(
            &format!("SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE study_uid = $1 ORDER BY series_uid, instance_number NULLS FIRST, sop_instance_uid"),
            &[&study_uid],
        )
        .await?
        .iter()
        .map(instance_row)
        .collect()
    }

    pub async fn imaging_queue_stats(&self, now: i64) -> anyhow::Result<QueueStats> {
        let c = self.client().await?;
        let r = c
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE status IN ('queued', 'failed')), COUNT(*) FILTER (WHERE status = 'running'), COUNT(*) FILTER (WHERE status = 'dead'), MIN(created_at) FILTER (WHERE status IN ('queued', 'failed', 'running') AND next_attempt_at <= $1) FROM imaging_tasks",
                &[&now],
            )
            .await?;
        Ok(QueueStats {
            waiting: r.try_get::<_, i64>(0)? as u64,
            running: r.try_get::<_, i64>(1)? as u64,
            dead: r.try_get::<_, i64>(2)? as u64,
            oldest_due_created_at: r.try_get(3)?,
        })
    }

    pub async fn claim_imaging_task(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
    ) -> anyhow::Result<Option<TaskRecord>> {
        let c = self.client().await?;
        c.query_opt(
            &format!(
                "UPDATE imaging_tasks SET status = 'running', lease_owner = $1, lease_until = $2 + $3, attempts = attempts + 1, updated_at = $2 \
                 WHERE id = (SELECT id FROM imaging_tasks WHERE (status IN ('queued', 'failed') AND next_attempt_at <= $2) OR (status = 'running' AND lease_until < $2) \
                   ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {TASK_COLUMNS}"
            ),
            &[&worker, &now, &lease_ms],
        )
        .await?
        .map(|r| task_row(&r))
        .transpose()
    }

    pub async fn extend_lease(
        &self,
        id: &str,
        worker: &str,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        let c = self.client().await?;
        Ok(c.execute(
            "UPDATE imaging_tasks SET lease_until = $3 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            &[&id, &worker, &lease_until],
        )
        .await?
            == 1)
    }

    pub async fn mark_task_running(
        &self,
        id: &str,
        worker: &str,
        attempt: u32,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        let c = self.client().await?;
        Ok(c.execute(
            "UPDATE imaging_tasks SET status = 'running', lease_owner = $2, lease_until = $4, attempts = $3, updated_at = $4 WHERE id = $1 AND status IN ('queued', 'failed', 'running')",
            &[&id, &worker, &(attempt as i64), &lease_until],
        )
        .await?
            == 1)
    }

    pub async fn finish_task(
        &self,
        id: &str,
        worker: &str,
        outcome: TaskOutcome,
        now: i64,
    ) -> anyhow::Result<bool> {
        let c = self.client().await?;
        let guard = "WHERE id = $1 AND lease_owner = $2 AND status = 'running'";
        let n = match &outcome {
            TaskOutcome::Done { report_id } => {
                c.execute(
                    &format!("UPDATE imaging_tasks SET report_id = $3, last_error = NULL, lease_owner = NULL, lease_until = NULL, updated_at = $4, \
                      status = CASE WHEN dirty THEN 'queued' ELSE 'done' END, \
                      attempts = CASE WHEN dirty THEN 0 ELSE attempts END, \
                      published = CASE WHEN dirty THEN FALSE ELSE published END, \
                      next_attempt_at = CASE WHEN dirty THEN $4 ELSE next_attempt_at END, dirty = FALSE {guard}"),
                    &[&id, &worker, report_id, &now],
                )
                .await?
            }
            TaskOutcome::Retry { error, next_attempt_at } => {
                c.execute(
                    &format!("UPDATE imaging_tasks SET status = 'failed', last_error = $3, next_attempt_at = $4, lease_owner = NULL, lease_until = NULL, updated_at = $5 {guard}"),
                    &[&id, &worker, error, next_attempt_at, &now],
                )
                .await?
            }
            TaskOutcome::Dead { error } => {
                c.execute(
                    &format!("UPDATE imaging_tasks SET status = 'dead', last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = $4 {guard}"),
                    &[&id, &worker, error, &now],
                )
                .await?
            }
        };
        Ok(n == 1)
    }

    pub async fn imaging_task(&self, id: &str) -> anyhow::Result<Option<TaskRecord>> {
        let c = self.client().await?;
        c.query_opt(
            &format!("SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE id = $1"),
            &[&id],
        )
        .await?
        .map(|r| task_row(&r))
        .transpose()
    }

    pub async fn imaging_tasks(
        &self,
        status: Option<TaskStatus>,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<TaskRecord>> {
        let c = self.client().await?;
        c.query(
            &format!("SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE ($1::TEXT IS NULL OR status = $1) AND id > $2 ORDER BY id LIMIT $3"),
            &[&status.map(TaskStatus::as_str), &after.unwrap_or_default(), &(limit as i64)],
        )
        .await?
        .iter()
        .map(task_row)
        .collect()
    }

    pub async fn retry_imaging_task(
        &self,
        id: &str,
        now: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        self.op_applied(
            super::Op::Imaging(ImagingOp::Retry(id.to_string(), now)),
            audit,
        )
        .await
    }

    pub async fn unpublished_tasks(&self, limit: usize) -> anyhow::Result<Vec<TaskRecord>> {
        let c = self.client().await?;
        c.query(
            &format!("SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE published = FALSE AND status = 'queued' ORDER BY created_at, id LIMIT $1"),
            &[&(limit as i64)],
        )
        .await?
        .iter()
        .map(task_row)
        .collect()
    }

    pub async fn mark_published(&self, ids: Vec<String>) -> anyhow::Result<()> {
        let c = self.client().await?;
        c.execute(
            "UPDATE imaging_tasks SET published = TRUE WHERE id = ANY($1::TEXT[])",
            &[&ids],
        )
        .await?;
        Ok(())
    }
}

impl PgStore {
    pub async fn dicom_studies(&self, q: DicomQuery) -> anyhow::Result<Vec<StudyRecord>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {STUDY_COLUMNS} FROM dicom_studies WHERE ($1::TEXT IS NULL OR patient_id = $1) AND ($2::TEXT IS NULL OR study_uid = $2) AND ($3::TEXT IS NULL OR accession = $3) \
                     AND ($4::TEXT IS NULL OR study_date >= $4) AND ($5::TEXT IS NULL OR study_date <= $5) \
                     AND ($6::TEXT[] IS NULL OR site = ANY($6)) AND ($7 OR quarantine IS NULL) AND (NOT $10 OR quarantine IS NOT NULL) \
                     ORDER BY study_date, study_uid LIMIT $8 OFFSET $9"
                ),
                &[&q.patient_id, &q.study_uid, &q.accession, &q.date_from, &q.date_to, &q.sites, &q.include_quarantined, &(q.limit as i64), &(q.offset as i64), &q.quarantined_only],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StudyRecord {
                    study_uid: r.try_get(0)?,
                    patient_id: r.try_get(1)?,
                    subject: r.try_get(2)?,
                    site: r.try_get(3)?,
                    quarantine: r.try_get(4)?,
                    study_date: r.try_get(5)?,
                    accession: r.try_get(6)?,
                    attrs: r.try_get(7)?,
                })
            })
            .collect()
    }
}
