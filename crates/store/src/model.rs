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
/// Invariant: either every op, data query and audit record of a request is
/// committed, or none is.
#[derive(Debug, Clone, Default)]
pub struct WriteRequest {
    pub ops: Vec<WriteOp>,
    pub audit: Vec<AuditRecord>,
    /// Data queries about the values written, committed with them.
    pub queries: Vec<NewDataQuery>,
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

/// Where an ingest batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    /// Accepted (its raw input is durable), not yet fully processed.
    Processing,
    /// Processed: counts and rejections are final.
    Done,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Processing => "processing",
            BatchStatus::Done => "done",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<BatchStatus> {
        match s {
            "processing" => Ok(BatchStatus::Processing),
            "done" => Ok(BatchStatus::Done),
            other => Err(anyhow::anyhow!("unknown batch status {other:?}")),
        }
    }
}

/// An input to accept: what the intake stores before answering 202.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    /// A UUIDv7, used only when this content is new.
    pub id: String,
    /// `hl7v2`, `wearable-csv`, `diary-json`, `diary-ndjson`.
    pub format: String,
    /// Hex SHA-256 of `raw`.
    pub sha256: String,
    /// The submitting token's name.
    pub submitter: String,
    pub role: String,
    /// Whose data the batch may hold (the submitter's); part of its
    /// identity, with the format and content.
    pub scope: IngestScope,
    /// Milliseconds since the epoch.
    pub received_at: i64,
    /// The bytes as received.
    pub raw: Vec<u8>,
}

/// Whose data an ingest batch may store: its submitter's reach. Items of
/// other subjects are rejected (`out-of-scope`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IngestScope {
    /// Any subject of the trial (interface, data-manager, admin).
    #[default]
    All,
    /// The subjects enrolled at this site (a site user).
    Site(String),
    /// This Patient only (a patient's own diaries).
    Patient(String),
}

impl IngestScope {
    /// As the `ingest_batches.scope` column holds it: ``, `site:ID`,
    /// `patient:ID`.
    pub fn to_column(&self) -> String {
        match self {
            IngestScope::All => String::new(),
            IngestScope::Site(s) => format!("site:{s}"),
            IngestScope::Patient(p) => format!("patient:{p}"),
        }
    }

    /// The inverse of [`IngestScope::to_column`].
    pub fn from_column(s: &str) -> anyhow::Result<IngestScope> {
        if s.is_empty() {
            Ok(IngestScope::All)
        } else if let Some(site) = s.strip_prefix("site:") {
            Ok(IngestScope::Site(site.to_string()))
        } else if let Some(p) = s.strip_prefix("patient:") {
            Ok(IngestScope::Patient(p.to_string()))
        } else {
            anyhow::bail!("unknown ingest scope {s:?}")
        }
    }
}

/// What processing a batch gave, item by item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchCounts {
    /// Items in the input (messages or garbage runs, CSV rows, diaries):
    /// `stored + rejected + duplicates`.
    pub received: u64,
    pub stored: u64,
    pub rejected: u64,
    /// Items whose resources were already stored (sent before).
    pub duplicates: u64,
    /// Data queries for values stored outside the soft range.
    pub queries_opened: u64,
}

/// One rejected item, or part of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRejection {
    /// The item's index in the input, from 0.
    pub index: u64,
    pub reason: String,
    /// Where in the input (`OBX[2].5`, `line 4, column value`).
    pub location: String,
}

/// What one rejected item of a done batch became when it was run again
/// ([`crate::Store::retry_item`]): how the batch's counts change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetriedFate {
    /// Rejected before, stored now, with this many data queries opened.
    Stored { queries: u64 },
    /// Rejected before, and now a duplicate of an item another batch stored.
    Duplicate,
    /// The counts stay: still rejected, or stored before with some values
    /// rejected. Only the item's rejections are replaced.
    Unchanged,
}

/// An ingest batch as stored (without its raw input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub id: String,
    pub format: String,
    pub sha256: String,
    pub submitter: String,
    pub role: String,
    pub scope: IngestScope,
    pub received_at: i64,
    pub status: BatchStatus,
    /// Zero until the batch is done.
    pub counts: BatchCounts,
}

/// Where a data query is in its lifecycle: open -> answered -> closed
/// (or open -> closed). Never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryStatus {
    Open,
    Answered,
    Closed,
}

impl QueryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryStatus::Open => "open",
            QueryStatus::Answered => "answered",
            QueryStatus::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<QueryStatus> {
        match s {
            "open" => Some(QueryStatus::Open),
            "answered" => Some(QueryStatus::Answered),
            "closed" => Some(QueryStatus::Closed),
            _ => None,
        }
    }
}

/// A data query opened for a stored value outside the protocol's soft
/// range, written with the value's resource ([`WriteRequest::queries`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewDataQuery {
    /// A UUIDv7.
    pub id: String,
    pub trial: String,
    /// The subject's site: who answers it (queries are site scoped).
    pub site: String,
    /// The subject's Patient id.
    pub patient: String,
    /// The stored resource it is about (server-assigned id).
    pub resource_type: String,
    pub resource_id: String,
    /// The protocol measurement id.
    pub measurement: String,
    /// The value in the canonical unit, as text.
    pub value: String,
    pub unit: String,
    /// The soft range the value is outside.
    pub soft_low: f64,
    pub soft_high: f64,
    /// Where the value was in the input (`OBX[2].5`).
    pub location: String,
    /// What is unexpected, for the site.
    pub text: String,
    /// Milliseconds since the epoch.
    pub opened_at: i64,
    /// The submitter of the batch that opened it.
    pub opened_by: String,
}

/// A data query as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DataQueryRecord {
    pub query: NewDataQuery,
    pub status: QueryStatus,
    pub answer: Option<String>,
    pub answered_at: Option<i64>,
    pub answered_by: Option<String>,
    pub closed_at: Option<i64>,
    pub closed_by: Option<String>,
}

/// A lifecycle step of a data query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryChange {
    /// open -> answered, with the site's answer.
    Answer(String),
    /// open or answered -> closed.
    Close,
}

impl QueryChange {
    /// The statuses this change may start from.
    pub fn from_statuses(&self) -> &'static [QueryStatus] {
        match self {
            QueryChange::Answer(_) => &[QueryStatus::Open],
            QueryChange::Close => &[QueryStatus::Open, QueryStatus::Answered],
        }
    }
}

/// Filters for listing data queries, in id (opening) order.
#[derive(Debug, Clone, Default)]
pub struct QueryFilter {
    pub site: Option<String>,
    pub status: Option<QueryStatus>,
    /// Queries with an id greater than this (the keyset cursor).
    pub after: Option<String>,
    pub limit: usize,
}

/// One page of a patient's current resources of one type, for the history
/// services: `rtype` resources in `patient`'s compartment, in id order after
/// `after`, at most `limit`, dated at or after `since` (ms) when given.
#[derive(Debug, Clone)]
pub struct CompartmentQuery {
    pub patient: String,
    pub rtype: String,
    pub since: Option<i64>,
    pub after: Option<String>,
    pub limit: usize,
}

/// A resource with its clinical date (the low end of its `date`-kind
/// search parameter, ms), `None` when it has none.
#[derive(Debug, Clone)]
pub struct DatedResource {
    pub resource: StoredResource,
    pub date: Option<i64>,
}

/// Why a read with a deadline gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The deadline passed first; the database was told to stop the query.
    #[error("the read ran past its deadline")]
    Deadline,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}
