//! Imaging: DICOM studies in over DIMSE C-STORE ([`dimse`]) and STOW-RS,
//! out over QIDO-RS and WADO-RS ([`dicomweb`]); each through
//! [`intake`] (parse, check, link or quarantine, file, index with the
//! series' analysis task, audit). A bounded pool of workers runs the
//! analyses ([`analysis`]) from the task queue (`clinflow-queue`:
//! embedded or NATS JetStream); `/imaging/tasks` shows and retries them
//! ([`tasks`]).

pub mod analysis;
pub mod dicomweb;
pub mod dimse;
pub mod files;
pub mod intake;
pub mod tasks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clinflow_queue::{Backoff, Jitter};
use clinflow_store::{now_millis, Expect, Store, WriteError, WriteRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, Semaphore};

use files::FileStore;

/// Which queue carries the analysis tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// The task table in the store, with leases.
    Embedded,
    /// NATS JetStream at this URL (`nats://HOST:PORT`).
    Nats(String),
}

impl std::str::FromStr for QueueBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<QueueBackend, String> {
        if s == "embedded" {
            Ok(QueueBackend::Embedded)
        } else if s.starts_with("nats://") {
            Ok(QueueBackend::Nats(s.to_string()))
        } else {
            Err(format!(
                "--queue is `embedded` or `nats://HOST:PORT`, not {s:?}"
            ))
        }
    }
}

/// Imaging settings.
#[derive(Debug, Clone)]
pub struct ImagingConfig {
    /// Instance files and thumbnails (`DATA_DIR/imaging`).
    pub dir: PathBuf,
    /// The DIMSE listener; `None` runs none. DIMSE has no authentication
    /// beyond the called AE title: bind a trusted interface.
    pub dicom_listen: Option<SocketAddr>,
    pub dicom_ae: String,
    pub dicom_max_associations: usize,
    /// Analyses run at once; 0 runs no workers (the tasks wait).
    pub workers: usize,
    pub queue: QueueBackend,
    /// JetStream: the work stream's name (its consumer, subject and
    /// dead-letter stream are named after it).
    pub queue_stream: String,
    /// Decoded pixel bytes held by all analyses at once.
    pub pixel_memory: u64,
    /// Attempts of a task before it is dead-lettered.
    pub max_attempts: u32,
    /// A series' task is due this long after its latest instance, or when
    /// its association (or STOW-RS request) ends, whichever is first.
    pub settle: Duration,
    /// How long a worker's claim holds without a heartbeat.
    pub lease: Duration,
    pub backoff: Backoff,
    /// Largest instance accepted (C-STORE and each STOW-RS part).
    pub max_instance_bytes: usize,
    /// Largest STOW-RS request body.
    pub stow_max_bytes: u64,
    /// Fault injection (tests): each analysis waits this long first.
    pub analysis_delay: Duration,
}

impl Default for ImagingConfig {
    fn default() -> Self {
        ImagingConfig {
            dir: PathBuf::from("data/imaging"),
            dicom_listen: None,
            dicom_ae: "CLINFLOW".into(),
            dicom_max_associations: 16,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: QueueBackend::Embedded,
            queue_stream: "CLINFLOW_IMAGING".into(),
            pixel_memory: 512 * 1024 * 1024,
            max_attempts: 4,
            settle: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            backoff: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(300),
                jitter: Jitter::Full,
            },
            max_instance_bytes: 256 * 1024 * 1024,
            stow_max_bytes: 2 * 1024 * 1024 * 1024,
            analysis_delay: Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceivedLabels {
    pub source: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskOutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: &'static str,
}

/// Imaging's metrics (registered in the server's registry).
pub struct ImagingMetrics {
    /// Instances received, by source and outcome (`stored`, `duplicate`,
    /// `quarantined`, or the refusal's kind).
    pub instances: Family<ReceivedLabels, Counter>,
    /// Analyses finished, by outcome (`done`, `failed`): their rate is
    /// tasks per second.
    pub tasks: Family<TaskOutcomeLabels, Counter>,
    /// Failed analyses by reason (the analyser's error kind).
    pub failures: Family<FailureLabels, Counter>,
    pub analysis_seconds: Histogram,
    /// Set when `/metrics` is read: tasks waiting (queued or failed and
    /// due later), running, dead, and the age of the oldest due task.
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub dead: Gauge,
    pub oldest_task_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Decoded pixel bytes held by analyses now.
    pub pixel_bytes: Gauge,
}

impl ImagingMetrics {
    fn new() -> ImagingMetrics {
        ImagingMetrics {
            instances: Default::default(),
            tasks: Default::default(),
            failures: Default::default(),
            analysis_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            queue_depth: Default::default(),
            running: Default::default(),
            dead: Default::default(),
            oldest_task_age: Default::default(),
            pixel_bytes: Default::default(),
        }
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("imaging");
        r.register(
            "instances",
            "DICOM instances received, by source and outcome",
            self.instances.clone(),
        );
        r.register(
            "tasks",
            "Analysis tasks finished, by outcome",
            self.tasks.clone(),
        );
        r.register(
            "failures",
            "Failed analyses, by reason",
            self.failures.clone(),
        );
        r.register(
            "analysis_seconds",
            "Time of one series analysis",
            self.analysis_seconds.clone(),
        );
        r.register(
            "queue_depth",
            "Analysis tasks waiting (queued, or failed and to be retried)",
            self.queue_depth.clone(),
        );
        r.register("running", "Analysis tasks running", self.running.clone());
        r.register("dead", "Dead-lettered analysis tasks", self.dead.clone());
        r.register(
            "oldest_task_age_seconds",
            "Age of the oldest due analysis task",
            self.oldest_task_age.clone(),
        );
        r.register(
            "pixel_bytes",
            "Decoded pixel bytes held by analyses",
            self.pixel_bytes.clone(),
        );
    }

    pub fn received(&self, source: &'static str, outcome: &'static str) {
        self.instances
            .get_or_create(&ReceivedLabels { source, outcome })
            .inc();
    }
}

/// Imaging's shared part of the server state.
pub struct Imaging {
    pub config: ImagingConfig,
    store: Store,
    pub files: FileStore,
    pub metrics: ImagingMetrics,
    /// Signalled when tasks become due (an association or request ended,
    /// a retry): the embedded queue's workers and the outbox relay wait on
    /// it besides their polling.
    pub wake: Arc<Notify>,
    /// Permits are KiB of decoded pixels (see `pixel_memory`).
    pixel_budget: Arc<Semaphore>,
}

impl Imaging {
    /// Opens the file store and registers the metrics.
    pub fn new(
        config: ImagingConfig,
        store: Store,
        registry: &mut Registry,
    ) -> anyhow::Result<Imaging> {
        let files = FileStore::open(config.dir.clone())?;
        let metrics = ImagingMetrics::new();
        metrics.register(registry);
        let kib = (config.pixel_memory / 1024).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        Ok(Imaging {
            config,
            store,
            files,
            metrics,
            wake: Arc::new(Notify::new()),
            pixel_budget: Arc::new(Semaphore::new(kib)),
        })
    }

    /// Sets the queue gauges (when `/metrics` is read).
    pub async fn observe_queue(&self) {
        let now = now_millis();
        match self.store.imaging_queue_stats(now).await {
            Ok(s) => {
                self.metrics.queue_depth.set(s.waiting as i64);
                self.metrics.running.set(s.running as i64);
                self.metrics.dead.set(s.dead as i64);
                let age = s
                    .oldest_due_created_at
                    .map_or(0.0, |t| ((now - t).max(0) as f64) / 1000.0);
                self.metrics.oldest_task_age.set(age);
            }
            Err(e) => tracing::warn!(error = %e, "reading the imaging queue's depth failed"),
        }
    }

    /// Ends an association or STOW-RS request: its series' tasks are due
    /// now, and each study it stored to has its ImagingStudy (re)written.
    pub async fn finish_session(&self, session: intake::Session) {
        let series: Vec<String> = session.touched_series.into_iter().collect();
        if !series.is_empty() {
            if let Err(e) = self.store.release_series(series, now_millis()).await {
                tracing::warn!(error = %e, "releasing the series' analysis tasks failed; they are due after the settle time");
            }
            self.wake.notify_waiters();
        }
        for study in session.touched_studies {
            if let Err(e) = self.write_imaging_study(&study).await {
                tracing::warn!(error = %e, "writing an ImagingStudy failed; the analysis writes it again");
            }
        }
    }

    /// Writes the FHIR ImagingStudy of a (linked) study from its indexed
    /// instances; a quarantined study has none.
    pub async fn write_imaging_study(&self, study_uid: &str) -> anyhow::Result<()> {
        let q = clinflow_store::DicomQuery {
            study_uid: Some(study_uid.to_string()),
            include_quarantined: true,
            limit: 1,
            ..Default::default()
        };
        let Some(study) = self.store.dicom_studies(q).await?.into_iter().next() else {
            return Ok(());
        };
        let (None, Some(patient)) = (&study.quarantine, &study.subject) else {
            return Ok(());
        };
        let metas = self.study_metas(study_uid).await?;
        let resource =
            clinflow_imaging::imaging_study(study_uid, &metas, &format!("Patient/{patient}"));
        self.upsert(vec![resource], Vec::new()).await
    }

    /// The stored instances' index fields.
    pub async fn study_metas(
        &self,
        study_uid: &str,
    ) -> anyhow::Result<Vec<clinflow_imaging::InstanceMeta>> {
        let rows = self.store.study_instances(study_uid).await?;
        rows.iter().map(|r| meta_of(&r.attrs)).collect()
    }

    /// Creates or replaces server-built resources (each with its `id`) in
    /// one transaction, retrying when another writer got in between.
    pub async fn upsert(
        &self,
        resources: Vec<serde_json::Value>,
        audit: Vec<clinflow_store::AuditRecord>,
    ) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let now = now_millis();
            let mut ops = Vec::with_capacity(resources.len());
            for r in &resources {
                let rtype = r["resourceType"].as_str().unwrap_or_default();
                let id = r["id"].as_str().unwrap_or_default();
                let expect = match self.store.read_current(rtype, id).await? {
                    Some(cur) => Expect::Version(cur.version),
                    None => Expect::Absent,
                };
                ops.push(crate::fhir::write::built_op(r, id, expect, now)?);
            }
            let req = WriteRequest {
                ops,
                audit: audit.clone(),
                queries: Vec::new(),
            };
            match self.store.write(req).await {
                Ok(()) => return Ok(()),
                Err(e @ WriteError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no write"), Into::into))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// An instance's index fields, from its stored `attrs`.
pub fn meta_of(attrs: &str) -> anyhow::Result<clinflow_imaging::InstanceMeta> {
    #[derive(serde::Deserialize)]
    struct Attrs {
        meta: clinflow_imaging::InstanceMeta,
    }
    Ok(serde_json::from_str::<Attrs>(attrs)?.meta)
}

/// An instance's DICOM JSON, from its stored `attrs`.
pub fn dicom_of(attrs: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(attrs)?;
    Ok(v["dicom"].take())
}
