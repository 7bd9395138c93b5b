//! Imaging: indexed DICOM instances (study, series, instance rows) and the
//! per-series analysis task queue. A stored instance upserts its series'
//! task in the same transaction that indexes it.
//!
//! Invariant: a task changes only under its lease: `finish_task` and
//! `extend_lease` apply only while the task is `running` under the caller's
//! worker id, so a worker whose lease expired cannot overwrite its successor.

/// One DICOM instance to index.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomInstanceRecord {
    pub sop_instance_uid: String,
    pub series_uid: String,
    pub study_uid: String,
    pub patient_id: String,
    pub subject: Option<String>,
    pub site: Option<String>,
    pub study_date: Option<String>,
    pub accession: Option<String>,
    pub modality: String,
    pub series_number: Option<i64>,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub instance_number: Option<i64>,
    pub path: String,
    pub size: i64,
    pub sha256: String,
    /// DICOM JSON of the instance.
    pub attrs: String,
    pub source: String,
    pub received_at: i64,
}

/// How a stored instance schedules its series' task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task is not due before this (ms): more instances may follow.
    pub settle_until: i64,
    pub max_attempts: u32,
}

/// What `put_dicom_instance` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutInstance {
    Stored,
    /// The SOP Instance UID was stored before; nothing written.
    Duplicate {
        same_content: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Queued,
    Running,
    Done,
    Failed,
    Dead,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<TaskStatus> {
        Ok(match s {
            "queued" => TaskStatus::Queued,
            "running" => TaskStatus::Running,
            "done" => TaskStatus::Done,
            "failed" => TaskStatus::Failed,
            "dead" => TaskStatus::Dead,
            _ => anyhow::bail!("unknown imaging task status {s:?}"),
        })
    }
}

/// One imaging analysis task (one per series).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: String,
    pub series_uid: String,
    pub status: TaskStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    pub next_attempt_at: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub last_error: Option<String>,
    pub report_id: Option<String>,
    pub dirty: bool,
    pub published: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// How a worker finished a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Done { report_id: String },
    Retry { error: String, next_attempt_at: i64 },
    Dead { error: String },
}

/// The analysis queue's depth, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Queued or failed (waiting for a retry).
    pub waiting: u64,
    pub running: u64,
    pub dead: u64,
    /// When the oldest task that is due (or running) was created (ms).
    pub oldest_due_created_at: Option<i64>,
}

/// A stored instance, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    pub sop_instance_uid: String,
    pub series_uid: String,
    pub study_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub instance_number: Option<i64>,
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub attrs: String,
    pub source: String,
    pub received_at: i64,
}

pub(crate) const TASK_COLUMNS: &str = "id, series_uid, status, attempts, max_attempts, next_attempt_at, lease_owner, lease_until, last_error, report_id, dirty, published, created_at, updated_at";

pub(crate) const INSTANCE_COLUMNS: &str = "sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, instance_number, path, size, sha256, attrs, source, received_at";

/// The id of a series' task: derived from the Series Instance UID (which
/// may carry site-identifying roots), so the id is stable across engines
/// and reveals nothing.
pub fn task_id(series_uid: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(series_uid.as_bytes());
    format!("img-{}", &hex::encode(h)[..32])
}

/// A QIDO-RS query. `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DicomQuery {
    pub patient_id: Option<String>,
    pub study_uid: Option<String>,
    pub accession: Option<String>,
    /// `YYYYMMDD`, inclusive.
    pub date_from: Option<String>,
    pub date_to: Option<String>,
    /// `None`: every site; otherwise only studies of these sites.
    pub sites: Option<Vec<String>>,
    pub include_quarantined: bool,
    /// Only studies in quarantine (with `include_quarantined`).
    pub quarantined_only: bool,
    pub limit: usize,
    pub offset: usize,
}

/// A study row, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRecord {
    pub study_uid: String,
    pub patient_id: String,
    pub subject: Option<String>,
    pub site: Option<String>,
    pub quarantine: Option<String>,
    pub study_date: Option<String>,
    pub accession: Option<String>,
    pub attrs: String,
}

pub(crate) const STUDY_COLUMNS: &str =
    "study_uid, patient_id, subject, site, quarantine, study_date, accession, attrs";
