//! `?limit=&cursor=` pagination and the `{data, next_cursor}` list envelope.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::ApiError;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 500;

/// A page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The `limit` and `cursor` query parameters of every list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

impl PageParams {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(i64::from(DEFAULT_LIMIT)),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(i64::from(n)),
            Some(_) => Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            ))),
        }
    }
}

/// A position in a list ordered by id (UUIDv7, so by creation time).
pub fn encode_id_cursor(id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("i:{id}"))
}

pub fn decode_id_cursor(cursor: &str) -> Result<Uuid, ApiError> {
    let text = decode(cursor)?;
    text.strip_prefix("i:")
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(invalid_cursor)
}

/// A position in a list ordered by a timestamp, then id.
pub fn encode_time_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("t:{}:{id}", at.timestamp_micros()))
}

pub fn decode_time_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let text = decode(cursor)?;
    let rest = text.strip_prefix("t:").ok_or_else(invalid_cursor)?;
    let (micros, id) = rest.split_once(':').ok_or_else(invalid_cursor)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid_cursor)?;
    let id = Uuid::parse_str(id).map_err(|_| invalid_cursor())?;
    Ok((at, id))
}

fn decode(cursor: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(invalid_cursor)
}

fn invalid_cursor() -> ApiError {
    ApiError::BadRequest("cursor is not a cursor returned by this list".to_owned())
}

/// Cuts one extra fetched row off `rows` and makes the cursor of the next page from the last
/// row kept.
pub fn paginate<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    Page {
        data: rows,
        next_cursor,
    }
}

/// A position in a list ordered by a text key.
pub fn encode_key_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("k:{key}"))
}

pub fn decode_key_cursor(cursor: &str) -> Result<String, ApiError> {
    decode(cursor)?
        .strip_prefix("k:")
        .map(str::to_owned)
        .ok_or_else(invalid_cursor)
}
