//! The shared vocabulary: the closed sets, small value types and policies that several
//! capabilities speak. It sits below every capability folder and imports none of them, so a
//! type two folders both need lives here rather than in one of them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The id of a tenant: every store function takes one first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
pub struct TenantId(pub Uuid);

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The tenant a request or a job acts for (from its API key, or its record), with the
/// defaults its data is normalised with.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TenantContext {
    #[sqlx(rename = "tenant_id")]
    pub id: TenantId,
    pub key_id: Uuid,
    pub default_country: String,
    pub default_locale: String,
    pub timezone: String,
}

/// Who Rapport's public pages speak for: the tenant's name, and its logo if it set one
/// (`PUT /v1/settings` `logo_url`).
#[derive(Debug, Clone, Default)]
pub struct Brand {
    pub name: String,
    pub logo_url: Option<String>,
}

/// Marks a request authenticated with the operators' admin token.
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// Forgets a contact's personal data in one capability's tables, in the erasing transaction.
/// Every capability that copies a contact's name, address or number registers one (the list is
/// built in `App::from_pool`), so erasure reaches them without the contacts folder knowing them.
pub type Eraser = for<'c> fn(
    &'c mut sqlx::PgConnection,
    TenantId,
    Uuid,
) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>;

/// A message channel.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Viber,
}

impl Channel {
    pub fn parse(name: &str) -> Option<Channel> {
        match name {
            "email" => Some(Channel::Email),
            "sms" => Some(Channel::Sms),
            "viber" => Some(Channel::Viber),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Viber => "viber",
        }
    }
}

/// Why a message is sent: marketing needs an opt-in, transactional only no opt-out.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Purpose {
    Marketing,
    Transactional,
}

impl Purpose {
    pub fn parse(name: &str) -> Option<Purpose> {
        match name {
            "marketing" => Some(Purpose::Marketing),
            "transactional" => Some(Purpose::Transactional),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Marketing => "marketing",
            Purpose::Transactional => "transactional",
        }
    }
}

/// A consent decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    OptedIn,
    OptedOut,
}

impl ConsentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentStatus::OptedIn => "opted_in",
            ConsentStatus::OptedOut => "opted_out",
        }
    }
}

/// A consent as sent: the bare status (`"opted_in"`), or with when and where it was given.
#[derive(Debug, Clone)]
pub struct ConsentInput {
    pub status: ConsentStatus,
    pub source: Option<String>,
    pub at: Option<DateTime<Utc>>,
}

impl<'de> Deserialize<'de> for ConsentInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ConsentVisitor;
        impl<'de> Visitor<'de> for ConsentVisitor {
            type Value = ConsentInput;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`opted_in`, `opted_out`, or {status, source?, at?}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConsentInput, E> {
                let status = ConsentStatus::deserialize(de::value::StrDeserializer::<E>::new(v))?;
                Ok(ConsentInput {
                    status,
                    source: None,
                    at: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ConsentInput, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Full {
                    status: ConsentStatus,
                    source: Option<String>,
                    at: Option<DateTime<Utc>>,
                }
                let full = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ConsentInput {
                    status: full.status,
                    source: full.source,
                    at: full.at,
                })
            }
        }
        deserializer.deserialize_any(ConsentVisitor)
    }
}

/// A consent as stored: the decision, and when and where it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consent {
    pub status: ConsentStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A contact's consents, per channel and purpose, stored and shown as
/// `{"email": {"marketing": {"status": "opted_in", "at": ..., "source": ...}}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Consents(BTreeMap<Channel, BTreeMap<Purpose, Consent>>);

impl Consents {
    pub fn get(&self, channel: Channel, purpose: Purpose) -> Option<&Consent> {
        self.0.get(&channel).and_then(|p| p.get(&purpose))
    }

    pub fn status(&self, channel: Channel, purpose: Purpose) -> Option<ConsentStatus> {
        self.get(channel, purpose).map(|c| c.status)
    }

    /// Records a decision given `at` (unless the input says when) from `source` (unless the
    /// input says where). The same status again with no time or source of its own changes
    /// nothing: false.
    pub fn record(
        &mut self,
        channel: Channel,
        purpose: Purpose,
        input: &ConsentInput,
        at: DateTime<Utc>,
        source: &str,
    ) -> bool {
        let same = self.status(channel, purpose) == Some(input.status);
        if same && input.at.is_none() && input.source.is_none() {
            return false;
        }
        self.0.entry(channel).or_default().insert(
            purpose,
            Consent {
                status: input.status,
                at: Some(input.at.unwrap_or(at)),
                source: Some(input.source.clone().unwrap_or_else(|| source.to_owned())),
            },
        );
        true
    }
}

/// A field of a partial update: absent (unchanged), `null` (cleared) or a value.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Missing,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(deserializer)? {
            None => Patch::Null,
            Some(v) => Patch::Value(v),
        })
    }
}

impl<T> Patch<T> {
    /// Validates a present value, keeping `Missing` and `Null` as they are.
    pub fn try_map<U>(&self, f: impl FnOnce(&T) -> Result<U, String>) -> Result<Patch<U>, String> {
        Ok(match self {
            Patch::Missing => Patch::Missing,
            Patch::Null => Patch::Null,
            Patch::Value(v) => Patch::Value(f(v)?),
        })
    }

    /// The value after applying this patch to `current`.
    pub fn apply(&self, current: Option<T>) -> Option<T>
    where
        T: Clone,
    {
        match self {
            Patch::Missing => current,
            Patch::Null => None,
            Patch::Value(v) => Some(v.clone()),
        }
    }
}

/// How an event names its contact: by the tenant's external id (created when new), or by an
/// email or phone of an existing contact.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactRef {
    #[schema(example = "cust-42", min_length = 1, max_length = 255)]
    pub external_id: Option<String>,
    #[schema(min_length = 3, max_length = 254)]
    pub email: Option<String>,
    /// Any common format.
    #[schema(min_length = 1)]
    pub phone: Option<String>,
}

/// First retry delay; doubled each attempt, with full jitter, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The delay before retry number `attempt + 1`: exponential, jittered between half and all of
/// it, and never shorter than the provider's `Retry-After`.
pub fn backoff(attempt: i32, retry_after: Option<Duration>) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let full = BASE_BACKOFF
        .saturating_mul(2u32.saturating_pow(exp))
        .min(MAX_BACKOFF);
    let jittered = full.mul_f64(rand::rng().random_range(0.5..=1.0));
    match retry_after {
        Some(after) => jittered.max(after.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// The kinds of the events Rapport records itself. Tenants' own kinds are free text; these are
/// the ones campaigns, reports and webhooks can rely on.
pub mod kinds {
    pub const CONTACT_CREATED: &str = "contact.created";
    pub const CONTACT_UPDATED: &str = "contact.updated";
    pub const CONTACT_UNSUBSCRIBED: &str = "contact.unsubscribed";

    pub const MESSAGE_QUEUED: &str = "message.queued";
    pub const MESSAGE_SUPPRESSED: &str = "message.suppressed";
    pub const MESSAGE_SENT: &str = "message.sent";
    pub const MESSAGE_DELIVERED: &str = "message.delivered";
    pub const MESSAGE_FAILED: &str = "message.failed";
    pub const MESSAGE_OPENED: &str = "message.opened";
    pub const MESSAGE_CLICKED: &str = "message.clicked";
    /// A customer wrote in (an SMS, a Viber message).
    pub const MESSAGE_RECEIVED: &str = "message.received";

    pub const TICKET_CREATED: &str = "ticket.created";
    pub const TICKET_ASSIGNED: &str = "ticket.assigned";
    pub const TICKET_REPLIED: &str = "ticket.replied";
    pub const TICKET_STATUS_CHANGED: &str = "ticket.status_changed";
    pub const TICKET_SOLVED: &str = "ticket.solved";
    pub const TICKET_CLOSED: &str = "ticket.closed";
    pub const TICKET_REOPENED: &str = "ticket.reopened";
    pub const TICKET_SLA_BREACHED: &str = "ticket.sla_breached";

    pub const CALL_STARTED: &str = "call.started";
    pub const CALL_ANSWERED: &str = "call.answered";
    pub const CALL_ENDED: &str = "call.ended";
    pub const CALL_MISSED: &str = "call.missed";

    pub const CAMPAIGN_ENROLLED: &str = "campaign.enrolled";
    pub const CAMPAIGN_STEP: &str = "campaign.step";
    pub const CAMPAIGN_COMPLETED: &str = "campaign.completed";
    pub const CAMPAIGN_EXITED: &str = "campaign.exited";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        for attempt in 1..=12 {
            let d = backoff(attempt, None);
            let full = BASE_BACKOFF
                .saturating_mul(2u32.pow((attempt - 1) as u32))
                .min(MAX_BACKOFF);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(1, Some(Duration::from_secs(120))) >= Duration::from_secs(120));
        assert!(backoff(1, Some(Duration::from_secs(10 * 24 * 3600))) <= MAX_RETRY_AFTER);
    }

    #[test]
    fn consents_keep_their_stored_shape_and_record_only_changes() {
        let stored = serde_json::json!({"email": {"marketing": {"status": "opted_in",
            "at": "2026-11-01T10:00:00Z", "source": "checkout"}}});
        let mut consents: Consents = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(serde_json::to_value(&consents).unwrap(), stored);
        let at: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap();
        let again = ConsentInput {
            status: ConsentStatus::OptedIn,
            source: None,
            at: None,
        };
        assert!(!consents.record(Channel::Email, Purpose::Marketing, &again, at, "api"));
        let out = ConsentInput {
            status: ConsentStatus::OptedOut,
            ..again
        };
        assert!(consents.record(Channel::Sms, Purpose::Marketing, &out, at, "api"));
        assert_eq!(
            consents.status(Channel::Sms, Purpose::Marketing),
            Some(ConsentStatus::OptedOut)
        );
        assert_eq!(
            consents
                .get(Channel::Sms, Purpose::Marketing)
                .unwrap()
                .source
                .as_deref(),
            Some("api")
        );
        assert_eq!(consents.status(Channel::Viber, Purpose::Marketing), None);
    }
}
