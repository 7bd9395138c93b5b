//! clinflow's one integration-test binary: black-box tests through HTTP and
//! the `clinflow` binary, each run on both engines (`<module>::sqlite::<test>`
//! and `<module>::postgres::<test>`).
//!
//! PostgreSQL is at `CLINFLOW_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test gets a schema of
//! its own, dropped afterwards. An unreachable PostgreSQL fails its tests:
//! nothing here skips.
//!
//! Expected values are computed from the inputs (the reference trial's files,
//! the resources a test creates), never written in as bare numbers.
//!
//! Modules, by what they cover:
//! - [`ops`]: `/healthz`, 401s, `/metrics`, graceful shutdown.
//! - [`fhir_crud`]: metadata and the instance interactions, validation, errors.
//! - [`fhir_search`]: every search parameter, paging, sorting, totals, `_include`.
//! - [`bundles`]: transactions and batches.
//! - [`trials`]: `POST /trials` and subjects, idempotence, amendments, errors.
//! - [`ingest`]: `/ingest`: samples, edit-check rejections, idempotence, 403/429, resume.
//! - [`mllp`]: the MLLP listener: python-hl7's `mllp_send`, framing, ACKs, order, idempotence,
//!   metrics, and the SIGKILL crash test of a real `clinflow serve` under HTTP and MLLP ingest.
//! - [`queries`]: data queries: opened by ingest, answered, closed, site scoped, audited.
//! - [`sites`]: the site registry: snapshot, writes, ETags, search, refreshes, LISTEN/NOTIFY.
//! - [`dashboard`]: the dashboard's sections against the API, site scoping, a slow
//!   section, subject views, and the web page in headless Chromium.
//! - [`campaigns`]: notification campaigns against aiosmtpd and the SMS provider mock:
//!   exactly once per recipient, retries, permanent errors, opt-outs, cancel, SIGKILL.
//! - [`auth`]: the role matrix and site scoping, revoked and expired tokens.
//! - [`audit`]: what is recorded, AuditEvent search, export, tampering.
//! - [`history`]: the patient history gateway over real gRPC to `clinflow records|billing
//!   serve` processes: merged history, deadline (504), cancellation on disconnect, a service
//!   down (502, breaker, recovery), `partial`, load shedding.
//! - [`imaging`]: DICOM in by dcmtk's storescu and STOW-RS, QIDO-RS, WADO-RS, analysis
//!   reports as FHIR, corrupt input, quarantine, retries and dead letters, site scoping,
//!   and a worker process killed with SIGKILL mid-task.
//! - [`cli`]: the `clinflow` binary against a running server's database.
//! - [`conformance`]: the official R4 examples stored and read back.

#[macro_use]
mod helpers;

mod audit;
mod auth;
mod bundles;
mod campaigns;
mod cli;
mod conformance;
mod dashboard;
mod fhir_crud;
mod fhir_search;
mod history;
mod imaging;
mod ingest;
mod mllp;
mod ops;
mod queries;
mod sites;
mod trials;
