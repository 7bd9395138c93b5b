//! `clinflow serve`'s imaging options (flags; each also read from its
//! `CLINFLOW_...` environment variable).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clinflow_server::imaging::{ImagingConfig, QueueBackend};

#[derive(clap::Args, Debug)]
pub struct ImagingArgs {
    /// Also serve DICOM C-STORE and C-ECHO on ADDR (off unless set). DIMSE
    /// has no authentication beyond the called AE title: bind a trusted
    /// interface or firewall it.
    #[arg(long, env = "CLINFLOW_DICOM_LISTEN", value_name = "ADDR")]
    pub dicom_listen: Option<SocketAddr>,
    /// The AE title the DIMSE listener answers to.
    #[arg(long, env = "CLINFLOW_DICOM_AE", default_value = "CLINFLOW")]
    pub dicom_ae: String,
    /// DICOM associations served at once.
    #[arg(long, env = "CLINFLOW_DICOM_MAX_ASSOCIATIONS", default_value_t = 16)]
    pub dicom_max_associations: usize,
    /// Analyses run at once (default: the number of cores); 0 runs none.
    #[arg(long, env = "CLINFLOW_IMAGING_WORKERS")]
    pub imaging_workers: Option<usize>,
    /// The analysis task queue: `embedded` (a table in the database) or
    /// `nats://HOST:PORT` (NATS JetStream).
    #[arg(long, env = "CLINFLOW_QUEUE", default_value = "embedded")]
    pub queue: QueueBackend,
    /// With `--queue nats://...`: the JetStream stream's name (its
    /// consumer, subject and dead-letter stream are named after it).
    #[arg(
        long,
        env = "CLINFLOW_QUEUE_STREAM",
        default_value = "CLINFLOW_IMAGING"
    )]
    pub queue_stream: String,
    /// Decoded pixel bytes all analyses may hold at once, in MiB.
    #[arg(long, env = "CLINFLOW_IMAGING_PIXEL_MEMORY_MIB", default_value_t = 512)]
    pub imaging_pixel_memory_mib: u64,
    /// Attempts of an analysis before its task is dead-lettered.
    #[arg(long, env = "CLINFLOW_IMAGING_MAX_ATTEMPTS", default_value_t = 4)]
    pub imaging_max_attempts: u32,
    /// How long a worker's claim on a task holds without a heartbeat, in
    /// seconds (a killed worker's task is delivered again after it).
    #[arg(long, env = "CLINFLOW_IMAGING_LEASE", default_value_t = 60)]
    pub imaging_lease: u64,
    /// The first retry's delay cap in milliseconds (doubling per attempt,
    /// full jitter, at most 5 minutes).
    #[arg(long, env = "CLINFLOW_IMAGING_RETRY_BASE_MS", default_value_t = 2000)]
    pub imaging_retry_base_ms: u64,
    /// Fault injection (tests, benchmarks): each analysis waits MS first.
    #[arg(long, hide = true, default_value_t = 0)]
    pub imaging_analysis_delay_ms: u64,
}

impl ImagingArgs {
    pub fn config(&self, data_dir: &Path) -> anyhow::Result<ImagingConfig> {
        let mut c = ImagingConfig {
            dir: data_dir.join("imaging"),
            dicom_listen: self.dicom_listen,
            dicom_ae: self.dicom_ae.clone(),
            dicom_max_associations: self.dicom_max_associations.max(1),
            queue: self.queue.clone(),
            queue_stream: self.queue_stream.clone(),
            pixel_memory: self.imaging_pixel_memory_mib.clamp(1, 1 << 20) * 1024 * 1024,
            max_attempts: self.imaging_max_attempts.max(1),
            lease: Duration::from_secs(self.imaging_lease.clamp(1, 3600)),
            analysis_delay: Duration::from_millis(self.imaging_analysis_delay_ms),
            ..ImagingConfig::default()
        };
        if let Some(w) = self.imaging_workers {
            c.workers = w;
        }
        c.backoff.base = Duration::from_millis(self.imaging_retry_base_ms.max(1));
        anyhow::ensure!(
            !c.dicom_ae.trim().is_empty() && c.dicom_ae.len() <= 16,
            "--dicom-ae is 1 to 16 characters"
        );
        Ok(c)
    }
}
