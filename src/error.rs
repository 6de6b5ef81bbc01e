//! One error type for the HTTP API, rendered as RFC 9457 `application/problem+json`.
//!
//! The errors of the layers: [`StoreError`] is what a store reports, [`ApiError`] what a client
//! sees. Handlers return [`ApiError`]; stores and the engine return their own errors, converted
//! here (`From`), so nothing below the handlers decides a status. Internal
//! failures are logged with their whole cause chain and answered with a generic body, so no
//! internals leak.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub use crate::validate::{FieldError, Invalid};

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What a store reports: a failed query, or one of the few outcomes its callers must tell
/// apart. It says what happened, not which HTTP status that is: the edge maps it
/// (`impl From<StoreError> for ApiError` below).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The input is invalid against what is stored (an unknown agent, a duplicate phone).
    #[error("{0}")]
    Invalid(#[from] crate::validate::Invalid),
    /// What the operation names does not exist (for this tenant); the text says what.
    #[error("{0}")]
    NotFound(String),
    /// The operation contradicts the current state (a second rating, a taken slug).
    #[error("{0}")]
    Conflict(String),
    /// Well-formed, but cannot be carried out as asked (a template that does not render).
    #[error("{0}")]
    Rejected(String),
    /// A dependency is out of reach for now; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl StoreError {
    /// One invalid field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid(crate::validate::Invalid::field(field, message))
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The RFC 9457 problem document every 4xx and 5xx carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI identifying the kind of problem (`urn:rapport:problem:validation`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Present on validation failures: every invalid field with its message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("validation failed: {detail}")]
    Validation {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Over the tenant's request rate; retry after this many seconds.
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// A validation failure on fields; `detail` is derived from the first error.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [] => "the request is invalid".to_owned(),
            [one] => format!("{}: {}", one.field, one.message),
            [first, rest @ ..] => format!(
                "{}: {} (and {} more)",
                first.field,
                first.message,
                rest.len()
            ),
        };
        ApiError::Validation { detail, errors }
    }

    /// A validation failure on one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } | ApiError::Unprocessable(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Database(e) if is_transient(e) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Database(e) if is_data_exception(e) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Database(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::MalformedJson(_) => "malformed-json",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Validation { .. } => "validation",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TooManyRequests { .. } => "rate-limited",
            ApiError::Database(e) if is_transient(e) => "unavailable",
            ApiError::Database(e) if is_data_exception(e) => "unprocessable",
            ApiError::Database(_) | ApiError::Internal(_) => "internal",
        }
    }

    /// The problem document for this error; internals are never included.
    pub fn to_problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            ApiError::BadRequest(d)
            | ApiError::MalformedJson(d)
            | ApiError::Unauthorized(d)
            | ApiError::Forbidden(d)
            | ApiError::NotFound(d)
            | ApiError::Conflict(d)
            | ApiError::PayloadTooLarge(d)
            | ApiError::UnsupportedMediaType(d)
            | ApiError::Unprocessable(d)
            | ApiError::Unavailable(d) => d.clone(),
            ApiError::Validation { detail, .. } => detail.clone(),
            ApiError::MethodNotAllowed => "this method is not allowed on this path".to_owned(),
            ApiError::TooManyRequests { retry_after_secs } => {
                format!("this tenant is over its request rate; retry in {retry_after_secs} s")
            }
            ApiError::Database(e) if is_transient(e) => {
                "the database is busy or unreachable; retry the request".to_owned()
            }
            ApiError::Database(e) if is_data_exception(e) => {
                "a value cannot be stored: it holds a NUL character or is out of range".to_owned()
            }
            ApiError::Database(_) | ApiError::Internal(_) => {
                "an internal error occurred; it has been logged".to_owned()
            }
        };
        let errors = match self {
            ApiError::Validation { errors, .. } => Some(errors.clone()),
            _ => None,
        };
        Problem {
            kind: format!("urn:rapport:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

/// Whether PostgreSQL ended the transaction to break a deadlock (40P01) or because it could
/// not be serialised (40001): running the whole transaction again can succeed
/// (`http::retry::retry_conflicts` does).
pub fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "40P01" || c == "40001"))
}

/// Errors a retry can cure: pool exhaustion, lost connections, deadlocks, serialization, and
/// the server closing the connection (SQLSTATE class 08, and 57P01-57P03: an administrator,
/// a restart or a crash ended the session, or the server is still starting).
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => {
            is_conflict(e)
                || db.code().is_some_and(|c| {
                    matches!(c.as_ref(), "57P01" | "57P02" | "57P03") || c.starts_with("08")
                })
        }
        _ => false,
    }
}

/// SQLSTATE class 22 (data exception): a value the client sent cannot be stored, such as a NUL
/// character in a path parameter. A safety net behind validation: the client's fault, not ours.
fn is_data_exception(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")))
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        ApiError::validation(invalid.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Db(e) => ApiError::Database(e),
            StoreError::Invalid(invalid) => invalid.into(),
            StoreError::NotFound(d) => ApiError::NotFound(d),
            StoreError::Conflict(d) => ApiError::Conflict(d),
            StoreError::Rejected(d) => ApiError::Unprocessable(d),
            StoreError::Unavailable(d) => ApiError::Unavailable(d),
            StoreError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            let chain = error_chain(&self);
            tracing::error!(error = %chain, "request failed");
        }
        let mut response = problem_response(&self.to_problem());
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rapport\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::TooManyRequests { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

/// Serialises a problem with its status and media type.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_else(|_| b"{}".to_vec());
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        body,
    )
        .into_response()
}

/// The error and all its sources, `: `-separated, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
