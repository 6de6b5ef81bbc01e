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

/// Sets (or with None removes) the channel's `max_per_second` pacing.
pub async fn set_pacing(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: Channel,
    per_second: Option<f64>,
) -> Result<(), sqlx::Error> {
    match per_second {
        Some(rate) => {
            sqlx::query(
                "INSERT INTO channel_pacing (tenant_id, channel, per_second) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, channel) DO UPDATE SET per_second = excluded.per_second",
            )
            .bind(tenant)
            .bind(channel.as_str())
            .bind(rate)
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM channel_pacing WHERE tenant_id = $1 AND channel = $2")
                .bind(tenant)
                .bind(channel.as_str())
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

/// The tenant's channels with a `max_per_second`, and that rate.
pub async fn max_per_second(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<Vec<(String, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT channel, per_second FROM channel_pacing
         WHERE tenant_id = $1 AND per_second IS NOT NULL ORDER BY channel",
    )
    .bind(tenant)
    .fetch_all(conn)
    .await
}

/// Holds a channel until `until` (a provider answered 429): no worker sends on it before.
pub async fn hold_channel(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    channel: &str,
    until: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO channel_pacing (tenant_id, channel, tat) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, channel) DO UPDATE SET tat = greatest(channel_pacing.tat, $3)",
    )
    .bind(tenant)
    .bind(channel)
    .bind(until)
    .execute(pool)
    .await?;
    Ok(())
}

/// The paced channels (a rate, or a hold after a 429) that have messages due now.
pub async fn paced_with_due(pool: &sqlx::PgPool) -> Result<Vec<(TenantId, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.tenant_id, p.channel FROM channel_pacing p
         WHERE EXISTS (SELECT 1 FROM messages m
                       WHERE m.tenant_id = p.tenant_id AND m.channel = p.channel
                         AND m.status = 'queued' AND m.next_attempt_at <= now())",
    )
    .fetch_all(pool)
    .await
}

/// A paced channel's state, locked until the transaction ends: every worker process takes
/// its turn here, so the rate holds across them.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub per_second: Option<f64>,
    pub tat: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

impl Pacing {
    /// How many messages may go now (at most `want`), and when the next one may if none can:
    /// a generic cell rate algorithm with a burst of 5% of a second's rate (at least one
    /// message), so that no second sees more than the rate and a little.
    pub fn grant(&self, want: i64) -> (i64, Option<std::time::Duration>) {
        let Some(rate) = self.per_second else {
            return if self.tat > self.now {
                (0, (self.tat - self.now).to_std().ok())
            } else {
                (want, None)
            };
        };
        let interval = 1.0 / rate;
        let burst = (rate * 0.05).max(1.0);
        let start = self.tat.max(self.now);
        let ahead = (start - self.now).as_seconds_f64();
        let available = ((burst * interval - ahead) / interval).floor() as i64;
        let n = available.clamp(0, want);
        if n > 0 {
            (n, None)
        } else {
            let wait = ahead - burst * interval + interval;
            (0, Some(std::time::Duration::from_secs_f64(wait.max(0.001))))
        }
    }

    /// The theoretical arrival time after `used` messages were taken.
    pub fn after(&self, used: i64) -> DateTime<Utc> {
        match self.per_second {
            Some(rate) => {
                self.tat.max(self.now)
                    + chrono::Duration::microseconds((used as f64 / rate * 1e6) as i64)
            }
            None => self.tat,
        }
    }
}

pub async fn lock_pacing(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
) -> Result<Option<Pacing>, sqlx::Error> {
    let row: Option<(Option<f64>, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT per_second, tat, clock_timestamp() FROM channel_pacing
         WHERE tenant_id = $1 AND channel = $2 FOR UPDATE",
    )
    .bind(tenant)
    .bind(channel)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(per_second, tat, now)| Pacing {
        per_second,
        tat,
        now,
    }))
}

pub async fn set_tat(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &str,
    tat: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE channel_pacing SET tat = $3 WHERE tenant_id = $1 AND channel = $2")
        .bind(tenant)
        .bind(channel)
        .bind(tat)
        .execute(conn)
        .await?;
    Ok(())
}
