//! What every handler shares.

use std::sync::Arc;

use clinflow_store::Store;

use crate::auth::TokenCache;
use crate::config::Config;
use crate::ingest::IngestQueue;
use crate::metrics::Metrics;
use crate::sites::SiteRegistry;

/// Shared application state: one `Arc`, so that a clone (axum makes several
/// per request, one per stateful layer and extractor) is one atomic
/// increment. Cloning the fields one by one (about fifteen reference
/// counts, each a cache line the cores fight over) was 30% of the CPU of a
/// `GET /sites/{id}` under load.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Where accepted ingest batches wait for a worker.
    pub ingest: IngestQueue,
    /// The site registry's snapshot and its refresher.
    pub sites: Arc<SiteRegistry>,
    /// Requests being served; its permits are `max_in_flight`.
    pub in_flight: tokio::sync::Semaphore,
    /// The dashboard's ingest rates (items/s per stage).
    pub ingest_rates: crate::dashboard::IngestRates,
    /// Recently checked bearer tokens.
    pub tokens: Arc<TokenCache>,
    /// Notification campaigns: links, senders, workers.
    pub notify: Arc<crate::campaigns::Notifier>,
    /// The patient history gateway and its downstream clients.
    pub history: Arc<crate::history::Gateway>,
    /// Imaging: intake, files, analysis workers' shared parts.
    pub imaging: Arc<crate::imaging::Imaging>,
}
