//! Imaging on SQLite. Every write is a custom job of the one writer, so a
//! claim is an `UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING`
//! under the write lock: two claims never get the same task.

use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::SqliteStore;
use crate::imaging::*;
use crate::model::AuditRecord;

/// The answer a custom job hands back beside its applied flag.
struct Slot<T>(Mutex<Option<T>>);

impl<T> Slot<T> {
    fn new() -> Arc<Slot<T>> {
        Arc::new(Slot(Mutex::new(None)))
    }
    fn put(&self, v: T) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(v);
        }
    }
    fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

fn task_row(r: &Row) -> rusqlite::Result<anyhow::Result<TaskRecord>> {
    let status: String = r.get(2)?;
    let rec = |status| TaskRecord {
        id: r.get(0).unwrap_or_default(),
        series_uid: r.get(1).unwrap_or_default(),
        status,
        attempts: r.get::<_, i64>(3).unwrap_or_default() as u32,
        max_attempts: r.get::<_, i64>(4).unwrap_or_default() as u32,
        next_attempt_at: r.get(5).unwrap_or_default(),
        lease_owner: r.get(6).unwrap_or_default(),
        lease_until: r.get(7).unwrap_or_default(),
        last_error: r.get(8).unwrap_or_default(),
        report_id: r.get(9).unwrap_or_default(),
        dirty: r.get(10).unwrap_or_default(),
        published: r.get(11).unwrap_or_default(),
        created_at: r.get(12).unwrap_or_default(),
        updated_at: r.get(13).unwrap_or_default(),
    };
    Ok(TaskStatus::parse(&status).map(rec))
}

fn instance_row(r: &Row) -> rusqlite::Result<StoredInstance> {
    Ok(StoredInstance {
        sop_instance_uid: r.get(0)?,
        series_uid: r.get(1)?,
        study_uid: r.get(2)?,
        sop_class_uid: r.get(3)?,
        transfer_syntax: r.get(4)?,
        instance_number: r.get(5)?,
        path: r.get(6)?,
        size: r.get(7)?,
        sha256: r.get(8)?,
        attrs: r.get(9)?,
        source: r.get(10)?,
        received_at: r.get(11)?,
    })
}

fn put_instance(
    conn: &Connection,
    rec: &DicomInstanceRecord,
    task: Option<TaskSpec>,
    quarantine: Option<&str>,
) -> anyhow::Result<PutInstance> {
    let existing: Option<String> = conn
        .query_row(
            "SELECT sha256 FROM dicom_instances WHERE sop_instance_uid = ?",
            params![rec.sop_instance_uid],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(sha) = existing {
        return Ok(PutInstance::Duplicate {
            same_content: sha == rec.sha256,
        });
    }
    let now = rec.received_at;
    conn.execute(
        "INSERT INTO dicom_studies (study_uid, patient_id, subject, site, study_date, accession, attrs, updated_at, quarantine) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (study_uid) DO UPDATE SET patient_id = excluded.patient_id, subject = COALESCE(excluded.subject, subject), site = COALESCE(excluded.site, site), study_date = COALESCE(excluded.study_date, study_date), accession = COALESCE(excluded.accession, accession), quarantine = COALESCE(quarantine, excluded.quarantine), updated_at = excluded.updated_at",
        params![rec.study_uid, rec.patient_id, rec.subject, rec.site, rec.study_date, rec.accession, rec.attrs, now, quarantine],
    )?;
    conn.execute(
        "INSERT INTO dicom_series (series_uid, study_uid, modality, series_number, attrs, instance_count) VALUES (?1, ?2, ?3, ?4, ?5, 1) \
         ON CONFLICT (series_uid) DO UPDATE SET instance_count = instance_count + 1",
        params![rec.series_uid, rec.study_uid, rec.modality, rec.series_number, rec.attrs],
    )?;
    conn.execute(
        &format!("INSERT INTO dicom_instances ({INSTANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        params![rec.sop_instance_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax, rec.instance_number, rec.path, rec.size, rec.sha256, rec.attrs, rec.source, rec.received_at],
    )?;
    let Some(task) = task else {
        return Ok(PutInstance::Stored);
    };
    conn.execute(
        "INSERT INTO imaging_tasks (id, series_uid, status, attempts, max_attempts, next_attempt_at, dirty, published, created_at, updated_at) VALUES (?1, ?2, 'queued', 0, ?3, ?4, 0, 0, ?5, ?5) \
         ON CONFLICT (series_uid) DO UPDATE SET \
           dirty = CASE WHEN status = 'running' THEN 1 ELSE dirty END, \
           next_attempt_at = CASE WHEN status IN ('queued', 'failed') THEN MAX(next_attempt_at, excluded.next_attempt_at) WHEN status IN ('done', 'dead') THEN excluded.next_attempt_at ELSE next_attempt_at END, \
           attempts = CASE WHEN status IN ('done', 'dead') THEN 0 ELSE attempts END, \
           published = CASE WHEN status IN ('done', 'dead') THEN 0 ELSE published END, \
           max_attempts = excluded.max_attempts, \
           status = CASE WHEN status IN ('done', 'dead') THEN 'queued' ELSE status END, \
           updated_at = excluded.updated_at",
        params![task_id(&rec.series_uid), rec.series_uid, task.max_attempts as i64, task.settle_until, now],
    )?;
    Ok(PutInstance::Stored)
}

impl SqliteStore {
    /// See [`crate::Store::put_dicom_instance`].
    pub async fn put_dicom_instance(
        &self,
        rec: DicomInstanceRecord,
        task: Option<TaskSpec>,
        quarantine: Option<String>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<PutInstance> {
        let slot = Slot::new();
        let out = slot.clone();
        self.custom(audit, move |conn| {
            let r = put_instance(conn, &rec, task, quarantine.as_deref())?;
            out.put(r);
            Ok(r == PutInstance::Stored)
        })
        .await?;
        slot.take()
            .ok_or_else(|| anyhow!("put_dicom_instance gave no answer"))
    }

    pub async fn release_series(&self, series: Vec<String>, now: i64) -> anyhow::Result<()> {
        self.custom(Vec::new(), move |conn| {
            let mut st = conn.prepare_cached(
                "UPDATE imaging_tasks SET next_attempt_at = MIN(next_attempt_at, ?1), updated_at = ?1 WHERE series_uid = ?2 AND status = 'queued'",
            )?;
            for s in &series {
                st.execute(params![now, s])?;
            }
            Ok(true)
        })
        .await?;
        Ok(())
    }

    pub async fn dicom_instance(&self, sop_uid: &str) -> anyhow::Result<Option<StoredInstance>> {
        let sop = sop_uid.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE sop_instance_uid = ?"
            ))?;
            Ok(st.query_row(params![sop], instance_row).optional()?)
        })
        .await
    }

    pub async fn series_instances(&self, series_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        let s = series_uid.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE series_uid = ? ORDER BY instance_number, sop_instance_uid"
            ))?;
            let rows = st.query_map(params![s], instance_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn study_instances(&self, study_uid: &str) -> anyhow::Result<Vec<StoredInstance>> {
        let s = study_uid.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM dicom_instances WHERE study_uid = ? ORDER BY series_uid, instance_number, sop_instance_uid"
            ))?;
            let rows = st.query_map(params![s], instance_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn imaging_queue_stats(&self, now: i64) -> anyhow::Result<QueueStats> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT COUNT(*) FILTER (WHERE status IN ('queued', 'failed')), COUNT(*) FILTER (WHERE status = 'running'), COUNT(*) FILTER (WHERE status = 'dead'), MIN(created_at) FILTER (WHERE status IN ('queued', 'failed', 'running') AND next_attempt_at <= ?1) FROM imaging_tasks",
            )?;
            Ok(st.query_row(params![now], |r| {
                Ok(QueueStats {
                    waiting: r.get::<_, i64>(0)? as u64,
                    running: r.get::<_, i64>(1)? as u64,
                    dead: r.get::<_, i64>(2)? as u64,
                    oldest_due_created_at: r.get(3)?,
                })
            })?)
        })
        .await
    }

    pub async fn claim_imaging_task(
        &self,
        worker: &str,
        now: i64,
        lease_ms: i64,
    ) -> anyhow::Result<Option<TaskRecord>> {
        let worker = worker.to_string();
        let slot = Slot::new();
        let out = slot.clone();
        self.custom(Vec::new(), move |conn| {
            let mut st = conn.prepare_cached(&format!(
                "UPDATE imaging_tasks SET status = 'running', lease_owner = ?1, lease_until = ?2 + ?3, attempts = attempts + 1, updated_at = ?2 \
                 WHERE id = (SELECT id FROM imaging_tasks WHERE (status IN ('queued', 'failed') AND next_attempt_at <= ?2) OR (status = 'running' AND lease_until < ?2) \
                   ORDER BY next_attempt_at, id LIMIT 1) RETURNING {TASK_COLUMNS}"
            ))?;
            let t = st.query_row(params![worker, now, lease_ms], task_row).optional()?.transpose()?;
            let applied = t.is_some();
            out.put(t);
            Ok(applied)
        })
        .await?;
        Ok(slot.take().flatten())
    }

    pub async fn extend_lease(
        &self,
        id: &str,
        worker: &str,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.custom(Vec::new(), move |conn| {
            Ok(conn.execute(
                "UPDATE imaging_tasks SET lease_until = ?3 WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
                params![id, worker, lease_until],
            )? == 1)
        })
        .await
    }

    pub async fn mark_task_running(
        &self,
        id: &str,
        worker: &str,
        attempt: u32,
        lease_until: i64,
    ) -> anyhow::Result<bool> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.custom(Vec::new(), move |conn| {
            Ok(conn.execute(
                "UPDATE imaging_tasks SET status = 'running', lease_owner = ?2, lease_until = ?4, attempts = ?3, updated_at = ?4 WHERE id = ?1 AND status IN ('queued', 'failed', 'running')",
                params![id, worker, attempt as i64, lease_until],
            )? == 1)
        })
        .await
    }

    pub async fn finish_task(
        &self,
        id: &str,
        worker: &str,
        outcome: TaskOutcome,
        now: i64,
    ) -> anyhow::Result<bool> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.custom(Vec::new(), move |conn| {
            let guard = "WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'";
            let n = match &outcome {
                TaskOutcome::Done { report_id } => conn.execute(
                    &format!("UPDATE imaging_tasks SET report_id = ?3, last_error = NULL, lease_owner = NULL, lease_until = NULL, updated_at = ?4, \
                      status = CASE WHEN dirty THEN 'queued' ELSE 'done' END, \
                      attempts = CASE WHEN dirty THEN 0 ELSE attempts END, \
                      published = CASE WHEN dirty THEN 0 ELSE published END, \
                      next_attempt_at = CASE WHEN dirty THEN ?4 ELSE next_attempt_at END, dirty = 0 {guard}"),
                    params![id, worker, report_id, now],
                )?,
                TaskOutcome::Retry { error, next_attempt_at } => conn.execute(
                    &format!("UPDATE imaging_tasks SET status = 'failed', last_error = ?3, next_attempt_at = ?4, lease_owner = NULL, lease_until = NULL, updated_at = ?5 {guard}"),
                    params![id, worker, error, next_attempt_at, now],
                )?,
                TaskOutcome::Dead { error } => conn.execute(
                    &format!("UPDATE imaging_tasks SET status = 'dead', last_error = ?3, lease_owner = NULL, lease_until = NULL, updated_at = ?4 {guard}"),
                    params![id, worker, error, now],
                )?,
            };
            Ok(n == 1)
        })
        .await
    }

    pub async fn imaging_task(&self, id: &str) -> anyhow::Result<Option<TaskRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE id = ?"
            ))?;
            st.query_row(params![id], task_row).optional()?.transpose()
        })
        .await
    }

    pub async fn imaging_tasks(
        &self,
        status: Option<TaskStatus>,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<TaskRecord>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE (?1 IS NULL OR status = ?1) AND id > ?2 ORDER BY id LIMIT ?3"
            ))?;
            let rows = st.query_map(
                params![status.map(TaskStatus::as_str), after.unwrap_or_default(), limit as i64],
                task_row,
            )?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|x| x)).collect()
        })
        .await
    }

    pub async fn retry_imaging_task(
        &self,
        id: &str,
        now: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        let id = id.to_string();
        self.custom(audit, move |conn| {
            Ok(conn.execute(
                "UPDATE imaging_tasks SET status = 'queued', attempts = 0, published = 0, next_attempt_at = ?2, last_error = NULL, updated_at = ?2 WHERE id = ?1 AND status IN ('failed', 'dead')",
                params![id, now],
            )? == 1)
        })
        .await
    }

    pub async fn unpublished_tasks(&self, limit: usize) -> anyhow::Result<Vec<TaskRecord>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM imaging_tasks WHERE published = 0 AND status = 'queued' ORDER BY created_at, id LIMIT ?1"
            ))?;
            let rows = st.query_map(params![limit as i64], task_row)?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|x| x)).collect()
        })
        .await
    }

    pub async fn mark_published(&self, ids: Vec<String>) -> anyhow::Result<()> {
        self.custom(Vec::new(), move |conn| {
            let mut st =
                conn.prepare_cached("UPDATE imaging_tasks SET published = 1 WHERE id = ?")?;
            for id in &ids {
                st.execute(params![id])?;
            }
            Ok(true)
        })
        .await?;
        Ok(())
    }
}

impl SqliteStore {
    pub async fn dicom_studies(&self, q: DicomQuery) -> anyhow::Result<Vec<StudyRecord>> {
        self.read(move |c| {
            let sites = q.sites.as_ref().map(|s| serde_sites(s));
            let mut st = c.prepare_cached(&format!(
                "SELECT {STUDY_COLUMNS} FROM dicom_studies WHERE (?1 IS NULL OR patient_id = ?1) AND (?2 IS NULL OR study_uid = ?2) AND (?3 IS NULL OR accession = ?3) \
                 AND (?4 IS NULL OR study_date >= ?4) AND (?5 IS NULL OR study_date <= ?5) \
                 AND (?6 IS NULL OR site IN (SELECT value FROM json_each(?6))) AND (?7 OR quarantine IS NULL) AND (NOT ?10 OR quarantine IS NOT NULL) \
                 ORDER BY study_date, study_uid LIMIT ?8 OFFSET ?9"
            ))?;
            let rows = st.query_map(
                params![q.patient_id, q.study_uid, q.accession, q.date_from, q.date_to, sites, q.include_quarantined, q.limit as i64, q.offset as i64, q.quarantined_only],
                |r| {
                    Ok(StudyRecord {
                        study_uid: r.get(0)?,
                        patient_id: r.get(1)?,
                        subject: r.get(2)?,
                        site: r.get(3)?,
                        quarantine: r.get(4)?,
                        study_date: r.get(5)?,
                        accession: r.get(6)?,
                        attrs: r.get(7)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

/// A JSON array of strings, for `json_each`.
fn serde_sites(sites: &[String]) -> String {
    let quoted: Vec<String> = sites
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", quoted.join(","))
}
