//! What every handler shares.

use std::sync::Arc;

use clinflow_store::Store;

use crate::config::Config;
use crate::ingest::IngestQueue;
use crate::metrics::Metrics;
use crate::sites::SiteRegistry;

/// Shared application state. Cheap to clone: everything is behind `Arc` or is
/// a handle.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Where accepted ingest batches wait for a worker.
    pub ingest: IngestQueue,
    /// The site registry's snapshot and its refresher.
    pub sites: Arc<SiteRegistry>,
}
