//! Event types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::ContactRef;
use crate::validate::FieldError;

/// Something that happened to a contact.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Event {
    pub id: Uuid,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    #[schema(example = "purchase.completed")]
    pub kind: String,
    pub contact_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub properties: Value,
    /// `api` for events sent by the tenant, `rapport` for those Rapport emits.
    pub source: String,
    /// 1 for the contact's first event of this type, 2 for the second...
    pub ordinal: i64,
    pub idempotency_key: Option<String>,
    /// The kind of object the event is about (`message`, `ticket`, `call`...).
    pub subject_type: Option<String>,
    pub subject_id: Option<Uuid>,
}

/// `POST /v1/events` and an item of `POST /v1/events/batch`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Lower-case words of `[a-z0-9_]` joined by dots.
    #[serde(rename = "type")]
    #[schema(
        example = "purchase.completed",
        pattern = "^[a-z0-9_]+(\\.[a-z0-9_]+)*$",
        max_length = 100
    )]
    pub kind: String,
    pub contact: ContactRef,
    /// When it happened; now when absent.
    pub occurred_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>, example = json!({"amount": 129.9, "currency": "EUR"}))]
    pub properties: Option<Map<String, Value>>,
    /// Deduplicates the event per tenant: a second event with this key is not recorded again.
    #[schema(min_length = 1, max_length = 255)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/events/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    /// Up to 1,000 events.
    pub events: Vec<NewEvent>,
}

/// The answer to an accepted event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Accepted {
    pub id: Uuid,
    pub contact_id: Uuid,
    /// 1 for the contact's first event of this type...
    pub ordinal: i64,
    /// True when an event with the same `idempotency_key` was already recorded; `id` is its id.
    pub duplicate: bool,
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventItemStatus {
    Accepted,
    Duplicate,
    Rejected,
}

/// The result of one event of a batch, in request order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventBatchItem {
    pub index: usize,
    pub status: EventItemStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// The answer to an event batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventBatchResult {
    pub results: Vec<EventBatchItem>,
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
}

/// Filters of the timeline.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TimelineParams {
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(
        rename = "type",
        pattern = "^[a-z0-9_]+(\\.[a-z0-9_]+)*$",
        max_length = 100
    )]
    pub kind: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}
