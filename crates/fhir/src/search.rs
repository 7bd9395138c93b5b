//! Search requests parsed into typed values.
//!
//! Supported: the parameters of [`crate::index::params`], `_id`,
//! `_lastUpdated`, `_count`, `_sort` (`date`, `-date`, `_lastUpdated`,
//! `-_lastUpdated`), `_total=accurate`, `_include=Observation:subject`,
//! and clinflow's own `_cursor` (opaque, from `next` links). Repeating a
//! parameter ANDs; commas within one value OR.

use crate::outcome::OperationOutcome;

/// A date or quantity comparison prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// The system part of a token search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSystem {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    None,
    /// `system|code` or `system|`.
    Exact(String),
}

/// One alternative of a clause.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// `_id`.
    Id(String),
    /// Token: `code` `None` means `system|` (any code in that system).
    Token { system: TokenSystem, code: Option<String> },
    /// String: starts-with by default, `:exact` for equality, `:contains`.
    String { value: String, mode: StringMode },
    /// Date or `_lastUpdated`: the search value's range and prefix.
    Date { prefix: Prefix, low: i64, high: i64 },
    /// Reference `[Type/]id`; `target_type` is filled from the parameter when
    /// only one type is possible (`subject` on Observation is not: Patient is assumed
    /// only for `patient`).
    Reference { target_type: Option<String>, target_id: String },
    /// `subject:identifier=system|value`: the referenced resource has this identifier.
    ReferenceIdentifier { system: Option<String>, value: String },
    /// Quantity `[prefix]number[|system|code]`; `low`/`high` are the range implied
    /// by the number's precision (for `eq`/`ap`).
    Quantity { prefix: Prefix, value: f64, low: f64, high: f64, system: Option<String>, code: Option<String> },
}

/// How a string parameter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMode {
    StartsWith,
    Exact,
    Contains,
}

/// Clauses are ANDed; the predicates of one clause are ORed.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    /// The parameter name (`code`, `_lastUpdated`, `subject`, ...).
    pub param: String,
    pub any_of: Vec<Predicate>,
}

/// The order of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Default: by logical id.
    Id,
    Date { descending: bool },
    LastUpdated { descending: bool },
}

/// A parsed search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub resource_type: String,
    pub clauses: Vec<Clause>,
    /// `_count`, default [`DEFAULT_COUNT`], capped at [`MAX_COUNT`].
    pub count: usize,
    pub sort: SortKey,
    pub total: bool,
    pub include_subject: bool,
    /// `_cursor`, opaque to this crate.
    pub cursor: Option<String>,
}

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

/// Parses the (already percent-decoded) query pairs of a search on
/// `resource_type`. Unknown parameters, bad values and unsupported
/// modifiers give a 400-class outcome naming the parameter.
pub fn parse_query(resource_type: &str, pairs: &[(String, String)]) -> Result<SearchQuery, OperationOutcome> {
    todo!("{resource_type} {pairs:?}")
}
