//! Parsing pydicom's sample files, checked against what pydicom itself reads.

mod common;

use clinflow_imaging::{parse_dataset, parse_part10, part10_from_dataset};

/// For each file: whether it is a complete instance pydicom reads (Part 10 with a
/// transfer syntax, non-empty PatientID, the four UIDs) and the index fields.
const PYDICOM_META: &str = r#"
import json, sys, pydicom
out = {}
for path in sys.argv[1:]:
    name = path.rsplit('/', 1)[-1]
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        out[name] = None
        continue
    fm = getattr(ds, 'file_meta', None)
    ts = fm.get('TransferSyntaxUID') if fm is not None else None
    def s(kw):
        v = ds.get(kw)
        return None if v is None else str(v).strip()
    def n(kw):
        v = ds.get(kw)
        try:
            return None if v is None or v == '' else int(v)
        except Exception:
            return None
    sop_class = s('SOPClassUID') or (str(fm.get('MediaStorageSOPClassUID') or '') if fm is not None else '')
    sop_inst = s('SOPInstanceUID') or (str(fm.get('MediaStorageSOPInstanceUID') or '') if fm is not None else '')
    complete = bool(ts and s('PatientID') and s('StudyInstanceUID') and s('SeriesInstanceUID') and sop_class and sop_inst)
    out[name] = {
        'complete': complete,
        'transfer_syntax': str(ts) if ts else None,
        'sop_class_uid': sop_class, 'sop_instance_uid': sop_inst,
        'study_uid': s('StudyInstanceUID'), 'series_uid': s('SeriesInstanceUID'),
        'patient_id': s('PatientID'), 'modality': s('Modality') or 'OT',
        'rows': n('Rows'), 'columns': n('Columns'),
        'frames': n('NumberOfFrames') or 1,
        'instance_number': n('InstanceNumber'), 'series_number': n('SeriesNumber'),
        'has_pixel_data': 'PixelData' in ds,
    }
print(json.dumps(out))
"#;

/// Samples pydicom reads although they are cut short; we must reject them.
const TRUNCATED: &[&str] = &["MR_truncated.dcm", "rtplan_truncated.dcm"];

#[test]
fn every_sample_parses_like_pydicom_or_fails_with_a_reason() {
    let dir = common::samples_dir();
    let samples = common::all_samples();
    let paths: Vec<_> = samples.iter().map(|(n, _)| dir.join(n)).collect();
    let path_refs: Vec<_> = paths.iter().map(|p| p.as_path()).collect();
    let expected = common::pydicom_json(PYDICOM_META, &path_refs);
    let mut parsed = 0;
    for (name, bytes) in &samples {
        let result = parse_part10(bytes);
        let want = &expected[name.as_str()];
        let complete = want["complete"].as_bool().unwrap_or(false);
        if TRUNCATED.contains(&name.as_str()) || !complete {
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{name}: parsed, want an error"));
            assert!(!err.reason.is_empty(), "{name}");
            eprintln!("{name}: rejected: {err}");
            continue;
        }
        let instance = match result {
            Ok(i) => i,
            Err(e) => panic!("{name}: {e}"),
        };
        let m = &instance.meta;
        let ctx = name.as_str();
        assert_eq!(m.sop_class_uid, want["sop_class_uid"], "{ctx}");
        assert_eq!(m.sop_instance_uid, want["sop_instance_uid"], "{ctx}");
        assert_eq!(m.study_uid, want["study_uid"], "{ctx}");
        assert_eq!(m.series_uid, want["series_uid"], "{ctx}");
        assert_eq!(m.patient_id, want["patient_id"], "{ctx}");
        assert_eq!(m.modality, want["modality"], "{ctx}");
        assert_eq!(m.transfer_syntax, want["transfer_syntax"], "{ctx}");
        assert_eq!(m.rows.map(u64::from), want["rows"].as_u64(), "{ctx}");
        assert_eq!(m.columns.map(u64::from), want["columns"].as_u64(), "{ctx}");
        assert_eq!(
            u64::from(m.frames),
            want["frames"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(m.instance_number, want["instance_number"].as_i64(), "{ctx}");
        assert_eq!(m.series_number, want["series_number"].as_i64(), "{ctx}");
        assert_eq!(m.has_pixel_data, want["has_pixel_data"], "{ctx}");
        parsed += 1;
    }
    assert!(parsed >= 30, "only {parsed} samples parsed");
}

#[test]
fn a_bare_dataset_parses_like_its_file_and_round_trips_through_part10() {
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_implicit.dcm",
    ] {
        let file = common::sample(name);
        let inst = parse_part10(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = &inst.meta;
        let ds = inst.dataset_bytes();
        let bare = parse_dataset(
            ds,
            &m.transfer_syntax,
            &m.sop_class_uid,
            &m.sop_instance_uid,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&bare.meta, m, "{name}");
        let rebuilt = part10_from_dataset(
            ds,
            &m.transfer_syntax,
            &m.sop_class_uid,
            &m.sop_instance_uid,
        );
        assert!(rebuilt.ends_with(ds), "the dataset is kept byte for byte");
        assert_eq!(&parse_part10(&rebuilt).unwrap().meta, m, "{name}");
        // The command set's SOP Instance UID must be the dataset's.
        let e = parse_dataset(ds, &m.transfer_syntax, &m.sop_class_uid, "1.2.3.4").unwrap_err();
        assert!(!e.reason.is_empty());
    }
}

#[test]
fn truncations_of_a_file_are_refused_with_a_reason() {
    let file = common::sample("CT_small.dcm");
    for cut in (0..file.len()).step_by(97) {
        if let Err(e) = parse_part10(&file[..cut]) {
            assert!(!e.reason.is_empty());
        }
    }
    assert!(parse_part10(&file[..200]).is_err());
}

/// The remaining index fields of CT_small and MR_small, as pydicom reads them.
const PYDICOM_DETAIL: &str = r#"
import json, sys, pydicom
out = {}
for path in sys.argv[1:]:
    ds = pydicom.dcmread(path)
    def s(kw):
        v = ds.get(kw)
        return None if v is None or str(v).strip() == '' else str(v).strip()
    def fl(kw):
        v = ds.get(kw)
        if v is None or v == '': return None
        try: return [float(x) for x in v]
        except TypeError: return [float(v)]
    out[path.rsplit('/', 1)[-1]] = {
        'study_date': s('StudyDate'), 'study_time': s('StudyTime'),
        'accession': s('AccessionNumber'), 'study_description': s('StudyDescription'),
        'series_description': s('SeriesDescription'), 'body_part': s('BodyPartExamined'),
        'image_position': fl('ImagePositionPatient'), 'image_orientation': fl('ImageOrientationPatient'),
        'slice_location': fl('SliceLocation'), 'pixel_spacing': fl('PixelSpacing'),
        'slice_thickness': fl('SliceThickness'), 'samples_per_pixel': ds.get('SamplesPerPixel'),
        'bits_allocated': ds.get('BitsAllocated'),
    }
print(json.dumps(out))
"#;

fn floats(v: &serde_json::Value) -> Option<Vec<f64>> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect())
}

#[test]
fn ct_and_mr_index_fields_match_pydicom() {
    let dir = common::samples_dir();
    let names = ["CT_small.dcm", "MR_small.dcm"];
    let paths: Vec<_> = names.iter().map(|n| dir.join(n)).collect();
    let refs: Vec<_> = paths.iter().map(|p| p.as_path()).collect();
    let expected = common::pydicom_json(PYDICOM_DETAIL, &refs);
    for name in names {
        let want = &expected[name];
        let m = parse_part10(&common::sample(name)).unwrap().meta;
        let opt = |v: &serde_json::Value| v.as_str().map(str::to_string);
        assert_eq!(m.study_date, opt(&want["study_date"]), "{name}");
        assert_eq!(m.study_time, opt(&want["study_time"]), "{name}");
        assert_eq!(m.accession, opt(&want["accession"]), "{name}");
        assert_eq!(
            m.study_description,
            opt(&want["study_description"]),
            "{name}"
        );
        assert_eq!(
            m.series_description,
            opt(&want["series_description"]),
            "{name}"
        );
        assert_eq!(m.body_part, opt(&want["body_part"]), "{name}");
        assert_eq!(
            m.image_position.map(|a| a.to_vec()),
            floats(&want["image_position"]),
            "{name}"
        );
        assert_eq!(
            m.image_orientation.map(|a| a.to_vec()),
            floats(&want["image_orientation"]),
            "{name}"
        );
        assert_eq!(
            m.pixel_spacing.map(|a| a.to_vec()),
            floats(&want["pixel_spacing"]),
            "{name}"
        );
        assert_eq!(
            m.slice_location.map(|v| vec![v]),
            floats(&want["slice_location"]),
            "{name}"
        );
        assert_eq!(
            m.slice_thickness.map(|v| vec![v]),
            floats(&want["slice_thickness"]),
            "{name}"
        );
        assert_eq!(
            Some(u64::from(m.samples_per_pixel)),
            want["samples_per_pixel"].as_u64()
        );
        assert_eq!(
            Some(u64::from(m.bits_allocated)),
            want["bits_allocated"].as_u64()
        );
        assert!(m.study_date.as_ref().is_none_or(|d| d.len() == 8));
    }
}

#[test]
fn meta_is_deterministic() {
    let bytes = common::sample("CT_small.dcm");
    assert_eq!(
        parse_part10(&bytes).unwrap().meta,
        parse_part10(&bytes).unwrap().meta
    );
}

#[test]
fn a_bare_dataset_parses_to_the_same_meta_and_round_trips() {
    for name in [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
    ] {
        let file = parse_part10(&common::sample(name)).unwrap();
        let m = &file.meta;
        let dataset = file.dataset_bytes();
        let bare = parse_dataset(
            dataset,
            &m.transfer_syntax,
            &m.sop_class_uid,
            &m.sop_instance_uid,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&bare.meta, m, "{name}");

        let part10 = bare.to_part10().unwrap();
        assert_eq!(
            part10,
            part10_from_dataset(
                dataset,
                &m.transfer_syntax,
                &m.sop_class_uid,
                &m.sop_instance_uid
            )
        );
        assert!(
            part10.ends_with(dataset),
            "{name}: dataset bytes must be kept as received"
        );
        let again = parse_part10(&part10).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&again.meta, m, "{name}");
        assert_eq!(again.dataset_bytes(), dataset, "{name}");
        // A parsed file comes back byte for byte.
        assert_eq!(file.to_part10().unwrap(), common::sample(name), "{name}");
    }
}

#[test]
fn command_set_uids_must_match_the_dataset() {
    let file = parse_part10(&common::sample("CT_small.dcm")).unwrap();
    let m = &file.meta;
    let err = parse_dataset(
        file.dataset_bytes(),
        &m.transfer_syntax,
        &m.sop_class_uid,
        "1.2.3.4",
    )
    .unwrap_err();
    assert!(err.reason.contains("SOPInstanceUID"), "{err}");
    let err = parse_dataset(
        file.dataset_bytes(),
        &m.transfer_syntax,
        "1.2.3",
        &m.sop_instance_uid,
    )
    .unwrap_err();
    assert!(err.reason.contains("SOPClassUID"), "{err}");
    let err = parse_dataset(
        file.dataset_bytes(),
        "1.2.3.999",
        &m.sop_class_uid,
        &m.sop_instance_uid,
    )
    .unwrap_err();
    assert!(err.reason.contains("transfer syntax"), "{err}");
}

#[test]
fn truncation_at_every_97th_byte_is_an_error_or_a_shorter_instance() {
    let bytes = common::sample("CT_small.dcm");
    let full = parse_part10(&bytes).unwrap();
    let pixel_start = bytes.len() - 128 * 128 * 2;
    for cut in (0..bytes.len()).step_by(97) {
        match parse_part10(&bytes[..cut]) {
            Err(e) => assert!(!e.reason.is_empty()),
            // Only a cut between elements can parse, and then it lacks what followed.
            Ok(i) => assert!(
                cut < pixel_start && i.meta != full.meta,
                "cut at {cut} parsed whole"
            ),
        }
    }
    let m = &full.meta;
    let dataset = full.dataset_bytes();
    for cut in (0..dataset.len()).step_by(97) {
        let _ = parse_dataset(
            &dataset[..cut],
            &m.transfer_syntax,
            &m.sop_class_uid,
            &m.sop_instance_uid,
        );
    }
}

#[test]
fn dicom_json_has_the_ps3_18_shape() {
    let instance = parse_part10(&common::sample("CT_small.dcm")).unwrap();
    let json = instance.dicom_json(Some("https://pacs/studies/1/series/2/instances/3/bulk"));
    let obj = json.as_object().unwrap();
    for (key, attr) in obj {
        assert_eq!(key.len(), 8, "{key}");
        assert!(
            key.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()),
            "{key}"
        );
        let vr = attr["vr"]
            .as_str()
            .unwrap_or_else(|| panic!("{key} has no vr"));
        assert_eq!(vr.len(), 2, "{key}");
        if let Some(values) = attr.get("Value") {
            assert!(values.is_array(), "{key}");
        }
        assert!(!key.ends_with("0000"), "group length {key} included");
    }
    assert_eq!(json["00100020"]["Value"][0], instance.meta.patient_id);
    assert_eq!(json["0020000D"]["Value"][0], instance.meta.study_uid);
    assert!(
        json["00100010"]["Value"][0]["Alphabetic"].is_string(),
        "{}",
        json["00100010"]
    );
    assert_eq!(json["00280010"]["Value"][0], 128);
    assert!(json["00200032"]["Value"][0].is_number());
    let pixel = &json["7FE00010"];
    assert!(pixel.get("InlineBinary").is_none() && pixel.get("Value").is_none());
    let uri = pixel["BulkDataURI"].as_str().unwrap();
    assert_eq!(
        uri,
        "https://pacs/studies/1/series/2/instances/3/bulk/7FE00010"
    );
    let bulk = instance.bulk_data("7FE00010").unwrap();
    assert_eq!(bulk.len(), 128 * 128 * 2);

    let without = instance.dicom_json(None);
    assert!(without["7FE00010"].get("BulkDataURI").is_none());
    assert_eq!(without["7FE00010"]["vr"], "OW");
}

#[test]
fn qido_objects_carry_the_required_attributes() {
    let meta = parse_part10(&common::sample("CT_small.dcm")).unwrap().meta;
    let inst = clinflow_imaging::qido_instance(&meta, "https://h/dicomweb/");
    assert_eq!(inst["00080018"]["Value"][0], meta.sop_instance_uid);
    assert_eq!(inst["00280010"]["Value"][0], 128);
    let url = inst["00081190"]["Value"][0].as_str().unwrap();
    assert_eq!(
        url,
        format!(
            "https://h/dicomweb/studies/{}/series/{}/instances/{}",
            meta.study_uid, meta.series_uid, meta.sop_instance_uid
        )
    );
    let study = clinflow_imaging::qido_study(
        &clinflow_imaging::StudySummary {
            study_uid: meta.study_uid.clone(),
            patient_id: meta.patient_id.clone(),
            modalities: vec!["CT".into(), "MR".into(), "CT".into()],
            series_count: 2,
            instance_count: 5,
            ..Default::default()
        },
        "https://h/dicomweb",
    );
    assert_eq!(study["00080061"]["Value"], serde_json::json!(["CT", "MR"]));
    assert_eq!(study["00201208"]["Value"][0], 5);
    assert!(
        study.get("00100010").is_none(),
        "PatientName must never be returned"
    );
    assert_eq!(study["00080020"], serde_json::json!({ "vr": "DA" }));
    let series = clinflow_imaging::qido_series(
        &clinflow_imaging::SeriesSummary {
            study_uid: meta.study_uid.clone(),
            series_uid: meta.series_uid.clone(),
            modality: "CT".into(),
            series_number: Some(3),
            series_description: None,
            instance_count: 7,
        },
        "https://h/dicomweb",
    );
    assert_eq!(series["00200011"]["Value"][0], 3);
    assert_eq!(series["00201209"]["Value"][0], 7);
}
