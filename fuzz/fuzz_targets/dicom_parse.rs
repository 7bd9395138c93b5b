//! Fuzzes DICOM parsing and everything downstream of it: any bytes, as a Part 10 file
//! or as a bare dataset in each common transfer syntax, must give an instance or a
//! ParseError (never a panic or an abort); a parsed instance must render as DICOM JSON,
//! round-trip through Part 10 and analyse or fail with an AnalysisError.
#![no_main]

use clinflow_imaging::{parse_dataset, parse_part10, Instance, SeriesAnalyser};
use libfuzzer_sys::fuzz_target;

const TRANSFER_SYNTAXES: [&str; 5] = [
    "1.2.840.10008.1.2",      // implicit VR little endian
    "1.2.840.10008.1.2.1",    // explicit VR little endian
    "1.2.840.10008.1.2.2",    // explicit VR big endian
    "1.2.840.10008.1.2.5",    // RLE
    "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
];

fn exercise(instance: &Instance) {
    let _ = instance.dicom_json(Some("http://x/bulk"));
    let part10 = instance.to_part10().expect("to_part10 is infallible here");
    let again = parse_part10(&part10).expect("our own Part 10 output parses");
    assert_eq!(again.meta, instance.meta, "Part 10 round trip keeps the index fields");
    let _ = clinflow_imaging::decoded_bytes_estimate(&instance.meta);
    let mut analyser = SeriesAnalyser::new(&instance.meta.series_uid);
    if analyser.add(instance).is_ok() {
        if let Ok(a) = analyser.finish() {
            let _ = clinflow_imaging::diagnostic_report(&a, None, "ImagingStudy/x", "2026-01-01T00:00:00Z");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(instance) = parse_part10(data) {
        exercise(&instance);
    }
    let Some((&selector, dataset)) = data.split_first() else {
        return;
    };
    let ts = TRANSFER_SYNTAXES[usize::from(selector) % TRANSFER_SYNTAXES.len()];
    if let Ok(instance) = parse_dataset(dataset, ts, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4") {
        exercise(&instance);
    }
});
