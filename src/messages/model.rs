//! Message types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{Channel, ContactRef, Purpose};
use crate::events::model::Event;

/// A message of the outbox, with its delivery state.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Message {
    pub id: Uuid,
    /// The contact it goes to (null for messages to agents).
    pub contact_id: Option<Uuid>,
    /// The agent it goes to (alerts), when it does not go to a contact.
    pub agent_id: Option<Uuid>,
    pub channel: Channel,
    pub purpose: Purpose,
    #[sqlx(rename = "template_key")]
    pub template: Option<String>,
    pub locale: Option<String>,
    /// The address it goes to: an email, an E.164 number or a Viber user id.
    pub recipient: Option<String>,
    pub subject: Option<String>,
    #[sqlx(rename = "body_text")]
    pub text: Option<String>,
    #[sqlx(rename = "body_html")]
    pub html: Option<String>,
    #[schema(value_type = Object)]
    pub extras: Value,
    pub status: MessageStatus,
    /// Why it failed or was suppressed (`no_consent`, `no_address`, the provider's error...).
    pub status_reason: Option<String>,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// One attempt to hand a message to its provider.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Attempt {
    pub attempt: i32,
    pub provider: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: AttemptResult,
    pub detail: Option<String>,
    pub provider_message_id: Option<String>,
}

/// How one attempt ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum AttemptResult {
    /// The provider accepted the message.
    Sent,
    /// A transient error; the message was queued again.
    Retry,
    /// A permanent error, or the last attempt.
    Failed,
    /// The worker stopped before recording an outcome (its lease expired); the provider may
    /// have accepted the message.
    Lost,
}

/// A message with its attempts and its history (the `message.*` events about it).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageDetail {
    #[serde(flatten)]
    pub message: Message,
    pub delivery_attempts: Vec<Attempt>,
    pub history: Vec<Event>,
}

/// `POST /v1/messages`: a transactional message now.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    pub contact: ContactRef,
    /// The template's key.
    #[schema(example = "order_shipped")]
    pub template: String,
    /// The channel; when absent, the first of email, sms and viber that the template has a
    /// variant for and the contact has an address and consent for.
    pub channel: Option<Channel>,
    /// Available to the template as `vars`.
    #[schema(value_type = Option<Object>)]
    pub variables: Option<Map<String, Value>>,
}

/// Filters of `GET /v1/messages`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessageFilter {
    pub contact_id: Option<Uuid>,
    /// `queued`, `sending`, `sent`, `delivered`, `failed`, `suppressed` or `paused`.
    pub status: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

/// Where a message is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum MessageStatus {
    /// Waiting for its first or next attempt.
    Queued,
    /// Leased by a worker that is handing it to the provider.
    Sending,
    /// The provider accepted it.
    Sent,
    /// The provider reported it delivered.
    Delivered,
    /// No attempt will be made any more; `status_reason` says why.
    Failed,
    /// Never sent: no consent, no address, a frequency cap...; `status_reason` says which.
    Suppressed,
    /// Held with its broadcast (`POST /v1/broadcasts/{id}/pause`); queued again on resume.
    Paused,
}

/// Every status a message can have, as the API writes them.
pub const STATUSES: [&str; 7] = [
    "queued",
    "sending",
    "sent",
    "delivered",
    "failed",
    "suppressed",
    "paused",
];

/// What to send: the domain's request, used by the API, tickets and campaigns alike.
#[derive(Debug, Clone)]
pub struct Compose<'a> {
    pub contact_id: Uuid,
    pub template_key: &'a str,
    /// Ordered preference; empty means email, sms, viber.
    pub channels: &'a [Channel],
    pub vars: Value,
    pub event: Option<Value>,
    /// The campaign journey that sends it: (campaign id, journey id).
    pub journey: Option<(Uuid, Uuid)>,
    /// The ticket it is about: its email threads with the ticket's other mails.
    pub ticket: Option<Uuid>,
    /// Record the message as suppressed for this reason instead of sending it (a campaign's
    /// frequency cap, a ticket still open past the hold limit).
    pub suppress: Option<&'a str>,
}
