//! `OperationOutcome`: how every FHIR-side error is told to a client.

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// `OperationOutcome.issue.code` (the subset clinflow uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    NotFound,
    Deleted,
    NotSupported,
    Duplicate,
    Conflict,
    TooCostly,
    Throttled,
    Timeout,
    Exception,
    Processing,
    Informational,
}

/// One issue: what, where (FHIRPath-like element path, e.g. `Observation.status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeIssue {
    pub severity: IssueSeverity,
    pub code: IssueCode,
    pub diagnostics: String,
    /// `issue.expression`: element paths.
    pub expression: Vec<String>,
}

/// An `OperationOutcome` under construction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<OutcomeIssue>,
}

impl OperationOutcome {
    /// An outcome with one error issue.
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> OperationOutcome {
        todo!("{code:?} {}", diagnostics.into())
    }

    /// Whether any issue is an error or fatal.
    pub fn has_errors(&self) -> bool {
        todo!()
    }

    /// The outcome as FHIR JSON text (`resourceType: OperationOutcome`).
    pub fn to_json_string(&self) -> String {
        todo!()
    }
}
