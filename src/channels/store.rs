//! SQL for `channel_settings`: each tenant's provider per channel, its settings and sealed
//! secrets. Validation and sealing are `settings.rs`'s.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;

use crate::domain::{Channel, TenantId};

/// A stored configuration.
#[derive(Debug, Clone)]
pub struct ChannelRow {
    pub provider: String,
    pub settings: Value,
    pub secrets_sealed: Option<Vec<u8>>,
    pub secret_names: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

/// The channel's stored configuration, if any.
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
) -> Result<Option<ChannelRow>, sqlx::Error> {
    sqlx::query_as!(
        ChannelRow,
        "SELECT provider, settings, secrets_sealed, secret_names, updated_at FROM channel_settings
         WHERE tenant_id = $1 AND channel = $2",
        tenant.0,
        channel.as_str()
    )
    .fetch_optional(conn)
    .await
}

/// Creates or replaces the channel's configuration; when it changed.
pub async fn put(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
    provider: &str,
    settings: &Map<String, Value>,
    sealed: Option<&[u8]>,
    secret_names: &[String],
) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO channel_settings (tenant_id, channel, provider, settings, secrets_sealed,
            secret_names)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, channel) DO UPDATE SET provider = EXCLUDED.provider,
            settings = EXCLUDED.settings, secrets_sealed = EXCLUDED.secrets_sealed,
            secret_names = EXCLUDED.secret_names, updated_at = clock_timestamp()
         RETURNING updated_at",
        tenant.0,
        channel.as_str(),
        provider,
        Value::Object(settings.clone()),
        sealed,
        secret_names
    )
    .fetch_one(conn)
    .await
}

/// Removes the channel's configuration; false if there was none.
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "DELETE FROM channel_settings WHERE tenant_id = $1 AND channel = $2",
        tenant.0,
        channel.as_str()
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every sealed channel secret, locked for re-sealing: (tenant, channel, sealed).
pub async fn sealed_for_update(
    conn: &mut PgConnection,
) -> Result<Vec<(TenantId, String, Vec<u8>)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT tenant_id AS "tenant_id: TenantId", channel, secrets_sealed AS "sealed!"
           FROM channel_settings WHERE secrets_sealed IS NOT NULL FOR UPDATE"#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.tenant_id, r.channel, r.sealed))
        .collect())
}

/// Replaces a channel's sealed secrets (re-sealed with a new key).
pub async fn reseal(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
    sealed: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE channel_settings SET secrets_sealed = $3 WHERE tenant_id = $1 AND channel = $2",
        tenant.0,
        channel,
        sealed
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// How the worker reads the tenant's IMAP mailbox (`inbound_mailboxes`, written by
/// `crate::inbound::imap`); all zero before its first round.
pub async fn mailbox_status(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<super::settings::MailboxStatus, sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(b.holder IS NOT NULL AND b.lease_until > now(), false) AS watched,
                b.last_polled_at, b.last_error, COALESCE(b.fetched, 0) AS fetched,
                COALESCE(b.skipped, 0) AS skipped
         FROM (SELECT 1) one
         LEFT JOIN inbound_mailboxes b ON b.tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(conn)
    .await
}
