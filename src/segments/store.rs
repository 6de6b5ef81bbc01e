//! SQL for segments.

use sqlx::PgConnection;
use uuid::Uuid;

use super::model::Segment;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};

const COLUMNS: &str = "id, name, condition, created_at, updated_at";

pub fn not_found(id: Uuid) -> StoreError {
    StoreError::NotFound(format!("no segment with id {id}"))
}

pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
    condition: &str,
) -> StoreResult<Segment> {
    let sql = format!(
        "INSERT INTO segments (tenant_id, id, name, condition) VALUES ($1, $2, $3, $4)
         RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(condition)
        .fetch_one(conn)
        .await?)
}

pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> StoreResult<Option<Segment>> {
    let sql = format!("SELECT {COLUMNS} FROM segments WHERE tenant_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// Newest first, `limit + 1` rows (for the next page's cursor).
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<Segment>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM segments WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(before)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?)
}

/// Changes the fields given; None when there is no such segment.
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    name: Option<&str>,
    condition: Option<&str>,
) -> StoreResult<Option<Segment>> {
    let sql = format!(
        "UPDATE segments SET name = coalesce($3, name), condition = coalesce($4, condition),
                updated_at = now()
         WHERE tenant_id = $1 AND id = $2 RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(tenant)
        .bind(id)
        .bind(name)
        .bind(condition)
        .fetch_optional(conn)
        .await?)
}

/// Deletes a segment no broadcast names (a 409 otherwise: they keep what they were sent to).
pub async fn delete(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> StoreResult<bool> {
    // The row first, `FOR UPDATE`: a campaign naming the segment holds it `FOR SHARE` until it
    // commits, so the count of campaigns below sees it.
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM segments WHERE tenant_id = $1 AND id = $2 FOR UPDATE")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if exists.is_none() {
        return Ok(false);
    }
    let (broadcasts, campaigns): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM broadcasts WHERE tenant_id = $1 AND segment_id = $2),
                (SELECT count(*) FROM campaigns c
                   JOIN campaign_versions v
                     ON v.tenant_id = c.tenant_id AND v.campaign_id = c.id
                    AND v.version = c.version
                  WHERE c.tenant_id = $1 AND c.status <> 'archived'
                    AND v.definition -> 'audience' ->> 'segment' = $2::text)",
    )
    .bind(tenant)
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if broadcasts > 0 {
        return Err(StoreError::Conflict(format!(
            "{broadcasts} broadcast(s) name this segment; it cannot be deleted"
        )));
    }
    if campaigns > 0 {
        return Err(StoreError::Conflict(format!(
            "{campaigns} campaign(s) not archived name this segment as their audience; \
             archive them or change their audience first"
        )));
    }
    let done = sqlx::query("DELETE FROM segments WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
