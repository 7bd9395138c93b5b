//! DICOM JSON (PS3.18 F.2): the whole dataset for WADO-RS metadata, and the QIDO-RS
//! result objects built from the archive's index.
//!
//! Bulk data: pixel data (always) and any other binary value longer than
//! [`BULK_THRESHOLD`] bytes is not inlined. With a `bulk_base` it becomes a
//! `"BulkDataURI"` of `{bulk_base}/{path}`, where `path` is the tag (`7FE00010`), or for
//! an element inside sequences the tags and 0-based item indices leading to it
//! (`00540016/0/00181074`). [`Instance::bulk_data`] resolves such a path.

use crate::base64;
use crate::parse::{Instance, InstanceMeta};
use dicom_core::value::DataSetSequence;
use dicom_core::{DicomValue, PrimitiveValue, Tag, VR};
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use serde_json::{json, Map, Number, Value};

/// Binary values longer than this (bytes) are bulk data.
pub const BULK_THRESHOLD: usize = 1024;

impl Instance {
    /// The dataset as DICOM JSON; see the module docs for bulk data. Group length
    /// elements (gggg,0000) are left out, as PS3.18 F.2 asks.
    pub fn dicom_json(&self, bulk_base: Option<&str>) -> Value {
        let base = bulk_base.map(|b| b.trim_end_matches('/'));
        Value::Object(dataset_json(&self.object, "", base))
    }

    /// The bytes of the bulk data element at `path` (as in a `BulkDataURI`, relative to
    /// its base): a binary value as encoded little endian, or for encapsulated pixel
    /// data its fragments concatenated. `None` when the path names nothing binary.
    pub fn bulk_data(&self, path: &str) -> Option<Vec<u8>> {
        let mut object: &InMemDicomObject = &self.object;
        let mut parts = path.trim_matches('/').split('/');
        loop {
            let tag = parse_tag(parts.next()?)?;
            let element = object.get(tag)?;
            match element.value() {
                DicomValue::Sequence(seq) => {
                    let index: usize = parts.next()?.parse().ok()?;
                    object = seq.items().get(index)?;
                }
                DicomValue::PixelSequence(px) => {
                    return parts.next().is_none().then(|| px.fragments().concat());
                }
                DicomValue::Primitive(value) => {
                    return (parts.next().is_none() && is_binary(element.vr()))
                        .then(|| value.to_bytes().into_owned());
                }
            }
        }
    }
}

fn parse_tag(s: &str) -> Option<Tag> {
    if s.len() != 8 {
        return None;
    }
    let group = u16::from_str_radix(&s[..4], 16).ok()?;
    let element = u16::from_str_radix(&s[4..], 16).ok()?;
    Some(Tag(group, element))
}

fn tag_key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.0, tag.1)
}

fn is_binary(vr: VR) -> bool {
    matches!(
        vr,
        VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN
    )
}

fn is_pixel_data(tag: Tag) -> bool {
    tag == Tag(0x7FE0, 0x0010) || tag == Tag(0x7FE0, 0x0008) || tag == Tag(0x7FE0, 0x0009)
}

fn dataset_json(
    object: &InMemDicomObject,
    path: &str,
    bulk_base: Option<&str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for element in object.iter() {
        let tag = element.header().tag;
        if tag.1 == 0x0000 {
            continue;
        }
        let key = tag_key(tag);
        let element_path = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}/{key}")
        };
        out.insert(key, element_json(element, &element_path, bulk_base));
    }
    out
}

fn element_json(element: &InMemElement, path: &str, bulk_base: Option<&str>) -> Value {
    let tag = element.header().tag;
    let vr = element.vr();
    let mut out = Map::new();
    out.insert("vr".into(), Value::String(vr.to_string().to_string()));
    let bulk = |out: &mut Map<String, Value>| {
        if let Some(base) = bulk_base {
            out.insert(
                "BulkDataURI".into(),
                Value::String(format!("{base}/{path}")),
            );
        }
    };
    match element.value() {
        DicomValue::Sequence(seq) => {
            out.insert(
                "Value".into(),
                Value::Array(items_json(seq, path, bulk_base)),
            );
        }
        DicomValue::PixelSequence(_) => bulk(&mut out),
        DicomValue::Primitive(PrimitiveValue::Empty) => {}
        DicomValue::Primitive(value) if is_binary(vr) => {
            let bytes = value.to_bytes();
            if is_pixel_data(tag) || bytes.len() > BULK_THRESHOLD {
                bulk(&mut out);
            } else if !bytes.is_empty() {
                out.insert("InlineBinary".into(), Value::String(base64::encode(&bytes)));
            }
        }
        DicomValue::Primitive(value) => {
            let values = primitive_json(vr, value);
            if values.iter().any(|v| !v.is_null()) {
                out.insert("Value".into(), Value::Array(values));
            }
        }
    }
    Value::Object(out)
}

fn items_json(
    seq: &DataSetSequence<InMemDicomObject>,
    path: &str,
    bulk_base: Option<&str>,
) -> Vec<Value> {
    seq.items()
        .iter()
        .enumerate()
        .map(|(i, item)| Value::Object(dataset_json(item, &format!("{path}/{i}"), bulk_base)))
        .collect()
}

fn float_json(v: f64) -> Value {
    Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// The `Value` array of a non-binary primitive, with `null` for empty values.
fn primitive_json(vr: VR, value: &PrimitiveValue) -> Vec<Value> {
    let trimmed = |s: &str| s.trim_matches(|c: char| c == '\0' || c == ' ').to_string();
    let strings = || value.to_multi_str().into_owned();
    match vr {
        VR::AT => match value {
            PrimitiveValue::Tags(tags) => tags.iter().map(|t| Value::String(tag_key(*t))).collect(),
            _ => strings()
                .iter()
                .map(|s| Value::String(trimmed(s)))
                .collect(),
        },
        VR::PN => strings()
            .iter()
            .map(|s| {
                let s = trimmed(s);
                if s.is_empty() {
                    return Value::Null;
                }
                let mut name = Map::new();
                for (group, key) in s.split('=').zip(["Alphabetic", "Ideographic", "Phonetic"]) {
                    if !group.is_empty() {
                        name.insert(key.into(), Value::String(group.to_string()));
                    }
                }
                Value::Object(name)
            })
            .collect(),
        VR::IS | VR::DS => strings()
            .iter()
            .map(|s| {
                let s = trimmed(s);
                if s.is_empty() {
                    Value::Null
                } else if let Ok(i) = s.parse::<i64>() {
                    Value::Number(i.into())
                } else if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
                    Value::Number(n)
                } else {
                    // Not a number after all: keep the text rather than lose it.
                    Value::String(s)
                }
            })
            .collect(),
        VR::FL | VR::FD => value
            .to_multi_float64()
            .map(|vs| vs.into_iter().map(float_json).collect())
            .unwrap_or_default(),
        VR::US | VR::SS | VR::UL | VR::SL | VR::SV => value
            .to_multi_int::<i64>()
            .map(|vs| vs.into_iter().map(|v| Value::Number(v.into())).collect())
            .unwrap_or_default(),
        VR::UV => value
            .to_multi_int::<u64>()
            .map(|vs| vs.into_iter().map(|v| Value::Number(v.into())).collect())
            .unwrap_or_default(),
        // Text VRs: AE AS CS DA DT LO LT SH ST TM UC UI UR UT.
        _ => strings()
            .iter()
            .map(|s| {
                let s = trimmed(s);
                if s.is_empty() {
                    Value::Null
                } else {
                    Value::String(s)
                }
            })
            .collect(),
    }
}

/// A study as the archive's index knows it, for a QIDO-RS study result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StudySummary {
    /// Study Instance UID.
    pub study_uid: String,
    /// Study Date, YYYYMMDD.
    pub study_date: Option<String>,
    /// Study Time.
    pub study_time: Option<String>,
    /// Accession Number.
    pub accession: Option<String>,
    /// Patient ID.
    pub patient_id: String,
    /// Study Description.
    pub study_description: Option<String>,
    /// Modalities of the study's series (deduplicated and sorted on output).
    pub modalities: Vec<String>,
    /// Number of series in the study.
    pub series_count: u32,
    /// Number of instances in the study.
    pub instance_count: u32,
}

/// A series as the archive's index knows it, for a QIDO-RS series result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeriesSummary {
    /// Study Instance UID of the series' study.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Modality.
    pub modality: String,
    /// Series Number.
    pub series_number: Option<i64>,
    /// Series Description.
    pub series_description: Option<String>,
    /// Number of instances in the series.
    pub instance_count: u32,
}

/// One attribute: `{"vr": vr, "Value": [value]}`, or just the VR when unknown (PS3.18
/// asks for required return keys to be present even when empty).
fn attr(vr: &str, value: Option<Value>) -> Value {
    match value {
        Some(v) => json!({ "vr": vr, "Value": [v] }),
        None => json!({ "vr": vr }),
    }
}

fn text(s: &Option<String>) -> Option<Value> {
    s.as_ref().map(|s| Value::String(s.clone()))
}

fn uid(s: &str) -> Option<Value> {
    (!s.is_empty()).then(|| Value::String(s.to_string()))
}

fn study_url(base_url: &str, study_uid: &str) -> String {
    format!("{}/studies/{study_uid}", base_url.trim_end_matches('/'))
}

/// The QIDO-RS study-level result object for `s`; RetrieveURL under `base_url` (the
/// DICOMweb root, e.g. `https://host/dicomweb`). PatientName is never returned: the
/// archive keeps only the PatientID.
pub fn qido_study(s: &StudySummary, base_url: &str) -> Value {
    let mut modalities: Vec<&str> = s.modalities.iter().map(String::as_str).collect();
    modalities.sort_unstable();
    modalities.dedup();
    let modalities = if modalities.is_empty() {
        json!({ "vr": "CS" })
    } else {
        json!({ "vr": "CS", "Value": modalities })
    };
    json!({
        "0020000D": attr("UI", uid(&s.study_uid)),
        "00080020": attr("DA", text(&s.study_date)),
        "00080030": attr("TM", text(&s.study_time)),
        "00080050": attr("SH", text(&s.accession)),
        "00100020": attr("LO", uid(&s.patient_id)),
        "00081030": attr("LO", text(&s.study_description)),
        "00080061": modalities,
        "00201206": attr("IS", Some(s.series_count.into())),
        "00201208": attr("IS", Some(s.instance_count.into())),
        "00081190": attr("UR", Some(study_url(base_url, &s.study_uid).into())),
    })
}

/// The QIDO-RS series-level result object for `s` (with its Study Instance UID too, so
/// it stands alone in a study-wide series search).
pub fn qido_series(s: &SeriesSummary, base_url: &str) -> Value {
    let url = format!(
        "{}/series/{}",
        study_url(base_url, &s.study_uid),
        s.series_uid
    );
    json!({
        "0020000D": attr("UI", uid(&s.study_uid)),
        "0020000E": attr("UI", uid(&s.series_uid)),
        "00080060": attr("CS", uid(&s.modality)),
        "00200011": attr("IS", s.series_number.map(Value::from)),
        "0008103E": attr("LO", text(&s.series_description)),
        "00201209": attr("IS", Some(s.instance_count.into())),
        "00081190": attr("UR", Some(url.into())),
    })
}

/// The QIDO-RS instance-level result object for one instance (with its Study and
/// Series Instance UIDs too).
pub fn qido_instance(meta: &InstanceMeta, base_url: &str) -> Value {
    let url = format!(
        "{}/series/{}/instances/{}",
        study_url(base_url, &meta.study_uid),
        meta.series_uid,
        meta.sop_instance_uid
    );
    json!({
        "0020000D": attr("UI", uid(&meta.study_uid)),
        "0020000E": attr("UI", uid(&meta.series_uid)),
        "00080016": attr("UI", uid(&meta.sop_class_uid)),
        "00080018": attr("UI", uid(&meta.sop_instance_uid)),
        "00200013": attr("IS", meta.instance_number.map(Value::from)),
        "00280010": attr("US", meta.rows.map(Value::from)),
        "00280011": attr("US", meta.columns.map(Value::from)),
        "00081190": attr("UR", Some(url.into())),
    })
}
