//! Reading a protocol from YAML or JSON, and the rules a protocol must
//! satisfy beyond its shape.
//!
//! Reading happens in two steps. serde reads the text into the typed model
//! ([`crate::model`]); unknown keys, missing keys, wrong types and values
//! the checked types refuse (a LOINC code with a wrong check digit) fail
//! here, with serde's line and key path. Then the rules run on the model:
//! unique ids, ordered and nested ranges, positive conversion factors and
//! so on. Their errors get a line from the private `locate` module, which
//! maps a key path back to the text. Either way the caller gets one
//! [`ProtocolError`]: the first problem serde meets, or the broken rule that
//! comes first in the document.

use crate::locate::SpanIndex;
use crate::model::{Protocol, Range};
use crate::types::is_fhir_id;
use std::collections::HashMap;
use std::fmt;

/// Which step refused a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolErrorKind {
    /// The text is not YAML (or not JSON).
    Syntax,
    /// The document does not fit the model: an unknown or missing key, a
    /// value of the wrong type, or a value its type refuses.
    Schema,
    /// The document fits the model but breaks a rule of the protocol format
    /// (duplicate id, soft range outside the hard range, ...).
    Rule,
}

impl fmt::Display for ProtocolErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolErrorKind::Syntax => "syntax",
            ProtocolErrorKind::Schema => "schema",
            ProtocolErrorKind::Rule => "rule",
        })
    }
}

/// Why a protocol was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", location(.line, .column, .path))]
pub struct ProtocolError {
    /// Which step refused it.
    pub kind: ProtocolErrorKind,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known: characters, except for errors serde_json
    /// finds in JSON, where it counts bytes.
    pub column: Option<usize>,
    /// Key path of the offending value, spelled as in the document
    /// (`measurements[3].soft`); `""` for the document as a whole. For
    /// syntax errors it is the entry nearest the error, best effort.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn location(line: &Option<usize>, column: &Option<usize>, path: &str) -> String {
    let mut s = match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}"),
        (Some(l), None) => format!("line {l}"),
        _ => String::new(),
    };
    if !path.is_empty() {
        if !s.is_empty() {
            s.push_str(", ");
        }
        s.push_str("at ");
        s.push_str(path);
    }
    if !s.is_empty() {
        s.push_str(": ");
    }
    s
}

/// Read a protocol written in YAML (the form of
/// `reference-trial/protocol.yaml`) and check its rules.
pub fn parse_yaml(text: &str) -> Result<Protocol, ProtocolError> {
    // Reading into a `Value` first tells syntax errors from schema errors.
    if let Err(e) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        return Err(yaml_error(text, &e, ProtocolErrorKind::Syntax));
    }
    let protocol: Protocol = serde_yaml_ng::from_str(text)
        .map_err(|e| yaml_error(text, &e, ProtocolErrorKind::Schema))?;
    check(&protocol, text)?;
    Ok(protocol)
}

/// Read a protocol written in JSON (the same model as YAML, as
/// [`Protocol::to_json`] writes it) and check its rules.
pub fn parse_json(text: &str) -> Result<Protocol, ProtocolError> {
    let protocol: Protocol = serde_json::from_str(text).map_err(|e| json_error(text, &e))?;
    check(&protocol, text)?;
    Ok(protocol)
}

fn yaml_error(text: &str, e: &serde_yaml_ng::Error, kind: ProtocolErrorKind) -> ProtocolError {
    let loc = e.location();
    let mut message = e.to_string();
    if let Some(l) = &loc {
        let at = format!(" at line {} column {}", l.line(), l.column());
        message = message.replacen(&at, "", 1);
    }
    let index = SpanIndex::new(text);
    // serde_yaml_ng writes the path it was at before the message
    // (`measurements[3].soft: invalid type: ...`) but does not expose it.
    let (serde_path, rest) = split_path(&message);
    // Without a path, a schema error is about the document's top level; a
    // syntax error gets the entry nearest to it.
    let path = match (serde_path, &loc, kind) {
        (Some(p), _, _) => p.to_string(),
        (None, Some(l), ProtocolErrorKind::Syntax) => index.path_at(l.index()).to_string(),
        _ => String::new(),
    };
    let message = rest.to_string();
    let (line, column) = (
        loc.as_ref().map(|l| l.line()),
        loc.as_ref().map(|l| l.column()),
    );
    let mut err = ProtocolError {
        kind,
        line,
        column,
        path,
        message,
    };
    refine_unknown_field(&mut err, &index);
    err
}

fn json_error(text: &str, e: &serde_json::Error) -> ProtocolError {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Data => ProtocolErrorKind::Schema,
        Category::Syntax | Category::Eof | Category::Io => ProtocolErrorKind::Syntax,
    };
    let mut message = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    message = message.replacen(&at, "", 1);
    let index = SpanIndex::new(text);
    let known = e.line() > 0;
    let path = if known {
        index
            .path_at(index.offset_of(e.line(), e.column()))
            .to_string()
    } else {
        String::new()
    };
    // serde_json's position is on an unknown key itself, so `path` names it.
    ProtocolError {
        kind,
        line: known.then_some(e.line()),
        column: known.then_some(e.column()),
        path,
        message,
    }
}

/// `path: message` as serde_yaml_ng writes it, split. The model's keys and
/// indices make up paths, so a path never holds a space; serde's own
/// messages (`invalid type: ...`) always do before their first `: `.
fn split_path(message: &str) -> (Option<&str>, &str) {
    if let Some((head, rest)) = message.split_once(": ") {
        let path_like = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.[]?".contains(c));
        if path_like {
            return (Some(head), rest);
        }
    }
    (None, message)
}

/// serde_yaml_ng reports an unknown key with its mapping's path; name the
/// key itself, and point at it.
fn refine_unknown_field(err: &mut ProtocolError, index: &SpanIndex<'_>) {
    let Some(rest) = err.message.strip_prefix("unknown field `") else {
        return;
    };
    let Some((key, _)) = rest.split_once('`') else {
        return;
    };
    let path = if err.path.is_empty() {
        key.to_string()
    } else {
        format!("{}.{key}", err.path)
    };
    if let Some(pos) = index.find(&path) {
        err.line = Some(pos.line);
        err.column = Some(pos.column);
    }
    err.path = path;
}

/// Run the rules; the violation first in the text becomes the error.
fn check(protocol: &Protocol, text: &str) -> Result<(), ProtocolError> {
    let found = rules(protocol);
    if found.is_empty() {
        return Ok(());
    }
    let index = SpanIndex::new(text);
    let located = found.into_iter().map(|v| {
        let pos = index.find_nearest(&v.path).map(|(p, _)| p);
        ProtocolError {
            kind: ProtocolErrorKind::Rule,
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            path: v.path,
            message: v.message,
        }
    });
    // Unlocated ones (not expected) sort last; `min_by_key` keeps the
    // earlier-found of equals.
    match located.min_by_key(|e| (e.line.is_none(), e.line, e.column)) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A broken rule: where (key path) and what.
#[derive(Debug)]
struct Violation {
    path: String,
    message: String,
}

#[derive(Default)]
struct Rules {
    found: Vec<Violation>,
}

impl Rules {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.found.push(Violation {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Report every repeated key: `path(i)` for the repeat at index `i`.
    fn unique<'a>(
        &mut self,
        what: &str,
        keys: impl Iterator<Item = &'a str>,
        path: impl Fn(usize) -> String,
        first: impl Fn(usize) -> String,
    ) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, k) in keys.enumerate() {
            if let Some(&j) = seen.get(k) {
                self.bad(
                    path(i),
                    format!("duplicate {what} `{k}`, already used at {}", first(j)),
                );
            } else {
                seen.insert(k, i);
            }
        }
    }

    fn fhir_id(&mut self, path: String, id: &str) {
        if !is_fhir_id(id) {
            self.bad(path, "an id needs 1 to 64 letters, digits, '-' or '.'");
        }
    }

    fn not_blank(&mut self, path: String, s: &str) {
        if s.trim().is_empty() {
            self.bad(path, "must not be empty");
        }
    }

    fn range(&mut self, path: String, r: &Range) -> bool {
        if !r.low().is_finite() || !r.high().is_finite() {
            self.bad(path, "the bounds must be finite numbers");
            false
        } else if r.low() > r.high() {
            self.bad(
                path,
                format!(
                    "the low bound {} is above the high bound {}",
                    r.low(),
                    r.high()
                ),
            );
            false
        } else {
            true
        }
    }
}

fn fmt_range(r: &Range) -> String {
    format!("[{}, {}]", r.low(), r.high())
}

/// Every rule of the format, in document order.
fn rules(p: &Protocol) -> Vec<Violation> {
    let mut r = Rules::default();

    if p.version == 0 {
        r.bad("version", "must be 1 or more");
    }
    r.not_blank("title".into(), &p.title);
    if p.period.start > p.period.end {
        r.bad(
            "period.end",
            format!(
                "the end {} is before the start {}",
                crate::types::format_date(p.period.end),
                crate::types::format_date(p.period.start)
            ),
        );
    }
    if !is_absolute_uri(&p.subject_identifier_system) {
        r.bad(
            "subject_identifier_system",
            "must be an absolute URI, like https://example.org/subject",
        );
    }

    if p.sites.is_empty() {
        r.bad("sites", "at least one site is needed");
    }
    for (i, s) in p.sites.iter().enumerate() {
        r.not_blank(format!("sites[{i}].name"), &s.name);
        r.not_blank(format!("sites[{i}].city"), &s.city);
        if !is_time_zone_name(&s.timezone) {
            r.bad(
                format!("sites[{i}].timezone"),
                "not an IANA time zone name, like Europe/Berlin",
            );
        }
    }
    r.unique(
        "site id",
        p.sites.iter().map(|s| s.id.as_str()),
        |i| format!("sites[{i}].id"),
        |j| format!("sites[{j}]"),
    );

    if p.arms.is_empty() {
        r.bad("arms", "at least one arm is needed");
    }
    for (i, a) in p.arms.iter().enumerate() {
        if a.trim().is_empty() {
            r.bad(format!("arms[{i}]"), "must not be empty");
        } else if a.trim() != a {
            r.bad(format!("arms[{i}]"), "has leading or trailing spaces");
        }
    }
    r.unique(
        "arm",
        p.arms.iter().map(String::as_str),
        |i| format!("arms[{i}]"),
        |j| format!("arms[{j}]"),
    );

    // Windows are `u32`, so never negative; days may come in any order.
    for (i, v) in p.visits.iter().enumerate() {
        r.fhir_id(format!("visits[{i}].id"), &v.id);
    }
    r.unique(
        "visit id",
        p.visits.iter().map(|v| v.id.as_str()),
        |i| format!("visits[{i}].id"),
        |j| format!("visits[{j}]"),
    );

    for (i, m) in p.measurements.iter().enumerate() {
        let at = |k: &str| format!("measurements[{i}].{k}");
        r.fhir_id(at("id"), &m.id);
        if let Some(j) = p
            .measurements
            .iter()
            .position(|o| o.loinc.as_str() == m.id)
            .filter(|&j| j != i)
        {
            r.bad(
                at("id"),
                format!("`{}` is the LOINC code of measurements[{j}]", m.id),
            );
        }
        r.not_blank(at("display"), &m.display);
        let hard_ok = r.range(at("hard"), &m.hard);
        if let Some(soft) = &m.soft {
            if r.range(at("soft"), soft) && hard_ok && !soft.is_within(&m.hard) {
                r.bad(
                    at("soft"),
                    format!(
                        "the soft range {} is not inside the hard range {}",
                        fmt_range(soft),
                        fmt_range(&m.hard)
                    ),
                );
            }
        }
        for (j, c) in m.convert.iter().enumerate() {
            if !(c.factor.is_finite() && c.factor > 0.0) {
                r.bad(
                    format!("measurements[{i}].convert[{j}].factor"),
                    format!("must be a finite number above 0, not {}", c.factor),
                );
            }
            if c.unit == m.unit {
                r.bad(
                    format!("measurements[{i}].convert[{j}].unit"),
                    "is the measurement's own unit",
                );
            }
        }
        r.unique(
            "conversion unit",
            m.convert.iter().map(|c| c.unit.as_str()),
            |j| format!("measurements[{i}].convert[{j}].unit"),
            |k| format!("measurements[{i}].convert[{k}]"),
        );
    }
    r.unique(
        "measurement id",
        p.measurements.iter().map(|m| m.id.as_str()),
        |i| format!("measurements[{i}].id"),
        |j| format!("measurements[{j}]"),
    );
    r.unique(
        "LOINC code",
        p.measurements.iter().map(|m| m.loinc.as_str()),
        |i| format!("measurements[{i}].loinc"),
        |j| format!("measurements[{j}]"),
    );

    for (i, q) in p.questionnaires.iter().enumerate() {
        let at = |k: &str| format!("questionnaires[{i}].{k}");
        r.fhir_id(at("id"), &q.id);
        if p.id.as_str().len() + 1 + q.id.len() > 64 {
            r.bad(
                at("id"),
                "with the trial id in front it makes a FHIR id longer than 64 characters",
            );
        }
        r.not_blank(at("title"), &q.title);
        if q.items.is_empty() {
            r.bad(at("items"), "at least one item is needed");
        }
        for (j, item) in q.items.iter().enumerate() {
            let at = |k: &str| format!("questionnaires[{i}].items[{j}].{k}");
            if item.link_id.trim().is_empty() {
                r.bad(at("linkId"), "must not be empty");
            } else if item.link_id.trim() != item.link_id {
                r.bad(at("linkId"), "has leading or trailing spaces");
            }
            r.not_blank(at("text"), &item.text);
            if let Some(range) = &item.range {
                if !item.kind.is_numeric() {
                    r.bad(
                        at("range"),
                        format!(
                            "only integer and decimal items take a range, this item is {}",
                            item.kind.code()
                        ),
                    );
                } else if r.range(at("range"), range)
                    && item.kind == crate::model::ItemType::Integer
                    && (range.low().fract() != 0.0 || range.high().fract() != 0.0)
                {
                    r.bad(at("range"), "an integer item's range must be whole numbers");
                }
            }
            match item.max_length {
                Some(_) if !item.kind.is_textual() => r.bad(
                    at("max_length"),
                    format!(
                        "only string and text items take a max_length, this item is {}",
                        item.kind.code()
                    ),
                ),
                Some(0) => r.bad(at("max_length"), "must be 1 or more"),
                _ => {}
            }
            let choice = item.kind == crate::model::ItemType::Choice;
            if choice && item.options.is_empty() {
                r.bad(at("options"), "a choice item needs options");
            }
            if !choice && !item.options.is_empty() {
                r.bad(at("options"), "only choice items take options");
            }
            for (k, o) in item.options.iter().enumerate() {
                r.not_blank(format!("questionnaires[{i}].items[{j}].options[{k}]"), o);
            }
            r.unique(
                "option",
                item.options.iter().map(String::as_str),
                |k| format!("questionnaires[{i}].items[{j}].options[{k}]"),
                |k| format!("options[{k}]"),
            );
        }
        r.unique(
            "linkId",
            q.items.iter().map(|it| it.link_id.as_str()),
            |j| format!("questionnaires[{i}].items[{j}].linkId"),
            |k| format!("questionnaires[{i}].items[{k}]"),
        );
    }
    r.unique(
        "questionnaire id",
        p.questionnaires.iter().map(|q| q.id.as_str()),
        |i| format!("questionnaires[{i}].id"),
        |j| format!("questionnaires[{j}]"),
    );

    if p.adverse_events.serious_report_hours == 0 {
        r.bad("adverse_events.serious_report_hours", "must be 1 or more");
    }
    if let Some(plan) = &p.enrolment {
        if plan.target == 0 {
            r.bad("enrolment.target", "must be 1 or more");
        }
        if let Some(by) = plan.by {
            if !p.period.contains(by) {
                r.bad("enrolment.by", "must fall within the trial's period");
            }
        }
    }

    r.found
}

/// `scheme:rest` with an RFC 3986 scheme, no whitespace or control
/// characters, and an authority (`//host`) for http and https.
fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut sc = scheme.chars();
    let scheme_ok = sc.next().is_some_and(|c| c.is_ascii_alphabetic())
        && sc.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let chars_ok = s.chars().all(|c| !c.is_whitespace() && !c.is_control());
    let http = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    let authority_ok = !http
        || rest
            .strip_prefix("//")
            .is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
    scheme_ok && !rest.is_empty() && chars_ok && authority_ok
}

/// The shape of an IANA time zone name (`UTC`, `America/New_York`,
/// `Etc/GMT+5`). The name is not looked up: this crate has no tz database.
fn is_time_zone_name(s: &str) -> bool {
    s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+-".contains(c))
        })
}

#[cfg(test)]
mod tests;
