//! The Observations to write and the rows clinflow stores for each.
//!
//! The bodies are the ones `../shared/peers/txload.py` posts (same codes,
//! value ranges, dates and devices), and each goes through the steps
//! clinflow's transaction handler takes before it writes (`validate`, id and
//! `meta` set, `index::extract`, compact JSON). All of it happens here,
//! before the clock starts: the timed region only writes rows.

use clinflow_fhir::index::Extracted;
use clinflow_fhir::IndexEntry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The LOINC codes, units and value ranges of txload.py.
const CODES: [(&str, &str, f64, f64); 4] = [
    ("8867-4", "/min", 60.0, 100.0),
    ("8480-6", "mm[Hg]", 100.0, 150.0),
    ("2345-7", "mg/dL", 80.0, 140.0),
    ("29463-7", "kg", 60.0, 100.0),
];

/// One resource version, as clinflow's `WriteOp` for a create holds it.
pub struct Row {
    pub id: String,
    pub last_updated: i64,
    /// The stored JSON (with `id` and `meta`).
    pub body: String,
    /// The patient compartment (`resources.patient`).
    pub patient: Option<String>,
    /// `resources.sort_date`.
    pub sort_date: i64,
    /// The index rows.
    pub entries: Vec<IndexEntry>,
}

/// How resource ids are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ids {
    /// Random UUIDs (v4): clinflow's ids before it moved to v7.
    Random,
    /// Time-ordered UUIDs (v7 layout: milliseconds, then a counter), as
    /// clinflow assigns them.
    Ordered,
}

fn new_id(ids: Ids, now: i64, n: usize, rng: &mut StdRng) -> String {
    match ids {
        Ids::Random => uuid::Uuid::new_v4().to_string(),
        Ids::Ordered => {
            // ms (48 bits) | version 7 | n's high 12 bits | variant 0b10 |
            // n's low 30 bits | 32 random bits: sorted by (time, n).
            let n = n as u128;
            let v = ((now as u128 & 0xffff_ffff_ffff) << 80)
                | (0x7 << 76)
                | ((n >> 30 & 0xfff) << 64)
                | (0x2 << 62)
                | ((n & 0x3fff_ffff) << 32)
                | u128::from(rng.random::<u32>());
            uuid::Uuid::from_u128(v).to_string()
        }
    }
}

/// `sort_date` of a resource without a date, as the store writes it.
const NO_SORT_DATE: i64 = i64::MIN;

/// The JSON of txload.py's `obs(i, pref)`.
fn observation_json(i: usize, patient_ref: &str, rng: &mut StdRng) -> String {
    let (code, unit, lo, hi) = CODES[rng.random_range(0..CODES.len())];
    let value = rng.random_range(lo..hi);
    format!(
        concat!(
            r#"{{"resourceType":"Observation","status":"final","#,
            r#""category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],"#,
            r#""code":{{"coding":[{{"system":"http://loinc.org","code":"{code}"}}]}},"#,
            r#""subject":{{"reference":"{pref}"}},"#,
            r#""effectiveDateTime":"2026-03-{day:02}T{hour:02}:{minute:02}:00+01:00","#,
            r#""valueQuantity":{{"value":{value:.1},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}},"#,
            r#""device":{{"display":"watch-{watch}"}}}}"#
        ),
        code = code,
        pref = patient_ref,
        day = 1 + i % 28,
        hour = 8 + i % 12,
        minute = i % 60,
        value = value,
        unit = unit,
        watch = i % 97,
    )
}

/// Builds `count` rows, numbered per client as txload.py numbers them
/// (`per_client` Observations each before the number starts again).
pub fn build(
    count: usize,
    per_client: usize,
    patient_ref: &str,
    seed: u64,
    ids: Ids,
) -> anyhow::Result<Vec<Row>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = clinflow_store::now_millis();
    let instant = clinflow_fhir::datetime::format_instant(now);
    let mut rows = Vec::with_capacity(count);
    for n in 0..count {
        let text = observation_json(n % per_client.max(1), patient_ref, &mut rng);
        let mut res = clinflow_fhir::validate::parse_resource(&text, Some("Observation"))
            .map_err(|o| anyhow::anyhow!("the workload's Observation is invalid: {o:?}"))?;
        let id = new_id(ids, now, n, &mut rng);
        res.set_id(&id);
        res.set_meta(1, &instant);
        let Extracted {
            entries,
            patient,
            sort_date,
            ..
        } = clinflow_fhir::index::extract(&res);
        rows.push(Row {
            id,
            last_updated: now,
            body: res.to_json_string(),
            patient,
            sort_date: sort_date.unwrap_or(NO_SORT_DATE),
            entries,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_stored_compact_and_indexed() {
        let rows = build(10, 1000, "Patient/CARDIO-01-0001", 1, Ids::Random).unwrap();
        for r in &rows {
            // txload posts ~1 KB per entry (indented JSON, fullUrl, request);
            // clinflow stores the compact resource with id and meta.
            assert!(r.body.len() > 450 && r.body.len() < 800, "{}", r.body.len());
            assert_eq!(r.patient.as_deref(), Some("CARDIO-01-0001"));
            assert_ne!(r.sort_date, NO_SORT_DATE);
            assert!(r.entries.iter().any(|e| e.param == "code"));
        }
    }

    #[test]
    fn ordered_ids_sort_in_creation_order() {
        let rows = build(300, 1000, "Patient/p", 1, Ids::Ordered).unwrap();
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        assert!(rows.iter().all(|r| r.id.len() == 36));
    }
}
