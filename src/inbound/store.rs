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
    let id: Option<Uuid> = sqlx::query_scalar(
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
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = id {
        attach(conn, tenant, id, m).await?;
    }
    Ok(id)
}

/// The message's attachments: the provider's media by URL, an email's files with their content
/// (or, beyond the limit, without it and with why).
async fn attach(
    conn: &mut PgConnection,
    tenant: TenantId,
    inbound: Uuid,
    m: &Inbound,
) -> StoreResult<()> {
    let n = m.media.len() + m.attachments.len();
    if n == 0 {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(n);
    let mut filenames: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut types: Vec<&str> = Vec::with_capacity(n);
    let mut sizes: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut contents: Vec<Option<&[u8]>> = Vec::with_capacity(n);
    let mut urls: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut dropped: Vec<Option<&str>> = Vec::with_capacity(n);
    for media in &m.media {
        ids.push(Uuid::now_v7());
        filenames.push(None);
        types.push(
            media
                .content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        );
        sizes.push(None);
        contents.push(None);
        urls.push(Some(&media.url));
        dropped.push(None);
    }
    for a in &m.attachments {
        ids.push(Uuid::now_v7());
        filenames.push(a.filename.as_deref());
        types.push(&a.content_type);
        sizes.push(i64::try_from(a.size).ok());
        contents.push(a.content.as_deref());
        urls.push(None);
        dropped.push(a.dropped.as_deref());
    }
    sqlx::query(
        "INSERT INTO inbound_attachments (tenant_id, id, inbound_id, position, filename,
            content_type, size, content, url, dropped)
         SELECT $1, a.id, $2, a.position::int, a.filename, a.content_type, a.size, a.content,
                a.url, a.dropped
         FROM UNNEST($3::uuid[], $4::text[], $5::text[], $6::bigint[], $7::bytea[], $8::text[],
                     $9::text[]) WITH ORDINALITY
              AS a(id, filename, content_type, size, content, url, dropped, position)",
    )
    .bind(tenant)
    .bind(inbound)
    .bind(ids)
    .bind(filenames)
    .bind(types)
    .bind(sizes)
    .bind(contents)
    .bind(urls)
    .bind(dropped)
    .execute(conn)
    .await?;
    Ok(())
}

/// A stored attachment, for download.
#[derive(Debug, sqlx::FromRow)]
pub struct AttachmentFile {
    pub filename: Option<String>,
    pub content_type: String,
    pub content: Option<Vec<u8>>,
    pub url: Option<String>,
    pub dropped: Option<String>,
}

pub async fn attachment(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<AttachmentFile>> {
    Ok(sqlx::query_as(
        "SELECT filename, content_type, content, url, dropped FROM inbound_attachments
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
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
                recipient, subject, body, media, received_at,
                (SELECT COALESCE(jsonb_agg(jsonb_build_object('id', a.id, 'filename', a.filename,
                        'content_type', a.content_type, 'size', a.size, 'url', a.url,
                        'dropped', a.dropped) ORDER BY a.position), '[]')
                 FROM inbound_attachments a
                 WHERE a.tenant_id = i.tenant_id AND a.inbound_id = i.id) AS attachments
         FROM inbound_messages i WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Erasure: the record of each message stays (so a redelivery is still recognised), without
/// who sent it, what it said or what came with it.
pub async fn erase_contact(
    conn: &mut PgConnection,
    tenant: TenantId,
    contact: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM inbound_attachments a USING inbound_messages i
         WHERE a.tenant_id = $1 AND i.tenant_id = $1 AND i.contact_id = $2 AND a.inbound_id = i.id",
    )
    .bind(tenant)
    .bind(contact)
    .execute(&mut *conn)
    .await?;
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

/// Where the reading of a tenant's IMAP mailbox stopped.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MailboxMark {
    /// The mailbox it applies to (`user@host:port/folder`).
    pub source: Option<String>,
    pub uid_validity: Option<i64>,
    /// The last UID committed: the next round reads the unseen messages after it.
    pub last_uid: i64,
}

/// The tenants whose email channel names an IMAP mailbox.
pub async fn configured_mailboxes(pool: &sqlx::PgPool) -> Result<Vec<TenantId>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT tenant_id FROM channel_settings WHERE channel = 'email' AND settings ? 'imap_host'",
    )
    .fetch_all(pool)
    .await
}

/// Takes (or renews) the lease on a tenant's mailbox for `holder`, a worker process, for
/// `secs` seconds: None while another live holder has it. Where reading stopped otherwise.
pub async fn claim_mailbox(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    holder: Uuid,
    secs: i64,
) -> Result<Option<MailboxMark>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO inbound_mailboxes AS b (tenant_id, holder, lease_until)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (tenant_id) DO UPDATE
            SET holder = $2, lease_until = now() + make_interval(secs => $3)
          WHERE b.holder IS NULL OR b.holder = $2 OR b.lease_until < now()
         RETURNING source, uid_validity, last_uid",
    )
    .bind(tenant)
    .bind(holder)
    .bind(secs as f64)
    .fetch_optional(pool)
    .await
}

/// Gives the lease up (a worker stopping, or the mailbox no longer configured).
pub async fn release_mailbox(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    holder: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbound_mailboxes SET holder = NULL, lease_until = NULL
         WHERE tenant_id = $1 AND holder = $2",
    )
    .bind(tenant)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves the mark past a message, in the transaction that filed it (or skipped it): false when
/// `holder` lost the lease meanwhile, and the caller rolls back.
pub async fn advance_mailbox(
    conn: &mut PgConnection,
    tenant: TenantId,
    holder: Uuid,
    mark: &MailboxMark,
    skipped: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inbound_mailboxes
            SET source = $3, uid_validity = $4, last_uid = $5,
                fetched = fetched + $6, skipped = skipped + $7
          WHERE tenant_id = $1 AND holder = $2",
    )
    .bind(tenant)
    .bind(holder)
    .bind(&mark.source)
    .bind(mark.uid_validity)
    .bind(mark.last_uid)
    .bind(i64::from(!skipped))
    .bind(i64::from(skipped))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How a round went: when, and what went wrong (None: nothing).
pub async fn mailbox_polled(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    holder: Uuid,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbound_mailboxes SET last_polled_at = now(), last_error = $3
         WHERE tenant_id = $1 AND holder = $2",
    )
    .bind(tenant)
    .bind(holder)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
