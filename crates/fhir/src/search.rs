//! Search requests parsed into typed values.
//!
//! Supported: the parameters of [`crate::index::params`], `_id`,
//! `_lastUpdated`, `_count`, `_sort` (`date`, `-date`, `_lastUpdated`,
//! `-_lastUpdated`), `_total=accurate`, `_include=Observation:subject`,
//! and clinflow's own `_cursor` (opaque, from `next` links). Repeating a
//! parameter ANDs; commas within one value OR (`\,` is a literal comma).
//!
//! Everything not supported is an error naming the parameter, never silently
//! ignored: a search that drops a criterion returns more than the client
//! asked for, which for clinical data is worse than a 400. Only `_format` and
//! `_pretty` (presentation) are ignored, and empty values as FHIR says.
//!
//! String values are normalised as the index normalises them (lower case), so
//! the store compares them as they are.

use crate::datetime;
use crate::index::{self, ParamKind};
use crate::outcome::{IssueCode, OperationOutcome, OutcomeIssue};
use crate::validate::{is_resource_type, is_valid_id};

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
    Token {
        system: TokenSystem,
        code: Option<String>,
    },
    /// String: starts-with by default, `:exact` for equality, `:contains`.
    String { value: String, mode: StringMode },
    /// Date or `_lastUpdated`: the search value's range and prefix.
    Date { prefix: Prefix, low: i64, high: i64 },
    /// Reference `[Type/]id`; `target_type` is filled from the parameter when
    /// only one type is possible (`subject` on Observation is not: Patient is assumed
    /// only for `patient`).
    Reference {
        target_type: Option<String>,
        target_id: String,
    },
    /// `subject:identifier=system|value`: the referenced resource has this identifier.
    ReferenceIdentifier {
        system: Option<String>,
        value: String,
    },
    /// Quantity `[prefix]number[|system|code]`; `low`/`high` are the range implied
    /// by the number's precision (for `eq`/`ap`).
    Quantity {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
    },
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
    Date {
        descending: bool,
    },
    LastUpdated {
        descending: bool,
    },
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

/// `_count` when the request gives none.
pub const DEFAULT_COUNT: usize = 50;
/// The largest page; a larger `_count` is reduced to it, as FHIR allows.
pub const MAX_COUNT: usize = 1000;

/// Parses the (already percent-decoded) query pairs of a search on
/// `resource_type`. Unknown parameters, bad values and unsupported
/// modifiers give a 400-class outcome naming the parameter.
///
/// Every problem is reported, one issue each, not only the first.
pub fn parse_query(
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<SearchQuery, OperationOutcome> {
    let mut q = SearchQuery {
        resource_type: resource_type.to_string(),
        clauses: Vec::new(),
        count: DEFAULT_COUNT,
        sort: SortKey::Id,
        total: false,
        include_subject: false,
        cursor: None,
    };
    if !is_resource_type(resource_type) {
        return Err(OperationOutcome::error(
            IssueCode::Invalid,
            format!("{resource_type:?} is not an R4 resource type"),
        ));
    }
    let mut errors = OperationOutcome::default();
    for (name, value) in pairs {
        if let Err(e) = parse_pair(&mut q, name, value) {
            errors.push(e.into_issue(name, value));
        }
    }
    if errors.has_errors() {
        Err(errors)
    } else {
        Ok(q)
    }
}

/// Why one pair was refused; the parameter and value are added by the caller.
struct PairError {
    code: IssueCode,
    message: String,
}

impl PairError {
    fn invalid(message: impl Into<String>) -> PairError {
        PairError {
            code: IssueCode::Invalid,
            message: message.into(),
        }
    }

    fn unsupported(message: impl Into<String>) -> PairError {
        PairError {
            code: IssueCode::NotSupported,
            message: message.into(),
        }
    }

    fn into_issue(self, name: &str, value: &str) -> OutcomeIssue {
        OutcomeIssue::error(
            self.code,
            format!(
                "search parameter {name:?} with value {value:?}: {}",
                self.message
            ),
        )
    }
}

/// Parameters FHIR defines for all resources or for result shaping that
/// clinflow does not implement.
const UNSUPPORTED_GENERAL: &[&str] = &[
    "_summary",
    "_elements",
    "_revinclude",
    "_has",
    "_contained",
    "_containedType",
    "_text",
    "_content",
    "_list",
    "_query",
    "_filter",
    "_type",
    "_security",
    "_tag",
    "_profile",
    "_source",
];

/// Modifiers FHIR R4 defines; any other (besides resource types) is a typo.
const KNOWN_MODIFIERS: &[&str] = &[
    "missing",
    "exact",
    "contains",
    "text",
    "not",
    "above",
    "below",
    "in",
    "not-in",
    "of-type",
    "identifier",
    "iterate",
    "code-text",
    "text-advanced",
    "type",
];

fn parse_pair(q: &mut SearchQuery, name: &str, value: &str) -> Result<(), PairError> {
    if name.is_empty() {
        return Err(PairError::invalid("the parameter name is empty"));
    }
    let (base, modifier) = match name.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (name, None),
    };
    if base.contains('.') || modifier.is_some_and(|m| m.contains('.')) {
        return Err(PairError::unsupported(
            "chained search parameters are not supported",
        ));
    }
    // FHIR: a parameter without a value is ignored.
    if value.is_empty() {
        return Ok(());
    }
    let no_modifier = || match modifier {
        Some(m) => Err(modifier_error(base, m, "this parameter takes no modifier")),
        None => Ok(()),
    };
    match base {
        "_count" => {
            no_modifier()?;
            q.count = parse_count(value)?;
        }
        "_sort" => {
            no_modifier()?;
            q.sort = parse_sort(&q.resource_type, value)?;
        }
        "_total" => {
            no_modifier()?;
            q.total = match value {
                "accurate" => true,
                "none" | "estimate" => false,
                _ => return Err(PairError::invalid("expected accurate, estimate or none")),
            };
        }
        "_include" => {
            no_modifier()?;
            match (q.resource_type.as_str(), value) {
                (
                    "Observation",
                    "Observation:subject"
                    | "Observation:patient"
                    | "Observation:subject:Patient"
                    | "Observation:patient:Patient",
                ) => q.include_subject = true,
                _ => {
                    return Err(PairError::unsupported(
                        "the only _include supported is Observation:subject (or Observation:patient) on Observation",
                    ))
                }
            }
        }
        "_cursor" => {
            no_modifier()?;
            q.cursor = Some(value.to_string());
        }
        // Presentation only; the server always answers FHIR JSON.
        "_format" | "_pretty" => {}
        "_id" => {
            no_modifier()?;
            let any_of = alternatives(value, |v| {
                let id = unescape(v);
                if is_valid_id(&id) {
                    Ok(Predicate::Id(id))
                } else {
                    Err(PairError::invalid(format!("{id:?} is not a valid id")))
                }
            })?;
            push_clause(q, base, any_of);
        }
        "_lastUpdated" => {
            no_modifier()?;
            let any_of = alternatives(value, parse_date)?;
            push_clause(q, base, any_of);
        }
        _ if UNSUPPORTED_GENERAL.contains(&base) => {
            return Err(PairError::unsupported(format!("{base} is not supported")))
        }
        _ => {
            let Some(def) = index::param(&q.resource_type, base) else {
                let known: Vec<&str> = index::params(&q.resource_type)
                    .iter()
                    .map(|d| d.name)
                    .collect();
                return Err(PairError::unsupported(format!(
                    "{base} is not a search parameter clinflow supports on {} (supported: _id, _lastUpdated{}{})",
                    q.resource_type,
                    if known.is_empty() { "" } else { ", " },
                    known.join(", ")
                )));
            };
            let rtype = q.resource_type.clone();
            let any_of = match def.kind {
                ParamKind::Token => {
                    if let Some(m) = modifier {
                        return Err(modifier_error(
                            base,
                            m,
                            "token parameters take no modifier here",
                        ));
                    }
                    alternatives(value, parse_token)?
                }
                ParamKind::String => {
                    let mode = match modifier {
                        None => StringMode::StartsWith,
                        Some("exact") => StringMode::Exact,
                        Some("contains") => StringMode::Contains,
                        Some(m) => {
                            return Err(modifier_error(
                                base,
                                m,
                                "string parameters take :exact or :contains",
                            ))
                        }
                    };
                    alternatives(value, |v| {
                        Ok(Predicate::String {
                            value: index::normalise_string(&unescape(v)),
                            mode,
                        })
                    })?
                }
                ParamKind::Date => {
                    if let Some(m) = modifier {
                        return Err(modifier_error(base, m, "date parameters take no modifier"));
                    }
                    alternatives(value, parse_date)?
                }
                ParamKind::Quantity => {
                    if let Some(m) = modifier {
                        return Err(modifier_error(
                            base,
                            m,
                            "quantity parameters take no modifier",
                        ));
                    }
                    alternatives(value, parse_quantity)?
                }
                ParamKind::Reference => {
                    match modifier {
                        Some("identifier") => alternatives(value, parse_reference_identifier)?,
                        Some(t) if is_resource_type(t) => {
                            alternatives(value, |v| parse_reference(&rtype, base, Some(t), v))?
                        }
                        Some(m) => return Err(modifier_error(
                            base,
                            m,
                            "reference parameters take a resource type (:Patient) or :identifier",
                        )),
                        None => alternatives(value, |v| parse_reference(&rtype, base, None, v))?,
                    }
                }
            };
            push_clause(q, base, any_of);
        }
    }
    Ok(())
}

fn modifier_error(base: &str, modifier: &str, why: &str) -> PairError {
    if KNOWN_MODIFIERS.contains(&modifier) || is_resource_type(modifier) {
        PairError::unsupported(format!(
            "modifier :{modifier} is not supported on {base}; {why}"
        ))
    } else {
        PairError::invalid(format!("{modifier:?} is not a FHIR search modifier; {why}"))
    }
}

fn push_clause(q: &mut SearchQuery, param: &str, any_of: Vec<Predicate>) {
    // All alternatives empty (`code=,`) is the same as no value: ignored.
    if !any_of.is_empty() {
        q.clauses.push(Clause {
            param: param.to_string(),
            any_of,
        });
    }
}

/// Parses each comma-separated alternative of `value` with `f`.
fn alternatives(
    value: &str,
    mut f: impl FnMut(&str) -> Result<Predicate, PairError>,
) -> Result<Vec<Predicate>, PairError> {
    split_unescaped(value, b',')
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(&mut f)
        .collect()
}

fn parse_count(value: &str) -> Result<usize, PairError> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PairError::invalid(format!(
            "expected a whole number from 0 (total only) to {MAX_COUNT}"
        )));
    }
    // All digits: anything too large for usize is also above the cap.
    Ok(value
        .parse::<usize>()
        .map_or(MAX_COUNT, |n| n.min(MAX_COUNT)))
}

fn parse_sort(resource_type: &str, value: &str) -> Result<SortKey, PairError> {
    if value.contains(',') {
        return Err(PairError::unsupported(
            "sorting by more than one key is not supported",
        ));
    }
    let (descending, key) = match value.strip_prefix('-') {
        Some(k) => (true, k),
        None => (false, value),
    };
    match key {
        "_lastUpdated" => Ok(SortKey::LastUpdated { descending }),
        "date" => {
            if index::params(resource_type)
                .iter()
                .any(|d| d.kind == ParamKind::Date)
            {
                Ok(SortKey::Date { descending })
            } else {
                Err(PairError::unsupported(format!(
                    "{resource_type} has no date to sort by"
                )))
            }
        }
        _ => Err(PairError::unsupported(
            "only date, -date, _lastUpdated and -_lastUpdated are supported",
        )),
    }
}

fn parse_token(v: &str) -> Result<Predicate, PairError> {
    let parts = split_unescaped(v, b'|');
    match parts.as_slice() {
        [code] => Ok(Predicate::Token {
            system: TokenSystem::Any,
            code: Some(unescape(code)),
        }),
        ["", ""] => Err(PairError::invalid("'|' needs a system, a code or both")),
        ["", code] => Ok(Predicate::Token {
            system: TokenSystem::None,
            code: Some(unescape(code)),
        }),
        [system, ""] => Ok(Predicate::Token {
            system: TokenSystem::Exact(unescape(system)),
            code: None,
        }),
        [system, code] => Ok(Predicate::Token {
            system: TokenSystem::Exact(unescape(system)),
            code: Some(unescape(code)),
        }),
        _ => Err(PairError::invalid(format!(
            "{v:?} has more than one '|'; expected code, system|code, |code or system|"
        ))),
    }
}

/// A comparison prefix, if `v` starts with one followed by more text.
fn split_prefix(v: &str) -> (Prefix, &str) {
    let prefix = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("gt") => Prefix::Gt,
        Some("lt") => Prefix::Lt,
        Some("ge") => Prefix::Ge,
        Some("le") => Prefix::Le,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        _ => return (Prefix::Eq, v),
    };
    (prefix, v.get(2..).unwrap_or_default())
}

fn parse_date(v: &str) -> Result<Predicate, PairError> {
    let text = unescape(v);
    let (prefix, date) = split_prefix(&text);
    let r = datetime::parse_range(date).map_err(|e| {
        PairError::invalid(format!(
            "{date:?} is not a date: {e} (expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|+hh:mm]]]])"
        ))
    })?;
    Ok(Predicate::Date {
        prefix,
        low: r.low,
        high: r.high,
    })
}

fn parse_quantity(v: &str) -> Result<Predicate, PairError> {
    let parts = split_unescaped(v, b'|');
    let (number, system, code) = match parts.as_slice() {
        [n] => (unescape(n), None, None),
        [n, s, c] => {
            let opt = |x: &str| (!x.is_empty()).then(|| unescape(x));
            (unescape(n), opt(s), opt(c))
        }
        _ => {
            return Err(PairError::invalid(
                "expected [prefix]number, [prefix]number|system|code or [prefix]number||code",
            ))
        }
    };
    let (prefix, number) = split_prefix(&number);
    let bad = || PairError::invalid(format!("{number:?} is not a number"));
    if !fhirkit::primitive::is_decimal(number) {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    // Precision: half a unit of the last digit written, either side
    // (5.4 means [5.35, 5.45); 1.0e2 means [95, 105)).
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(i) => (&number[..i], &number[i + 1..]),
        None => (number, "0"),
    };
    let exponent: i32 = exponent
        .parse()
        .map_err(|_| PairError::invalid(format!("{number:?} has an exponent out of range")))?;
    let decimals = mantissa
        .split_once('.')
        .map_or(0, |(_, f)| i32::try_from(f.len()).unwrap_or(i32::MAX));
    let half = 10f64.powi(exponent.saturating_sub(decimals)) / 2.0;
    if !value.is_finite() || !half.is_finite() {
        return Err(PairError::invalid(format!("{number:?} is out of range")));
    }
    Ok(Predicate::Quantity {
        prefix,
        value,
        low: value - half,
        high: value + half,
        system,
        code,
    })
}

fn parse_reference(
    resource_type: &str,
    param: &str,
    type_modifier: Option<&str>,
    v: &str,
) -> Result<Predicate, PairError> {
    let text = unescape(v);
    let fixed = index::reference_target(resource_type, param);
    // A canonical: an absolute URL may carry a `|version` the index dropped.
    let canonical = index::is_canonical(resource_type, param);
    let unversioned = if canonical {
        text.split_once('|').map_or(text.as_str(), |(u, _)| u)
    } else {
        text.as_str()
    };
    let (typed, id) = match index::parse_reference(unversioned) {
        Some((t, id)) => (Some(t), id),
        None if is_valid_id(unversioned) => (None, unversioned),
        None if canonical => {
            // Not `[base/]Questionnaire/id`: indexed as a token, the canonical as written.
            return Ok(Predicate::Token {
                system: TokenSystem::None,
                code: Some(text),
            });
        }
        None => {
            return Err(PairError::invalid(format!(
                "{text:?} is not a reference; expected an id, Type/id or an absolute URL ending in Type/id"
            )))
        }
    };
    if let (Some(t), Some(m)) = (typed, type_modifier) {
        if t != m {
            return Err(PairError::invalid(format!(
                "the value names a {t} but the modifier :{m} a {m}"
            )));
        }
    }
    let target = typed.or(type_modifier).or(fixed);
    if let (Some(t), Some(f)) = (target, fixed) {
        if t != f {
            return Err(PairError::invalid(format!(
                "{param} on {resource_type} refers to a {f}, not a {t}"
            )));
        }
    }
    Ok(Predicate::Reference {
        target_type: target.map(str::to_string),
        target_id: id.to_string(),
    })
}

fn parse_reference_identifier(v: &str) -> Result<Predicate, PairError> {
    let parts = split_unescaped(v, b'|');
    let (system, value) = match parts.as_slice() {
        [value] => (None, unescape(value)),
        [system, value] => (
            (!system.is_empty()).then(|| unescape(system)),
            unescape(value),
        ),
        _ => return Err(PairError::invalid("expected value or system|value")),
    };
    if value.is_empty() {
        return Err(PairError::invalid("the identifier value is empty"));
    }
    Ok(Predicate::ReferenceIdentifier { system, value })
}

/// Splits at every `sep` not escaped by a backslash; parts stay escaped.
fn split_unescaped(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == sep {
            // `sep` is ASCII, so `i` is a character boundary.
            parts.push(s.get(start..i).unwrap_or_default());
            start = i + 1;
        }
    }
    parts.push(s.get(start..).unwrap_or_default());
    parts
}

/// Removes the backslash of FHIR's search escapes `\,` `\|` `\$` `\\`;
/// any other backslash is kept as written.
fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&n) = chars.peek() {
                if matches!(n, ',' | '|' | '$' | '\\') {
                    out.push(n);
                    chars.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(rt: &str, pairs: &[(&str, &str)]) -> Result<SearchQuery, OperationOutcome> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_query(rt, &pairs)
    }

    fn ok(rt: &str, pairs: &[(&str, &str)]) -> SearchQuery {
        q(rt, pairs).unwrap_or_else(|o| panic!("{o}"))
    }

    fn one(rt: &str, k: &str, v: &str) -> Vec<Predicate> {
        let mut c = ok(rt, &[(k, v)]).clauses;
        assert_eq!(c.len(), 1);
        c.remove(0).any_of
    }

    fn err(rt: &str, k: &str, v: &str) -> (IssueCode, String) {
        let o = q(rt, &[(k, v)]).expect_err("should fail");
        assert_eq!(o.issues.len(), 1);
        let i = &o.issues[0];
        assert!(
            i.diagnostics.contains(&format!("{k:?}")),
            "names the parameter: {}",
            i.diagnostics
        );
        assert!(
            i.diagnostics.contains(&format!("{v:?}")),
            "names the value: {}",
            i.diagnostics
        );
        (i.code, i.diagnostics.clone())
    }

    fn ms(s: &str) -> (i64, i64) {
        let r = datetime::parse_range(s).unwrap();
        (r.low, r.high)
    }

    #[test]
    fn defaults() {
        let s = ok("Observation", &[]);
        assert_eq!(s.resource_type, "Observation");
        assert_eq!(s.count, DEFAULT_COUNT);
        assert_eq!(s.sort, SortKey::Id);
        assert!(!s.total && !s.include_subject && s.cursor.is_none() && s.clauses.is_empty());
    }

    #[test]
    fn result_parameters() {
        let s = ok(
            "Observation",
            &[
                ("_count", "0"),
                ("_sort", "-date"),
                ("_total", "accurate"),
                ("_include", "Observation:subject"),
                ("_cursor", "abc=="),
                ("_format", "json"),
            ],
        );
        assert_eq!(s.count, 0);
        assert_eq!(s.sort, SortKey::Date { descending: true });
        assert!(s.total && s.include_subject);
        assert_eq!(s.cursor.as_deref(), Some("abc=="));
        assert_eq!(ok("Observation", &[("_count", "5000")]).count, MAX_COUNT);
        assert_eq!(
            ok("Observation", &[("_count", "99999999999999999999999")]).count,
            MAX_COUNT
        );
        assert_eq!(
            ok("Patient", &[("_sort", "date")]).sort,
            SortKey::Date { descending: false }
        );
        assert_eq!(
            ok("Patient", &[("_sort", "_lastUpdated")]).sort,
            SortKey::LastUpdated { descending: false }
        );
        assert_eq!(
            ok("Patient", &[("_sort", "-_lastUpdated")]).sort,
            SortKey::LastUpdated { descending: true }
        );
        assert!(!ok("Patient", &[("_total", "none")]).total);
        assert!(!ok("Patient", &[("_total", "estimate")]).total);
        assert!(ok("Observation", &[("_include", "Observation:patient")]).include_subject);
    }

    #[test]
    fn result_parameter_errors() {
        assert_eq!(err("Observation", "_count", "-1").0, IssueCode::Invalid);
        assert_eq!(err("Observation", "_count", "ten").0, IssueCode::Invalid);
        assert_eq!(
            err("Observation", "_sort", "code").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "_sort", "date,_lastUpdated").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Organization", "_sort", "date").0,
            IssueCode::NotSupported
        );
        assert_eq!(err("Observation", "_total", "exact").0, IssueCode::Invalid);
        assert_eq!(
            err("Observation", "_include", "Observation:encounter").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Condition", "_include", "Observation:subject").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "_include:iterate", "Observation:subject").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "_revinclude", "Provenance:target").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "_summary", "count").0,
            IssueCode::NotSupported
        );
        assert_eq!(err("Observation", "_has", "x").0, IssueCode::NotSupported);
    }

    #[test]
    fn ids_and_last_updated() {
        assert_eq!(
            one("Patient", "_id", "a,b"),
            [Predicate::Id("a".into()), Predicate::Id("b".into())]
        );
        assert_eq!(err("Patient", "_id", "a/b").0, IssueCode::Invalid);
        let (low, high) = ms("2026-03");
        assert_eq!(
            one("Patient", "_lastUpdated", "gt2026-03"),
            [Predicate::Date {
                prefix: Prefix::Gt,
                low,
                high
            }]
        );
    }

    #[test]
    fn tokens_in_every_form() {
        let t = |system: TokenSystem, code: Option<&str>| Predicate::Token {
            system,
            code: code.map(str::to_string),
        };
        assert_eq!(
            one("Observation", "code", "8867-4"),
            [t(TokenSystem::Any, Some("8867-4"))]
        );
        assert_eq!(
            one("Observation", "code", "http://loinc.org|8867-4"),
            [t(
                TokenSystem::Exact("http://loinc.org".into()),
                Some("8867-4")
            )]
        );
        assert_eq!(
            one("Observation", "code", "|hr"),
            [t(TokenSystem::None, Some("hr"))]
        );
        assert_eq!(
            one("Observation", "code", "http://loinc.org|"),
            [t(TokenSystem::Exact("http://loinc.org".into()), None)]
        );
        assert_eq!(
            one("Observation", "status", "final,amended"),
            [
                t(TokenSystem::Any, Some("final")),
                t(TokenSystem::Any, Some("amended"))
            ]
        );
        // Escapes: a literal comma and a literal bar.
        assert_eq!(
            one("Observation", "code", r"a\,b"),
            [t(TokenSystem::Any, Some("a,b"))]
        );
        assert_eq!(
            one("Observation", "identifier", r"sys|v\|1"),
            [t(TokenSystem::Exact("sys".into()), Some("v|1"))]
        );
        assert_eq!(err("Observation", "code", "|").0, IssueCode::Invalid);
        assert_eq!(err("Observation", "code", "a|b|c").0, IssueCode::Invalid);
        assert_eq!(
            err("Observation", "code:text", "heart").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "code:not", "x").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "code:missing", "true").0,
            IssueCode::NotSupported
        );
        assert_eq!(err("Observation", "code:bogus", "x").0, IssueCode::Invalid);
    }

    #[test]
    fn strings_and_modifiers() {
        let st = |v: &str, mode| Predicate::String {
            value: v.into(),
            mode,
        };
        assert_eq!(
            one("Patient", "family", "Mül"),
            [st("mül", StringMode::StartsWith)]
        );
        assert_eq!(
            one("Patient", "name:exact", "ANA"),
            [st("ana", StringMode::Exact)]
        );
        assert_eq!(
            one("Patient", "given:contains", "uc"),
            [st("uc", StringMode::Contains)]
        );
        assert_eq!(
            one("Organization", "name", r"Smith\, Jones,Charité"),
            [
                st("smith, jones", StringMode::StartsWith),
                st("charité", StringMode::StartsWith)
            ]
        );
        assert_eq!(err("Patient", "name:text", "x").0, IssueCode::NotSupported);
        assert_eq!(
            err("Patient", "name:missing", "true").0,
            IssueCode::NotSupported
        );
    }

    #[test]
    fn dates_with_prefixes_and_partial_values() {
        for (v, prefix, date) in [
            ("2026", Prefix::Eq, "2026"),
            ("eq2026-03-02", Prefix::Eq, "2026-03-02"),
            ("ne2026-03", Prefix::Ne, "2026-03"),
            ("gt2026-03-02T10:00", Prefix::Gt, "2026-03-02T10:00"),
            ("lt2026-03-02T10:00:00Z", Prefix::Lt, "2026-03-02T10:00:00Z"),
            (
                "ge2026-03-02T10:00:00+01:00",
                Prefix::Ge,
                "2026-03-02T10:00:00+01:00",
            ),
            ("le2026", Prefix::Le, "2026"),
            ("sa2026", Prefix::Sa, "2026"),
            ("eb2026", Prefix::Eb, "2026"),
            ("ap2026-03-02", Prefix::Ap, "2026-03-02"),
        ] {
            let (low, high) = ms(date);
            assert_eq!(
                one("Observation", "date", v),
                [Predicate::Date { prefix, low, high }],
                "{v}"
            );
        }
        assert_eq!(
            ok(
                "Observation",
                &[("date", "ge2026-03"), ("date", "lt2026-04")]
            )
            .clauses
            .len(),
            2
        );
        let (code, msg) = err("Observation", "date", "2026-02-30");
        assert_eq!(code, IssueCode::Invalid);
        assert!(msg.contains("does not exist"), "{msg}");
        assert_eq!(err("Observation", "date", "xx2026").0, IssueCode::Invalid);
        assert_eq!(err("Observation", "date", "gt").0, IssueCode::Invalid);
        assert_eq!(
            err("Observation", "date:missing", "true").0,
            IssueCode::NotSupported
        );
        assert_eq!(one("Patient", "birthdate", "1970").len(), 1);
    }

    #[test]
    fn references_in_every_form() {
        let r = |t: Option<&str>, id: &str| Predicate::Reference {
            target_type: t.map(str::to_string),
            target_id: id.into(),
        };
        assert_eq!(
            one("Observation", "subject", "Patient/p1"),
            [r(Some("Patient"), "p1")]
        );
        assert_eq!(one("Observation", "subject", "p1"), [r(None, "p1")]);
        assert_eq!(
            one("Observation", "subject:Patient", "p1"),
            [r(Some("Patient"), "p1")]
        );
        assert_eq!(
            one("Observation", "patient", "p1"),
            [r(Some("Patient"), "p1")]
        );
        assert_eq!(
            one(
                "Observation",
                "subject",
                "https://h.example/fhir/Patient/p1/_history/2"
            ),
            [r(Some("Patient"), "p1")]
        );
        assert_eq!(
            one("ResearchSubject", "study", "cardio-01"),
            [r(Some("ResearchStudy"), "cardio-01")]
        );
        assert_eq!(
            one(
                "Observation",
                "subject:identifier",
                "https://trials.example.org/CARDIO-01/subject|CARDIO-01-0006"
            ),
            [Predicate::ReferenceIdentifier {
                system: Some("https://trials.example.org/CARDIO-01/subject".into()),
                value: "CARDIO-01-0006".into()
            }]
        );
        assert_eq!(
            one("Observation", "subject:identifier", "CARDIO-01-0006"),
            [Predicate::ReferenceIdentifier {
                system: None,
                value: "CARDIO-01-0006".into()
            }]
        );
        assert_eq!(
            one(
                "QuestionnaireResponse",
                "questionnaire",
                "https://x.example/Questionnaire/daily-diary|2"
            ),
            [r(Some("Questionnaire"), "daily-diary")]
        );
        assert_eq!(
            one(
                "QuestionnaireResponse",
                "questionnaire",
                "https://x.example/q/diary"
            ),
            [Predicate::Token {
                system: TokenSystem::None,
                code: Some("https://x.example/q/diary".into())
            }]
        );
        assert_eq!(
            err("Observation", "subject:Patient", "Group/g").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "patient", "Practitioner/x").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "patient:Group", "g").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "subject", "not a ref").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "subject", "Patient?name=x").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "subject:identifier", "a|b|c").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "subject:identifier", "sys|").0,
            IssueCode::Invalid
        );
        assert_eq!(
            err("Observation", "subject:missing", "true").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "subject:patient", "p1").0,
            IssueCode::Invalid
        );
    }

    #[test]
    fn quantities_with_precision() {
        let got = one(
            "Observation",
            "value-quantity",
            "5.4|http://unitsofmeasure.org|mmol/L",
        );
        let [Predicate::Quantity {
            prefix,
            value,
            low,
            high,
            system,
            code,
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert_eq!(*prefix, Prefix::Eq);
        assert_eq!(*value, 5.4);
        assert!((low - 5.35).abs() < 1e-9 && (high - 5.45).abs() < 1e-9);
        assert_eq!(system.as_deref(), Some("http://unitsofmeasure.org"));
        assert_eq!(code.as_deref(), Some("mmol/L"));

        let got = one("Observation", "value-quantity", "gt100||mm[Hg]");
        let [Predicate::Quantity {
            prefix,
            low,
            high,
            system,
            code,
            ..
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert_eq!((*prefix, *low, *high), (Prefix::Gt, 99.5, 100.5));
        assert_eq!((system.as_deref(), code.as_deref()), (None, Some("mm[Hg]")));

        let got = one("Observation", "value-quantity", "le-1.50e1");
        let [Predicate::Quantity {
            prefix,
            value,
            low,
            high,
            system: None,
            code: None,
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert_eq!((*prefix, *value), (Prefix::Le, -15.0));
        assert!((low + 15.05).abs() < 1e-9 && (high + 14.95).abs() < 1e-9);

        for bad in [
            "abc",
            "5.4|kg",
            "01",
            "1e999999999999",
            "1e400",
            "5.4|a|b|c",
            "gt",
        ] {
            assert_eq!(
                err("Observation", "value-quantity", bad).0,
                IssueCode::Invalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_and_chained_parameters() {
        let (code, msg) = err("Observation", "foo", "1");
        assert_eq!(code, IssueCode::NotSupported);
        assert!(
            msg.contains("value-quantity"),
            "lists what is supported: {msg}"
        );
        assert_eq!(
            err("Observation", "subject.name", "x").0,
            IssueCode::NotSupported
        );
        assert_eq!(
            err("Observation", "subject:Patient.name", "x").0,
            IssueCode::NotSupported
        );
        assert_eq!(err("Observation", "_bogus", "x").0, IssueCode::NotSupported);
        assert_eq!(err("Observation", "", "x").0, IssueCode::Invalid);
        assert_eq!(err("Bundle", "code", "x").0, IssueCode::NotSupported);
        assert!(q("NotAType", &[]).is_err());
    }

    #[test]
    fn empty_values_are_ignored_and_all_errors_reported() {
        assert!(ok(
            "Observation",
            &[("code", ""), ("date", ","), ("_count", "")]
        )
        .clauses
        .is_empty());
        let o = q(
            "Observation",
            &[("foo", "1"), ("code", "ok"), ("date", "bad")],
        )
        .unwrap_err();
        assert_eq!(o.issues.len(), 2);
        assert!(o.issues[0].diagnostics.contains("\"foo\""));
        assert!(o.issues[1].diagnostics.contains("\"date\""));
    }

    #[test]
    fn escapes() {
        assert_eq!(split_unescaped(r"a\,b,c", b','), [r"a\,b", "c"]);
        assert_eq!(split_unescaped(r"a\\,b", b','), [r"a\\", "b"]);
        assert_eq!(split_unescaped("", b','), [""]);
        assert_eq!(unescape(r"a\,b\|c\$d\\e\x"), r"a,b|c$d\e\x");
        assert_eq!(unescape("é\\"), "é\\");
    }

    proptest! {
        #[test]
        fn never_panics(
            rt in prop::sample::select(vec!["Observation", "Patient", "QuestionnaireResponse", "Appointment", "Bundle"]),
            pairs in prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(vec![
                            "_count", "_sort", "_total", "_include", "_id", "_lastUpdated", "code", "subject",
                            "subject:identifier", "subject:Patient", "patient", "date", "value-quantity", "name:exact",
                            "family", "questionnaire", "status", "birthdate",
                        ]).prop_map(str::to_string),
                        "\\PC{0,10}",
                    ],
                    prop_oneof![
                        "(eq|ne|gt|lt|ge|le|sa|eb|ap)?[0-9.e|:TZ+-]{0,20}",
                        "[a-zA-Z/|\\\\,:.-]{0,20}",
                        "\\PC{0,20}",
                    ],
                ),
                0..5,
            ),
        ) {
            let pairs: Vec<(String, String)> = pairs;
            let _ = parse_query(rt, &pairs);
        }
    }
}
