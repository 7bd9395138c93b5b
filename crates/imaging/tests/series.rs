//! A series built in memory from CT_small (dicom-object's API), the FHIR resources of
//! its analysis, compressed samples' thumbnails, and random input.

mod common;

use clinflow_imaging::{
    diagnostic_report, imaging_study, imaging_study_id, parse_dataset, parse_part10, report_id,
    SeriesAnalyser, ANALYSER_VERSION,
};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use proptest::prelude::*;

const SERIES_UID: &str = "2.25.1234567890123456789";

/// Copies of CT_small as bare datasets: a new series, the given instance numbers, new
/// SOP Instance UIDs and positions `spacing` mm apart along z, in the given order.
fn ct_series(numbers: &[i64], spacing: f64) -> Vec<(Vec<u8>, String)> {
    let bytes = common::sample("CT_small.dcm");
    let ts = TransferSyntaxRegistry.get("1.2.840.10008.1.2.1").unwrap();
    numbers
        .iter()
        .enumerate()
        .map(|(index, &n)| {
            let mut obj = OpenFileOptions::new()
                .read_preamble(ReadPreamble::Always)
                .from_reader(&bytes[..])
                .unwrap();
            let uid = format!("{SERIES_UID}.{n}");
            let put = |obj: &mut dicom_object::DefaultDicomObject, tag, vr, v: String| {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            };
            put(
                &mut obj,
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                SERIES_UID.to_string(),
            );
            put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, uid.clone());
            put(&mut obj, tags::INSTANCE_NUMBER, VR::IS, n.to_string());
            put(
                &mut obj,
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0".into(),
            );
            let z = spacing * index as f64;
            put(
                &mut obj,
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                format!("0\\0\\{z}"),
            );
            let mut dataset = Vec::new();
            obj.write_dataset_with_ts(&mut dataset, ts).unwrap();
            (dataset, uid)
        })
        .collect()
}

fn analyse_series(numbers: &[i64], spacing: f64) -> clinflow_imaging::SeriesAnalysis {
    let mut analyser = SeriesAnalyser::new(SERIES_UID);
    for (dataset, uid) in ct_series(numbers, spacing) {
        let instance = parse_dataset(
            &dataset,
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2",
            &uid,
        )
        .unwrap();
        assert_eq!(instance.meta.series_uid, SERIES_UID);
        analyser.add(&instance).unwrap();
    }
    analyser.finish().unwrap()
}

#[test]
fn a_series_with_a_gap_reports_it_and_its_spacing() {
    let a = analyse_series(&[1, 2, 4], 5.0);
    assert_eq!(a.instances, 3);
    assert_eq!(a.frames, 3);
    assert_eq!(a.missing_instances, vec![3]);
    assert_eq!(a.missing_instance_count, 1);
    let spacing = a.slice_spacing.unwrap();
    assert!((spacing - 5.0).abs() < 1e-9, "{spacing}");
    assert!(a.spacing_consistent);
    // Three copies of one image: the same histogram shape, three times the counts.
    let one = analyse_series(&[1], 5.0);
    assert_eq!(a.histogram.min, one.histogram.min);
    let tripled: Vec<u64> = one.histogram.bins.iter().map(|c| c * 3).collect();
    assert_eq!(a.histogram.bins, tripled);
    assert!((a.mean - one.mean).abs() < 1e-9);
    assert_eq!(one.slice_spacing, None);

    let even = analyse_series(&[1, 2, 3, 4], 2.5);
    assert!(even.spacing_consistent);
    assert!(even.missing_instances.is_empty());
    assert!((even.slice_spacing.unwrap() - 2.5).abs() < 1e-9);
}

#[test]
fn an_instance_of_another_series_is_refused_without_changing_the_analysis() {
    let mut analyser = SeriesAnalyser::new("1.2.3");
    let ct = parse_part10(&common::sample("CT_small.dcm")).unwrap();
    let err = analyser.add(&ct).unwrap_err();
    assert_eq!(err.kind, "inconsistent");
    assert_eq!(analyser.finish().unwrap_err().kind, "no_pixels");

    let mr = parse_part10(&common::sample("MR_small.dcm")).unwrap();
    let mut analyser = SeriesAnalyser::new(&mr.meta.series_uid);
    analyser.add(&mr).unwrap();
    let mut other = parse_part10(&common::sample("CT_small.dcm")).unwrap();
    other.meta.series_uid = mr.meta.series_uid.clone();
    assert_eq!(analyser.add(&other).unwrap_err().kind, "inconsistent");
    assert_eq!(analyser.finish().unwrap().instances, 1);
}

#[test]
fn the_report_is_idempotent_and_specific_to_its_series() {
    let a = analyse_series(&[1, 2, 4], 5.0);
    let issued = "2026-03-01T10:00:00Z";
    let (report, observations) =
        diagnostic_report(&a, Some("Patient/p1"), "ImagingStudy/s1", issued);
    let (again, again_obs) = diagnostic_report(&a, Some("Patient/p1"), "ImagingStudy/s1", issued);
    assert_eq!(report, again);
    assert_eq!(observations, again_obs);
    assert_eq!(report["id"], report_id(SERIES_UID));
    assert_eq!(report["status"], "final");
    assert_eq!(report["code"]["coding"][0]["code"], "18748-4");
    assert_eq!(report["subject"]["reference"], "Patient/p1");
    assert_eq!(report["imagingStudy"][0]["reference"], "ImagingStudy/s1");
    assert_eq!(
        report["identifier"][0]["value"],
        format!("{SERIES_UID}|{ANALYSER_VERSION}")
    );
    let results: Vec<String> = report["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap().to_string())
        .collect();
    let mut ids = Vec::new();
    for obs in &observations {
        let id = obs["id"].as_str().unwrap();
        assert!(
            id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        );
        assert!(results.contains(&format!("Observation/{id}")));
        assert_eq!(obs["subject"]["reference"], "Patient/p1");
        assert_eq!(obs["derivedFrom"][0]["reference"], "ImagingStudy/s1");
        let metric = obs["code"]["coding"][0]["code"].as_str().unwrap();
        assert_eq!(
            obs["identifier"][0]["value"],
            format!("{SERIES_UID}|{ANALYSER_VERSION}|{metric}")
        );
        ids.push(id.to_string());
    }
    let metric = |m: &str| {
        observations
            .iter()
            .find(|o| o["code"]["coding"][0]["code"] == m)
            .unwrap_or_else(|| panic!("no {m} observation"))
    };
    assert_eq!(metric("window-center")["valueQuantity"]["code"], "[hnsf'U]");
    assert_eq!(metric("slice-spacing")["valueQuantity"]["code"], "mm");
    assert_eq!(metric("missing-instance-count")["valueInteger"], 1);
    assert_eq!(metric("instance-count")["valueInteger"], 3);
    assert!(metric("noise")["valueQuantity"]["value"].as_f64().unwrap() > 0.0);

    // Another series: other ids throughout.
    let mr = parse_part10(&common::sample("MR_small.dcm")).unwrap();
    let mut analyser = SeriesAnalyser::new(&mr.meta.series_uid);
    analyser.add(&mr).unwrap();
    let b = analyser.finish().unwrap();
    let (other, other_obs) = diagnostic_report(&b, None, "ImagingStudy/s2", issued);
    assert_ne!(other["id"], report["id"]);
    assert!(other.get("subject").is_none());
    for obs in &other_obs {
        assert!(!ids.contains(&obs["id"].as_str().unwrap().to_string()));
    }
}

#[test]
fn the_imaging_study_lists_series_and_instances() {
    let mut metas: Vec<_> = ct_series(&[4, 1, 2], 5.0)
        .into_iter()
        .map(|(d, uid)| {
            parse_dataset(&d, "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2", &uid)
                .unwrap()
                .meta
        })
        .collect();
    let mr = parse_part10(&common::sample("MR_small.dcm")).unwrap().meta;
    let study_uid = metas[0].study_uid.clone();
    let mut mr_in_study = mr.clone();
    mr_in_study.study_uid = study_uid.clone();
    metas.push(mr_in_study);
    metas.push(mr); // another study: ignored
    let study = imaging_study(&study_uid, &metas, "Patient/p1");
    assert_eq!(study["resourceType"], "ImagingStudy");
    assert_eq!(study["id"], imaging_study_id(&study_uid));
    assert_eq!(study["status"], "available");
    assert_eq!(
        study["identifier"][0]["value"],
        format!("urn:oid:{study_uid}")
    );
    assert_eq!(study["subject"]["reference"], "Patient/p1");
    assert_eq!(study["numberOfSeries"], 2);
    assert_eq!(study["numberOfInstances"], 4);
    let modalities: Vec<&str> = study["modality"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["code"].as_str().unwrap())
        .collect();
    assert_eq!(modalities, ["CT", "MR"]);
    let ct = study["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["uid"] == SERIES_UID)
        .unwrap();
    assert_eq!(ct["numberOfInstances"], 3);
    let numbers: Vec<i64> = ct["instance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 4], "instances sorted by number");
    assert_eq!(
        ct["instance"][0]["sopClass"]["code"],
        "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    );
    // Input order does not matter.
    metas.reverse();
    assert_eq!(imaging_study(&study_uid, &metas, "Patient/p1"), study);
}

#[test]
fn compressed_samples_decode_to_a_thumbnail() {
    for name in [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_rle.dcm",
        "examples_ybr_color.dcm",
    ] {
        let instance = parse_part10(&common::sample(name)).unwrap();
        let mut analyser = SeriesAnalyser::new(&instance.meta.series_uid);
        analyser
            .add(&instance)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let a = analyser.finish().unwrap();
        assert!(
            a.mean.is_finite() && a.std_dev.is_finite() && a.window_width > 0.0,
            "{name}"
        );
        assert_eq!(a.frames, instance.meta.frames, "{name}");
        let reader = png::Decoder::new(std::io::Cursor::new(&a.thumbnail_png[..]))
            .read_info()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = reader.info();
        assert!(info.width <= 128 && info.height <= 128, "{name}");
        let colour = instance.meta.samples_per_pixel == 3;
        let want = if colour {
            png::ColorType::Rgb
        } else {
            png::ColorType::Grayscale
        };
        assert_eq!(info.color_type, want, "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random bytes, with or without a DICM header in front, never panic.
    #[test]
    fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048), dicm in any::<bool>()) {
        let mut bytes = Vec::new();
        if dicm {
            bytes.extend_from_slice(&[0u8; 128]);
            bytes.extend_from_slice(b"DICM");
        }
        bytes.extend_from_slice(&body);
        if let Ok(instance) = parse_part10(&bytes) {
            let _ = instance.dicom_json(Some("b"));
            let mut a = SeriesAnalyser::new(&instance.meta.series_uid);
            let _ = a.add(&instance);
        }
        for ts in ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"] {
            if let Ok(instance) = parse_dataset(&body, ts, "1.2.3", "1.2.3.4") {
                let _ = instance.dicom_json(None);
            }
        }
    }
}
