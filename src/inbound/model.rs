//! What comes in, and what became of it.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::Channel;

/// Who sent an inbound message, as the provider names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A phone number, in any format the provider uses (`+385...`, `385...`).
    Phone(String),
    /// A Viber bot user id.
    ViberUser(String),
    /// An email address, lower-cased.
    Email(String),
}

impl Sender {
    pub fn as_str(&self) -> &str {
        match self {
            Sender::Phone(p) | Sender::ViberUser(p) | Sender::Email(p) => p,
        }
    }
}

/// An attachment the provider hosts (an MMS picture, a Viber photo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct Media {
    pub url: String,
    pub content_type: Option<String>,
}

/// A file that came with an email: its content when it fits in the per-message limit
/// (`attachment_max_bytes`), else only its name and size, with why it was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: Option<String>,
    pub content_type: String,
    pub size: usize,
    pub content: Option<Vec<u8>>,
    pub dropped: Option<String>,
}

pub use crate::support::model::AttachmentRef;

/// A message a customer sent in, as parsed from a provider's webhook.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: Channel,
    /// `twilio`, `infobip`, `viber`.
    pub provider: &'static str,
    /// The provider's id of this message: a redelivery carries the same.
    pub provider_message_id: String,
    pub sender: Sender,
    /// Our number or bot that received it.
    pub recipient: Option<String>,
    /// The whole text, as kept on the inbound record.
    pub text: String,
    /// What goes on the ticket when it differs from `text`: an email without the history it
    /// quotes.
    pub reply: Option<String>,
    pub media: Vec<Media>,
    /// An email's subject.
    pub subject: Option<String>,
    /// The message ids an email answers (`In-Reply-To`, then `References`, newest first).
    pub thread: Vec<String>,
    /// Written by a machine (an out-of-office reply, a bulk mailer): recorded, never answered.
    pub automatic: bool,
    /// A mail server's report that a mail Rapport sent could not be delivered.
    pub bounce: Option<Bounce>,
    /// An email's files.
    pub attachments: Vec<Attachment>,
    /// Every address an email was sent to (To, Cc, Delivered-To, X-Original-To), lower-cased:
    /// one may carry the ticket's signed reply tag.
    pub addressed: Vec<String>,
}

/// A delivery status notification about a mail Rapport sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// The Message-ID of the mail that bounced (bare).
    pub original: Option<String>,
    /// The address that refused it (lower-cased).
    pub recipient: Option<String>,
    /// A permanent failure (status 5.x.x): the address takes no more mail.
    pub hard: bool,
    /// `bounced 5.1.1: smtp; 550 5.1.1 user unknown`.
    pub reason: String,
}

/// What an inbound message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Part of a conversation: on a ticket.
    Reply,
    /// `STOP` or `START` (or the tenant's words for them): consent only, no ticket.
    Keyword,
    /// An automatic reply (out of office...): recorded, on no ticket, never answered.
    AutoReply,
    /// A delivery failure report about a mail Rapport sent.
    Bounce,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Reply => "reply",
            Kind::Keyword => "keyword",
            Kind::AutoReply => "auto_reply",
            Kind::Bounce => "bounce",
        }
    }
}

impl Inbound {
    /// The fields a chat message (SMS, Viber) leaves empty, to complete a literal with
    /// `..Inbound::chat()`: no subject, no thread, written by a person.
    pub fn chat() -> Inbound {
        Inbound {
            channel: Channel::Sms,
            provider: "",
            provider_message_id: String::new(),
            sender: Sender::Phone(String::new()),
            recipient: None,
            text: String::new(),
            reply: None,
            media: Vec::new(),
            subject: None,
            thread: Vec::new(),
            automatic: false,
            bounce: None,
            attachments: Vec::new(),
            addressed: Vec::new(),
        }
    }
}

/// An inbound message as it came: the whole text (an email's quoted history included), and
/// what it was filed as.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct InboundMessage {
    pub id: Uuid,
    pub channel: Channel,
    /// `twilio`, `infobip`, `viber`, `email`.
    pub provider: String,
    /// The provider's id (an email's Message-ID).
    pub provider_message_id: String,
    /// `reply`, `keyword` or `auto_reply`.
    pub kind: String,
    pub contact_id: Option<Uuid>,
    pub ticket_id: Option<Uuid>,
    /// The number, Viber id or address it came from (blank after erasure).
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub subject: Option<String>,
    pub body: Option<String>,
    /// Provider-hosted media (SMS and Viber).
    #[schema(value_type = Vec<Media>)]
    pub media: sqlx::types::Json<Vec<Media>>,
    /// Every attachment: an email's files, the provider's media.
    #[schema(value_type = Vec<AttachmentRef>)]
    pub attachments: sqlx::types::Json<Vec<AttachmentRef>>,
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// What became of an inbound message.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: Uuid,
    /// Seen before (a provider's redelivery): nothing was changed.
    pub duplicate: bool,
    pub contact_id: Option<Uuid>,
    pub ticket_id: Option<Uuid>,
}

/// A keyword, and what it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Stop,
    Start,
}

/// The words that opt a contact out of marketing on the channel they write on, in the
/// languages Rapport speaks; a tenant adds its own (`stop_keywords` in `PUT /v1/settings`).
pub const STOP_WORDS: &[&str] = &[
    "STOP",
    "UNSUBSCRIBE",
    "ODJAVA",
    "ODJAVI",
    "LEIRATKOZOM",
    "LEIRATKOZÁS",
    "REZYGNUJĘ",
    "REZYGNUJE",
];

/// The words that opt a contact back in (`start_keywords` in `PUT /v1/settings`).
pub const START_WORDS: &[&str] = &["START", "PRIJAVA", "PRIJAVI", "FELIRATKOZOM"];

/// The keyword a whole message is, if it is one: case, surrounding blanks and a final `.` or
/// `!` do not matter; a keyword inside a sentence is not one.
pub fn keyword(text: &str, stop: &[String], start: &[String]) -> Option<Keyword> {
    let word = text
        .trim()
        .trim_end_matches(['.', '!'])
        .trim()
        .to_uppercase();
    if word.is_empty() || word.contains(char::is_whitespace) {
        return None;
    }
    let is = |builtin: &[&str], own: &[String]| {
        builtin.iter().any(|w| *w == word) || own.iter().any(|w| w.trim().to_uppercase() == word)
    };
    if is(STOP_WORDS, stop) {
        Some(Keyword::Stop)
    } else if is(START_WORDS, start) {
        Some(Keyword::Start)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyword_is_a_whole_message_in_any_case() {
        let none: Vec<String> = Vec::new();
        assert_eq!(keyword("stop", &none, &none), Some(Keyword::Stop));
        assert_eq!(keyword("  Stop! ", &none, &none), Some(Keyword::Stop));
        assert_eq!(keyword("odjava", &none, &none), Some(Keyword::Stop));
        assert_eq!(keyword("Leiratkozás", &none, &none), Some(Keyword::Stop));
        assert_eq!(keyword("rezygnuję", &none, &none), Some(Keyword::Stop));
        assert_eq!(keyword("START", &none, &none), Some(Keyword::Start));
        assert_eq!(keyword("Please stop calling me", &none, &none), None);
        assert_eq!(keyword("", &none, &none), None);
        let own = vec!["Dosta".to_owned()];
        assert_eq!(keyword("DOSTA", &own, &none), Some(Keyword::Stop));
        assert_eq!(keyword("dosta", &none, &own), Some(Keyword::Start));
    }
}
