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
