//! FHIR R4 resources from DICOM: the DiagnosticReport and Observations of a series
//! analysis, and the ImagingStudy of a study.
//!
//! Ids are derived from DICOM UIDs (and, for analysis results, [`ANALYSER_VERSION`]) by
//! SHA-256, so writing the same result twice updates the same resources: re-running an
//! analysis task is idempotent, and a new analyser version makes new resources.

use crate::analysis::SeriesAnalysis;
use crate::parse::InstanceMeta;
use crate::ANALYSER_VERSION;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Identifier system of analysis results.
pub const ANALYSIS_SYSTEM: &str = "urn:clinflow:imaging-analysis";
/// Code system of the analysis metrics (Observation.code).
pub const METRIC_SYSTEM: &str = "urn:clinflow:imaging-analysis:metric";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const UCUM: &str = "http://unitsofmeasure.org";

/// A FHIR id (`[A-Za-z0-9-.]{1,64}`): `prefix` and 32 hex digits of SHA-256 of `parts`.
fn derived_id(prefix: &str, parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    format!("{prefix}-{}", hex::encode(&digest[..16]))
}

/// Id of the DiagnosticReport of `series_uid`'s analysis by this [`ANALYSER_VERSION`].
pub fn report_id(series_uid: &str) -> String {
    derived_id("ia", &["report", series_uid, ANALYSER_VERSION])
}

fn observation_id(series_uid: &str, metric: &str) -> String {
    derived_id(
        "iao",
        &["observation", series_uid, ANALYSER_VERSION, metric],
    )
}

/// Id of the ImagingStudy of `study_uid` (independent of the analyser version).
pub fn imaging_study_id(study_uid: &str) -> String {
    derived_id("is", &["imaging-study", study_uid])
}

/// One metric's value.
enum MetricValue {
    /// A quantity with its UCUM code and display unit.
    Quantity(f64, &'static str, &'static str),
    Integer(u64),
    Boolean(bool),
}

/// The analysis as a DiagnosticReport and its Observations (separate resources, each
/// with `id` set, referenced from `result`). `patient_ref` is e.g. `"Patient/xyz"`,
/// `imaging_study_ref` e.g. `"ImagingStudy/abc"`, `issued` an RFC 3339 instant.
pub fn diagnostic_report(
    a: &SeriesAnalysis,
    patient_ref: Option<&str>,
    imaging_study_ref: &str,
    issued: &str,
) -> (Value, Vec<Value>) {
    // CT values are Hounsfield units; other modalities' values have no physical unit.
    let (unit_code, unit) = if a.modality == "CT" {
        ("[hnsf'U]", "HU")
    } else {
        ("1", "1")
    };
    let mut metrics: Vec<(&str, &str, MetricValue)> = vec![
        (
            "window-center",
            "Automatic window centre",
            MetricValue::Quantity(a.window_center, unit_code, unit),
        ),
        (
            "window-width",
            "Automatic window width",
            MetricValue::Quantity(a.window_width, unit_code, unit),
        ),
        (
            "mean",
            "Mean intensity",
            MetricValue::Quantity(a.mean, unit_code, unit),
        ),
        (
            "std-dev",
            "Standard deviation of intensity",
            MetricValue::Quantity(a.std_dev, unit_code, unit),
        ),
    ];
    if let Some(noise) = a.noise {
        metrics.push((
            "noise",
            "Noise standard deviation",
            MetricValue::Quantity(noise, unit_code, unit),
        ));
    }
    if let Some(snr) = a.snr {
        metrics.push((
            "snr",
            "Signal-to-noise ratio",
            MetricValue::Quantity(snr, "1", "1"),
        ));
    }
    if let Some(spacing) = a.slice_spacing {
        metrics.push((
            "slice-spacing",
            "Slice spacing",
            MetricValue::Quantity(spacing, "mm", "mm"),
        ));
    }
    metrics.push((
        "spacing-consistent",
        "Slice spacing consistent",
        MetricValue::Boolean(a.spacing_consistent),
    ));
    metrics.push((
        "instance-count",
        "Number of instances",
        MetricValue::Integer(u64::from(a.instances)),
    ));
    metrics.push((
        "missing-instance-count",
        "Number of missing instance numbers",
        MetricValue::Integer(a.missing_instance_count),
    ));

    let mut observations = Vec::new();
    for (metric, display, value) in metrics {
        let value_field = match value {
            MetricValue::Quantity(v, _, _) if !v.is_finite() => continue,
            MetricValue::Quantity(v, code, unit) => (
                "valueQuantity",
                json!({ "value": v, "unit": unit, "system": UCUM, "code": code }),
            ),
            MetricValue::Integer(n) => ("valueInteger", json!(n.min(i32::MAX as u64))),
            MetricValue::Boolean(b) => ("valueBoolean", json!(b)),
        };
        let mut obs = json!({
            "resourceType": "Observation",
            "id": observation_id(&a.series_uid, metric),
            "identifier": [{
                "system": ANALYSIS_SYSTEM,
                "value": format!("{}|{ANALYSER_VERSION}|{metric}", a.series_uid),
            }],
            "status": "final",
            "category": [{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "imaging",
                "display": "Imaging",
            }]}],
            "code": {
                "coding": [{ "system": METRIC_SYSTEM, "code": metric, "display": display }],
                "text": display,
            },
            "issued": issued,
            "derivedFrom": [{ "reference": imaging_study_ref }],
            "method": { "text": ANALYSER_VERSION },
        });
        if let Some(map) = obs.as_object_mut() {
            map.insert(value_field.0.into(), value_field.1);
            if let Some(patient) = patient_ref {
                map.insert("subject".into(), json!({ "reference": patient }));
            }
        }
        observations.push(obs);
    }

    let results: Vec<Value> = observations
        .iter()
        .map(|o| json!({ "reference": format!("Observation/{}", o["id"].as_str().unwrap_or_default()) }))
        .collect();
    let mut conclusion = format!(
        "{} series: {} instance(s), {} frame(s)",
        a.modality, a.instances, a.frames
    );
    if a.missing_instance_count > 0 {
        conclusion.push_str(&format!(
            "; {} missing instance number(s)",
            a.missing_instance_count
        ));
    }
    if let Some(spacing) = a.slice_spacing {
        conclusion.push_str(&format!(
            "; slice spacing {spacing:.2} mm ({})",
            if a.spacing_consistent {
                "consistent"
            } else {
                "inconsistent"
            }
        ));
    }
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "id": report_id(&a.series_uid),
        "identifier": [{
            "system": ANALYSIS_SYSTEM,
            "value": format!("{}|{ANALYSER_VERSION}", a.series_uid),
        }],
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
            "code": "RAD",
            "display": "Radiology",
        }]}],
        "code": {
            "coding": [{
                "system": "http://loinc.org",
                "code": "18748-4",
                "display": "Diagnostic imaging study",
            }],
            "text": "Automated image quality analysis",
        },
        "issued": issued,
        "imagingStudy": [{ "reference": imaging_study_ref }],
        "result": results,
        "conclusion": conclusion,
    });
    if let (Some(patient), Some(map)) = (patient_ref, report.as_object_mut()) {
        map.insert("subject".into(), json!({ "reference": patient }));
    }
    (report, observations)
}

/// FHIR `date` from a DICOM DA (YYYYMMDD) with a plausible month and day.
///
/// Only the date goes into `started`: FHIR requires a time zone on a dateTime with a
/// time, and Study Time carries none.
fn fhir_date(da: &str) -> Option<String> {
    let month: u32 = da.get(4..6)?.parse().ok()?;
    let day: u32 = da.get(6..8)?.parse().ok()?;
    ((1..=12).contains(&month) && (1..=31).contains(&day))
        .then(|| format!("{}-{}-{}", &da[..4], &da[4..6], &da[6..8]))
}

fn modality_coding(code: &str) -> Value {
    json!({ "system": DCM, "code": code })
}

/// The ImagingStudy of `study_uid` from its instances' index fields (instances of other
/// studies are ignored, duplicates counted once). Series and instances are ordered by
/// number, then UID, so the resource is the same whatever order `instances` come in.
pub fn imaging_study(study_uid: &str, instances: &[InstanceMeta], patient_ref: &str) -> Value {
    let mut series: BTreeMap<&str, BTreeMap<&str, &InstanceMeta>> = BTreeMap::new();
    for meta in instances.iter().filter(|m| m.study_uid == study_uid) {
        series
            .entry(meta.series_uid.as_str())
            .or_default()
            .entry(meta.sop_instance_uid.as_str())
            .or_insert(meta);
    }
    let all: Vec<&InstanceMeta> = series.values().flat_map(|s| s.values().copied()).collect();
    let first = |f: &dyn Fn(&InstanceMeta) -> Option<String>| all.iter().find_map(|m| f(m));

    let mut series_json: Vec<(Option<i64>, &str, Value)> = series
        .iter()
        .map(|(series_uid, members)| {
            let mut members: Vec<&InstanceMeta> = members.values().copied().collect();
            members.sort_by(|a, b| {
                (a.instance_number.unwrap_or(i64::MAX), &a.sop_instance_uid)
                    .cmp(&(b.instance_number.unwrap_or(i64::MAX), &b.sop_instance_uid))
            });
            let head = members[0];
            let instances: Vec<Value> = members
                .iter()
                .map(|m| {
                    let mut inst = Map::new();
                    inst.insert("uid".into(), json!(m.sop_instance_uid));
                    inst.insert(
                        "sopClass".into(),
                        json!({ "system": "urn:ietf:rfc:3986", "code": format!("urn:oid:{}", m.sop_class_uid) }),
                    );
                    if let Some(n) = m.instance_number.filter(|n| (0..=i64::from(i32::MAX)).contains(n)) {
                        inst.insert("number".into(), json!(n));
                    }
                    Value::Object(inst)
                })
                .collect();
            let mut s = Map::new();
            s.insert("uid".into(), json!(series_uid));
            if let Some(n) = head.series_number.filter(|n| (0..=i64::from(i32::MAX)).contains(n)) {
                s.insert("number".into(), json!(n));
            }
            s.insert("modality".into(), modality_coding(&head.modality));
            if let Some(d) = members.iter().find_map(|m| m.series_description.clone()) {
                s.insert("description".into(), json!(d));
            }
            s.insert("numberOfInstances".into(), json!(members.len()));
            s.insert("instance".into(), Value::Array(instances));
            (head.series_number, *series_uid, Value::Object(s))
        })
        .collect();
    series_json.sort_by(|a, b| (a.0.unwrap_or(i64::MAX), a.1).cmp(&(b.0.unwrap_or(i64::MAX), b.1)));

    let mut modalities: Vec<&str> = all.iter().map(|m| m.modality.as_str()).collect();
    modalities.sort_unstable();
    modalities.dedup();

    let mut identifiers =
        vec![json!({ "system": "urn:dicom:uid", "value": format!("urn:oid:{study_uid}") })];
    if let Some(accession) = first(&|m| m.accession.clone()) {
        identifiers.push(json!({
            "type": { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                "code": "ACSN",
            }]},
            "value": accession,
        }));
    }
    let mut study = json!({
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(study_uid),
        "identifier": identifiers,
        "status": "available",
        "modality": modalities.iter().map(|m| modality_coding(m)).collect::<Vec<_>>(),
        "subject": { "reference": patient_ref },
        "numberOfSeries": series_json.len(),
        "numberOfInstances": all.len(),
        "series": series_json.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
    });
    if let Some(map) = study.as_object_mut() {
        if let Some(started) = first(&|m| m.study_date.as_deref().and_then(fhir_date)) {
            map.insert("started".into(), json!(started));
        }
        if let Some(description) = first(&|m| m.study_description.clone()) {
            map.insert("description".into(), json!(description));
        }
    }
    study
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_fhir_ids_and_distinct() {
        let ids = [
            report_id("1.2.3"),
            report_id("1.2.4"),
            imaging_study_id("1.2.3"),
        ];
        for id in &ids {
            assert!(
                id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
                "{id}"
            );
        }
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
        assert_eq!(report_id("1.2.3"), ids[0]);
    }

    #[test]
    fn dates_are_checked() {
        assert_eq!(fhir_date("20240131").as_deref(), Some("2024-01-31"));
        assert_eq!(fhir_date("20241331"), None);
    }
}
