//! Broadcast types: what `POST /v1/broadcasts` takes and what the API shows.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::campaigns::model::{AudienceDoc, AudienceSpec, FrequencyCap, QuietHours};
use crate::domain::{Channel, Purpose};
use crate::validate::FieldError;

/// The most messages a second a broadcast may ask for.
pub const MAX_PER_SECOND: u32 = 10_000;

/// Where a broadcast stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum BroadcastStatus {
    /// Created, not scheduled: nothing happens.
    Draft,
    /// Waits for its time.
    Scheduled,
    /// Deciding its members and queueing their messages.
    Running,
    /// Held: no member is decided and no queued message is sent until it resumes.
    Paused,
    /// Every member has its message (queued, deferred or suppressed); sending goes on.
    Completed,
    /// Stopped for good; its unsent messages were cancelled.
    Cancelled,
    /// Could not go on (its template was deleted...); `error` says why.
    Failed,
}

impl BroadcastStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BroadcastStatus::Draft => "draft",
            BroadcastStatus::Scheduled => "scheduled",
            BroadcastStatus::Running => "running",
            BroadcastStatus::Paused => "paused",
            BroadcastStatus::Completed => "completed",
            BroadcastStatus::Cancelled => "cancelled",
            BroadcastStatus::Failed => "failed",
        }
    }
}

/// A broadcast's own pace.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    /// Messages a second, 1 to 10,000; no higher than the channels' `max_per_second`.
    #[schema(example = 50)]
    pub per_second: u32,
}

fn yes() -> bool {
    true
}

/// The body of `POST /v1/broadcasts`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastInput {
    #[schema(example = "December credit offer")]
    pub name: String,
    /// The segment whose members get the message (or `audience`).
    #[serde(default)]
    pub segment: Option<Uuid>,
    /// A CEL condition over `contact` and `now` instead of a segment, or the segment again as
    /// `{"segment": "<id>"}` (the way a campaign's audience names one).
    #[serde(default)]
    #[schema(value_type = Option<AudienceDoc>)]
    pub audience: Option<AudienceSpec>,
    /// The template's key.
    #[schema(example = "december_offer")]
    pub template: String,
    /// Ordered channel preference; empty: every channel the template has (email, sms, viber).
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// `marketing` (consent and unsubscribe apply) or `transactional`; default the template's.
    /// A marketing template stays marketing.
    #[serde(default)]
    pub purpose: Option<Purpose>,
    /// When to send (RFC 3339); default: when scheduled.
    #[serde(default)]
    pub send_at: Option<DateTime<Utc>>,
    /// A wall-clock time (`2026-12-01T10:00`) in each contact's own time zone (the tenant's
    /// for contacts without one).
    #[serde(default)]
    #[schema(example = "2026-12-01T10:00")]
    pub send_at_local: Option<String>,
    #[serde(default)]
    pub throttle: Option<Throttle>,
    /// No message between `start` and `end` in the contact's time zone: it waits for `end`.
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    /// At most `max` marketing messages per contact in any `per`, counted with campaigns'.
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Marketing skips contacts with an open ticket (default true).
    #[serde(default = "yes")]
    pub suppress_while_ticket_open: bool,
    /// Extra template variables.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: Map<String, Value>,
}

/// `2026-12-01T10:00` or `2026-12-01T10:00:00`.
pub fn parse_local(raw: &str) -> Result<NaiveDateTime, String> {
    NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| {
            format!("`{raw}` is not a local date and time like 2026-12-01T10:00 (no offset)")
        })
}

impl BroadcastInput {
    /// The segment named, by `segment` or by `audience: {"segment": ...}`.
    pub fn segment_id(&self) -> Option<Uuid> {
        match &self.audience {
            Some(AudienceSpec::Segment(id)) => Some(*id),
            _ => self.segment,
        }
    }

    /// The audience's own condition, when it is written out.
    pub fn condition(&self) -> Option<&str> {
        match &self.audience {
            Some(AudienceSpec::Condition(source)) => Some(source),
            _ => None,
        }
    }

    /// The checks serde cannot make (the segment and the template are checked by the store).
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let n = self.name.trim().chars().count();
        if n == 0 || n > 200 {
            errors.push(FieldError::new(
                "name",
                "give the broadcast a name of 1 to 200 characters",
            ));
        }
        match (&self.segment, &self.audience) {
            (Some(_), Some(_)) | (None, None) => errors.push(FieldError::new(
                "segment",
                "give exactly one of `segment` and `audience`",
            )),
            (None, Some(AudienceSpec::Condition(audience))) => {
                if let Err(e) = crate::segments::compile(audience) {
                    errors.push(FieldError::new("audience", e));
                }
            }
            _ => {}
        }
        if self.send_at.is_some() && self.send_at_local.is_some() {
            errors.push(FieldError::new(
                "send_at_local",
                "give at most one of `send_at` and `send_at_local`",
            ));
        }
        if let Some(local) = &self.send_at_local
            && let Err(e) = parse_local(local)
        {
            errors.push(FieldError::new("send_at_local", e));
        }
        if let Some(t) = &self.throttle
            && !(1..=MAX_PER_SECOND).contains(&t.per_second)
        {
            errors.push(FieldError::new(
                "throttle.per_second",
                format!("must be 1 to {MAX_PER_SECOND}"),
            ));
        }
        if let Some(cap) = &self.frequency_cap
            && cap.max == 0
        {
            errors.push(FieldError::new("frequency_cap.max", "must be at least 1"));
        }
        if let Some(q) = &self.quiet_hours
            && q.start == q.end
        {
            errors.push(FieldError::new(
                "quiet_hours",
                "`start` and `end` are the same time",
            ));
        }
        let mut seen = Vec::new();
        for c in &self.channels {
            if seen.contains(c) {
                errors.push(FieldError::new(
                    "channels",
                    format!("`{}` is named twice", c.as_str()),
                ));
            }
            seen.push(*c);
        }
        if self.variables.len() > 100 {
            errors.push(FieldError::new("variables", "at most 100 variables"));
        }
        errors
    }
}

/// What became of a broadcast's members and messages so far.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct BroadcastStats {
    /// Contacts looked at.
    pub scanned: i64,
    /// Members found: each has exactly one message (queued or suppressed).
    pub targeted: i64,
    /// Members whose message was queued.
    pub queued: i64,
    /// Of those, messages deferred past the quiet hours.
    pub deferred_quiet_hours: i64,
    /// Members whose message was not sent, by reason (`no_consent`, `opted_out`,
    /// `no_address`, `frequency_cap`, `ticket_open`, `bounced`...).
    #[schema(value_type = Object, example = json!({"no_consent": 120, "ticket_open": 3}))]
    pub suppressed: BTreeMap<String, i64>,
    /// Queued messages not sent yet (waiting for their time, paused, or being sent).
    pub pending: i64,
    pub sent: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub failed: i64,
    /// Messages that were queued when the broadcast was cancelled.
    pub cancelled: i64,
}

/// A broadcast, with its progress.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Broadcast {
    pub id: Uuid,
    pub name: String,
    pub segment_id: Option<Uuid>,
    pub audience: Option<String>,
    pub template: String,
    #[schema(value_type = Vec<String>)]
    pub channels: Vec<String>,
    pub purpose: Purpose,
    pub send_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<String>, example = "2026-12-01T10:00:00")]
    pub send_at_local: Option<NaiveDateTime>,
    pub throttle: Option<Throttle>,
    #[schema(value_type = Option<Object>)]
    pub quiet_hours: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub frequency_cap: Option<Value>,
    pub suppress_while_ticket_open: bool,
    #[schema(value_type = Object)]
    pub variables: Value,
    pub status: BroadcastStatus,
    /// When the walk over contacts starts (before the earliest zone's local time for
    /// `send_at_local`).
    pub starts_at: Option<DateTime<Utc>>,
    pub stats: BroadcastStats,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    /// When every member had its message.
    pub finished_at: Option<DateTime<Utc>>,
}
