//! The values that cross the store's API boundary.

use clinflow_fhir::index::Extracted;

/// What a write expects to find, checked inside the transaction
/// (optimistic locking: `If-Match`, and creates that must not collide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist yet (create, or update-as-create).
    Absent,
    /// The current version must be this one (deleted or not).
    Version(u64),
}

/// One resource version to write.
#[derive(Debug, Clone)]
pub struct WriteOp {
    pub resource_type: String,
    pub id: String,
    pub expect: Expect,
    /// The version this op creates; `expect` + 1, or 1 for a create.
    pub new_version: u64,
    /// Milliseconds since the epoch (also in the body's `meta.lastUpdated`).
    pub last_updated: i64,
    /// The resource JSON as served; `None` deletes.
    pub body: Option<String>,
    /// Index rows, compartment and sort key. Ignored for deletes.
    pub extracted: Extracted,
}

/// A set of writes that commit together, with their audit records.
///
/// Invariant: either every op and every audit record of a request is
/// committed, or none is.
#[derive(Debug, Clone, Default)]
pub struct WriteRequest {
    pub ops: Vec<WriteOp>,
    pub audit: Vec<AuditRecord>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// An `Expect` did not hold: `found` is the current version, if any.
    #[error("{resource_type}/{id}: expected {expected:?}, found version {found:?}")]
    Conflict {
        resource_type: String,
        id: String,
        expected: Expect,
        found: Option<u64>,
    },
    /// The store is shutting down or its writer is gone.
    #[error("the store is closed")]
    Closed,
    #[error(transparent)]
    Db(#[from] anyhow::Error),
}

/// A stored resource version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub deleted: bool,
    /// `None` for a deletion version.
    pub body: Option<String>,
    /// The patient compartment of the current version (for scoping).
    pub patient: Option<String>,
}

/// Whose data a caller may see or change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every resource.
    All,
    /// Resources outside any patient compartment, and those of patients
    /// enrolled at one of these sites.
    Sites(Vec<String>),
    /// Resources outside any patient compartment, and this patient's own.
    Patient(String),
}

/// A page of search results.
#[derive(Debug, Clone, Default)]
pub struct SearchPage {
    pub matches: Vec<StoredResource>,
    /// `_include`d resources (deduplicated, scoped).
    pub included: Vec<StoredResource>,
    /// `_total=accurate` only.
    pub total: Option<u64>,
    /// Cursor for the next page, when there is one.
    pub next_cursor: Option<String>,
}

/// One entry of the audit trail, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord {
    /// Milliseconds since the epoch, UTC.
    pub time: i64,
    /// The token's name (never the token itself).
    pub actor: String,
    pub role: String,
    /// `create`, `read`, `vread`, `update`, `delete`, `search`, `history`,
    /// `transaction`, `batch`, `trial-load`, `token-create`, ...
    pub action: String,
    /// Resource type, if the action concerns one.
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<u64>,
    /// Why (`X-Reason`, or the source message).
    pub reason: Option<String>,
    /// `success`, or the failure (an HTTP status or an error kind).
    pub outcome: String,
    /// The client's address.
    pub client: Option<String>,
    /// Free detail: the search query, the ids a search returned.
    pub detail: Option<String>,
}

/// An audit record as stored: with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedAudit {
    pub seq: i64,
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters for reading the audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub actor: Option<String>,
    /// `Type/id` or `Type`.
    pub entity: Option<String>,
    /// Return records with `seq` greater than this (paging).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// An API token as stored (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub site: Option<String>,
    pub patient: Option<String>,
    pub created: i64,
    pub expires: Option<i64>,
    pub revoked: bool,
}

/// A protocol version as loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialRecord {
    pub id: String,
    pub version: u32,
    /// The protocol as JSON.
    pub protocol: String,
    pub loaded_at: i64,
}
