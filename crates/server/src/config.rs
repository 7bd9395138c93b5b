//! Typed server configuration, built by the CLI from flags and environment.

use std::net::SocketAddr;
use std::time::Duration;

use clinflow_store::DatabaseUrl;

/// Everything `clinflow serve` needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    pub database: DatabaseUrl,
    /// Accepted as an admin token when set (`CLINFLOW_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Whole-request deadline; a request past it gets 503.
    pub request_timeout: Duration,
    /// Largest request body accepted (413 beyond).
    pub body_limit: usize,
    /// Largest number of entries in one Bundle (413 beyond).
    pub max_bundle_entries: usize,
    /// Requests served at once; beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Ingest `map` stage workers (parse, map to FHIR, edit checks), each
    /// on one batch at a time. 0 accepts batches without processing them
    /// (tests of a full pipeline).
    pub ingest_map_workers: usize,
    /// Ingest `persist` stage workers (store the mapped items, finish the
    /// batch), each on one batch at a time. A worker mostly waits for the
    /// store (a lookup, then its commits), so there are more of them than
    /// cores: with 2, the SQLite writer sat idle a third of the time under
    /// `bench/ingest-throughput.sh`; 4 took a 10,000-message run from
    /// 8.2 s to 6.9 s (2026-12-03).
    pub ingest_persist_workers: usize,
    /// Accepted batches waiting for a `map` worker (at least 1); beyond it,
    /// the ingest endpoints answer 429 with `Retry-After`.
    pub ingest_queue: usize,
    /// Mapped batches waiting for a `persist` worker (at least 1); when it
    /// is full, `map` workers wait, and the intake queue fills up.
    pub ingest_mapped_queue: usize,
    /// How long a graceful shutdown lets the ingest stages drain (finish
    /// every queued batch); what is left then resumes at the next start.
    pub ingest_drain_timeout: Duration,
    /// MLLP (HL7 v2 over TCP) listen address; `None` (the default) runs no
    /// listener. MLLP has no authentication: bind it to a trusted interface
    /// or firewall it (see ARCHITECTURE.md).
    pub mllp_listen: Option<SocketAddr>,
    /// Largest MLLP frame payload; a larger frame is skipped and answered
    /// with an AR.
    pub mllp_max_frame: usize,
    /// MLLP connections served at once; more wait in the listen backlog.
    pub mllp_max_connections: usize,
    /// An MLLP connection that sends nothing, or does not take its ACK, for
    /// this long is closed.
    pub mllp_idle_timeout: Duration,
    /// Longest an MLLP message may take from its frame to its ACK (waiting
    /// for a place in a full queue, then for its batch to be done); beyond
    /// it the connection is closed without an ACK, and the sender resends.
    pub mllp_ack_timeout: Duration,
    /// How often the site registry's snapshot is rebuilt from the database
    /// (besides right after a write through this server and, on
    /// PostgreSQL, on another node's change).
    pub sites_refresh: Duration,
    /// How long a checked bearer token is trusted without reading the
    /// store again: the longest a token revoked elsewhere (the CLI, another
    /// node) keeps working here. Zero checks the store on every request.
    pub token_cache_ttl: Duration,
    /// Each dashboard section's own deadline; a section past it is
    /// reported unavailable and the others are still answered.
    pub dashboard_section_timeout: Duration,
    /// Fault injection (tests, the dashboard benchmark): each named
    /// dashboard section waits this long before its work. Empty normally.
    pub dashboard_section_delay: std::collections::HashMap<String, Duration>,
    /// Notification campaigns: the providers, limits and retries.
    pub notify: crate::campaigns::NotifyConfig,
    /// The patient history gateway: services, deadline, resilience.
    pub history: crate::history::HistoryConfig,
    /// Imaging: files, the DIMSE listener, the analysis workers and queue.
    pub imaging: crate::imaging::ImagingConfig,
}

impl Config {
    /// Defaults for everything but where the data lives.
    pub fn new(database: DatabaseUrl) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database,
            admin_token: None,
            request_timeout: Duration::from_secs(30),
            body_limit: 32 * 1024 * 1024,
            max_bundle_entries: 10_000,
            max_in_flight: 2048,
            ingest_map_workers: 2,
            ingest_persist_workers: 4,
            ingest_queue: 64,
            ingest_mapped_queue: 4,
            ingest_drain_timeout: Duration::from_secs(30),
            mllp_listen: None,
            mllp_max_frame: 1024 * 1024,
            mllp_max_connections: 256,
            mllp_idle_timeout: Duration::from_secs(300),
            mllp_ack_timeout: Duration::from_secs(60),
            sites_refresh: Duration::from_secs(600),
            token_cache_ttl: Duration::from_secs(5),
            dashboard_section_timeout: Duration::from_secs(2),
            dashboard_section_delay: Default::default(),
            notify: Default::default(),
            history: Default::default(),
            imaging: Default::default(),
        }
    }
}
