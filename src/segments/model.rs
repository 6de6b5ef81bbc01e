//! Segment types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A named condition over the contact.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Segment {
    pub id: Uuid,
    #[schema(example = "Credit available, no purchase in 30 days")]
    pub name: String,
    /// CEL over `contact` (fields, `attributes`, `consents`, `stats`, `last_event_at`) and
    /// `now`.
    #[schema(
        example = "contact.attributes.available_credit / contact.attributes.credit_limit > 0.8 && (!has(contact.last_event_at.purchase_completed) || now - contact.last_event_at.purchase_completed > duration('720h'))"
    )]
    pub condition: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The body of `POST /v1/segments`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentInput {
    #[schema(example = "Gold customers")]
    pub name: String,
    #[schema(example = "contact.attributes.plan == 'gold'")]
    pub condition: String,
}

/// The body of `PATCH /v1/segments/{id}`: the fields to change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentPatch {
    pub name: Option<String>,
    pub condition: Option<String>,
}

/// How many contacts a segment matches now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SegmentCount {
    pub segment_id: Uuid,
    /// Contacts that meet the condition.
    pub count: u64,
    /// Live contacts walked past (every contact of the tenant), members or not.
    pub scanned: u64,
    /// How long the count took, in milliseconds.
    pub took_ms: u64,
    pub counted_at: DateTime<Utc>,
}
