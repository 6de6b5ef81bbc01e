//! SQL for `inbound_messages`.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::model::{Inbound, InboundMessage, Kind};
use crate::domain::TenantId;
use crate::error::StoreResult;

/// Records an inbound message once: None when this provider message id was recorded before
/// (a redelivery), else its new id.
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    m: &Inbound,
) -> StoreResult<Option<Uuid>> {
    let media = serde_json::to_value(&m.media).unwrap_or_else(|_| json!([]));
    Ok(sqlx::query_scalar(
        "INSERT INTO inbound_messages (tenant_id, id, channel, provider, provider_message_id,
            sender, recipient, body, media, subject)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT ON CONSTRAINT inbound_messages_once DO NOTHING
         RETURNING id",
    )
    .bind(tenant)
    .bind(Uuid::now_v7())
    .bind(m.channel.as_str())
    .bind(m.provider)
    .bind(&m.provider_message_id)
    .bind(m.sender.as_str())
    .bind(&m.recipient)
    .bind(&m.text)
    .bind(media)
    .bind(&m.subject)
    .fetch_optional(conn)
    .await?)
}

/// The contact and ticket an inbound message was filed under.
pub async fn file(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    contact: Option<Uuid>,
    kind: Kind,
    ticket: Option<Uuid>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE inbound_messages SET contact_id = $3, kind = $4, ticket_id = $5
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .bind(contact)
    .bind(kind.as_str())
    .bind(ticket)
    .execute(conn)
    .await?;
    Ok(())
}

/// The earlier record of a redelivered message: its contact and ticket.
pub async fn filed(
    conn: &mut PgConnection,
    tenant: TenantId,
    m: &Inbound,
) -> StoreResult<Option<(Uuid, Option<Uuid>, Option<Uuid>)>> {
    Ok(sqlx::query_as(
        "SELECT id, contact_id, ticket_id FROM inbound_messages
         WHERE tenant_id = $1 AND channel = $2 AND provider_message_id = $3",
    )
    .bind(tenant)
    .bind(m.channel.as_str())
    .bind(&m.provider_message_id)
    .fetch_optional(conn)
    .await?)
}

/// The ticket of the newest of these earlier inbound messages (an email's thread), if any.
pub async fn ticket_of(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
    provider_ids: &[String],
) -> StoreResult<Option<Uuid>> {
    if provider_ids.is_empty() {
        return Ok(None);
    }
    Ok(sqlx::query_scalar(
        "SELECT ticket_id FROM inbound_messages
         WHERE tenant_id = $1 AND channel = $2 AND provider_message_id = ANY($3)
           AND ticket_id IS NOT NULL
         ORDER BY id DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(channel)
    .bind(provider_ids)
    .fetch_optional(conn)
    .await?
    .flatten())
}

/// An inbound message as it came, for `GET /v1/inbound-messages/{id}`.
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<InboundMessage>> {
    Ok(sqlx::query_as(
        "SELECT id, channel, provider, provider_message_id, kind, contact_id, ticket_id, sender,
                recipient, subject, body, media, received_at
         FROM inbound_messages WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Erasure: the record of each message stays (so a redelivery is still recognised), without
/// who sent it or what it said.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbound_messages SET sender = NULL, recipient = NULL, body = NULL, media = '[]',
            subject = NULL
         WHERE tenant_id = $1 AND contact_id = $2",
    )
    .bind(tenant)
    .bind(contact)
    .execute(conn)
    .await?;
    Ok(())
}
