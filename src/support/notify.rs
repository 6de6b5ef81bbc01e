//! Messages Rapport sends a customer about a ticket on its own: the acknowledgement of a new
//! ticket, the solved notice and survey, the call-back notice of a missed call.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::model::Ticket;
use crate::domain::{Channel, TenantContext};
use crate::messages::model::{Compose, Message};
use crate::messages::store::{self as messages, EnqueueError, SendOptions};
use crate::templates::store as templates;

/// Sends `template` (the tenant's, else the built-in) about a ticket, in the caller's
/// transaction: on the ticket's channel first, then the best the contact has. Its variables
/// are `vars.ticket` and the fields of `extra`. None when no such template exists.
pub async fn customer(
    conn: &mut PgConnection,
    tenant: &TenantContext,
    ticket: &Ticket,
    template: &str,
    extra: Value,
    opts: &SendOptions,
) -> Result<Option<Message>, EnqueueError> {
    if templates::get(conn, tenant.id, template).await?.is_none() {
        tracing::debug!(template, "no such template; the customer is not notified");
        return Ok(None);
    }
    let mut channels: Vec<Channel> = ticket.channel.reply_channel().into_iter().collect();
    for c in [Channel::Email, Channel::Sms, Channel::Viber] {
        if !channels.contains(&c) {
            channels.push(c);
        }
    }
    let mut vars = json!({"ticket": {"id": ticket.id, "number": ticket.number,
        "subject": ticket.subject, "status": ticket.status, "priority": ticket.priority}});
    if let (Some(v), Some(e)) = (vars.as_object_mut(), extra.as_object()) {
        v.extend(e.clone());
    }
    let compose = Compose {
        contact_id: ticket.contact_id,
        template_key: template,
        channels: &channels,
        vars,
        event: None,
        journey: None,
        ticket: Some(ticket.id),
        suppress: None,
    };
    Ok(Some(messages::enqueue(conn, tenant, compose, opts).await?))
}
