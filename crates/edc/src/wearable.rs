//! Wearable and device readings in long-format CSV:
//! `subject,device,time,metric,value,unit` (header required, columns in
//! any order, extra columns ignored) -> one `Observation` per row.
//!
//! Each data row is an item (index from 0; its location names the line,
//! counted from 1 with the header as line 1, and the column). `metric` is
//! a protocol measurement id or its LOINC code; `time` is RFC 3339 with an
//! offset, kept as sent (offset included) in `effectiveDateTime`; the
//! device becomes `Observation.device` as a logical reference (identifier
//! with system [`DEVICE_SYSTEM`] and the id as display), since devices are
//! no resources of the store. Checks: subject enrolled, measurement known,
//! unit, hard range (reject), soft range (query), trial period, visit.

use clinflow_fhir::Json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::checks::{canonical_extension, check_date, check_value, quantity, soft_query};
use crate::context::TrialContext;
use crate::hl7::{produce, subject_reference};
use crate::json::{arr, decimal_text, obj, s, ss};
use crate::outcome::{ItemOutcome, Reason};
use crate::provenance::{InputFormat, Provenance, DEVICE_SYSTEM};

/// The required columns.
pub const COLUMNS: [&str; 6] = ["subject", "device", "time", "metric", "value", "unit"];

/// Every row of a wearable CSV input. A missing or incomplete header gives
/// a single rejected item (index 0, `line 1`); otherwise one item per data
/// row, in order.
pub fn ingest_csv(ctx: &TrialContext, input: &[u8]) -> Vec<ItemOutcome> {
    let prov = Provenance::of_input(InputFormat::WearableCsv, input);
    let body = input.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(input);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut records = reader.byte_records();
    let header_fail = |why: String| {
        let mut item = ItemOutcome::new(0, "line 1".into());
        item.reject(Reason::Malformed(why), "line 1");
        vec![item]
    };
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return header_fail(format!("the header cannot be read: {e}")),
        None => return header_fail("the input is empty: a header is required".into()),
    };
    let names: Vec<String> = header
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_string())
        .collect();
    let mut cols = [0usize; 6];
    for (i, want) in COLUMNS.iter().enumerate() {
        match names.iter().position(|n| n == want) {
            Some(at) => cols[i] = at,
            None => {
                return header_fail(format!(
                    "the header must name the columns {} (column {want} is missing)",
                    COLUMNS.join(",")
                ))
            }
        }
    }
    let mut out = Vec::new();
    let mut last_line = 1u64;
    for rec in records {
        let index = out.len();
        match rec {
            Ok(rec) => {
                let line = rec.position().map_or(last_line + 1, |p| p.line());
                last_line = line;
                out.push(row(ctx, &prov, index, line, &rec, &cols));
            }
            Err(e) => {
                let line = e.position().map_or(last_line + 1, |p| p.line());
                last_line = line;
                let mut item = ItemOutcome::new(index, format!("line {line}"));
                item.reject(Reason::Malformed(e.to_string()), format!("line {line}"));
                out.push(item);
            }
        }
    }
    out
}

fn row(
    ctx: &TrialContext,
    prov: &Provenance,
    index: usize,
    line: u64,
    rec: &csv::ByteRecord,
    cols: &[usize; 6],
) -> ItemOutcome {
    let here = format!("line {line}");
    let mut item = ItemOutcome::new(index, here.clone());
    let at = |col: &str| format!("line {line}, column {col}");
    if rec.len() == 1
        && rec
            .get(0)
            .is_some_and(|f| f.iter().all(u8::is_ascii_whitespace))
    {
        item.reject(Reason::Malformed("blank line".into()), here);
        return item;
    }
    let mut fields = [""; 6];
    for (i, name) in COLUMNS.iter().enumerate() {
        let Some(raw) = rec.get(cols[i]) else {
            item.reject(
                Reason::Malformed(format!(
                    "expected at least {} columns, found {}",
                    cols.iter().max().map_or(0, |m| m + 1),
                    rec.len()
                )),
                at(name),
            );
            return item;
        };
        match std::str::from_utf8(raw) {
            Ok(t) => fields[i] = t.trim(),
            Err(_) => {
                item.reject(Reason::Malformed("not UTF-8".into()), at(name));
                return item;
            }
        }
    }
    let [subject, device, time_text, metric, value_text, unit] = fields;
    match check_row(
        ctx, prov, &item, subject, device, time_text, metric, value_text, unit, line,
    ) {
        Ok((json, query)) => match produce(json, "Observation", prov.key(&here)) {
            Ok(p) => {
                item.stored.push(p);
                item.queries.extend(query);
            }
            Err(r) => item.reject(r, here),
        },
        Err((reason, col)) => item.reject(reason, at(col)),
    }
    item
}

// Rejections are the cold path and carry their texts: not worth boxing.
#[allow(clippy::too_many_arguments, clippy::result_large_err)]
fn check_row(
    ctx: &TrialContext,
    prov: &Provenance,
    item: &ItemOutcome,
    subject: &str,
    device: &str,
    time_text: &str,
    metric: &str,
    value_text: &str,
    unit: &str,
    line: u64,
) -> Result<(Json, Option<crate::outcome::DataQuery>), (Reason, &'static str)> {
    let protocol = ctx.protocol();
    if subject.is_empty() {
        return Err((Reason::MissingSubject, "subject"));
    }
    let enrolment = ctx
        .enrolment(subject)
        .ok_or_else(|| (Reason::UnknownSubject(subject.to_string()), "subject"))?;
    if device.is_empty() {
        return Err((Reason::Malformed("no device".into()), "device"));
    }
    let m = protocol
        .measurement(metric)
        .ok_or_else(|| (Reason::UnknownMeasurement(metric.to_string()), "metric"))?;
    let (text, value) = decimal_text(value_text)
        .ok_or_else(|| (Reason::NotANumber(value_text.to_string()), "value"))?;
    let checked = check_value(m, value, unit).map_err(|r| {
        let col = if matches!(r, Reason::WrongUnit { .. }) {
            "unit"
        } else {
            "value"
        };
        (r, col)
    })?;
    if time_text.is_empty() {
        return Err((Reason::MissingEffective, "time"));
    }
    let when = OffsetDateTime::parse(time_text, &Rfc3339).map_err(|e| {
        (
            Reason::InvalidDateTime {
                value: time_text.to_string(),
                why: format!("not RFC 3339 with an offset: {e}"),
            },
            "time",
        )
    })?;
    let visit = check_date(protocol, enrolment, when.date()).map_err(|r| (r, "time"))?;
    let here = format!("line {line}");
    let query = soft_query(
        (item.index, 0),
        subject,
        enrolment,
        m,
        &checked,
        &text,
        &format!("{here}, column value"),
    );
    let mut extension = prov.extensions(&here, protocol.version, &visit);
    extension.extend(canonical_extension(m, &checked));
    let json = obj([
        ("resourceType", ss("Observation")),
        ("extension", arr(extension)),
        (
            "identifier",
            arr(vec![Provenance::identifier(&prov.key(&here))]),
        ),
        ("status", ss("final")),
        (
            "code",
            Some(obj([
                (
                    "coding",
                    arr(vec![obj([
                        ("system", ss("http://loinc.org")),
                        ("code", ss(m.loinc.as_str())),
                        ("display", ss(&m.display)),
                    ])]),
                ),
                ("text", ss(&m.display)),
            ])),
        ),
        ("subject", Some(subject_reference(ctx, subject, enrolment))),
        (
            "effectiveDateTime",
            Some(s(&fhir_datetime(when, time_text))),
        ),
        ("valueQuantity", Some(quantity(&text, unit))),
        (
            "device",
            Some(obj([
                (
                    "identifier",
                    Some(obj([("system", ss(DEVICE_SYSTEM)), ("value", ss(device))])),
                ),
                ("display", ss(device)),
            ])),
        ),
    ]);
    Ok((json, query))
}

/// An RFC 3339 instant in FHIR's `dateTime` form, its offset kept (`Z`
/// when sent as `Z`).
pub(crate) fn fhir_datetime(t: OffsetDateTime, sent: &str) -> String {
    let mut out = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let nanos = t.nanosecond();
    if nanos != 0 {
        let f = format!("{nanos:09}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    let off = t.offset();
    if off.is_utc() && sent.ends_with(['Z', 'z']) {
        out.push('Z');
    } else {
        let total = off.whole_minutes();
        let sign = if total < 0 { '-' } else { '+' };
        let abs = total.unsigned_abs();
        out.push_str(&format!("{sign}{:02}:{:02}", abs / 60, abs % 60));
    }
    out
}
