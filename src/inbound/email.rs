//! A raw email (RFC 5322, MIME) as a customer's message: who wrote it, what they wrote (the
//! text part, else the HTML's text, in whatever charset it came: UTF-8, windows-1250,
//! iso-8859-2...), which earlier mails it answers, and whether a machine wrote it. Parsed by
//! mail-parser.

use mail_parser::{HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

use super::model::{Attachment, Bounce, Inbound, Sender};
use crate::domain::Channel;

/// The largest raw email taken, attachments included (larger ones are a 413 at the edge).
pub const MAX_EMAIL_BYTES: usize = 25 * 1024 * 1024;

/// Why a raw message cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    #[error("the body is not an email message (RFC 5322)")]
    NotAMessage,
    #[error("the message has no From address")]
    NoSender,
}

/// Message ids as they are compared: without the angle brackets, trimmed.
pub fn bare_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_owned()
}

fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => t.split_whitespace().map(bare_id).collect(),
        HeaderValue::TextList(list) => list
            .iter()
            .flat_map(|t| t.split_whitespace().map(bare_id).collect::<Vec<_>>())
            .collect(),
        _ => Vec::new(),
    }
}

/// The default of `attachment_max_bytes`: what an email's files may take in all.
pub const DEFAULT_ATTACHMENT_MAX_BYTES: usize = 10 * 1024 * 1024;

/// The addresses a header names: a parsed address list, or the raw text of headers such as
/// `Delivered-To` that mail-parser leaves unparsed.
fn addresses(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Address(a) => a
            .iter()
            .filter_map(|a| a.address())
            .map(|a| a.trim().to_lowercase())
            .collect(),
        HeaderValue::Text(t) => vec![bare_id(t).to_lowercase()],
        HeaderValue::TextList(list) => list.iter().map(|t| bare_id(t).to_lowercase()).collect(),
        _ => Vec::new(),
    }
}

/// An email's files in order, the content of each kept while the total stays within `limit`
/// bytes; the ones after are listed as dropped.
fn attachments(message: &Message<'_>, limit: usize) -> Vec<Attachment> {
    let mut used = 0usize;
    message
        .attachments()
        .map(|a| {
            let content = a.contents();
            let content_type = match a.content_type() {
                Some(c) => match c.subtype() {
                    Some(sub) => format!("{}/{sub}", c.ctype()),
                    None => c.ctype().to_owned(),
                },
                None if matches!(a.body, PartType::Message(_)) => "message/rfc822".to_owned(),
                None => "application/octet-stream".to_owned(),
            }
            .to_ascii_lowercase();
            let fits = used + content.len() <= limit;
            if fits {
                used += content.len();
            }
            Attachment {
                filename: a
                    .attachment_name()
                    .map(|n| n.trim().chars().filter(|c| !c.is_control()).collect())
                    .filter(|n: &String| !n.is_empty()),
                content_type,
                size: content.len(),
                content: fits.then(|| content.to_vec()),
                dropped: (!fits).then(|| {
                    format!(
                        "over the limit of {} bytes of attachments per message",
                        limit
                    )
                }),
            }
        })
        .collect()
}

/// Parses a raw email into an inbound message. `text` keeps the whole text; `reply` is what
/// goes on the ticket: the text without the quoted history and signature it ends with. Its
/// files are kept up to `attachment_limit` bytes in all.
pub fn parse(raw: &[u8], attachment_limit: usize) -> Result<Inbound, MailError> {
    let message = MessageParser::default()
        .parse(raw)
        .filter(|m| !m.parts.is_empty() && m.headers().iter().next().is_some())
        .ok_or(MailError::NotAMessage)?;
    let from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(|a| a.trim().to_lowercase())
        .filter(|a| a.contains('@'))
        .ok_or(MailError::NoSender)?;
    let id = match message.message_id() {
        Some(id) if !id.trim().is_empty() => bare_id(id),
        // No Message-ID (rare; some scripts): the content names it, so a redelivery of the
        // same bytes is still recognised.
        _ => format!("sha256:{}", hex::encode(Sha256::digest(raw))),
    };
    let mut thread = ids(message.in_reply_to());
    for r in ids(message.references()).into_iter().rev() {
        if !thread.contains(&r) {
            thread.push(r);
        }
    }
    let text = message
        .body_text(0)
        .map(|t| t.replace("\r\n", "\n"))
        .unwrap_or_default();
    let mut addressed: Vec<String> = Vec::new();
    for name in ["To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To"] {
        for value in message.header_values(name) {
            for a in addresses(value) {
                if a.contains('@') && !addressed.contains(&a) {
                    addressed.push(a);
                }
            }
        }
    }
    let header = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    let automatic = header("Auto-Submitted").is_some_and(|v| !v.starts_with("no"))
        || header("Precedence")
            .is_some_and(|v| matches!(v.as_str(), "bulk" | "auto_reply" | "junk" | "list"))
        || header("X-Autoreply").is_some()
        || header("X-Autorespond").is_some()
        || header("X-Auto-Response-Suppress").is_some_and(|v| v.contains("all"));
    let reply = strip_quoted(&text);
    let bounce = bounce(&message);
    Ok(Inbound {
        channel: Channel::Email,
        provider: "email",
        provider_message_id: id,
        sender: Sender::Email(from),
        recipient: message
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(str::to_owned),
        reply: (reply != text).then_some(reply),
        text,
        media: Vec::new(),
        subject: message.subject().map(str::to_owned),
        thread,
        automatic,
        bounce,
        attachments: attachments(&message, attachment_limit),
        addressed,
    })
}

fn part_text(body: &PartType<'_>) -> Option<String> {
    match body {
        PartType::Text(t) | PartType::Html(t) => Some(t.to_string()),
        PartType::Binary(b) | PartType::InlineBinary(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        PartType::Message(_) | PartType::Multipart(_) => None,
    }
}

/// A delivery status notification (RFC 3464: `multipart/report; report-type=delivery-status`)
/// about a mail Rapport sent: which one (the returned message's or headers' Message-ID), to
/// whom, and why it failed.
fn bounce(message: &Message<'_>) -> Option<Bounce> {
    let status_part = message.parts.iter().find(|p| {
        p.content_type()
            .is_some_and(|c| c.ctype() == "message" && c.subtype() == Some("delivery-status"))
    })?;
    let report = part_text(&status_part.body)?;
    let field = |name: &str| {
        report.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let action = field("Action").unwrap_or_default().to_ascii_lowercase();
    if !matches!(action.as_str(), "failed" | "") {
        // `delayed`, `delivered`, `relayed`, `expanded`: no failure to record.
        return None;
    }
    let status = field("Status");
    let recipient = field("Final-Recipient")
        .or_else(|| field("Original-Recipient"))
        .map(|r| match r.split_once(';') {
            Some((_, address)) => address.trim().to_lowercase(),
            None => r.trim().to_lowercase(),
        });
    let original = message.parts.iter().find_map(|p| match &p.body {
        PartType::Message(m) => m.message_id().map(bare_id),
        body if p.content_type().is_some_and(|c| {
            c.subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("rfc822-headers"))
        }) =>
        {
            part_text(body)?.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("Message-ID")
                    .then(|| bare_id(v))
            })
        }
        _ => None,
    });
    let hard = status.as_deref().is_some_and(|s| s.starts_with('5'));
    Some(Bounce {
        original,
        recipient,
        hard,
        reason: match (status, field("Diagnostic-Code")) {
            (Some(s), Some(d)) => format!("bounced {s}: {d}"),
            (Some(s), None) => format!("bounced {s}"),
            (None, Some(d)) => format!("bounced: {d}"),
            (None, None) => "bounced".to_owned(),
        },
    })
}

/// A line that introduces the quoted message below it, in the languages of our markets
/// ("On Mon, 2 Dec 2026, Ana wrote:", "... je napisao/la:", "... napisal(a):", "... írta:",
/// "... napisał(a):").
fn is_attribution(line: &str) -> bool {
    let l = line.to_lowercase();
    l.ends_with(':')
        && [
            "wrote", "napisao", "napisala", "napisal", "napisał", "írta", "schrieb",
        ]
        .iter()
        .any(|w| l.contains(w))
}

/// The text without the history it quotes: everything from an attribution line, an
/// "-----Original Message-----" block, an Outlook header block or the signature delimiter on,
/// and `>` lines. The whole text when nothing else would be left.
pub fn strip_quoted(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept: Vec<&str> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
        let ends = is_attribution(t)
            // Gmail wraps a long attribution: "On ..., Ana <ana@example.com>" / "wrote:".
            || (t.starts_with("On ") && is_attribution(next) && next.split_whitespace().count() <= 2)
            || t.starts_with("-----Original Message-----")
            || t.starts_with("-----Izvorna poruka-----")
            || t.starts_with("-----Ursprüngliche Nachricht-----")
            || *line == "-- "
            || (t.starts_with("________________") && t.chars().all(|c| c == '_'))
            || (t.starts_with("From: ") && next.starts_with("Sent: "));
        if ends {
            break;
        }
        if t.starts_with('>') {
            continue;
        }
        kept.push(line);
    }
    let reply = kept.join("\n").trim().to_owned();
    if reply.is_empty() {
        text.trim().to_owned()
    } else {
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_is_kept_and_the_quoted_history_dropped() {
        let gmail = "Still broken.\n\nOn Mon, 2 Dec 2026 at 10:00, Acme <podrska@acme.example> wrote:\n> We fixed it.\n";
        assert_eq!(strip_quoted(gmail), "Still broken.");
        let wrapped = "Thanks\n\nOn Mon, 2 Dec 2026 at 10:00, Acme Support <podrska@acme.example>\nwrote:\n> x";
        assert_eq!(strip_quoted(wrapped), "Thanks");
        let hr = "Hvala!\n\npon, 2. pro 2026. u 10:00 Acme <podrska@acme.example> je napisao/la:\n> Riješeno.";
        assert_eq!(strip_quoted(hr), "Hvala!");
        let hu = "Köszönöm\n\n2026. dec. 2., hétfő 10:00 dátummal Acme <podrska@acme.example> ezt írta:\n> Kész.";
        assert_eq!(strip_quoted(hu), "Köszönöm");
        let pl = "Dziękuję\n\nW dniu pon., 2 gru 2026 o 10:00 Acme <podrska@acme.example> napisał(a):\n> Gotowe.";
        assert_eq!(strip_quoted(pl), "Dziękuję");
        let outlook = "OK.\n\n-----Original Message-----\nFrom: Acme\nSent: Monday\n\nFixed.";
        assert_eq!(strip_quoted(outlook), "OK.");
        let signed = "Da, to je to.\n-- \nAna Horvat\nZagreb";
        assert_eq!(strip_quoted(signed), "Da, to je to.");
        let interleaved = "> Is it fixed?\nYes.\n> Anything else?\nNo.";
        assert_eq!(strip_quoted(interleaved), "Yes.\nNo.");
        assert_eq!(
            strip_quoted("> only quotes"),
            "> only quotes",
            "never nothing"
        );
    }

    #[test]
    fn ids_lose_their_brackets() {
        assert_eq!(bare_id(" <a1@b.example> "), "a1@b.example");
    }
}
