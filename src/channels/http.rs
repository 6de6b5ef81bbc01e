//! What HTTP providers have in common: classifying answers into transient and permanent
//! failures, and reading `Retry-After`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::SendError;

/// A provider's error answer: 429 slows the channel down, 5xx and 408 are worth retrying;
/// other 4xx are not.
pub fn classify(status: StatusCode, headers: &HeaderMap, reason: String) -> SendError {
    if status == StatusCode::TOO_MANY_REQUESTS {
        SendError::Throttled {
            reason,
            retry_after: retry_after(headers),
        }
    } else if status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        SendError::Transient {
            reason,
            retry_after: retry_after(headers),
        }
    } else {
        SendError::Permanent { reason }
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

/// A request that got no answer (connection refused, timeout, TLS...): retry. The details go
/// to the operator's log, not to the tenant: they would tell an open port from a closed one.
pub fn transport_error(provider: &str, e: &reqwest::Error) -> SendError {
    tracing::warn!(provider, error = %crate::error::error_chain(e), "provider request failed");
    SendError::Transient {
        reason: format!("{provider}: no answer (the provider could not be reached in time)"),
        retry_after: None,
    }
}

/// A setting as a string.
pub fn setting<'a>(
    settings: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a str> {
    settings.get(key).and_then(serde_json::Value::as_str)
}

/// `base` without a trailing slash.
pub fn base(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}
