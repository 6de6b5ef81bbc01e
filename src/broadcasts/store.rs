//! SQL for broadcasts: the row, its status and the walk's lease and cursor.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::model::{BroadcastStats, BroadcastStatus};
use crate::domain::{Purpose, TenantId};
use crate::error::{StoreError, StoreResult};

/// A broadcast as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BroadcastRow {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub name: String,
    pub segment_id: Option<Uuid>,
    pub audience: Option<String>,
    pub template_key: String,
    pub channels: Vec<String>,
    pub purpose: Purpose,
    pub send_at: Option<DateTime<Utc>>,
    pub send_at_local: Option<NaiveDateTime>,
    pub per_second: Option<i32>,
    pub quiet_hours: Option<Value>,
    pub frequency_cap: Option<Value>,
    pub suppress_while_ticket_open: bool,
    pub variables: Value,
    pub status: BroadcastStatus,
    pub starts_at: Option<DateTime<Utc>>,
    pub cursor: Option<Uuid>,
    pub next_slot: Option<DateTime<Utc>>,
    pub scanned: i64,
    pub targeted: i64,
    pub queued: i64,
    pub deferred: i64,
    pub suppressed: Value,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl BroadcastRow {
    /// The counters the walk keeps on the row.
    pub fn walk_stats(&self) -> BroadcastStats {
        let suppressed: BTreeMap<String, i64> =
            serde_json::from_value(self.suppressed.clone()).unwrap_or_default();
        BroadcastStats {
            scanned: self.scanned,
            targeted: self.targeted,
            queued: self.queued,
            deferred_quiet_hours: self.deferred,
            suppressed,
            ..BroadcastStats::default()
        }
    }
}

const COLUMNS: &str = "tenant_id, id, name, segment_id, audience, template_key, channels, purpose,
    send_at, send_at_local, per_second, quiet_hours, frequency_cap, suppress_while_ticket_open,
    variables, status, starts_at, cursor, next_slot, scanned, targeted, queued, deferred,
    suppressed, error, created_at, updated_at, scheduled_at, started_at, finished_at";

pub fn not_found(id: Uuid) -> StoreError {
    StoreError::NotFound(format!("no broadcast with id {id}"))
}

/// A broadcast to create, checked.
pub struct NewBroadcast<'a> {
    pub name: &'a str,
    pub segment_id: Option<Uuid>,
    pub audience: Option<&'a str>,
    pub template_key: &'a str,
    pub channels: Vec<&'static str>,
    pub purpose: Purpose,
    pub send_at: Option<DateTime<Utc>>,
    pub send_at_local: Option<NaiveDateTime>,
    pub per_second: Option<i32>,
    pub quiet_hours: Option<Value>,
    pub frequency_cap: Option<Value>,
    pub suppress_while_ticket_open: bool,
    pub variables: Value,
}

pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    b: &NewBroadcast<'_>,
) -> StoreResult<BroadcastRow> {
    let sql = format!(
        "INSERT INTO broadcasts (tenant_id, id, name, segment_id, audience, template_key,
            channels, purpose, send_at, send_at_local, per_second, quiet_hours, frequency_cap,
            suppress_while_ticket_open, variables, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'draft')
         RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(Uuid::now_v7())
        .bind(b.name)
        .bind(b.segment_id)
        .bind(b.audience)
        .bind(b.template_key)
        .bind(&b.channels)
        .bind(b.purpose)
        .bind(b.send_at)
        .bind(b.send_at_local)
        .bind(b.per_second)
        .bind(&b.quiet_hours)
        .bind(&b.frequency_cap)
        .bind(b.suppress_while_ticket_open)
        .bind(&b.variables)
        .fetch_one(conn)
        .await?)
}

pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<BroadcastRow>> {
    let sql = format!("SELECT {COLUMNS} FROM broadcasts WHERE tenant_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// The broadcast, locked until the caller's transaction ends (status changes).
pub async fn lock(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<BroadcastRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM broadcasts WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// Newest first, `limit + 1` rows.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<BroadcastRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM broadcasts WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

/// Moves a locked broadcast to `status`; scheduling sets when the walk starts.
pub async fn set_status(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    status: BroadcastStatus,
    starts_at: Option<DateTime<Utc>>,
    next_slot: Option<DateTime<Utc>>,
) -> StoreResult<BroadcastRow> {
    let sql = format!(
        "UPDATE broadcasts
            SET status = $3, updated_at = now(),
                starts_at = coalesce($4, starts_at),
                next_slot = coalesce($5, next_slot),
                scheduled_at = CASE WHEN $3 = 'scheduled' THEN coalesce(scheduled_at, now())
                                    ELSE scheduled_at END,
                finished_at = CASE WHEN $3 IN ('cancelled', 'failed')
                                   THEN coalesce(finished_at, now()) ELSE finished_at END,
                holder = CASE WHEN $3 IN ('running', 'scheduled') THEN holder END,
                locked_until = CASE WHEN $3 IN ('running', 'scheduled') THEN locked_until END
          WHERE tenant_id = $1 AND id = $2
          RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .bind(status)
        .bind(starts_at)
        .bind(next_slot)
        .fetch_one(conn)
        .await?)
}

/// Takes the walk of one due broadcast (scheduled and its time come, or running) for
/// `lease`: the one served longest ago whose lease is free or already `holder`'s. `now` is
/// the service's clock (tests move it).
pub async fn claim(
    pool: &PgPool,
    holder: Uuid,
    lease: Duration,
    now: DateTime<Utc>,
) -> StoreResult<Option<BroadcastRow>> {
    let sql = format!(
        "UPDATE broadcasts b
            SET status = 'running', holder = $1,
                locked_until = now() + make_interval(secs => $2),
                started_at = coalesce(started_at, now()), updated_at = now()
          WHERE (b.tenant_id, b.id) = (
                SELECT tenant_id, id FROM broadcasts
                 WHERE status IN ('scheduled', 'running') AND starts_at <= $3
                   AND (locked_until IS NULL OR locked_until < now() OR holder = $1)
                 ORDER BY updated_at
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED)
          RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(holder)
        .bind(lease.as_secs_f64())
        .bind(now)
        .fetch_optional(pool)
        .await?)
}

/// What one page of the walk adds to the counters.
#[derive(Debug, Default)]
pub struct PageCounts {
    pub scanned: i64,
    pub targeted: i64,
    pub queued: i64,
    pub deferred: i64,
    pub suppressed: BTreeMap<String, i64>,
}

/// Moves the walk past a page, in the caller's transaction, if `holder` still holds it at
/// `from` and it is still running: false otherwise (the page is then not the caller's to
/// write). Locks the row until the transaction ends, so a pause or a cancel waits for the
/// page, or the page for them.
pub async fn advance(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    holder: Uuid,
    from: Option<Uuid>,
    to: Uuid,
    lease: Duration,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE broadcasts SET cursor = $5, updated_at = now(),
                locked_until = now() + make_interval(secs => $6)
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'
            AND cursor IS NOT DISTINCT FROM $4",
    )
    .bind(tenant)
    .bind(id)
    .bind(holder)
    .bind(from)
    .bind(to)
    .bind(lease.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Adds a page's counts (after [`advance`], in its transaction) and the next free slot.
pub async fn add_counts(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    counts: &PageCounts,
    next_slot: Option<DateTime<Utc>>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE broadcasts
            SET scanned = scanned + $3, targeted = targeted + $4, queued = queued + $5,
                deferred = deferred + $6,
                suppressed = (SELECT coalesce(jsonb_object_agg(key, total), '{}'::jsonb) FROM (
                    SELECT key, sum(value::bigint) AS total FROM (
                        SELECT key, value FROM jsonb_each_text(suppressed)
                        UNION ALL SELECT key, value FROM jsonb_each_text($7)) parts
                    GROUP BY key) sums),
                next_slot = coalesce($8, next_slot)
          WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .bind(counts.scanned)
    .bind(counts.targeted)
    .bind(counts.queued)
    .bind(counts.deferred)
    .bind(sqlx::types::Json(&counts.suppressed))
    .bind(next_slot)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends the walk: every member has its message. False when `holder` no longer holds it.
pub async fn finish(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    holder: Uuid,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE broadcasts SET status = 'completed', finished_at = now(), updated_at = now(),
                holder = NULL, locked_until = NULL
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'",
    )
    .bind(tenant)
    .bind(id)
    .bind(holder)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Fails the walk for good with the reason.
pub async fn fail(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    holder: Uuid,
    error: &str,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE broadcasts SET status = 'failed', error = $4, finished_at = now(),
                updated_at = now(), holder = NULL, locked_until = NULL
          WHERE tenant_id = $1 AND id = $2 AND holder = $3 AND status = 'running'",
    )
    .bind(tenant)
    .bind(id)
    .bind(holder)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives the walk back before its lease runs out (another broadcast's turn).
pub async fn release(pool: &PgPool, tenant: TenantId, id: Uuid, holder: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE broadcasts SET holder = NULL, locked_until = NULL
          WHERE tenant_id = $1 AND id = $2 AND holder = $3",
    )
    .bind(tenant)
    .bind(id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Wakes the broadcasts' workers when the caller's transaction commits.
pub async fn wake(conn: &mut PgConnection) -> StoreResult<()> {
    Ok(crate::db::notify(conn, super::NOTIFY_CHANNEL).await?)
}
