//! The clinflow server.
//!
//! [`Application::build`] binds the listener (port 0 in tests), opens the
//! store and assembles the router; [`Application::run_until_stopped`] serves
//! until the shutdown future resolves, then drains in-flight requests and
//! commits queued audit records.
//!
//! Route map (everything but `/healthz` behind [`auth::require_auth`]):
//! - `/fhir/...`: the FHIR R4 REST API ([`fhir`]).
//! - `/trials...`: trial set-up ([`trials`]).
//! - `/sites...`: the site registry ([`sites`]).
//! - `/trials/{id}/dashboard`, `/trials/{id}/subjects[/{subject}]`: the
//!   monitoring dashboard and subject views ([`dashboard`]).
//! - `/ui/`: the web page (static files; it calls the API with a token) ([`ui`]).
//! - `/ingest/...`: HL7 v2, wearable CSV and diary intake, batch status ([`ingest`]).
//! - `/audit/export`, `/audit/verify`: the audit trail ([`audit_api`]).
//! - `/campaigns...`, `/practitioners/{id}/opt-out`: notification campaigns;
//!   `/unsubscribe/{token}` and `/notifications/sms/status/{delivery}` are
//!   public, proven by a MAC and the provider's signature ([`campaigns`]).
//! - `/metrics`: Prometheus metrics; `/healthz`: liveness and database.

pub mod audit_api;
pub mod auth;
pub mod campaigns;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod fhir;
pub mod history;
pub mod imaging;
pub mod ingest;
mod media;
pub mod metrics;
pub mod queries;
pub mod sites;
pub mod startup;
pub mod state;
pub mod trials;
pub mod ui;

pub use config::Config;
pub use startup::Application;
