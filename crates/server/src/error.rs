//! The two error shapes clients see.
//!
//! - Under `/fhir`: an `OperationOutcome` ([`FhirError`]).
//! - Everywhere else: `application/problem+json` (RFC 9457, [`ApiError`]).
//!
//! Internal causes are logged with their chain and never sent to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clinflow_fhir::{IssueCode, OperationOutcome};

/// An error of clinflow's own JSON API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication is required: send Authorization: Bearer TOKEN")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    /// An `If-Match` that no longer holds: 412.
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No representation the `Accept` header allows: 406.
    #[error("{0}")]
    NotAcceptable(String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the server is busy; retry after {0} s")]
    Unavailable(u64),
    /// A queue is full (the ingest pipeline): 429 with `Retry-After`.
    #[error("too many requests; retry after {0} s")]
    TooManyRequests(u64),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn log(&self) {
        if let ApiError::Internal(e) = self {
            tracing::error!(error = %format!("{e:#}"), "request failed");
        }
    }

    /// Extra headers the error needs.
    fn decorate(&self, resp: &mut Response) {
        match self {
            ApiError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable(secs) | ApiError::TooManyRequests(secs) => {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut resp = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body.to_string(),
        )
            .into_response();
        self.decorate(&mut resp);
        resp
    }
}

/// An error of the FHIR API, rendered as an `OperationOutcome`.
#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub outcome: OperationOutcome,
    /// Kept for headers (`WWW-Authenticate`, `Retry-After`) and logging.
    source: Option<ApiError>,
}

impl FhirError {
    pub fn new(status: StatusCode, outcome: OperationOutcome) -> FhirError {
        FhirError {
            status,
            outcome,
            source: None,
        }
    }

    pub fn of(status: StatusCode, code: IssueCode, msg: impl Into<String>) -> FhirError {
        FhirError::new(status, OperationOutcome::error(code, msg))
    }

    pub fn not_found(rtype: &str, id: &str) -> FhirError {
        FhirError::of(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            format!("{rtype}/{id} is not known"),
        )
    }

    pub fn bad_request(msg: impl Into<String>) -> FhirError {
        FhirError::of(StatusCode::BAD_REQUEST, IssueCode::Invalid, msg)
    }

    pub fn forbidden(msg: impl Into<String>) -> FhirError {
        FhirError::of(StatusCode::FORBIDDEN, IssueCode::Forbidden, msg)
    }

    pub fn internal(e: anyhow::Error) -> FhirError {
        ApiError::Internal(e).into()
    }
}

impl From<ApiError> for FhirError {
    fn from(e: ApiError) -> FhirError {
        let code = match &e {
            ApiError::Unauthorized => IssueCode::Login,
            ApiError::Forbidden(_) => IssueCode::Forbidden,
            ApiError::NotFound(_) => IssueCode::NotFound,
            ApiError::BadRequest(_) => IssueCode::Invalid,
            ApiError::Conflict(_) | ApiError::PreconditionFailed(_) => IssueCode::Conflict,
            ApiError::Unprocessable(_) => IssueCode::Processing,
            ApiError::UnsupportedMediaType(_) | ApiError::NotAcceptable(_) => {
                IssueCode::NotSupported
            }
            ApiError::PayloadTooLarge(_) => IssueCode::TooCostly,
            ApiError::Unavailable(_) | ApiError::TooManyRequests(_) => IssueCode::Throttled,
            ApiError::Internal(_) => IssueCode::Exception,
        };
        FhirError {
            status: e.status(),
            outcome: OperationOutcome::error(code, e.to_string()),
            source: Some(e),
        }
    }
}

impl From<anyhow::Error> for FhirError {
    fn from(e: anyhow::Error) -> FhirError {
        ApiError::Internal(e).into()
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        if let Some(s) = &self.source {
            s.log();
        }
        let mut resp = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::fhir::FHIR_JSON),
            )],
            self.outcome.to_json_string(),
        )
            .into_response();
        if let Some(s) = &self.source {
            s.decorate(&mut resp);
        }
        resp
    }
}
