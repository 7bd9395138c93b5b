//! The FHIR R4 forms of imaging: an ImagingStudy per study, and per
//! analysed series a DiagnosticReport with one Observation per metric.
//!
//! Invariant: ids derive from UIDs (and [`ANALYSER_VERSION`] for results)
//! through SHA-256, so they are stable, valid FHIR ids (`[A-Za-z0-9-.]`,
//! at most 64) and reveal nothing a UID's root might say about a site.

use serde_json::{json, Value};
use sha2::Digest;

use crate::analysis::SeriesAnalysis;
use crate::parse::InstanceMeta;
use crate::ANALYSER_VERSION;

/// The identifier system of analysis results; values are
/// `SERIES_UID|ANALYSER_VERSION` (and `|METRIC` for Observations).
pub const RESULT_SYSTEM: &str = "urn:clinflow:imaging-analysis";
/// The code system of the metrics clinflow computes.
pub const METRIC_SYSTEM: &str = "urn:clinflow:imaging-metric";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const UCUM: &str = "http://unitsofmeasure.org";

fn hashed(prefix: &str, input: &str) -> String {
    let h = hex::encode(sha2::Sha256::digest(input.as_bytes()));
    format!("{prefix}{}", &h[..40])
}

/// The DiagnosticReport id of a series' analysis by this analyser version.
pub fn report_id(series_uid: &str) -> String {
    hashed("ia-", &format!("{series_uid}|{ANALYSER_VERSION}"))
}

fn observation_id(series_uid: &str, metric: &str) -> String {
    hashed("im-", &format!("{series_uid}|{ANALYSER_VERSION}|{metric}"))
}

/// The ImagingStudy id of a study.
pub fn imaging_study_id(study_uid: &str) -> String {
    hashed("is-", study_uid)
}

/// Three decimals: enough for every metric, and stable text.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `YYYYMMDD` as a FHIR date.
fn fhir_date(d: &str) -> Option<String> {
    (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..]))
}

/// The analysis as a DiagnosticReport and its Observations (each with its
/// `id`), linked to the patient and the ImagingStudy.
pub fn diagnostic_report(
    a: &SeriesAnalysis,
    patient_ref: Option<&str>,
    imaging_study_ref: &str,
    issued: &str,
) -> (Value, Vec<Value>) {
    let intensity_unit = if a.modality == "CT" {
        ("[hnsf'U]", "HU")
    } else {
        ("1", "1")
    };
    let mut metrics: Vec<(&str, &str, f64, (&str, &str))> = vec![
        (
            "window-center",
            "Automatic window centre",
            a.window_center,
            intensity_unit,
        ),
        (
            "window-width",
            "Automatic window width",
            a.window_width,
            intensity_unit,
        ),
        ("mean", "Mean intensity", a.mean, intensity_unit),
        (
            "std-dev",
            "Intensity standard deviation",
            a.std_dev,
            intensity_unit,
        ),
        (
            "instance-count",
            "Instances analysed",
            f64::from(a.instances),
            ("1", "1"),
        ),
        (
            "missing-instances",
            "Missing instance numbers",
            a.missing_instances.len() as f64,
            ("1", "1"),
        ),
    ];
    if let Some(n) = a.noise {
        metrics.push(("noise", "Noise (Immerkaer)", n, intensity_unit));
    }
    if let Some(s) = a.snr {
        metrics.push(("snr", "Signal-to-noise ratio", s, ("1", "1")));
    }
    if let Some(s) = a.slice_spacing {
        metrics.push(("slice-spacing", "Slice spacing", s, ("mm", "mm")));
    }
    let mut observations = Vec::new();
    for (code, display, value, (ucum, unit)) in metrics {
        if !value.is_finite() {
            continue;
        }
        let id = observation_id(&a.series_uid, code);
        let mut o = json!({
            "resourceType": "Observation",
            "id": id,
            "identifier": [{"system": RESULT_SYSTEM, "value": format!("{}|{ANALYSER_VERSION}|{code}", a.series_uid)}],
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging", "display": "Imaging"}]}],
            "code": {"coding": [{"system": METRIC_SYSTEM, "code": code, "display": display}], "text": display},
            "issued": issued,
            "valueQuantity": {"value": round(value), "unit": unit, "system": UCUM, "code": ucum},
            "derivedFrom": [{"reference": imaging_study_ref}],
            "method": {"text": ANALYSER_VERSION},
        });
        if let Some(p) = patient_ref {
            o["subject"] = json!({"reference": p});
        }
        observations.push(o);
    }
    let conclusion = format!(
        "{} series of {} instance(s), {} frame(s): window {}/{}{}{}{}",
        a.modality,
        a.instances,
        a.frames,
        round(a.window_center),
        round(a.window_width),
        a.noise
            .map(|n| format!(", noise {}", round(n)))
            .unwrap_or_default(),
        a.slice_spacing
            .map(|s| format!(
                ", slice spacing {} mm{}",
                round(s),
                if a.spacing_consistent {
                    ""
                } else {
                    " (inconsistent)"
                }
            ))
            .unwrap_or_default(),
        if a.missing_instances.is_empty() {
            String::new()
        } else {
            format!(", {} instance number(s) missing", a.missing_instances.len())
        },
    );
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "id": report_id(&a.series_uid),
        "identifier": [{"system": RESULT_SYSTEM, "value": format!("{}|{ANALYSER_VERSION}", a.series_uid)}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}], "text": "Automated image quality analysis"},
        "issued": issued,
        "imagingStudy": [{"reference": imaging_study_ref}],
        "result": observations.iter().map(|o| json!({"reference": format!("Observation/{}", o["id"].as_str().unwrap_or_default())})).collect::<Vec<_>>(),
        "conclusion": conclusion,
    });
    if let Some(p) = patient_ref {
        report["subject"] = json!({"reference": p});
    }
    (report, observations)
}

/// A study's ImagingStudy from its instances' index fields (any order;
/// series and instances are listed by number, then UID).
pub fn imaging_study(study_uid: &str, instances: &[InstanceMeta], patient_ref: &str) -> Value {
    let mut metas: Vec<&InstanceMeta> = instances
        .iter()
        .filter(|m| m.study_uid == study_uid)
        .collect();
    metas.sort_by(|a, b| {
        (
            a.series_number,
            &a.series_uid,
            a.instance_number,
            &a.sop_instance_uid,
        )
            .cmp(&(
                b.series_number,
                &b.series_uid,
                b.instance_number,
                &b.sop_instance_uid,
            ))
    });
    let mut series: Vec<(String, Vec<&InstanceMeta>)> = Vec::new();
    for m in metas.iter().copied() {
        match series.iter_mut().find(|(uid, _)| *uid == m.series_uid) {
            Some((_, list)) => list.push(m),
            None => series.push((m.series_uid.clone(), vec![m])),
        }
    }
    let mut modalities: Vec<String> = metas.iter().map(|m| m.modality.clone()).collect();
    modalities.sort();
    modalities.dedup();
    let series_json: Vec<Value> = series
        .iter()
        .map(|(uid, list)| {
            let first = list[0];
            let mut s = json!({
                "uid": uid,
                "modality": {"system": DCM, "code": first.modality},
                "numberOfInstances": list.len(),
                "instance": list.iter().map(|m| {
                    let mut i = json!({
                        "uid": m.sop_instance_uid,
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": format!("urn:oid:{}", m.sop_class_uid)},
                    });
                    if let Some(n) = m.instance_number.filter(|n| *n >= 0) {
                        i["number"] = json!(n);
                    }
                    i
                }).collect::<Vec<_>>(),
            });
            if let Some(n) = first.series_number.filter(|n| *n >= 0) {
                s["number"] = json!(n);
            }
            if let Some(d) = first.series_description.as_ref().filter(|d| !d.is_empty()) {
                s["description"] = json!(d);
            }
            if let Some(b) = first.body_part.as_ref().filter(|b| !b.is_empty()) {
                s["bodySite"] = json!({"display": b});
            }
            s
        })
        .collect();
    let mut study = json!({
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(study_uid),
        "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:{study_uid}")}],
        "status": "available",
        "subject": {"reference": patient_ref},
        "modality": modalities.iter().map(|m| json!({"system": DCM, "code": m})).collect::<Vec<_>>(),
        "numberOfSeries": series.len(),
        "numberOfInstances": metas.len(),
        "series": series_json,
    });
    if let Some(first) = metas.first() {
        if let Some(d) = first.study_date.as_deref().and_then(fhir_date) {
            study["started"] = json!(d);
        }
        if let Some(d) = first.study_description.as_ref().filter(|d| !d.is_empty()) {
            study["description"] = json!(d);
        }
        if let Some(a) = first.accession.as_ref().filter(|a| !a.is_empty()) {
            if let Some(ids) = study["identifier"].as_array_mut() {
                ids.push(json!({
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": a,
                }));
            }
        }
    }
    study
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_valid_and_distinct() {
        let a = report_id("1.2.3");
        assert_eq!(a, report_id("1.2.3"));
        assert_ne!(a, report_id("1.2.4"));
        assert_ne!(imaging_study_id("1.2.3"), a);
        for id in [a, imaging_study_id("1.2"), observation_id("1.2", "snr")] {
            assert!(id.len() <= 64);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        }
    }

    #[test]
    fn dates_become_fhir_dates() {
        assert_eq!(fhir_date("20040119").as_deref(), Some("2004-01-19"));
        assert_eq!(fhir_date("2004011"), None);
    }
}
