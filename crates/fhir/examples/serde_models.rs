//! fhirkit against own serde models: parse + validate speed on Observations,
//! and what each accepts. Evidence for `docs/decisions/0001-fhirkit.md`.
//!
//! ```text
//! cargo run --release -p clinflow-fhir --example serde_models -- NDJSON [--rounds 5]
//! ```
//!
//! The `Observation` lines of the file are read into memory, then each of
//! these is timed on one thread (median of `--rounds` after a warm-up pass):
//!
//! - `serde_json_value`: `serde_json::Value`, JSON only, no FHIR checks (a floor);
//! - `serde_models`: the models in `serde_obs/model.rs` plus the checks serde
//!   cannot express (resourceType, one `value[x]`/`effective[x]`, id syntax,
//!   calendar dates via `clinflow_fhir::datetime`);
//! - `fhirkit_typed`: `fhirkit::from_json::<r4::Observation>`, error issues reject;
//! - `clinflow_parse_resource`: what clinflow runs on every write (fhirkit
//!   plus the required bindings and date checks, keeping the lossless tree).
//!
//! Then a few probe documents show where the two approaches disagree.
//! Output: one JSON object on stdout.

#[path = "serde_obs/model.rs"]
mod model;

use clinflow_fhir::{datetime, validate};
use model::{Component, Observation};
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

/// One way of parsing + validating a line; `true` when it is accepted.
type Check = fn(&str) -> bool;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut rounds = 5usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(5).max(1),
            _ => path = Some(a),
        }
    }
    let Some(path) = path else {
        eprintln!("usage: serde_models NDJSON [--rounds 5]");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("serde_models: cannot read {path}: {e}");
        std::process::exit(1);
    });
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""resourceType":"Observation""#))
        .collect();
    if lines.is_empty() {
        eprintln!("serde_models: no Observation lines in {path}");
        std::process::exit(1);
    }
    let bytes: usize = lines.iter().map(|l| l.len()).sum();

    let modes: [(&str, Check); 4] = [
        ("serde_json_value", |l| {
            black_box(serde_json::from_str::<Value>(l)).is_ok()
        }),
        ("serde_models", |l| black_box(parse_serde(l)).is_ok()),
        ("fhirkit_typed", |l| {
            match fhirkit::from_json::<fhirkit::r4::Observation>(l) {
                Ok((Some(o), issues)) => {
                    black_box(o);
                    !issues
                        .iter()
                        .any(|i| i.severity == fhirkit::Severity::Error)
                }
                _ => false,
            }
        }),
        ("clinflow_parse_resource", |l| {
            black_box(validate::parse_resource(l, Some("Observation"))).is_ok()
        }),
    ];
    let mut results = Vec::new();
    for (name, f) in modes {
        let valid = lines.iter().filter(|l| f(l)).count(); // warm-up, and the count
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            let n = lines.iter().filter(|l| f(l)).count();
            times.push(start.elapsed().as_secs_f64());
            assert_eq!(n, valid, "{name}: passes disagree");
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        results.push(json!({
            "mode": name,
            "valid": valid,
            "rejected": lines.len() - valid,
            "rounds_ms": times.iter().map(|t| (t * 1e4).round() / 10.0).collect::<Vec<_>>(),
            "median_ms": (median * 1e4).round() / 10.0,
            "resources_per_s": (lines.len() as f64 / median).round(),
            "mb_per_s": (bytes as f64 / median / 1e5).round() / 10.0,
        }));
    }

    let out = json!({
        "file": path,
        "observations": lines.len(),
        "bytes": bytes,
        "modes": results,
        "probes": probes(),
    });
    println!("{out}");
}

/// Decode with the serde models, then the checks serde's derive cannot express.
fn parse_serde(text: &str) -> Result<Observation, String> {
    let o: Observation = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if o.resource_type != "Observation" {
        return Err(format!("resourceType {:?}", o.resource_type));
    }
    if let Some(id) = &o.id {
        if !validate::is_valid_id(id) {
            return Err(format!("invalid id {id:?}"));
        }
    }
    let values = [
        o.value_quantity.is_some(),
        o.value_codeable_concept.is_some(),
        o.value_string.is_some(),
        o.value_boolean.is_some(),
        o.value_integer.is_some(),
        o.value_range.is_some(),
        o.value_ratio.is_some(),
        o.value_sampled_data.is_some(),
        o.value_time.is_some(),
        o.value_date_time.is_some(),
        o.value_period.is_some(),
    ];
    at_most_one("Observation.value[x]", &values)?;
    let effective = [
        o.effective_date_time.is_some(),
        o.effective_period.is_some(),
        o.effective_timing.is_some(),
        o.effective_instant.is_some(),
    ];
    at_most_one("Observation.effective[x]", &effective)?;
    let period = o.effective_period.as_ref();
    let value_period = o.value_period.as_ref();
    for date in [
        o.effective_date_time.as_deref(),
        o.effective_instant.as_deref(),
        o.issued.as_deref(),
        o.value_date_time.as_deref(),
        period.and_then(|p| p.start.as_deref()),
        period.and_then(|p| p.end.as_deref()),
        value_period.and_then(|p| p.start.as_deref()),
        value_period.and_then(|p| p.end.as_deref()),
    ]
    .into_iter()
    .flatten()
    {
        datetime::parse_range(date)?;
    }
    for (i, c) in o.component.iter().enumerate() {
        check_component(c).map_err(|e| format!("Observation.component[{i}]: {e}"))?;
    }
    Ok(o)
}

fn check_component(c: &Component) -> Result<(), String> {
    at_most_one(
        "value[x]",
        &[
            c.value_quantity.is_some(),
            c.value_codeable_concept.is_some(),
            c.value_string.is_some(),
            c.value_boolean.is_some(),
            c.value_integer.is_some(),
            c.value_range.is_some(),
            c.value_ratio.is_some(),
            c.value_sampled_data.is_some(),
            c.value_time.is_some(),
            c.value_date_time.is_some(),
            c.value_period.is_some(),
        ],
    )?;
    if let Some(d) = &c.value_date_time {
        datetime::parse_range(d)?;
    }
    Ok(())
}

fn at_most_one(element: &str, present: &[bool]) -> Result<(), String> {
    match present.iter().filter(|p| **p).count() {
        0 | 1 => Ok(()),
        n => Err(format!("{element}: {n} types given, at most one allowed")),
    }
}

/// Small documents on which the approaches differ, with each one's verdict.
fn probes() -> Value {
    const BASE: &str =
        r#""resourceType":"Observation","status":"final","code":{"text":"Heart rate"}"#;
    let probes = [
        (
            "decimal 7.40 keeps its precision (valid)",
            format!(r#"{{{BASE},"valueQuantity":{{"value":7.40,"unit":"/min"}}}}"#),
        ),
        (
            "primitive extension _status (valid)",
            format!(
                r#"{{{BASE},"_status":{{"extension":[{{"url":"http://example.org/x","valueString":"y"}}]}}}}"#
            ),
        ),
        (
            "Extension.valueAddress, one of the 39 value types not modelled (valid)",
            format!(
                r#"{{{BASE},"extension":[{{"url":"http://example.org/a","valueAddress":{{"city":"Bern"}}}}]}}"#
            ),
        ),
        (
            "empty array category: [] (invalid)",
            format!(r#"{{{BASE},"category":[]}}"#),
        ),
        (
            "null subject (invalid)",
            format!(r#"{{{BASE},"subject":null}}"#),
        ),
        (
            "empty string valueString: \"\" (invalid)",
            format!(r#"{{{BASE},"valueString":""}}"#),
        ),
        (
            "effectiveTiming with an unknown element (invalid)",
            format!(r#"{{{BASE},"effectiveTiming":{{"foo":1}}}}"#),
        ),
        (
            "two problems: unknown code.foo and status done (invalid)",
            r#"{"resourceType":"Observation","status":"done","code":{"text":"x","foo":1}}"#
                .to_string(),
        ),
    ];
    Value::Array(
        probes
            .iter()
            .map(|(name, doc)| {
                let serde = match parse_serde(doc) {
                    Ok(o) => match &o.value_quantity {
                        Some(q) => format!("accepted; value reads back as {:?}", q.value),
                        None => "accepted".to_string(),
                    },
                    Err(e) => format!("rejected: {e}"),
                };
                let clinflow = match validate::parse_resource(doc, Some("Observation")) {
                    Ok(r) => {
                        let value = r
                            .json()
                            .get("valueQuantity")
                            .and_then(|q| q.get("value"))
                            .map(|v| format!("; value reads back as {}", v.to_compact()));
                        format!("accepted{}", value.unwrap_or_default())
                    }
                    Err(o) => format!(
                        "rejected: {}",
                        o.issues
                            .iter()
                            .map(|i| format!("{}: {}", i.expression.join(","), i.diagnostics))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                };
                json!({ "probe": name, "serde_models": serde, "clinflow_fhirkit": clinflow })
            })
            .collect(),
    )
}
