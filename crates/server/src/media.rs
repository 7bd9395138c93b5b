//! The request's media type, as every body-taking endpoint reads it.

use axum::http::{header, HeaderMap};

/// The `Content-Type` without parameters, trimmed and lower case (`""` when
/// absent or not text).
pub(crate) fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}
