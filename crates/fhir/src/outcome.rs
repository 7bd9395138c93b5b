//! `OperationOutcome`: how every FHIR-side error is told to a client.
//!
//! The types here are plain data; [`OperationOutcome::to_json_string`] renders
//! them as FHIR JSON through [`fhirkit::Json`], so string escaping is the JSON
//! writer's job and cannot be got wrong by hand-built text.

use fhirkit::Json;
use std::fmt;

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl IssueSeverity {
    /// The code as FHIR spells it (`error`, `information`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            IssueSeverity::Fatal => "fatal",
            IssueSeverity::Error => "error",
            IssueSeverity::Warning => "warning",
            IssueSeverity::Information => "information",
        }
    }
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

impl IssueCode {
    /// The code as FHIR spells it (`not-found`, `too-costly`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::Conflict => "conflict",
            IssueCode::TooCostly => "too-costly",
            IssueCode::Throttled => "throttled",
            IssueCode::Timeout => "timeout",
            IssueCode::Exception => "exception",
            IssueCode::Processing => "processing",
            IssueCode::Informational => "informational",
        }
    }
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

impl OutcomeIssue {
    /// An issue with no element path.
    pub fn new(
        severity: IssueSeverity,
        code: IssueCode,
        diagnostics: impl Into<String>,
    ) -> OutcomeIssue {
        OutcomeIssue {
            severity,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    /// An error-severity issue with no element path.
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> OutcomeIssue {
        OutcomeIssue::new(IssueSeverity::Error, code, diagnostics)
    }

    /// The same issue, located at element path `expression`.
    pub fn at(mut self, expression: impl Into<String>) -> OutcomeIssue {
        self.expression.push(expression.into());
        self
    }

    /// Whether the issue is an error or fatal.
    pub fn is_error(&self) -> bool {
        matches!(self.severity, IssueSeverity::Error | IssueSeverity::Fatal)
    }

    fn to_json(&self) -> Json {
        let mut m = Vec::with_capacity(4);
        m.push((
            "severity".into(),
            Json::String(self.severity.as_str().into()),
        ));
        m.push(("code".into(), Json::String(self.code.as_str().into())));
        // FHIR forbids empty strings, so an empty field is left out.
        if !self.diagnostics.is_empty() {
            m.push(("diagnostics".into(), Json::String(self.diagnostics.clone())));
        }
        let exprs: Vec<Json> = self
            .expression
            .iter()
            .filter(|e| !e.is_empty())
            .map(|e| Json::String(e.clone()))
            .collect();
        if !exprs.is_empty() {
            m.push(("expression".into(), Json::Array(exprs)));
        }
        Json::Object(m)
    }
}

/// An `OperationOutcome` under construction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<OutcomeIssue>,
}

impl OperationOutcome {
    /// An outcome with one error issue.
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> OperationOutcome {
        OperationOutcome::issue(OutcomeIssue::error(code, diagnostics))
    }

    /// An outcome with one error issue at element path `expression`.
    pub fn error_at(
        code: IssueCode,
        diagnostics: impl Into<String>,
        expression: impl Into<String>,
    ) -> OperationOutcome {
        OperationOutcome::issue(OutcomeIssue::error(code, diagnostics).at(expression))
    }

    /// An outcome with the one given issue.
    pub fn issue(issue: OutcomeIssue) -> OperationOutcome {
        OperationOutcome {
            issues: vec![issue],
        }
    }

    /// Adds an issue.
    pub fn push(&mut self, issue: OutcomeIssue) {
        self.issues.push(issue);
    }

    /// Adds every issue of `other`.
    pub fn extend(&mut self, other: OperationOutcome) {
        self.issues.extend(other.issues);
    }

    /// Whether there are no issues at all.
    pub fn is_empty(&self) -> bool {
        self.issues.is_empty()
    }

    /// Whether any issue is an error or fatal.
    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(OutcomeIssue::is_error)
    }

    /// The code of the first error or fatal issue: what an HTTP layer maps
    /// to a status (`not-found` to 404, `not-supported` to 400, ...).
    pub fn first_error_code(&self) -> Option<IssueCode> {
        self.issues.iter().find(|i| i.is_error()).map(|i| i.code)
    }

    /// The outcome as a JSON tree.
    ///
    /// `issue` is 1..* in FHIR, so an outcome without issues renders as one
    /// `information`/`informational` issue saying so.
    pub fn to_json(&self) -> Json {
        let issues: Vec<Json> = if self.issues.is_empty() {
            vec![OutcomeIssue::new(
                IssueSeverity::Information,
                IssueCode::Informational,
                "no issues",
            )
            .to_json()]
        } else {
            self.issues.iter().map(OutcomeIssue::to_json).collect()
        };
        Json::Object(vec![
            (
                "resourceType".into(),
                Json::String("OperationOutcome".into()),
            ),
            ("issue".into(), Json::Array(issues)),
        ])
    }

    /// The outcome as FHIR JSON text (`resourceType: OperationOutcome`).
    pub fn to_json_string(&self) -> String {
        self.to_json().to_compact()
    }
}

impl From<OutcomeIssue> for OperationOutcome {
    fn from(issue: OutcomeIssue) -> Self {
        OperationOutcome::issue(issue)
    }
}

/// The diagnostics, one issue per line, with their paths: for logs and
/// error chains (`anyhow`), not for clients (they get [`OperationOutcome::to_json_string`]).
impl fmt::Display for OperationOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, i) in self.issues.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{} {}", i.severity.as_str(), i.code.as_str())?;
            if !i.expression.is_empty() {
                write!(f, " at {}", i.expression.join(", "))?;
            }
            write!(f, ": {}", i.diagnostics)?;
        }
        Ok(())
    }
}

impl std::error::Error for OperationOutcome {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fhir_json_with_spec_codes() {
        let o =
            OperationOutcome::error_at(IssueCode::NotFound, "Patient/x is not known", "Patient");
        assert_eq!(
            o.to_json_string(),
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found","diagnostics":"Patient/x is not known","expression":["Patient"]}]}"#
        );
        assert!(o.has_errors());
        assert_eq!(o.first_error_code(), Some(IssueCode::NotFound));
    }

    #[test]
    fn escapes_strings() {
        let o = OperationOutcome::error(IssueCode::Invalid, "bad \"value\"\n\\ \u{1}");
        let text = o.to_json_string();
        let back = Json::parse(&text).unwrap();
        let diag = back.get("issue").and_then(|i| match i {
            Json::Array(a) => a[0].get("diagnostics").and_then(Json::as_str),
            _ => None,
        });
        assert_eq!(diag, Some("bad \"value\"\n\\ \u{1}"));
    }

    #[test]
    fn every_code_is_spelled_as_fhir_does() {
        use IssueCode::*;
        let all = [
            (Invalid, "invalid"),
            (Structure, "structure"),
            (Required, "required"),
            (Value, "value"),
            (Invariant, "invariant"),
            (Security, "security"),
            (Login, "login"),
            (Forbidden, "forbidden"),
            (NotFound, "not-found"),
            (Deleted, "deleted"),
            (NotSupported, "not-supported"),
            (Duplicate, "duplicate"),
            (Conflict, "conflict"),
            (TooCostly, "too-costly"),
            (Throttled, "throttled"),
            (Timeout, "timeout"),
            (Exception, "exception"),
            (Processing, "processing"),
            (Informational, "informational"),
        ];
        for (c, s) in all {
            assert_eq!(c.as_str(), s);
        }
    }

    #[test]
    fn warnings_are_not_errors_and_empty_outcomes_stay_valid() {
        let mut o = OperationOutcome::default();
        assert!(!o.has_errors());
        assert!(o.to_json_string().contains(r#""code":"informational""#));
        o.push(OutcomeIssue::new(
            IssueSeverity::Warning,
            IssueCode::Value,
            "odd",
        ));
        assert!(!o.has_errors());
        o.push(OutcomeIssue::new(
            IssueSeverity::Fatal,
            IssueCode::Exception,
            "",
        ));
        assert!(o.has_errors());
        // An empty diagnostics string is left out rather than rendered as "".
        assert!(!o.to_json_string().contains(r#""diagnostics":"""#));
        assert_eq!(o.to_string(), "warning value: odd; fatal exception: ");
    }
}
