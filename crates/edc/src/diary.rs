//! ePRO diaries -> `QuestionnaireResponse`.
//!
//! A diary is a JSON object `{"subject", "questionnaire", "authored",
//! "answers": {linkId: value}}`. Inputs are NDJSON (one diary a line:
//! [`ingest_diaries_ndjson`]) or one JSON document holding an object or
//! an array of them ([`ingest_diaries_json`]).
//!
//! Checks, all reported at once (a diary failing any is rejected whole and
//! gives nothing): the subject is enrolled, the questionnaire is one of
//! the protocol's, `authored` is RFC 3339 with an offset and inside the
//! trial period, every answer's linkId is an item, its JSON type fits the
//! item type (boolean, whole number in FHIR's 32-bit range for integer,
//! number for decimal, string for string/text/choice, `YYYY-MM-DD` for
//! date, RFC 3339 for dateTime, `HH:MM:SS` for time), numeric answers are
//! inside `range`, text inside `max_length` characters, a choice is one of
//! the options, and every required item is answered (`null` counts as not
//! answered). Answers are written in the questionnaire's item order; the
//! visit is assigned from the `authored` date.
//!
//! Locations: `line 3, answers.pain` (NDJSON), `[2].answers.pain` (an
//! element of a JSON array) or `answers.pain` (a single object).

use clinflow_fhir::Json;
use clinflow_protocol::{Item, ItemType};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::checks::check_date;
use crate::context::TrialContext;
use crate::hl7::{produce, subject_reference};
use crate::json::{arr, fmt_f64, int, num, obj, s, ss};
use crate::outcome::{ItemOutcome, Reason};
use crate::provenance::{InputFormat, Provenance};
use crate::wearable::fhir_datetime;

const KEYS: [&str; 4] = ["subject", "questionnaire", "authored", "answers"];

/// Every diary of an NDJSON input: one item per non-blank line, in order.
/// A line that is not a JSON object is a rejected item.
pub fn ingest_diaries_ndjson(ctx: &TrialContext, input: &[u8]) -> Vec<ItemOutcome> {
    let prov = Provenance::of_input(InputFormat::Diary, input);
    let body = input.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(input);
    let mut out = Vec::new();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let prefix = format!("line {}", n + 1);
        let index = out.len();
        match serde_json::from_slice::<Value>(line) {
            Ok(v) => out.push(ingest_diary(ctx, &prov, index, &prefix, &v)),
            Err(e) => {
                let mut item = ItemOutcome::new(index, prefix.clone());
                item.reject(Reason::Malformed(format!("not JSON: {e}")), prefix);
                out.push(item);
            }
        }
    }
    out
}

/// Every diary of a JSON document: an object (one diary) or an array of
/// them. A document that is not JSON is one rejected item.
pub fn ingest_diaries_json(ctx: &TrialContext, input: &[u8]) -> Vec<ItemOutcome> {
    let prov = Provenance::of_input(InputFormat::Diary, input);
    let body = input.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(input);
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| ingest_diary(ctx, &prov, i, &format!("[{i}]"), v))
            .collect(),
        Ok(v) => vec![ingest_diary(ctx, &prov, 0, "", &v)],
        Err(e) => {
            let at = format!("line {}, column {}", e.line(), e.column());
            let mut item = ItemOutcome::new(0, at.clone());
            item.reject(Reason::Malformed(format!("not JSON: {e}")), at);
            vec![item]
        }
    }
}

/// One diary, already parsed as JSON. `prefix` starts every location
/// (`line 3`, `[2]`, or empty); the provenance's key uses it too.
pub fn ingest_diary(
    ctx: &TrialContext,
    prov: &Provenance,
    index: usize,
    prefix: &str,
    diary: &Value,
) -> ItemOutcome {
    let at = |path: &str| match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if prefix.starts_with('[') => format!("{prefix}.{path}"),
        (false, false) => format!("{prefix}, {path}"),
    };
    let mut item = ItemOutcome::new(
        index,
        if prefix.is_empty() {
            "document".into()
        } else {
            prefix.into()
        },
    );
    let Some(map) = diary.as_object() else {
        item.reject(
            Reason::Malformed("a diary must be a JSON object".into()),
            at(""),
        );
        return item;
    };
    for k in map.keys().filter(|k| !KEYS.contains(&k.as_str())) {
        item.reject(Reason::Malformed(format!("unknown key {k:?}")), at(k));
    }
    let text_of = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
    };
    let protocol = ctx.protocol();

    let enrolment = match text_of("subject") {
        None => {
            item.reject(Reason::MissingSubject, at("subject"));
            None
        }
        Some(sub) => {
            let e = ctx.enrolment(sub);
            if e.is_none() {
                item.reject(Reason::UnknownSubject(sub.to_string()), at("subject"));
            }
            e
        }
    };
    let questionnaire = match text_of("questionnaire") {
        None => {
            item.reject(
                Reason::Malformed("no questionnaire".into()),
                at("questionnaire"),
            );
            None
        }
        Some(q) => {
            let found = protocol.questionnaire(q);
            if found.is_none() {
                item.reject(
                    Reason::UnknownQuestionnaire(q.to_string()),
                    at("questionnaire"),
                );
            }
            found
        }
    };
    let authored = match text_of("authored") {
        None => {
            item.reject(Reason::MissingEffective, at("authored"));
            None
        }
        Some(t) => match OffsetDateTime::parse(t, &Rfc3339) {
            Ok(when) => Some((when, fhir_datetime(when, t))),
            Err(e) => {
                item.reject(
                    Reason::InvalidDateTime {
                        value: t.to_string(),
                        why: format!("not RFC 3339 with an offset: {e}"),
                    },
                    at("authored"),
                );
                None
            }
        },
    };
    let visit = match (enrolment, &authored) {
        (Some(e), Some((when, _))) => match check_date(protocol, e, when.date()) {
            Ok(v) => Some(v),
            Err(r) => {
                item.reject(r, at("authored"));
                None
            }
        },
        _ => None,
    };
    let empty = serde_json::Map::new();
    let answers = match map.get("answers") {
        Some(Value::Object(a)) => a,
        Some(_) => {
            item.reject(
                Reason::Malformed("answers must be an object".into()),
                at("answers"),
            );
            &empty
        }
        None => {
            item.reject(Reason::Malformed("no answers".into()), at("answers"));
            &empty
        }
    };
    let mut answered: Vec<(&Item, (&'static str, Json))> = Vec::new();
    if let Some(q) = questionnaire {
        for (link, v) in answers {
            let path = at(&format!("answers.{link}"));
            let Some(it) = q.item(link) else {
                item.reject(Reason::UnknownLinkId(link.clone()), path);
                continue;
            };
            if v.is_null() {
                continue;
            }
            match answer(it, v) {
                Ok(a) => answered.push((it, a)),
                Err(r) => item.reject(r, path),
            }
        }
        for it in q.items.iter().filter(|i| i.required) {
            if answers.get(&it.link_id).is_none_or(Value::is_null) {
                item.reject(
                    Reason::MissingAnswer(it.link_id.clone()),
                    at(&format!("answers.{}", it.link_id)),
                );
            }
        }
    }
    let (Some(enrolment), Some(q), Some((_, authored)), Some(visit)) =
        (enrolment, questionnaire, authored, visit)
    else {
        return item;
    };
    if !item.rejections.is_empty() {
        return item;
    }
    let subject = text_of("subject").unwrap_or_default();
    // Questionnaire order, not the order keys happened to come in.
    answered.sort_by_key(|(it, _)| q.items.iter().position(|i| i.link_id == it.link_id));
    let here = at("");
    let key = prov.key(if here.is_empty() { "document" } else { &here });
    let items = answered
        .into_iter()
        .map(|(it, (kind, value))| {
            obj([
                ("linkId", ss(&it.link_id)),
                ("text", ss(&it.text)),
                ("answer", arr(vec![obj([(kind, Some(value))])])),
            ])
        })
        .collect();
    let json = obj([
        ("resourceType", ss("QuestionnaireResponse")),
        (
            "extension",
            arr(prov.extensions(
                if here.is_empty() { "document" } else { &here },
                protocol.version,
                &visit,
            )),
        ),
        ("identifier", Some(Provenance::identifier(&key))),
        (
            "questionnaire",
            Some(s(&format!(
                "https://clinflow.dev/fhir/Questionnaire/{}/{}",
                protocol.id, q.id
            ))),
        ),
        ("status", ss("completed")),
        ("subject", Some(subject_reference(ctx, subject, enrolment))),
        ("authored", Some(s(&authored))),
        ("item", arr(items)),
    ]);
    match produce(json, "QuestionnaireResponse", key) {
        Ok(p) => item.stored.push(p),
        Err(r) => item.reject(r, here),
    }
    item
}

/// The typed answer of one item, or why it does not fit.
fn answer(it: &Item, v: &Value) -> Result<(&'static str, Json), Reason> {
    let wrong = |expected: &'static str| Reason::WrongAnswerType {
        link_id: it.link_id.clone(),
        expected,
    };
    let in_range = |x: f64, text: String| match it.range {
        Some(r) if !r.contains(x) => Err(Reason::AnswerOutOfRange {
            link_id: it.link_id.clone(),
            value: text,
            low: fmt_f64(r.low()),
            high: fmt_f64(r.high()),
        }),
        _ => Ok(()),
    };
    match it.kind {
        ItemType::Boolean => v
            .as_bool()
            .map(|b| ("valueBoolean", Json::Bool(b)))
            .ok_or_else(|| wrong("true or false")),
        ItemType::Integer => {
            let n = v
                .as_i64()
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or_else(|| wrong("a whole number"))?;
            in_range(n as f64, n.to_string())?;
            Ok(("valueInteger", int(n)))
        }
        ItemType::Decimal => {
            let n = v
                .as_f64()
                .filter(|n| n.is_finite())
                .ok_or_else(|| wrong("a number"))?;
            let text = match v {
                Value::Number(num) => num.to_string(),
                _ => fmt_f64(n),
            };
            in_range(n, text.clone())?;
            Ok(("valueDecimal", num(&text)))
        }
        ItemType::String | ItemType::Text | ItemType::Choice => {
            let t = v
                .as_str()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| wrong("a non-empty string"))?;
            if let Some(max) = it.max_length {
                let length = t.chars().count();
                if length > max as usize {
                    return Err(Reason::AnswerTooLong {
                        link_id: it.link_id.clone(),
                        length,
                        max,
                    });
                }
            }
            if it.kind == ItemType::Choice && !it.options.iter().any(|o| o == t) {
                return Err(Reason::NotAnOption {
                    link_id: it.link_id.clone(),
                });
            }
            Ok(("valueString", s(t)))
        }
        ItemType::Date => {
            let t = v.as_str().ok_or_else(|| wrong("a date YYYY-MM-DD"))?;
            let fmt = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(t, &fmt).map_err(|_| wrong("a date YYYY-MM-DD"))?;
            if t.len() != 10 {
                return Err(wrong("a date YYYY-MM-DD"));
            }
            Ok(("valueDate", s(t)))
        }
        ItemType::DateTime => {
            let t = v.as_str().ok_or_else(|| wrong("an RFC 3339 date-time"))?;
            let when =
                OffsetDateTime::parse(t, &Rfc3339).map_err(|_| wrong("an RFC 3339 date-time"))?;
            if when.year() < 1 {
                return Err(wrong("an RFC 3339 date-time"));
            }
            Ok(("valueDateTime", s(&fhir_datetime(when, t))))
        }
        ItemType::Time => {
            let t = v.as_str().ok_or_else(|| wrong("a time HH:MM:SS"))?;
            let fmt = time::macros::format_description!("[hour]:[minute]:[second]");
            time::Time::parse(t, &fmt).map_err(|_| wrong("a time HH:MM:SS"))?;
            if t.len() != 8 {
                return Err(wrong("a time HH:MM:SS"));
            }
            Ok(("valueTime", s(t)))
        }
    }
}
