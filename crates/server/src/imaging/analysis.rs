//! The analysis of one series, as a queue task: read each instance's file,
//! decode and accumulate it ([`clinflow_imaging::SeriesAnalyser`], on a
//! blocking thread) while holding its decoded size from the pixel budget,
//! then write the thumbnail and, in one transaction, the ImagingStudy, the
//! DiagnosticReport and its Observations.
//!
//! Invariant: results are idempotent: the report's and observations' ids
//! derive from (series, analyser version), so a task run twice (a
//! redelivery after a crash) replaces the same resources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clinflow_queue::{Task, TaskQueue, WorkerPool};
use clinflow_store::{now_millis, AuditRecord, DicomQuery};
use tokio_util::sync::CancellationToken;

use super::{meta_of, FailureLabels, Imaging, QueueBackend, TaskOutcomeLabels};

/// Why an analysis failed: a short kind (a metric label) and the reason.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    reason: String,
}

impl Failure {
    fn new(kind: &'static str, reason: impl Into<String>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Failure {
        Failure::new("internal", e.to_string())
    }
}

impl Imaging {
    /// Runs one task; `Ok(report id)` or `Err(kind: reason)`.
    pub async fn analyse(&self, task: Task) -> Result<String, String> {
        let start = Instant::now();
        let result = self.analyse_series(&task.series_uid).await;
        self.metrics
            .analysis_seconds
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(report) => {
                self.metrics
                    .tasks
                    .get_or_create(&TaskOutcomeLabels { outcome: "done" })
                    .inc();
                Ok(report)
            }
            Err(f) => {
                self.metrics
                    .tasks
                    .get_or_create(&TaskOutcomeLabels { outcome: "failed" })
                    .inc();
                self.metrics
                    .failures
                    .get_or_create(&FailureLabels { reason: f.kind })
                    .inc();
                tracing::info!(task = %task.id, attempt = task.attempt, kind = f.kind, "an analysis failed");
                Err(format!("{}: {}", f.kind, f.reason))
            }
        }
    }

    async fn analyse_series(&self, series_uid: &str) -> Result<String, Failure> {
        if !self.config.analysis_delay.is_zero() {
            tokio::time::sleep(self.config.analysis_delay).await;
        }
        let rows = self
            .store
            .series_instances(series_uid)
            .await
            .map_err(Failure::internal)?;
        let Some(first) = rows.first() else {
            return Err(Failure::new("no_instances", "the series has no instances"));
        };
        let study_uid = first.study_uid.clone();
        let q = DicomQuery {
            study_uid: Some(study_uid.clone()),
            include_quarantined: true,
            limit: 1,
            ..Default::default()
        };
        let study = self
            .store
            .dicom_studies(q)
            .await
            .map_err(Failure::internal)?
            .into_iter()
            .next()
            .ok_or_else(|| Failure::internal("the series' study is not indexed"))?;
        let patient = match (&study.quarantine, &study.subject) {
            (None, Some(p)) => format!("Patient/{p}"),
            _ => {
                return Err(Failure::new(
                    "quarantined",
                    "the study is in quarantine: it has no patient to report on",
                ))
            }
        };
        let mut analyser = clinflow_imaging::SeriesAnalyser::new(series_uid);
        analyser.expect_instances(rows.len());
        let total_kib = (self.config.pixel_memory / 1024).max(1);
        for row in &rows {
            let meta = meta_of(&row.attrs).map_err(Failure::internal)?;
            let bytes = clinflow_imaging::decoded_bytes_estimate(&meta)
                .saturating_add(row.size.max(0) as u64);
            let kib = (bytes / 1024 + 1).min(total_kib) as u32;
            let permit = self
                .pixel_budget
                .clone()
                .acquire_many_owned(kib)
                .await
                .map_err(Failure::internal)?;
            self.metrics.pixel_bytes.inc_by(kib as i64 * 1024);
            let path = self.files.path_of(&row.path);
            let step = tokio::task::spawn_blocking(move || {
                let bytes = std::fs::read(&path)
                    .map_err(|e| Failure::new("file", format!("reading an instance file: {e}")))?;
                let instance = clinflow_imaging::parse_part10(&bytes)
                    .map_err(|e| Failure::new("parse", e.to_string()))?;
                analyser
                    .add(&instance)
                    .map_err(|e| Failure::new(e.kind, e.reason))?;
                Ok::<_, Failure>(analyser)
            })
            .await;
            self.metrics.pixel_bytes.dec_by(kib as i64 * 1024);
            drop(permit);
            analyser = step.map_err(|_| Failure::new("panic", "the analyser panicked"))??;
        }
        let analysis = tokio::task::spawn_blocking(move || analyser.finish())
            .await
            .map_err(|_| Failure::new("panic", "the analyser panicked"))?
            .map_err(|e| Failure::new(e.kind, e.reason))?;
        let (files, series, png) = (
            self.files.clone(),
            series_uid.to_string(),
            analysis.thumbnail_png.clone(),
        );
        tokio::task::spawn_blocking(move || files.put_thumbnail(&series, &png))
            .await
            .map_err(Failure::internal)?
            .map_err(|e| Failure::new("file", format!("writing the thumbnail: {e}")))?;
        let metas = self
            .study_metas(&study_uid)
            .await
            .map_err(Failure::internal)?;
        let imaging_study = clinflow_imaging::imaging_study(&study_uid, &metas, &patient);
        let study_ref = format!(
            "ImagingStudy/{}",
            clinflow_imaging::imaging_study_id(&study_uid)
        );
        let now = now_millis();
        let issued = clinflow_fhir::datetime::format_instant(now);
        let (report, observations) =
            clinflow_imaging::diagnostic_report(&analysis, Some(&patient), &study_ref, &issued);
        let report_id = report["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| clinflow_imaging::report_id(series_uid));
        let mut resources = vec![imaging_study, report];
        resources.extend(observations);
        let audit = vec![AuditRecord {
            time: now,
            actor: "imaging-worker".into(),
            role: "system".into(),
            action: "imaging-analysis".into(),
            resource_type: Some("DiagnosticReport".into()),
            resource_id: Some(report_id.clone()),
            outcome: "success".into(),
            detail: Some(format!("analyser={}", clinflow_imaging::ANALYSER_VERSION)),
            ..Default::default()
        }];
        self.upsert(resources, audit)
            .await
            .map_err(|e| Failure::new("write", format!("storing the report: {e:#}")))?;
        Ok(report_id)
    }
}

/// This process's worker id: host, process and a random part, so two
/// processes (or a restarted one) never share leases.
pub fn worker_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Runs the worker pool (and, on JetStream, the outbox relay) until
/// `stop`; then waits for the analyses running.
pub async fn run_workers(imaging: Arc<Imaging>, stop: CancellationToken) -> anyhow::Result<()> {
    let cfg = &imaging.config;
    // Without workers, the embedded queue needs nothing; a JetStream node
    // still relays the tasks it stores to the broker.
    if cfg.workers == 0 && cfg.queue == QueueBackend::Embedded {
        return Ok(());
    }
    let worker = worker_id();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let forward = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = tx.send(true);
        })
    };
    let heartbeat = (cfg.lease / 3).max(Duration::from_millis(100));
    let mut relay = None;
    let queue: Arc<dyn TaskQueue> = match &cfg.queue {
        QueueBackend::Embedded => Arc::new(
            clinflow_queue::EmbeddedQueue::new(
                imaging.store.clone(),
                worker,
                cfg.lease,
                cfg.backoff,
            )
            // Tasks stored here wake the workers at once; another node's
            // are found within the poll.
            .poll_every(Duration::from_millis(500))
            .wake_on(imaging.wake.clone()),
        ),
        QueueBackend::Nats(url) => {
            let js = clinflow_queue::jetstream::connect(url).await?;
            let jcfg =
                clinflow_queue::JetStreamConfig::named(&cfg.queue_stream, cfg.lease, cfg.backoff);
            let queue = clinflow_queue::JetStreamQueue::new(
                js.clone(),
                imaging.store.clone(),
                worker,
                jcfg.clone(),
            )
            .await?;
            relay = Some(tokio::spawn(clinflow_queue::jetstream::run_relay(
                imaging.store.clone(),
                js,
                jcfg,
                imaging.wake.clone(),
                rx.clone(),
            )));
            Arc::new(queue)
        }
    };
    let handler = {
        let imaging = imaging.clone();
        move |task: Task| {
            let imaging = imaging.clone();
            async move { imaging.analyse(task).await }
        }
    };
    if cfg.workers > 0 {
        WorkerPool::run(queue, cfg.workers, handler, heartbeat, rx).await;
    }
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    forward.abort();
    Ok(())
}
