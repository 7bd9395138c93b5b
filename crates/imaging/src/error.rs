//! The crate's two error types: one for parsing bytes into an instance, one for pixel
//! analysis.

/// Why bytes are not an acceptable DICOM instance.
///
/// `reason` is safe to log and to return to the sender: it names tags and lengths, never
/// values (so no patient data).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}{}", offset.map(|o| format!(" (at byte {o})")).unwrap_or_default())]
pub struct ParseError {
    /// What is wrong, as a sentence fragment.
    pub reason: String,
    /// Byte offset in the input where the problem was found, when known.
    pub offset: Option<u64>,
}

impl ParseError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        ParseError {
            reason: reason.into(),
            offset: None,
        }
    }

    pub(crate) fn at(reason: impl Into<String>, offset: usize) -> Self {
        ParseError {
            reason: reason.into(),
            offset: Some(offset as u64),
        }
    }
}

/// Why a series (or one of its instances) could not be analysed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct AnalysisError {
    /// What went wrong, safe to log (no pixel or patient values).
    pub reason: String,
    /// Short machine tag for metrics: one of the `AnalysisError::*` kind constants.
    pub kind: &'static str,
}

impl AnalysisError {
    /// The pixel data could not be decoded (corrupt codestream, short data, decoder panic).
    pub const DECODE: &'static str = "decode";
    /// The transfer syntax has no decoder in this build (e.g. JPEG-LS, JPEG XL).
    pub const UNSUPPORTED_TRANSFER_SYNTAX: &'static str = "unsupported_transfer_syntax";
    /// The pixel layout is valid DICOM but not handled (e.g. 1-bit, 64-bit samples).
    pub const UNSUPPORTED_PIXELS: &'static str = "unsupported_pixels";
    /// The declared image is larger than the decoder is allowed to allocate.
    pub const TOO_LARGE: &'static str = "too_large";
    /// The series has no instance with pixel data.
    pub const NO_PIXELS: &'static str = "no_pixels";
    /// The instance does not belong with the others (series UID, modality, colour).
    pub const INCONSISTENT: &'static str = "inconsistent";

    pub(crate) fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        AnalysisError {
            reason: reason.into(),
            kind,
        }
    }
}
