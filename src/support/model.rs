//! Agent and ticket types, the ticket status machine, and input validation.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::contacts::model::Contact;
use crate::domain::{ContactRef, Patch};
use crate::events::model::Event;
use crate::validate::{self, Errors, Invalid};

/// A support agent.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    /// Languages the agent speaks (`hr`, `en`); empty means any.
    pub languages: Vec<String>,
    /// Countries the agent covers (ISO alpha-2); empty means any.
    pub countries: Vec<String>,
    pub max_open_tickets: i32,
    pub active: bool,
    /// Tickets assigned and not yet solved.
    pub open_tickets: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /v1/agents`; in `PATCH`, absent fields are kept.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    #[schema(example = "Marija Kovač")]
    pub name: Option<String>,
    #[schema(example = "marija@acme.example")]
    pub email: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub phone: Patch<String>,
    #[schema(example = json!(["hr", "en"]))]
    pub languages: Option<Vec<String>>,
    #[schema(example = json!(["HR"]))]
    pub countries: Option<Vec<String>>,
    /// Default 20.
    pub max_open_tickets: Option<i32>,
    /// Default true.
    pub active: Option<bool>,
}

/// A validated [`AgentInput`].
#[derive(Debug, Clone, Default)]
pub struct AgentChanges {
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Patch<String>,
    pub languages: Option<Vec<String>>,
    pub countries: Option<Vec<String>>,
    pub max_open_tickets: Option<i32>,
    pub active: Option<bool>,
}

impl AgentInput {
    /// Validates; `creating` requires a name and an email.
    pub fn validate(&self, creating: bool, default_country: &str) -> Result<AgentChanges, Errors> {
        let mut errors = Errors::new();
        let name = self
            .name
            .as_deref()
            .and_then(|n| errors.check("name", validate::text(n, 200)));
        let email = self
            .email
            .as_deref()
            .and_then(|e| errors.check("email", validate::email(e)));
        if creating && self.name.is_none() {
            errors.add("name", "is required");
        }
        if creating && self.email.is_none() {
            errors.add("email", "is required");
        }
        let phone = errors
            .check(
                "phone",
                self.phone
                    .try_map(|p| validate::phone(p, Some(default_country))),
            )
            .unwrap_or_default();
        let languages = self.languages.as_ref().map(|ls| {
            ls.iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    errors
                        .check(&format!("languages[{i}]"), validate::locale(l))
                        .map(|l| l.split('-').next().unwrap_or_default().to_owned())
                })
                .collect::<Vec<_>>()
        });
        let countries = self.countries.as_ref().map(|cs| {
            cs.iter()
                .enumerate()
                .filter_map(|(i, c)| errors.check(&format!("countries[{i}]"), validate::country(c)))
                .collect::<Vec<_>>()
        });
        if let Some(n) = self.max_open_tickets {
            if !(0..=10_000).contains(&n) {
                errors.add("max_open_tickets", "must be between 0 and 10000");
            }
        }
        if errors.is_empty() {
            Ok(AgentChanges {
                name,
                email,
                phone,
                languages,
                countries,
                max_open_tickets: self.max_open_tickets,
                active: self.active,
            })
        } else {
            Err(errors)
        }
    }
}

/// Where a ticket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum TicketChannel {
    Email,
    Phone,
    Chat,
    WebForm,
    Messenger,
    Viber,
    Sms,
}

impl TicketChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketChannel::Email => "email",
            TicketChannel::Phone => "phone",
            TicketChannel::Chat => "chat",
            TicketChannel::WebForm => "web_form",
            TicketChannel::Messenger => "messenger",
            TicketChannel::Viber => "viber",
            TicketChannel::Sms => "sms",
        }
    }

    /// The message channel that answers on this ticket's channel, if there is one.
    pub fn reply_channel(self) -> Option<crate::domain::Channel> {
        use crate::domain::Channel;
        match self {
            TicketChannel::Email | TicketChannel::WebForm => Some(Channel::Email),
            TicketChannel::Sms | TicketChannel::Phone => Some(Channel::Sms),
            TicketChannel::Viber => Some(Channel::Viber),
            TicketChannel::Chat | TicketChannel::Messenger => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Priority {
    Low,
    Normal,
    High,
    Urgent,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

/// The statuses of a ticket that still needs work ([`Status::is_open`]), as SQL for
/// `status IN ...`. It is a literal, so `concat!` can put it in a static query, and the
/// planner can match the partial indexes on open tickets (`tickets_open_by_assignee`,
/// `tickets_waiting` and `tickets_sla_watch` in the migrations), which a bound parameter
/// would not. Those indexes carry the same list: a change here needs a migration that
/// rebuilds them.
macro_rules! open_ticket_statuses {
    () => {
        "('new', 'open', 'pending')"
    };
}
pub(crate) use open_ticket_statuses;

/// [`open_ticket_statuses!`] for `format!` strings.
pub(crate) const OPEN_TICKET_STATUSES: &str = open_ticket_statuses!();

/// A ticket's status: `new -> open -> pending (waiting on the customer) -> solved -> closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Status {
    New,
    Open,
    Pending,
    Solved,
    Closed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Open => "open",
            Status::Pending => "pending",
            Status::Solved => "solved",
            Status::Closed => "closed",
        }
    }

    /// Whether the ticket still needs work (counts against an agent's capacity).
    pub fn is_open(self) -> bool {
        matches!(self, Status::New | Status::Open | Status::Pending)
    }

    /// The legal moves: forward through the workflow, pending and open back and forth, a
    /// solved ticket reopened; a closed ticket is final.
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (New, Open | Pending | Solved)
                | (Open, Pending | Solved)
                | (Pending, Open | Solved)
                | (Solved, Open | Closed)
        )
    }
}

/// A ticket.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Ticket {
    pub id: Uuid,
    /// Sequential per tenant.
    pub number: i64,
    pub contact_id: Uuid,
    pub channel: TicketChannel,
    pub subject: String,
    pub category: Option<String>,
    pub priority: Priority,
    pub status: Status,
    pub assignee_id: Option<Uuid>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub solved_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The closed ticket this one follows: a customer answered it after it was closed.
    pub follows_ticket_id: Option<Uuid>,
}

/// A message on a ticket.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TicketMessage {
    pub id: Uuid,
    pub author: MessageAuthor,
    pub agent_id: Option<Uuid>,
    pub body: String,
    /// Internal notes are never shown to the customer.
    pub internal: bool,
    pub created_at: DateTime<Utc>,
    /// How a public agent message reaches the customer: the outbox message carrying it (the
    /// `ticket_reply` template), with its status. Absent on internal notes and customers'
    /// messages.
    #[schema(value_type = Option<Delivery>)]
    pub delivery: Option<sqlx::types::Json<Delivery>>,
    /// A message the customer sent in (SMS, Viber, email): its inbound record, with the whole
    /// original (`GET /v1/inbound-messages/{id}`).
    pub inbound_id: Option<Uuid>,
    /// What came with a customer's message: files (`GET /v1/attachments/{id}`) and the
    /// provider's media.
    #[schema(value_type = Vec<AttachmentRef>)]
    pub attachments: sqlx::types::Json<Vec<AttachmentRef>>,
}

/// An attachment as a ticket message lists it: stored (download it from
/// `GET /v1/attachments/{id}`), hosted by the provider (`url`), or dropped (`dropped` says why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttachmentRef {
    pub id: Uuid,
    pub filename: Option<String>,
    pub content_type: String,
    /// Bytes, for stored and dropped files.
    pub size: Option<i64>,
    /// Where the provider hosts it (SMS and Viber media).
    pub url: Option<String>,
    /// Why it was not kept (over the per-message size limit).
    pub dropped: Option<String>,
}

/// The outbox message that carries an agent's reply to the customer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    pub message_id: Uuid,
    pub status: crate::messages::model::MessageStatus,
    /// Why it was suppressed or failed.
    pub status_reason: Option<String>,
    /// The channel chosen: the ticket's, else the contact's best.
    pub channel: crate::domain::Channel,
    /// The address it went to.
    pub to: Option<String>,
}

/// A ticket with its messages.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TicketDetail {
    #[serde(flatten)]
    pub ticket: Ticket,
    pub messages: Vec<TicketMessage>,
}

/// `POST /v1/tickets`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTicket {
    /// By external id (created when new), email or phone.
    pub contact: ContactRef,
    pub channel: TicketChannel,
    #[schema(example = "The card was charged twice")]
    pub subject: String,
    pub body: String,
    pub category: Option<String>,
    /// Default `normal`.
    pub priority: Option<Priority>,
}

/// `PATCH /v1/tickets/{id}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketPatch {
    pub status: Option<Status>,
    pub priority: Option<Priority>,
    /// An agent id, or null to unassign.
    #[serde(default)]
    #[schema(value_type = Option<Uuid>)]
    pub assignee_id: Patch<Uuid>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub category: Patch<String>,
}

/// Who wrote a stored ticket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum MessageAuthor {
    /// The customer.
    Contact,
    /// An agent (`agent_id` says which).
    Agent,
    /// Rapport itself: a missed call to return, a campaign's hand-over.
    System,
}

/// Who writes a ticket message: an agent (`{"agent_id": ...}`) or the customer (`"contact"`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Author {
    Agent { agent_id: Uuid },
    Contact(ContactAuthor),
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContactAuthor {
    Contact,
}

/// `POST /v1/tickets/{id}/messages`: a `body`, or (agents) a `snippet` with `vars`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTicketMessage {
    pub author: Author,
    /// The text; required unless `snippet` is given.
    pub body: Option<String>,
    /// A snippet's key: its text, rendered for this ticket, is the body (agents only).
    pub snippet: Option<String>,
    /// Variables the snippet sees as `vars`.
    #[schema(value_type = Option<Object>)]
    pub vars: Option<serde_json::Value>,
    /// An internal note (agents only). Default false.
    #[serde(default)]
    pub internal: bool,
}

/// Filters of `GET /v1/tickets`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TicketFilter {
    pub status: Option<Status>,
    pub assignee_id: Option<Uuid>,
    pub contact_id: Option<Uuid>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    pub cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::OPEN_TICKET_STATUSES;
    use super::Status::*;

    #[test]
    fn the_sql_list_of_open_statuses_is_is_open() {
        let all = [New, Open, Pending, Solved, Closed];
        let open: Vec<String> = all
            .into_iter()
            .filter(|s| s.is_open())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(OPEN_TICKET_STATUSES, format!("({})", open.join(", ")));
        // as_str (written into SQL) says what serde and sqlx (both snake_case) read and write.
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str(), "{s:?}");
        }
    }

    #[test]
    fn the_status_machine() {
        assert!(New.can_become(Open));
        assert!(Open.can_become(Pending));
        assert!(Pending.can_become(Open));
        assert!(Solved.can_become(Open), "a customer reply reopens");
        assert!(Solved.can_become(Closed));
        assert!(!Closed.can_become(Open), "closed is final");
        assert!(!New.can_become(Closed));
        assert!(!Open.can_become(New));
        assert!(!Open.can_become(Open));
    }
}

/// Targets of one priority, in minutes from the ticket's creation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlaTarget {
    pub first_response_mins: Option<u32>,
    pub resolution_mins: Option<u32>,
}

/// A tenant's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// A score at or below this (1-5) alerts the agent; default 2.
    pub csat_alert_threshold: Option<i16>,
    /// How long the low-score alert waits for the customer's comment when the score came
    /// without one, in seconds (0 to 3600); default 120. A score with a comment alerts at once.
    #[schema(maximum = 3600)]
    pub csat_alert_delay_secs: Option<u32>,
    /// The company's logo on the survey and unsubscribe pages: an `https` URL (the pages load
    /// nothing else from outside).
    #[schema(example = "https://shop.example/logo.png")]
    pub logo_url: Option<String>,
    /// Send the `unsubscribe_confirmation` template after an unsubscribe link is used;
    /// default true.
    pub unsubscribe_confirmation: Option<bool>,
    /// Words that, as a whole SMS or Viber message, opt the sender out of marketing on that
    /// channel, besides the built-in ones (`STOP`, `UNSUBSCRIBE`, `ODJAVA`, `LEIRATKOZOM`,
    /// `REZYGNUJĘ`...).
    #[schema(example = json!(["DOSTA"]))]
    pub stop_keywords: Option<Vec<String>>,
    /// Words that opt the sender back in, besides `START`, `PRIJAVA`, `FELIRATKOZOM`.
    pub start_keywords: Option<Vec<String>>,
    /// SLA targets by priority (`low`, `normal`, `high`, `urgent`).
    #[schema(value_type = Object, example = json!({"urgent": {"first_response_mins": 15, "resolution_mins": 240}}))]
    #[serde(default)]
    pub sla: BTreeMap<String, SlaTarget>,
}

impl TenantSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errors = Errors::new();
        if let Some(t) = self.csat_alert_threshold {
            if !(1..=5).contains(&t) {
                errors.add("csat_alert_threshold", "must be 1 to 5");
            }
        }
        if self.csat_alert_delay_secs.is_some_and(|s| s > 3600) {
            errors.add("csat_alert_delay_secs", "must be 0 to 3600 seconds");
        }
        for (name, words) in [
            ("stop_keywords", &self.stop_keywords),
            ("start_keywords", &self.start_keywords),
        ] {
            let words = words.as_deref().unwrap_or_default();
            if words.len() > 50
                || words.iter().any(|w| {
                    w.trim().is_empty() || w.chars().count() > 30 || w.trim().contains(' ')
                })
            {
                errors.add(name, "at most 50 single words of at most 30 characters");
            }
        }
        if let Some(logo) = &self.logo_url {
            let https = url::Url::parse(logo).is_ok_and(|u| u.scheme() == "https" && u.has_host());
            if !https || logo.len() > 2048 {
                errors.add(
                    "logo_url",
                    "must be an https URL of at most 2048 characters",
                );
            }
        }
        for (priority, target) in &self.sla {
            if !matches!(priority.as_str(), "low" | "normal" | "high" | "urgent") {
                errors.add(
                    format!("sla.{priority}"),
                    "priorities are low, normal, high and urgent",
                );
            }
            for (name, v) in [
                ("first_response_mins", target.first_response_mins),
                ("resolution_mins", target.resolution_mins),
            ] {
                if v.is_some_and(|m| m == 0 || m > 525_600) {
                    errors.add(
                        format!("sla.{priority}.{name}"),
                        "must be 1 to 525600 minutes",
                    );
                }
            }
        }
        errors.finish()
    }
}

/// A canned response.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct Snippet {
    pub key: String,
    pub title: Option<String>,
    /// A minijinja template over `contact`, `ticket`, `agent` and `tenant`.
    #[schema(
        example = "Dear {{ contact.first_name }}, ticket #{{ ticket.number }} is solved. {{ agent.name }}"
    )]
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT /v1/snippets/{key}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnippetInput {
    pub title: Option<String>,
    pub body: String,
}

/// `POST /v1/snippets/{key}/render`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderSnippet {
    pub ticket_id: Uuid,
}

/// A rendered snippet.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RenderedSnippet {
    pub text: String,
}

/// The contact card shown to an agent when the customer calls (screen-pop).
#[derive(Debug, Serialize, ToSchema)]
pub struct ContactCard {
    pub contact: Contact,
    /// The contact's tickets that still need work, newest first.
    pub open_tickets: Vec<Ticket>,
    /// The last 10 things that happened to the contact, newest first.
    pub last_interactions: Vec<Event>,
    /// The last satisfaction score, 1-5, when the contact has rated.
    pub last_csat: Option<i16>,
    pub owner_agent_id: Option<Uuid>,
}
