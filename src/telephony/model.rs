//! Calls and telephony integrations: what the API shows and what providers tell.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// A call.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Call {
    pub id: Uuid,
    pub provider: String,
    pub provider_call_id: String,
    pub direction: Option<CallDirection>,
    /// The customer's number, E.164 when it could be read.
    pub external_number: Option<String>,
    pub contact_id: Option<Uuid>,
    pub user_name: Option<String>,
    pub agent_id: Option<Uuid>,
    pub status: CallStatus,
    pub missed: bool,
    pub missed_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub recording_url: Option<String>,
    pub voicemail_url: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub tags: Value,
    #[schema(value_type = Vec<Object>)]
    pub comments: Value,
    /// The call-back ticket of a missed call.
    pub ticket_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Who called whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum CallDirection {
    /// The customer called.
    Inbound,
    /// An agent called the customer.
    Outbound,
}

/// Where a call is; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum CallStatus {
    Ringing,
    Answered,
    Ended,
}

/// What one provider event says about a call; absent facts are None.
#[derive(Debug, Clone, Default)]
pub struct CallUpdate {
    pub provider_call_id: String,
    pub inbound: Option<bool>,
    pub external_raw: Option<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    /// 1 ringing, 2 answered, 3 ended.
    pub stage: i16,
    pub started_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub missed_reason: Option<String>,
    pub recording_url: Option<String>,
    pub voicemail_url: Option<String>,
    /// The whole list, when the event carries it.
    pub tags: Option<Value>,
    pub comments: Option<Value>,
}

/// A call as stored, with the facts the merge reads (`stage` 1 ringing, 2 answered, 3 ended);
/// [`Call`] is what the API shows of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallRow {
    pub id: Uuid,
    pub direction: Option<CallDirection>,
    pub external_number: Option<String>,
    pub contact_id: Option<Uuid>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    pub agent_id: Option<Uuid>,
    pub stage: i16,
    pub missed: bool,
    pub missed_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub recording_url: Option<String>,
    pub voicemail_url: Option<String>,
    pub tags: Value,
    pub comments: Value,
    pub ticket_id: Option<Uuid>,
}

/// Filters of `GET /v1/calls`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CallFilter {
    pub contact_id: Option<Uuid>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// `PUT /v1/integrations/aircall`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AircallInput {
    /// The token of the Aircall webhook; kept when absent.
    pub webhook_token: Option<String>,
    /// API credentials, to push insight cards.
    pub api_id: Option<String>,
    pub api_token: Option<String>,
    /// Default `https://api.aircall.io`.
    pub api_base_url: Option<String>,
}

/// The stored Aircall settings, without secret values.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AircallConfig {
    pub api_id: Option<String>,
    pub api_base_url: String,
    /// The names of the secrets that are set.
    pub secrets: Vec<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Settings and opened secrets of an integration.
#[derive(Debug, Clone, Default)]
pub struct Integration {
    pub settings: serde_json::Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
}
