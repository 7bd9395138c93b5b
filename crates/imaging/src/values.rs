//! Typed reads of single attributes, forgiving of bad values: an attribute that is
//! absent, empty or does not convert reads as `None`.
//!
//! Elements some tools rewrite with VR UN (the raw bytes of an explicit VR little endian
//! value) are read through the data dictionary's VR, as pydicom does.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{DicomValue, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_object::InMemDicomObject;

fn trim_padding(s: &str) -> &str {
    s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
}

/// The raw bytes of a UN element, when that is what `tag` holds.
fn un_bytes(obj: &InMemDicomObject, tag: Tag) -> Option<&[u8]> {
    let element = obj.get(tag)?;
    match (element.vr(), element.value()) {
        (VR::UN, DicomValue::Primitive(PrimitiveValue::U8(bytes))) => Some(bytes),
        _ => None,
    }
}

fn dictionary_vr(tag: Tag) -> Option<VR> {
    match StandardDataDictionary.by_tag(tag)?.vr() {
        VirtualVr::Exact(vr) => Some(vr),
        VirtualVr::Xs => Some(VR::US),
        _ => None,
    }
}

/// All values as strings (untrimmed).
fn strings(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<String>> {
    if let Some(bytes) = un_bytes(obj, tag) {
        let text = String::from_utf8_lossy(bytes);
        return Some(text.split('\\').map(str::to_string).collect());
    }
    let values = obj.get(tag)?.value().to_multi_str().ok()?;
    Some(values.into_owned())
}

/// The whole value as text (multiple values joined by `\`), trimmed; `None` when empty.
pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let joined = strings(obj, tag)?.join("\\");
    let value = trim_padding(&joined);
    (!value.is_empty()).then(|| value.to_string())
}

/// The first value as text, trimmed; `None` when empty.
pub(crate) fn first(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let values = strings(obj, tag)?;
    let value = trim_padding(values.first()?);
    (!value.is_empty()).then(|| value.to_string())
}

/// The first value as an integer (IS strings or binary integers).
pub(crate) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    if let Some(bytes) = un_bytes(obj, tag) {
        let le = |n: usize| bytes.get(..n);
        return match dictionary_vr(tag)? {
            VR::US => le(2).map(|b| i64::from(u16::from_le_bytes([b[0], b[1]]))),
            VR::SS => le(2).map(|b| i64::from(i16::from_le_bytes([b[0], b[1]]))),
            VR::UL => le(4).map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            VR::SL => le(4).map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            _ => first(obj, tag)?.parse().ok(),
        };
    }
    let element = obj.get(tag)?;
    match element.vr() {
        VR::IS | VR::DS | VR::LO | VR::SH | VR::CS => first(obj, tag)?.parse().ok(),
        _ => element.value().to_int::<i64>().ok(),
    }
}

/// All values as finite floats.
fn all_floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let values = if un_bytes(obj, tag).is_some() {
        strings(obj, tag)?
            .iter()
            .map(|s| trim_padding(s).parse::<f64>().ok())
            .collect::<Option<Vec<f64>>>()?
    } else {
        obj.get(tag)?.value().to_multi_float64().ok()?
    };
    values.iter().all(|v| v.is_finite()).then_some(values)
}

/// All values as finite floats; `None` unless there are exactly `N` of them.
pub(crate) fn floats<const N: usize>(obj: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    all_floats(obj, tag)?.try_into().ok()
}

/// The first value as a finite float.
pub(crate) fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    all_floats(obj, tag)?.first().copied()
}
