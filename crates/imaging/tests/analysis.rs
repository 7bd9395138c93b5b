//! Analysing pydicom's sample images: every metric finite, a valid PNG,
//! lossless encodings of one image analysing alike, series geometry from a
//! series the test builds, and no panic on corrupt input.

mod common;

use clinflow_imaging::{
    diagnostic_report, parse_part10, report_id, AnalysisError, SeriesAnalyser, SeriesAnalysis,
};
use proptest::prelude::*;

fn analyse(files: &[Vec<u8>]) -> Result<SeriesAnalysis, AnalysisError> {
    let first = parse_part10(&files[0]).expect("a sample parses");
    let mut a = SeriesAnalyser::new(&first.meta.series_uid);
    a.expect_instances(files.len());
    for f in files {
        a.add(&parse_part10(f).expect("a sample parses"))?;
    }
    a.finish()
}

fn png_size(png: &[u8]) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    (info.width, info.height)
}

#[test]
fn ct_and_mr_samples_give_finite_metrics_and_a_thumbnail() {
    for name in ["CT_small.dcm", "MR_small.dcm"] {
        let a = analyse(&[common::sample(name)]).unwrap_or_else(|e| panic!("{name}: {e}"));
        for v in [a.mean, a.std_dev, a.window_center, a.window_width] {
            assert!(v.is_finite(), "{name}: {a:?}");
        }
        assert!(a.window_width > 0.0);
        assert!(a.histogram.min <= a.window_center && a.window_center <= a.histogram.max);
        let noise = a.noise.expect("CT and MR have a noise estimate");
        assert!(noise.is_finite() && noise > 0.0, "{name}: noise {noise}");
        assert!(a.snr.is_some_and(f64::is_finite));
        let meta = parse_part10(&common::sample(name)).unwrap().meta;
        let (w, h) = png_size(&a.thumbnail_png);
        assert!(w <= 128 && h <= 128);
        let (cols, rows) = (meta.columns.unwrap(), meta.rows.unwrap());
        assert_eq!(w.max(h), cols.max(rows).min(128));
        assert_eq!(
            a.histogram.bins.iter().sum::<u64>(),
            u64::from(rows * cols),
            "every pixel is counted once"
        );
    }
}

#[test]
fn lossless_encodings_of_one_image_analyse_alike() {
    let plain = analyse(&[common::sample("MR_small.dcm")]).unwrap();
    for name in [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ] {
        let a = analyse(&[common::sample(name)]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.histogram, plain.histogram, "{name}");
        assert_eq!(a.noise, plain.noise, "{name}");
    }
}

#[test]
fn jpeg_ls_is_refused_as_an_unsupported_transfer_syntax() {
    let e = analyse(&[common::sample("MR_small_jpeg_ls_lossless.dcm")]).unwrap_err();
    assert_eq!(e.kind, AnalysisError::UNSUPPORTED_TRANSFER_SYNTAX);
}

#[test]
fn a_series_without_pixels_is_an_error() {
    let e = analyse(&[common::sample("rtplan.dcm")]).unwrap_err();
    assert_eq!(e.kind, AnalysisError::NO_PIXELS);
}

/// A series of CT_small copies with instance numbers 1, 2, 3, 5 and positions
/// 5 mm apart, written with pydicom.
#[test]
fn series_geometry_finds_spacing_and_missing_instances() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, pydicom
from pydicom.uid import generate_uid
src, out = sys.argv[1], sys.argv[2]
series = generate_uid()
for n in (1, 2, 3, 5):
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = n
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 5.0 * n]
    ds.save_as(f"{out}/{n}.dcm")
print("{}")
"#;
    let src = common::samples_dir().join("CT_small.dcm");
    common::pydicom_json(script, &[&src, dir.path()]);
    let files: Vec<Vec<u8>> = [1, 2, 3, 5]
        .iter()
        .map(|n| std::fs::read(dir.path().join(format!("{n}.dcm"))).unwrap())
        .collect();
    let a = analyse(&files).unwrap();
    assert_eq!(a.instances, 4);
    assert_eq!(a.missing_instances, vec![4]);
    assert_eq!(a.slice_spacing, Some(5.0));
    assert!(
        !a.spacing_consistent,
        "5 mm and 10 mm gaps are not consistent"
    );
    let (report, observations) = diagnostic_report(
        &a,
        Some("Patient/p"),
        "ImagingStudy/s",
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(report["id"], report_id(&a.series_uid));
    let again = diagnostic_report(
        &a,
        Some("Patient/p"),
        "ImagingStudy/s",
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(again.0, report);
    assert_eq!(
        report["result"].as_array().unwrap().len(),
        observations.len()
    );
    assert!(observations
        .iter()
        .any(|o| o["code"]["coding"][0]["code"] == "slice-spacing"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Bit flips and truncations of CT_small never panic, in parsing or analysis.
    #[test]
    fn corrupt_ct_small_never_panics(flips in proptest::collection::vec((0usize..40_000, any::<u8>()), 1..8), cut in 0usize..40_000) {
        let mut bytes = common::sample("CT_small.dcm");
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] ^= v;
        }
        bytes.truncate(cut.max(1).min(bytes.len()));
        if let Ok(inst) = parse_part10(&bytes) {
            let mut a = SeriesAnalyser::new(&inst.meta.series_uid);
            let _ = a.add(&inst);
            let _ = a.finish();
        }
    }
}
