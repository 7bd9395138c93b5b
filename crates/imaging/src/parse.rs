//! Bytes to [`Instance`]: Part 10 files (STOW-RS, uploads) and bare datasets (C-STORE),
//! with the index fields every instance must have ([`InstanceMeta`]), and back to Part 10.
//!
//! Invariant: parsing is total. Any input yields `Ok` or a [`ParseError`]; the structure
//! is walked first ([`crate::scan`]) so dicom-rs never allocates from an unchecked
//! length, and dicom-rs itself runs under `catch_unwind`.

use crate::error::ParseError;
use crate::scan;
use crate::values::{first, float, floats, int, text};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Implementation Class UID written into file meta groups we build (a 2.25 UUID UID).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.302435960455627925474577218453151374157";
/// Implementation Version Name written into file meta groups we build.
pub const IMPLEMENTATION_VERSION_NAME: &str = "CLINFLOW_IMG_1";

/// Index fields of one instance: what the archive stores in its database and what
/// QIDO-RS, ImagingStudy and the analysis need without touching the pixels.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceMeta {
    /// SOP Class UID (0008,0016), or the file meta / command set's when the dataset lacks it.
    pub sop_class_uid: String,
    /// SOP Instance UID (0008,0018), or the file meta / command set's.
    pub sop_instance_uid: String,
    /// Study Instance UID (0020,000D); required.
    pub study_uid: String,
    /// Series Instance UID (0020,000E); required.
    pub series_uid: String,
    /// Patient ID (0010,0020); required and non-empty.
    pub patient_id: String,
    /// Study Date (0008,0020) when it is exactly 8 digits (YYYYMMDD).
    pub study_date: Option<String>,
    /// Study Time (0008,0030) when it looks like a DICOM TM (digits, `.`, `:`).
    pub study_time: Option<String>,
    /// Accession Number (0008,0050).
    pub accession: Option<String>,
    /// Modality (0008,0060), upper case; "OT" when absent.
    pub modality: String,
    /// Series Number (0020,0011).
    pub series_number: Option<i64>,
    /// Instance Number (0020,0013).
    pub instance_number: Option<i64>,
    /// Study Description (0008,1030).
    pub study_description: Option<String>,
    /// Series Description (0008,103E).
    pub series_description: Option<String>,
    /// Transfer syntax UID the dataset is encoded in.
    pub transfer_syntax: String,
    /// Rows (0028,0010).
    pub rows: Option<u32>,
    /// Columns (0028,0011).
    pub columns: Option<u32>,
    /// Number of Frames (0028,0008); 1 when absent or not a positive integer.
    pub frames: u32,
    /// Samples per Pixel (0028,0002); 1 when absent.
    pub samples_per_pixel: u32,
    /// Bits Allocated (0028,0100); 0 when absent.
    pub bits_allocated: u32,
    /// Whether the dataset has Pixel Data (or Float / Double Float Pixel Data).
    pub has_pixel_data: bool,
    /// Image Position (Patient) (0020,0032), mm.
    pub image_position: Option<[f64; 3]>,
    /// Image Orientation (Patient) (0020,0037): row then column direction cosines.
    pub image_orientation: Option<[f64; 6]>,
    /// Slice Location (0020,1041), mm.
    pub slice_location: Option<f64>,
    /// Pixel Spacing (0028,0030): row spacing, column spacing, mm.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Slice Thickness (0018,0050), mm.
    pub slice_thickness: Option<f64>,
    /// Body Part Examined (0018,0015).
    pub body_part: Option<String>,
}

/// Where an instance's bytes came from, so [`Instance::to_part10`] can give them back
/// unaltered.
enum Source {
    /// A whole Part 10 file, kept as received.
    Part10(Vec<u8>),
    /// A bare dataset as received over DIMSE, in `meta.transfer_syntax`.
    Dataset(Vec<u8>),
}

/// A parsed instance: the dataset in memory (with a file meta group) and its index
/// fields.
pub struct Instance {
    pub(crate) object: DefaultDicomObject,
    source: Source,
    /// The index fields, derived deterministically from the bytes.
    pub meta: InstanceMeta,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// Parses a Part 10 file: 128-byte preamble, "DICM", file meta group, dataset.
pub fn parse_part10(bytes: &[u8]) -> Result<Instance, ParseError> {
    let (start, ts) = scan::part10_layout(bytes)?;
    check_transfer_syntax(&ts)?;
    if let Some(encoding) = scan::encoding_of(&ts) {
        scan::check_dataset(&bytes[start..], start, encoding)?;
    }
    let object = guarded(|| {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(bytes)
    })?
    .map_err(|e| ParseError::new(format!("invalid DICOM file: {e}")))?;
    let file_meta = object.meta();
    let command = (
        trim_uid(file_meta.media_storage_sop_class_uid()),
        trim_uid(file_meta.media_storage_sop_instance_uid()),
    );
    // Files in the wild (and pydicom's samples) often disagree between the file meta
    // group and the dataset after editing tools; the dataset wins, as it is what any
    // later transfer carries.
    let meta = index_fields(&object, &ts, &command.0, &command.1, None)?;
    Ok(Instance {
        object,
        source: Source::Part10(bytes.to_vec()),
        meta,
    })
}

/// Parses a bare dataset as a C-STORE request carries it, in `transfer_syntax`, with the
/// SOP Class and Instance UIDs of the command set. When the dataset has its own SOP
/// Class / Instance UID they must equal the command set's.
pub fn parse_dataset(
    dataset: &[u8],
    transfer_syntax: &str,
    sop_class_uid: &str,
    sop_instance_uid: &str,
) -> Result<Instance, ParseError> {
    let ts = trim_uid(transfer_syntax);
    let (sop_class_uid, sop_instance_uid) = (trim_uid(sop_class_uid), trim_uid(sop_instance_uid));
    let registered = check_transfer_syntax(&ts)?;
    if let Some(encoding) = scan::encoding_of(&ts) {
        scan::check_dataset(dataset, 0, encoding)?;
    }
    let object = guarded(|| InMemDicomObject::read_dataset_with_ts(dataset, registered))?
        .map_err(|e| ParseError::new(format!("invalid DICOM dataset: {e}")))?;
    let file_meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid.as_str())
        .media_storage_sop_instance_uid(sop_instance_uid.as_str())
        .transfer_syntax(ts.as_str())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| ParseError::new(format!("cannot build a file meta group: {e}")))?;
    let object = object.with_exact_meta(file_meta);
    let meta = index_fields(
        &object,
        &ts,
        &sop_class_uid,
        &sop_instance_uid,
        Some("command set"),
    )?;
    Ok(Instance {
        object,
        source: Source::Dataset(dataset.to_vec()),
        meta,
    })
}

impl Instance {
    /// The instance as a Part 10 file. A parsed Part 10 file comes back byte for byte;
    /// a dataset from [`parse_dataset`] comes back as received behind a new file meta
    /// group ([`part10_from_dataset`]), so nothing in it is re-encoded.
    pub fn to_part10(&self) -> Result<Vec<u8>, ParseError> {
        Ok(match &self.source {
            Source::Part10(bytes) => bytes.clone(),
            Source::Dataset(bytes) => part10_from_dataset(
                bytes,
                &self.meta.transfer_syntax,
                &self.meta.sop_class_uid,
                &self.meta.sop_instance_uid,
            ),
        })
    }

    /// The encoded dataset without preamble or file meta group, as a DIMSE C-STORE
    /// would send it in [`InstanceMeta::transfer_syntax`].
    pub fn dataset_bytes(&self) -> &[u8] {
        match &self.source {
            Source::Dataset(bytes) => bytes,
            // The layout was computed when this file was parsed, so it is valid here.
            Source::Part10(bytes) => scan::part10_layout(bytes)
                .ok()
                .and_then(|(start, _)| bytes.get(start..))
                .unwrap_or_default(),
        }
    }
}

/// A Part 10 file made of a new file meta group (explicit VR little endian, as PS3.10
/// requires) and `dataset` exactly as given.
pub fn part10_from_dataset(
    dataset: &[u8],
    transfer_syntax: &str,
    sop_class_uid: &str,
    sop_instance_uid: &str,
) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    push_meta_element(&mut group, 0x0001, b"OB", &[0, 1]);
    push_meta_element(&mut group, 0x0002, b"UI", &uid_value(sop_class_uid));
    push_meta_element(&mut group, 0x0003, b"UI", &uid_value(sop_instance_uid));
    push_meta_element(&mut group, 0x0010, b"UI", &uid_value(transfer_syntax));
    push_meta_element(
        &mut group,
        0x0012,
        b"UI",
        &uid_value(IMPLEMENTATION_CLASS_UID),
    );
    let mut version = IMPLEMENTATION_VERSION_NAME.as_bytes().to_vec();
    if version.len() % 2 == 1 {
        version.push(b' ');
    }
    push_meta_element(&mut group, 0x0013, b"SH", &version);

    let mut out = Vec::with_capacity(132 + 12 + group.len() + dataset.len());
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    // The group is a few hundred bytes, so its length fits a u32.
    push_meta_element(&mut out, 0x0000, b"UL", &(group.len() as u32).to_le_bytes());
    out.extend(group);
    out.extend_from_slice(dataset);
    out
}

fn push_meta_element(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        // UIDs are at most 64 characters and the version name 16.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(value);
}

/// A UI value: the UID trimmed, truncated to 64 characters, NUL-padded to even length.
fn uid_value(uid: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = trim_uid(uid).bytes().take(64).collect();
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    bytes
}

fn trim_uid(uid: &str) -> String {
    uid.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

fn check_transfer_syntax(ts: &str) -> Result<&'static dicom_encoding::TransferSyntax, ParseError> {
    TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| ParseError::new(format!("unknown transfer syntax {ts:?}")))
}

/// Runs dicom-rs code, turning a panic into a [`ParseError`].
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, ParseError> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| ParseError::new("the DICOM parser failed on malformed input"))
}

/// The index fields. The SOP UIDs fall back to the file meta group's or command set's
/// (`outer_*`); when `outer_name` is given they must also match it.
fn index_fields(
    object: &DefaultDicomObject,
    ts: &str,
    outer_class: &str,
    outer_instance: &str,
    outer_name: Option<&str>,
) -> Result<InstanceMeta, ParseError> {
    let ds: &InMemDicomObject = object;
    let sop_class_uid = matching_uid(
        ds,
        tags::SOP_CLASS_UID,
        "SOPClassUID (0008,0016)",
        outer_class,
        outer_name,
    )?;
    let sop_instance_uid = matching_uid(
        ds,
        tags::SOP_INSTANCE_UID,
        "SOPInstanceUID (0008,0018)",
        outer_instance,
        outer_name,
    )?;
    let required = |tag, name: &str| {
        first(ds, tag).ok_or_else(|| ParseError::new(format!("{name} is missing")))
    };
    let study_uid = required(tags::STUDY_INSTANCE_UID, "StudyInstanceUID (0020,000D)")?;
    let series_uid = required(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID (0020,000E)")?;
    let patient_id = required(tags::PATIENT_ID, "PatientID (0010,0020)")?;

    let study_date = text(ds, tags::STUDY_DATE)
        .filter(|d| d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()));
    let study_time = text(ds, tags::STUDY_TIME).filter(|t| {
        t.len() >= 2
            && t.len() <= 16
            && t.bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b':')
            && t.bytes().take(2).all(|b| b.is_ascii_digit())
    });
    let unsigned = |tag| int(ds, tag).and_then(|v| u32::try_from(v).ok());
    Ok(InstanceMeta {
        sop_class_uid,
        sop_instance_uid,
        study_uid,
        series_uid,
        patient_id,
        study_date,
        study_time,
        accession: text(ds, tags::ACCESSION_NUMBER),
        modality: first(ds, tags::MODALITY)
            .map(|m| m.to_ascii_uppercase())
            .unwrap_or_else(|| "OT".to_string()),
        series_number: int(ds, tags::SERIES_NUMBER),
        instance_number: int(ds, tags::INSTANCE_NUMBER),
        study_description: text(ds, tags::STUDY_DESCRIPTION),
        series_description: text(ds, tags::SERIES_DESCRIPTION),
        transfer_syntax: ts.to_string(),
        rows: unsigned(tags::ROWS),
        columns: unsigned(tags::COLUMNS),
        frames: unsigned(tags::NUMBER_OF_FRAMES)
            .filter(|&n| n > 0)
            .unwrap_or(1),
        samples_per_pixel: unsigned(tags::SAMPLES_PER_PIXEL).unwrap_or(1),
        bits_allocated: unsigned(tags::BITS_ALLOCATED).unwrap_or(0),
        has_pixel_data: ds.get(tags::PIXEL_DATA).is_some()
            || ds.get(tags::FLOAT_PIXEL_DATA).is_some()
            || ds.get(tags::DOUBLE_FLOAT_PIXEL_DATA).is_some(),
        image_position: floats::<3>(ds, tags::IMAGE_POSITION_PATIENT),
        image_orientation: floats::<6>(ds, tags::IMAGE_ORIENTATION_PATIENT),
        slice_location: float(ds, tags::SLICE_LOCATION),
        pixel_spacing: floats::<2>(ds, tags::PIXEL_SPACING),
        slice_thickness: float(ds, tags::SLICE_THICKNESS),
        body_part: text(ds, tags::BODY_PART_EXAMINED),
    })
}

/// The dataset's UID at `tag`, which must equal `outer` when both are present and
/// `outer_name` is given; the outer one stands in when the dataset lacks it.
fn matching_uid(
    ds: &InMemDicomObject,
    tag: dicom_core::Tag,
    name: &str,
    outer: &str,
    outer_name: Option<&str>,
) -> Result<String, ParseError> {
    match (first(ds, tag), outer_name) {
        (Some(own), Some(outer_name)) if !outer.is_empty() && own != outer => Err(ParseError::new(
            format!("{name} does not match the {outer_name}"),
        )),
        (Some(own), _) => Ok(own),
        (None, _) if !outer.is_empty() => Ok(outer.to_string()),
        (None, _) => Err(ParseError::new(format!("{name} is missing"))),
    }
}
