//! Filing an inbound message: who sent it, and where it belongs.

use serde_json::json;
use sqlx::PgConnection;

use super::model::{Inbound, Keyword, Kind, Received, Sender, keyword};
use super::store;
use crate::contacts::store::{self as contacts, KnownBy};
use crate::domain::{Channel, ConsentStatus, Purpose, TenantContext, kinds};
use crate::error::{StoreError, StoreResult};
use crate::events::store as events;
use crate::messages::model::Compose;
use crate::messages::store::{self as messages, SendOptions, best_effort};
use crate::support::model::{MessageAuthor, Status};
use crate::support::store as support;
use crate::validate;

/// How much of a message `message.received` and a new ticket's subject carry.
const EXCERPT_CHARS: usize = 160;
const SUBJECT_CHARS: usize = 80;
/// The longest message a ticket takes, as `POST /v1/tickets/{id}/messages` does; the inbound
/// record keeps the whole text (the webhook's body limit bounds it).
const TICKET_TEXT_CHARS: usize = 100_000;

/// `text` cut to at most `max` characters, marked with `…` where it was cut.
fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((end, _)) if text[end..].chars().count() > 1 => format!("{}…", &text[..end]),
        _ => text.to_owned(),
    }
}

fn excerpt(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// A phone number as providers write it, in E.164: Infobip leaves out the `+`.
fn e164(raw: &str, country: &str) -> Option<String> {
    let digits = raw.trim();
    let international = if !digits.starts_with('+')
        && digits.len() > 9
        && digits.chars().all(|c| c.is_ascii_digit())
    {
        format!("+{digits}")
    } else {
        digits.to_owned()
    };
    validate::phone(&international, Some(country)).ok()
}

/// Files an inbound message, in the caller's transaction. A redelivery (the same provider
/// message id) changes nothing and says what the first delivery did.
pub async fn receive(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    m: &Inbound,
    opts: &SendOptions,
) -> StoreResult<Received> {
    let Some(id) = store::record(conn, tenant.id, m).await? else {
        let (id, contact_id, ticket_id) = store::filed(conn, tenant.id, m)
            .await?
            .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("inbound message vanished")))?;
        return Ok(Received {
            id,
            duplicate: true,
            contact_id,
            ticket_id,
        });
    };
    if let Some(b) = &m.bounce {
        // A mail server's report, not a customer: the mail it is about failed.
        messages::apply_bounce(
            conn,
            tenant.id,
            b.original.as_deref(),
            b.recipient.as_deref(),
            b.hard,
            &b.reason,
        )
        .await?;
        store::file(conn, tenant.id, id, None, Kind::Bounce, None).await?;
        return Ok(Received {
            id,
            duplicate: false,
            contact_id: None,
            ticket_id: None,
        });
    }
    let address = match &m.sender {
        Sender::Phone(raw) => {
            KnownBy::Phone(e164(raw, &tenant.default_country).ok_or_else(|| {
                StoreError::field("from", format!("`{raw}` is not a phone number"))
            })?)
        }
        Sender::ViberUser(user) => KnownBy::ViberId(user.clone()),
        Sender::Email(address) => KnownBy::Email(address.clone()),
    };
    let contact = contacts::find_or_create_by_address(conn, tenant.id, &address, m.channel).await?;
    let settings = support::settings(conn, tenant.id).await?;
    let stop = settings.stop_keywords.unwrap_or_default();
    let start = settings.start_keywords.unwrap_or_default();
    let word = match m.channel {
        Channel::Sms | Channel::Viber => keyword(&m.text, &stop, &start),
        Channel::Email => None,
    };
    let (kind, ticket) = match word {
        _ if m.automatic => (Kind::AutoReply, None),
        Some(word) => {
            apply_keyword(conn, tenant, contact, m.channel, word, opts).await?;
            (Kind::Keyword, None)
        }
        None => (
            Kind::Reply,
            Some(join_ticket(conn, tenant, contact, id, m, opts).await?),
        ),
    };
    store::file(conn, tenant.id, id, Some(contact), kind, ticket).await?;
    events::emit_about(
        conn,
        tenant.id,
        contact,
        kinds::MESSAGE_RECEIVED,
        json!({"inbound_id": id, "channel": m.channel, "provider": m.provider,
               "kind": kind, "ticket_id": ticket, "text": excerpt(&m.text, EXCERPT_CHARS),
               "media": m.media.len()}),
        ticket.map(|t| ("ticket", t)),
    )
    .await?;
    Ok(Received {
        id,
        duplicate: false,
        contact_id: Some(contact),
        ticket_id: ticket,
    })
}

/// `STOP`: out of marketing on this channel, told so (the tenant's `sms_stop_confirmation`, or
/// the built-in one); `START`: back in.
async fn apply_keyword(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    contact: uuid::Uuid,
    channel: Channel,
    word: Keyword,
    opts: &SendOptions,
) -> StoreResult<()> {
    let (status, source) = match word {
        Keyword::Stop => (
            ConsentStatus::OptedOut,
            format!("{} STOP", channel.as_str()),
        ),
        Keyword::Start => (
            ConsentStatus::OptedIn,
            format!("{} START", channel.as_str()),
        ),
    };
    let changed = contacts::set_consent(
        conn,
        tenant.id,
        contact,
        channel,
        Purpose::Marketing,
        status,
        &source,
        None,
    )
    .await?;
    if !(changed && word == Keyword::Stop) {
        return Ok(());
    }
    let compose = Compose {
        contact_id: contact,
        template_key: "sms_stop_confirmation",
        channels: &[channel],
        vars: json!({}),
        event: None,
        journey: None,
        ticket: None,
        suppress: None,
    };
    let queued = messages::enqueue(conn, tenant, compose, opts).await;
    best_effort(queued, tenant.id, "the STOP confirmation")?;
    Ok(())
}

/// The contact's ticket an email answers: the ticket whose signed tag the address it was sent
/// to carries (`support+t42.<mac>@...`), else the ticket of an earlier mail in its thread (one
/// Rapport sent, or one the customer sent in), else the `[#number]` of its subject.
async fn answered_ticket(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    contact: uuid::Uuid,
    m: &Inbound,
    opts: &SendOptions,
) -> StoreResult<Option<crate::support::model::Ticket>> {
    let tagged = m.addressed.iter().find_map(|a| {
        crate::channels::email::address_tag(a)
            .and_then(|tag| opts.signer.verify_ticket_tag(tenant.id.0, tag))
    });
    let mut found = match tagged {
        Some(number) => support::ticket_id_by_number(conn, tenant.id, contact, number).await?,
        None => None,
    };
    if found.is_none() {
        found = messages::ticket_of_mails(conn, tenant.id, &m.thread).await?;
    }
    if found.is_none() {
        found = store::ticket_of(conn, tenant.id, m.channel.as_str(), &m.thread).await?;
    }
    if found.is_none() {
        if let Some(number) = m.subject.as_deref().and_then(subject_number) {
            found = support::ticket_id_by_number(conn, tenant.id, contact, number).await?;
        }
    }
    let Some(id) = found else {
        return Ok(None);
    };
    // Someone else answering the thread (a colleague in copy) starts their own ticket.
    Ok(support::lock_ticket(conn, tenant.id, id)
        .await?
        .filter(|t| t.contact_id == contact))
}

/// The ticket number a subject carries: `Re: Kartica [#42]`.
fn subject_number(subject: &str) -> Option<i64> {
    let start = subject.rfind("[#")? + 2;
    let end = subject[start..].find(']')? + start;
    subject[start..end].trim().parse().ok()
}

/// A subject without its `Re:`/`Fwd:` prefixes and ticket tag.
fn clean_subject(subject: &str) -> String {
    let mut s = subject.trim();
    while let Some(rest) = ["re:", "fwd:", "fw:", "aw:", "odg:", "vs:", "odp:", "pd:"]
        .iter()
        .find_map(|p| {
            s.get(..p.len())
                .filter(|head| head.eq_ignore_ascii_case(p))
                .and_then(|_| s.get(p.len()..))
        })
    {
        s = rest.trim_start();
    }
    match s.rfind("[#") {
        Some(i) if s.ends_with(']') => s[..i].trim().to_owned(),
        _ => s.to_owned(),
    }
}

/// The conversation the message belongs to: for an email, the ticket its thread or subject
/// names; else the contact's latest ticket on this channel (reopened when pending or solved),
/// else a new one, acknowledged and assigned; a closed ticket stays closed and the message
/// opens a new one.
async fn join_ticket(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    contact: uuid::Uuid,
    inbound: uuid::Uuid,
    m: &Inbound,
    opts: &SendOptions,
) -> StoreResult<uuid::Uuid> {
    // Before the ticket it may reopen and reassign: a helpdesk request updating that ticket
    // takes the desk lock first, then the ticket.
    support::lock_desk(conn, tenant.id).await?;
    let channel = m.channel.as_str();
    let text = m.reply.as_deref().unwrap_or(&m.text);
    let files;
    let text = if text.trim().is_empty() && !(m.media.is_empty() && m.attachments.is_empty()) {
        // Only files: name them, so the ticket's text says what came.
        files = m
            .media
            .iter()
            .map(|x| x.url.as_str())
            .chain(
                m.attachments
                    .iter()
                    .map(|a| a.filename.as_deref().unwrap_or(&a.content_type)),
            )
            .collect::<Vec<_>>()
            .join("\n");
        &files
    } else {
        text
    };
    // Bounded either way: a mail may carry thousands of files with long names.
    let body = bounded(text, TICKET_TEXT_CHARS);
    let answered = match m.channel {
        Channel::Email => answered_ticket(conn, tenant, contact, m, opts).await?,
        Channel::Sms | Channel::Viber => None,
    };
    let latest = match answered {
        Some(t) => Some(t),
        None => support::lock_latest_ticket(conn, tenant.id, contact, channel).await?,
    };
    let mut follows = None;
    if let Some(ticket) = latest {
        if ticket.status == Status::Closed {
            follows = Some(ticket.id);
        } else {
            let written = support::insert_message(
                conn,
                tenant.id,
                ticket.id,
                MessageAuthor::Contact,
                None,
                &body,
                false,
            )
            .await?;
            support::set_inbound(conn, tenant.id, ticket.id, Some(written.id), inbound).await?;
            if matches!(ticket.status, Status::Pending | Status::Solved) {
                support::change_status(conn, tenant.id, &ticket, Status::Open).await?;
                if ticket.assignee_id.is_none() {
                    support::assign(conn, tenant, ticket.id).await?;
                }
            }
            return Ok(ticket.id);
        }
    }
    let subject = match m.subject.as_deref().map(clean_subject) {
        Some(s) if !s.is_empty() => excerpt(&s, SUBJECT_CHARS * 4),
        _ => excerpt(&body, SUBJECT_CHARS),
    };
    let row = support::NewTicketRow {
        contact_id: contact,
        channel,
        subject: if subject.is_empty() { "…" } else { &subject },
        body: &body,
        category: None,
        priority: "normal",
        author: MessageAuthor::Contact,
        assignee: None,
    };
    let ticket = support::create_ticket(conn, tenant, &row).await?;
    support::set_inbound(conn, tenant.id, ticket.id, None, inbound).await?;
    if let Some(closed) = follows {
        support::set_follows(conn, tenant.id, ticket.id, closed).await?;
    }
    let ack = crate::support::notify::customer(
        conn,
        tenant,
        &ticket,
        "ticket_acknowledgement",
        json!({}),
        opts,
    )
    .await;
    best_effort(ack, tenant.id, "the acknowledgement")?;
    Ok(ticket.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_lose_their_prefixes_and_give_their_number() {
        assert_eq!(subject_number("Re: Kartica [#42]"), Some(42));
        assert_eq!(subject_number("Kartica"), None);
        assert_eq!(clean_subject("RE: Fwd: Kartica [#42]"), "Kartica");
        assert_eq!(clean_subject("Odg: Rata kredita"), "Rata kredita");
        assert_eq!(
            clean_subject("Žao mi je"),
            "Žao mi je",
            "no panic inside a character"
        );
        assert_eq!(e164("385912345678", "HR").as_deref(), Some("+385912345678"));
        assert_eq!(e164("091 234 5678", "HR").as_deref(), Some("+385912345678"));
        assert_eq!(bounded("Žabe", 4), "Žabe");
        assert_eq!(bounded("Žabe!", 4), "Žab…");
        assert_eq!(bounded("ab", 4), "ab");
        assert_eq!(
            bounded(&"š".repeat(200_000), TICKET_TEXT_CHARS)
                .chars()
                .count(),
            TICKET_TEXT_CHARS
        );
    }
}
